//! Provisioner events (`<prefix>.provisioner-events`) → database. Each event is applied in one
//! transaction together with the record of its id (`processed_messages`), so a redelivered event is
//! acknowledged without effect. Events that change state are serialized per job by locking the job
//! row (and, within a worker, before any connection is taken: [`EventsHandler`]). Which event a
//! job accepts in which state is `prebuilds_core::admit`: an event after its step is recorded and
//! changes nothing (`stale`: a completed job never goes back to running); one before its step (a
//! completion that overtook its start) is deferred — not recorded, retried by the consumer, and
//! dead-lettered as `out_of_order` if its predecessor never comes. An agent never goes back from
//! ready (`agent_lifecycle_rank`). Log lines, the bulk of all events, change no state: each
//! `job_log` event is one statement, with no job lock (`sql/job_log_event.sql`).
//!
//! Trust: with `PREBUILDS_PROVISIONER_PUBLISHERS` set, only events whose validated AMQP `user_id`
//! names a listed broker user are applied ([`prebuilds_runtime::amqp::trust`]). Job ownership:
//! the broker user whose `job_started` took a job is recorded (`provisioner_jobs.started_by`), and
//! the job's later state events from any other publisher are recorded and ignored
//! ([`apply_from`]).
//!
//! Event-driven replenishment: a completed prebuild build or an agent becoming ready queues an
//! immediate reconcile of the preset through the outbox instead of waiting for the next tick. A
//! completed prebuild *create* build also frees in-flight capacity: it re-queues the presets that
//! waited longest for it ([`WAKE_PER_COMPLETION`], `prebuilds_store::capacity::take_waiting`).

use std::{collections::BTreeMap, sync::Arc};

use deadpool_postgres::{Pool, Transaction};
use prebuilds_core::{admit, Admission, JobEventKind, JobStatus};
use prebuilds_runtime::db::cached;
use prebuilds_runtime::keyed_locks::KeyedLocks;
use prebuilds_runtime::{
    amqp::{consumer::Incoming, trust, Handler, HandlerError, Publishers},
    db::DbError,
    outbox,
};
use prebuilds_schemas::{
    column::Parsed, AgentLifecycle, AgentLifecycleState, BuildStage, CloudEvent, JobCompleted,
    JobLog, JobOutcome, Notification, PlanResult, ProvisionerEvent, RawEvent, ReconcileReason,
    ResourceReplacement, Transition, PREBUILDS_USER_ID, RESOURCE_REPLACED_TEMPLATE_ID,
};
use tokio::sync::{Notify, Semaphore};
use uuid::Uuid;

use crate::metrics::WorkerMetrics;

/// Held-back presets re-queued per completed create build. One slot was freed; waking two keeps
/// the capacity busy when a woken preset no longer needs a create (it leaves the list), and the
/// scheduler's tick covers anything left.
pub const WAKE_PER_COMPLETION: i64 = 2;

/// Consumer name under which event ids are recorded.
const CONSUMER: &str = "provisioner-events";

/// Dead-letter class of an event whose predecessor never arrived (`prebuilds_core::admit`).
pub const OUT_OF_ORDER: &str = "out_of_order";

#[derive(Debug, Clone)]
pub struct EventsContext {
    pub pool: Pool,
    pub metrics: WorkerMetrics,
    pub outbox_waker: Arc<Notify>,
    pub source: String,
    /// A completed create wakes presets held back by the global in-flight cap. Only with that cap
    /// configured: otherwise the wake-up's global lock would serialize every completion for
    /// nothing (a per-preset cap is freed by the preset's own completions, which re-queue it).
    pub wakes_held_back: bool,
}

#[derive(Debug)]
pub struct EventsHandler {
    pub context: EventsContext,
    /// State events of one job wait for each other here, holding no connection: a provisioner
    /// sends a job's events back to back, and waiting for the job row's lock inside a transaction
    /// would idle a connection and a handler slot per waiting event. Log lines skip it (they
    /// change no state and carry their own times).
    jobs: KeyedLocks,
    /// Event transactions at once. The consumer takes more deliveries than this, so events of
    /// other jobs keep flowing while one job's events wait their turn.
    slots: Semaphore,
    /// Who may send provisioner events (`PREBUILDS_PROVISIONER_PUBLISHERS`; empty: anyone).
    publishers: Publishers,
}

