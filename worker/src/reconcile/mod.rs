//! `reconcile.preset` jobs. Jobs waiting at the same moment share one transaction ([`batch`]);
//! for each preset in it:
//!
//! 1. take the preset's transaction-level advisory lock (per-preset serialization across workers;
//!    a batch only tries the locks, and a preset locked elsewhere is reconciled on its own);
//! 2. coalesce: if a reconcile of this preset read its snapshot well after this job was requested,
//!    that reconcile already saw everything the job could ask for — commit and stop;
//! 3. read the snapshot (`prebuilds_store::load_snapshots`) and the database clock;
//! 4. plan with the pure core; execute the actions ([`execute`]) in the same transaction, writing
//!    provisioner jobs to the outbox;
//! 5. record the watermarks, commit, wake the outbox relay.
//!
//! One transaction makes at most `PREBUILDS_MAX_CREATES_PER_PASS` creates over all its presets
//! (`prebuilds_core::CreateBudget`); a preset left with creates to make writes a `reconcile.preset`
//! job for itself to the outbox in the same transaction (reason `tick`: docs/messages.md pins the
//! reasons, and to a worker a follow-up is a tick that came early), so the pool keeps filling
//! through short passes, each after the previous one committed.
//!
//! Jobs are level-triggered ("look at preset X now"), so duplicates and reordering are harmless.

pub mod batch;
pub mod execute;
pub mod single_flight;

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use chrono::{DateTime, TimeDelta, Utc};
use deadpool_postgres::Pool;
use prebuilds_core::{CreateBudget, DesiredSource, Plan, ReconcileConfig};
use prebuilds_runtime::{
    amqp::{consumer::Incoming, Handler, HandlerError},
    db::{cached, DbError},
};
use prebuilds_schemas::{CloudEvent, RawEvent, ReconcilePreset, ReconcileReason};
use prebuilds_store::PresetView;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::metrics::WorkerMetrics;

/// Jobs requested more than this long before the preset's last snapshot are coalesced. The margin
/// absorbs the gap between a requester stamping `requested_at` and committing its change, and clock
/// skew between the scheduler and the database.
pub const COALESCE_MARGIN: TimeDelta = TimeDelta::seconds(1);

/// What a reconcile needs from the process.
#[derive(Debug, Clone)]
pub struct ReconcileContext {
    pub pool: Pool,
    pub config: ReconcileConfig,
    pub metrics: WorkerMetrics,
    /// Wakes the outbox relay after a commit that wrote outbox rows.
    pub outbox_waker: Arc<Notify>,
    pub source: String,
    /// One "minute" of the autoscaling demand windows (`PREBUILDS_DEMAND_TIME_UNIT`).
    pub demand_time_unit: std::time::Duration,
}

/// How one reconcile job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReconcileOutcome {
    Reconciled(execute::ExecutionReport),
    Coalesced,
    UnknownPreset,
}

#[derive(Debug)]
pub struct ReconcileHandler {
    pub context: ReconcileContext,
    /// Coalesces concurrent jobs of one preset within this process.
    pub in_flight: single_flight::SingleFlight<ReconcileOutcome>,
    batcher: batch::Batcher,
}

impl ReconcileHandler {
    /// `concurrency` reconcile transactions at once, each covering up to `max_batch` presets;
    /// reconciles of one preset start at least `spacing` apart. Needs a Tokio runtime (starts
    /// the batch drainers).
    pub fn new(
        context: ReconcileContext,
        concurrency: usize,
        max_batch: usize,
        spacing: std::time::Duration,
    ) -> Self {
        ReconcileHandler {
            batcher: batch::Batcher::start(context.clone(), concurrency, max_batch),
            context,
            in_flight: single_flight::SingleFlight::with_spacing(spacing),
        }
    }
}

