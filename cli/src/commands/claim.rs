//! `prebuildsctl claim --user U (--preset ID | --template T --param K=V…) --name N`: the claim RPC
//! a platform makes when a user creates a workspace of a preset. Sends a
//! `prebuilds.claim.request.v1` CloudEvent to `claim.request` with RabbitMQ direct reply-to and
//! waits for the worker's `prebuilds.claim.reply.v1` (through the shared
//! `prebuilds_runtime::amqp::rpc::RpcClient`).
//!
//! A miss says why: `reason` is `pool_empty` (the preset has no eligible prebuild now) or
//! `no_matching_preset` (no preset of the template's active version matches the --param values,
//! defaults included); for the latter the worker's reply lists the presets it tried, and the error
//! shows their parameter sets.
//!
//! The CloudEvent `id` is the idempotency key: `--request-id` re-sends a request under the same id
//! and gets the first outcome back (for a claim whose reply was lost to a timeout).

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use chrono::Utc;
use prebuilds_runtime::{
    amqp::{
        rpc::{RpcClient, RpcError},
        Entity, QueueKind,
    },
    config::{parse_duration, Connection},
};
use prebuilds_schemas::{
    ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent, MissReason, Parameter, PresetParameters,
};
use serde::Serialize;
use uuid::Uuid;

use crate::{
    context::{
        amqp_unreachable, connect_amqp, connect_db, resolve_template, UsageError, EVENT_SOURCE,
    },
    output,
};

#[derive(Debug, clap::Args)]
#[command(
    group(clap::ArgGroup::new("target").required(true).args(["preset", "template"])),
    after_help = "Exit code 0 when a prebuild was claimed; 1 when none was eligible, the claim was \
        rejected or no reply came in time.\n\n\
        Examples:\n  \
        prebuildsctl claim --user alice --preset 0b6c2f1e-… --name alice-dev\n  \
        prebuildsctl claim --user alice --template python-dev --param cpus=8 --param region=eu --name alice-dev\n  \
        prebuildsctl claim --user alice --template python-dev --param cpus=8 --name alice-dev   # region takes its default\n\n\
        A miss (no_eligible_prebuild) gives its reason: pool_empty (the preset has no eligible \
        prebuild right now) or no_matching_preset (no preset of the template's active version \
        matches the --param values, parameters left out taking their defaults; the presets and \
        their parameter values are listed)."
)]
pub struct Args {
    /// Username of the claimant.
    #[arg(long)]
    user: String,
    /// Preset to claim from (its id, as `prebuildsctl status` shows it).
    #[arg(long)]
    preset: Option<Uuid>,
    /// Template whose active version's preset is matched from the --param values.
    #[arg(long)]
    template: Option<String>,
    /// Organization of --template (needed when the name is not unique).
    #[arg(long, requires = "template")]
    organization: Option<String>,
    /// Parameter value K=V; repeat for several. Matches the preset (with --template) and is passed
    /// to the claim build.
    #[arg(long = "param", value_name = "K=V", value_parser = parse_param)]
    params: Vec<(String, String)>,
    /// Name of the claimed workspace.
    #[arg(long)]
    name: String,
    /// How long to wait for the reply.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// Request id (idempotency key); reuse one to retry a claim and get its first outcome.
    #[arg(long)]
    request_id: Option<Uuid>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("'{s}' is not K=V (e.g. --param cpus=8)")),
    }
}

/// The printed result (one `--json` object).
#[derive(Debug, Serialize)]
struct ClaimResult {
    request_id: Uuid,
    /// `claimed`, `no_eligible_prebuild`, `rejected` or `timeout`.
    outcome: String,
    workspace_id: Option<Uuid>,
    build_id: Option<Uuid>,
    job_id: Option<Uuid>,
    preset_id: Option<Uuid>,
    error_code: Option<String>,
    error_message: Option<String>,
    /// With `no_eligible_prebuild`: `pool_empty` or `no_matching_preset`.
    reason: Option<MissReason>,
    /// With `no_matching_preset`: the presets of the active version and their parameter values.
    presets: Vec<PresetParameters>,
    latency_ms: f64,
}

