//! Bounded, jittered retries of operations whose errors know whether retrying can help.

use std::{future::Future, time::Duration};

use backon::{ExponentialBuilder, Retryable};

/// Errors that know whether retrying can help.
pub trait Transient {
    fn is_transient(&self) -> bool;
}

/// The retry policy for transient failures: jittered exponential backoff, bounded.
pub fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(5)
        .with_jitter()
}

/// Runs `op` again while it fails with a transient error, at most [`retry_policy`] times.
pub async fn with_retries<T, E, F, Fut>(op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: Transient + std::fmt::Display,
{
    op.retry(retry_policy())
        .sleep(tokio::time::sleep)
        .when(|e: &E| e.is_transient())
        .notify(|e: &E, after| tracing::warn!(error = %e, retry_in = ?after, "transient failure, retrying"))
        .await
}
