//! `prebuildsctl status [--template NAME] [--watch] [--json]`: one row per preset, computed the
//! way the reconciler computes it — the shared snapshot query (`prebuilds_store::load_snapshots`)
//! and the pure core's `plan` at now, with the same tunables as the workers — plus the hard-limit
//! recovery state (`hard_limited_at`, `next_probe_at`) and the claim history (hits and misses in the
//! last 5/10/30/60/120 minutes, `prebuilds_store::claims`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use prebuilds_core::{
    desired_instances, expression_inputs, forecast, plan, DesiredSource, PrebuildStatus,
    ReconcileConfig, Var,
};
use prebuilds_runtime::config::{parse_duration, Connection, RuleArgs};
use prebuilds_store::claims::ClaimHistory;
use serde::Serialize;
use uuid::Uuid;

use crate::{
    context::{connect_db, resolve_template, UsageError},
    output,
};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Presets are listed when their template is not deleted and they have \
    prebuilds configured on the active version, or still have live prebuilds.\n\n\
    Examples:\n  \
    prebuildsctl status\n  \
    prebuildsctl status --template python-dev --watch\n  \
    prebuildsctl status --explain large\n  \
    prebuildsctl status --json | jq '.[] | select(.eligible < .desired)'"
)]
pub struct Args {
    /// Only this template.
    #[arg(long)]
    template: Option<String>,
    /// Organization of the template (or only this organization).
    #[arg(long)]
    organization: Option<String>,
    /// Refresh in place until interrupted (Ctrl-C).
    #[arg(long)]
    watch: bool,
    /// Refresh period of --watch.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    interval: Duration,
    /// Print a JSON array (with --watch: one array per line and refresh).
    #[arg(long)]
    json: bool,
    /// Explain one preset's desired count (name or id): the scheduled target, the autoscaling
    /// bounds and expression, every expression variable and the built-in forecast's inputs.
    #[arg(long, value_name = "PRESET", conflicts_with = "watch")]
    explain: Option<String>,
    /// The reconciler's rules that change what status reports (the workers' own variables).
    #[command(flatten)]
    rules: RuleArgs,
}

/// One preset's row (the `--json` object, and `GET /api/v1/presets`).
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[schemars(rename = "PresetStatus")]
pub struct Row {
    organization: String,
    template: String,
    template_version: String,
    active: bool,
    preset: String,
    preset_id: Uuid,
    desired: u32,
    /// `base`, `schedule`, `autoscaling`, `expression`, `expression_fallback`, `not_configured`,
    /// `inactive` or `invalid_schedules`.
    desired_source: &'static str,
    /// Index of the schedule that set `desired`, when one did.
    schedule_index: Option<usize>,
    running: u32,
    eligible: u32,
    starting: u32,
    stopping: u32,
    deleting: u32,
    expired: u32,
    extraneous: u32,
    #[schemars(with = "PrebuildStatusSchema")]
    status: PrebuildStatus,
    backoff_until: Option<DateTime<Utc>>,
    /// When the preset became hard-limited (null when it is not).
    hard_limited_at: Option<DateTime<Utc>>,
    /// When a hard-limited preset gets its next probe create (null when not hard-limited, or while
    /// a probe is building).
    next_probe_at: Option<DateTime<Utc>>,
    paused: bool,
    /// `global`, `template` or `preset` (the widest scope that pauses it), null when running.
    paused_by: Option<&'static str>,
    /// Why the schedules were ignored, when they were.
    schedule_error: Option<String>,
    /// `claims_5m`, `misses_5m`, … `claims_120m`, `misses_120m`.
    #[serde(flatten)]
    claim_history: ClaimHistory,
}

