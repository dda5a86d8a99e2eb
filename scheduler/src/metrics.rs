//! The scheduler's own metrics (leadership, passes, published jobs, metric refreshes), registered
//! on the process's one `Registry`. The pool-state series (`coderd_prebuilt_workspaces_*`) are
//! rendered by [`crate::pool_metrics::PoolCollector`] instead.
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `prebuilds_scheduler_is_leader` | gauge | — | 1 while this replica holds the leader lock |
//! | `prebuilds_scheduler_leader_terms_total` | counter | — | times this replica became leader |
//! | `prebuilds_scheduler_reconcile_jobs_published_total` | counter | `reason` | confirmed reconcile jobs |
//! | `prebuilds_scheduler_reconcile_jobs_failed_total` | counter | `reason` | jobs given up on within a pass |
//! | `prebuilds_scheduler_pass_duration_seconds` | histogram | `reason` | query + publish of one pass |
//! | `prebuilds_scheduler_last_pass_duration_seconds` | gauge | — | the latest `tick` pass |
//! | `prebuilds_scheduler_last_pass_jobs` | gauge | — | presets the latest `tick` pass published for |
//! | `prebuilds_scheduler_metrics_refresh_duration_seconds` | gauge | — | latest pool-state refresh |
//! | `prebuilds_scheduler_metrics_refresh_failures_total` | counter | — | failed pool-state refreshes |
//! | `prebuilds_scheduler_jobs_reaped_total` | counter | `kind` (`hung`, `pending`) | provisioner jobs the reaper failed |
//! | `prebuilds_scheduler_retention_deleted_total` | counter | `table` | rows deleted past their retention window |

use prometheus::{
    Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct SchedulerMetrics {
    pub is_leader: IntGauge,
    pub leader_terms: IntCounter,
    pub jobs_published: IntCounterVec,
    pub jobs_failed: IntCounterVec,
    pub pass_duration: HistogramVec,
    pub last_pass_duration: Gauge,
    pub last_pass_jobs: IntGauge,
    pub refresh_duration: Gauge,
    pub refresh_failures: IntCounter,
    pub jobs_reaped: IntCounterVec,
    pub retention_deleted: IntCounterVec,
}

impl SchedulerMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = SchedulerMetrics {
            is_leader: IntGauge::new(
                "prebuilds_scheduler_is_leader",
                "1 while this replica holds the leader lock, 0 while it stands by.",
            )?,
            leader_terms: IntCounter::new(
                "prebuilds_scheduler_leader_terms_total",
                "Times this replica became leader.",
            )?,
            jobs_published: IntCounterVec::new(
                Opts::new(
                    "prebuilds_scheduler_reconcile_jobs_published_total",
                    "Reconcile jobs published and confirmed by the broker, by reason.",
                ),
                &["reason"],
            )?,
            jobs_failed: IntCounterVec::new(
                Opts::new(
                    "prebuilds_scheduler_reconcile_jobs_failed_total",
                    "Reconcile jobs given up on within a pass (the next tick covers them), by reason.",
                ),
                &["reason"],
            )?,
            pass_duration: HistogramVec::new(
                HistogramOpts::new(
                    "prebuilds_scheduler_pass_duration_seconds",
                    "Duration of one publishing pass (query and confirmed publishes), by reason.",
                )
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]),
                &["reason"],
            )?,
            last_pass_duration: Gauge::new(
                "prebuilds_scheduler_last_pass_duration_seconds",
                "Duration of the latest tick pass.",
            )?,
            last_pass_jobs: IntGauge::new(
                "prebuilds_scheduler_last_pass_jobs",
                "Presets the latest tick pass published a job for.",
            )?,
            refresh_duration: Gauge::new(
                "prebuilds_scheduler_metrics_refresh_duration_seconds",
                "Duration of the latest pool-state metrics refresh.",
            )?,
            refresh_failures: IntCounter::new(
                "prebuilds_scheduler_metrics_refresh_failures_total",
                "Pool-state metrics refreshes that failed (the previous values stay).",
            )?,
            jobs_reaped: IntCounterVec::new(
                Opts::new(
                    "prebuilds_scheduler_jobs_reaped_total",
                    "Provisioner jobs failed by the job reaper, by kind (hung: running and silent; pending: never started).",
                ),
                &["kind"],
            )?,
            retention_deleted: IntCounterVec::new(
                Opts::new(
                    "prebuilds_scheduler_retention_deleted_total",
                    "Rows deleted because they were past their table's retention window, by table.",
                ),
                &["table"],
            )?,
        };
        registry.register(Box::new(m.retention_deleted.clone()))?;
        registry.register(Box::new(m.jobs_reaped.clone()))?;
        registry.register(Box::new(m.is_leader.clone()))?;
        registry.register(Box::new(m.leader_terms.clone()))?;
        registry.register(Box::new(m.jobs_published.clone()))?;
        registry.register(Box::new(m.jobs_failed.clone()))?;
        registry.register(Box::new(m.pass_duration.clone()))?;
        registry.register(Box::new(m.last_pass_duration.clone()))?;
        registry.register(Box::new(m.last_pass_jobs.clone()))?;
        registry.register(Box::new(m.refresh_duration.clone()))?;
        registry.register(Box::new(m.refresh_failures.clone()))?;
        Ok(m)
    }
}
