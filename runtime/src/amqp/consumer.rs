//! The consumer supervisor: one loop per queue that (re)connects, declares the topology (or, in
//! check mode, checks that its queue exists and names it when it does not), consumes
//! with a bounded prefetch, runs the handler for each delivery and settles it exactly once:
//!
//! 1. `Ok` → ack (the handler has committed its effects).
//! 2. [`HandlerError::Permanent`] → republish to the dead-letter exchange with the reason in the
//!    `x-prebuilds-dead-reason` header, then ack; never requeued. If that republish fails the
//!    delivery is rejected without requeue, so the broker dead-letters it (without our header).
//! 3. [`HandlerError::Transient`] → retried in place with jittered backoff for up to
//!    [`ConsumerSpec::transient_window`]. When the window runs out the database is probed
//!    ([`ConsumerContext::database`]): if it does not answer, the delivery is *held* — kept
//!    unacknowledged, probing until the database answers, then retried with a fresh window — so
//!    an outage of any length spends none of the delivery limit, and with every prefetch slot
//!    held the broker sends this consumer nothing more. If the database answers (the failure is
//!    something else), the delivery is rejected *with* requeue, so the queue's delivery limit
//!    bounds the total attempts (5 windows).
//! 4. [`HandlerError::Defer`] → the message is valid but overtook one it follows (a provisioner
//!    event before its job's earlier event). Retried in place for [`DEFER_WINDOW`], then
//!    requeued so the delivery slot serves other messages meanwhile; on the queue's last allowed
//!    delivery it is dead-lettered with its reason, like a permanent failure.
//!
//! The loop survives broker restarts and lost nodes (reconnect at once, then with backoff, to the
//! next node of the list: in-flight handlers are not waited for, since their deliveries return to
//! the queue with the connection) and a broker-side consumer cancel (the stream ends: consume
//! again). On shutdown it cancels the consumer, lets in-flight handlers
//! finish within the drain bound, settles them, then closes the connection.

use std::{future::Future, sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        BasicRejectOptions,
    },
    types::FieldTable,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    amqp::{
        publisher::Outgoing, topology::DELIVERY_LIMIT, Broker, Entity, Publisher, QueueKind,
        Topology, TopologyError,
    },
    metrics::ServiceMetrics,
    Health,
};

/// Header carrying why this service dead-lettered a message.
pub const DEAD_REASON_HEADER: &str = "x-prebuilds-dead-reason";
/// Header naming the queue the dead-lettered message came from.
pub const DEAD_QUEUE_HEADER: &str = "x-prebuilds-source-queue";
/// Header of a message this process dead-letters: the broker user who published the original
/// (its validated `user_id` property), when it had one.
pub const DEAD_PUBLISHER_HEADER: &str = "x-prebuilds-publisher";

/// A delivery as handlers see it: owned, so handlers can run on their own task.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub routing_key: String,
    pub redelivered: bool,
    pub message_id: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    pub content_type: Option<String>,
    /// The AMQP `user_id` property. RabbitMQ refuses a publish whose `user_id` is not the
    /// connection's user, so when present it names the broker user who published
    /// ([`super::trust::Publishers`]).
    pub user_id: Option<String>,
    /// Earlier deliveries of this message that were returned to the queue (the broker's
    /// `x-delivery-count`; 0 on the first delivery).
    pub delivery_count: i64,
}

impl Incoming {
    fn from_delivery(delivery: &Delivery) -> Self {
        let props = &delivery.properties;
        Incoming {
            body: delivery.data.clone(),
            routing_key: delivery.routing_key.to_string(),
            redelivered: delivery.redelivered,
            message_id: props.message_id().as_ref().map(|s| s.to_string()),
            reply_to: props.reply_to().as_ref().map(|s| s.to_string()),
            correlation_id: props.correlation_id().as_ref().map(|s| s.to_string()),
            content_type: props.content_type().as_ref().map(|s| s.to_string()),
            user_id: props.user_id().as_ref().map(|s| s.to_string()),
            delivery_count: props
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(DELIVERY_COUNT_HEADER).cloned())
                .and_then(|v| integer(&v))
                .unwrap_or(0),
        }
    }
}

