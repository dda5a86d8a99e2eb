//! The claim RPC (`<prefix>.claims`, `reply_to` + `correlation_id`): hands a ready prebuild to a
//! user in one transaction, and replies only after commit.
//!
//! 1. Idempotency: the request's CloudEvents `id` is the request id; a request seen before gets its
//!    first reply again (`claim_requests`), whatever happened since. Deliveries of one request
//!    are serialized by an advisory lock on its id (`sql/claim_begin.sql`).
//! 2. The claim attempt (`sql/claim_attempt.sql`): one statement reads every check (user exists,
//!    preset exists and is active, name free, request not answered yet) and, only when they all
//!    pass, claims one eligible prebuild with `FOR UPDATE SKIP LOCKED`: concurrent claims never
//!    pick the same prebuild and never wait on each other; a prebuild being deleted is never
//!    claimed, and a claimed one is never deleted (see `sql/mark_deleting.sql`). A request that
//!    names a template and parameters instead of a preset is matched to a preset first, with the
//!    template parameters' defaults standing in for the parameters it leaves out
//!    (`prebuilds_core::match_preset`).
//! 3. Build N+1 `start` (initiator the user, stage `claim`, preset parameters plus the user's),
//!    its provisioner job and an immediate reconcile of the preset (reason `claim`) go to the
//!    outbox in the same transaction — the replacement prebuild is queued right after commit.
//!
//! Trust (docs/messages.md "Trust"): with `PREBUILDS_CLAIM_PUBLISHERS` set, a request whose validated AMQP
//! `user_id` is missing or not listed gets a `forbidden` reply and is dead-lettered
//! (`forbidden_publisher`). The claim attempt refuses (`forbidden`) the prebuilds system user (and
//! any system user), deleted users and users who are not members of the template's organization;
//! and a request id answered before for another user or another body gets `request_conflict`,
//! never the first requester's reply.
//!
//! A `no_eligible_prebuild` reply says why (`reason`): `no_matching_preset`, with the presets the
//! request was matched against, or `pool_empty` when the named or matched preset has no eligible
//! prebuild now.
//!
//! Latency is mostly round trips, so a request that names its preset usually takes two: `BEGIN`,
//! the lock and the attempt together; then the writes, the request record and `COMMIT` together
//! ([`PipelinedTransaction`]). A third comes in when nothing is found above the random start
//! and the ids below it are tried.

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::{Client, Pool};
use prebuilds_runtime::{
    amqp::{
        consumer::Incoming, publisher::Outgoing, trust, Handler, HandlerError, PublishError,
        Publisher, Publishers,
    },
    db::{
        cached,
        pipelined::{PipelinedTransaction, Step},
        DbError,
    },
    outbox,
};
use prebuilds_schemas::{
    BuildStage, ClaimError, ClaimErrorCode, ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent,
    MissReason, Parameter, PresetParameters, ProvisionerJob, RawEvent, ReconcilePreset,
    ReconcileReason, Transition,
};
use tokio::sync::Notify;
use tokio_postgres::{types::ToSql, Row, Statement};
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
    /// Who may send claim requests (`PREBUILDS_CLAIM_PUBLISHERS`; empty: anyone).
    pub publishers: Publishers,
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
        if let Err(reason) = self.publishers.check(message) {
            // Refused before the database is touched: the requester learns why, the body is
            // dead-lettered with the reason and counted (`prebuilds_dead_lettered_total`).
            tracing::warn!(request_id = %request.id, %reason, "claim request from a publisher not allowed");
            let reply = rejected(ClaimErrorCode::Forbidden, reason.clone(), None);
            let _ = send_reply(ctx, message, &reply).await;
            ctx.metrics
                .claims
                .with_label_values(&[reply.outcome.as_str()])
                .inc();
            return Err(HandlerError::permanent(trust::FORBIDDEN_PUBLISHER, reason));
        }
        // The claim's own span (its outbox rows continue this trace: the claim build and the
        // replacement reconcile).
        let span = tracing::info_span!(
            "claim",
            request_id = %request.id,
            preset_id = ?request.data.preset_id,
            outcome = tracing::field::Empty,
        );
        let (reply, labels) =
            tracing::Instrument::instrument(claim(ctx, request.id, &request.data), span.clone())
                .await
                .map_err(|e| HandlerError::Transient(e.into()))?;
        span.record("outcome", reply.outcome.as_str());
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
        reason: None,
        presets: vec![],
    }
}

