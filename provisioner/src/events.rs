//! The events a job produces, their deterministic ids, and their emission.
//!
//! Idempotence rests on two rules:
//!
//! 1. An event's CloudEvents `id` is a UUID v5 of (job id, event kind, sequence number of that kind
//!    within the job) under [`EVENT_ID_NAMESPACE`]. A job executed again — after a crash, or on a
//!    provisioner that never saw it — publishes the same ids in the same order, so the worker
//!    deduplicates them.
//! 2. Every event is recorded in emission order ([`JobRecord`]). A redelivered job that this process
//!    already finished is answered by republishing the record, so it is never executed twice here.
//!
//! [`Emitter`] publishes each event as soon as it exists (so the worker sees progress: job_started
//! first, logs while terraform runs) and waits for its broker confirm. If the broker fails mid-job the
//! emitter stops publishing but keeps recording; the handler publishes the unconfirmed tail after
//! the build, and acknowledges the job only when every event is confirmed.

use std::{collections::HashMap, sync::Arc};

use backon::BackoffBuilder;
use chrono::Utc;
use prebuilds_runtime::amqp::{PublishError, Publisher};
use prebuilds_schemas::{
    AgentLifecycle, AgentLifecycleState, AgentSpec, CloudEvent, JobCompleted, JobLog, JobOutcome,
    JobStarted, LogLevel, LogLine, PlanResult, ResourceReplacement,
};
use uuid::{uuid, Uuid};

/// Namespace of the UUID v5 event ids. Changing it changes every id: never do that.
pub const EVENT_ID_NAMESPACE: Uuid = uuid!("8f1c6b0e-5a3d-4f27-9e61-2b7d4c9a0e53");

/// Log lines per `job_log` event at most.
pub const MAX_LOG_BATCH: usize = 100;
/// Longest log line kept; longer ones are truncated (bodies are limited to 1 MiB).
pub const MAX_LOG_LINE_CHARS: usize = 4000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    JobStarted,
    JobLog,
    PlanResult,
    JobCompleted,
    AgentLifecycle,
    /// A progress line of a running job (a `job_log` event outside the job's record: heartbeats
    /// depend on timing, so a re-run need not repeat them).
    Heartbeat,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::JobStarted => "job_started",
            EventKind::JobLog => "job_log",
            EventKind::PlanResult => "plan_result",
            EventKind::JobCompleted => "job_completed",
            EventKind::AgentLifecycle => "agent_lifecycle",
            EventKind::Heartbeat => "heartbeat",
        }
    }
}

