//! Worker configuration: connection, service and reconcile settings plus concurrency.

use clap::Parser;
use std::time::Duration;

use prebuilds_runtime::config::{
    parse_duration, time_delta, ConnectionArgs, ReconcileArgs, ServiceArgs,
};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "prebuilds-worker",
    version,
    about = "Consumes reconcile jobs, provisioner events and claim requests; keeps prebuild pools at their desired size."
)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub service: ServiceArgs,

    #[command(flatten)]
    pub reconcile: ReconcileArgs,

    /// Reconcile transactions and provisioner events handled at once.
    #[arg(long, env = "PREBUILDS_WORKER_CONCURRENCY", default_value_t = 8)]
    pub worker_concurrency: u16,

    /// Most presets reconciled in one transaction. Reconcile jobs waiting at the same moment share
    /// a transaction, so a full pass over many presets costs a few statements per batch instead of
    /// per preset. 1 turns batching off.
    #[arg(long, env = "PREBUILDS_RECONCILE_BATCH_SIZE", default_value_t = 32)]
    pub reconcile_batch_size: u16,

    /// Least time between the starts of two reconciles of one preset in this worker while jobs
    /// for it keep coming (a stream of claims); jobs arriving meanwhile share the next reconcile.
    /// Bounds how often a large pool is re-read; adds at most this much to replenish latency.
    #[arg(long, env = "PREBUILDS_RECONCILE_SPACING", default_value = "100ms", value_parser = parse_duration)]
    pub reconcile_spacing: Duration,

    /// Claim requests handled at once. Claims are short transactions and the latency users feel,
    /// so they get their own, larger budget.
    #[arg(long, env = "PREBUILDS_CLAIM_CONCURRENCY", default_value_t = 16)]
    pub claim_concurrency: u16,
    /// Broker users allowed to send claim requests, comma-separated (their AMQP `user_id`, which
    /// RabbitMQ validates); a request from anyone else, or without `user_id`, gets a `forbidden`
    /// reply and is dead-lettered. Empty: anyone who may publish to the exchange.
    #[arg(long, env = "PREBUILDS_CLAIM_PUBLISHERS", default_value = "")]
    pub claim_publishers: String,
    /// Broker users allowed to send provisioner events, comma-separated (as
    /// `PREBUILDS_CLAIM_PUBLISHERS`); other events are dead-lettered unapplied. Empty: anyone.
    #[arg(long, env = "PREBUILDS_PROVISIONER_PUBLISHERS", default_value = "")]
    pub provisioner_publishers: String,
}

impl WorkerArgs {
    pub fn validate(&self) -> Result<(), String> {
        self.connection.resolve().map_err(|e| e.0)?;
        self.reconcile.validate()?;
        if self.worker_concurrency == 0 {
            return Err("PREBUILDS_WORKER_CONCURRENCY must be at least 1".into());
        }
        if self.claim_concurrency == 0 {
            return Err("PREBUILDS_CLAIM_CONCURRENCY must be at least 1".into());
        }
        if self.reconcile_batch_size == 0 {
            return Err("PREBUILDS_RECONCILE_BATCH_SIZE must be at least 1".into());
        }
        Ok(())
    }

    /// Handlers beyond the pool size wait for a connection (bounded by the pool's wait timeout);
    /// that throttles rather than fails, but deserves a word at start-up.
    pub fn pool_size_warning(&self) -> Option<String> {
        let needed = 2 * self.worker_concurrency as usize + self.claim_concurrency as usize + 2;
        (self.connection.db_pool_size < needed).then(|| {
            format!(
                "PREBUILDS_DB_POOL_SIZE ({}) is below the {needed} connections that PREBUILDS_WORKER_CONCURRENCY ({}) and PREBUILDS_CLAIM_CONCURRENCY ({}) can use at once; handlers will queue for connections",
                self.connection.db_pool_size, self.worker_concurrency, self.claim_concurrency
            )
        })
    }

    /// Reconcile jobs taken from the queue at once: enough to fill every transaction's batch.
    pub fn reconcile_prefetch(&self) -> u16 {
        self.worker_concurrency
            .saturating_mul(self.reconcile_batch_size)
    }

    /// Provisioner events taken from the queue at once: a few per transaction slot, so that while
    /// one job's events wait for each other, other jobs' events are at hand.
    pub fn events_prefetch(&self) -> u16 {
        self.worker_concurrency.saturating_mul(4)
    }

    pub fn core_config(&self) -> prebuilds_core::ReconcileConfig {
        let r = &self.reconcile;
        r.rules.apply(prebuilds_core::ReconcileConfig {
            max_inflight_jobs: r.max_inflight_jobs,
            max_inflight_per_preset: r.max_inflight_per_preset,
            max_creates_per_pass: r.max_creates_per_pass,
            failed_retention: r.failed_retention.map(time_delta),
            failed_keep: r.failed_keep,
            ..prebuilds_core::ReconcileConfig::default()
        })
    }
}
