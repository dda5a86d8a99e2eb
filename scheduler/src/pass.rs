//! One publishing pass: read the global pause and the presets needing attention (one query), then
//! publish one reconcile job per preset. Used by the tick loop (reason `tick`) and by the settings
//! watcher (reason `settings_changed`).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use prebuilds_runtime::db::DbError;
use prebuilds_schemas::ReconcileReason;
use prebuilds_store::{attention, settings};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    jobs::{Batch, BatchOutcome, JobPublisher},
    metrics::SchedulerMetrics,
    pool_metrics::PoolState,
};

/// Longest the database part of a pass may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// How a pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassOutcome {
    /// Reconciliation is globally paused: nothing was published.
    Paused,
    /// Jobs were published (some may have failed; see the counts).
    Published(BatchOutcome),
    /// The term ended before the pass finished.
    Interrupted,
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("reading presets: {0}")]
    Db(#[from] DbError),
    #[error("reading presets took longer than {0:?}")]
    Timeout(Duration),
}

/// Everything a pass needs; cheap to clone.
#[derive(Debug, Clone)]
pub struct Passes {
    pub pool: Pool,
    pub jobs: JobPublisher,
    pub metrics: SchedulerMetrics,
    pub pool_state: PoolState,
}

struct Work {
    paused: bool,
    requested_at: DateTime<Utc>,
    presets: Vec<Uuid>,
}

impl Passes {
    /// Runs one pass with `reason`; `epoch` goes into the job ids (the tick index for `tick`).
    #[tracing::instrument(name = "scheduler.pass", skip_all, fields(reason = reason.as_str(), epoch))]
    pub async fn run(
        &self,
        reason: ReconcileReason,
        epoch: i64,
        term: &CancellationToken,
    ) -> Result<PassOutcome, PassError> {
        let started = Instant::now();
        let read = tokio::time::timeout(
            QUERY_TIMEOUT,
            prebuilds_runtime::retry::with_retries(|| self.read()),
        );
        let work = tokio::select! {
            _ = term.cancelled() => return Ok(PassOutcome::Interrupted),
            r = read => r.map_err(|_| PassError::Timeout(QUERY_TIMEOUT))??,
        };
        self.pool_state.set_paused(work.paused);
        if work.paused {
            tracing::info!(
                reason = reason.as_str(),
                "prebuilds reconciliation is paused; publishing nothing"
            );
            return Ok(PassOutcome::Paused);
        }
        let batch = Batch {
            reason,
            epoch,
            requested_at: work.requested_at,
        };
        let outcome = self.jobs.publish(&work.presets, batch, term).await;
        let elapsed = started.elapsed();
        self.metrics
            .pass_duration
            .with_label_values(&[reason.as_str()])
            .observe(elapsed.as_secs_f64());
        if reason == ReconcileReason::Tick {
            self.metrics.last_pass_duration.set(elapsed.as_secs_f64());
            self.metrics.last_pass_jobs.set(outcome.published as i64);
        }
        if outcome.interrupted {
            tracing::info!(
                reason = reason.as_str(),
                published = outcome.published,
                "pass interrupted: no longer leading or shutting down"
            );
            return Ok(PassOutcome::Interrupted);
        }
        if outcome.failed > 0 {
            tracing::error!(
                reason = reason.as_str(),
                published = outcome.published,
                failed = outcome.failed,
                elapsed_ms = elapsed.as_millis() as u64,
                "published reconcile jobs; some were not confirmed (the next tick retries them)"
            );
        } else {
            tracing::info!(
                reason = reason.as_str(),
                epoch,
                published = outcome.published,
                elapsed_ms = elapsed.as_millis() as u64,
                "published reconcile jobs"
            );
        }
        Ok(PassOutcome::Published(outcome))
    }

    /// Pause flag, the database's clock and the presets, on one pooled connection.
    async fn read(&self) -> Result<Work, DbError> {
        let client = self.pool.get().await?;
        let paused = settings::reconciliation_paused(&client).await?;
        if paused {
            return Ok(Work {
                paused,
                requested_at: Utc::now(),
                presets: Vec::new(),
            });
        }
        let requested_at: DateTime<Utc> = client
            .query_one("SELECT clock_timestamp()", &[])
            .await?
            .get(0);
        let presets = attention::presets_needing_attention(&client).await?;
        Ok(Work {
            paused,
            requested_at,
            presets,
        })
    }
}
