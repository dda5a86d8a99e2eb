//! The transactional outbox. Whatever a process must publish because of a database change is
//! written to the `outbox` table in the same transaction as the change ([`enqueue`]); the
//! [`Relay`] publishes committed rows with confirms and marks them published. A crash between the
//! publish and the mark re-publishes the row later, so delivery is at least once and consumers
//! dedupe by the CloudEvents `id` (which is the row's `message_id`).
//!
//! Relays coordinate through leases, not transactions: rows are leased by one short UPDATE
//! (`FOR UPDATE SKIP LOCKED`), published with no transaction open, then marked. Two relays never
//! publish the same row at the same time, and an expired lease (a relay died mid-publish) makes the
//! row eligible again.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Pool};
use prebuilds_schemas::{messages::Payload, CloudEvent};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    amqp::{publisher::Outgoing, Publisher},
    db::DbError,
    metrics::ServiceMetrics,
};

/// The outbox insert: $1 message id, $2 routing key, $3 the whole envelope, $4 and $5 the writer's
/// `traceparent` and `tracestate` ([`crate::tracing_context::columns`]; NULL outside a span).
/// Exposed for callers that pipeline it with their own statements.
pub const ENQUEUE_SQL: &str =
    "INSERT INTO outbox (message_id, routing_key, body, traceparent, tracestate)
     VALUES ($1, $2, $3, $4, $5)
     ON CONFLICT (message_id) DO NOTHING";

/// Writes `event` to the outbox inside the caller's transaction (or statement), with the current
/// span's trace context.
pub async fn enqueue<C: GenericClient, T: Payload>(
    client: &C,
    event: &CloudEvent<T>,
) -> Result<(), tokio_postgres::Error> {
    let statement = client.prepare_cached(ENQUEUE_SQL).await?;
    let (traceparent, tracestate) = crate::tracing_context::columns();
    client
        .execute(
            &statement,
            &[
                &event.id,
                &event.routing_key(),
                &event.to_json(),
                &traceparent,
                &tracestate,
            ],
        )
        .await?;
    Ok(())
}

/// Relay settings.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows leased per pass.
    pub batch_size: i64,
    /// How long a lease protects a row from other relays.
    pub lease: Duration,
    /// Poll period when nobody wakes the relay (rows written by other processes).
    pub poll_interval: Duration,
    /// Published rows older than this are deleted.
    pub retention: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            batch_size: 200,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            retention: Duration::from_secs(3600),
        }
    }
}

/// Publishes committed outbox rows.
#[derive(Debug, Clone)]
pub struct Relay {
    pool: Pool,
    publisher: Arc<Publisher>,
    wake: Arc<Notify>,
    config: RelayConfig,
    metrics: Option<ServiceMetrics>,
}

struct LeasedRow {
    id: i64,
    message_id: Uuid,
    routing_key: String,
    body: serde_json::Value,
    /// The trace of the transaction that wrote the row.
    trace: Option<crate::tracing_context::Remote>,
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PassReport {
    pub published: usize,
    pub failed: usize,
}

impl Relay {
    pub fn new(pool: Pool, publisher: Arc<Publisher>, config: RelayConfig) -> Self {
        Relay {
            pool,
            publisher,
            wake: Arc::new(Notify::new()),
            config,
            metrics: None,
        }
    }