fn integer(value: &lapin::types::AMQPValue) -> Option<i64> {
    use lapin::types::AMQPValue as V;
    match *value {
        V::ShortShortInt(v) => Some(v.into()),
        V::ShortShortUInt(v) => Some(v.into()),
        V::ShortInt(v) => Some(v.into()),
        V::ShortUInt(v) => Some(v.into()),
        V::LongInt(v) => Some(v.into()),
        V::LongUInt(v) => Some(v.into()),
        V::LongLongInt(v) => Some(v),
        _ => None,
    }
}

/// How a handler failed, which decides what happens to the delivery.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The message can never succeed (bad body, schema violation, unknown ids): dead-letter now.
    /// `class` is a bounded label for metrics; `reason` is the full text for the header and logs.
    #[error("{reason}")]
    Permanent { class: &'static str, reason: String },
    /// The world is temporarily broken (database or broker down, serialization failure): retry.
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// Valid, but it must wait for another message to be applied first: retry a few times, then
    /// dead-letter with `class` and `reason` (see the module doc).
    #[error("{reason}")]
    Defer { class: &'static str, reason: String },
}

impl HandlerError {
    pub fn permanent(class: &'static str, reason: impl Into<String>) -> Self {
        HandlerError::Permanent {
            class,
            reason: reason.into(),
        }
    }

    pub fn defer(class: &'static str, reason: impl Into<String>) -> Self {
        HandlerError::Defer {
            class,
            reason: reason.into(),
        }
    }
}

/// How long one delivery of a deferred message is retried in place before it is requeued. Over
/// the delivery limit's deliveries this gives what it waits for about ten seconds to arrive.
pub const DEFER_WINDOW: Duration = Duration::from_secs(2);

/// The broker's header counting earlier failed deliveries of a quorum-queue message.
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Application logic for one queue.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, message: &Incoming) -> impl Future<Output = Result<(), HandlerError>> + Send;
}

/// What to consume and how much at once.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub queue: QueueKind,
    /// Unacknowledged deliveries in flight = concurrent handlers.
    pub prefetch: u16,
    /// Connection name shown in the management UI.
    pub connection_name: String,
    /// How long shutdown waits for in-flight handlers.
    pub drain_timeout: Duration,
    /// How long a delivery keeps being retried in place while its failure is transient (database
    /// or broker unreachable) before it is requeued. Requeues count toward the queue's delivery
    /// limit, so requeueing at once would dead-letter valid messages within seconds of an outage;
    /// retrying in place rides out restarts of this length without losing anything.
    pub transient_window: Duration,
}

/// Everything the supervisor needs besides the handler.
#[derive(Debug, Clone)]
pub struct ConsumerContext {
    pub broker: Broker,
    pub topology: Topology,
    /// Used to dead-letter with a reason header (separate connection from the consumer's).
    pub publisher: Arc<Publisher>,
    pub metrics: ServiceMetrics,
    pub health: Health,
    /// The database the handlers depend on, if any. While it does not answer, a delivery whose
    /// in-place retries ran out is held instead of requeued (see the module doc).
    pub database: Option<deadpool_postgres::Pool>,
}

enum SessionEnd {
    Shutdown,
    ConsumerCancelled,
}

/// Why a session ended early; either way the loop reconnects with backoff.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Topology(#[from] TopologyError),
}

