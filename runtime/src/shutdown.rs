//! Graceful shutdown: SIGTERM or SIGINT cancels one token that every component watches; components
//! stop taking work, finish what they hold within the configured bound, then return.

use std::{future::Future, time::Duration};

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = SIGNALLED.set(std::time::Instant::now());
        tracing::info!("shutdown signal received, draining");
        trigger.cancel();
    });
    token
}

/// When the first shutdown signal arrived.
static SIGNALLED: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// What is left of a shutdown budget of `total` counted from the signal (all of it when no
/// signal arrived: the process is stopping for another reason). Used for the last step, the span
/// export flush.
pub fn remaining(total: Duration) -> Duration {
    SIGNALLED
        .get()
        .map_or(total, |at| total.saturating_sub(at.elapsed()))
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; only process kill will stop this process");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

/// Runs `work` to completion, or gives up `bound` after it started; returns whether it finished.
pub async fn within<F: Future>(bound: Duration, work: F) -> bool {
    tokio::time::timeout(bound, work).await.is_ok()
}

/// The one time budget of a shutdown (`PREBUILDS_SHUTDOWN_TIMEOUT`), counted from the signal: every
/// step of a drain takes what is left of it, so the process exits within the budget in total —
/// under Kubernetes' default 30 s grace period with the default 25 s — instead of adding one bound
/// per step.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    deadline: tokio::time::Instant,
}

impl Budget {
    /// Starts counting `total` now.
    pub fn start(total: Duration) -> Budget {
        Budget {
            deadline: tokio::time::Instant::now() + total,
        }
    }

    /// What is left (zero once spent).
    pub fn remaining(&self) -> Duration {
        self.deadline
            .saturating_duration_since(tokio::time::Instant::now())
    }
}

/// The share of a shutdown budget that consumers may spend letting in-flight handlers finish; the
/// rest is kept for settling them, flushing the outbox and closing connections.
pub fn drain_share(total: Duration) -> Duration {
    total.mul_f64(0.8)
}
