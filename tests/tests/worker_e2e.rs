//! The real `prebuilds-worker` binary against the real services, with a scripted provisioner:
//! pools fill and refill right after a claim, failures back off and hard-limit, poison messages
//! are dead-lettered with a reason, a SIGKILL mid-transaction loses nothing, SIGTERM drains.

use std::time::{Duration, Instant};

use chrono::Utc;
use prebuilds_runtime::amqp::{
    consumer::DEAD_REASON_HEADER, publisher::Outgoing, rpc::RpcClient, Publisher, QueueKind,
};
use prebuilds_schemas::{
    ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent, JobStarted, ReconcilePreset,
    ReconcileReason,
};
use prebuilds_tests::{
    fixtures,
    stack::{self, pool_counts, request_reconcile, wait_for, FakeOutcome, FakeProvisioner},
    TestBroker, TestDb,
};
use uuid::Uuid;

/// Reconcile jobs the worker has finished, whatever their result.
async fn reconcile_jobs_handled(port: u16) -> f64 {
    let (_, metrics) = stack::http_get(port, "/metrics").await.unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("prebuilds_reconcile_jobs_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_pool_fills_and_is_replenished_right_after_a_claim() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "python", Some(2)).await;
    let user = fixtures::user(&c, "alice", false).await;
    let provisioner = FakeProvisioner::start(&broker, |_| FakeOutcome::Succeed).await;
    let (_worker, port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    request_reconcile(&publisher, fx.preset_id).await;
    wait_for(Duration::from_secs(20), "pool of 2 eligible", || async {
        pool_counts(&db, fx.preset_id).await.eligible == 2
    })
    .await;
    // Let the reconciles the fill queued (job completions, agents ready) finish first: one of
    // them running after the claim would create the replacement itself, and the claim's own
    // reconcile would find nothing left to do and record no replenish latency.
    wait_for(
        Duration::from_secs(10),
        "the fill's reconciles done",
        || async {
            let before = reconcile_jobs_handled(port).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let unpublished = fixtures::unpublished_outbox(&c).await.unwrap();
            unpublished == 0 && reconcile_jobs_handled(port).await == before
        },
    )
    .await;

    let rpc = RpcClient::connect(&broker.url, "test-claims", broker.topology.clone())
        .await
        .unwrap();
    let jobs_before = provisioner.received().len();
    let request = CloudEvent::new(
        "test",
        Utc::now(),
        ClaimRequest {
            user_id: user,
            workspace_name: "alice-ws".into(),
            preset_id: Some(fx.preset_id),
            template_id: None,
            parameters: vec![],
        },
    );
    let asked = Instant::now();
    let reply: CloudEvent<ClaimReply> = rpc.call(&request, Duration::from_secs(10)).await.unwrap();
    let claim_latency = asked.elapsed();
    assert_eq!(reply.data.outcome, ClaimOutcome::Claimed);
    // The replacement's create job reaches the provisioner without any tick.
    wait_for(Duration::from_secs(5), "replacement create job", || async {
        provisioner.received()[jobs_before..]
            .iter()
            .any(|j| j.stage == prebuilds_schemas::BuildStage::Create)
    })
    .await;
    let replenish = asked.elapsed();
    println!("claim round trip {claim_latency:?}; replacement job published {replenish:?} after the request");
    assert!(
        replenish < Duration::from_secs(2),
        "replenished in {replenish:?}"
    );
    wait_for(Duration::from_secs(20), "pool back at 2", || async {
        pool_counts(&db, fx.preset_id).await.eligible == 2
    })
    .await;
    // The same request again returns the first outcome.
    let again: CloudEvent<ClaimReply> = rpc.call(&request, Duration::from_secs(10)).await.unwrap();
    assert_eq!(again.data, reply.data);

    let (status, metrics) = stack::http_get(port, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("coderd_prebuilt_workspace_claim_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(metrics.contains("coderd_prebuilds_reconciliation_duration_seconds_count"));
    assert!(
        metrics.contains("prebuilds_replenish_latency_seconds_count 1"),
        "the claim's reconcile queued the replacement: {metrics}"
    );
    assert_eq!(stack::http_get(port, "/readyz").await.unwrap().0, 200);
}

#[tokio::test]
async fn failing_builds_back_off_then_hard_limit_the_preset() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "broken", Some(1)).await;
    let provisioner = FakeProvisioner::start(&broker, |_| FakeOutcome::Fail).await;
    let (_worker, worker_port) = stack::start(
        "prebuilds-worker",
        &db,
        &broker,
        &[
            ("PREBUILDS_BACKOFF_INTERVAL", "1s"),
            ("PREBUILDS_FAILURE_HARD_LIMIT", "3"),
        ],
    );
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    let mut saw_backoff_gap = false;
    let started = Instant::now();
    loop {
        // Stand-in for the scheduler's tick.
        request_reconcile(&publisher, fx.preset_id).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let status: String = c
            .query_one(
                "SELECT prebuild_status FROM template_version_presets WHERE id = $1",
                &[&fx.preset_id],
            )
            .await
            .unwrap()
            .get(0);
        if status == "hard_limited" {
            break;
        }
        let jobs = provisioner.received().len();
        if (1..3).contains(&jobs) {
            // Between failures the preset waits: several ticks pass without a new job.
            saw_backoff_gap |= started.elapsed() > Duration::from_millis(900);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never hard-limited; jobs = {jobs}"
        );
    }
    assert!(saw_backoff_gap);
    let jobs = provisioner.received().len();
    assert_eq!(jobs, 3, "exactly the hard limit's worth of failed creates");
    // No more creates once hard-limited: once the worker has handled five more reconcile jobs
    // (acknowledged, so their transactions are over), still three jobs.
    let acked = || async {
        let (_, body) = stack::http_get(worker_port, "/metrics").await?;
        body.lines()
            .find_map(|l| {
                l.strip_prefix(r#"prebuilds_messages_total{outcome="ack",queue="reconcile"} "#)
            })
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let before = acked()
        .await
        .expect("the worker acknowledged reconcile jobs");
    for _ in 0..5 {
        request_reconcile(&publisher, fx.preset_id).await;
    }
    wait_for(
        Duration::from_secs(30),
        "five more reconcile jobs handled",
        || async { acked().await.is_some_and(|n| n >= before + 5) },
    )
    .await;
    let job_rows: i64 = c
        .query_one("SELECT count(*) FROM provisioner_jobs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(job_rows, 3, "no create after the hard limit");
    assert_eq!(provisioner.received().len(), 3);
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_a_reason_and_valid_work_continues() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "ok", Some(1)).await;
    let (_worker, port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    let exchange = broker.topology.exchange();
    let valid = serde_json::to_value(CloudEvent::new(
        "test",
        Utc::now(),
        ReconcilePreset {
            preset_id: fx.preset_id,
            reason: ReconcileReason::Manual,
            requested_at: Utc::now(),
        },
    ))
    .unwrap();
    let mut schema_violation = valid.clone();
    schema_violation["data"]["reason"] = "whim".into();
    let mut unknown_preset = valid.clone();
    unknown_preset["data"]["preset_id"] = Uuid::new_v4().to_string().into();
    let mut wrong_type = valid.clone();
    wrong_type["type"] = "prebuilds.something.v1".into();
    let unknown_job = serde_json::to_vec(&CloudEvent::new(
        "test",
        Utc::now(),
        JobStarted {
            job_id: Uuid::new_v4(),
            started_at: Utc::now(),
        },
    ))
    .unwrap();
    let oversized = vec![b'x'; 2 * 1024 * 1024];
    let poison: Vec<(&str, Vec<u8>, &str)> = vec![
        ("reconcile.preset", b"{not json".to_vec(), "not valid JSON"),
        (
            "reconcile.preset",
            serde_json::to_vec(&schema_violation).unwrap(),
            "violates its schema",
        ),
        (
            "reconcile.preset",
            serde_json::to_vec(&unknown_preset).unwrap(),
            "unknown preset",
        ),
        (
            "reconcile.preset",
            serde_json::to_vec(&wrong_type).unwrap(),
            "unexpected message type",
        ),
        (
            "provisioner.event.job_started",
            unknown_job,
            "unknown provisioner job",
        ),
        ("provisioner.event.job_log", oversized, "over the"),
        ("claim.request", b"[]".to_vec(), "CloudEvents"),
    ];
    for (key, body, _) in &poison {
        publisher
            .publish(Outgoing::new(&exchange, key, body))
            .await
            .unwrap();
    }
    publisher
        .publish(Outgoing::new(
            &exchange,
            "reconcile.preset",
            &serde_json::to_vec(&valid).unwrap(),
        ))
        .await
        .unwrap();
    wait_for(Duration::from_secs(20), "valid job processed", || async {
        pool_counts(&db, fx.preset_id).await.created == 1
    })
    .await;
    let dead = broker
        .drain(&broker.topology.dead_queue(), Duration::from_secs(3))
        .await;
    assert_eq!(
        dead.len(),
        poison.len(),
        "each poison message dead-lettered once"
    );
    let reasons: Vec<String> = dead
        .iter()
        .map(|d| {
            let headers = d.properties.headers().clone().unwrap_or_default();
            match headers.inner().get(DEAD_REASON_HEADER) {
                Some(lapin::types::AMQPValue::LongString(s)) => {
                    String::from_utf8_lossy(s.as_bytes()).into_owned()
                }
                other => panic!("no reason header: {other:?}"),
            }
        })
        .collect();
    for (_, _, expected) in &poison {
        assert!(
            reasons.iter().any(|r| r.contains(expected)),
            "no reason mentioning {expected:?} in {reasons:?}"
        );
    }
    let (_, metrics) = stack::http_get(port, "/metrics").await.unwrap();
    assert!(
        metrics.contains("prebuilds_dead_lettered_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_worker_killed_mid_transaction_leaves_nothing_and_another_redoes_the_job() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "crash", Some(3)).await;
    // Hold the row the reconcile writes last: the worker blocks after writing its creates.
    let blocker = db.connect().await;
    blocker
        .batch_execute(&format!(
            "INSERT INTO preset_reconcile_state VALUES ('{}', '2000-01-01');
             BEGIN; SELECT * FROM preset_reconcile_state FOR UPDATE;",
            fx.preset_id
        ))
        .await
        .unwrap();
    let (mut victim, _) = stack::start("prebuilds-worker", &db, &broker, &[]);
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    request_reconcile(&publisher, fx.preset_id).await;
    wait_for(
        Duration::from_secs(20),
        "the worker to block mid-transaction",
        || async {
            let waiting: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                 AND wait_event_type = 'Lock' AND query LIKE '%preset_reconcile_state%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            waiting > 0
        },
    )
    .await;
    // The victim's blocked backend: once it has ended, whatever it did is final (anything
    // already sent to it before the kill, a COMMIT included, would have run by then).
    let blocked: Vec<i32> = c
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
             AND wait_event_type = 'Lock' AND query LIKE '%preset_reconcile_state%'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    victim.kill().await;
    blocker.batch_execute("COMMIT").await.unwrap();
    wait_for(
        Duration::from_secs(20),
        "the victim's backend gone",
        || async {
            c.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                &[&blocked],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 0
        },
    )
    .await;
    assert_eq!(
        pool_counts(&db, fx.preset_id).await.created,
        0,
        "nothing half-made"
    );

    let (_survivor, survivor_port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    wait_for(Duration::from_secs(30), "the job redone", || async {
        pool_counts(&db, fx.preset_id).await.created == 3
    })
    .await;
    // Barrier: the survivor has finished the redelivered job (counted after its commit) and
    // relayed everything it wrote, so a second execution would have shown by now.
    wait_for(
        Duration::from_secs(30),
        "the redone job settled",
        || async {
            reconcile_jobs_handled(survivor_port).await >= 1.0
                && fixtures::unpublished_outbox(&c).await.unwrap() == 0
        },
    )
    .await;
    assert_eq!(
        pool_counts(&db, fx.preset_id).await.created,
        3,
        "done exactly once"
    );
    let published: i64 = c
        .query_one("SELECT count(*) FROM outbox WHERE routing_key = 'provisioner.job.start' AND published_at IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(published, 3);
}

#[tokio::test]
async fn sigterm_drains_and_exits_cleanly() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (mut worker, port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    wait_for(Duration::from_secs(20), "worker ready", || async {
        matches!(stack::http_get(port, "/readyz").await, Some((200, _)))
    })
    .await;
    let started = Instant::now();
    let status = worker
        .terminate(Duration::from_secs(30))
        .await
        .expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Its consumers are gone: nothing consumes the queues any more.
    let q = broker
        .channel
        .queue_declare(
            broker.queue(QueueKind::Reconcile).as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.consumer_count(), 0);
}