pub async fn run(connection: &Connection, args: Args) -> anyhow::Result<()> {
    args.rules.validate().map_err(UsageError)?;
    let config = args.rules.apply(ReconcileConfig::default());
    if args.watch && args.interval.is_zero() {
        return Err(UsageError("--interval must be greater than 0".into()).into());
    }
    let pool = connect_db(connection).await?;
    if let Some(preset) = &args.explain {
        return explain(&pool, &args, &config, Utc::now(), preset).await;
    }
    if !args.watch {
        let rows = collect(&pool, &args, &config, Utc::now()).await?;
        return print(&rows, args.json, false).await;
    }
    // One Ctrl-C listener for the whole watch, polled throughout: a listener made anew for each
    // sleep missed a Ctrl-C pressed while a refresh was running (the handler, once installed,
    // swallows the signal), and the watch then went on.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let refresh = async {
            let now = Utc::now();
            let rows = collect(&pool, &args, &config, now).await;
            if !args.json {
                // Clear the screen and home the cursor: refresh in place.
                print!("\x1b[2J\x1b[H");
                println!(
                    "prebuilds status at {} (every {}; Ctrl-C to stop)\n",
                    output::time(now),
                    humanize(args.interval)
                );
            }
            match rows {
                Ok(rows) => print(&rows, args.json, true).await?,
                // Keep watching through a database restart; say what is wrong.
                Err(e) => eprintln!("error: {e:#}"),
            }
            tokio::time::sleep(args.interval).await;
            anyhow::Ok(())
        };
        tokio::select! {
            refreshed = refresh => refreshed?,
            _ = &mut interrupted => return Ok(()),
        }
    }
}

fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

async fn print(rows: &[Row], json: bool, compact: bool) -> anyhow::Result<()> {
    if json {
        if compact {
            println!("{}", serde_json::to_string(rows)?);
        } else {
            output::print_json(rows)?;
        }
        return Ok(());
    }
    let headers = [
        "organization",
        "template",
        "version",
        "active",
        "preset",
        "preset_id",
        "desired",
        "running",
        "eligible",
        "starting",
        "stopping",
        "deleting",
        "expired",
        "status",
        "hits/misses 60m",
        "paused",
    ];
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let desired = match r.desired_source {
                "schedule" => format!("{} (schedule)", r.desired),
                "invalid_schedules" => format!("{} (schedules invalid)", r.desired),
                "autoscaling" | "expression" => format!("{} ({})", r.desired, r.desired_source),
                "expression_fallback" => format!("{} (expression failed)", r.desired),
                _ => r.desired.to_string(),
            };
            let status = match (r.backoff_until, r.next_probe_at) {
                (Some(until), _) => format!("backoff until {}", output::time(until)),
                (None, Some(probe)) if r.status == PrebuildStatus::HardLimited => {
                    format!("hard_limited (probe at {})", output::time(probe))
                }
                _ => r.status.to_string(),
            };
            let history = format!(
                "{}/{}",
                r.claim_history.claims_60m, r.claim_history.misses_60m
            );
            let paused = match r.paused_by {
                Some(scope) => format!("yes ({scope})"),
                None => "no".to_owned(),
            };
            vec![
                r.organization.clone(),
                r.template.clone(),
                r.template_version.clone(),
                output::yes_no(r.active),
                r.preset.clone(),
                r.preset_id.to_string(),
                desired,
                r.running.to_string(),
                r.eligible.to_string(),
                r.starting.to_string(),
                r.stopping.to_string(),
                r.deleting.to_string(),
                r.expired.to_string(),
                status,
                history,
                paused,
            ]
        })
        .collect();
    output::print_table(
        &headers,
        &table,
        "no presets with prebuilds (push a template with a `prebuilds` block: \
         `prebuildsctl template push FILE`)",
    );
    for r in rows {
        if let Some(error) = &r.schedule_error {
            eprintln!(
                "warning: preset {} ({}): schedules ignored: {error}",
                r.preset, r.preset_id
            );
        }
    }
    Ok(())
}

