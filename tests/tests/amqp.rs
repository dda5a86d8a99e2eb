//! The AMQP plumbing against the real broker: topology declaration, confirming publisher, the
//! consumer supervisor's settlement rules and graceful drain.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use prebuilds_runtime::{
    amqp::{
        self,
        consumer::{self, ConsumerContext, Incoming, DEAD_REASON_HEADER},
        publisher::Outgoing,
        ConsumerSpec, Entity, Handler, HandlerError, PublishError, Publisher, QueueKind, Topology,
        TopologyError,
    },
    metrics::ServiceMetrics,
    Health,
};
use prebuilds_tests::TestBroker;
use tokio_util::sync::CancellationToken;

/// `prebuilds_messages_total` of `outcome` (`None`: every outcome) in `registry`: how many
/// deliveries the consumer has settled, and how.
fn settled(registry: &prometheus::Registry, outcome: Option<&str>) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    let label = outcome.map(|o| format!("outcome=\"{o}\""));
    let labels: Vec<&str> = label.iter().map(String::as_str).collect();
    prebuilds_tests::probe::metric_sum_where(&text, "prebuilds_messages_total", &labels)
}

fn context(broker: &TestBroker) -> (ConsumerContext, prometheus::Registry) {
    let registry = prometheus::Registry::new();
    let metrics = ServiceMetrics::register(&registry).unwrap();
    let publisher = Arc::new(Publisher::new(
        &broker.url,
        "test-publisher",
        broker.topology.clone(),
    ));
    (
        ConsumerContext {
            broker: (&broker.url).into(),
            topology: broker.topology.clone(),
            publisher,
            metrics,
            health: Health::default(),
            database: None,
        },
        registry,
    )
}

fn spec(queue: QueueKind) -> ConsumerSpec {
    ConsumerSpec {
        queue,
        prefetch: 4,
        connection_name: "test-consumer".into(),
        drain_timeout: Duration::from_secs(10),
        transient_window: Duration::from_millis(150),
    }
}

#[tokio::test]
async fn two_processes_declare_the_topology_concurrently() {
    let broker = TestBroker::new().await;
    let topology = broker.topology.clone();
    let mut tasks = Vec::new();
    for i in 0..4 {
        let topology = topology.clone();
        let url = broker.url.clone();
        tasks.push(tokio::spawn(async move {
            let conn = amqp::connect(&url, &format!("declarer-{i}")).await.unwrap();
            let channel = conn.create_channel().await.unwrap();
            topology.declare(&channel).await
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("concurrent declaration succeeds without 406");
    }
    // And a fresh topology object with the same prefix agrees (no argument drift).
    let conn = amqp::connect(&broker.url, "again").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    Topology::new(broker.prefix())
        .declare(&channel)
        .await
        .unwrap();
}

#[tokio::test]
async fn checking_the_topology_names_the_first_missing_part_and_spares_the_callers_channels() {
    let broker = TestBroker::new().await;
    let topology = broker.topology.clone();
    let conn = amqp::connect(&broker.url, "checker").await.unwrap();
    topology
        .check(&conn, &Entity::ALL)
        .await
        .expect("a declared topology passes the check");

    let events = broker.queue(QueueKind::ProvisionerEvents);
    broker
        .channel
        .queue_delete(events.as_str().into(), Default::default())
        .await
        .unwrap();
    let callers_channel = conn.create_channel().await.unwrap();
    let error = topology.check(&conn, &Entity::ALL).await.unwrap_err();
    assert_eq!(error.missing(), Some(events.as_str()), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&format!("queue '{events}' does not exist"))
            && message.contains("prebuildsctl migrate"),
        "{message}"
    );
    // The 404 closed the check's own channel only.
    assert!(callers_channel.status().connected());
    // What does not use the missing queue still passes, on the same connection.
    topology
        .check(&conn, &[Entity::Exchange, Entity::Queue(QueueKind::Claims)])
        .await
        .expect("the claims queue is still there");

    // In the order given: the exchange, first in the list, is reported before the missing queue.
    broker
        .channel
        .exchange_delete(topology.exchange().as_str().into(), Default::default())
        .await
        .unwrap();
    match topology.check(&conn, &Entity::ALL).await {
        Err(TopologyError::Missing { what, name, .. }) => {
            assert_eq!((what, name), ("exchange", topology.exchange()))
        }
        other => panic!("expected the missing exchange, got {other:?}"),
    }
    // A process that declares puts everything back.
    topology
        .prepare(&conn, &[])
        .await
        .expect("declare mode declares");
    topology
        .check(&conn, &Entity::ALL)
        .await
        .expect("complete again");
}

#[tokio::test]
async fn unroutable_publish_is_an_error() {
    let broker = TestBroker::new().await;
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    let exchange = broker.topology.exchange();
    let err = publisher
        .publish(Outgoing::new(&exchange, "nobody.listens.here", b"{}"))
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Unroutable { .. }), "{err}");
    assert!(!err.is_transient());
    // A routable one still works on the same publisher afterwards.
    publisher
        .publish(Outgoing::new(&exchange, "reconcile.preset", b"{}"))
        .await
        .unwrap();
    assert!(broker
        .get(&broker.queue(QueueKind::Reconcile), Duration::from_secs(5))
        .await
        .is_some());
}