pub async fn run(connection: &Connection, args: Args) -> anyhow::Result<()> {
    if let Err(e) = prebuilds_core::validate_workspace_name(&args.name) {
        return Err(UsageError(format!("--name: {e}")).into());
    }
    if args.timeout.is_zero() {
        return Err(UsageError("--timeout must be greater than 0".into()).into());
    }

    // 1. Names to ids.
    let (user_id, template_id) = {
        let pool = connect_db(connection).await?;
        let client = pool.get().await?;
        let user_id: Uuid = client
            .query_opt("SELECT id FROM users WHERE username = $1", &[&args.user])
            .await?
            .ok_or_else(|| {
                anyhow!(
                    "user '{u}' does not exist (create it with `prebuildsctl user create --username {u}`)",
                    u = args.user
                )
            })?
            .get(0);
        let template_id = match &args.template {
            Some(name) => Some(
                resolve_template(&client, name, args.organization.as_deref(), false)
                    .await?
                    .id,
            ),
            None => None,
        };
        (user_id, template_id)
    };
    let request = ClaimRequest {
        user_id,
        workspace_name: args.name.clone(),
        preset_id: args.preset,
        template_id,
        parameters: args
            .params
            .iter()
            .map(|(name, value)| Parameter {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
    };
    let event = CloudEvent::with_id(
        args.request_id.unwrap_or_else(Uuid::new_v4),
        EVENT_SOURCE,
        Utc::now(),
        request,
    );

    // 2. The RPC.
    let (reply, latency) = call(connection, &event, args.timeout).await?;
    let result = match &reply {
        Some(reply) => ClaimResult {
            request_id: event.id,
            outcome: reply.outcome.as_str().to_owned(),
            workspace_id: reply.workspace_id,
            build_id: reply.build_id,
            job_id: reply.job_id,
            preset_id: reply.preset_id,
            error_code: reply.error.as_ref().map(|e| {
                serde_json::to_value(e.code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            }),
            error_message: reply.error.as_ref().map(|e| e.message.clone()),
            reason: reply.reason,
            presets: reply.presets.clone(),
            latency_ms: latency.as_secs_f64() * 1000.0,
        },
        None => ClaimResult {
            request_id: event.id,
            outcome: "timeout".to_owned(),
            workspace_id: None,
            build_id: None,
            job_id: None,
            preset_id: None,
            error_code: None,
            error_message: None,
            reason: None,
            presets: vec![],
            latency_ms: latency.as_secs_f64() * 1000.0,
        },
    };

    // 3. Report.
    if args.json {
        output::print_json(std::slice::from_ref(&result))?;
    } else {
        let rows: Vec<Vec<String>> = [
            ("outcome", result.outcome.clone()),
            ("request_id", result.request_id.to_string()),
            ("workspace_id", opt(result.workspace_id)),
            ("build_id", opt(result.build_id)),
            ("job_id", opt(result.job_id)),
            ("preset_id", opt(result.preset_id)),
            (
                "reason",
                output::opt_text(result.reason.map(MissReason::as_str)),
            ),
            ("error_code", output::opt_text(result.error_code.as_deref())),
            (
                "error_message",
                output::opt_text(result.error_message.as_deref()),
            ),
            ("latency", format!("{:.1} ms", result.latency_ms)),
        ]
        .into_iter()
        .map(|(k, v)| vec![k.to_owned(), v])
        .collect();
        print!("{}", output::render_table(&["field", "value"], &rows));
    }
    match reply.map(|r| (r.outcome, r.error)) {
        Some((ClaimOutcome::Claimed, _)) => Ok(()),
        Some((ClaimOutcome::NoEligiblePrebuild, _)) => bail!("{}", miss_message(&args, &result)),
        Some((ClaimOutcome::Rejected, error)) => {
            let error = error
                .map(|e| format!("{}: {}", result.error_code.unwrap_or_default(), e.message))
                .unwrap_or_else(|| "no reason given".to_owned());
            bail!("the claim was rejected ({error})")
        }
        None => bail!(
            "no reply within {:?}: are the workers running (they consume {}.claims)? The request \
             may still be processed; retry with --request-id {} to get its outcome",
            args.timeout,
            connection.amqp_prefix,
            event.id
        ),
    }
}

/// Why nothing was claimed, and what to do about it.
fn miss_message(args: &Args, result: &ClaimResult) -> String {
    match result.reason {
        Some(MissReason::NoMatchingPreset) => {
            let template = args.template.as_deref().unwrap_or("?");
            let given = if args.params.is_empty() {
                "no --param values".to_owned()
            } else {
                args.params
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let presets = if result.presets.is_empty() {
                "it has none (push a version with presets, or activate one)".to_owned()
            } else {
                result
                    .presets
                    .iter()
                    .map(|p| format!("\n  {}", preset_line(p)))
                    .collect::<String>()
            };
            format!(
                "no eligible prebuild (no_matching_preset): no preset of template '{template}' \
                 matches {given} (parameters left out take their defaults); the presets of its \
                 active version are:{presets}\npass --param values equal to one of them, or \
                 --preset ID"
            )
        }
        Some(MissReason::PoolEmpty) => format!(
            "no eligible prebuild (pool_empty): preset {} has no ready, unexpired prebuild right \
             now (create a regular workspace instead, or check the pool with `prebuildsctl status`)",
            opt(result.preset_id)
        ),
        // A worker that predates miss reasons.
        None => "no eligible prebuild: the pool has no ready, unexpired prebuild of this preset right \
              now (create a regular workspace instead, or check the pool with `prebuildsctl status`)"
            .to_owned(),
    }
}

/// `small (0b6c…): cpus=2 region=eu`.
fn preset_line(p: &PresetParameters) -> String {
    let values = if p.parameters.is_empty() {
        "(no parameters: matches any request)".to_owned()
    } else {
        p.parameters
            .iter()
            .map(|p| format!("{}={}", p.name, p.value))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!("{} ({}): {values}", p.name, p.preset_id)
}

fn opt(id: Option<Uuid>) -> String {
    id.map(|i| i.to_string()).unwrap_or_else(|| "-".to_owned())
}

/// Sends the request and waits for its reply; `None` when none came within `timeout`. Returns the
/// round-trip latency (publish to reply, or to giving up).
async fn call(
    connection: &Connection,
    event: &CloudEvent<ClaimRequest>,
    timeout: Duration,
) -> anyhow::Result<(Option<ClaimReply>, Duration)> {
    let topology = connection.topology();
    // Declaring the topology (idempotent) makes the request routable even before the first worker
    // started: it then waits in the claims queue instead of failing. With
    // PREBUILDS_DECLARE_TOPOLOGY=false only what the request needs is checked, so a missing
    // queue is named instead of reported as an unroutable request.
    let amqp = connect_amqp(connection, "prebuildsctl claim").await?;
    topology
        .prepare(&amqp, &[Entity::Exchange, Entity::Queue(QueueKind::Claims)])
        .await?;
    let _ = amqp.close(200, "done".into()).await;
    let client = RpcClient::connect(&connection.broker, "prebuildsctl claim", topology)
        .await
        .map_err(|e| amqp_unreachable(connection, e))?;
    let started = Instant::now();
    let outcome = client
        .call::<ClaimRequest, ClaimReply>(event, timeout)
        .await;
    let latency = started.elapsed();
    match outcome {
        Ok(reply) => Ok((Some(reply.data), latency)),
        Err(RpcError::Timeout(_)) => Ok((None, latency)),
        Err(RpcError::Unroutable) => bail!(
            "the claim request was unroutable: no queue is bound to '{}' with key claim.request \
             (is PREBUILDS_AMQP_PREFIX right?)",
            connection.amqp_prefix
        ),
        Err(e) => Err(anyhow!(e).context("claim request")),
    }
}
