//! The job handler plugged into the shared consumer supervisor. For one delivery of
//! `prebuilds.provisioner.job.v1`:
//!
//! 1. Decode the envelope and payload strictly; a failure is permanent (the supervisor
//!    dead-letters the message with the reason).
//! 2. Take the job's in-process lock, so a duplicate delivery waits for the first one.
//! 3. If this process already finished the job, republish its recorded events (same ids, same
//!    content) and stop: a job is never executed twice here.
//! 4. If the backend can read the job's `provisioner_jobs` row (terraform) and the job was canceled
//!    or is being canceled, do not run it: a `job_log` line saying so, then `job_completed`
//!    `canceled` (no `job_started`: it never started). The reconciler cancels a pending create in
//!    the database while its message may still be queued; running it would provision real
//!    infrastructure for a workspace that is already orphan-deleted. The worker applies that
//!    completion as a no-op to a `canceled` job and finishes a `canceling` one. It is recorded like
//!    any outcome (step 6), so a duplicate delivery republishes the same events (and one arriving
//!    after the record was forgotten finds the job still canceled: same events, same ids).
//! 5. Otherwise execute it: `job_started`; the build (orphan deletes succeed at once: nothing was
//!    provisioned), which streams `job_log` batches and, for start builds, emits `plan_result`;
//!    `job_completed`; for a successful start build each agent's `starting`, the agent-ready
//!    delay, then `ready`.
//! 6. Remember the record, make sure every event is confirmed by the broker, and only then return
//!    `Ok` (the supervisor acknowledges the delivery). A publish failure is transient: the
//!    supervisor retries, and the retry republishes the record rather than re-running the build.
//!
//! A build interrupted by shutdown, or one that could not read the database (the cancellation
//! check included), produced no outcome: the error is transient, the delivery goes back to the
//! queue and the job runs again later with the same event ids.

use std::{sync::Arc, time::Instant};

use prebuilds_runtime::amqp::{consumer::Incoming, Handler, HandlerError, Publisher};
use prebuilds_schemas::{
    AgentLifecycleState, JobOutcome, LogLevel, ProvisionerJob, RawEvent, Transition,
};
use tokio_util::sync::CancellationToken;

use prebuilds_runtime::keyed_locks::KeyedLocks;

use crate::{
    backend::{Backend, BuildResult, RunError},
    events::{Emitter, JobRecord},
    metrics::ProvisionerMetrics,
    records::CompletedJobs,
};

#[derive(Debug)]
pub struct JobHandler {
    backend: Backend,
    publisher: Arc<Publisher>,
    /// CloudEvents `source` of every event.
    source: Arc<str>,
    completed: CompletedJobs,
    running: KeyedLocks,
    /// Fires when shutdown can no longer wait for builds: they are interrupted.
    stop: CancellationToken,
    metrics: ProvisionerMetrics,
}

/// Decodes a delivery body; every failure is permanent.
pub fn decode(body: &[u8]) -> Result<ProvisionerJob, HandlerError> {
    let raw =
        RawEvent::parse(body).map_err(|e| HandlerError::permanent("envelope", e.to_string()))?;
    let event = raw
        .decode::<ProvisionerJob>()
        .map_err(|e| HandlerError::permanent("schema", e.to_string()))?;
    Ok(event.data)
}

impl JobHandler {
    pub fn new(
        backend: Backend,
        publisher: Arc<Publisher>,
        source: impl Into<Arc<str>>,
        remembered_jobs: usize,
        stop: CancellationToken,
        metrics: ProvisionerMetrics,
    ) -> Self {
        JobHandler {
            backend,
            publisher,
            source: source.into(),
            completed: CompletedJobs::new(remembered_jobs),
            running: KeyedLocks::default(),
            stop,
            metrics,
        }
    }