/// The matched or named preset has no eligible prebuild now.
fn pool_empty(preset_id: Uuid) -> ClaimReply {
    ClaimReply {
        outcome: ClaimOutcome::NoEligiblePrebuild,
        workspace_id: None,
        build_id: None,
        job_id: None,
        preset_id: Some(preset_id),
        error: None,
        reason: Some(MissReason::PoolEmpty),
        presets: vec![],
    }
}

/// No preset of the template's active version matches; `presets` are the ones that were tried.
fn no_matching_preset(presets: Vec<PresetParameters>) -> ClaimReply {
    ClaimReply {
        outcome: ClaimOutcome::NoEligiblePrebuild,
        workspace_id: None,
        build_id: None,
        job_id: None,
        preset_id: None,
        error: None,
        reason: Some(MissReason::NoMatchingPreset),
        presets,
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
    let mut attempt = 0;
    loop {
        attempt += 1;
        let tx = PipelinedTransaction::new(ctx.pool.get().await?);
        match claim_once(&tx, ctx, request_id, request).await {
            Err(DbError::Postgres(e))
                if attempt < UNIQUE_RACE_ATTEMPTS
                    && e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
            {
                tracing::debug!(%request_id, error = %e, "claim lost a uniqueness race; retrying");
                // Keeps the connection when the rollback works; the drop discards it otherwise.
                let _ = tx.rollback().await;
            }
            other => return other,
        }
    }
}

/// One attempt, in two round trips when the request names its preset: `BEGIN` + the request
/// lock + the claim attempt (checks and claim in one statement); then the writes + the request
/// record + `COMMIT`.
async fn claim_once(
    tx: &PipelinedTransaction,
    ctx: &ClaimsContext,
    request_id: Uuid,
    request: &ClaimRequest,
) -> Result<(ClaimReply, PresetLabels), DbError> {
    let client = tx.client();
    // Prepared before BEGIN (a no-op once cached), so no prepare lands inside the transaction.
    let (begin, attempt, record, insert_job, insert_build, enqueue) = futures::try_join!(
        client.prepare_cached(include_str!("sql/claim_begin.sql")),
        client.prepare_cached(include_str!("sql/claim_attempt.sql")),
        client.prepare_cached(include_str!("sql/claim_record.sql")),
        client.prepare_cached(include_str!("sql/insert_job.sql")),
        client.prepare_cached(include_str!("sql/insert_build.sql")),
        client.prepare_cached(outbox::ENQUEUE_SQL),
    )?;
    let write_statements = WriteStatements {
        insert_job,
        insert_build,
        enqueue,
    };
    let lock_key = prebuilds_schemas::locks::entity(request_id);
    let begin_params: [&(dyn ToSql + Sync); 2] = [&lock_key, &request_id];
    // Start at a random id so concurrent claims of one pool spread over it instead of all
    // walking past the same freshly locked rows.
    let start = Uuid::new_v4();
    let attempt = Attempt {
        statement: &attempt,
        request_id,
        request,
        start,
    };
    // The usual request names its preset: its attempt goes out with the begin statement.
    let name_ok = prebuilds_core::validate_workspace_name(&request.workspace_name).is_ok();
    let named = request.preset_id.filter(|_| name_ok);
    let named_params = named.map(|preset_id| attempt.params(preset_id, start, None));
    let named_refs = named_params.as_ref().map(AttemptParams::refs);
    let mut first: Vec<Step<'_>> = vec![(&begin, &begin_params)];
    if let Some(refs) = &named_refs {
        first.push((attempt.statement, refs));
    }
    let mut results = tx.begin_with(&first).await?.into_iter();
    let begun = single_row(results.next().unwrap_or_default())?;
    let attempted = results.next().map(single_row).transpose()?;
    let decision = match earlier_answer(&begun, EarlierColumns::BEGIN, request_id, request)? {
        Some(decision) => decision,
        None => decide(client, ctx, &attempt, attempted).await?,
    };
    let (reply, labels, writes) = match decision {
        Decision::Replayed(reply) => {
            // An earlier delivery answered: nothing was claimed, nothing is written.
            tx.rollback().await?;
            return Ok((reply, PresetLabels::default()));
        }
        Decision::Answer {
            reply,
            labels,
            writes,
        } => (reply, labels, writes),
    };
    let reply_json = serde_json::to_value(&reply).expect("replies serialise");
    let outcome = reply.outcome.as_str();
    let request_json = request_text(request);
    let record_params: [&(dyn ToSql + Sync); 7] = [
        &request_id,
        &request.user_id,
        &reply.preset_id,
        &outcome,
        &reply.workspace_id,
        &reply_json,
        &request_json,
    ];
    let record = (&record, &record_params[..]);
    // A miss on an empty pool is demand the pool did not meet: reconcile the preset at once, so
    // an autoscaled pool grows now rather than at the next tick (level-triggered: for a plain
    // pool the reconcile finds nothing new to do).
    let miss_reconcile = match (&writes, reply.reason, reply.preset_id) {
        (None, Some(MissReason::PoolEmpty), Some(preset_id)) => {
            let now = Utc::now();
            Some(CloudEvent::new(
                ctx.source.clone(),
                now,
                ReconcilePreset {
                    preset_id,
                    reason: ReconcileReason::Claim,
                    requested_at: now,
                },
            ))
        }
        _ => None,
    };
    match (&writes, &miss_reconcile) {
        (Some(writes), _) => commit_claim(tx, &write_statements, writes, record).await?,
        (None, Some(event)) => {
            let (key, body) = (event.routing_key(), event.to_json());
            let (traceparent, tracestate) = prebuilds_runtime::tracing_context::columns();
            let message: [&(dyn ToSql + Sync); 5] =
                [&event.id, &key, &body, &traceparent, &tracestate];
            tx.commit_with(&[(&write_statements.enqueue, &message), record])
                .await?;
        }
        (None, None) => {
            tx.commit_with(&[record]).await?;
        }
    }
    if writes.is_some() || miss_reconcile.is_some() {
        ctx.outbox_waker.notify_one();
    }
    Ok((reply, labels))
}

/// What a delivery gets: the reply an earlier delivery of the same request stored (or, when the
/// id was used for another claim, a `request_conflict` refusal), or its own.
enum Decision {
    /// Nothing is written: a stored reply again, or a conflict refusal that is not recorded (the
    /// request id belongs to the first claim).
    Replayed(ClaimReply),
    Answer {
        reply: ClaimReply,
        labels: PresetLabels,
        /// For a claim: what completes it.
        writes: Option<ClaimWrites>,
    },
}

/// Where a statement returns an earlier answer of the request: its reply, and the user and
/// request data it answered.
struct EarlierColumns {
    reply: &'static str,
    user_id: &'static str,
    request: &'static str,
}

impl EarlierColumns {
    /// `sql/claim_begin.sql`.
    const BEGIN: EarlierColumns = EarlierColumns {
        reply: "reply",
        user_id: "reply_user_id",
        request: "reply_request",
    };
    /// `sql/claim_attempt.sql`.
    const ATTEMPT: EarlierColumns = EarlierColumns {
        reply: "answered_reply",
        user_id: "answered_user_id",
        request: "answered_request",
    };
}

/// The request as stored with its reply (`claim_requests.request`): its JSON text, which is the
/// same for the same request every time (fields in declaration order).
fn request_text(request: &ClaimRequest) -> String {
    serde_json::to_string(request).expect("requests serialise")
}

/// The decision an earlier answer of this request id makes (None: not answered before): its
/// reply again when it answered the same user and request data, otherwise `request_conflict` —
/// a reused id never hands one user's reply (a claimed workspace's id) to another. Requests
/// recorded before the request data was kept compare by user only. A stored reply that does not
/// decode is an error, never "not answered": that would claim a second prebuild for the request.
fn earlier_answer(
    row: &Row,
    columns: EarlierColumns,
    request_id: Uuid,
    request: &ClaimRequest,
) -> Result<Option<Decision>, DbError> {
    let Some(stored) = row.get::<_, Option<serde_json::Value>>(columns.reply) else {
        return Ok(None);
    };
    let reply = stored_reply(stored, request_id)?;
    let same_user = row.get::<_, Option<Uuid>>(columns.user_id) == Some(request.user_id);
    let same_body = match row.get::<_, Option<String>>(columns.request) {
        Some(stored) => stored == request_text(request),
        None => true,
    };
    if same_user && same_body {
        return Ok(Some(Decision::Replayed(reply)));
    }
    let message = format!(
        "request id {request_id} was already used for {}; a retry must repeat the same request, \
         and a new claim needs a new request id",
        if same_user {
            "a claim with other fields"
        } else {
            "another user's claim"
        }
    );
    Ok(Some(Decision::Replayed(rejected(
        ClaimErrorCode::RequestConflict,
        message,
        None,
    ))))
}

/// The reply stored for an answered request. Surfaced as an error when it does not decode (a
/// reply stored by a newer version, say): the delivery is retried and, failing that,
/// dead-lettered with the reason, and the request is never claimed a second time.
fn stored_reply(stored: serde_json::Value, request_id: Uuid) -> Result<ClaimReply, DbError> {
    serde_json::from_value(stored).map_err(|e| {
        DbError::Unexpected(format!(
            "the stored reply of claim request {request_id} does not decode ({e}); refusing to \
             answer it again or to claim anew"
        ))
    })
}

/// The preset's parameters as the claim statement returns them (a JSON list of `{name, value}`).
/// An error when they do not decode: a claim build without its preset's parameters would build
/// the wrong workspace.
fn decode_preset_parameters(value: serde_json::Value) -> Result<Vec<Parameter>, DbError> {
    serde_json::from_value(value).map_err(|e| {
        DbError::Unexpected(format!(
            "the claim statement's preset_parameters are not a list of {{name, value}}: {e}"
        ))
    })
}

/// `sql/claim_attempt.sql` for one request.
struct Attempt<'a> {
    statement: &'a Statement,
    request_id: Uuid,
    request: &'a ClaimRequest,
    /// Where the first pass over the pool starts.
    start: Uuid,
}

