//! `reconcile.preset` jobs. One job = one transaction:
//!
//! 1. take the preset's transaction-level advisory lock (per-preset serialization across workers);
//! 2. coalesce: if a reconcile of this preset read its snapshot well after this job was requested,
//!    that reconcile already saw everything the job could ask for — commit and stop;
//! 3. read the snapshot (`prebuilds_store::load_snapshots`) and the database clock;
//! 4. plan with the pure core; execute the actions ([`execute`]) in the same transaction, writing
//!    provisioner jobs to the outbox;
//! 5. record the watermark, commit, wake the outbox relay.
//!
//! Jobs are level-triggered ("look at preset X now"), so duplicates and reordering are harmless.

pub mod execute;
pub mod single_flight;

use std::{sync::Arc, time::Instant};

use chrono::{DateTime, TimeDelta, Utc};
use deadpool_postgres::Pool;
use prebuilds_core::{DesiredSource, ReconcileConfig};
use prebuilds_runtime::{
    amqp::{consumer::Incoming, Handler, HandlerError},
    db::DbError,
};
use prebuilds_schemas::{CloudEvent, RawEvent, ReconcilePreset, ReconcileReason};
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
    pub in_flight: single_flight::SingleFlight,
}

impl ReconcileHandler {
    pub fn new(context: ReconcileContext) -> Self {
        ReconcileHandler {
            context,
            in_flight: single_flight::SingleFlight::default(),
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
        let flight = self
            .in_flight
            .run(job.preset_id, || {
                reconcile_preset(&self.context, job.preset_id, job.requested_at)
            })
            .await;
        let outcome = match flight {
            Ok(single_flight::Flight::Ran(outcome)) => Ok(outcome),
            Ok(single_flight::Flight::Coalesced) => {
                self.context
                    .metrics
                    .reconcile_jobs
                    .with_label_values(&["coalesced"])
                    .inc();
                Ok(ReconcileOutcome::Coalesced)
            }
            Err(e) => Err(e),
        };
        match outcome {
            Ok(ReconcileOutcome::UnknownPreset) => Err(HandlerError::permanent(
                "unknown_id",
                format!("unknown preset {}", job.preset_id),
            )),
            Ok(ReconcileOutcome::Reconciled(report)) => {
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
            Ok(ReconcileOutcome::Coalesced) => Ok(()),
            Err(e) => Err(HandlerError::Transient(e.into())),
        }
    }
}

/// Reconciles one preset (see the module doc for the algorithm).
pub async fn reconcile_preset(
    ctx: &ReconcileContext,
    preset_id: Uuid,
    requested_at: DateTime<Utc>,
) -> Result<ReconcileOutcome, DbError> {
    let started = Instant::now();
    let mut client = ctx.pool.get().await?;
    let tx = client.transaction().await?;
    // One round trip: wait for the preset's lock, then read the coalescing watermark and the
    // database's clock. Every statement after this one sees every change committed before `now`
    // (READ COMMITTED takes a new snapshot per statement), so `now` is a safe watermark. The
    // watermark itself may be read from just before the lock was granted: at worst a job that
    // could have been coalesced is reconciled once more.
    let begin = tx
        .prepare_cached(include_str!("../sql/reconcile_begin.sql"))
        .await?;
    let row = tx
        .query_one(
            &begin,
            &[&prebuilds_store::lock::lock_key(preset_id), &preset_id],
        )
        .await?;
    let watermark: Option<DateTime<Utc>> = row.get("watermark");
    let now: DateTime<Utc> = row.get("now");
    if watermark.is_some_and(|w| requested_at + COALESCE_MARGIN < w) {
        tx.commit().await?;
        ctx.metrics
            .reconcile_jobs
            .with_label_values(&["coalesced"])
            .inc();
        return Ok(ReconcileOutcome::Coalesced);
    }

    let Some(view) = prebuilds_store::load_snapshots(&tx, &[preset_id])
        .await?
        .into_iter()
        .next()
    else {
        tx.commit().await?;
        ctx.metrics
            .reconcile_jobs
            .with_label_values(&["unknown_preset"])
            .inc();
        return Ok(ReconcileOutcome::UnknownPreset);
    };

    let plan = prebuilds_core::plan(&view.snapshot, now, &ctx.config);
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

    let report = execute::execute(&tx, ctx, &view, &plan, now).await?;

    let watermark = tx
        .prepare_cached(
            "INSERT INTO preset_reconcile_state (preset_id, last_reconciled_at) VALUES ($1, $2)
             ON CONFLICT (preset_id) DO UPDATE SET last_reconciled_at = EXCLUDED.last_reconciled_at",
        )
        .await?;
    tx.execute(&watermark, &[&preset_id, &now]).await?;
    tx.commit().await?;

    if report.outbox_rows > 0 {
        ctx.outbox_waker.notify_one();
    }
    ctx.metrics
        .reconcile_jobs
        .with_label_values(&["reconciled"])
        .inc();
    ctx.metrics
        .reconcile_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(ReconcileOutcome::Reconciled(report))
}