    /// Runs the job and returns its final status.
    async fn execute(
        &self,
        job: &ProvisionerJob,
        emitter: &mut Emitter,
    ) -> Result<JobOutcome, RunError> {
        // Checked first, before anything is published or provisioned: see step 4 of the module
        // documentation. A database error here is transient (the job is retried, never run
        // unchecked).
        if let Some(job_status) = self.backend.canceled(job).await? {
            tracing::info!(job_id = %job.job_id, %job_status, "provisioner job was canceled before it ran; not running it");
            emitter
                .log(
                    LogLevel::Info,
                    "init",
                    format!("The job was canceled (job_status {job_status}) before it started: nothing was provisioned."),
                )
                .await;
            emitter.job_completed(JobOutcome::Canceled, None, &[]).await;
            return Ok(JobOutcome::Canceled);
        }
        let started = Instant::now();
        emitter.job_started().await;
        let result = if job.orphan && job.transition == Transition::Delete {
            emitter
                .log(
                    LogLevel::Info,
                    "destroy",
                    "Orphan delete: nothing was provisioned for this workspace, nothing to destroy.",
                )
                .await;
            BuildResult::Succeeded { agents: vec![] }
        } else {
            self.backend.run(job, emitter, &self.stop).await?
        };
        let (status, error, agents) = match result {
            BuildResult::Succeeded { agents } if job.transition == Transition::Start => {
                (JobOutcome::Succeeded, None, agents)
            }
            BuildResult::Succeeded { .. } => (JobOutcome::Succeeded, None, vec![]),
            BuildResult::Failed { error } => (JobOutcome::Failed, Some(error), vec![]),
        };
        emitter.job_completed(status, error, &agents).await;
        self.metrics
            .duration
            .with_label_values(&[job.transition.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if !agents.is_empty() {
            for agent in &agents {
                emitter
                    .agent_lifecycle(agent, AgentLifecycleState::Starting)
                    .await;
            }
            // The build is done: shutdown cuts the simulated wait short instead of losing the job.
            let delay = self.backend.agent_ready_delay();
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.stop.cancelled() => {}
                }
            }
            for agent in &agents {
                emitter
                    .agent_lifecycle(agent, AgentLifecycleState::Ready)
                    .await;
            }
        }
        Ok(status)
    }

    async fn republish(&self, record: &JobRecord, from: usize) -> Result<(), HandlerError> {
        record
            .publish_from(&self.publisher, from)
            .await
            .map_err(|e| {
                HandlerError::Transient(anyhow::anyhow!(
                    "publishing the events of job {}: {e}",
                    record.job_id
                ))
            })
    }
}

impl Handler for JobHandler {
    async fn handle(&self, message: &Incoming) -> Result<(), HandlerError> {
        let job = decode(&message.body)?;
        let _running = self.running.lock(job.job_id).await;
        if let Some(record) = self.completed.get(job.job_id) {
            tracing::info!(job_id = %job.job_id, status = record.status.as_str(), events = record.events.len(), "job already executed here; republishing its recorded events");
            self.metrics.replayed.inc();
            return self.republish(&record, 0).await;
        }
        tracing::info!(
            job_id = %job.job_id,
            workspace_id = %job.workspace_id,
            transition = job.transition.as_str(),
            stage = job.stage.as_str(),
            build_number = job.build_number,
            orphan = job.orphan,
            redelivered = message.redelivered,
            "executing provisioner job"
        );
        let mut emitter = Emitter::new(job.job_id, self.source.clone(), self.publisher.clone());
        self.metrics.in_flight.inc();
        let executed = self.execute(&job, &mut emitter).await;
        self.metrics.in_flight.dec();
        let status = match executed {
            Ok(status) => status,
            Err(e) => {
                tracing::warn!(job_id = %job.job_id, error = %e, "provisioner job produced no outcome; it will be retried");
                return Err(HandlerError::Transient(anyhow::Error::new(e)));
            }
        };
        self.metrics
            .jobs
            .with_label_values(&[job.transition.as_str(), status.as_str()])
            .inc();
        let (record, confirmed) = emitter.finish();
        let record = Arc::new(record);
        self.completed.insert(record.clone());
        tracing::info!(job_id = %job.job_id, status = status.as_str(), events = record.events.len(), "provisioner job finished");
        self.republish(&record, confirmed).await
    }
}

#[cfg(test)]
mod tests {
    use prebuilds_schemas::{CloudEvent, Payload, ReconcilePreset};

    use super::*;

    #[test]
    fn a_valid_job_decodes() {
        let event = CloudEvent::new("test", chrono::Utc::now(), ProvisionerJob::example());
        let body = serde_json::to_vec(&event).unwrap();
        assert_eq!(decode(&body).unwrap(), ProvisionerJob::example());
    }

    /// Asserts `err` is a permanent failure of metrics class `expected` (the label the supervisor
    /// counts dead-lettered messages by).
    #[track_caller]
    fn assert_permanent(err: &HandlerError, expected: &str) {
        assert!(
            matches!(err, HandlerError::Permanent { class, .. } if *class == expected),
            "expected a permanent {expected:?} failure, got {err:?}"
        );
    }

    #[test]
    fn bad_bodies_are_permanent_failures() {
        let not_json = decode(b"nope").unwrap_err();
        assert_permanent(&not_json, "envelope");

        let wrong_type = CloudEvent::new("test", chrono::Utc::now(), ReconcilePreset::example());
        let err = decode(&serde_json::to_vec(&wrong_type).unwrap()).unwrap_err();
        assert_permanent(&err, "schema");

        let mut value =
            CloudEvent::new("test", chrono::Utc::now(), ProvisionerJob::example()).to_json();
        value["data"]["transition"] = "explode".into();
        let err = decode(&serde_json::to_vec(&value).unwrap()).unwrap_err();
        assert_permanent(&err, "schema");
        assert!(err.to_string().contains("explode"), "{err}");
    }
}