/// Runs until `shutdown` is cancelled and in-flight work is settled (or the drain bound passed).
pub async fn run<H: Handler>(
    spec: ConsumerSpec,
    context: ConsumerContext,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let queue = context.topology.queue(spec.queue);
    let mut reconnect_delays = reconnect_backoff();
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match session(&spec, &context, &handler, &shutdown, &queue).await {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::ConsumerCancelled) => {
                tracing::warn!(%queue, "broker cancelled the consumer; consuming again");
                reconnect_delays = reconnect_backoff();
                sleep_or_shutdown(Duration::from_millis(200), &shutdown).await;
            }
            Err(e) => {
                context.health.set_broker(false);
                let delay = reconnect_delays.next().unwrap_or(Duration::from_secs(5));
                match &e {
                    // Retried like a lost broker: the operator may run `prebuildsctl migrate`
                    // any moment, and the error names what is missing.
                    SessionError::Topology(TopologyError::Missing { name, .. }) => {
                        tracing::warn!(%queue, missing = %name, error = %e, retry_in = ?delay, "the broker topology is incomplete; checking again")
                    }
                    _ => {
                        tracing::warn!(%queue, error = %e, retry_in = ?delay, "consumer lost the broker; reconnecting")
                    }
                }
                sleep_or_shutdown(delay, &shutdown).await;
            }
        }
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
        .with_jitter()
        .build()
}

async fn sleep_or_shutdown(delay: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.cancelled() => {}
    }
}

async fn session<H: Handler>(
    spec: &ConsumerSpec,
    context: &ConsumerContext,
    handler: &Arc<H>,
    shutdown: &CancellationToken,
    queue: &str,
) -> Result<SessionEnd, SessionError> {
    let connection = context.broker.connect(&spec.connection_name).await?;
    // The queue is all this loop uses itself; dead letters go through `context.publisher`, which
    // checks the dead-letter exchange it publishes to.
    context
        .topology
        .prepare(&connection, &[Entity::Queue(spec.queue)])
        .await?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(spec.prefetch.max(1), BasicQosOptions::default())
        .await?;
    let tag = format!("{}-{}", spec.connection_name, uuid::Uuid::new_v4().simple());
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    context.health.set_broker(true);
    tracing::info!(%queue, prefetch = spec.prefetch, "consuming");

    let in_flight = TaskTracker::new();
    let end = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Stop new deliveries; unacked ones we never started return to the queue when
                // the channel closes.
                let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                break Ok(SessionEnd::Shutdown);
            }
            next = consumer.next() => match next {
                None => break Ok(SessionEnd::ConsumerCancelled),
                Some(Err(e)) => break Err(e.into()),
                Some(Ok(delivery)) => {
                    // One span per delivery, continuing the publisher's trace when the message
                    // carries one (a `traceparent` that does not parse starts a new trace).
                    let span = crate::tracing_context::delivery_span(
                        spec.queue.suffix(),
                        delivery.properties.message_id().as_ref().map(|m| m.as_str()),
                        crate::tracing_context::extract(delivery.properties.headers().as_ref()).as_ref(),
                    );
                    let task = settle(delivery, spec.clone(), context.clone(), handler.clone(), shutdown.clone());
                    in_flight.spawn(tracing::Instrument::instrument(task, span));
                }
            }
        }
    };
    in_flight.close();
    if end.is_err() {
        // The connection is lost (a node died, say): in-flight deliveries can no longer be settled
        // on it and return to the queue, so waiting for their handlers would only delay the
        // reconnect (up to the drain bound) while the queue waits for a consumer. Reconnect at
        // once — to another node when the list has one — and let the handlers finish in the
        // background; their effects are idempotent, and the redelivery finds them done.
        tracing::warn!(%queue, in_flight = in_flight.len(), "connection lost; reconnecting without waiting for in-flight handlers (their deliveries are redelivered)");
        return end;
    }
    if !crate::shutdown::within(spec.drain_timeout, in_flight.wait()).await {
        tracing::warn!(%queue, "in-flight handlers did not finish within the drain bound; their deliveries will be redelivered");
    }
    let _ = connection.close(200, "bye".into()).await;
    end
}

