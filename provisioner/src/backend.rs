//! What a backend returns, and the dispatch between the two backends. A backend executes the build
//! part of a job (between `job_started` and `job_completed`): it streams log lines and, for start
//! builds, emits the `plan_result` through the [`Emitter`]; the handler does the rest (admission
//! included: `admission`).

use std::time::Duration;

use prebuilds_schemas::ProvisionerJob;
use tokio_util::sync::CancellationToken;

use crate::{events::Emitter, sim::SimBackend, terraform::TerraformBackend};

/// How the build ended. A failure is an outcome (reported as `job_completed` `failed`), not an
/// error of this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildResult {
    /// The build succeeded; `agents` are the agents it created (start builds only).
    Succeeded { agents: Vec<String> },
    /// The build failed with this error text.
    Failed { error: String },
}

/// Why a build produced no outcome: the job must be retried (redelivered), not reported.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The build was interrupted: by shutdown (the job is redelivered) or by a cancel of the
    /// running job (the handler completes it `canceled`).
    #[error("interrupted; the job will be redelivered")]
    Aborted,
    /// A dependency (the database) is unavailable.
    #[error("{0:#}")]
    Transient(anyhow::Error),
}

#[derive(Debug)]
pub enum Backend {
    Sim(SimBackend),
    Terraform(TerraformBackend),
}

impl Backend {
    pub async fn run(
        &self,
        job: &ProvisionerJob,
        emitter: &mut Emitter,
        stop: &CancellationToken,
    ) -> Result<BuildResult, RunError> {
        match self {
            Backend::Sim(sim) => sim.run(job, emitter, stop).await,
            Backend::Terraform(tf) => tf.run(job, emitter, stop).await,
        }
    }

    /// Delay between an agent's `starting` and `ready`.
    pub fn agent_ready_delay(&self) -> Duration {
        match self {
            Backend::Sim(sim) => sim.config().agent_ready_delay,
            // A real agent would connect after apply; terraform_data has none to wait for.
            Backend::Terraform(_) => Duration::ZERO,
        }
    }
}

/// Sleeps for `delay`, or returns [`RunError::Aborted`] as soon as `stop` fires.
pub async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> Result<(), RunError> {
    if delay.is_zero() {
        return Ok(());
    }
    tokio::select! {
        _ = tokio::time::sleep(delay) => Ok(()),
        _ = stop.cancelled() => Err(RunError::Aborted),
    }
}

/// The row, if any, that `sql` returns for `id`; `doing` names the step in the error. Every
/// database failure (the pool's included) is transient: the job is retried, never failed or run
/// unchecked, because of an outage.
pub async fn query_by_id(
    pool: &deadpool_postgres::Pool,
    sql: &str,
    id: uuid::Uuid,
    doing: &'static str,
) -> Result<Option<deadpool_postgres::tokio_postgres::Row>, RunError> {
    let client = pool.get().await.map_err(|e| {
        RunError::Transient(anyhow::anyhow!(
            "{doing}: PostgreSQL pool: {}",
            prebuilds_runtime::db::describe_pool(&e)
        ))
    })?;
    client.query_opt(sql, &[&id]).await.map_err(|e| {
        RunError::Transient(anyhow::anyhow!(
            "{doing}: {}",
            prebuilds_runtime::db::describe_postgres(&e)
        ))
    })
}
