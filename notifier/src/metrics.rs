//! The notifier's own metrics, registered on the process registry next to the runtime's message
//! counters (`prebuilds_messages_total{queue="notifications",…}`,
//! `prebuilds_dead_lettered_total`).

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Outcomes of `prebuilds_notifications_total`, one per way a delivery can end or pause.
pub mod outcome {
    /// The receiver accepted it.
    pub const SENT: &str = "sent";
    /// A retryable failure; another attempt follows.
    pub const RETRIED: &str = "retried";
    /// Refused for good or out of attempts; the message is dead-lettered.
    pub const FAILED: &str = "failed";
    /// Nothing to send to (a user without an e-mail address).
    pub const SKIPPED: &str = "skipped";
    /// Already settled when the message came (a duplicate or redelivered message): nothing sent.
    pub const DUPLICATE: &str = "duplicate";
    /// Found held by a notifier that stopped mid-attempt: not sent again.
    pub const INTERRUPTED: &str = "interrupted";
}

#[derive(Debug, Clone)]
pub struct NotifierMetrics {
    /// `prebuilds_notifications_total{channel, outcome}` (see [`outcome`]).
    pub deliveries: IntCounterVec,
    /// `prebuilds_notification_attempt_seconds{channel}`: one attempt, connect to answer.
    pub attempt_seconds: HistogramVec,
    /// `prebuilds_notification_latency_seconds{channel}`: notification written → delivered.
    pub latency_seconds: HistogramVec,
}

impl NotifierMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let deliveries = IntCounterVec::new(
            Opts::new(
                "prebuilds_notifications_total",
                "Notification deliveries by channel (webhook, email) and outcome (sent, retried, failed, skipped, duplicate, interrupted).",
            ),
            &["channel", "outcome"],
        )?;
        let attempt_seconds = HistogramVec::new(
            HistogramOpts::new(
                "prebuilds_notification_attempt_seconds",
                "Duration of one delivery attempt, connect to answer.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["channel"],
        )?;
        let latency_seconds = HistogramVec::new(
            HistogramOpts::new(
                "prebuilds_notification_latency_seconds",
                "Time from a notification being written to its delivery being accepted.",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
            ]),
            &["channel"],
        )?;
        registry.register(Box::new(deliveries.clone()))?;
        registry.register(Box::new(attempt_seconds.clone()))?;
        registry.register(Box::new(latency_seconds.clone()))?;
        Ok(NotifierMetrics {
            deliveries,
            attempt_seconds,
            latency_seconds,
        })
    }
}