async fn settle<H: Handler>(
    delivery: Delivery,
    spec: ConsumerSpec,
    context: ConsumerContext,
    handler: Arc<H>,
    shutdown: CancellationToken,
) {
    let queue_label = spec.queue.suffix();
    let incoming = Incoming::from_delivery(&delivery);
    // Jittered exponential backoff capped at 5 s, bounded by the window in total time.
    let window = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
            .with_total_delay(Some(spec.transient_window))
            .with_jitter()
            .build()
    };
    let mut delays = window();
    let mut defer_delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_millis(500))
        .without_max_times()
        .with_total_delay(Some(DEFER_WINDOW))
        .with_jitter()
        .build();
    // Counted in `prebuilds_messages_in_retry` from its first transient failure until it settles.
    let mut in_retry: Option<InRetry> = None;
    let outcome = loop {
        if let Err(refused) = check_content_type(&incoming) {
            break Err(refused);
        }
        match handler.handle(&incoming).await {
            Err(HandlerError::Transient(e)) => {
                // A read-only or shutting-down server: the retry must get a fresh session.
                crate::db::note_failover_in(e.as_ref());
                match delays.next() {
                    Some(delay) if !shutdown.is_cancelled() => {
                        in_retry.get_or_insert_with(|| {
                            InRetry::start(
                                context.metrics.in_retry.with_label_values(&[queue_label]),
                            )
                        });
                        tracing::warn!(queue = queue_label, error = %format!("{e:#}"), retry_in = ?delay, "transient failure handling message; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            // Shutting down: stop retrying; the delivery is requeued below.
                            _ = shutdown.cancelled() => {}
                        }
                    }
                    _ if !shutdown.is_cancelled()
                        && held_while_database_down(&context, queue_label, &shutdown).await =>
                    {
                        // The database is back: a fresh window, as if the delivery had just arrived.
                        delays = window();
                    }
                    _ => break Err(HandlerError::Transient(e)),
                }
            }
            Err(HandlerError::Defer { class, reason }) => match defer_delays.next() {
                Some(delay) if !shutdown.is_cancelled() => {
                    tracing::debug!(queue = queue_label, class, %reason, retry_in = ?delay, "message deferred");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
                // This was the last delivery the queue allows: what it waits for is not coming.
                _ if incoming.delivery_count + 1 >= DELIVERY_LIMIT => {
                    break Err(HandlerError::Permanent {
                        class,
                        reason: format!(
                            "{reason}; still out of order after {} deliveries",
                            incoming.delivery_count + 1
                        ),
                    })
                }
                _ => break Err(HandlerError::Defer { class, reason }),
            },
            other => break other,
        }
    };
    let settled = match outcome {
        Ok(()) => {
            context
                .metrics
                .messages
                .with_label_values(&[queue_label, "ack"])
                .inc();
            delivery.ack(BasicAckOptions::default()).await
        }
        Err(HandlerError::Permanent { class, reason }) => {
            tracing::warn!(queue = queue_label, class, %reason, message_id = ?incoming.message_id, "dead-lettering message");
            context
                .metrics
                .messages
                .with_label_values(&[queue_label, "dead_lettered"])
                .inc();
            context
                .metrics
                .dead_lettered
                .with_label_values(&[queue_label, class])
                .inc();
            match dead_letter(&context, &incoming, queue_label, &reason).await {
                Ok(()) => delivery.ack(BasicAckOptions::default()).await,
                Err(e) => {
                    tracing::warn!(error = %e, "could not republish to the dead-letter exchange; rejecting so the broker dead-letters it");
                    delivery.reject(BasicRejectOptions { requeue: false }).await
                }
            }
        }
        Err(HandlerError::Defer { class, reason }) => {
            tracing::info!(queue = queue_label, class, %reason, deliveries = incoming.delivery_count + 1, "message still out of order; requeueing it");
            context
                .metrics
                .messages
                .with_label_values(&[queue_label, "deferred"])
                .inc();
            delivery.reject(BasicRejectOptions { requeue: true }).await
        }
        Err(HandlerError::Transient(e)) => {
            // Requeued either way; only why it stopped retrying (and so the log level) differs:
            // shutdown cut the retries short, or the transient window ran out.
            if shutdown.is_cancelled() {
                tracing::info!(queue = queue_label, error = %format!("{e:#}"), "shutting down during a transient failure; requeueing");
            } else {
                tracing::error!(queue = queue_label, error = %format!("{e:#}"), "giving up on this delivery for now; requeueing (the delivery limit bounds attempts)");
            }
            context
                .metrics
                .messages
                .with_label_values(&[queue_label, "requeued"])
                .inc();
            delivery.reject(BasicRejectOptions { requeue: true }).await
        }
    };
    drop(in_retry);
    if let Err(e) = settled {
        // The channel is gone; the broker redelivers the message, and handlers are idempotent.
        tracing::warn!(queue = queue_label, error = %e, "could not settle delivery; it will be redelivered");
    }
}

