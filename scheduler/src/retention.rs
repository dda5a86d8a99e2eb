//! Retention, run by the leader only: the tables that grow with traffic are trimmed to a window
//! each, in bounded batches, so a deployment's database does not grow forever.
//!
//! The windows, what each guards and what can slip past it are in README "Retention"; the rows
//! each table loses are in `sql/retention_*.sql` (an open job keeps its log lines, a notification
//! with a delivery under way is kept).
//!
//! `off` keeps a table forever. Each pass deletes at most [`RETENTION_BATCH`] rows of a table per
//! transaction, repeating while a batch comes back full (at most [`MAX_BATCHES_PER_PASS`] per
//! table, so a first run over a large backlog shares the database with everything else). Time is
//! passed in ([`Retention::pass`] takes `now`) so tests need not wait; the loop passes the wall
//! clock. Counted in `prebuilds_scheduler_retention_deleted_total{table}`.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use prebuilds_runtime::db::DbError;
use tokio_util::sync::CancellationToken;

use crate::metrics::SchedulerMetrics;

/// Rows deleted per statement (and transaction).
pub const RETENTION_BATCH: i64 = 1000;
/// Batches per table in one pass; the rest waits for the next pass.
pub const MAX_BATCHES_PER_PASS: usize = 100;

/// A table under retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    ProcessedMessages,
    ClaimRequests,
    JobLogs,
    Notifications,
}

impl Table {
    pub const ALL: [Table; 4] = [
        Table::ProcessedMessages,
        Table::ClaimRequests,
        Table::JobLogs,
        Table::Notifications,
    ];

    /// The `table` label of the metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::ProcessedMessages => "processed_messages",
            Table::ClaimRequests => "claim_requests",
            Table::JobLogs => "provisioner_job_logs",
            Table::Notifications => "notification_messages",
        }
    }

    fn delete_sql(self) -> &'static str {
        match self {
            Table::ProcessedMessages => include_str!("sql/retention_processed_messages.sql"),
            Table::ClaimRequests => include_str!("sql/retention_claim_requests.sql"),
            Table::JobLogs => include_str!("sql/retention_job_logs.sql"),
            Table::Notifications => include_str!("sql/retention_notifications.sql"),
        }
    }
}

/// The windows (`None`: kept forever) and the pace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionConfig {
    pub processed_messages: Option<Duration>,
    pub claim_requests: Option<Duration>,
    pub job_logs: Option<Duration>,
    pub notifications: Option<Duration>,
    /// Time between passes.
    pub interval: Duration,
}

impl RetentionConfig {
    pub fn window(&self, table: Table) -> Option<Duration> {
        match table {
            Table::ProcessedMessages => self.processed_messages,
            Table::ClaimRequests => self.claim_requests,
            Table::JobLogs => self.job_logs,
            Table::Notifications => self.notifications,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retention {
    pub pool: Pool,
    pub config: RetentionConfig,
    pub metrics: SchedulerMetrics,
}

impl Retention {
    /// Deletes one batch of `table`'s rows older than its window at `now`; returns how many
    /// (0 when the table is kept forever).
    pub async fn batch(&self, table: Table, now: DateTime<Utc>) -> Result<u64, DbError> {
        let Some(window) = self.config.window(table) else {
            return Ok(0);
        };
        let window = chrono::TimeDelta::from_std(window).unwrap_or(chrono::TimeDelta::MAX);
        let cutoff = now
            .checked_sub_signed(window)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let client = self.pool.get().await?;
        let statement = client.prepare_cached(table.delete_sql()).await?;
        let deleted = client
            .execute(&statement, &[&cutoff, &RETENTION_BATCH])
            .await?;
        self.metrics
            .retention_deleted
            .with_label_values(&[table.as_str()])
            .inc_by(deleted);
        Ok(deleted)
    }

    /// One pass over every table at `now`: batches until one comes back short, bounded per
    /// table. Returns the rows deleted per table.
    #[tracing::instrument(name = "scheduler.retention", skip_all)]
    pub async fn pass(&self, now: DateTime<Utc>) -> Result<Vec<(Table, u64)>, DbError> {
        let mut deleted = Vec::new();
        for table in Table::ALL {
            let mut total = 0;
            for _ in 0..MAX_BATCHES_PER_PASS {
                let n = self.batch(table, now).await?;
                total += n;
                if n < RETENTION_BATCH as u64 {
                    break;
                }
            }
            deleted.push((table, total));
        }
        Ok(deleted)
    }

    /// A pass every interval until `term` ends.
    pub async fn run(self, term: CancellationToken) {
        loop {
            match self.pass(Utc::now()).await {
                Ok(deleted) => {
                    for (table, n) in deleted.into_iter().filter(|(_, n)| *n > 0) {
                        tracing::info!(
                            table = table.as_str(),
                            deleted = n,
                            "retention: deleted rows past the window"
                        );
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "retention pass failed; it tries again next interval")
                }
            }
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
    }
}
