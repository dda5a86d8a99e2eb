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

/// The value of `prebuilds_messages_in_retry{queue="<queue>"}` on a process's `/metrics`, 0 when
/// the series is absent.
async fn in_retry(port: u16, queue: &str) -> i64 {
    let (_, body) = prebuilds_tests::stack::http_get(port, "/metrics")
        .await
        .expect("GET /metrics");
    let series = format!("prebuilds_messages_in_retry{{queue=\"{queue}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().expect("a gauge value"))
}

/// Issue #18's agent-state anomaly, reproduced deterministically. Under a PostgreSQL restart the
/// reliability suite once found an agent stored `starting` whose last delivered event was `ready`.
/// Nothing was lost: a worker took the `ready` delivery while the database was down and held it
/// unacknowledged in its in-place retries (up to 5 s apart), where the broker counts it neither
/// as queued nor as done — so "every queue is empty" was true while the event was still on its
/// way, and the checker read the database too early. This test stops the database, delivers the
/// `ready`, sees exactly that state (queue empty, agent not yet ready, the delivery in retry, now
/// visible as `prebuilds_messages_in_retry`), and then, once the database is back and nothing is
/// in retry any more, reads the agent once: `ready`, recorded once.
#[tokio::test]
async fn an_agent_event_held_in_retry_through_a_database_restart_is_applied_once_it_returns() {
    use prebuilds_schemas::{AgentLifecycle, AgentLifecycleState};
    use prebuilds_tests::{fixtures, private_postgres::PrivatePostgres, stack};

    let server = PrivatePostgres::start();
    let db = TestDb::on(&server.server_url()).await;
    let broker = TestBroker::new().await;
    let job_id: uuid::Uuid = {
        let client = db.pool.get().await.expect("db");
        let org = fixtures::organization(&client, "acme").await;
        let fx = fixtures::template_with_preset(&client, org, "anomaly", Some(1)).await;
        let spec = fixtures::PrebuildSpec {
            ready: false,
            ..fixtures::PrebuildSpec::running(chrono::Utc::now())
        };
        let workspace = fixtures::prebuild(&client, &fx, &spec).await;
        fixtures::latest_job(&client, workspace).await
    };
    let agent_state = |db: &TestDb| {
        let pool = db.pool.clone();
        async move {
            let client = pool.get().await.ok()?;
            client
                .query_opt(
                    "SELECT lifecycle_state FROM workspace_agents WHERE job_id = $1 AND name = 'main'",
                    &[&job_id],
                )
                .await
                .ok()
                .flatten()
                .map(|r| r.get::<_, String>(0))
        }
    };
    let (_worker, port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    prebuilds_tests::eventually(Duration::from_secs(30), "worker ready", || async {
        matches!(stack::http_get(port, "/readyz").await, Some((200, _))).then_some(())
    })
    .await;
    let publisher = Publisher::new(&broker.url, "test-events", broker.topology.clone());
    let agent_event = |state| {
        CloudEvent::new(
            "test-provisioner",
            chrono::Utc::now(),
            AgentLifecycle {
                job_id,
                agent_name: "main".into(),
                lifecycle_state: state,
            },
        )
    };
    publisher
        .publish_event(&agent_event(AgentLifecycleState::Starting))
        .await
        .expect("publish starting");
    prebuilds_tests::eventually(Duration::from_secs(30), "agent starting", || async {
        (agent_state(&db).await.as_deref() == Some("starting")).then_some(())
    })
    .await;

    // The database goes away; `ready` arrives meanwhile.
    server.stop();
    let ready = agent_event(AgentLifecycleState::Ready);
    publisher
        .publish_event(&ready)
        .await
        .expect("publish ready");
    let events_queue = broker.queue(QueueKind::ProvisionerEvents);
    prebuilds_tests::eventually(
        Duration::from_secs(30),
        "the ready delivery held in the worker's retries",
        || async { (in_retry(port, "provisioner-events").await == 1).then_some(()) },
    )
    .await;
    // What the checker saw: nothing queued (the delivery is unacknowledged, not ready).
    let depth = broker
        .channel
        .queue_declare(
            events_queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("passive declare")
        .message_count();
    assert_eq!(depth, 0, "the delivery is in flight, not queued");

    // Back: once nothing is in retry, the event has been applied — read once, no polling.
    server.boot();
    prebuilds_tests::eventually(Duration::from_secs(30), "retries settled", || async {
        (in_retry(port, "provisioner-events").await == 0).then_some(())
    })
    .await;
    assert_eq!(agent_state(&db).await.as_deref(), Some("ready"));
    let client = db.pool.get().await.expect("db");
    let recorded: i64 = client
        .query_one(
            "SELECT count(*) FROM processed_messages WHERE message_id = $1",
            &[&ready.id],
        )
        .await
        .expect("processed ids")
        .get(0);
    assert_eq!(recorded, 1, "the ready event recorded once");
}