/// The parameters of one claim attempt (see the statement's header).
struct AttemptParams<'a> {
    user_id: Uuid,
    preset_id: Uuid,
    workspace_name: &'a str,
    request_id: Uuid,
    from: Uuid,
    below: Option<Uuid>,
}

impl<'a> Attempt<'a> {
    fn params(&self, preset_id: Uuid, from: Uuid, below: Option<Uuid>) -> AttemptParams<'a> {
        AttemptParams {
            user_id: self.request.user_id,
            preset_id,
            workspace_name: &self.request.workspace_name,
            request_id: self.request_id,
            from,
            below,
        }
    }

    /// Runs the attempt over the pool's ids in `[from, below)`.
    async fn run(
        &self,
        client: &Client,
        preset_id: Uuid,
        from: Uuid,
        below: Option<Uuid>,
    ) -> Result<Row, DbError> {
        let params = self.params(preset_id, from, below);
        Ok(client.query_one(self.statement, &params.refs()).await?)
    }
}

impl AttemptParams<'_> {
    fn refs(&self) -> [&(dyn ToSql + Sync); 6] {
        [
            &self.user_id,
            &self.preset_id,
            &self.workspace_name,
            &self.request_id,
            &self.from,
            &self.below,
        ]
    }
}

/// The one row a statement must return (`query_one`'s rule, for rows fetched by a pipeline).
fn single_row(mut rows: Vec<Row>) -> Result<Row, DbError> {
    match rows.len() {
        1 => Ok(rows.remove(0)),
        n => Err(DbError::Unexpected(format!(
            "a claim statement returned {n} rows instead of one"
        ))),
    }
}

