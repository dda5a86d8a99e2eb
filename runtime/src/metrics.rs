//! Counters every service process exports about its own plumbing (docs/metrics.md "Every consuming process": the service's own
//! counters"): messages handled by queue and outcome, dead letters by queue and reason class, and the
//! outbox backlog. Registered on the process's one `Registry`, passed in explicitly so tests stay
//! isolated.

use prometheus::{Gauge, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    /// `prebuilds_messages_total{queue, outcome}`; outcome ∈ ack, dead_lettered, requeued, duplicate.
    pub messages: IntCounterVec,
    /// `prebuilds_dead_lettered_total{queue, reason}`; reason is a bounded class, never free text.
    pub dead_lettered: IntCounterVec,
    /// `prebuilds_messages_in_retry{queue}`: deliveries held unacknowledged right now in in-place
    /// retries after a transient failure (the database is down, say). The broker counts them as
    /// neither ready nor settled: "nothing queued" is not "nothing in flight" while this is > 0.
    pub in_retry: IntGaugeVec,
    /// `prebuilds_messages_held_total{queue}`: deliveries whose in-place retries ran out while the
    /// database did not answer, held (not requeued, so the delivery limit is not spent) until it
    /// answered again.
    pub held: IntCounterVec,
    /// `prebuilds_outbox_published_total`.
    pub outbox_published: prometheus::IntCounter,
    /// `prebuilds_outbox_pending`: rows not yet published at the last relay pass.
    pub outbox_pending: IntGauge,
    /// `prebuilds_outbox_lag_seconds`: age of the oldest unpublished row at the last relay pass.
    pub outbox_lag_seconds: Gauge,
}

impl ServiceMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let messages = IntCounterVec::new(
            Opts::new(
                "prebuilds_messages_total",
                "Messages consumed, by queue and outcome.",
            ),
            &["queue", "outcome"],
        )?;
        let dead_lettered = IntCounterVec::new(
            Opts::new(
                "prebuilds_dead_lettered_total",
                "Messages dead-lettered by this process, by queue and reason class.",
            ),
            &["queue", "reason"],
        )?;
        let in_retry = IntGaugeVec::new(
            Opts::new(
                "prebuilds_messages_in_retry",
                "Deliveries held unacknowledged in in-place retries after a transient failure.",
            ),
            &["queue"],
        )?;
        let held = IntCounterVec::new(
            Opts::new(
                "prebuilds_messages_held_total",
                "Deliveries held through a database outage instead of being requeued.",
            ),
            &["queue"],
        )?;
        let outbox_published = prometheus::IntCounter::new(
            "prebuilds_outbox_published_total",
            "Outbox rows published to RabbitMQ with a confirm.",
        )?;
        let outbox_pending = IntGauge::new(
            "prebuilds_outbox_pending",
            "Outbox rows not yet published at the last relay pass.",
        )?;
        let outbox_lag_seconds = Gauge::new(
            "prebuilds_outbox_lag_seconds",
            "Age of the oldest unpublished outbox row at the last relay pass.",
        )?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(dead_lettered.clone()))?;
        registry.register(Box::new(in_retry.clone()))?;
        registry.register(Box::new(held.clone()))?;
        registry.register(Box::new(outbox_published.clone()))?;
        registry.register(Box::new(outbox_pending.clone()))?;
        registry.register(Box::new(outbox_lag_seconds.clone()))?;
        Ok(ServiceMetrics {
            messages,
            dead_lettered,
            in_retry,
            held,
            outbox_published,
            outbox_pending,
            outbox_lag_seconds,
        })
    }
}
