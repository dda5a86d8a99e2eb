//! Micro-batching of reconcile jobs within one worker. At steady state almost every job finds
//! nothing to do, and what it costs is the transaction around the reads, not the planning: so
//! jobs waiting at the same moment share one transaction ([`super::reconcile_batch`]) — one lock
//! statement, one set of snapshot reads, one watermark write for up to `max_batch` presets.
//!
//! Handlers hand their job to a queue and wait for its attempt; a fixed set of drainers (the
//! worker's reconcile concurrency) takes whatever is queued, up to `max_batch`, as one batch. No
//! job waits for a batch to fill: under light load a batch is a single job and takes the ordinary
//! waiting-lock path. A job whose preset was locked elsewhere, or whose batch failed, is
//! reconciled on its own by its handler, so one bad preset fails only its own job (and, while it
//! keeps failing, its retries stay out of batches).
//!
//! Batched or alone, at most `slots` reconcile transactions run at once in this process.

use std::{collections::HashSet, sync::Arc};

use prebuilds_runtime::{
    db::DbError,
    tracing_context::{self, Remote},
};
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};
use tracing::Instrument;

use uuid::Uuid;

use super::{
    reconcile_batch_traced, reconcile_preset, Attempt, Job, ReconcileContext, ReconcileOutcome,
};

/// A job waiting for a batch; `None` in the reply means "reconcile it on your own".
#[derive(Debug)]
struct Queued {
    job: Job,
    /// The trace of the handler that queued it: the drainer runs it on another task.
    trace: Option<Remote>,
    reply: oneshot::Sender<Option<Result<ReconcileOutcome, DbError>>>,
}

#[derive(Debug)]
pub struct Batcher {
    context: ReconcileContext,
    queue: mpsc::UnboundedSender<Queued>,
    /// Reconcile transactions allowed at once, batched or alone.
    slots: Arc<Semaphore>,
    /// Presets whose last reconcile on their own failed: their retries stay alone until one
    /// succeeds, so a preset that keeps failing does not keep breaking other presets' batches.
    failing: Arc<Failing>,
}

/// Presets whose last reconcile on their own failed (see [`Batcher`]).
#[derive(Debug, Default)]
struct Failing(std::sync::Mutex<HashSet<Uuid>>);

impl Failing {
    fn contains(&self, preset_id: Uuid) -> bool {
        self.0.lock().expect("never poisoned").contains(&preset_id)
    }

    fn record<T, E>(&self, preset_id: Uuid, result: &Result<T, E>) {
        let mut failing = self.0.lock().expect("never poisoned");
        if result.is_err() {
            failing.insert(preset_id);
        } else {
            failing.remove(&preset_id);
        }
    }
}

impl Batcher {
    /// Starts `slots` drainers (needs a Tokio runtime). They stop when the batcher is dropped.
    pub fn start(context: ReconcileContext, slots: usize, max_batch: usize) -> Self {
        let slots = Arc::new(Semaphore::new(slots.max(1)));
        let (queue, receiver) = mpsc::unbounded_channel();
        let receiver = Arc::new(Mutex::new(receiver));
        let failing = Arc::new(Failing::default());
        for _ in 0..slots.available_permits() {
            tokio::spawn(drain(
                context.clone(),
                receiver.clone(),
                slots.clone(),
                failing.clone(),
                max_batch.max(1),
            ));
        }
        Batcher {
            context,
            queue,
            slots,
            failing,
        }
    }

    /// Reconciles the job's preset, in a batch when others are waiting too.
    pub async fn reconcile(&self, job: Job) -> Result<ReconcileOutcome, DbError> {
        if !self.failing.contains(job.preset_id) {
            let (reply, outcome) = oneshot::channel();
            let trace = tracing_context::current();
            if self.queue.send(Queued { job, reply, trace }).is_ok() {
                if let Ok(Some(result)) = outcome.await {
                    return result;
                }
            }
        }
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("the batcher never closes its semaphore");
        let result = reconcile_preset(&self.context, job.preset_id, job.requested_at).await;
        self.failing.record(job.preset_id, &result);
        result
    }
}

/// Takes batches off the queue until every sender is gone.
async fn drain(
    context: ReconcileContext,
    receiver: Arc<Mutex<mpsc::UnboundedReceiver<Queued>>>,
    slots: Arc<Semaphore>,
    failing: Arc<Failing>,
    max_batch: usize,
) {
    loop {
        let batch = {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            batch
        };
        // Taken after the batch, never while idle: an idle drainer must not hold a slot that a
        // job reconciling on its own is waiting for.
        let _slot = slots
            .acquire()
            .await
            .expect("the batcher never closes its semaphore");
        if let [single] = batch.as_slice() {
            // Nothing to share the transaction with: wait for the lock as a lone job would.
            let job = single.job;
            let span = tracing::info_span!("reconcile.run", presets = 1);
            if let Some(trace) = &single.trace {
                tracing_context::set_parent(&span, trace);
            }
            let result = reconcile_preset(&context, job.preset_id, job.requested_at)
                .instrument(span)
                .await;
            failing.record(job.preset_id, &result);
            let [single] = <[Queued; 1]>::try_from(batch).expect("checked: one job");
            let _ = single.reply.send(Some(result));
            continue;
        }
        let jobs: Vec<Job> = batch.iter().map(|q| q.job).collect();
        let traces: Vec<Option<Remote>> = batch.iter().map(|q| q.trace.clone()).collect();
        // The batch's own span is a root: each preset's work continues its own job's trace.
        let span = tracing::info_span!(parent: None, "reconcile.batch", presets = jobs.len());
        match reconcile_batch_traced(&context, &jobs, &traces)
            .instrument(span)
            .await
        {
            Ok(attempts) => {
                for (queued, attempt) in batch.into_iter().zip(attempts) {
                    let outcome = match attempt {
                        Attempt::Done(outcome) => Some(Ok(outcome)),
                        Attempt::Alone => None,
                    };
                    let _ = queued.reply.send(outcome);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, presets = jobs.len(), "batched reconcile failed; reconciling each preset on its own");
                for queued in batch {
                    let _ = queued.reply.send(None);
                }
            }
        }
    }
}