impl EventsHandler {
    pub fn new(context: EventsContext, concurrency: usize) -> Self {
        EventsHandler {
            context,
            jobs: KeyedLocks::default(),
            slots: Semaphore::new(concurrency.max(1)),
            publishers: Publishers::default(),
        }
    }

    /// Accepts events only from these broker users (their validated AMQP `user_id`); others are
    /// dead-lettered unapplied (`forbidden_publisher`).
    pub fn with_publishers(mut self, publishers: Publishers) -> Self {
        self.publishers = publishers;
        self
    }
}

/// How an event was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    Duplicate,
    /// Valid but superseded (e.g. `job_started` for a completed job): recorded, no effect.
    Stale,
    /// Sent by another broker user than the one whose `job_started` took the job
    /// (`provisioner_jobs.started_by`): recorded, no effect.
    NotOwner,
    /// Came before its step of the job (see [`EventError::NotYet`]): not recorded, retried.
    Deferred,
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("unknown provisioner job {0}")]
    UnknownJob(Uuid),
    /// The event comes before its step of the job (`prebuilds_core::admit`): nothing was applied
    /// or recorded; it may apply once its predecessor has.
    #[error("{reason} (job {job_id} is {status})")]
    NotYet {
        job_id: Uuid,
        status: JobStatus,
        reason: &'static str,
    },
    /// The job row holds a status this code does not know (a newer schema).
    #[error("provisioner job {job_id} has status {status:?}, which this version does not know")]
    UnknownStatus { job_id: Uuid, status: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for EventError {
    fn from(e: tokio_postgres::Error) -> Self {
        EventError::Db(e.into())
    }
}

impl Handler for EventsHandler {
    async fn handle(&self, message: &Incoming) -> Result<(), HandlerError> {
        // Before anything is read: a forged event changes nothing and is dead-lettered with the
        // reason (counted in `prebuilds_dead_lettered_total{reason="forbidden_publisher"}`).
        self.publishers
            .check(message)
            .map_err(|reason| HandlerError::permanent(trust::FORBIDDEN_PUBLISHER, reason))?;
        let raw = RawEvent::parse(&message.body)
            .map_err(|e| HandlerError::permanent("envelope", e.to_string()))?;
        let (id, event) = ProvisionerEvent::decode(raw)
            .map_err(|e| HandlerError::permanent("schema", e.to_string()))?;
        // Log lines change no state and carry their own times: they need not wait for the job's
        // other events (`append_log`).
        let _job = match event {
            ProvisionerEvent::JobLog(_) => None,
            _ => Some(self.jobs.lock(event.job_id()).await),
        };
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the events semaphore is never closed");
        match apply_from(&self.context, id, &event, message.user_id.as_deref()).await {
            Ok(_) => Ok(()),
            Err(EventError::UnknownJob(job)) => Err(HandlerError::permanent(
                "unknown_id",
                format!("unknown provisioner job {job}"),
            )),
            Err(e @ EventError::NotYet { .. }) => {
                record(&self.context, &event, Applied::Deferred);
                Err(HandlerError::defer(OUT_OF_ORDER, e.to_string()))
            }
            // Transient: an older worker meeting a newer schema's status should wait for the
            // rollout, not dead-letter a valid event.
            Err(e @ EventError::UnknownStatus { .. }) => Err(HandlerError::Transient(e.into())),
            Err(EventError::Db(e)) => Err(HandlerError::Transient(e.into())),
        }
    }
}

/// The kind under which [`admit`] judges a state event (log lines never reach it).
fn state_event_kind(event: &ProvisionerEvent) -> JobEventKind {
    match event {
        ProvisionerEvent::JobStarted(_) => JobEventKind::Started,
        ProvisionerEvent::PlanResult(_) => JobEventKind::PlanResult,
        ProvisionerEvent::JobCompleted(_) => JobEventKind::Completed,
        ProvisionerEvent::AgentLifecycle(_) => JobEventKind::AgentLifecycle,
        ProvisionerEvent::JobLog(_) => unreachable!("log events are applied by append_log"),
    }
}

fn kind(event: &ProvisionerEvent) -> &'static str {
    match event {
        ProvisionerEvent::JobStarted(_) => "job_started",
        ProvisionerEvent::PlanResult(_) => "plan_result",
        ProvisionerEvent::JobCompleted(_) => "job_completed",
        ProvisionerEvent::AgentLifecycle(_) => "agent_lifecycle",
        ProvisionerEvent::JobLog(_) => "job_log",
    }
}