impl Handler for ReconcileHandler {
    async fn handle(&self, message: &Incoming) -> Result<(), HandlerError> {
        let raw = RawEvent::parse(&message.body)
            .map_err(|e| HandlerError::permanent("envelope", e.to_string()))?;
        let event: CloudEvent<ReconcilePreset> = raw
            .decode()
            .map_err(|e| HandlerError::permanent("schema", e.to_string()))?;
        let job = event.data;
        let span = tracing::info_span!(
            "reconcile.job",
            preset_id = %job.preset_id,
            reason = ?job.reason,
            outcome = tracing::field::Empty,
        );
        tracing::Instrument::instrument(self.handle_job(job), span).await
    }
}

impl ReconcileHandler {
    /// One job, in its `reconcile.job` span. A job answered by another job's run (coalesced) ends
    /// its trace here: the provisioner jobs that run creates are in the trace of the job that ran
    /// it (the first of the coalesced ones to arrive).
    async fn handle_job(&self, job: ReconcilePreset) -> Result<(), HandlerError> {
        let flight = self
            .in_flight
            .run(job.preset_id, || {
                self.batcher.reconcile(Job {
                    preset_id: job.preset_id,
                    requested_at: job.requested_at,
                })
            })
            .await;
        let outcome = match flight {
            Ok(single_flight::Flight::Ran(outcome)) => outcome,
            // The run that covered this job was itself coalesced against its own (possibly much
            // older) request time; that says nothing about this job: check it on its own.
            Ok(single_flight::Flight::Coalesced(ReconcileOutcome::Coalesced)) => self
                .batcher
                .reconcile(Job {
                    preset_id: job.preset_id,
                    requested_at: job.requested_at,
                })
                .await
                .map_err(|e| HandlerError::Transient(e.into()))?,
            // Answered by another job's run: its result is this job's too.
            Ok(single_flight::Flight::Coalesced(outcome)) => {
                tracing::Span::current().record("outcome", "answered_by_another_run");
                self.context
                    .metrics
                    .reconcile_jobs
                    .with_label_values(&["coalesced"])
                    .inc();
                outcome
            }
            Err(e) => return Err(HandlerError::Transient(e.into())),
        };
        match outcome {
            ReconcileOutcome::UnknownPreset => Err(HandlerError::permanent(
                "unknown_id",
                format!("unknown preset {}", job.preset_id),
            )),
            ReconcileOutcome::Reconciled(report) => {
                if job.reason == ReconcileReason::Claim && report.created > 0 {
                    let latency = (Utc::now() - job.requested_at)
                        .num_microseconds()
                        .unwrap_or(0);
                    self.context
                        .metrics
                        .replenish_latency
                        .observe(latency.max(0) as f64 / 1e6);
                }
                Ok(())
            }
            ReconcileOutcome::Coalesced => {
                tracing::Span::current().record("outcome", "coalesced");
                Ok(())
            }
        }
    }
}

/// One reconcile job: "look at this preset now".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Job {
    pub preset_id: Uuid,
    pub requested_at: DateTime<Utc>,
}

/// What a batched transaction did for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Done(ReconcileOutcome),
    /// Reconcile it on its own ([`reconcile_preset`]): another transaction holds its lock, or it
    /// creates under a global in-flight cap (whose lock a batch must not hold for the rest of
    /// the batch).
    Alone,
}

/// How a transaction takes its presets' locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Locking {
    /// Wait for the lock; exactly one preset per transaction.
    Wait,
    /// Try every lock without waiting; busy presets are left alone.
    Try,
}

/// Reconciles one preset, waiting for its lock (see the module doc for the algorithm).
pub async fn reconcile_preset(
    ctx: &ReconcileContext,
    preset_id: Uuid,
    requested_at: DateTime<Utc>,
) -> Result<ReconcileOutcome, DbError> {
    let job = Job {
        preset_id,
        requested_at,
    };
    let attempt = reconcile_in_one_transaction(ctx, &[job], &[], Locking::Wait)
        .await?
        .pop();
    match attempt {
        Some(Attempt::Done(outcome)) => Ok(outcome),
        // A waiting lock is always granted, and one job always yields one attempt.
        other => unreachable!("a single waiting reconcile ended as {other:?}"),
    }
}

