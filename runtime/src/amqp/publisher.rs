//! Publishing with publisher confirms, `mandatory` routing and a deadline. A publish succeeds only
//! when the broker confirmed it *and* routed it to at least one queue: an unroutable message comes
//! back as an ack carrying the returned message, which is reported as [`PublishError::Unroutable`]
//! rather than silently dropped. ([`Publisher::unconfirmed`] trades all of that for latency, for
//! best-effort traffic only.) The publisher owns its own connection (flow control on publishing
//! must not stall a consumer's acks) and reconnects lazily after a failure; on each connect it
//! declares the topology, or checks the [`Entity`]s it was told it uses ([`Publisher::uses`]).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use lapin::{
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel, Confirmation, Connection,
};
use prebuilds_schemas::{messages::Payload, CloudEvent};
use tokio::sync::Mutex;

use crate::amqp::{Broker, Entity, Topology, TopologyError};

/// How long one publish may wait for its confirm before it is reported as failed. A publish can
/// hang while the broker shuts down; the caller retries (the outbox row stays unpublished).
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(
        "message to {exchange:?} with routing key {routing_key:?} was unroutable (no queue bound)"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("broker refused (nacked) the message with routing key {0:?}")]
    Nacked(String),
    #[error("no confirm from the broker within {0:?}")]
    Timeout(Duration),
    #[error("broker connection: {0}")]
    Broker(#[from] lapin::Error),
    /// The topology could not be declared, or a part this publisher uses is missing (boxed: it is
    /// rare and large, and every publish returns this type).
    #[error("{0}")]
    Topology(Box<TopologyError>),
}

impl From<TopologyError> for PublishError {
    fn from(e: TopologyError) -> Self {
        PublishError::Topology(Box::new(e))
    }
}

impl PublishError {
    /// Every publish error is worth retrying later except an unroutable message, which needs the
    /// topology fixed (or, for a reply, means the requester is gone). A missing exchange or queue
    /// is retried: it appears once an operator runs `prebuildsctl migrate`.
    pub fn is_transient(&self) -> bool {
        !matches!(self, PublishError::Unroutable { .. })
    }
}

impl crate::retry::Transient for PublishError {
    fn is_transient(&self) -> bool {
        PublishError::is_transient(self)
    }
}

/// A confirming publisher; cheap to share behind an `Arc`, safe to call concurrently.
#[derive(Debug)]
pub struct Publisher {
    broker: Broker,
    name: String,
    topology: Topology,
    /// Whether publishes wait for a broker confirm (everything durable) or only for the frame to be
    /// written (best-effort traffic such as RPC replies, which must not queue behind the confirms of
    /// persistent messages).
    confirms: bool,
    /// What this publisher's messages need (checked on connect in check mode).
    uses: Vec<Entity>,
    /// The AMQP `user_id` set on every message: the broker user of the connection
    /// ([`Broker::user`]).
    user_id: Option<String>,
    state: Mutex<Option<Session>>,
    /// Sessions opened so far (numbers [`Session`]s).
    sessions: AtomicU64,
}

/// The publisher's connection and channel, numbered so that a failed publish resets only the
/// session it failed on, never a fresh one another publish has opened meanwhile.
#[derive(Debug)]
struct Session {
    connection: Connection,
    channel: Channel,
    number: u64,
}

/// One message ready to go on the wire.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub message_id: Option<String>,
    pub event_type: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub headers: FieldTable,
    /// Ask the broker to return the message when no queue takes it (on by default).
    pub mandatory: bool,
    /// Persist the message (on by default).
    pub persistent: bool,
}

impl<'a> Outgoing<'a> {
    pub fn new(exchange: &'a str, routing_key: &'a str, body: &'a [u8]) -> Self {
        Outgoing {
            exchange,
            routing_key,
            body,
            message_id: None,
            event_type: None,
            correlation_id: None,
            reply_to: None,
            headers: FieldTable::default(),
            mandatory: true,
            persistent: true,
        }
    }

    pub fn header(mut self, key: &str, value: impl Into<String>) -> Self {
        let value: String = value.into();
        self.headers
            .insert(ShortString::from(key), AMQPValue::LongString(value.into()));
        self
    }
}

impl Publisher {
    /// `name` shows up as the connection name in the RabbitMQ management UI. Uses the topic
    /// exchange; name the rest with [`Self::uses`].
    pub fn new(broker: impl Into<Broker>, name: impl Into<String>, topology: Topology) -> Self {
        let broker = broker.into();
        Publisher {
            user_id: broker.user(),
            broker,
            name: name.into(),
            topology,
            confirms: true,
            uses: vec![Entity::Exchange],
            state: Mutex::new(None),
            sessions: AtomicU64::new(0),
        }
    }

    /// The exchanges this publisher publishes to and the queues its messages must reach, checked in
    /// this order on every connect when the topology is only checked (the first missing one is
    /// reported by name). Replaces the default (the topic exchange).
    pub fn uses(mut self, entities: &[Entity]) -> Self {
        self.uses = entities.to_vec();
        self
    }