/// The job row an event refers to.
struct JobContext {
    workspace_id: Option<Uuid>,
    transition: Option<Transition>,
    stage: Option<BuildStage>,
    owner_id: Option<Uuid>,
    preset_id: Option<Uuid>,
}

impl JobContext {
    /// Whether the workspace is (still) a prebuild, whose pool a change of this job affects.
    fn is_prebuild(&self) -> bool {
        self.owner_id == Some(PREBUILDS_USER_ID)
    }
}

/// Applies one event in its own transaction, as an event of unknown publisher (see
/// [`apply_from`]).
pub async fn apply(
    ctx: &EventsContext,
    event_id: Uuid,
    event: &ProvisionerEvent,
) -> Result<Applied, EventError> {
    apply_from(ctx, event_id, event, None).await
}

/// Applies one event sent by broker user `publisher` (its validated AMQP `user_id`) in its own
/// transaction. Job ownership: `job_started` binds the job to its publisher
/// (`provisioner_jobs.started_by`); a later state event of the job from anyone else — another
/// broker user, or no `user_id` at all — is recorded and ignored ([`Applied::NotOwner`]). A job
/// not bound (not started yet, or started without `user_id`) accepts any publisher, so events a
/// relay reordered (a completion before its start) still apply. Log lines are not checked (they
/// change no state).
pub async fn apply_from(
    ctx: &EventsContext,
    event_id: Uuid,
    event: &ProvisionerEvent,
    publisher: Option<&str>,
) -> Result<Applied, EventError> {
    if let ProvisionerEvent::JobLog(e) = event {
        let applied = append_log(ctx, event_id, e).await?;
        record(ctx, event, applied);
        return Ok(applied);
    }
    let mut client = ctx.pool.get().await.map_err(DbError::from)?;
    let tx = client.transaction().await?;
    let job_id = event.job_id();
    let lookup = tx
        .prepare_cached(include_str!("sql/job_for_event.sql"))
        .await?;
    let Some(row) = tx
        .query_opt(&lookup, &[&job_id, &CONSUMER, &event_id])
        .await?
    else {
        // Rolled back: the id stays unrecorded, and the message is dead-lettered.
        return Err(EventError::UnknownJob(job_id));
    };
    if !row.get::<_, bool>("first_time") {
        tx.commit().await?;
        record(ctx, event, Applied::Duplicate);
        return Ok(Applied::Duplicate);
    }
    if let Some(owner) = row.get::<_, Option<String>>("started_by") {
        if publisher != Some(owner.as_str()) {
            // The event's id stays recorded: a redelivery is a duplicate, not a second refusal.
            tx.commit().await?;
            tracing::warn!(
                %job_id,
                kind = kind(event),
                owner = %owner,
                publisher = publisher.unwrap_or("(no user_id)"),
                "provisioner event ignored: the job was started by another broker user, which alone may report on it"
            );
            record(ctx, event, Applied::NotOwner);
            return Ok(Applied::NotOwner);
        }
    }
    let status_text: String = row.get("job_status");
    let status = JobStatus::parse(&status_text).ok_or(EventError::UnknownStatus {
        job_id,
        status: status_text,
    })?;
    match admit(state_event_kind(event), status) {
        Admission::Apply => {}
        Admission::NotYet(reason) => {
            // Rolled back: the id stays unrecorded, so the retried delivery is judged afresh.
            return Err(EventError::NotYet {
                job_id,
                status,
                reason,
            });
        }
        Admission::Stale(reason) => {
            tx.commit().await?;
            tracing::debug!(%job_id, kind = kind(event), %status, reason, "provisioner event ignored");
            record(ctx, event, Applied::Stale);
            return Ok(Applied::Stale);
        }
    }
    let job = JobContext {
        workspace_id: row.get("workspace_id"),
        transition: row
            .get::<_, Option<Parsed<Transition>>>("transition")
            .map(Parsed::into_inner),
        stage: row
            .get::<_, Option<Parsed<BuildStage>>>("stage")
            .map(Parsed::into_inner),
        owner_id: row.get("owner_id"),
        preset_id: row.get("preset_id"),
    };
    let mut wake = false;
    // Counted after the commit: a rolled-back transaction is retried, and must not count twice.
    let mut replaced_on_claim: Option<[String; 3]> = None;
    let applied = match event {
        ProvisionerEvent::JobStarted(e) => {
            let n = cached::execute(
                &tx,
                include_str!("sql/job_started.sql"),
                &[&e.job_id, &e.started_at, &publisher],
            )
            .await?;
            changed(n)
        }
        ProvisionerEvent::JobCompleted(e) => {
            let applied = job_completed(&tx, e, &job).await?;
            if applied == Applied::Applied && job.is_prebuild() {
                wake |= request_reconcile(&tx, ctx, &job, true).await?;
            }
            applied
        }
        ProvisionerEvent::AgentLifecycle(e) => {
            let applied = agent_lifecycle(&tx, e).await?;
            if applied == Applied::Applied
                && e.lifecycle_state == AgentLifecycleState::Ready
                && job.is_prebuild()
            {
                wake |= request_reconcile(&tx, ctx, &job, false).await?;
            }
            applied
        }
        ProvisionerEvent::JobLog(_) => unreachable!("log events are applied by append_log"),
        ProvisionerEvent::PlanResult(e) => {
            let (applied, notified, replaced) = plan_result(&tx, ctx, e, &job).await?;
            wake |= notified;
            replaced_on_claim = replaced;
            applied
        }
    };
    tx.commit().await?;
    if wake {
        ctx.outbox_waker.notify_one();
    }
    if let Some(labels) = replaced_on_claim {
        ctx.metrics
            .resource_replacements
            .with_label_values(&labels)
            .inc();
    }
    record(ctx, event, applied);
    Ok(applied)
}

