//! The claim RPC (`<prefix>.claims`, `reply_to` + `correlation_id`): hands a ready prebuild to a
//! user in one transaction, and replies only after commit.
//!
//! 1. Idempotency: the request's CloudEvents `id` is the request id; a request seen before gets its
//!    first reply again (`claim_requests`), whatever happened since.
//! 2. Validation (one round trip): user exists, name valid and free, preset exists and is active
//!    (or is matched from the template's active-version presets by parameters).
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
    db::DbError,
    outbox,
};
use prebuilds_schemas::{
    BuildStage, ClaimError, ClaimErrorCode, ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent,
    Parameter, ProvisionerJob, RawEvent, ReconcileReason, Transition,
};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::metrics::WorkerMetrics;

#[derive(Debug, Clone)]
pub struct ClaimsContext {
    pub pool: Pool,
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
        match send_reply(ctx, message, &reply).await {
            Ok(()) => {}
            // The requester is gone (its reply queue no longer exists): nothing to retry.
            Err(PublishError::Unroutable { .. }) => {
                tracing::info!(request_id = %request.id, "claim requester went away before the reply");
            }
            Err(e) => return Err(HandlerError::Transient(e.into())),
        }
        ctx.metrics
            .claims
            .with_label_values(&[reply.outcome.as_str()])
            .inc();
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

/// Runs one claim request to its reply (idempotent by `request_id`).
pub async fn claim(
    ctx: &ClaimsContext,
    request_id: Uuid,
    request: &ClaimRequest,
) -> Result<(ClaimReply, PresetLabels), DbError> {
    let mut client = ctx.pool.get().await?;
    if let Some(first) = stored_reply(&client, request_id).await? {
        return Ok((first, PresetLabels::default()));
    }
    let tx = client.transaction().await?;
    // Concurrent deliveries of one request queue here; the later ones find the stored reply.
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&prebuilds_store::lock::lock_key(request_id)],
    )
    .await?;
    if let Some(first) = stored_reply(&tx, request_id).await? {
        tx.commit().await?;
        return Ok((first, PresetLabels::default()));
    }
    let now: DateTime<Utc> = tx.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    let (reply, labels, claimed_preset) = decide(&tx, ctx, request, now).await?;
    tx.execute(
        "INSERT INTO claim_requests (request_id, user_id, preset_id, outcome, workspace_id, reply)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &request_id,
            &request.user_id,
            &reply.preset_id,
            &reply.outcome.as_str(),
            &reply.workspace_id,
            &serde_json::to_value(&reply).expect("replies serialise"),
        ],
    )
    .await?;
    tx.commit().await?;
    if claimed_preset.is_some() {
        ctx.outbox_waker.notify_one();
    }
    Ok((reply, labels))
}

async fn stored_reply<C: deadpool_postgres::GenericClient>(
    client: &C,
    request_id: Uuid,
) -> Result<Option<ClaimReply>, DbError> {
    let row = client
        .query_opt(
            "SELECT reply FROM claim_requests WHERE request_id = $1",
            &[&request_id],
        )
        .await?;
    Ok(row.and_then(|r| serde_json::from_value(r.get(0)).ok()))
}

/// Validates and, when possible, claims. Returns the reply, metric labels and the claimed preset.
async fn decide(
    tx: &Transaction<'_>,
    ctx: &ClaimsContext,
    request: &ClaimRequest,
    now: DateTime<Utc>,
) -> Result<(ClaimReply, PresetLabels, Option<Uuid>), DbError> {
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
    let row = tx
        .query_one(
            include_str!("sql/claim_validate.sql"),
            &[&request.user_id, &preset_id, &request.workspace_name],
        )
        .await?;
    if !row.get::<_, Option<bool>>("user_exists").unwrap_or(false) {
        let msg = format!("no user with id {}", request.user_id);
        return Ok((
            rejected(ClaimErrorCode::UnknownUser, msg, Some(preset_id)),
            none,
            None,
        ));
    }
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
    let active_version: Uuid = row.get("active_version_id");

    // A savepoint lets the transaction survive a lost race on the (owner, name) unique index and
    // still record the rejection.
    tx.batch_execute("SAVEPOINT claim").await?;
    let claimed = match tx
        .query_opt(
            include_str!("sql/claim.sql"),
            &[&preset_id, &request.user_id, &request.workspace_name, &now],
        )
        .await
    {
        Ok(row) => row,
        // The unique (owner, name) index caught a concurrent claim of the same name.
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT claim").await?;
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
        Err(e) => return Err(e.into()),
    };
    let Some(claimed) = claimed else {
        return Ok((no_eligible(Some(preset_id)), labels, None));
    };
    let workspace_id: Uuid = claimed.get("id");
    let template_id: Uuid = claimed.get("template_id");
    let previous_build: i32 = claimed.get("build_number");

    let owner_name: String = tx
        .query_one(
            "SELECT username FROM users WHERE id = $1",
            &[&request.user_id],
        )
        .await?
        .get(0);
    let parameters = claim_parameters(tx, preset_id, &request.parameters).await?;
    let job = ProvisionerJob {
        job_id: Uuid::new_v4(),
        build_id: Uuid::new_v4(),
        workspace_id,
        workspace_name: request.workspace_name.clone(),
        owner_id: request.user_id,
        owner_name,
        template_id,
        template_version_id: active_version,
        preset_id: Some(preset_id),
        transition: Transition::Start,
        build_number: previous_build + 1,
        stage: BuildStage::Claim,
        orphan: false,
        parameters,
    };
    let event = CloudEvent::new(ctx.source.clone(), now, job);
    let job = &event.data;
    let build_parameters = serde_json::to_value(&job.parameters).expect("parameters serialise");
    tx.execute(
        include_str!("sql/insert_job.sql"),
        &[
            &job.job_id,
            &request.user_id,
            &event.data_json(),
            &now,
            &"pending",
        ],
    )
    .await?;
    tx.execute(
        include_str!("sql/insert_build.sql"),
        &[
            &job.build_id,
            &workspace_id,
            &active_version,
            &job.build_number,
            &"start",
            &request.user_id,
            &job.job_id,
            &Some(preset_id),
            &"claim",
            &false,
            &build_parameters,
            &now,
        ],
    )
    .await?;
    outbox::enqueue(tx, &event).await?;
    // Replenish now, not at the next tick.
    prebuilds_store::attention::request_reconciles(
        tx,
        &[preset_id],
        ReconcileReason::Claim,
        &ctx.source,
    )
    .await?;
    let reply = ClaimReply {
        outcome: ClaimOutcome::Claimed,
        workspace_id: Some(workspace_id),
        build_id: Some(job.build_id),
        job_id: Some(job.job_id),
        preset_id: Some(preset_id),
        error: None,
    };
    Ok((reply, labels, Some(preset_id)))
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

/// The claim build's parameters: the preset's values, then the user's extra ones (the preset's
/// values win for parameters the preset fixes).
async fn claim_parameters(
    tx: &Transaction<'_>,
    preset_id: Uuid,
    extra: &[Parameter],
) -> Result<Vec<Parameter>, DbError> {
    let rows = tx
        .query(
            "SELECT name, value FROM template_version_preset_parameters
             WHERE template_version_preset_id = $1 ORDER BY name",
            &[&preset_id],
        )
        .await?;
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    for p in extra {
        values.insert(p.name.clone(), p.value.clone());
    }
    for r in rows {
        values.insert(r.get(0), r.get(1));
    }
    Ok(values
        .into_iter()
        .map(|(name, value)| Parameter { name, value })
        .collect())
}
