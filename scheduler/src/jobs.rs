//! The reconcile jobs the scheduler publishes, and how: deterministic job ids, and batched
//! publishing with bounded concurrency and publisher confirms.
//!
//! Job ids are UUID v5 over (preset id, reason, epoch). For `tick` jobs the epoch is the tick
//! index `floor(unix time / reconcile interval)`, so two publications of the same tick — a leader
//! that retries, or a new leader taking over mid-tick — carry the same id and can be deduplicated.
//!
//! The scheduler publishes reconcile jobs directly (no outbox): a pass writes nothing to the
//! database, so there is no transaction whose outcome the message would have to follow. (The job
//! reaper does write; its reconcile requests go through the outbox, in its transaction.) A message counts as published only
//! after the broker confirmed it and routed it to a queue ([`Publisher::publish_event`]); failures
//! are retried a few times within the pass, and the next tick covers anything still missing
//! (reconcile jobs are level-triggered).

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use chrono::{DateTime, Utc};
use futures::{stream, StreamExt};
use prebuilds_runtime::amqp::{PublishError, Publisher};
use prebuilds_schemas::{CloudEvent, ReconcilePreset, ReconcileReason};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::SchedulerMetrics;

/// Namespace of the scheduler's v5 job ids (a fixed random UUID; never change it, or ids of one
/// tick published by two versions would differ).
pub const JOB_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5c1e_d0b2_6f1a_4c3e_9a57_2d8e_41b0_7f13);

/// Attempts per job within one pass (first try included).
const ATTEMPTS: usize = 3;