fn changed(rows: u64) -> Applied {
    if rows > 0 {
        Applied::Applied
    } else {
        Applied::Stale
    }
}

fn record(ctx: &EventsContext, event: &ProvisionerEvent, applied: Applied) {
    let result = match applied {
        Applied::Applied => "applied",
        Applied::Duplicate => "duplicate",
        Applied::Stale => "stale",
        Applied::NotOwner => "not_owner",
        Applied::Deferred => "deferred",
    };
    ctx.metrics
        .provisioner_events
        .with_label_values(&[kind(event), result])
        .inc();
}

async fn job_completed(
    tx: &Transaction<'_>,
    e: &JobCompleted,
    job: &JobContext,
) -> Result<Applied, EventError> {
    let error = e.error.as_deref().map(sanitize);
    let n = cached::execute(
        tx,
        include_str!("sql/job_completed.sql"),
        &[&e.job_id, &e.status.as_str(), &e.completed_at, &error],
    )
    .await?;
    if n == 0 {
        return Ok(Applied::Stale);
    }
    // A failed or canceled build made no workspace: its agents are not recorded.
    let agents = match e.status {
        JobOutcome::Succeeded => e.agents.as_slice(),
        JobOutcome::Failed | JobOutcome::Canceled => &[],
    };
    for agent in agents {
        cached::execute(
            tx,
            include_str!("sql/agent_upsert.sql"),
            &[
                &Uuid::new_v4(),
                &e.job_id,
                &sanitize(&agent.name),
                &"created",
            ],
        )
        .await?;
    }
    // A successful delete build ends the workspace.
    if e.status == JobOutcome::Succeeded && job.transition == Some(Transition::Delete) {
        if let Some(workspace_id) = job.workspace_id {
            cached::execute(
                tx,
                include_str!("sql/workspace_deleted.sql"),
                &[&workspace_id],
            )
            .await?;
        }
    }
    Ok(Applied::Applied)
}

