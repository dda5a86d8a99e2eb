//! Worker configuration: connection, service and reconcile settings plus concurrency.

use clap::Parser;
use prebuilds_runtime::config::{ConnectionArgs, ReconcileArgs, ServiceArgs};

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

    /// Deliveries handled at once per queue (the prefetch of each consumer).
    #[arg(long, env = "PREBUILDS_WORKER_CONCURRENCY", default_value_t = 8)]
    pub worker_concurrency: u16,
}

impl WorkerArgs {
    pub fn validate(&self) -> Result<(), String> {
        self.reconcile.validate()?;
        if self.worker_concurrency == 0 {
            return Err("PREBUILDS_WORKER_CONCURRENCY must be at least 1".into());
        }
        Ok(())
    }

    /// Handlers beyond the pool size wait for a connection (bounded by the pool's wait timeout);
    /// that throttles rather than fails, but deserves a word at start-up.
    pub fn pool_size_warning(&self) -> Option<String> {
        let needed = 3 * self.worker_concurrency as usize + 2;
        (self.connection.db_pool_size < needed).then(|| {
            format!(
                "PREBUILDS_DB_POOL_SIZE ({}) is below the {needed} connections PREBUILDS_WORKER_CONCURRENCY ({}) can use at once; handlers will queue for connections",
                self.connection.db_pool_size, self.worker_concurrency
            )
        })
    }

    pub fn core_config(&self) -> prebuilds_core::ReconcileConfig {
        let delta = |d: std::time::Duration| {
            chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
        };
        prebuilds_core::ReconcileConfig {
            backoff_interval: delta(self.reconcile.backoff_interval),
            backoff_lookback: delta(self.reconcile.backoff_lookback),
            failure_hard_limit: self.reconcile.failure_hard_limit,
        }
    }
}
