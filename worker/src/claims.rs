//! The claim RPC (`<prefix>.claims`, `reply_to` + `correlation_id`): hands a ready prebuild to a
//! user in one transaction, and replies only after commit.
//!
//! 1. Idempotency: the request's CloudEvents `id` is the request id; a request seen before gets its
//!    first reply again (`claim_requests`), whatever happened since.
//! 2. Validation: user exists, name valid and free, preset exists and is active (or is matched
//!    from the template's active-version presets by parameters). When the request names its preset,
//!    these reads are pipelined with step 1's: one round trip for both.
//! 3. The guarded claim statement (`sql/claim.sql`, `FOR UPDATE SKIP LOCKED`): concurrent claims
//!    never pick the same prebuild and never wait on each other; a prebuild being deleted is never
//!    claimed, and a claimed one is never deleted (see `sql/mark_deleting.sql`).
//! 4. Build N+1 `start` (initiator the user, stage `claim`, preset parameters plus the user's),
//!    its provisioner job and an immediate reconcile of the preset (reason `claim`) go to the
//!    outbox in the same transaction — the replacement prebuild is queued right after commit.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use prebuilds_runtime::{
    amqp::{
        consumer::Incoming, publisher::Outgoing, Handler, HandlerError, PublishError, Publisher,
    },
    db::{cached, DbError},
    outbox,
};
use prebuilds_schemas::{
    BuildStage, ClaimError, ClaimErrorCode, ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent,
    Parameter, ProvisionerJob, RawEvent, ReconcilePreset, ReconcileReason, Transition,
};
use tokio::sync::Notify;
use tokio_postgres::{types::ToSql, Row};
use uuid::Uuid;

use crate::metrics::WorkerMetrics;

#[derive(Debug, Clone)]
pub struct ClaimsContext {
    pub pool: Pool,
    /// Sends replies; unconfirmed (see [`Publisher::unconfirmed`]).
    pub publisher: Arc<Publisher>,
    pub metrics: WorkerMetrics,
    pub outbox_waker: Arc<Notify>,
    pub source: String,
}

#[derive(Debug)]
pub struct ClaimsHandler {
    pub context: ClaimsContext,
}

/// Labels of the claim-duration histogram.
#[derive(Debug, Clone, Default)]
pub struct PresetLabels {
    organization: String,
    template: String,
    preset: String,
}

impl Handler for ClaimsHandler {
    async fn handle(&self, message: &Incoming) -> Result<(), HandlerError> {
        let received = Instant::now();
        let ctx = &self.context;
        let request =
            match RawEvent::parse(&message.body).and_then(|raw| raw.decode::<ClaimRequest>()) {
                Ok(r) => r,
                Err(e) => {
                    // Tell a waiting client at once, then dead-letter the body with the reason.
                    let reply = rejected(ClaimErrorCode::InvalidRequest, e.to_string(), None);
                    let _ = send_reply(ctx, message, &reply).await;
                    return Err(HandlerError::permanent("schema", e.to_string()));
                }
            };
        let (reply, labels) = claim(ctx, request.id, &request.data)
            .await
            .map_err(|e| HandlerError::Transient(e.into()))?;
        let committed = received.elapsed();
        match send_reply(ctx, message, &reply).await {
            Ok(()) => {}
            // The requester is gone (its reply queue no longer exists): nothing to retry.
            Err(PublishError::Unroutable { .. }) => {
                tracing::info!(request_id = %request.id, "claim requester went away before the reply");
            }
            Err(e) => return Err(HandlerError::Transient(e.into())),
        }
        tracing::debug!(
            request_id = %request.id,
            outcome = reply.outcome.as_str(),
            // From the requester stamping the request to this worker starting on it (clock skew
            // between hosts shows up here too).
            waited_us = (Utc::now() - request.time).num_microseconds().unwrap_or(0) - received.elapsed().as_micros() as i64,
            committed_us = committed.as_micros() as u64,
            replied_us = received.elapsed().as_micros() as u64,
            "claim handled"
        );
        ctx.metrics
            .claims
            .with_label_values(&[reply.outcome.as_str()])
            .inc();
        // Labels are only known for a known preset (empty for a replayed reply, which was counted
        // the first time); a miss counts only for an active preset (the claim statement ran).
        let hit_or_miss = match reply.outcome {
            ClaimOutcome::Claimed => Some("hit"),
            ClaimOutcome::NoEligiblePrebuild => Some("miss"),
            ClaimOutcome::Rejected => None,
        };
        if let (Some(outcome), false) = (hit_or_miss, labels.preset.is_empty()) {
            ctx.metrics
                .claims_by_preset
                .with_label_values(&[
                    &labels.template,
                    &labels.preset,
                    &labels.organization,
                    outcome,
                ])
                .inc();
        }
        ctx.metrics
            .claim_duration
            .with_label_values(&[&labels.organization, &labels.template, &labels.preset])
            .observe(received.elapsed().as_secs_f64());
        Ok(())
    }
}

