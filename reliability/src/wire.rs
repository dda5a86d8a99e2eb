//! Watching and bending the wire:
//!
//! - [`Tap`]: a durable quorum queue of the suite's own, bound beside a work queue, recording every
//!   message published under a routing key (the service's consumers are not disturbed). Its
//!   consumer reconnects by itself across broker restarts.
//! - [`Relay`]: moves messages from one queue to another exchange, delivering each one `copies`
//!   times and shuffling each batch — the "every message twice and out of order" fault. Like the
//!   tap, it reconnects by itself.
//! - [`RawPublisher`]: publishes arbitrary bytes and properties with confirms (poison messages).
//! - [`queue_depth`]: messages ready in a queue.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
    BasicProperties, Channel, Connection, Consumer,
};
use prebuilds_runtime::amqp;
use rand::seq::SliceRandom;
use tokio_util::sync::CancellationToken;

/// One message as a tap saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub message_id: Option<String>,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    fn from_delivery(d: &Delivery) -> Seen {
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|h| {
                h.inner()
                    .iter()
                    .map(|(k, v)| (k.to_string(), header_text(v)))
                    .collect()
            })
            .unwrap_or_default();
        Seen {
            message_id: d.properties.message_id().as_ref().map(|s| s.to_string()),
            routing_key: d.routing_key.to_string(),
            body: d.data.clone(),
            headers,
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

fn header_text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-queue-type"),
        AMQPValue::LongString("quorum".into()),
    );
    args
}