/// Reconciles several presets in one transaction, one attempt per job in order. Locks are only
/// tried, never waited for (a transaction holding several may not wait, or two could deadlock):
/// presets locked elsewhere come back as [`Attempt::Alone`], as do presets that would create
/// under a global in-flight cap. A failure fails the whole batch.
pub async fn reconcile_batch(
    ctx: &ReconcileContext,
    jobs: &[Job],
) -> Result<Vec<Attempt>, DbError> {
    reconcile_in_one_transaction(ctx, jobs, &[], Locking::Try).await
}

/// [`reconcile_batch`] for jobs handed over from other tasks: each preset's work runs in a
/// `reconcile.preset` span continuing its job's trace (`traces[i]` for `jobs[i]`), so the
/// provisioner jobs it writes to the outbox carry that job's context.
pub async fn reconcile_batch_traced(
    ctx: &ReconcileContext,
    jobs: &[Job],
    traces: &[Option<prebuilds_runtime::tracing_context::Remote>],
) -> Result<Vec<Attempt>, DbError> {
    reconcile_in_one_transaction(ctx, jobs, traces, Locking::Try).await
}

async fn reconcile_in_one_transaction(
    ctx: &ReconcileContext,
    jobs: &[Job],
    traces: &[Option<prebuilds_runtime::tracing_context::Remote>],
    locking: Locking,
) -> Result<Vec<Attempt>, DbError> {
    let started = Instant::now();
    let mut client = ctx.pool.get().await?;
    let tx = client.transaction().await?;
    // One round trip: take (or try) the locks, then read the coalescing watermarks and the
    // database's clock. Every statement after this one sees every change committed before `now`
    // (READ COMMITTED takes a new snapshot per statement), so `now` is a safe watermark. A
    // watermark may be read from just before a lock was granted: at worst a job that could have
    // been coalesced is reconciled once more.
    let begin = match locking {
        Locking::Wait => include_str!("../sql/reconcile_begin.sql"),
        Locking::Try => include_str!("../sql/reconcile_begin_batch.sql"),
    };
    let keys: Vec<i64> = jobs
        .iter()
        .map(|j| prebuilds_schemas::locks::entity(j.preset_id))
        .collect();
    let ids: Vec<Uuid> = jobs.iter().map(|j| j.preset_id).collect();
    let rows = cached::query(&tx, begin, &[&keys, &ids]).await?;

    let mut attempts: Vec<Option<Attempt>> = vec![None; jobs.len()];
    let mut planned = HashSet::with_capacity(jobs.len());
    let mut to_plan: Vec<(usize, DateTime<Utc>)> = Vec::with_capacity(jobs.len());
    let (mut coalesced, mut unknown) = (0u64, 0u64);
    for row in rows {
        let index = usize::try_from(row.get::<_, i64>("position") - 1)
            .expect("positions come from WITH ORDINALITY and start at 1");
        let job = jobs[index];
        if !row.get::<_, bool>("locked") {
            attempts[index] = Some(Attempt::Alone);
            continue;
        }
        let watermark: Option<DateTime<Utc>> = row.get("watermark");
        // A preset twice in one batch: the first occurrence to be planned reads the snapshot
        // after both arrived, and answers both.
        if planned.contains(&job.preset_id)
            || watermark.is_some_and(|w| job.requested_at + COALESCE_MARGIN < w)
        {
            attempts[index] = Some(Attempt::Done(ReconcileOutcome::Coalesced));
            coalesced += 1;
            continue;
        }
        planned.insert(job.preset_id);
        to_plan.push((index, row.get("now")));
    }

    let wanted: Vec<Uuid> = to_plan.iter().map(|(i, _)| jobs[*i].preset_id).collect();
    let mut views: HashMap<Uuid, PresetView> = prebuilds_store::load_snapshots(&tx, &wanted)
        .await?
        .into_iter()
        .map(|view| (view.preset_id(), view))
        .collect();
    // One transaction, one database clock: every row's `now` is the same instant.
    if let Some((_, now)) = to_plan.first() {
        prebuilds_store::demand::attach_demand(&tx, views.values_mut(), *now, ctx.demand_time_unit)
            .await?;
    }
    let mut marked: Vec<Uuid> = Vec::with_capacity(to_plan.len());
    let mut marked_at: Vec<DateTime<Utc>> = Vec::with_capacity(to_plan.len());
    let mut outbox_rows = 0;
    let mut budget = CreateBudget::new(ctx.config.max_creates_per_pass);
    let mut follow_ups: Vec<Uuid> = Vec::new();
    let creates_need_global_lock = locking == Locking::Try && ctx.config.max_inflight_jobs > 0;
    for (index, now) in to_plan {
        let preset_id = jobs[index].preset_id;
        let Some(view) = views.remove(&preset_id) else {
            attempts[index] = Some(Attempt::Done(ReconcileOutcome::UnknownPreset));
            unknown += 1;
            continue;
        };
        let plan = plan_preset(&view, now, &ctx.config);
        if creates_need_global_lock
            && plan
                .actions
                .iter()
                .any(|a| matches!(a, prebuilds_core::Action::Create { count } if *count > 0))
        {
            attempts[index] = Some(Attempt::Alone);
            continue;
        }
        // Outside a batch the span is a child of the current one; in a batch it continues the
        // trace of this preset's own job.
        let span = tracing::info_span!(
            "reconcile.preset",
            preset_id = %preset_id,
            actions = plan.actions.len(),
        );
        if let Some(Some(trace)) = traces.get(index) {
            prebuilds_runtime::tracing_context::set_parent(&span, trace);
        }
        let report = tracing::Instrument::instrument(
            execute::execute(&tx, ctx, &view, &plan, now, &mut budget),
            span,
        )
        .await?;
        outbox_rows += report.outbox_rows;
        if report.deferred > 0 {
            follow_ups.push(preset_id);
        }
        marked.push(preset_id);
        marked_at.push(now);
        attempts[index] = Some(Attempt::Done(ReconcileOutcome::Reconciled(report)));
    }
    if !follow_ups.is_empty() {
        prebuilds_store::attention::request_reconciles(
            &tx,
            &follow_ups,
            ReconcileReason::Tick,
            &ctx.source,
        )
        .await?;
        outbox_rows += follow_ups.len() as u32;
    }
    if !marked.is_empty() {
        cached::execute(
            &tx,
            include_str!("../sql/record_watermarks.sql"),
            &[&marked, &marked_at],
        )
        .await?;
    }
    tx.commit().await?;

    if outbox_rows > 0 {
        ctx.outbox_waker.notify_one();
    }
    for attempt in attempts.iter().flatten() {
        if let Attempt::Done(ReconcileOutcome::Reconciled(report)) = attempt {
            report.count(&ctx.metrics);
        }
    }
    let jobs_total = &ctx.metrics.reconcile_jobs;
    jobs_total
        .with_label_values(&["coalesced"])
        .inc_by(coalesced);
    jobs_total
        .with_label_values(&["unknown_preset"])
        .inc_by(unknown);
    jobs_total
        .with_label_values(&["reconciled"])
        .inc_by(marked.len() as u64);
    let elapsed = started.elapsed().as_secs_f64();
    for _ in &marked {
        ctx.metrics.reconcile_duration.observe(elapsed);
    }
    Ok(attempts
        .into_iter()
        .map(|a| a.expect("the begin statement returns one row per job"))
        .collect())
}

/// The pure core's plan for one preset, with the log lines every reconcile writes.
fn plan_preset(view: &PresetView, now: DateTime<Utc>, config: &ReconcileConfig) -> Plan {
    let preset_id = view.preset_id();
    let plan = prebuilds_core::plan(&view.snapshot, now, config);
    if let DesiredSource::InvalidSchedules(e) = &plan.desired.source {
        tracing::error!(preset_id = %preset_id, error = %e, "invalid prebuild schedules; using the base instance count");
    }
    tracing::debug!(
        preset_id = %preset_id,
        template = %view.template_name,
        preset = %view.preset_name,
        state = ?plan.state,
        actions = ?plan.actions,
        "calculated reconciliation state for preset"
    );
    plan
}