async fn send_reply(
    ctx: &ClaimsContext,
    request: &Incoming,
    reply: &ClaimReply,
) -> Result<(), PublishError> {
    let Some(reply_to) = request.reply_to.as_deref() else {
        return Ok(());
    };
    let event = CloudEvent::new(ctx.source.clone(), Utc::now(), reply.clone());
    let body = serde_json::to_vec(&event).expect("replies serialise");
    let mut message = Outgoing::new("", reply_to, &body);
    // A reply is transient and best-effort: no persistence, and no `mandatory` (RabbitMQ before
    // 3.12 returns mandatory publishes to direct reply-to as unroutable even when delivered).
    message.mandatory = false;
    message.persistent = false;
    message.correlation_id = request
        .correlation_id
        .clone()
        .or_else(|| request.message_id.clone());
    message.message_id = Some(event.id.to_string());
    message.event_type = Some(event.event_type.clone());
    ctx.publisher.publish(message).await
}

fn rejected(
    code: ClaimErrorCode,
    message: impl Into<String>,
    preset_id: Option<Uuid>,
) -> ClaimReply {
    ClaimReply {
        outcome: ClaimOutcome::Rejected,
        workspace_id: None,
        build_id: None,
        job_id: None,
        preset_id,
        error: Some(ClaimError {
            code,
            message: message.into(),
        }),
    }
}

fn no_eligible(preset_id: Option<Uuid>) -> ClaimReply {
    ClaimReply {
        outcome: ClaimOutcome::NoEligiblePrebuild,
        workspace_id: None,
        build_id: None,
        job_id: None,
        preset_id,
        error: None,
    }
}

/// How many times a claim transaction is retried after losing a uniqueness race (a duplicate
/// delivery that committed first, or a concurrent claim of the same workspace name): the retry
/// reads the winner's result, so two attempts always suffice; the third is a safety margin.
const UNIQUE_RACE_ATTEMPTS: usize = 3;

/// Runs one claim request to its reply (idempotent by `request_id`).
pub async fn claim(
    ctx: &ClaimsContext,
    request_id: Uuid,
    request: &ClaimRequest,
) -> Result<(ClaimReply, PresetLabels), DbError> {
    let mut client = ctx.pool.get().await?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        match claim_once(&mut client, ctx, request_id, request).await {
            Err(DbError::Postgres(e))
                if attempt < UNIQUE_RACE_ATTEMPTS
                    && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                tracing::debug!(%request_id, error = %e, "claim lost a uniqueness race; retrying");
            }
            other => return other,
        }
    }
}

