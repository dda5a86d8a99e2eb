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
    // The relay keeps failing while the broker is down; nothing is marked published. Barrier:
    // every row was tried, failed (its error recorded) and tried again — or, wrongly, marked
    // published — so the relay has had its chances to get it wrong and "still unpublished" is a
    // fact rather than "not yet".
    prebuilds_tests::eventually(Duration::from_secs(60), "every row tried twice", || async {
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE (attempts >= 2 AND last_error IS NOT NULL)
                                            OR published_at IS NOT NULL),
                        count(*)
                 FROM outbox",
                &[],
            )
            .await
            .ok()?;
        (row.get::<_, i64>(0) == row.get::<_, i64>(1)).then_some(())
    })
    .await;
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

/// The sum of a counter's series on a process's `/metrics` (0 when absent).
async fn counter(port: u16, name: &str) -> f64 {
    let (_, body) = prebuilds_tests::stack::http_get(port, "/metrics")
        .await
        .expect("GET /metrics");
    let prefix = format!("{name}{{");
    body.lines()
        .filter(|l| l.starts_with(&prefix) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A database outage three times longer than every in-place retry a delivery can get (retry
/// window × delivery limit) dead-letters nothing valid. With the window shortened to 1 s, a fill
/// in progress (provisioner jobs and their events in flight), reconcile jobs and a claim that
/// arrive during the outage are all held by the worker and the provisioner — not requeued — and
/// applied once the database is back; the pools converge and the claim is served. A poison
/// message sent meanwhile is still dead-lettered, with its reason.
#[tokio::test]
async fn a_database_outage_longer_than_every_retry_dead_letters_nothing_valid() {
    use prebuilds_runtime::amqp::{
        consumer::DEAD_REASON_HEADER, publisher::Outgoing, rpc::RpcClient,
    };
    use prebuilds_schemas::{ClaimReply, ClaimRequest};
    use prebuilds_tests::{fixtures, private_postgres::PrivatePostgres, stack};

    const WINDOW: Duration = Duration::from_secs(1);
    const DELIVERY_LIMIT: u32 = 5;
    let outage = 3 * WINDOW * DELIVERY_LIMIT;

    let server = PrivatePostgres::start();
    let db = TestDb::on(&server.server_url()).await;
    let broker = TestBroker::new().await;
    let (claimable, filling, user) = {
        let c = db.pool.get().await.expect("db");
        let org = fixtures::organization(&c, "outage").await;
        let claimable = fixtures::template_with_preset(&c, org, "claimable", Some(1)).await;
        fixtures::prebuild(
            &c,
            &claimable,
            &fixtures::PrebuildSpec::running(chrono::Utc::now()),
        )
        .await;
        let filling = fixtures::template_with_preset(&c, org, "filling", Some(4)).await;
        let user = fixtures::user(&c, "patient", false).await;
        (claimable, filling, user)
    };
    let env = [
        ("PREBUILDS_RETRY_WINDOW", "1s"),
        ("PREBUILDS_SIM_DURATION_MIN", "1s"),
        ("PREBUILDS_SIM_DURATION_MAX", "3s"),
        ("PREBUILDS_SIM_AGENT_READY_DELAY", "200ms"),
        // One prebuild build at a time: the rest wait in the queue and reach the provisioner
        // during the outage, where its admission read fails and the delivery is held.
        ("PREBUILDS_PROVISIONER_CONCURRENCY", "1"),
    ];
    let (_worker, worker_port) = stack::start("prebuilds-worker", &db, &broker, &env);
    let (_provisioner, provisioner_port) =
        stack::start("prebuilds-provisioner", &db, &broker, &env);
    for port in [worker_port, provisioner_port] {
        prebuilds_tests::eventually(Duration::from_secs(30), "services ready", || async {
            matches!(stack::http_get(port, "/readyz").await, Some((200, _))).then_some(())
        })
        .await;
    }
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    stack::request_reconcile(&publisher, filling.preset_id).await;
    // The fill is under way: its builds are with the provisioner when the database goes.
    stack::wait_for(Duration::from_secs(30), "fill started", || async {
        stack::pool_counts(&db, filling.preset_id).await.in_progress > 0
    })
    .await;

    server.stop();
    let down_since = std::time::Instant::now();
    // Meanwhile: a reconcile job, a claim and a poison message.
    stack::request_reconcile(&publisher, claimable.preset_id).await;
    let rpc = RpcClient::connect(&broker.url, "patient-client", broker.topology.clone())
        .await
        .expect("rpc client");
    let claim = tokio::spawn(async move {
        let request = CloudEvent::new(
            "patient-client",
            chrono::Utc::now(),
            ClaimRequest {
                user_id: user,
                workspace_name: "after-the-outage".into(),
                preset_id: Some(claimable.preset_id),
                template_id: None,
                parameters: vec![],
            },
        );
        rpc.call::<_, ClaimReply>(&request, Duration::from_secs(120))
            .await
            .map(|reply| reply.data)
    });
    let exchange = broker.topology.exchange();
    let poison = serde_json::json!({
        "specversion": "1.0", "id": uuid::Uuid::new_v4(), "source": "test",
        "type": "prebuilds.reconcile.preset.v1", "time": chrono::Utc::now(),
        "datacontenttype": "application/json", "data": {"reason": "manual"}
    });
    let poison_body = serde_json::to_vec(&poison).unwrap();
    publisher
        .publish(Outgoing::new(&exchange, "reconcile.preset", &poison_body))
        .await
        .expect("publish poison");

    // The hold is what keeps them: wait until both services held deliveries, then out-wait every
    // retry a delivery could get three times over.
    prebuilds_tests::eventually(
        Duration::from_secs(60),
        "worker and provisioner holding deliveries",
        || async {
            (counter(worker_port, "prebuilds_messages_held_total").await > 0.0
                && counter(provisioner_port, "prebuilds_messages_held_total").await > 0.0)
                .then_some(())
        },
    )
    .await;
    let remaining = outage.saturating_sub(down_since.elapsed());
    tokio::time::sleep(remaining).await;
    assert!(down_since.elapsed() >= outage);
    server.boot();

    let reply = claim.await.unwrap().expect("the claim is answered");
    assert_eq!(reply.outcome.as_str(), "claimed", "{reply:?}");
    stack::wait_for(Duration::from_secs(90), "both pools converged", || async {
        let filled = stack::pool_counts(&db, filling.preset_id).await;
        let refilled = stack::pool_counts(&db, claimable.preset_id).await;
        filled.eligible == 4 && filled.in_progress == 0 && refilled.eligible == 1
    })
    .await;

    // Only the poison message was dead-lettered, with its reason.
    let reader = TestBroker::reconnect(&broker).await;
    let dead = reader
        .drain(&broker.topology.dead_queue(), Duration::from_secs(2))
        .await;
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| {
            let headers = d.properties.headers().clone().unwrap_or_default();
            match headers.inner().get(DEAD_REASON_HEADER) {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                _ => format!(
                    "dead-lettered by the broker: {}",
                    String::from_utf8_lossy(&d.data)
                ),
            }
        })
        .collect();
    assert_eq!(reasons.len(), 1, "only the poison message: {reasons:?}");
    assert!(reasons[0].contains("preset_id"), "{reasons:?}");
    assert_eq!(dead[0].data, poison_body);
    assert_eq!(
        counter(worker_port, "prebuilds_dead_lettered_total").await,
        1.0
    );
    assert_eq!(
        counter(provisioner_port, "prebuilds_dead_lettered_total").await,
        0.0
    );
}
