//! Request/reply over RabbitMQ's direct reply-to (`amq.rabbitmq.reply-to`): no reply queue to
//! declare or clean up, and replies travel without touching disk. One client multiplexes any
//! number of concurrent calls on one channel, matching replies by `correlation_id` (used by the CLI,
//! the test harness and the benchmarks to call the claim RPC).

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions},
    types::FieldTable,
    BasicProperties, Connection,
};
use prebuilds_schemas::{messages::Payload, CloudEvent, RawEvent};
use tokio::sync::{oneshot, Mutex};

use crate::amqp::{Broker, Topology};

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("the request was unroutable (is the topology declared and a worker running?)")]
    Unroutable,
    #[error("the reply consumer stopped (connection lost)")]
    Closed,
    /// The broker refused the request (a negative confirm). Reconnect before asking again: a
    /// channel's view of a quorum queue can stay stale after a node loss (see
    /// [`super::Publisher::publish`]).
    #[error("the broker refused (nacked) the request")]
    Nacked,
    #[error("reply is not a valid message: {0}")]
    BadReply(String),
}

/// A request/reply client on its own connection.
#[derive(Debug)]
pub struct RpcClient {
    _connection: Connection,
    /// The AMQP `user_id` of every request: the connection's broker user ([`Broker::user`]), so
    /// workers with `PREBUILDS_CLAIM_PUBLISHERS` can check who sent it.
    user_id: Option<String>,
    channel: lapin::Channel,
    topology: Topology,
    pending: Pending,
}

impl RpcClient {
    pub async fn connect(
        broker: impl Into<Broker>,
        name: &str,
        topology: Topology,
    ) -> Result<Self, RpcError> {
        let broker = broker.into();
        let user_id = broker.user();
        let connection = broker.connect(name).await?;
        let channel = connection.create_channel().await?;
        // Confirms let an unroutable request fail fast instead of timing out.
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        // Direct reply-to requires consuming (no-ack) before the first publish on the channel.
        let mut replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "rpc-replies".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let pending: Pending = Arc::default();
        let routes = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let Some(id) = delivery.properties.correlation_id().as_ref() else {
                    continue;
                };
                if let Some(waiter) = routes.lock().await.remove(id.as_str()) {
                    let _ = waiter.send(delivery.data);
                }
            }
            // Dropping the senders wakes every waiter with `Closed`.
            routes.lock().await.clear();
        });
        Ok(RpcClient {
            _connection: connection,
            user_id,
            channel,
            topology,
            pending,
        })
    }

    /// Publishes `request` on the topic exchange and waits for the reply's body.
    pub async fn call_raw<T: Payload>(
        &self,
        request: &CloudEvent<T>,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let body = serde_json::to_vec(request).expect("messages serialise");
        let exchange = self.topology.exchange();
        self.request(
            &exchange,
            &request.routing_key(),
            &body,
            &request.id.to_string(),
            &request.event_type,
            timeout,
        )
        .await
    }

    /// Publishes `body` to `exchange` with `routing_key` and waits for the reply carrying
    /// `correlation_id` (also the request's message id).
    pub async fn request(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        correlation_id: &str,
        message_type: &str,
        timeout: Duration,
    ) -> Result<Vec<u8>, RpcError> {
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .await
            .insert(correlation_id.to_owned(), tx);
        let mut properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(correlation_id.into())
            .with_type(message_type.into())
            .with_correlation_id(correlation_id.into())
            .with_reply_to(DIRECT_REPLY_TO.into());
        // The caller's trace continues in the worker that answers.
        let mut headers = FieldTable::default();
        crate::tracing_context::inject(&mut headers);
        if !headers.inner().is_empty() {
            properties = properties.with_headers(headers);
        }
        if let Some(user) = &self.user_id {
            properties = properties.with_user_id(user.as_str().into());
        }
        let outcome = async {
            let confirm = self
                .channel
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    properties,
                )
                .await?;
            // The reply can arrive before the confirm: wait for both at once, but a refused or
            // unroutable request fails as soon as its confirm says so, not after the timeout.
            let reply = tokio::time::timeout(timeout, rx);
            tokio::pin!(reply);
            let confirmed = tokio::select! {
                answered = &mut reply => Some(answered),
                confirmation = tokio::time::timeout(timeout, confirm) => {
                    match confirmation {
                        Ok(Ok(
                            lapin::Confirmation::Ack(Some(_)) | lapin::Confirmation::Nack(Some(_)),
                        )) => return Err(RpcError::Unroutable),
                        Ok(Ok(lapin::Confirmation::Nack(None))) => return Err(RpcError::Nacked),
                        Ok(Err(e)) => return Err(RpcError::Broker(e)),
                        _ => None,
                    }
                }
            };
            let reply = match confirmed {
                Some(answered) => answered,
                None => reply.await,
            };
            match reply {
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(_)) => Err(RpcError::Closed),
                Err(_) => Err(RpcError::Timeout(timeout)),
            }
        }
        .await;
        if outcome.is_err() {
            self.pending.lock().await.remove(correlation_id);
        }
        outcome
    }

    /// [`Self::call_raw`], decoding the reply as `R`.
    pub async fn call<T: Payload, R: Payload + serde::de::DeserializeOwned>(
        &self,
        request: &CloudEvent<T>,
        timeout: Duration,
    ) -> Result<CloudEvent<R>, RpcError> {
        let body = self.call_raw(request, timeout).await?;
        RawEvent::parse(&body)
            .and_then(|raw| raw.decode::<R>())
            .map_err(|e| RpcError::BadReply(e.to_string()))
    }
}