/// The index of the tick containing `now`: `floor(unix time / interval)`.
pub fn tick_index(now: DateTime<Utc>, interval: Duration) -> i64 {
    let interval_ms = i64::try_from(interval.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    now.timestamp_millis().div_euclid(interval_ms)
}

/// When tick `index` starts.
pub fn tick_start(index: i64, interval: Duration) -> DateTime<Utc> {
    let interval_ms = i64::try_from(interval.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    DateTime::from_timestamp_millis(index.saturating_mul(interval_ms))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The deterministic id of the job for `preset` with `reason` in `epoch`.
pub fn job_id(preset: Uuid, reason: ReconcileReason, epoch: i64) -> Uuid {
    let name = format!("{preset}/{}/{epoch}", reason.as_str());
    Uuid::new_v5(&JOB_ID_NAMESPACE, name.as_bytes())
}

/// One batch of jobs: the same reason, epoch and request time for every preset.
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    pub reason: ReconcileReason,
    /// Tick index for `tick`; another distinguishing number for other reasons.
    pub epoch: i64,
    /// The database's clock when the need was observed (comparable with the worker's coalescing
    /// watermark, which is also the database's clock).
    pub requested_at: DateTime<Utc>,
}

/// What a batch achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub published: usize,
    /// Jobs given up on after every attempt (the next tick covers them).
    pub failed: usize,
    /// The term ended (leadership lost or shutdown) before the batch finished.
    pub interrupted: bool,
}

/// Publishes reconcile jobs with bounded concurrency.
#[derive(Debug, Clone)]
pub struct JobPublisher {
    publisher: Arc<Publisher>,
    source: String,
    concurrency: usize,
    metrics: SchedulerMetrics,
}

impl JobPublisher {
    pub fn new(
        publisher: Arc<Publisher>,
        source: String,
        concurrency: usize,
        metrics: SchedulerMetrics,
    ) -> Self {
        JobPublisher {
            publisher,
            source,
            concurrency: concurrency.max(1),
            metrics,
        }
    }

    /// Publishes one job per preset, up to `concurrency` awaiting their confirms at once. Stops at
    /// once (dropping in-flight publishes) when `term` is cancelled.
    pub async fn publish(
        &self,
        presets: &[Uuid],
        batch: Batch,
        term: &CancellationToken,
    ) -> BatchOutcome {
        let outcome = self.publish_with_retries(presets, batch, term).await;
        let reason = batch.reason.as_str();
        self.metrics
            .jobs_published
            .with_label_values(&[reason])
            .inc_by(outcome.published as u64);
        self.metrics
            .jobs_failed
            .with_label_values(&[reason])
            .inc_by(outcome.failed as u64);
        outcome
    }

    async fn publish_with_retries(
        &self,
        presets: &[Uuid],
        batch: Batch,
        term: &CancellationToken,
    ) -> BatchOutcome {
        let mut outcome = BatchOutcome::default();
        let mut pending: Vec<Uuid> = presets.to_vec();
        for attempt in 1..=ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let round = self.publish_round(&pending, batch);
            let failures = tokio::select! {
                _ = term.cancelled() => {
                    outcome.interrupted = true;
                    return outcome;
                }
                failures = round => failures,
            };
            outcome.published += pending.len() - failures.len();
            let mut retry = Vec::new();
            let mut last_error = None;
            for (preset, error) in failures {
                let transient = error.as_ref().is_none_or(PublishError::is_transient);
                if transient && attempt < ATTEMPTS {
                    retry.push(preset);
                } else {
                    outcome.failed += 1;
                }
                if error.is_some() {
                    last_error = error;
                }
            }
            if !retry.is_empty() || outcome.failed > 0 {
                let error = last_error.map_or_else(
                    || "RabbitMQ unreachable; not attempted".to_owned(),
                    |e| e.to_string(),
                );
                tracing::warn!(
                    error = %error,
                    attempt,
                    retrying = retry.len(),
                    reason = batch.reason.as_str(),
                    "some reconcile jobs were not confirmed"
                );
            }
            pending = retry;
            if !pending.is_empty() {
                let backoff = Duration::from_millis(250 * attempt as u64);
                tokio::select! {
                    _ = term.cancelled() => {
                        outcome.interrupted = true;
                        outcome.failed += pending.len();
                        return outcome;
                    }
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
        outcome
    }

    /// One concurrent round; returns the presets whose publish failed, with the error (`None`:
    /// not attempted because the broker connection had already failed in this round — so a dead
    /// broker costs one failed connection attempt per round, not one per preset).
    async fn publish_round(
        &self,
        presets: &[Uuid],
        batch: Batch,
    ) -> Vec<(Uuid, Option<PublishError>)> {
        if let Err(e) = self.publisher.ensure_connected().await {
            tracing::warn!(error = %e, "cannot reach RabbitMQ to publish reconcile jobs");
            return presets.iter().map(|p| (*p, None)).collect();
        }
        let broken = AtomicBool::new(false);
        let now = Utc::now();
        stream::iter(presets.iter().copied())
            .map(|preset_id| {
                let event = CloudEvent::with_id(
                    job_id(preset_id, batch.reason, batch.epoch),
                    self.source.as_str(),
                    now,
                    ReconcilePreset {
                        preset_id,
                        reason: batch.reason,
                        requested_at: batch.requested_at,
                    },
                );
                let broken = &broken;
                async move {
                    if broken.load(Ordering::Relaxed) {
                        return Err((preset_id, None));
                    }
                    self.publisher.publish_event(&event).await.map_err(|e| {
                        if e.is_transient() {
                            broken.store(true, Ordering::Relaxed);
                        }
                        (preset_id, Some(e))
                    })
                }
            })
            .buffer_unordered(self.concurrency)
            .filter_map(|result| async move { result.err() })
            .collect()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_index_is_floor_of_unix_time_over_interval() {
        let minute = Duration::from_secs(60);
        let t = DateTime::from_timestamp(1_800_000_059, 999_000_000).unwrap();
        assert_eq!(tick_index(t, minute), 1_800_000_059 / 60);
        let next = DateTime::from_timestamp(1_800_000_060, 0).unwrap();
        assert_eq!(tick_index(next, minute), 1_800_000_060 / 60);
        assert_eq!(tick_start(tick_index(next, minute), minute), next);
    }

    #[test]
    fn job_ids_are_deterministic_per_preset_reason_and_epoch() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let tick = ReconcileReason::Tick;
        assert_eq!(job_id(a, tick, 7), job_id(a, tick, 7));
        assert_eq!(job_id(a, tick, 7).get_version_num(), 5);
        assert_ne!(job_id(a, tick, 7), job_id(a, tick, 8));
        assert_ne!(job_id(a, tick, 7), job_id(b, tick, 7));
        assert_ne!(
            job_id(a, tick, 7),
            job_id(a, ReconcileReason::SettingsChanged, 7)
        );
    }
}
