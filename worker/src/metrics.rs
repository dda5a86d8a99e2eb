//! The worker's own metrics (docs/metrics.md "Worker"), registered on the process registry.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    /// `coderd_prebuilds_reconciliation_duration_seconds`: one observation per preset job.
    pub reconcile_duration: Histogram,
    /// `prebuilds_reconcile_jobs_total{result}`: reconciled, coalesced, unknown_preset.
    pub reconcile_jobs: IntCounterVec,
    /// `prebuilds_reconcile_actions_total{action}`: prebuilds created / deleted / canceled.
    pub reconcile_actions: IntCounterVec,
    /// `coderd_prebuilt_workspace_claim_duration_seconds{organization_name,template_name,preset_name}`:
    /// claim request received → reply sent.
    pub claim_duration: HistogramVec,
    /// `prebuilds_claims_total{outcome}`.
    pub claims: IntCounterVec,
    /// `coderd_prebuilt_workspaces_claims_total{template_name,preset_name,organization_name,outcome}`:
    /// warm hits (`hit`: a prebuild was claimed) and cold misses (`miss`: no eligible prebuild for
    /// a known, active preset). Retried requests answered from the record are not counted again.
    pub claims_by_preset: IntCounterVec,
    /// `coderd_prebuilt_workspaces_resource_replacements_total{template_name,preset_name,organization_name}`.
    pub resource_replacements: IntCounterVec,
    /// `prebuilds_provisioner_events_total{kind,result}`: applied, duplicate, stale, not_owner
    /// (sent by another broker user than the one that started the job: recorded, ignored).
    pub provisioner_events: IntCounterVec,
    /// `prebuilds_replenish_latency_seconds`: a claim's reconcile request → its replacement's
    /// create committed (the outbox relay publishes it right after).
    pub replenish_latency: Histogram,
}

impl WorkerMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reconcile_duration = Histogram::with_opts(HistogramOpts::new(
            "coderd_prebuilds_reconciliation_duration_seconds",
            "Duration of one preset's reconcile job (lock, snapshot, plan, execute, commit).",
        ))?;
        let reconcile_jobs = IntCounterVec::new(
            Opts::new(
                "prebuilds_reconcile_jobs_total",
                "Reconcile jobs by result.",
            ),
            &["result"],
        )?;
        let reconcile_actions = IntCounterVec::new(
            Opts::new(
                "prebuilds_reconcile_actions_total",
                "Prebuild operations queued by reconciles, by action.",
            ),
            &["action"],
        )?;
        let claim_duration = HistogramVec::new(
            HistogramOpts::new(
                "coderd_prebuilt_workspace_claim_duration_seconds",
                "Time from a claim request's arrival to its reply.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["organization_name", "template_name", "preset_name"],
        )?;
        let claims = IntCounterVec::new(
            Opts::new(
                "prebuilds_claims_total",
                "Claim requests answered, by outcome.",
            ),
            &["outcome"],
        )?;
        let claims_by_preset = IntCounterVec::new(
            Opts::new(
                "coderd_prebuilt_workspaces_claims_total",
                "Claims per preset: hit = a prebuilt workspace was claimed, miss = none was eligible.",
            ),
            &["template_name", "preset_name", "organization_name", "outcome"],
        )?;
        let resource_replacements = IntCounterVec::new(
            Opts::new(
                "coderd_prebuilt_workspaces_resource_replacements_total",
                "Claims whose build replaced resources of the prebuilt workspace.",
            ),
            &["template_name", "preset_name", "organization_name"],
        )?;
        let provisioner_events = IntCounterVec::new(
            Opts::new(
                "prebuilds_provisioner_events_total",
                "Provisioner events by kind and result.",
            ),
            &["kind", "result"],
        )?;
        let replenish_latency = Histogram::with_opts(
            HistogramOpts::new(
                "prebuilds_replenish_latency_seconds",
                "Time from a claim's reconcile request to its replacement prebuild being queued.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
            ]),
        )?;
        registry.register(Box::new(replenish_latency.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(reconcile_jobs.clone()))?;
        registry.register(Box::new(reconcile_actions.clone()))?;
        registry.register(Box::new(claim_duration.clone()))?;
        registry.register(Box::new(claims.clone()))?;
        registry.register(Box::new(claims_by_preset.clone()))?;
        registry.register(Box::new(resource_replacements.clone()))?;
        registry.register(Box::new(provisioner_events.clone()))?;
        Ok(WorkerMetrics {
            reconcile_duration,
            reconcile_jobs,
            reconcile_actions,
            claim_duration,
            claims,
            claims_by_preset,
            resource_replacements,
            provisioner_events,
            replenish_latency,
        })
    }
}