async fn agent_lifecycle(tx: &Transaction<'_>, e: &AgentLifecycle) -> Result<Applied, EventError> {
    let n = cached::execute(
        tx,
        include_str!("sql/agent_upsert.sql"),
        &[
            &Uuid::new_v4(),
            &e.job_id,
            &sanitize(&e.agent_name),
            &e.lifecycle_state.as_str(),
        ],
    )
    .await?;
    Ok(changed(n))
}

/// A `job_log` event in one statement, outside any explicit transaction (`sql/job_log_event.sql`):
/// log lines are the bulk of provisioner events, and this makes each one round trip.
async fn append_log(
    ctx: &EventsContext,
    event_id: Uuid,
    e: &JobLog,
) -> Result<Applied, EventError> {
    let client = ctx.pool.get().await.map_err(DbError::from)?;
    let created: Vec<_> = e.logs.iter().map(|l| l.created_at).collect();
    let levels: Vec<&str> = e.logs.iter().map(|l| l.level.as_str()).collect();
    let stages: Vec<String> = e.logs.iter().map(|l| sanitize(&l.stage)).collect();
    let outputs: Vec<String> = e.logs.iter().map(|l| sanitize(&l.output)).collect();
    let row = cached::query_one(
        &client,
        include_str!("sql/job_log_event.sql"),
        &[
            &e.job_id, &CONSUMER, &event_id, &created, &levels, &stages, &outputs,
        ],
    )
    .await?;
    if !row.get::<_, bool>("known") {
        return Err(EventError::UnknownJob(e.job_id));
    }
    Ok(if row.get::<_, bool>("first_time") {
        Applied::Applied
    } else {
        Applied::Duplicate
    })
}