struct Scripted {
    calls: AtomicUsize,
    behaviour: fn(&Incoming, usize) -> Result<(), HandlerError>,
}

impl Handler for Scripted {
    async fn handle(&self, message: &Incoming) -> Result<(), HandlerError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        (self.behaviour)(message, n)
    }
}

#[tokio::test]
async fn permanent_failures_are_dead_lettered_once_with_the_reason() {
    let broker = TestBroker::new().await;
    let (ctx, registry) = context(&broker);
    let handler = Arc::new(Scripted {
        calls: AtomicUsize::new(0),
        behaviour: |_, _| {
            Err(HandlerError::permanent(
                "schema",
                "data.preset_id is missing",
            ))
        },
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer::run(
        spec(QueueKind::Reconcile),
        ctx.clone(),
        handler.clone(),
        shutdown.clone(),
    ));
    let exchange = broker.topology.exchange();
    // Publishes one body the handler refuses and returns its dead letter.
    let dead_letter_one = || async {
        ctx.publisher
            .publish(Outgoing::new(
                &exchange,
                "reconcile.preset",
                b"{\"bad\":true}",
            ))
            .await
            .unwrap();
        broker
            .get(&broker.topology.dead_queue(), Duration::from_secs(10))
            .await
    };
    let dead = dead_letter_one().await.expect("message dead-lettered");
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let reason = headers
        .inner()
        .get(DEAD_REASON_HEADER)
        .expect("reason header");
    let lapin::types::AMQPValue::LongString(reason) = reason else {
        panic!("reason header is a string: {reason:?}");
    };
    assert_eq!(
        String::from_utf8_lossy(reason.as_bytes()),
        "data.preset_id is missing"
    );
    // Barrier: a second message behind it. RabbitMQ puts a requeued message back at the head of
    // the queue, so by the time this one is dead-lettered a requeued first one would have been
    // handled again.
    dead_letter_one()
        .await
        .expect("the second message dead-lettered");
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        2,
        "each handled once, never requeued in a loop"
    );
    shutdown.cancel();
    task.await.unwrap();
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("prebuilds_dead_lettered_total{queue=\"reconcile\",reason=\"schema\"} 2"),
        "{text}"
    );
}

