//! Per-test AMQP prefixes: the full topology under a unique prefix (or nothing yet, for tests of
//! `prebuildsctl migrate` and of services that only check the topology), deleted on drop.

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions,
        QueueDeleteOptions,
    },
    types::FieldTable,
    Channel, Connection,
};
use prebuilds_runtime::amqp::{self, Broker, Entity, QueueKind, Topology};

pub fn amqp_url() -> String {
    std::env::var("PREBUILDS_TEST_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[derive(Debug)]
pub struct TestBroker {
    pub url: String,
    /// How to reach the broker (TLS files included, for a private TLS node).
    pub broker: Broker,
    pub topology: Topology,
    connection: Connection,
    pub channel: Channel,
}

impl TestBroker {
    pub async fn new() -> TestBroker {
        let url = amqp_url();
        TestBroker::on(Broker::from(&url), url).await
    }

    /// A unique prefix on another broker (a private node), reached through `broker`; `url` is what
    /// services started by the test get as `AMQP_URL`.
    pub async fn on(broker: Broker, url: String) -> TestBroker {
        TestBroker::on_with(broker, url, |topology| topology).await
    }

    /// [`TestBroker::on`] with the topology's arguments adjusted (e.g. the quorum group size of a
    /// cluster) before it is declared.
    pub async fn on_with(
        broker: Broker,
        url: String,
        adjust: impl FnOnce(Topology) -> Topology,
    ) -> TestBroker {
        let prefix = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let topology = adjust(Topology::new(prefix));
        let connection = amqp::connect(&broker, "test-harness")
            .await
            .expect("connect to RabbitMQ (is it running? see .ci/run)");
        let channel = connection.create_channel().await.expect("channel");
        topology.declare(&channel).await.expect("declare topology");
        TestBroker {
            url,
            broker,
            topology,
            connection,
            channel,
        }
    }

    /// A second harness handle on the same prefix with a fresh connection (after a broker
    /// restart killed the first one). Dropping it deletes the topology too.
    pub async fn reconnect(other: &TestBroker) -> TestBroker {
        let connection = amqp::connect(&other.broker, "test-harness")
            .await
            .expect("reconnect to RabbitMQ");
        let channel = connection.create_channel().await.expect("channel");
        TestBroker {
            url: other.url.clone(),
            broker: other.broker.clone(),
            topology: other.topology.clone(),
            connection,
            channel,
        }
    }

    pub fn prefix(&self) -> &str {
        self.topology.prefix()
    }

    pub fn queue(&self, kind: QueueKind) -> String {
        self.topology.queue(kind)
    }

    /// Takes one message from `queue` (acknowledged), waiting up to `timeout`.
    pub async fn get(
        &self,
        queue: &str,
        timeout: Duration,
    ) -> Option<lapin::message::BasicGetMessage> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get");
            if got.is_some() {
                return got;
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// A unique prefix with nothing declared under it yet (whatever a test declares there is
    /// deleted on drop all the same).
    pub async fn undeclared() -> TestBroker {
        let broker = TestBroker::new().await;
        delete_topology(&broker.channel, &broker.topology).await;
        broker
    }

    /// Drains `queue` for `window`, returning every body seen.
    pub async fn drain(&self, queue: &str, window: Duration) -> Vec<lapin::message::Delivery> {
        let channel = self.connection.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                format!("drain-{}", uuid::Uuid::new_v4().simple())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout_at(deadline, consumer.next()).await
        {
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            seen.push(delivery);
        }
        let _ = channel.close(200, "done".into()).await;
        seen
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let broker = self.broker.clone();
        let topology = self.topology.clone();
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(conn) = amqp::connect(&broker, "test-cleanup").await else {
                    return;
                };
                let Ok(channel) = conn.create_channel().await else {
                    return;
                };
                delete_topology(&channel, &topology).await;
                let _ = conn.close(200, "bye".into()).await;
            });
        })
        .join();
    }
}

/// Deletes every queue and exchange of `topology`. RabbitMQ deletes idempotently (a missing queue
/// or exchange is not an error), so this also cleans up a topology that was declared only in part.
async fn delete_topology(channel: &Channel, topology: &Topology) {
    for entity in Entity::ALL.iter().rev() {
        let name = topology.name(*entity);
        let _ = if entity.is_exchange() {
            channel
                .exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default())
                .await
        } else {
            channel
                .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map(|_| ())
        };
    }
}