    pub fn with_metrics(mut self, metrics: ServiceMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// A handle writers call after committing outbox rows, so they go out without waiting for the
    /// next poll (this is what makes replenishment sub-second).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs passes until `shutdown`; a final pass flushes what was committed before it.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut last_cleanup = std::time::Instant::now();
        // Due at once on the first pass.
        let mut last_backlog = std::time::Instant::now()
            .checked_sub(Duration::from_secs(1))
            .unwrap_or_else(std::time::Instant::now);
        loop {
            let report = match self.pass().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay pass failed");
                    PassReport::default()
                }
            };
            // The backlog gauges cost a query: refresh them once a second, not on every wake-up
            // (a busy worker wakes the relay after every commit).
            if last_backlog.elapsed() >= Duration::from_secs(1) {
                last_backlog = std::time::Instant::now();
                if let Err(e) = self.refresh_backlog().await {
                    tracing::warn!(error = %e, "outbox backlog query failed");
                }
            }
            if last_cleanup.elapsed() > Duration::from_secs(60) {
                last_cleanup = std::time::Instant::now();
                if let Err(e) = self.cleanup().await {
                    tracing::warn!(error = %e, "outbox clean-up failed");
                }
            }
            // A full batch means more rows are probably waiting: go again at once.
            if report.published as i64 >= self.config.batch_size && report.failed == 0 {
                continue;
            }
            let idle = if report.failed > 0 {
                // The broker is likely down: don't spin.
                Duration::from_secs(1)
            } else {
                self.config.poll_interval
            };
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(idle) => {}
                _ = shutdown.cancelled() => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), self.pass()).await;
                    return;
                }
            }
        }
    }

    /// Leases, publishes and marks one batch.
    pub async fn pass(&self) -> Result<PassReport, DbError> {
        let rows = self.lease().await?;
        let mut report = PassReport::default();
        if !rows.is_empty() {
            // A span only for passes that publish: an idle relay polls four times a second.
            let pass_span = tracing::info_span!("outbox.relay", rows = rows.len());
            let exchange = self.publisher.topology().exchange();
            let publishes = rows.iter().map(|row| {
                let exchange = exchange.clone();
                // Each message is published in the trace of the transaction that wrote it (a
                // producer span, child of the writer's span); a row without one in the pass's.
                let span = tracing::info_span!(
                    parent: &pass_span,
                    "outbox.publish",
                    otel.name = %format_args!("{} publish", row.routing_key),
                    otel.kind = "producer",
                    messaging.system = "rabbitmq",
                    messaging.destination.name = %row.routing_key,
                    messaging.message.id = %row.message_id,
                );
                if let Some(trace) = &row.trace {
                    crate::tracing_context::set_parent(&span, trace);
                }
                tracing::Instrument::instrument(
                    async move {
                        let body = serde_json::to_vec(&row.body).expect("JSON values serialise");
                        let mut message = Outgoing::new(&exchange, &row.routing_key, &body);
                        message.message_id = Some(row.message_id.to_string());
                        message.event_type = row
                            .body
                            .get("type")
                            .and_then(|t| t.as_str())
                            .map(str::to_owned);
                        (row.id, self.publisher.publish(message).await)
                    },
                    span,
                )
            });
            let results = futures::future::join_all(publishes).await;
            let mut published = Vec::new();
            let mut failed = Vec::new();
            for (id, result) in results {
                match result {
                    Ok(()) => published.push(id),
                    Err(e) => failed.push((id, e.to_string())),
                }
            }
            report.published = published.len();
            report.failed = failed.len();
            self.settle(&published, &failed).await?;
            if let Some(m) = &self.metrics {
                m.outbox_published.inc_by(published.len() as u64);
            }
            if let Some((_, first_error)) = failed.first() {
                tracing::warn!(failed = failed.len(), error = %first_error, "outbox rows not published; will retry");
            }
        }
        Ok(report)
    }

    /// Refreshes the backlog gauges (pending rows, age of the oldest).
    async fn refresh_backlog(&self) -> Result<(), DbError> {
        let Some(m) = &self.metrics else {
            return Ok(());
        };
        let (pending, oldest) = self.backlog().await?;
        m.outbox_pending.set(pending);
        let lag = oldest
            .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        m.outbox_lag_seconds.set(lag);
        Ok(())
    }

    async fn lease(&self) -> Result<Vec<LeasedRow>, DbError> {
        let client = self.pool.get().await?;
        let lease_secs = self.config.lease.as_secs_f64();
        let rows = client
            .query(
                include_str!("sql/outbox_lease.sql"),
                &[&self.config.batch_size, &lease_secs],
            )
            .await?;
        let mut rows: Vec<LeasedRow> = rows
            .into_iter()
            .map(|r| LeasedRow {
                id: r.get("id"),
                message_id: r.get("message_id"),
                routing_key: r.get("routing_key"),
                body: r.get("body"),
                trace: crate::tracing_context::from_columns(
                    r.get::<_, Option<&str>>("traceparent"),
                    r.get::<_, Option<&str>>("tracestate"),
                ),
            })
            .collect();
        // `UPDATE … RETURNING` returns rows in the order the update met them, not the order of the
        // subquery that chose them: put them back in commit (id) order before publishing.
        rows.sort_unstable_by_key(|r| r.id);
        Ok(rows)
    }

    async fn settle(&self, published: &[i64], failed: &[(i64, String)]) -> Result<(), DbError> {
        let client = self.pool.get().await?;
        if !published.is_empty() {
            client
                .execute(
                    "UPDATE outbox SET published_at = now(), leased_until = NULL, last_error = NULL
                     WHERE id = ANY($1)",
                    &[&published],
                )
                .await?;
        }
        for (id, error) in failed {
            // Back off per row: the lease already keeps it for `lease`; shorten it so a broker
            // that comes back is used within seconds.
            client
                .execute(
                    "UPDATE outbox SET leased_until = now() + interval '1 second', last_error = $2
                     WHERE id = $1",
                    &[id, error],
                )
                .await?;
        }
        Ok(())
    }

    async fn backlog(&self) -> Result<(i64, Option<DateTime<Utc>>), DbError> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT count(*) AS pending, min(created_at) AS oldest
                 FROM outbox WHERE published_at IS NULL",
                &[],
            )
            .await?;
        Ok((row.get("pending"), row.get("oldest")))
    }

    async fn cleanup(&self) -> Result<u64, DbError> {
        let client = self.pool.get().await?;
        let secs = self.config.retention.as_secs_f64();
        Ok(client
            .execute(
                "DELETE FROM outbox
                 WHERE published_at IS NOT NULL
                   AND published_at < now() - make_interval(secs => $1)",
                &[&secs],
            )
            .await?)
    }

    /// Publishes everything committed so far, for short-lived processes (the CLI) that write the
    /// outbox and exit. Gives up after `deadline`, leaving the rest for a long-running relay.
    pub async fn drain(&self, deadline: Duration) -> Result<PassReport, DbError> {
        let started = std::time::Instant::now();
        let mut total = PassReport::default();
        loop {
            let report = self.pass().await?;
            total.published += report.published;
            total.failed += report.failed;
            if report.published == 0 && report.failed == 0 {
                return Ok(total);
            }
            if started.elapsed() > deadline {
                return Ok(total);
            }
            if report.failed > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