#[tokio::test]
async fn transient_failures_are_retried_then_bounded_by_the_delivery_limit() {
    let broker = TestBroker::new().await;
    let (ctx, _registry) = context(&broker);
    let handler = Arc::new(Scripted {
        calls: AtomicUsize::new(0),
        behaviour: |_, _| Err(HandlerError::Transient(anyhow::anyhow!("database is down"))),
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer::run(
        spec(QueueKind::Reconcile),
        ctx.clone(),
        handler.clone(),
        shutdown.clone(),
    ));
    let exchange = broker.topology.exchange();
    ctx.publisher
        .publish(Outgoing::new(&exchange, "reconcile.preset", b"{}"))
        .await
        .unwrap();
    // The broker dead-letters it after DELIVERY_LIMIT requeues: the loop is bounded.
    let dead = broker
        .get(&broker.topology.dead_queue(), Duration::from_secs(30))
        .await
        .expect("dead-lettered by the delivery limit");
    assert!(dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .contains_key("x-death"));
    let calls = handler.calls.load(Ordering::SeqCst);
    let limit = prebuilds_runtime::amqp::topology::DELIVERY_LIMIT as usize;
    // Each delivery: its attempt plus the in-place retries that fit the 150 ms window (0 to 2).
    let deliveries = limit + 1;
    assert!(
        calls >= deliveries && calls <= deliveries * 3,
        "calls = {calls}"
    );
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_a_slow_handler_finish_and_acknowledges_it() {
    let broker = TestBroker::new().await;
    let (ctx, registry) = context(&broker);
    struct Slow {
        started: tokio::sync::Notify,
        finished: AtomicUsize,
    }
    impl Handler for Slow {
        async fn handle(&self, _message: &Incoming) -> Result<(), HandlerError> {
            self.started.notify_one();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            self.finished.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }
    let handler = Arc::new(Slow {
        started: tokio::sync::Notify::new(),
        finished: AtomicUsize::new(0),
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer::run(
        spec(QueueKind::Reconcile),
        ctx.clone(),
        handler.clone(),
        shutdown.clone(),
    ));
    let exchange = broker.topology.exchange();
    ctx.publisher
        .publish(Outgoing::new(&exchange, "reconcile.preset", b"{}"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), handler.started.notified())
        .await
        .expect("handler started");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("drained in time")
        .unwrap();
    assert_eq!(handler.finished.load(Ordering::SeqCst), 1);
    // Acknowledged: nothing left to redeliver.
    assert!(broker
        .get(
            &broker.queue(QueueKind::Reconcile),
            Duration::from_millis(500)
        )
        .await
        .is_none());
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("prebuilds_messages_total{outcome=\"ack\",queue=\"reconcile\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_transient_outage_shorter_than_the_window_loses_nothing() {
    let broker = TestBroker::new().await;
    let (ctx, registry) = context(&broker);
    // Fails for the first ~1.5 s (an outage), then recovers: with a 10 s window the delivery is
    // retried in place and never burns the delivery limit.
    struct Outage {
        started: std::time::Instant,
        calls: AtomicUsize,
    }
    impl Handler for Outage {
        async fn handle(&self, _message: &Incoming) -> Result<(), HandlerError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.started.elapsed() < Duration::from_millis(1500) {
                return Err(HandlerError::Transient(anyhow::anyhow!("database is down")));
            }
            Ok(())
        }
    }
    let handler = Arc::new(Outage {
        started: std::time::Instant::now(),
        calls: AtomicUsize::new(0),
    });
    let shutdown = CancellationToken::new();
    let mut spec = spec(QueueKind::Reconcile);
    spec.transient_window = Duration::from_secs(10);
    let task = tokio::spawn(consumer::run(
        spec,
        ctx.clone(),
        handler.clone(),
        shutdown.clone(),
    ));
    let exchange = broker.topology.exchange();
    ctx.publisher
        .publish(Outgoing::new(&exchange, "reconcile.preset", b"{}"))
        .await
        .unwrap();
    prebuilds_tests::eventually(
        Duration::from_secs(15),
        "the handler to succeed",
        || async {
            (handler.started.elapsed() > Duration::from_millis(1500)
                && handler.calls.load(Ordering::SeqCst) > 1)
                .then_some(())
        },
    )
    .await;
    // Barrier: the consumer has settled the delivery (the counter moves as it settles), so what
    // follows is its final fate, not "not yet".
    prebuilds_tests::eventually(Duration::from_secs(15), "the delivery settled", || async {
        (settled(&registry, None) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(
        (settled(&registry, Some("ack")), settled(&registry, None)),
        (1.0, 1.0),
        "settled once, acknowledged"
    );
    assert!(
        broker
            .get(&broker.topology.dead_queue(), Duration::from_millis(200))
            .await
            .is_none(),
        "nothing dead-lettered"
    );
    assert!(
        broker
            .get(
                &broker.queue(QueueKind::Reconcile),
                Duration::from_millis(200)
            )
            .await
            .is_none(),
        "acknowledged, not requeued"
    );
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn a_message_declaring_another_content_type_is_refused_before_its_handler_runs() {
    let broker = TestBroker::new().await;
    let (ctx, _registry) = context(&broker);
    let handler = Arc::new(Scripted {
        calls: AtomicUsize::new(0),
        behaviour: |_, _| Ok(()),
    });
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer::run(
        spec(QueueKind::Reconcile),
        ctx.clone(),
        handler.clone(),
        shutdown.clone(),
    ));
    // Published raw, with a content type the service does not speak.
    let conn = amqp::connect(&broker.url, "raw").await.unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .basic_publish(
            broker.topology.exchange().as_str().into(),
            "reconcile.preset".into(),
            lapin::options::BasicPublishOptions::default(),
            b"<xml/>",
            lapin::BasicProperties::default().with_content_type("text/xml".into()),
        )
        .await
        .unwrap();
    let dead = broker
        .get(&broker.topology.dead_queue(), Duration::from_secs(10))
        .await
        .expect("dead-lettered");
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let Some(lapin::types::AMQPValue::LongString(reason)) = headers.inner().get(DEAD_REASON_HEADER)
    else {
        panic!("reason header");
    };
    assert!(String::from_utf8_lossy(reason.as_bytes()).contains("text/xml"));
    assert_eq!(handler.calls.load(Ordering::SeqCst), 0);
    shutdown.cancel();
    task.await.unwrap();
}
