//! The job handler plugged into the shared consumer supervisor (one per lane, one handler). For
//! one delivery of `prebuilds.provisioner.job.v1`:
//!
//! 1. Decode the envelope and payload strictly; a failure is permanent (the supervisor
//!    dead-letters the message with the reason).
//! 2. Take the job's in-process lock, so a duplicate delivery waits for the first one.
//! 3. If this process already finished the job, republish its recorded events (same ids, same
//!    content) and stop: a job is never executed twice here.
//! 4. Admission (`admission`), when this process can read the database: a message naming no job
//!    is dead-lettered (`unknown_job`); a job already running elsewhere (a duplicate publish) or
//!    already done (reaped, completed) is acknowledged without running (counted by reason); a job
//!    canceled while queued is not run: a `job_log` line saying so, then `job_completed`
//!    `canceled` (no `job_started`: it never started), recorded like any outcome (step 6).
//! 5. Otherwise execute it: `job_started`; the build (orphan deletes succeed at once: nothing was
//!    provisioned), which streams `job_log` batches and, for start builds, emits `plan_result`;
//!    `job_completed`; for a successful start build each agent's `starting`, the agent-ready
//!    delay, then `ready`. While the build runs, a watch sends a heartbeat line every quarter of
//!    `PREBUILDS_JOB_HUNG_TIMEOUT` (so the job reaper never takes a live build for hung) and, with
//!    database access, polls the row: a cancel of the running job (`prebuildsctl jobs cancel`)
//!    interrupts the build (terraform gets SIGINT, then SIGKILL after a grace period) and the job
//!    completes `canceled`.
//! 6. Remember the record, make sure every event is confirmed by the broker, and only then return
//!    `Ok` (the supervisor acknowledges the delivery). A publish failure is transient: the
//!    supervisor retries, and the retry republishes the record rather than re-running the build.
//!
//! A build interrupted by shutdown, or one that could not read the database (admission included),
//! produced no outcome: the error is transient, the delivery goes back to the queue and the job
//! runs again later with the same event ids.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use prebuilds_runtime::amqp::{consumer::Incoming, Handler, HandlerError, Publisher};
use prebuilds_schemas::{
    AgentLifecycleState, JobOutcome, LogLevel, ProvisionerJob, RawEvent, Transition,
};
use tokio_util::sync::CancellationToken;

use prebuilds_runtime::keyed_locks::KeyedLocks;

use crate::{
    admission::{admit, Admission, JobStates},
    backend::{Backend, BuildResult, RunError},
    events::{self, Emitter, JobRecord},
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
    /// Job rows, for admission and cancels of running jobs; `None` without database access.
    states: Option<JobStates>,
    /// Time between heartbeats of a running job (a quarter of the hung timeout).
    heartbeat: Duration,
    /// Longest a build may run before it is interrupted and failed (`--job-max-duration`).
    max_duration: Duration,
}

/// Longest time between two reads of a running job's row (a cancel is noticed within it).
const CANCEL_POLL: Duration = Duration::from_secs(2);

