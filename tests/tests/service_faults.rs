//! Tests that stop and restart a real service — a private one: the broker here is a RabbitMQ node
//! of the test's own (`private_rabbit`), so the machine's services are never touched. They still
//! run in their own serial step of `scripts/test` (private nodes are CPU-hungry at start).

use std::{collections::HashSet, sync::Arc, time::Duration};

use prebuilds_runtime::amqp::Broker;
use prebuilds_runtime::{
    amqp::{Publisher, QueueKind},
    outbox::{self, Relay, RelayConfig},
};
use prebuilds_schemas::{CloudEvent, ReconcilePreset, ReconcileReason};
use prebuilds_tests::{
    private_rabbit::{NodeOptions, PrivateRabbit},
    TestBroker, TestDb,
};
use tokio_util::sync::CancellationToken;

/// Stops the node's RabbitMQ application; starts it again when dropped, whatever happened.
struct RabbitStopped<'a>(&'a PrivateRabbit);

impl<'a> RabbitStopped<'a> {
    fn new(node: &'a PrivateRabbit) -> Self {
        let status = node.ctl(&["stop_app"]);
        assert!(
            status.status.success(),
            "stop_app: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        RabbitStopped(node)
    }
}

impl Drop for RabbitStopped<'_> {
    fn drop(&mut self) {
        let _ = self.0.ctl(&["start_app"]);
        let _ = self.0.ctl(&["await_startup", "--timeout", "60"]);
    }
}

#[tokio::test]
async fn outbox_rows_written_while_the_broker_is_down_are_published_once_it_is_back() {
    let db = TestDb::new().await;
    let node = PrivateRabbit::start(NodeOptions {
        plain: true,
        tls: None,
    })
    .await;
    let url = node.plain_url();
    let broker = TestBroker::on(Broker::from(url.as_str()), url).await;
    let publisher = Arc::new(Publisher::new(
        &broker.url,
        "relay",
        broker.topology.clone(),
    ));
    publisher.ensure_connected().await.unwrap();
    let relay = Relay::new(
        db.pool.clone(),
        publisher.clone(),
        RelayConfig {
            poll_interval: Duration::from_millis(100),
            ..RelayConfig::default()
        },
    );
    let shutdown = CancellationToken::new();
    let relay_task = tokio::spawn(relay.clone().run(shutdown.clone()));

    let stopped = RabbitStopped::new(&node);
    let client = db.pool.get().await.unwrap();
    let mut ids = HashSet::new();
    for _ in 0..20 {
        let e = CloudEvent::new(
            "test",
            chrono::Utc::now(),
            ReconcilePreset {
                preset_id: uuid::Uuid::new_v4(),
                reason: ReconcileReason::Manual,
                requested_at: chrono::Utc::now(),
            },
        );
        ids.insert(e.id);
        outbox::enqueue(&client, &e).await.unwrap();
    }
    // The relay keeps failing while the broker is down; nothing is marked published.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        prebuilds_tests::fixtures::unpublished_outbox(&client)
            .await
            .unwrap(),
        20
    );
    drop(stopped); // start_app

    prebuilds_tests::eventually(Duration::from_secs(60), "outbox drained", || async {
        let n = prebuilds_tests::fixtures::unpublished_outbox(&client)
            .await
            .ok()?;
        (n == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    relay_task.await.unwrap();

    // The test broker's channel died with the broker: use a fresh harness connection.
    let reader = TestBroker::reconnect(&broker).await;
    let seen = reader
        .drain(&broker.queue(QueueKind::Reconcile), Duration::from_secs(2))
        .await;
    // A consumer that dedupes by id sees every message exactly once.
    let mut unique = HashSet::new();
    for d in &seen {
        let e: CloudEvent<ReconcilePreset> = serde_json::from_slice(&d.data).unwrap();
        unique.insert(e.id);
    }
    assert_eq!(unique, ids);
}