/// The statements of [`commit_claim`].
struct WriteStatements {
    insert_job: Statement,
    insert_build: Statement,
    enqueue: Statement,
}

/// Everything a successful claim writes after the claim statement itself.
struct ClaimWrites {
    job: CloudEvent<ProvisionerJob>,
    reconcile: CloudEvent<ReconcilePreset>,
    initiator: Uuid,
    now: DateTime<Utc>,
}

/// Writes the claim build, its job and the two outbox messages, then `record` (the request's
/// reply), then commits — one round trip for all of it.
async fn commit_claim(
    tx: &PipelinedTransaction,
    statements: &WriteStatements,
    w: &ClaimWrites,
    record: Step<'_>,
) -> Result<(), DbError> {
    let WriteStatements {
        insert_job,
        insert_build,
        enqueue,
    } = statements;
    let job = &w.job.data;
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
    // Both messages continue the claim's trace (the claim build and the replacement reconcile).
    let (traceparent, tracestate) = prebuilds_runtime::tracing_context::columns();
    let job_message: [&(dyn ToSql + Sync); 5] =
        [&w.job.id, &job_key, &job_body, &traceparent, &tracestate];
    let reconcile_message: [&(dyn ToSql + Sync); 5] = [
        &w.reconcile.id,
        &reconcile_key,
        &reconcile_body,
        &traceparent,
        &tracestate,
    ];
    tx.commit_with(&[
        (insert_job, &job_params),
        (insert_build, &build_params),
        (enqueue, &job_message),
        // Replenish now, not at the next tick.
        (enqueue, &reconcile_message),
        record,
    ])
    .await?;
    Ok(())
}

