//! The job reaper, run by the leader only (one per deployment): fails provisioner jobs that a
//! provisioner went silent on, so their prebuilds stop counting as "starting" forever and the pool
//! is refilled (docs/reconciliation.md; Coder's `jobreaper`).
//!
//! - a `running` job with no provisioner event for `PREBUILDS_JOB_HUNG_TIMEOUT` is failed with an
//!   error starting `hung:` (the provisioner died mid-build, or lost the broker for good);
//! - a `pending` job not started within `PREBUILDS_JOB_PENDING_TIMEOUT` is failed with an error
//!   starting `pending:` (its message was dead-lettered, or no provisioner serves its lane).
//!
//! The rule is one statement (`sql/reap_jobs.sql`), run in bounded batches, each in its own
//! transaction together with the reconcile requests for the reaped jobs' presets (outbox). A reaped
//! job is an ordinary failed build from then on: it counts toward backoff and the hard limit, and
//! events a provisioner sends for it later change nothing (the worker applies state events to open
//! jobs only and counts the rest as `stale`). A provisioner that later receives the job's message
//! refuses to run it, because the job is no longer pending (provisioner `handler`).
//!
//! Time is passed in ([`Reaper::pass`] takes `now`), so tests reap without waiting; the loop passes
//! `None`, the database's own clock, which is the clock `updated_at` is written with.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use prebuilds_core::JobStatus;
use prebuilds_runtime::db::DbError;
use prebuilds_schemas::{column::Parsed, ReconcileReason};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::SchedulerMetrics;

const REAP_SQL: &str = include_str!("sql/reap_jobs.sql");

/// Jobs failed per transaction. A backlog (a provisioner fleet that died with thousands of jobs
/// open) is worked off batch after batch, each transaction short.
pub const REAP_BATCH: i64 = 200;

/// The reaper's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaperConfig {
    pub hung_timeout: Duration,
    pub pending_timeout: Duration,
    /// Time between passes.
    pub interval: Duration,
}

impl ReaperConfig {
    /// Passes often enough that a job is reaped within a small fraction of its timeout, and never
    /// more than every few seconds (or less than twice a minute at the defaults).
    pub fn for_timeouts(hung_timeout: Duration, pending_timeout: Duration) -> Self {
        let interval = (hung_timeout.min(pending_timeout) / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        ReaperConfig {
            hung_timeout,
            pending_timeout,
            interval,
        }
    }
}

/// What a reaped job was when it was failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReapedKind {
    Hung,
    Pending,
}

impl ReapedKind {
    /// The `kind` label of `prebuilds_scheduler_jobs_reaped_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ReapedKind::Hung => "hung",
            ReapedKind::Pending => "pending",
        }
    }
}

/// One reaped job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub job_id: Uuid,
    pub kind: ReapedKind,
    pub preset_id: Option<Uuid>,
}

/// The error text of a reaped job; its first word is the contract (`hung:` / `pending:`).
pub fn reap_error(kind: ReapedKind, timeout: Duration) -> String {
    let timeout = humantime::format_duration(timeout);
    match kind {
        ReapedKind::Hung => format!(
            "hung: no provisioner event for {timeout} (PREBUILDS_JOB_HUNG_TIMEOUT); the job reaper \
             failed it: the provisioner running it died or lost its connections"
        ),
        ReapedKind::Pending => format!(
            "pending: not started by any provisioner within {timeout} \
             (PREBUILDS_JOB_PENDING_TIMEOUT); the job reaper failed it: check that a provisioner \
             serves its lane and the dead-letter queue"
        ),
    }
}

#[derive(Debug, Clone)]
pub struct Reaper {
    pub pool: Pool,
    pub config: ReaperConfig,
    pub metrics: SchedulerMetrics,
    /// CloudEvents `source` of the reconcile requests it writes.
    pub source: String,
}

impl Reaper {
    /// Reaps one batch at `now` (`None`: the database's clock) and returns what it failed.
    #[tracing::instrument(name = "scheduler.reaper", skip_all)]
    pub async fn pass(&self, now: Option<DateTime<Utc>>) -> Result<Vec<Reaped>, DbError> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        let rows = tx
            .query(
                REAP_SQL,
                &[
                    &now,
                    &self.config.hung_timeout.as_secs_f64(),
                    &self.config.pending_timeout.as_secs_f64(),
                    &REAP_BATCH,
                    &reap_error(ReapedKind::Hung, self.config.hung_timeout),
                    &reap_error(ReapedKind::Pending, self.config.pending_timeout),
                ],
            )
            .await?;
        let reaped: Vec<Reaped> = rows
            .iter()
            .map(|row| Reaped {
                job_id: row.get("job_id"),
                kind: match row.get::<_, Parsed<JobStatus>>("was").0 {
                    JobStatus::Pending => ReapedKind::Pending,
                    _ => ReapedKind::Hung,
                },
                preset_id: row.get("preset_id"),
            })
            .collect();
        let mut presets: Vec<Uuid> = reaped.iter().filter_map(|r| r.preset_id).collect();
        presets.sort_unstable();
        presets.dedup();
        prebuilds_store::attention::request_reconciles(
            &tx,
            &presets,
            ReconcileReason::JobCompleted,
            &self.source,
        )
        .await?;
        tx.commit().await?;
        for job in &reaped {
            self.metrics
                .jobs_reaped
                .with_label_values(&[job.kind.as_str()])
                .inc();
            tracing::warn!(job_id = %job.job_id, kind = job.kind.as_str(), preset_id = ?job.preset_id, "reaped a provisioner job");
        }
        Ok(reaped)
    }

    /// Reaps until a pass finds less than a full batch, then waits for the next interval; until
    /// `term` ends.
    pub async fn run(self, term: CancellationToken) {
        loop {
            loop {
                match self.pass(None).await {
                    Ok(reaped) if reaped.len() as i64 >= REAP_BATCH && !term.is_cancelled() => {
                        continue
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "the job reaper's pass failed; it tries again next interval");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_start_with_their_kind() {
        let hung = reap_error(ReapedKind::Hung, Duration::from_secs(600));
        assert!(hung.starts_with("hung: "), "{hung}");
        assert!(hung.contains("10m"), "{hung}");
        let pending = reap_error(ReapedKind::Pending, Duration::from_secs(1800));
        assert!(pending.starts_with("pending: "), "{pending}");
        assert!(pending.contains("30m"), "{pending}");
    }

    #[test]
    fn passes_are_a_fraction_of_the_shorter_timeout_within_bounds() {
        let defaults =
            ReaperConfig::for_timeouts(Duration::from_secs(600), Duration::from_secs(1800));
        assert_eq!(defaults.interval, Duration::from_secs(30));
        let short = ReaperConfig::for_timeouts(Duration::from_secs(20), Duration::from_secs(40));
        assert_eq!(short.interval, Duration::from_secs(2));
        let tiny = ReaperConfig::for_timeouts(Duration::from_secs(2), Duration::from_secs(2));
        assert_eq!(tiny.interval, Duration::from_secs(1));
    }
}