/// How long one probe of the database may take before it counts as unreachable.
const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Called when a delivery's in-place retries ran out. Returns false at once when there is no
/// database to wait for or it answers (the failure is something else: requeue, so the delivery
/// limit bounds it). Otherwise holds the delivery — probing with backoff up to 5 s — until the
/// database answers (true) or shutdown begins (false: requeue). A hold never spends a delivery
/// attempt; only the broker's consumer timeout (30 min by default) bounds it.
async fn held_while_database_down(
    context: &ConsumerContext,
    queue_label: &str,
    shutdown: &CancellationToken,
) -> bool {
    let Some(pool) = &context.database else {
        return false;
    };
    let answers = || async {
        matches!(
            tokio::time::timeout(DATABASE_PROBE_TIMEOUT, crate::db::ping(pool)).await,
            Ok(Ok(()))
        )
    };
    if answers().await {
        return false;
    }
    context.metrics.held.with_label_values(&[queue_label]).inc();
    tracing::warn!(
        queue = queue_label,
        "the database does not answer; holding this delivery until it does (not requeued, so its delivery limit is not spent)"
    );
    let mut probes = reconnect_backoff();
    loop {
        let delay = probes.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => return false,
        }
        if answers().await {
            tracing::info!(
                queue = queue_label,
                "the database answers again; retrying the held delivery"
            );
            return true;
        }
    }
}

/// One delivery counted in `prebuilds_messages_in_retry` while it lives.
struct InRetry(prometheus::IntGauge);

impl InRetry {
    fn start(gauge: prometheus::IntGauge) -> InRetry {
        gauge.inc();
        InRetry(gauge)
    }
}

impl Drop for InRetry {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Every queue carries JSON CloudEvents; a message that declares another content type is refused
/// before any handler parses it (a missing property is tolerated: the body is checked anyway).
fn check_content_type(incoming: &Incoming) -> Result<(), HandlerError> {
    match incoming.content_type.as_deref() {
        None | Some("application/json") | Some("application/cloudevents+json") => Ok(()),
        Some(other) => Err(HandlerError::permanent(
            "content_type",
            format!("content type {other:?} is not application/json"),
        )),
    }
}

async fn dead_letter(
    context: &ConsumerContext,
    incoming: &Incoming,
    queue_label: &str,
    reason: &str,
) -> Result<(), crate::amqp::PublishError> {
    let exchange = context.topology.dead_letter_exchange();
    // Header values are bounded so a huge error text cannot blow up the frame.
    let reason: String = reason.chars().take(1000).collect();
    let mut message = Outgoing::new(&exchange, &incoming.routing_key, &incoming.body)
        .header(DEAD_REASON_HEADER, reason)
        .header(
            DEAD_QUEUE_HEADER,
            context.topology.queue_name_for_label(queue_label),
        );
    message.message_id = incoming.message_id.clone();
    message.correlation_id = incoming.correlation_id.clone();
    message.reply_to = incoming.reply_to.clone();
    if let Some(user) = &incoming.user_id {
        // The dead letter is published as this process's user: keep who sent the original.
        message = message.header(DEAD_PUBLISHER_HEADER, user.clone());
    }
    context.publisher.publish(message).await
}
