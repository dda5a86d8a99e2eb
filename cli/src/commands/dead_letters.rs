//! `prebuildsctl dead-letters list|replay`: the messages in `<prefix>.dead` — poison messages the
//! services dead-lettered (reason in the `x-prebuilds-dead-reason` header) and messages the broker
//! dead-lettered after the delivery limit (reason in `x-death`).
//!
//! Listing takes the messages with manual acknowledgement, then cancels the consumer and returns
//! them with `nack(requeue)`: they stay in the queue. Replay republishes each one (with confirms)
//! to the topic exchange under its original routing key and only then acknowledges it, so a failed
//! replay loses nothing.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicQosOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable, ShortString},
    Channel,
};
use prebuilds_runtime::{
    amqp::{
        consumer::{DEAD_QUEUE_HEADER, DEAD_REASON_HEADER},
        publisher::Outgoing,
        Entity,
    },
    config::Connection,
};
use serde::Serialize;

use crate::{
    audit,
    context::{connect_amqp, connect_db, publisher, Ctx, UsageError},
    output,
};

/// How long to wait for the next message once the queue looks drained.
const IDLE: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List dead-lettered messages (they stay in the queue).
    #[command(after_help = "Example:\n  prebuildsctl dead-letters list --json")]
    List {
        /// At most this many messages.
        #[arg(long, default_value_t = 100)]
        limit: u16,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead-lettered messages to their original routing key, then remove them from the
    /// dead-letter queue. Fix the cause first, or they come back.
    #[command(after_help = "Examples:\n  \
        prebuildsctl dead-letters replay --limit 10\n  \
        prebuildsctl dead-letters replay --id 9f2a…   # message ids from `dead-letters list`")]
    Replay {
        /// At most this many messages (default: all).
        #[arg(long)]
        limit: Option<u16>,
        /// Only the messages with these message ids; repeat for several.
        #[arg(long = "id")]
        ids: Vec<String>,
        /// Print the result as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Serialize)]
struct Row {
    message_id: Option<String>,
    routing_key: String,
    #[serde(rename = "type")]
    event_type: Option<String>,
    reason: String,
    source_queue: Option<String>,
    death_count: Option<i64>,
    size: usize,
}

#[derive(Debug, Serialize)]
struct Replayed {
    message_id: Option<String>,
    routing_key: String,
    replayed: bool,
    error: Option<String>,
}

pub async fn run(connection: &Ctx, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List { limit, json } => list(connection, limit, json).await,
        Command::Replay { limit, ids, json } => replay(connection, limit, ids, json).await,
    }
}

/// A channel consuming the dead-letter queue, and how many messages were ready when it started.
struct DeadQueue {
    connection: lapin::Connection,
    channel: Channel,
    consumer: lapin::Consumer,
    tag: String,
    ready: u32,
}

impl DeadQueue {
    async fn open(connection: &Connection, prefetch: u16) -> anyhow::Result<DeadQueue> {
        let amqp = connect_amqp(connection, "prebuildsctl dead-letters").await?;
        let topology = connection.topology();
        topology.prepare(&amqp, &[Entity::DeadQueue]).await?;
        let channel = amqp.create_channel().await?;
        let queue = channel
            .queue_declare(
                topology.dead_queue().as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .basic_qos(prefetch.max(1), BasicQosOptions::default())
            .await?;
        let tag = format!(
            "prebuildsctl-dead-letters-{}",
            uuid::Uuid::new_v4().simple()
        );
        let consumer = channel
            .basic_consume(
                topology.dead_queue().as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(DeadQueue {
            connection: amqp,
            channel,
            consumer,
            tag,
            ready: queue.message_count(),
        })
    }

    /// Takes up to `limit` of the messages that were ready at `open` (unacknowledged).
    async fn take(&mut self, limit: usize) -> anyhow::Result<Vec<Delivery>> {
        let want = limit.min(self.ready as usize);
        let mut taken = Vec::with_capacity(want);
        while taken.len() < want {
            match tokio::time::timeout(IDLE, self.consumer.next()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(delivery)) => taken.push(delivery.context("receiving a dead letter")?),
            }
        }
        // No more deliveries to this channel: what we return with nack stays in the queue.
        self.channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await?;
        Ok(taken)
    }

    async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

async fn requeue(deliveries: &[&Delivery]) -> anyhow::Result<()> {
    for delivery in deliveries {
        delivery
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await
            .context("returning a dead letter to its queue")?;
    }
    Ok(())
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

fn number(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        _ => None,
    }
}

fn describe(delivery: &Delivery) -> Row {
    let props = &delivery.properties;
    let headers = props.headers().clone().unwrap_or_default();
    let header = |key: &str| headers.inner().get(key).and_then(text);
    // The broker's own record: the first (most recent) x-death entry.
    let death = headers
        .inner()
        .get("x-death")
        .and_then(|v| match v {
            AMQPValue::FieldArray(a) => a.as_slice().first().cloned(),
            _ => None,
        })
        .and_then(|v| match v {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        });
    let death_field = |key: &str| death.as_ref().and_then(|t| t.inner().get(key).cloned());
    let reason = header(DEAD_REASON_HEADER)
        .or_else(|| {
            death_field("reason")
                .as_ref()
                .and_then(text)
                .map(|r| format!("broker: {r}"))
        })
        .unwrap_or_else(|| "unknown".to_owned());
    let source_queue =
        header(DEAD_QUEUE_HEADER).or_else(|| death_field("queue").as_ref().and_then(text));
    Row {
        message_id: props.message_id().as_ref().map(ShortString::to_string),
        routing_key: delivery.routing_key.to_string(),
        event_type: props.kind().as_ref().map(ShortString::to_string),
        reason,
        source_queue,
        death_count: death_field("count").as_ref().and_then(number),
        size: delivery.data.len(),
    }
}

async fn list(connection: &Connection, limit: u16, json: bool) -> anyhow::Result<()> {
    let mut queue = DeadQueue::open(connection, limit).await?;
    let deliveries = queue.take(limit as usize).await?;
    let rows: Vec<Row> = deliveries.iter().map(describe).collect();
    requeue(&deliveries.iter().collect::<Vec<_>>()).await?;
    let ready = queue.ready;
    queue.close().await;
    output::print_rows(
        &rows,
        json,
        &[
            "message_id",
            "routing_key",
            "type",
            "from",
            "reason",
            "size",
        ],
        "no dead-lettered messages",
        |r| {
            vec![
                output::opt_text(r.message_id.as_deref()),
                r.routing_key.clone(),
                output::opt_text(r.event_type.as_deref()),
                output::opt_text(r.source_queue.as_deref()),
                r.reason.clone(),
                r.size.to_string(),
            ]
        },
    )?;
    // The note is for people; --json prints the array alone.
    if !json && (ready as usize) > rows.len() {
        println!(
            "({} of {ready} shown; raise --limit to see more)",
            rows.len()
        );
    }
    Ok(())
}

/// Headers that describe the death, not the message: dropped on replay.
fn replay_headers(delivery: &Delivery) -> FieldTable {
    let mut kept = FieldTable::default();
    if let Some(headers) = delivery.properties.headers() {
        for (key, value) in headers.inner() {
            let k = key.as_str();
            let death = k == "x-death"
                || k.starts_with("x-first-death-")
                || k.starts_with("x-last-death-")
                || k == "x-delivery-count"
                || k == DEAD_REASON_HEADER
                || k == DEAD_QUEUE_HEADER;
            if !death {
                kept.insert(key.clone(), value.clone());
            }
        }
    }
    kept
}

async fn replay(
    connection: &Ctx,
    limit: Option<u16>,
    ids: Vec<String>,
    json: bool,
) -> anyhow::Result<()> {
    if limit == Some(0) {
        return Err(UsageError("--limit must be at least 1".into()).into());
    }
    let limit = limit.unwrap_or(u16::MAX);
    let mut queue = DeadQueue::open(connection, limit).await?;
    let deliveries = queue.take(limit as usize).await?;
    let publisher = publisher(connection);
    let exchange = publisher.topology().exchange();
    let mut results = Vec::new();
    let mut keep: Vec<&Delivery> = Vec::new();
    for delivery in &deliveries {
        let row = describe(delivery);
        let wanted = ids.is_empty()
            || row
                .message_id
                .as_ref()
                .is_some_and(|id| ids.iter().any(|want| want == id));
        if !wanted {
            keep.push(delivery);
            continue;
        }
        let props = &delivery.properties;
        let mut message = Outgoing::new(&exchange, &row.routing_key, &delivery.data);
        message.message_id = row.message_id.clone();
        message.event_type = row.event_type.clone();
        message.correlation_id = props.correlation_id().as_ref().map(ShortString::to_string);
        message.reply_to = props.reply_to().as_ref().map(ShortString::to_string);
        message.headers = replay_headers(delivery);
        match publisher.publish(message).await {
            Ok(()) => {
                // Published and confirmed: now it may leave the dead-letter queue.
                delivery
                    .ack(BasicAckOptions::default())
                    .await
                    .context("acknowledging a replayed dead letter")?;
                results.push(Replayed {
                    message_id: row.message_id,
                    routing_key: row.routing_key,
                    replayed: true,
                    error: None,
                });
            }
            Err(e) => {
                keep.push(delivery);
                results.push(Replayed {
                    message_id: row.message_id,
                    routing_key: row.routing_key,
                    replayed: false,
                    error: Some(e.to_string()),
                });
            }
        }
    }
    requeue(&keep).await?;
    publisher.close().await;
    queue.close().await;
    record_replay(connection, &results).await?;
    let failed = results.iter().filter(|r| !r.replayed).count();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| {
            !results
                .iter()
                .any(|r| r.message_id.as_deref() == Some(id.as_str()))
        })
        .collect();
    output::print_rows(
        &results,
        json,
        &["message_id", "routing_key", "result"],
        "no dead-lettered messages to replay",
        |r| {
            vec![
                output::opt_text(r.message_id.as_deref()),
                r.routing_key.clone(),
                if r.replayed {
                    "replayed".to_owned()
                } else {
                    format!("kept: {}", r.error.as_deref().unwrap_or("failed"))
                },
            ]
        },
    )?;
    if !missing.is_empty() {
        anyhow::bail!(
            "no dead-lettered message with id {} (see `prebuildsctl dead-letters list`)",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} message(s) could not be republished and stay in the dead-letter queue"
        );
    }
    Ok(())
}

/// The audit row of a replay: republishing is not a transaction of ours, so the row follows it,
/// naming the messages that went back to work (none replayed: nothing changed, no row).
async fn record_replay(ctx: &Ctx, results: &[Replayed]) -> anyhow::Result<()> {
    let replayed: Vec<serde_json::Value> = results
        .iter()
        .filter(|r| r.replayed)
        .map(|r| serde_json::Value::from(r.message_id.clone().unwrap_or_default()))
        .collect();
    let Some(entry) = &ctx.audit else {
        return Ok(());
    };
    if replayed.is_empty() {
        return Ok(());
    }
    let mut entry = entry.clone();
    if let serde_json::Value::Object(arguments) = &mut entry.arguments {
        arguments.insert("replayed".into(), serde_json::Value::Array(replayed));
    }
    let pool = connect_db(ctx).await?;
    let client = pool.get().await?;
    audit::record_standalone(&client, &entry).await.context(
        "the messages were replayed, but the audit log could not be written (check the database)",
    )?;
    Ok(())
}