/// How a watched build ended.
enum Watched {
    Finished(Result<BuildResult, RunError>),
    /// A cancel of the running job interrupted it.
    Canceled,
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
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        backend: Backend,
        publisher: Arc<Publisher>,
        source: impl Into<Arc<str>>,
        remembered_jobs: usize,
        stop: CancellationToken,
        metrics: ProvisionerMetrics,
        states: Option<JobStates>,
        heartbeat: Duration,
        max_duration: Duration,
    ) -> Self {
        JobHandler {
            backend,
            publisher,
            source: source.into(),
            completed: CompletedJobs::new(remembered_jobs),
            running: KeyedLocks::default(),
            stop,
            metrics,
            states,
            heartbeat: heartbeat.max(Duration::from_millis(100)),
            max_duration,
        }
    }

    /// Runs the build while watching it: heartbeats, a cancel of the running job, and the bound
    /// on its total time (an interrupted build that ran out of time is a failed one).
    async fn run_watched(&self, job: &ProvisionerJob, emitter: &mut Emitter) -> Watched {
        let build_stop = self.stop.child_token();
        let canceled = CancellationToken::new();
        let timed_out = CancellationToken::new();
        let build = self.backend.run(job, emitter, &build_stop);
        let watch = self.watch(job.job_id, &build_stop, &canceled);
        let deadline = tokio::time::sleep(self.max_duration);
        tokio::pin!(build, watch, deadline);
        let result = loop {
            tokio::select! {
                biased;
                result = &mut build => break result,
                () = &mut deadline, if !timed_out.is_cancelled() => {
                    tracing::warn!(job_id = %job.job_id, max = ?self.max_duration, "the build ran out of time; interrupting it");
                    timed_out.cancel();
                    build_stop.cancel();
                }
                never = &mut watch => match never {},
            }
        };
        match result {
            Err(RunError::Aborted) if canceled.is_cancelled() => Watched::Canceled,
            Err(RunError::Aborted) if timed_out.is_cancelled() => {
                Watched::Finished(Ok(BuildResult::Failed {
                    error: format!(
                        "timeout: the build ran longer than {} (PREBUILDS_JOB_MAX_DURATION) and was interrupted",
                        humantime::format_duration(self.max_duration)
                    ),
                }))
            }
            other => Watched::Finished(other),
        }
    }

    /// Never returns: sends a heartbeat every `self.heartbeat` and, with database access, polls
    /// the job's row; on a cancel it fires `canceled` and `build_stop`.
    async fn watch(
        &self,
        job_id: uuid::Uuid,
        build_stop: &CancellationToken,
        canceled: &CancellationToken,
    ) -> std::convert::Infallible {
        let started = tokio::time::Instant::now();
        let poll = self.heartbeat.min(CANCEL_POLL);
        let mut next_heartbeat = started + self.heartbeat;
        let mut beats = 0u32;
        loop {
            tokio::time::sleep(poll).await;
            let now = tokio::time::Instant::now();
            if now >= next_heartbeat {
                let event = events::heartbeat(job_id, &self.source, beats, now - started);
                match self.publisher.publish_event(&event).await {
                    Ok(()) => self.metrics.heartbeats.inc(),
                    Err(e) => {
                        tracing::warn!(%job_id, error = %e, "publishing a heartbeat of a running job failed")
                    }
                }
                beats += 1;
                next_heartbeat = now + self.heartbeat;
            }
            if let Some(states) = &self.states {
                if !canceled.is_cancelled() && states.cancel_requested(job_id).await {
                    tracing::info!(%job_id, "the running job was canceled; interrupting its build");
                    canceled.cancel();
                    build_stop.cancel();
                }
            }
        }
    }

    /// Runs the job and returns its final status; `canceled_while_queued` (admission) completes
    /// it `canceled` without running anything.
    async fn execute(
        &self,
        job: &ProvisionerJob,
        emitter: &mut Emitter,
        canceled_while_queued: Option<prebuilds_core::JobStatus>,
    ) -> Result<JobOutcome, RunError> {
        // Before anything is published or provisioned: see step 4 of the module documentation.
        if let Some(job_status) = canceled_while_queued {
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
            match self.run_watched(job, emitter).await {
                Watched::Finished(result) => result?,
                Watched::Canceled => {
                    emitter.flush_logs().await;
                    emitter
                        .log(
                            LogLevel::Warn,
                            "cancel",
                            "The job was canceled while it ran: the build was interrupted.",
                        )
                        .await;
                    emitter.job_completed(JobOutcome::Canceled, None, &[]).await;
                    return Ok(JobOutcome::Canceled);
                }
            }
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

    /// Step 4 of the module documentation; every job runs without database access.
    async fn admission(
        &self,
        job: &ProvisionerJob,
        redelivered: bool,
    ) -> Result<Admission, HandlerError> {
        let Some(states) = &self.states else {
            return Ok(Admission::Run);
        };
        let state = states
            .get(job.job_id)
            .await
            .map_err(|e| HandlerError::Transient(anyhow::Error::new(e)))?;
        Ok(admit(state.as_ref(), redelivered))
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
        // The job's span: its events are published under it, so the worker that applies them
        // continues this trace.
        let span = tracing::info_span!(
            "provisioner.job",
            job_id = %job.job_id,
            transition = ?job.transition,
            workspace_id = %job.workspace_id,
        );
        tracing::Instrument::instrument(self.handle_job(message, job), span).await
    }
}

impl JobHandler {
    async fn handle_job(
        &self,
        message: &Incoming,
        job: ProvisionerJob,
    ) -> Result<(), HandlerError> {
        let _running = self.running.lock(job.job_id).await;
        if let Some(record) = self.completed.get(job.job_id) {
            tracing::info!(job_id = %job.job_id, status = record.status.as_str(), events = record.events.len(), "job already executed here; republishing its recorded events");
            self.metrics.replayed.inc();
            return self.republish(&record, 0).await;
        }
        let canceled_while_queued = match self.admission(&job, message.redelivered).await? {
            Admission::Run => None,
            Admission::Canceled { job_status } => Some(job_status),
            Admission::Refuse { reason, permanent } => {
                self.metrics.refused.with_label_values(&[&reason]).inc();
                if permanent {
                    return Err(HandlerError::permanent(
                        "unknown_job",
                        format!(
                            "provisioner job {} does not exist in the database: not running it",
                            job.job_id
                        ),
                    ));
                }
                tracing::info!(job_id = %job.job_id, %reason, redelivered = message.redelivered, "not running a provisioner job that is no longer pending");
                return Ok(());
            }
        };
        tracing::info!(
            job_id = %job.job_id,
            lane = job.lane().as_str(),
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
        let executed = self
            .execute(&job, &mut emitter, canceled_while_queued)
            .await;
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