async fn channel(url: &str, name: &str) -> Result<(Connection, Channel), lapin::Error> {
    let connection = amqp::connect(url, name).await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// Records every message routed to `queue` (declared and bound to `exchange` with `binding_key`).
#[derive(Debug)]
pub struct Tap {
    url: String,
    queue: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Tap {
    /// Declares and binds the tap queue (so nothing published afterwards is missed), then
    /// consumes it in the background.
    pub async fn start(
        url: &str,
        queue: String,
        exchange: String,
        binding_key: &str,
    ) -> anyhow::Result<Tap> {
        let (connection, ch) = channel(url, "reliability-tap").await?;
        declare_bound(&ch, &queue, &exchange, binding_key).await?;
        let _ = connection.close(200, "declared".into()).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let task = tokio::spawn(consume_forever(
            url.to_owned(),
            queue.clone(),
            seen.clone(),
            stop.clone(),
        ));
        Ok(Tap {
            url: url.to_owned(),
            queue,
            seen,
            stop,
            task: Some(task),
        })
    }

    /// Everything seen so far (duplicates included).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("tap lock").clone()
    }

    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Stops consuming and deletes the tap queue.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        if let Ok((connection, ch)) = channel(&self.url, "reliability-tap-cleanup").await {
            let _ = ch
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = connection.close(200, "bye".into()).await;
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn declare_bound(
    ch: &Channel,
    queue: &str,
    exchange: &str,
    binding_key: &str,
) -> Result<(), lapin::Error> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum_args(),
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        binding_key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

async fn consume_forever(
    url: String,
    queue: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
) {
    reconnecting(&stop, || tap_session(&url, &queue, &seen, &stop)).await
}

/// One connection's worth of [`Tap`]: records and acknowledges until `stop` or the connection ends.
async fn tap_session(
    url: &str,
    queue: &str,
    seen: &Mutex<Vec<Seen>>,
    stop: &CancellationToken,
) -> Result<(), lapin::Error> {
    let (connection, ch) = channel(url, "reliability-tap").await?;
    let mut consumer = consume(&ch, queue, "reliability-tap", 500).await?;
    while let Some(d) = next_delivery(&mut consumer, stop).await? {
        seen.lock().expect("tap lock").push(Seen::from_delivery(&d));
        d.ack(BasicAckOptions::default()).await?;
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}

/// Runs `session` again and again until `stop` fires, pausing 300 ms between attempts. The tap and
/// the relay must outlive broker restarts: a session ends when its connection is lost (or the
/// broker cancels its consumer), and the next one connects again. Session errors are not
/// reported: the retry is the handling.
async fn reconnecting<F, Fut>(stop: &CancellationToken, mut session: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), lapin::Error>>,
{
    while !stop.is_cancelled() {
        let _ = session().await;
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// Sets the prefetch of `ch` and consumes `queue` on it with consumer tag `tag`.
async fn consume(
    ch: &Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> Result<Consumer, lapin::Error> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// The next delivery of a session's consumer; `None` once `stop` fires or the consumer ends,
/// either of which ends the session.
async fn next_delivery(
    consumer: &mut Consumer,
    stop: &CancellationToken,
) -> Result<Option<Delivery>, lapin::Error> {
    tokio::select! {
        _ = stop.cancelled() => Ok(None),
        next = consumer.next() => next.transpose(),
    }
}

/// Moves messages from `from_queue` to `to_exchange`: each batch (up to `batch` messages, or what
/// arrived within 50 ms) is shuffled and published `copies` times, confirmed, then acknowledged.
#[derive(Debug)]
pub struct Relay {
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    relayed: Arc<Mutex<usize>>,
}

impl Relay {
    pub fn start(
        url: &str,
        from_queue: String,
        to_exchange: String,
        copies: usize,
        batch: usize,
    ) -> Relay {
        let stop = CancellationToken::new();
        let relayed = Arc::new(Mutex::new(0));
        let task = tokio::spawn(relay_forever(
            url.to_owned(),
            from_queue,
            to_exchange,
            copies,
            batch,
            stop.clone(),
            relayed.clone(),
        ));
        Relay {
            stop,
            task: Some(task),
            relayed,
        }
    }

    /// Messages taken from the source queue so far.
    pub fn relayed(&self) -> usize {
        *self.relayed.lock().expect("relay lock")
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn relay_forever(
    url: String,
    from_queue: String,
    to_exchange: String,
    copies: usize,
    batch: usize,
    stop: CancellationToken,
    relayed: Arc<Mutex<usize>>,
) {
    reconnecting(&stop, || {
        relay_session(
            &url,
            &from_queue,
            &to_exchange,
            copies,
            batch,
            &stop,
            &relayed,
        )
    })
    .await
}

/// One connection's worth of [`Relay`]: moves batches until `stop` or the connection ends.
async fn relay_session(
    url: &str,
    from_queue: &str,
    to_exchange: &str,
    copies: usize,
    batch: usize,
    stop: &CancellationToken,
    relayed: &Mutex<usize>,
) -> Result<(), lapin::Error> {
    let (connection, input) = channel(url, "reliability-relay").await?;
    let output = connection.create_channel().await?;
    output
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut consumer = consume(&input, from_queue, "reliability-relay", batch as u16).await?;
    while let Some(first) = next_delivery(&mut consumer, stop).await? {
        let mut pending = vec![first];
        while pending.len() < batch {
            match tokio::time::timeout(Duration::from_millis(50), consumer.next()).await {
                Ok(Some(Ok(d))) => pending.push(d),
                Ok(Some(Err(e))) => return Err(e),
                _ => break,
            }
        }
        for _ in 0..copies {
            pending.shuffle(&mut rand::rng());
            for d in &pending {
                output
                    .basic_publish(
                        to_exchange.into(),
                        d.routing_key.as_str().into(),
                        BasicPublishOptions::default(),
                        &d.data,
                        d.properties.clone(),
                    )
                    .await?
                    .await?;
            }
        }
        for d in &pending {
            d.ack(BasicAckOptions::default()).await?;
        }
        *relayed.lock().expect("relay lock") += pending.len();
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(())
}

/// Publishes raw bodies with chosen properties, waiting for each confirm.
#[derive(Debug)]
pub struct RawPublisher {
    _connection: Connection,
    channel: Channel,
}

impl RawPublisher {
    pub async fn connect(url: &str) -> anyhow::Result<RawPublisher> {
        let (connection, ch) = channel(url, "reliability-raw").await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(RawPublisher {
            _connection: connection,
            channel: ch,
        })
    }

    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                properties.with_delivery_mode(2),
            )
            .await?
            .await?;
        Ok(())
    }
}

/// Messages ready in `queue` (None when the broker cannot be asked).
pub async fn queue_depth(url: &str, queue: &str) -> Option<u32> {
    let (connection, ch) = channel(url, "reliability-depth").await.ok()?;
    let depth = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| q.message_count());
    let _ = connection.close(200, "bye".into()).await;
    depth
}

/// Takes every message now in `queue` (acknowledged), reading until it stays empty for `quiet`.
pub async fn drain(url: &str, queue: &str, quiet: Duration) -> anyhow::Result<Vec<Seen>> {
    let (connection, ch) = channel(url, "reliability-drain").await?;
    let mut consumer = consume(&ch, queue, "reliability-drain", 1000).await?;
    let mut seen = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(quiet, consumer.next()).await {
        seen.push(Seen::from_delivery(&d));
        d.ack(BasicAckOptions::default()).await?;
    }
    let _ = connection.close(200, "bye".into()).await;
    Ok(seen)
}