async fn collect(
    pool: &Pool,
    args: &Args,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Row>> {
    let client = pool.get().await?;
    rows(
        &client,
        args.template.as_deref(),
        args.organization.as_deref(),
        config,
        args.rules.demand_time_unit,
        now,
    )
    .await
}

/// The status rows at `now`, optionally of one template (by name, with its organization when the
/// name is not unique) or one organization; `unit` is the demand windows' minute
/// (`PREBUILDS_DEMAND_TIME_UNIT`). Errors: the template does not exist
/// ([`crate::context::NotFound`]) or is ambiguous ([`crate::context::UsageError`]).
pub async fn rows<C: GenericClient>(
    client: &C,
    template: Option<&str>,
    organization: Option<&str>,
    config: &ReconcileConfig,
    unit: Duration,
    now: DateTime<Utc>,
) -> anyhow::Result<Vec<Row>> {
    if let Some(template) = template {
        // A clear error for a template that does not exist (or is ambiguous).
        resolve_template(client, template, organization, false).await?;
    }
    let ids = listed_presets(client, template, organization).await?;
    let views = load_views(client, &ids, now, unit).await?;
    let mut history = prebuilds_store::claims::claim_history(client, &ids, now, unit).await?;
    let mut rows: Vec<Row> = views
        .into_iter()
        .map(|view| {
            let p = plan(&view.snapshot, now, config);
            let source = &p.desired.source;
            let desired_source = source.as_str();
            let schedule_index = match source {
                DesiredSource::Schedule { index } => Some(*index),
                _ => None,
            };
            let schedule_error = match source {
                DesiredSource::InvalidSchedules(e) => Some(e.to_string()),
                _ => None,
            };
            let paused_by = if view.global_paused {
                Some("global")
            } else if view.template_paused {
                Some("template")
            } else if view.preset_paused {
                Some("preset")
            } else {
                None
            };
            let status = p
                .status_change
                .unwrap_or(view.snapshot.preset.prebuild_status);
            let limited = status == PrebuildStatus::HardLimited;
            let record = match p.hard_limit.record_change() {
                Some(prebuilds_core::HardLimitChange::Set(r)) => Some(r),
                Some(prebuilds_core::HardLimitChange::Clear) => None,
                None => view.snapshot.hard_limit,
            };
            Row {
                claim_history: history.remove(&view.snapshot.preset.id).unwrap_or_default(),
                hard_limited_at: record.filter(|_| limited).map(|r| r.since),
                next_probe_at: p.hard_limit.next_probe_at().filter(|_| limited),
                organization: view.organization_name,
                template: view.template_name,
                template_version: view.template_version_name,
                active: view.snapshot.preset.is_active(),
                preset: view.preset_name,
                preset_id: view.snapshot.preset.id,
                desired: p.state.desired,
                desired_source,
                schedule_index,
                running: p.state.actual,
                eligible: p.state.eligible,
                starting: p.state.starting,
                stopping: p.state.stopping,
                deleting: p.state.deleting,
                expired: p.state.expired,
                extraneous: p.state.extraneous,
                // What the reconciler acts on: the stored status, updated by this plan's change
                // (which the next reconcile stores).
                status,
                backoff_until: p.backoff_until,
                paused: paused_by.is_some(),
                paused_by,
                schedule_error,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (
            &a.organization,
            &a.template,
            !a.active,
            &a.template_version,
            &a.preset,
        )
            .cmp(&(
                &b.organization,
                &b.template,
                !b.active,
                &b.template_version,
                &b.preset,
            ))
    });
    Ok(rows)
}

/// The presets `status` lists: those needing a reconcile (the view `presets_needing_attention`),
/// and also the configured presets of a deprecated template's active version (shown inactive, so
/// a deprecation is visible even once their prebuilds are gone); live templates only, narrowed by
/// `--template` / `--organization`.
async fn listed_presets<C: GenericClient>(
    client: &C,
    template: Option<&str>,
    organization: Option<&str>,
) -> anyhow::Result<Vec<Uuid>> {
    Ok(client
        .query(
            "SELECT a.preset_id
             FROM preset_activity a
             JOIN template_version_presets p ON p.id = a.preset_id
             JOIN templates t ON t.id = a.template_id
             JOIN organizations o ON o.id = t.organization_id
             WHERE NOT a.template_deleted                          -- live templates
               AND ($1::text IS NULL OR t.name = $1)               -- --template
               AND ($2::text IS NULL OR o.name = $2)               -- --organization
               AND ((p.desired_instances IS NOT NULL AND a.version_is_active)
                    OR a.preset_id IN (SELECT preset_id FROM presets_needing_attention))",
            &[&template, &organization],
        )
        .await?
        .into_iter()
        .map(|r| r.get(0))
        .collect())
}

/// Snapshots with the demand inputs of autoscaled presets, as the workers read them.
async fn load_views<C: GenericClient>(
    client: &C,
    ids: &[Uuid],
    now: DateTime<Utc>,
    unit: Duration,
) -> anyhow::Result<Vec<prebuilds_store::PresetView>> {
    let mut views = prebuilds_store::load_snapshots(client, ids).await?;
    prebuilds_store::demand::attach_demand(client, views.iter_mut(), now, unit).await?;
    Ok(views)
}

/// `status --explain PRESET`: how the preset's desired count came about.
async fn explain(
    pool: &Pool,
    args: &Args,
    config: &ReconcileConfig,
    now: DateTime<Utc>,
    wanted: &str,
) -> anyhow::Result<()> {
    let client = pool.get().await?;
    let ids = listed_presets(
        &client,
        args.template.as_deref(),
        args.organization.as_deref(),
    )
    .await?;
    let views = load_views(&client, &ids, now, args.rules.demand_time_unit).await?;
    let matching: Vec<_> = views
        .into_iter()
        .filter(|v| v.preset_name == wanted || v.preset_id().to_string() == wanted)
        .collect();
    let view = match matching.len() {
        1 => matching.into_iter().next().expect("one element"),
        0 => {
            return Err(UsageError(format!(
                "no listed preset is named or has the id '{wanted}'; see `prebuildsctl status`"
            ))
            .into())
        }
        n => {
            return Err(UsageError(format!(
                "{n} presets are named '{wanted}'; pass --template (and --organization) or the \
                 preset id"
            ))
            .into())
        }
    };
    let snapshot = &view.snapshot;
    let p = plan(snapshot, now, config);
    let scheduled = desired_instances(&snapshot.preset, &snapshot.schedules, now);
    let inputs = expression_inputs(snapshot, now, scheduled.count);
    let f = forecast(&snapshot.demand);
    let fallback_error = match &p.desired.source {
        DesiredSource::ExpressionFallback(e) => Some(e.to_string()),
        _ => None,
    };
    let mut variables = serde_json::Map::new();
    for var in Var::all() {
        variables.insert(var.name(), inputs.get(var).into());
    }
    let auto = snapshot.autoscaling.as_ref();
    let explanation = serde_json::json!({
        "preset": view.preset_name,
        "preset_id": view.preset_id(),
        "template": view.template_name,
        "desired": p.state.desired,
        "desired_source": p.desired.source.as_str(),
        "scheduled_target": scheduled.count,
        "scheduled_source": scheduled.source.as_str(),
        "autoscaling_min": auto.map(|a| a.min),
        "autoscaling_max": auto.map(|a| a.max),
        "expression": auto.and_then(|a| a.expression.clone()),
        "expression_error": fallback_error,
        "variables": variables,
        "forecast_rate_per_min": f.rate_per_sec * 60.0,
        "forecast_rate_window_min": f.rate_window,
        "forecast_lead_time_secs": f.lead_time.as_seconds_f64(),
        "forecast_lead_time_measured": snapshot.demand.create_p90_ms.is_some(),
        "forecast_expected_claims": f.expected,
        "forecast_headroom": f.headroom,
        "forecast_target": f.target,
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&explanation)?);
        return Ok(());
    }
    let Some(obj) = explanation.as_object() else {
        return Ok(());
    };
    for (key, value) in obj {
        if key == "variables" {
            continue;
        }
        println!("{key:<28} {}", plain(value));
    }
    println!("variables:");
    for (name, value) in &variables {
        println!("  {name:<26} {}", plain(value));
    }
    Ok(())
}

fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".to_owned(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// The JSON Schema of [`PrebuildStatus`] (the core has no schema dependency).
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
#[schemars(rename = "PrebuildStatus")]
#[allow(dead_code)]
enum PrebuildStatusSchema {
    Healthy,
    HardLimited,
    ValidationFailed,
}