/// The id of the `seq`-th event of `kind` of job `job_id` (0-based).
pub fn event_id(job_id: Uuid, kind: EventKind, seq: u32) -> Uuid {
    let name = format!("{job_id}/{}/{seq}", kind.as_str());
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

/// The `seq`-th heartbeat of a running job: one `job_log` line saying how long it has run.
pub fn heartbeat(
    job_id: Uuid,
    source: &str,
    seq: u32,
    elapsed: std::time::Duration,
) -> CloudEvent<JobLog> {
    let now = Utc::now();
    let elapsed = humantime::format_duration(std::time::Duration::from_secs(elapsed.as_secs()));
    CloudEvent::with_id(
        event_id(job_id, EventKind::Heartbeat, seq),
        source.to_owned(),
        now,
        JobLog {
            job_id,
            logs: vec![LogLine {
                created_at: now,
                level: LogLevel::Debug,
                stage: "heartbeat".to_owned(),
                output: format!("Still running after {elapsed}."),
            }],
        },
    )
}

/// One published (or to-be-published) event.
#[derive(Debug, Clone)]
pub enum Event {
    JobStarted(CloudEvent<JobStarted>),
    JobLog(CloudEvent<JobLog>),
    PlanResult(CloudEvent<PlanResult>),
    JobCompleted(CloudEvent<JobCompleted>),
    AgentLifecycle(CloudEvent<AgentLifecycle>),
}

impl Event {
    pub fn id(&self) -> Uuid {
        match self {
            Event::JobStarted(e) => e.id,
            Event::JobLog(e) => e.id,
            Event::PlanResult(e) => e.id,
            Event::JobCompleted(e) => e.id,
            Event::AgentLifecycle(e) => e.id,
        }
    }

    /// Publishes with a confirm (see [`Publisher::publish_event`]).
    pub async fn publish(&self, publisher: &Publisher) -> Result<(), PublishError> {
        match self {
            Event::JobStarted(e) => publisher.publish_event(e).await,
            Event::JobLog(e) => publisher.publish_event(e).await,
            Event::PlanResult(e) => publisher.publish_event(e).await,
            Event::JobCompleted(e) => publisher.publish_event(e).await,
            Event::AgentLifecycle(e) => publisher.publish_event(e).await,
        }
    }

    /// Publishes, retrying a failure with jittered backoff a bounded number of times.
    pub async fn publish_with_retries(&self, publisher: &Publisher) -> Result<(), PublishError> {
        let mut delays = prebuilds_runtime::retry::retry_policy().build();
        loop {
            match self.publish(publisher).await {
                Ok(()) => return Ok(()),
                Err(e) => match delays.next() {
                    Some(delay) => {
                        tracing::warn!(event_id = %self.id(), error = %e, retry_in = ?delay, "publishing a provisioner event failed; retrying");
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(e),
                },
            }
        }
    }
}

/// Everything a finished job published, in order.
#[derive(Debug)]
pub struct JobRecord {
    pub job_id: Uuid,
    pub status: JobOutcome,
    pub events: Vec<Event>,
}

impl JobRecord {
    /// Publishes `events[from..]` in order, each confirmed before the next.
    pub async fn publish_from(
        &self,
        publisher: &Publisher,
        from: usize,
    ) -> Result<(), PublishError> {
        for event in self.events.iter().skip(from) {
            event.publish_with_retries(publisher).await?;
        }
        Ok(())
    }
}

/// Builds, records and publishes the events of one job execution.
#[derive(Debug)]
pub struct Emitter {
    job_id: Uuid,
    source: Arc<str>,
    publisher: Arc<Publisher>,
    sequence: HashMap<EventKind, u32>,
    events: Vec<Event>,
    /// `events[..confirmed]` are confirmed by the broker.
    confirmed: usize,
    /// Set after a publish failed: record only, publish after the build.
    publishing_suspended: bool,
    logs: Vec<LogLine>,
    status: Option<JobOutcome>,
}

impl Emitter {
    pub fn new(job_id: Uuid, source: Arc<str>, publisher: Arc<Publisher>) -> Self {
        Emitter {
            job_id,
            source,
            publisher,
            sequence: HashMap::new(),
            events: Vec::new(),
            confirmed: 0,
            publishing_suspended: false,
            logs: Vec::new(),
            status: None,
        }
    }

    pub fn job_id(&self) -> Uuid {
        self.job_id
    }

    fn next_id(&mut self, kind: EventKind) -> Uuid {
        let seq = self.sequence.entry(kind).or_insert(0);
        let id = event_id(self.job_id, kind, *seq);
        *seq += 1;
        id
    }

    fn envelope<T: prebuilds_schemas::Payload>(
        &mut self,
        kind: EventKind,
        data: T,
    ) -> CloudEvent<T> {
        let id = self.next_id(kind);
        CloudEvent::with_id(id, self.source.to_string(), Utc::now(), data)
    }

    /// Records `event` after any buffered log lines, then publishes what is unconfirmed.
    async fn emit(&mut self, event: Event) {
        self.buffer_log_batch();
        self.events.push(event);
        self.publish_pending().await;
    }

    fn buffer_log_batch(&mut self) {
        if self.logs.is_empty() {
            return;
        }
        let logs = std::mem::take(&mut self.logs);
        let data = JobLog {
            job_id: self.job_id,
            logs,
        };
        let event = Event::JobLog(self.envelope(EventKind::JobLog, data));
        self.events.push(event);
    }

    async fn publish_pending(&mut self) {
        if self.publishing_suspended {
            return;
        }
        while let Some(event) = self.events.get(self.confirmed) {
            match event.publish(&self.publisher).await {
                Ok(()) => self.confirmed += 1,
                Err(e) => {
                    tracing::warn!(job_id = %self.job_id, error = %e, "publishing a provisioner event failed; recording the rest and publishing after the build");
                    self.publishing_suspended = true;
                    return;
                }
            }
        }
    }

    pub async fn job_started(&mut self) {
        let data = JobStarted {
            job_id: self.job_id,
            started_at: Utc::now(),
        };
        let event = Event::JobStarted(self.envelope(EventKind::JobStarted, data));
        self.emit(event).await;
    }

    /// Buffers one log line; a full batch is published at once.
    pub async fn log(&mut self, level: LogLevel, stage: &str, output: impl Into<String>) {
        let mut output: String = output.into();
        if output.chars().count() > MAX_LOG_LINE_CHARS {
            output = output.chars().take(MAX_LOG_LINE_CHARS).collect::<String>() + " …";
        }
        self.logs.push(LogLine {
            created_at: Utc::now(),
            level,
            stage: stage.to_owned(),
            output,
        });
        if self.logs.len() >= MAX_LOG_BATCH {
            self.flush_logs().await;
        }
    }

    /// Publishes buffered log lines as one `job_log` event (nothing if none are buffered).
    pub async fn flush_logs(&mut self) {
        if self.logs.is_empty() {
            return;
        }
        self.buffer_log_batch();
        self.publish_pending().await;
    }

    pub async fn plan_result(&mut self, resource_replacements: Vec<ResourceReplacement>) {
        let data = PlanResult {
            job_id: self.job_id,
            resource_replacements,
        };
        let event = Event::PlanResult(self.envelope(EventKind::PlanResult, data));
        self.emit(event).await;
    }

    pub async fn job_completed(
        &mut self,
        status: JobOutcome,
        error: Option<String>,
        agents: &[String],
    ) {
        self.status = Some(status);
        let data = JobCompleted {
            job_id: self.job_id,
            status,
            error,
            completed_at: Utc::now(),
            agents: agents
                .iter()
                .map(|name| AgentSpec { name: name.clone() })
                .collect(),
        };
        let event = Event::JobCompleted(self.envelope(EventKind::JobCompleted, data));
        self.emit(event).await;
    }

    pub async fn agent_lifecycle(&mut self, agent_name: &str, state: AgentLifecycleState) {
        let data = AgentLifecycle {
            job_id: self.job_id,
            agent_name: agent_name.to_owned(),
            lifecycle_state: state,
        };
        let event = Event::AgentLifecycle(self.envelope(EventKind::AgentLifecycle, data));
        self.emit(event).await;
    }

    /// The record of this execution and how many of its events are already confirmed.
    pub fn finish(mut self) -> (JobRecord, usize) {
        self.buffer_log_batch();
        let record = JobRecord {
            job_id: self.job_id,
            status: self.status.unwrap_or(JobOutcome::Failed),
            events: self.events,
        };
        (record, self.confirmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_per_job_kind_and_sequence() {
        let job = Uuid::from_u128(42);
        assert_eq!(
            event_id(job, EventKind::JobLog, 3),
            event_id(job, EventKind::JobLog, 3)
        );
        assert_eq!(event_id(job, EventKind::JobLog, 3).get_version_num(), 5);
        let all = [
            event_id(job, EventKind::JobStarted, 0),
            event_id(job, EventKind::JobLog, 0),
            event_id(job, EventKind::JobLog, 1),
            event_id(job, EventKind::PlanResult, 0),
            event_id(job, EventKind::JobCompleted, 0),
            event_id(job, EventKind::AgentLifecycle, 0),
            event_id(Uuid::from_u128(43), EventKind::JobStarted, 0),
        ];
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
    }

    #[test]
    fn the_namespace_is_pinned() {
        // A changed namespace would make a redelivered job publish ids the worker has never seen.
        assert_eq!(
            event_id(Uuid::nil(), EventKind::JobStarted, 0).to_string(),
            Uuid::new_v5(
                &EVENT_ID_NAMESPACE,
                b"00000000-0000-0000-0000-000000000000/job_started/0"
            )
            .to_string()
        );
        assert_eq!(
            EVENT_ID_NAMESPACE.to_string(),
            "8f1c6b0e-5a3d-4f27-9e61-2b7d4c9a0e53"
        );
    }
}