/// Records a plan's resource replacements. For a claim build with replacements (the first time
/// they are recorded): WARN lines in the job log, the replacements counter, and one notification
/// per template admin through the outbox. Returns (applied, wrote outbox rows).
async fn plan_result(
    tx: &Transaction<'_>,
    ctx: &EventsContext,
    e: &PlanResult,
    job: &JobContext,
) -> Result<(Applied, bool, Option<[String; 3]>), EventError> {
    // `coder_*` resources are the platform's own bookkeeping, never drift.
    let replacements: Vec<&ResourceReplacement> = e
        .resource_replacements
        .iter()
        .filter(|r| !resource_type(&r.resource).starts_with("coder_"))
        .collect();
    let stored = serde_json::to_value(&replacements).expect("replacements serialise");
    let first = cached::execute(
        tx,
        include_str!("sql/record_replacements.sql"),
        &[&e.job_id, &stored],
    )
    .await?
        == 1;
    if !first {
        return Ok((Applied::Stale, false, None));
    }
    if replacements.is_empty() || job.stage != Some(BuildStage::Claim) {
        return Ok((Applied::Applied, false, None));
    }
    let Some(names) = cached::query_opt(
        tx,
        include_str!("sql/claim_build_context.sql"),
        &[&e.job_id],
    )
    .await?
    else {
        tracing::warn!(job_id = %e.job_id, "claim build has no prebuild preset; replacements recorded without notification");
        return Ok((Applied::Applied, false, None));
    };
    let workspace: String = names.get("workspace");
    let claimant: String = names.get("claimant");
    let organization: String = names.get("organization");
    let template: String = names.get("template");
    let template_version: String = names.get("template_version");
    let preset: String = names.get("preset");
    let build_number: i32 = names.get("build_number");

    let now = chrono::Utc::now();
    let lines: Vec<String> = replacements
        .iter()
        .map(|r| {
            format!(
                "resource {} was replaced on claim (forced by: {}); add these attributes to lifecycle.ignore_changes to keep the prebuild",
                r.resource,
                r.paths.join(", ")
            )
        })
        .collect();
    let created: Vec<_> = lines.iter().map(|_| now).collect();
    let levels: Vec<&str> = lines.iter().map(|_| "warn").collect();
    let stages: Vec<&str> = lines.iter().map(|_| "plan").collect();
    cached::execute(
        tx,
        include_str!("sql/job_logs.sql"),
        &[&e.job_id, &created, &levels, &stages, &lines],
    )
    .await?;
    let counted = Some([template.clone(), preset.clone(), organization.clone()]);

    let labels: BTreeMap<String, String> = [
        ("org", organization.clone()),
        ("workspace", workspace),
        ("template", template),
        ("template_version", template_version),
        ("preset", preset),
        ("workspace_build_num", build_number.to_string()),
        ("claimant", claimant),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let replaced: BTreeMap<&str, String> = replacements
        .iter()
        .map(|r| (r.resource.as_str(), r.paths.join(",")))
        .collect();
    let data = serde_json::json!({ "replacements": replaced });
    let admins = cached::query(tx, include_str!("sql/template_admins.sql"), &[]).await?;
    let mut queued = false;
    for admin in admins {
        let user_id: Uuid = admin.get(0);
        let notification_id = Uuid::new_v4();
        let payload = serde_json::json!({ "labels": labels, "data": data });
        // One build has one job: (job, recipient) identifies (build, admin).
        let key = format!("resource_replaced:{}:{user_id}", e.job_id);
        let inserted = cached::query_opt(
            tx,
            include_str!("sql/insert_notification.sql"),
            &[
                &notification_id,
                &RESOURCE_REPLACED_TEMPLATE_ID,
                &user_id,
                &payload,
                &key,
            ],
        )
        .await?;
        if inserted.is_none() {
            continue;
        }
        let message = CloudEvent::new(
            ctx.source.clone(),
            now,
            Notification {
                notification_id,
                notification_template_id: RESOURCE_REPLACED_TEMPLATE_ID,
                user_id,
                labels: labels.clone(),
                data: data.clone(),
            },
        );
        outbox::enqueue(tx, &message).await?;
        queued = true;
    }
    Ok((Applied::Applied, queued, counted))
}

/// `module.x.aws_instance.web[0]` → `aws_instance`.
fn resource_type(address: &str) -> &str {
    let mut parts = address.split('.').peekable();
    while let Some(part) = parts.next() {
        if part == "module" || part == "data" {
            // `module.<name>` pairs and the `data.` prefix come before the type.
            if part == "module" {
                parts.next();
            }
            continue;
        }
        return part;
    }
    address
}

/// Queues an immediate reconcile of the job's preset — and, when `frees_capacity` (a completed
/// create build), of the presets that waited longest for capacity; returns whether it wrote to
/// the outbox.
async fn request_reconcile(
    tx: &Transaction<'_>,
    ctx: &EventsContext,
    job: &JobContext,
    frees_capacity: bool,
) -> Result<bool, EventError> {
    let mut presets: Vec<Uuid> = job.preset_id.into_iter().collect();
    if frees_capacity && ctx.wakes_held_back && job.stage == Some(BuildStage::Create) {
        for waiting in prebuilds_store::capacity::take_waiting(tx, WAKE_PER_COMPLETION).await? {
            if !presets.contains(&waiting) {
                presets.push(waiting);
            }
        }
    }
    if presets.is_empty() {
        return Ok(false);
    }
    prebuilds_store::attention::request_reconciles(
        tx,
        &presets,
        ReconcileReason::JobCompleted,
        &ctx.source,
    )
    .await?;
    Ok(true)
}

/// PostgreSQL text cannot hold NUL; everything else is stored literally.
fn sanitize(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_types_are_read_from_addresses() {
        assert_eq!(
            resource_type("docker_container.workspace[0]"),
            "docker_container"
        );
        assert_eq!(resource_type("module.dev.aws_instance.web"), "aws_instance");
        assert_eq!(resource_type("data.coder_parameter.x"), "coder_parameter");
        assert_eq!(resource_type("coder_agent.main"), "coder_agent");
    }
}
