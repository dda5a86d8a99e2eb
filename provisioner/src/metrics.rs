//! The provisioner's own metrics, registered on the process registry next to the shared
//! `ServiceMetrics` (messages by queue and outcome, dead letters). Labels are bounded: transition
//! and status only, never a job, workspace or preset id.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `prebuilds_provisioner_jobs_total` | counter: jobs executed (not replayed) | `transition`, `status` |
//! | `prebuilds_provisioner_jobs_replayed_total` | counter: redelivered jobs answered from memory | |
//! | `prebuilds_provisioner_job_duration_seconds` | histogram: job_started → job_completed | `transition` |
//! | `prebuilds_provisioner_jobs_in_flight` | gauge: jobs executing now | |
//! | `prebuilds_provisioner_jobs_refused_total` | counter: deliveries not run (`admission`) | `reason` |
//! | `prebuilds_provisioner_heartbeats_total` | counter: progress lines sent for running jobs | |

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct ProvisionerMetrics {
    pub jobs: IntCounterVec,
    pub replayed: IntCounter,
    pub duration: HistogramVec,
    pub in_flight: IntGauge,
    pub refused: IntCounterVec,
    pub heartbeats: IntCounter,
}

impl ProvisionerMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let jobs = IntCounterVec::new(
            Opts::new(
                "prebuilds_provisioner_jobs_total",
                "Provisioner jobs executed, by transition and final status.",
            ),
            &["transition", "status"],
        )?;
        let replayed = IntCounter::new(
            "prebuilds_provisioner_jobs_replayed_total",
            "Redelivered jobs answered by republishing their recorded events instead of running again.",
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "prebuilds_provisioner_job_duration_seconds",
                "Time from job_started to job_completed.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
            ]),
            &["transition"],
        )?;
        let in_flight = IntGauge::new(
            "prebuilds_provisioner_jobs_in_flight",
            "Provisioner jobs executing now.",
        )?;
        let refused = IntCounterVec::new(
            Opts::new(
                "prebuilds_provisioner_jobs_refused_total",
                "Delivered jobs not run because of their database row (unknown_job, already_running, already_succeeded, already_failed).",
            ),
            &["reason"],
        )?;
        let heartbeats = IntCounter::new(
            "prebuilds_provisioner_heartbeats_total",
            "Progress log lines sent for running jobs, so the job reaper does not take them for hung.",
        )?;
        registry.register(Box::new(refused.clone()))?;
        registry.register(Box::new(heartbeats.clone()))?;
        registry.register(Box::new(jobs.clone()))?;
        registry.register(Box::new(replayed.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(ProvisionerMetrics {
            jobs,
            replayed,
            duration,
            in_flight,
            refused,
            heartbeats,
        })
    }
}