    /// A publisher that does not wait for confirms, for best-effort messages (RPC replies: a lost
    /// reply is recovered by the client retrying with the same request id).
    pub fn unconfirmed(
        broker: impl Into<Broker>,
        name: impl Into<String>,
        topology: Topology,
    ) -> Self {
        Publisher {
            confirms: false,
            ..Publisher::new(broker, name, topology)
        }
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Connects (if needed) and declares or checks the topology; lets a process fail fast at
    /// start-up.
    pub async fn ensure_connected(&self) -> Result<(), PublishError> {
        self.channel().await.map(|_| ())
    }

    async fn channel(&self) -> Result<(Channel, u64), PublishError> {
        let mut state = self.state.lock().await;
        if let Some(session) = state.as_ref() {
            if session.connection.status().connected() && session.channel.status().connected() {
                return Ok((session.channel.clone(), session.number));
            }
        }
        let number = self.sessions.fetch_add(1, Ordering::Relaxed);
        let connection = self.broker.connect(&self.name).await?;
        self.topology.prepare(&connection, &self.uses).await?;
        let channel = connection.create_channel().await?;
        if self.confirms {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        *state = Some(Session {
            connection,
            channel: channel.clone(),
            number,
        });
        Ok((channel, number))
    }

    /// Closes session `number` (if it is still the current one): the next publish opens a fresh
    /// connection and channel.
    async fn forget_session(&self, number: u64) {
        let mut state = self.state.lock().await;
        if state.as_ref().is_some_and(|s| s.number == number) {
            if let Some(session) = state.take() {
                drop(state);
                let _ = session.connection.close(0, "publisher reset".into()).await;
            }
        }
    }

    /// Publishes a typed message to the topic exchange under its own routing key.
    pub async fn publish_event<T: Payload>(
        &self,
        event: &CloudEvent<T>,
    ) -> Result<(), PublishError> {
        let body = serde_json::to_vec(event).expect("message types serialise to JSON");
        let routing_key = event.routing_key();
        let exchange = self.topology.exchange();
        let mut message = Outgoing::new(&exchange, &routing_key, &body);
        message.message_id = Some(event.id.to_string());
        message.event_type = Some(event.event_type.clone());
        self.publish(message).await
    }

    /// Publishes one persistent message and waits for its confirm.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), PublishError> {
        let (channel, session) = self.channel().await?;
        // The trace the message continues: the one its caller put in the headers (the outbox
        // relay: the row's), else the current span's.
        let mut headers = message.headers.clone();
        crate::tracing_context::inject(&mut headers);
        let mut properties = BasicProperties::default()
            .with_delivery_mode(if message.persistent { 2 } else { 1 })
            .with_content_type("application/json".into())
            .with_headers(headers);
        if let Some(id) = &message.message_id {
            properties = properties.with_message_id(id.as_str().into());
        }
        if let Some(t) = &message.event_type {
            properties = properties.with_type(t.as_str().into());
        }
        if let Some(c) = &message.correlation_id {
            properties = properties.with_correlation_id(c.as_str().into());
        }
        if let Some(r) = &message.reply_to {
            properties = properties.with_reply_to(r.as_str().into());
        }
        // Who publishes, validated by the broker: consumers with publisher allow-lists accept
        // only listed users (`super::trust`).
        if let Some(user) = &self.user_id {
            properties = properties.with_user_id(user.as_str().into());
        }
        let confirm = async {
            channel
                .basic_publish(
                    message.exchange.into(),
                    message.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: message.mandatory,
                        ..Default::default()
                    },
                    message.body,
                    properties,
                )
                .await?
                .await
        };
        let outcome = match tokio::time::timeout(CONFIRM_TIMEOUT, confirm).await {
            Err(_) => Err(PublishError::Timeout(CONFIRM_TIMEOUT)),
            Ok(Err(e)) => Err(PublishError::Broker(e)),
            Ok(Ok(confirmation)) => classify(confirmation, &message),
        };
        if matches!(
            outcome,
            Err(PublishError::Broker(_) | PublishError::Timeout(_) | PublishError::Nacked(_))
        ) {
            // The channel may be dead or wedged: start from a fresh connection next time. A nack
            // counts too: RabbitMQ (3.x) keeps, per channel and quorum queue, the queue's members
            // as they were at the channel's first publish to it, leader first. A channel whose
            // first publish came while that leader's node was down (just lost, not yet replaced)
            // nacks every later publish to the queue, whatever the cluster does next; a fresh
            // channel starts from the queue's current leader.
            self.forget_session(session).await;
        }
        outcome
    }

    /// Closes the connection (pending confirms have already been awaited by their callers).
    pub async fn close(&self) {
        let session = self.state.lock().await.take();
        if let Some(session) = session {
            let _ = session.connection.close(0, "publisher reset".into()).await;
        }
    }
}

fn classify(confirmation: Confirmation, message: &Outgoing<'_>) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
            exchange: message.exchange.to_owned(),
            routing_key: message.routing_key.to_owned(),
        }),
        Confirmation::Nack(_) => Err(PublishError::Nacked(message.routing_key.to_owned())),
        // An unconfirmed publisher: the frame was written, which is all it promises.
        Confirmation::NotRequested => Ok(()),
    }
}
