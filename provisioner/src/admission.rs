//! Whether a delivered job may run, from its `provisioner_jobs` row: the one rule
//! ([`admit`]) and the read behind it (`sql/job_state.sql`), plus the watch on a running job
//! ([`JobStates::cancel_requested`]).
//!
//! A job's message and its row can disagree: the reconciler cancels a pending create while its
//! message is queued; the job reaper fails a job nobody started in time; an outbox relay that
//! crashed before marking a message published sends it again while the job already runs; a forged
//! or stray message names no job at all. Running such a job would provision infrastructure nobody
//! wants (or provision it twice), so:
//!
//! | row | delivery | decision |
//! |---|---|---|
//! | none | any | refuse, dead-lettered: `unknown_job` |
//! | `pending` | any | run |
//! | `canceled`, `canceling`, or a cancel recorded (`canceled_at`) before it started | any | complete `canceled` without running |
//! | `running` | redelivered (the attempt that started it died) | run again (same event ids) |
//! | `running` | first delivery (a duplicate publish) | refuse, acknowledged: `already_running` |
//! | `succeeded`, `failed` | any | refuse, acknowledged: `already_<status>` |
//!
//! Only a provisioner with database access can tell ([`JobStates`]): the terraform backend always
//! has it; the simulation has it when `DATABASE_URL` is given, and otherwise runs what it receives.

use deadpool_postgres::Pool;
use prebuilds_core::JobStatus;
use prebuilds_schemas::column::Parsed;
use uuid::Uuid;

use crate::backend::RunError;

const JOB_STATE_SQL: &str = include_str!("sql/job_state.sql");

/// A job's row, as far as admission is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub job_status: JobStatus,
    /// A cancel was recorded (`canceled_at`), whatever the status says.
    pub cancel_requested: bool,
}

/// What to do with a delivered job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Run,
    /// Complete it `canceled` without running anything; `job_status` says why.
    Canceled {
        job_status: JobStatus,
    },
    /// Do not run it. `permanent`: dead-letter with `reason` (the message names no job); otherwise
    /// acknowledge it (a late duplicate of a job that is running or done).
    Refuse {
        reason: String,
        permanent: bool,
    },
}

/// The admission rule (see the table in the module documentation).
pub fn admit(state: Option<&JobState>, redelivered: bool) -> Admission {
    let Some(state) = state else {
        return Admission::Refuse {
            reason: "unknown_job".to_owned(),
            permanent: true,
        };
    };
    let job_status = state.job_status;
    match job_status {
        JobStatus::Canceling | JobStatus::Canceled => Admission::Canceled { job_status },
        JobStatus::Pending if state.cancel_requested => Admission::Canceled { job_status },
        JobStatus::Pending => Admission::Run,
        JobStatus::Running if redelivered => Admission::Run,
        JobStatus::Running | JobStatus::Succeeded | JobStatus::Failed => Admission::Refuse {
            reason: format!("already_{job_status}"),
            permanent: false,
        },
    }
}

/// Reads job rows (the provisioner role's `SELECT` on `provisioner_jobs`).
#[derive(Debug, Clone)]
pub struct JobStates {
    pool: Pool,
}

impl JobStates {
    pub fn new(pool: Pool) -> Self {
        JobStates { pool }
    }

    /// The row of `job_id`, if any. Every database failure is transient: the job is retried,
    /// never run unchecked.
    pub async fn get(&self, job_id: Uuid) -> Result<Option<JobState>, RunError> {
        let client = self.pool.get().await.map_err(|e| {
            RunError::Transient(anyhow::anyhow!(
                "reading the job's state: PostgreSQL pool: {e}"
            ))
        })?;
        let row = client
            .query_opt(JOB_STATE_SQL, &[&job_id])
            .await
            .map_err(|e| RunError::Transient(anyhow::anyhow!("reading the job's state: {e}")))?;
        Ok(row.map(|row| JobState {
            job_status: row.get::<_, Parsed<JobStatus>>("job_status").0,
            cancel_requested: row.get("cancel_requested"),
        }))
    }

    /// Whether a cancel of the running job was requested (`prebuildsctl jobs cancel` moves a
    /// running job to `canceling`). A failed read is "no": the build goes on, and the next poll
    /// asks again.
    pub async fn cancel_requested(&self, job_id: Uuid) -> bool {
        match self.get(job_id).await {
            Ok(Some(state)) => {
                matches!(state.job_status, JobStatus::Canceling | JobStatus::Canceled)
            }
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(%job_id, error = %e, "cannot check the running job for a cancel");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: &str, cancel: bool) -> JobState {
        JobState {
            job_status: status.parse().unwrap(),
            cancel_requested: cancel,
        }
    }

    fn refused(reason: &str, permanent: bool) -> Admission {
        Admission::Refuse {
            reason: reason.to_owned(),
            permanent,
        }
    }

    #[test]
    fn the_admission_table() {
        let canceled = |s: &str| Admission::Canceled {
            job_status: s.parse().unwrap(),
        };
        let cases = [
            (None, false, refused("unknown_job", true)),
            (None, true, refused("unknown_job", true)),
            (Some(state("pending", false)), false, Admission::Run),
            (Some(state("pending", false)), true, Admission::Run),
            (Some(state("pending", true)), false, canceled("pending")),
            (Some(state("canceled", true)), false, canceled("canceled")),
            (Some(state("canceling", false)), true, canceled("canceling")),
            (Some(state("running", false)), true, Admission::Run),
            (
                Some(state("running", false)),
                false,
                refused("already_running", false),
            ),
            (
                Some(state("succeeded", false)),
                true,
                refused("already_succeeded", false),
            ),
            (
                Some(state("failed", false)),
                false,
                refused("already_failed", false),
            ),
        ];
        for (row, redelivered, expected) in cases {
            assert_eq!(
                admit(row.as_ref(), redelivered),
                expected,
                "{row:?}, redelivered {redelivered}"
            );
        }
    }
}
