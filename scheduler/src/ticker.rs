//! The tick loop of a leader term: a pass (reason `tick`) right after becoming leader, then one
//! at the start of every tick, i.e. at wall-clock multiples of the reconcile interval. Aligning to
//! the wall clock makes the tick index — and so the job ids — the same on every replica: a new
//! leader that re-publishes the tick its predecessor already published produces duplicates that
//! can be recognised by id, never a drifting series of near-duplicate passes.
//!
//! A pass that overruns the interval is not stacked: the loop continues with the tick that is
//! current when the pass ends.

use std::time::Duration;

use chrono::Utc;
use prebuilds_schemas::ReconcileReason;
use tokio_util::sync::CancellationToken;

use crate::{
    jobs::{tick_index, tick_start},
    pass::Passes,
};

/// Runs until `term` is cancelled.
pub async fn run(passes: Passes, interval: Duration, term: CancellationToken) {
    let mut last_published: Option<i64> = None;
    loop {
        let index = tick_index(Utc::now(), interval);
        if last_published != Some(index) {
            if let Err(e) = passes.run(ReconcileReason::Tick, index, &term).await {
                tracing::error!(error = %e, tick = index, "reconcile tick failed; the next tick tries again");
            }
            last_published = Some(index);
        }
        let next = tick_start(index + 1, interval);
        let wait = (next - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
