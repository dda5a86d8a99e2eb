//! The transactional outbox relay against the real services.

use std::{sync::Arc, time::Duration};

use prebuilds_runtime::{
    amqp::{Publisher, QueueKind},
    outbox::{self, Relay, RelayConfig},
};
use prebuilds_schemas::{CloudEvent, ReconcilePreset, ReconcileReason};
use prebuilds_tests::{TestBroker, TestDb};

fn event() -> CloudEvent<ReconcilePreset> {
    CloudEvent::new(
        "test",
        chrono::Utc::now(),
        ReconcilePreset {
            preset_id: uuid::Uuid::new_v4(),
            reason: ReconcileReason::Manual,
            requested_at: chrono::Utc::now(),
        },
    )
}

#[tokio::test]
async fn rolled_back_rows_are_never_published_and_committed_rows_once() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let mut client = db.pool.get().await.unwrap();

    let committed = event();
    let tx = client.transaction().await.unwrap();
    outbox::enqueue(&tx, &committed).await.unwrap();
    tx.commit().await.unwrap();

    let rolled_back = event();
    let tx = client.transaction().await.unwrap();
    outbox::enqueue(&tx, &rolled_back).await.unwrap();
    tx.rollback().await.unwrap();

    let publisher = Arc::new(Publisher::new(
        &broker.url,
        "relay",
        broker.topology.clone(),
    ));
    // Two relays racing over the same table publish each row once.
    let a = Relay::new(db.pool.clone(), publisher.clone(), RelayConfig::default());
    let b = Relay::new(db.pool.clone(), publisher.clone(), RelayConfig::default());
    let (ra, rb) = tokio::join!(a.pass(), b.pass());
    assert_eq!(ra.unwrap().published + rb.unwrap().published, 1);

    let seen = broker
        .drain(&broker.queue(QueueKind::Reconcile), Duration::from_secs(1))
        .await;
    assert_eq!(seen.len(), 1);
    let got: CloudEvent<ReconcilePreset> = serde_json::from_slice(&seen[0].data).unwrap();
    assert_eq!(got.id, committed.id);
    assert_eq!(
        seen[0]
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(committed.id.to_string())
    );
    assert_eq!(
        prebuilds_tests::fixtures::unpublished_outbox(&client)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn the_relay_publishes_many_rows_in_order_of_commit() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let client = db.pool.get().await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..500 {
        let e = event();
        ids.push(e.id);
        outbox::enqueue(&client, &e).await.unwrap();
    }
    let publisher = Arc::new(Publisher::new(
        &broker.url,
        "relay",
        broker.topology.clone(),
    ));
    let relay = Relay::new(db.pool.clone(), publisher, RelayConfig::default());
    let report = relay.drain(Duration::from_secs(30)).await.unwrap();
    assert_eq!(report.published, 500);
    let seen = broker
        .drain(&broker.queue(QueueKind::Reconcile), Duration::from_secs(2))
        .await;
    // In the order the rows were committed, not just the same set: one relay publishes on one
    // channel in id order, and a queue keeps one channel's order.
    let got: Vec<uuid::Uuid> = seen
        .iter()
        .map(|d| {
            serde_json::from_slice::<CloudEvent<ReconcilePreset>>(&d.data)
                .unwrap()
                .id
        })
        .collect();
    assert_eq!(got, ids);
}