/// Validates and, when possible, claims. `attempted` is the first pass's row when it went out
/// with the begin statement.
async fn decide(
    client: &Client,
    ctx: &ClaimsContext,
    attempt: &Attempt<'_>,
    attempted: Option<Row>,
) -> Result<Decision, DbError> {
    let request = attempt.request;
    let answer = |reply, labels| Decision::Answer {
        reply,
        labels,
        writes: None,
    };
    if let Err(e) = prebuilds_core::validate_workspace_name(&request.workspace_name) {
        let reply = rejected(
            ClaimErrorCode::InvalidName,
            e.to_string(),
            request.preset_id,
        );
        return Ok(answer(reply, PresetLabels::default()));
    }
    let preset_id = match (request.preset_id, request.template_id) {
        (Some(id), _) => id,
        (None, Some(template_id)) => {
            match matching_preset(client, template_id, &request.parameters).await? {
                Ok(id) => id,
                Err(tried) => {
                    return Ok(answer(no_matching_preset(tried), PresetLabels::default()));
                }
            }
        }
        (None, None) => {
            let reply = rejected(
                ClaimErrorCode::InvalidRequest,
                "a claim needs preset_id, or template_id and parameters to match a preset",
                None,
            );
            return Ok(answer(reply, PresetLabels::default()));
        }
    };
    let row = match attempted {
        Some(row) => row,
        None => attempt.run(client, preset_id, attempt.start, None).await?,
    };
    if let Some(decision) =
        earlier_answer(&row, EarlierColumns::ATTEMPT, attempt.request_id, request)?
    {
        return Ok(decision);
    }
    let Some(owner_name) = row.get::<_, Option<String>>("username") else {
        let msg = format!("no user with id {}", request.user_id);
        let reply = rejected(ClaimErrorCode::UnknownUser, msg, Some(preset_id));
        return Ok(answer(reply, PresetLabels::default()));
    };
    if !row.get::<_, bool>("user_may_claim") {
        let msg = format!(
            "user {owner_name} may not claim workspaces (the prebuilds system user, a system user \
             or a deleted user); claim for the user who will own the workspace"
        );
        let reply = rejected(ClaimErrorCode::Forbidden, msg, Some(preset_id));
        return Ok(answer(reply, PresetLabels::default()));
    }
    if row.get::<_, Option<Uuid>>("preset_id").is_none() {
        let msg = format!("no preset with id {preset_id}");
        let reply = rejected(ClaimErrorCode::UnknownPreset, msg, Some(preset_id));
        return Ok(answer(reply, PresetLabels::default()));
    }
    let labels = PresetLabels {
        organization: row.get("organization_name"),
        template: row.get("template_name"),
        preset: row.get("preset_name"),
    };
    if !row.get::<_, bool>("member") {
        let msg = format!(
            "user {owner_name} is not a member of organization {} (template {}); a user claims \
             only in organizations it belongs to: add it to the organization (organization_members; \
             new users: `prebuildsctl user create --organization {}`)",
            labels.organization, labels.template, labels.organization
        );
        let reply = rejected(ClaimErrorCode::Forbidden, msg, Some(preset_id));
        return Ok(answer(reply, labels));
    }
    if !row.get::<_, Option<bool>>("preset_active").unwrap_or(false) {
        let msg = format!(
            "preset {} of template {} is not on the active version (or the template is deleted or deprecated)",
            labels.preset, labels.template
        );
        let reply = rejected(ClaimErrorCode::PresetInactive, msg, Some(preset_id));
        return Ok(answer(reply, labels));
    }
    if row.get::<_, bool>("name_taken") {
        let msg = format!(
            "the user already has a workspace named {:?}",
            request.workspace_name
        );
        let reply = rejected(ClaimErrorCode::NameConflict, msg, Some(preset_id));
        return Ok(answer(reply, labels));
    }
    // Every check passed, so the attempt tried to claim; nothing above the start: cover the ids
    // below it. The second pass reads the checks again under a new snapshot: should one fail in
    // between (say, the preset just went inactive) it claims nothing and the reply is "no
    // eligible prebuild"; the claim build keeps the first pass's clock either way.
    let claimed = match claimed_prebuild(&row) {
        Some(claimed) => Some(claimed),
        None => {
            let wrapped = attempt
                .run(client, preset_id, Uuid::nil(), Some(attempt.start))
                .await?;
            claimed_prebuild(&wrapped)
        }
    };
    let Some((workspace_id, previous_build)) = claimed else {
        return Ok(answer(pool_empty(preset_id), labels));
    };
    let now: DateTime<Utc> = row.get("now");
    let preset_parameters = decode_preset_parameters(row.get("preset_parameters"))?;
    let job = ProvisionerJob {
        job_id: Uuid::new_v4(),
        build_id: Uuid::new_v4(),
        workspace_id,
        workspace_name: request.workspace_name.clone(),
        owner_id: request.user_id,
        owner_name,
        template_id: row.get("template_id"),
        template_version_id: row.get("version_id"),
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
        reason: None,
        presets: vec![],
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
    Ok(Decision::Answer {
        reply,
        labels,
        writes: Some(writes),
    })
}

/// The workspace an attempt claimed and its latest build number.
fn claimed_prebuild(row: &Row) -> Option<(Uuid, i32)> {
    let workspace_id = row.get::<_, Option<Uuid>>("claimed_workspace_id")?;
    Some((workspace_id, row.get("claimed_build_number")))
}

/// The preset of the template's active version that the request matches, its parameters'
/// defaults filling in what it leaves out (`prebuilds_core::match_preset`); when none matches, the
/// presets that were tried, by name.
async fn matching_preset(
    client: &Client,
    template_id: Uuid,
    requested: &[Parameter],
) -> Result<Result<Uuid, Vec<PresetParameters>>, DbError> {
    let rows = cached::query(
        client,
        include_str!("sql/claim_match_candidates.sql"),
        &[&template_id],
    )
    .await?;
    let mut by_preset: BTreeMap<Uuid, prebuilds_core::PresetCandidate> = BTreeMap::new();
    let mut defaults: Vec<(String, String)> = Vec::new();
    for r in rows {
        let value = match (
            r.get::<_, Option<String>>("name"),
            r.get::<_, Option<String>>("value"),
        ) {
            (Some(name), Some(value)) => Some((name, value)),
            _ => None,
        };
        if r.get::<_, &str>("kind") == "default" {
            defaults.extend(value);
            continue;
        }
        let id: Uuid = r.get("id");
        by_preset
            .entry(id)
            .or_insert_with(|| prebuilds_core::PresetCandidate {
                id,
                name: r.get("preset_name"),
                parameters: Vec::new(),
                is_default: r.get("is_default"),
            })
            .parameters
            .extend(value);
    }
    let candidates: Vec<prebuilds_core::PresetCandidate> = by_preset.into_values().collect();
    let requested: Vec<(String, String)> = requested
        .iter()
        .map(|p| (p.name.clone(), p.value.clone()))
        .collect();
    if let Some(id) = prebuilds_core::match_preset(&candidates, &defaults, &requested) {
        return Ok(Ok(id));
    }
    let mut tried: Vec<PresetParameters> = candidates
        .into_iter()
        .map(|c| {
            let mut parameters: Vec<Parameter> = c
                .parameters
                .into_iter()
                .map(|(name, value)| Parameter { name, value })
                .collect();
            parameters.sort_by(|a, b| a.name.cmp(&b.name));
            PresetParameters {
                preset_id: c.id,
                name: c.name,
                parameters,
            }
        })
        .collect();
    tried.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Err(tried))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameters_that_do_not_decode_are_an_error_not_an_empty_list() {
        let good = serde_json::json!([{"name": "image", "value": "ubuntu"}]);
        assert_eq!(decode_preset_parameters(good).unwrap().len(), 1);
        assert!(decode_preset_parameters(serde_json::json!([]))
            .unwrap()
            .is_empty());
        for bad in [
            serde_json::json!(null),
            serde_json::json!({"image": "ubuntu"}),
            serde_json::json!([{"name": "image"}]),
        ] {
            let err = decode_preset_parameters(bad.clone()).unwrap_err();
            assert!(
                err.to_string().contains("preset_parameters"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn a_stored_reply_that_does_not_decode_is_an_error_not_unanswered() {
        let id = Uuid::new_v4();
        let reply = rejected(ClaimErrorCode::InvalidName, "x", None);
        let stored = serde_json::to_value(&reply).unwrap();
        assert_eq!(stored_reply(stored, id).unwrap(), reply);
        let err = stored_reply(serde_json::json!({"outcome": "teleported"}), id).unwrap_err();
        assert!(err.to_string().contains(&id.to_string()), "{err}");
    }
}