async fn claim_once(
    client: &mut deadpool_postgres::Client,
    ctx: &ClaimsContext,
    request_id: Uuid,
    request: &ClaimRequest,
) -> Result<(ClaimReply, PresetLabels), DbError> {
    let tx = client.transaction().await?;
    let (begin, validate) = futures::try_join!(
        tx.prepare_cached(include_str!("sql/claim_begin.sql")),
        tx.prepare_cached(include_str!("sql/claim_validate.sql")),
    )?;
    let lock_key = prebuilds_store::lock::lock_key(request_id);
    let begin_params: [&(dyn ToSql + Sync); 2] = [&lock_key, &request_id];
    let begin = tx.query_one(&begin, &begin_params);
    // The usual request names its preset: its checks go out with the begin statement (one round
    // trip for both). They run after the lock is granted, so they see what an earlier delivery of
    // the same request committed; they are simply unused when that delivery already answered.
    let name_ok = prebuilds_core::validate_workspace_name(&request.workspace_name).is_ok();
    let (row, checks) = match request.preset_id {
        Some(preset_id) if name_ok => {
            let check_params: [&(dyn ToSql + Sync); 3] =
                [&request.user_id, &preset_id, &request.workspace_name];
            let checks = tx.query_one(&validate, &check_params);
            let (row, checks) = futures::try_join!(begin, checks)?;
            (row, Some(checks))
        }
        _ => (begin.await?, None),
    };
    if let Some(first) = row
        .get::<_, Option<serde_json::Value>>("reply")
        .and_then(|v| serde_json::from_value(v).ok())
    {
        tx.commit().await?;
        return Ok((first, PresetLabels::default()));
    }
    let now: DateTime<Utc> = row.get("now");
    let (reply, labels, writes) = decide(&tx, ctx, request, checks, now).await?;
    let record = tx
        .prepare_cached(
            "INSERT INTO claim_requests (request_id, user_id, preset_id, outcome, workspace_id, reply)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .await?;
    let reply_json = serde_json::to_value(&reply).expect("replies serialise");
    let outcome = reply.outcome.as_str();
    let record_params: [&(dyn ToSql + Sync); 6] = [
        &request_id,
        &request.user_id,
        &reply.preset_id,
        &outcome,
        &reply.workspace_id,
        &reply_json,
    ];
    let record = tx.execute(&record, &record_params);
    let claimed = writes.is_some();
    match writes {
        // The claim's writes and the request record go out pipelined: one round trip of latency.
        Some(writes) => {
            futures::try_join!(write_claim(&tx, &writes), record)?;
        }
        None => {
            record.await?;
        }
    }
    tx.commit().await?;
    if claimed {
        ctx.outbox_waker.notify_one();
    }
    Ok((reply, labels))
}

/// Everything a successful claim writes after the claim statement itself.
struct ClaimWrites {
    job: CloudEvent<ProvisionerJob>,
    reconcile: CloudEvent<ReconcilePreset>,
    initiator: Uuid,
    now: DateTime<Utc>,
}

async fn write_claim(tx: &Transaction<'_>, w: &ClaimWrites) -> Result<(), tokio_postgres::Error> {
    let job = &w.job.data;
    let (insert_job, insert_build, enqueue) = futures::try_join!(
        tx.prepare_cached(include_str!("sql/insert_job.sql")),
        tx.prepare_cached(include_str!("sql/insert_build.sql")),
        tx.prepare_cached(outbox::ENQUEUE_SQL),
    )?;
    let input = w.job.data_json();
    let parameters = serde_json::to_value(&job.parameters).expect("parameters serialise");
    let job_body = w.job.to_json();
    let reconcile_body = w.reconcile.to_json();
    let job_key = w.job.routing_key();
    let reconcile_key = w.reconcile.routing_key();
    let (pending, start, claim, not_orphan) = ("pending", "start", "claim", false);
    let job_params: [&(dyn ToSql + Sync); 5] =
        [&job.job_id, &w.initiator, &input, &w.now, &pending];
    let build_params: [&(dyn ToSql + Sync); 12] = [
        &job.build_id,
        &job.workspace_id,
        &job.template_version_id,
        &job.build_number,
        &start,
        &w.initiator,
        &job.job_id,
        &job.preset_id,
        &claim,
        &not_orphan,
        &parameters,
        &w.now,
    ];
    let job_message: [&(dyn ToSql + Sync); 3] = [&w.job.id, &job_key, &job_body];
    let reconcile_message: [&(dyn ToSql + Sync); 3] =
        [&w.reconcile.id, &reconcile_key, &reconcile_body];
    futures::try_join!(
        tx.execute(&insert_job, &job_params),
        tx.execute(&insert_build, &build_params),
        tx.execute(&enqueue, &job_message),
        // Replenish now, not at the next tick.
        tx.execute(&enqueue, &reconcile_message),
    )?;
    Ok(())
}

/// Validates and, when possible, claims. Returns the reply, metric labels and, for a claim, the
/// writes that complete it.
async fn decide(
    tx: &Transaction<'_>,
    ctx: &ClaimsContext,
    request: &ClaimRequest,
    checks: Option<Row>,
    now: DateTime<Utc>,
) -> Result<(ClaimReply, PresetLabels, Option<ClaimWrites>), DbError> {
    let none = PresetLabels::default();
    if let Err(e) = prebuilds_core::validate_workspace_name(&request.workspace_name) {
        return Ok((
            rejected(
                ClaimErrorCode::InvalidName,
                e.to_string(),
                request.preset_id,
            ),
            none,
            None,
        ));
    }
    let preset_id = match (request.preset_id, request.template_id) {
        (Some(id), _) => id,
        (None, Some(template_id)) => {
            match matching_preset(tx, template_id, &request.parameters).await? {
                Some(id) => id,
                None => return Ok((no_eligible(None), none, None)),
            }
        }
        (None, None) => {
            return Ok((
                rejected(
                    ClaimErrorCode::InvalidRequest,
                    "a claim needs preset_id, or template_id and parameters to match a preset",
                    None,
                ),
                none,
                None,
            ))
        }
    };
    let row = match checks {
        Some(row) => row,
        None => {
            cached::query_one(
                tx,
                include_str!("sql/claim_validate.sql"),
                &[
                    &request.user_id,
                    &preset_id,
                    &request.workspace_name.as_str(),
                ],
            )
            .await?
        }
    };
    let Some(owner_name) = row.get::<_, Option<String>>("username") else {
        let msg = format!("no user with id {}", request.user_id);
        return Ok((
            rejected(ClaimErrorCode::UnknownUser, msg, Some(preset_id)),
            none,
            None,
        ));
    };
    if row.get::<_, Option<Uuid>>("preset_id").is_none() {
        let msg = format!("no preset with id {preset_id}");
        return Ok((
            rejected(ClaimErrorCode::UnknownPreset, msg, Some(preset_id)),
            none,
            None,
        ));
    }
    let labels = PresetLabels {
        organization: row.get("organization_name"),
        template: row.get("template_name"),
        preset: row.get("preset_name"),
    };
    if !row.get::<_, Option<bool>>("preset_active").unwrap_or(false) {
        let msg = format!(
            "preset {} of template {} is not on the active version (or the template is deleted or deprecated)",
            labels.preset, labels.template
        );
        return Ok((
            rejected(ClaimErrorCode::PresetInactive, msg, Some(preset_id)),
            labels,
            None,
        ));
    }
    if row.get::<_, bool>("name_taken") {
        let msg = format!(
            "the user already has a workspace named {:?}",
            request.workspace_name
        );
        return Ok((
            rejected(ClaimErrorCode::NameConflict, msg, Some(preset_id)),
            labels,
            None,
        ));
    }
    let template_id: Uuid = row.get("template_id");
    let version_id: Uuid = row.get("version_id");
    let last_invalidated_at: Option<DateTime<Utc>> = row.get("last_invalidated_at");
    let ttl_secs: i32 = row.get("ttl_secs");
    let preset_parameters: Vec<Parameter> =
        serde_json::from_value(row.get("preset_parameters")).unwrap_or_default();

    let claim = tx.prepare_cached(include_str!("sql/claim.sql")).await?;
    // Start at a random id so concurrent claims of one pool spread over it instead of all
    // walking past the same freshly locked rows; then cover the ids below the start.
    let mut claimed = None;
    let start = Uuid::new_v4();
    for (from, below) in [(start, None), (Uuid::nil(), Some(start))] {
        claimed = tx
            .query_opt(
                &claim,
                &[
                    &preset_id,
                    &request.user_id,
                    &request.workspace_name,
                    &now,
                    &template_id,
                    &version_id,
                    &last_invalidated_at,
                    &ttl_secs,
                    &from,
                    &below,
                ],
            )
            .await?;
        if claimed.is_some() {
            break;
        }
    }
    let Some(claimed) = claimed else {
        return Ok((no_eligible(Some(preset_id)), labels, None));
    };
    let workspace_id: Uuid = claimed.get("id");
    let previous_build: i32 = claimed.get("build_number");
    let job = ProvisionerJob {
        job_id: Uuid::new_v4(),
        build_id: Uuid::new_v4(),
        workspace_id,
        workspace_name: request.workspace_name.clone(),
        owner_id: request.user_id,
        owner_name,
        template_id,
        template_version_id: version_id,
        preset_id: Some(preset_id),
        transition: Transition::Start,
        build_number: previous_build + 1,
        stage: BuildStage::Claim,
        orphan: false,
        parameters: claim_parameters(&preset_parameters, &request.parameters),
    };
    let reply = ClaimReply {
        outcome: ClaimOutcome::Claimed,
        workspace_id: Some(workspace_id),
        build_id: Some(job.build_id),
        job_id: Some(job.job_id),
        preset_id: Some(preset_id),
        error: None,
    };
    let writes = ClaimWrites {
        job: CloudEvent::new(ctx.source.clone(), now, job),
        reconcile: CloudEvent::new(
            ctx.source.clone(),
            now,
            ReconcilePreset {
                preset_id,
                reason: ReconcileReason::Claim,
                requested_at: now,
            },
        ),
        initiator: request.user_id,
        now,
    };
    Ok((reply, labels, Some(writes)))
}

/// The preset of the template's active version whose parameters all appear with equal values in
/// the request, preferring the one with most parameters.
async fn matching_preset(
    tx: &Transaction<'_>,
    template_id: Uuid,
    requested: &[Parameter],
) -> Result<Option<Uuid>, DbError> {
    let rows = tx
        .query(
            include_str!("sql/claim_match_candidates.sql"),
            &[&template_id],
        )
        .await?;
    let mut by_preset: BTreeMap<Uuid, Vec<(String, String)>> = BTreeMap::new();
    for r in rows {
        let params = by_preset.entry(r.get("id")).or_default();
        if let (Some(name), Some(value)) = (
            r.get::<_, Option<String>>("name"),
            r.get::<_, Option<String>>("value"),
        ) {
            params.push((name, value));
        }
    }
    let candidates: Vec<prebuilds_core::PresetCandidate> = by_preset
        .into_iter()
        .map(|(id, parameters)| prebuilds_core::PresetCandidate { id, parameters })
        .collect();
    let requested: Vec<(String, String)> = requested
        .iter()
        .map(|p| (p.name.clone(), p.value.clone()))
        .collect();
    Ok(prebuilds_core::match_preset(&candidates, &requested))
}

/// The claim build's parameters: the user's values, overridden by the preset's for the
/// parameters the preset fixes.
fn claim_parameters(preset: &[Parameter], extra: &[Parameter]) -> Vec<Parameter> {
    let mut values: BTreeMap<&str, &str> = BTreeMap::new();
    for p in extra.iter().chain(preset) {
        values.insert(&p.name, &p.value);
    }
    values
        .into_iter()
        .map(|(name, value)| Parameter {
            name: name.to_owned(),
            value: value.to_owned(),
        })
        .collect()
}
