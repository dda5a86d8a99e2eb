//! Notices the global pause being lifted while this replica leads, however it was lifted
//! (`prebuildsctl resume`, or a plain SQL `UPDATE prebuilds_settings`), and triggers an immediate
//! reconcile of every preset needing attention (reason `settings_changed`).
//!
//! The setting is polled every `settings_poll_interval`; a paused → not paused transition between
//! two observations triggers the pass. The transition is only consumed once its pass published, so
//! a failed pass is retried at the next poll. A pause and resume both inside one poll interval are
//! not seen (the CLI's own outbox jobs cover that path), and a replica that becomes leader only
//! records the current value: it has not seen a transition.

use std::time::Duration;

use chrono::Utc;
use deadpool_postgres::Pool;
use prebuilds_schemas::ReconcileReason;
use prebuilds_store::settings;
use tokio_util::sync::CancellationToken;

use crate::pass::{PassOutcome, Passes};

/// Runs until `term` is cancelled.
pub async fn run(passes: Passes, poll_interval: Duration, term: CancellationToken) {
    let mut last_paused: Option<bool> = None;
    loop {
        let read = tokio::time::timeout(
            poll_interval.max(Duration::from_secs(1)),
            read(&passes.pool),
        );
        let observed = tokio::select! {
            _ = term.cancelled() => return,
            r = read => r,
        };
        match observed {
            Ok(Ok(paused)) => {
                passes.pool_state.set_paused(paused);
                if last_paused == Some(true) && !paused {
                    tracing::info!("prebuilds reconciliation resumed; reconciling every preset");
                    // The detection instant distinguishes this resume's job ids from any other.
                    let epoch = Utc::now().timestamp_millis();
                    match passes
                        .run(ReconcileReason::SettingsChanged, epoch, &term)
                        .await
                    {
                        Ok(PassOutcome::Published(o)) if o.failed == 0 => last_paused = Some(false),
                        Ok(PassOutcome::Paused) => last_paused = Some(true),
                        Ok(PassOutcome::Interrupted) => return,
                        Ok(PassOutcome::Published(_)) | Err(_) => {
                            tracing::warn!("publishing the resume reconciles did not complete; retrying at the next poll");
                        }
                    }
                } else {
                    last_paused = Some(paused);
                }
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "reading the pause setting failed"),
            Err(_) => tracing::warn!("reading the pause setting timed out"),
        }
        tokio::select! {
            _ = term.cancelled() => return,
            _ = tokio::time::sleep(poll_interval) => {}
        }
    }
}

async fn read(pool: &Pool) -> Result<bool, prebuilds_runtime::db::DbError> {
    let client = pool.get().await?;
    Ok(settings::reconciliation_paused(&client).await?)
}
