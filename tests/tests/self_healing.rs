//! Self-healing, capacity-aware pools (issue 12) on the real services: hard-limit recovery by a
//! probe after the cooldown and `prebuildsctl preset reset`; the global in-flight cap with fair
//! progress and claims never held back; the warm/cold claim metric and the CLI claim history;
//! opt-in clean-up of failed prebuilds.
//!
//! Build the binaries first: `cargo build --workspace --bins`.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use chrono::{TimeDelta, Utc};
use prebuilds_runtime::amqp::{rpc::RpcClient, Publisher};
use prebuilds_schemas::{BuildStage, ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent};
use prebuilds_tests::{
    fixtures::{self, PrebuildSpec},
    process::binary,
    stack::{self, pool_counts, request_reconcile, wait_for, FakeOutcome, FakeProvisioner},
    TestBroker, TestDb,
};
use serde_json::Value;
use uuid::Uuid;

async fn ctl(db: &TestDb, broker: &TestBroker, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(binary("prebuildsctl"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &broker.url)
        .env("PREBUILDS_AMQP_PREFIX", broker.prefix())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run prebuildsctl");
    assert_eq!(
        out.status.code(),
        Some(0),
        "prebuildsctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn status_json(db: &TestDb, broker: &TestBroker, extra_env: &[(&str, &str)]) -> Vec<Value> {
    let mut cmd = tokio::process::Command::new(binary("prebuildsctl"));
    cmd.args(["status", "--json"])
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &broker.url)
        .env("PREBUILDS_AMQP_PREFIX", broker.prefix());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("run prebuildsctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json")
}

async fn preset_status(db: &TestDb, preset_id: Uuid) -> String {
    let c = db.pool.get().await.unwrap();
    c.query_one(
        "SELECT prebuild_status FROM template_version_presets WHERE id = $1",
        &[&preset_id],
    )
    .await
    .unwrap()
    .get(0)
}

/// In-flight prebuild create jobs, read the way the cap counts them.
async fn inflight_creates(db: &TestDb) -> i64 {
    let c = db.pool.get().await.unwrap();
    c.query_one(
        "SELECT count(*) FROM provisioner_jobs j JOIN workspace_builds b ON b.job_id = j.id
         WHERE j.job_status IN ('pending', 'running') AND b.stage = 'create'",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn a_hard_limited_preset_recovers_alone_after_the_cooldown() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "flaky", Some(1)).await;
    let failing = Arc::new(AtomicBool::new(true));
    let flag = failing.clone();
    let _provisioner = FakeProvisioner::start(&broker, move |_| {
        if flag.load(Ordering::SeqCst) {
            FakeOutcome::Fail
        } else {
            FakeOutcome::Succeed
        }
    })
    .await;
    let rules = [
        ("PREBUILDS_BACKOFF_INTERVAL", "100ms"),
        ("PREBUILDS_FAILURE_HARD_LIMIT", "3"),
        ("PREBUILDS_HARD_LIMIT_COOLDOWN", "2s"),
        ("PREBUILDS_HARD_LIMIT_COOLDOWN_MAX", "8s"),
    ];
    let (_worker, _) = stack::start("prebuilds-worker", &db, &broker, &rules);
    let mut scheduler_env = rules.to_vec();
    scheduler_env.extend([
        // Long enough that the test's own reconcile jobs are the ticks.
        ("PREBUILDS_RECONCILE_INTERVAL", "1h"),
        ("PREBUILDS_METRICS_INTERVAL", "200ms"),
    ]);
    let (_scheduler, scheduler_port) =
        stack::start("prebuilds-scheduler", &db, &broker, &scheduler_env);
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());

    // Three failures: hard-limited, with the next probe stored.
    let started = Instant::now();
    while preset_status(&db, fx.preset_id).await != "hard_limited" {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never hard-limited"
        );
        request_reconcile(&publisher, fx.preset_id).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let limited_at = Instant::now();
    let row = c
        .query_one(
            "SELECT hard_limited_at, hard_limit_probe_at, hard_limit_cooldown_secs
             FROM template_version_presets WHERE id = $1",
            &[&fx.preset_id],
        )
        .await
        .unwrap();
    let since: chrono::DateTime<Utc> = row.get(0);
    let probe_at: chrono::DateTime<Utc> = row.get(1);
    assert_eq!(probe_at - since, TimeDelta::seconds(2));
    assert_eq!(row.get::<_, i64>(2), 2);

    // Status and the gauge show the next probe.
    let rows = status_json(&db, &broker, &rules).await;
    assert_eq!(rows[0]["status"], "hard_limited");
    assert!(rows[0]["next_probe_at"].is_string(), "{:?}", rows[0]);
    wait_for(Duration::from_secs(10), "next-probe gauge", || async {
        stack::http_get(scheduler_port, "/metrics")
            .await
            .is_some_and(|(_, body)| {
                body.lines().any(|l| {
                    l.starts_with("prebuilds_preset_next_probe_timestamp_seconds{")
                        && l.contains("template_name=\"flaky\"")
                        && l.ends_with(&format!(" {}", probe_at.timestamp()))
                })
            })
    })
    .await;

    // The provisioner is fixed; ticks keep coming; the probe after the cooldown heals the pool.
    failing.store(false, Ordering::SeqCst);
    let started = Instant::now();
    while !(preset_status(&db, fx.preset_id).await == "healthy"
        && pool_counts(&db, fx.preset_id).await.eligible == 1)
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never recovered"
        );
        request_reconcile(&publisher, fx.preset_id).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(
        limited_at.elapsed() >= Duration::from_millis(1500),
        "no probe before the cooldown ({:?})",
        limited_at.elapsed()
    );
    let cleared: Option<chrono::DateTime<Utc>> = c
        .query_one(
            "SELECT hard_limit_probe_at FROM template_version_presets WHERE id = $1",
            &[&fx.preset_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(cleared, None, "record cleared on recovery");
    // Exactly one probe was needed: 3 failed creates, then 1 successful one.
    assert_eq!(pool_counts(&db, fx.preset_id).await.created, 4);
}

#[tokio::test]
async fn a_failed_probe_doubles_the_cooldown() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "broken", Some(1)).await;
    let _provisioner = FakeProvisioner::start(&broker, |_| FakeOutcome::Fail).await;
    let (_worker, _) = stack::start(
        "prebuilds-worker",
        &db,
        &broker,
        &[
            ("PREBUILDS_BACKOFF_INTERVAL", "100ms"),
            ("PREBUILDS_HARD_LIMIT_COOLDOWN", "1s"),
            ("PREBUILDS_HARD_LIMIT_COOLDOWN_MAX", "3s"),
        ],
    );
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    let cooldown = || async {
        c.query_one(
            "SELECT hard_limit_cooldown_secs FROM template_version_presets WHERE id = $1",
            &[&fx.preset_id],
        )
        .await
        .unwrap()
        .get::<_, Option<i64>>(0)
    };
    let started = Instant::now();
    // 1 s → probe fails → 2 s → probe fails → 3 s (capped).
    while cooldown().await != Some(3) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cooldown never reached the cap"
        );
        request_reconcile(&publisher, fx.preset_id).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(preset_status(&db, fx.preset_id).await, "hard_limited");
    // 3 failures to trip, then one create per probe.
    assert_eq!(pool_counts(&db, fx.preset_id).await.created, 5);
}

#[tokio::test]
async fn preset_reset_clears_the_hard_limit_at_once() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "python", Some(1)).await;
    for i in 0..3 {
        let spec = PrebuildSpec {
            transition: "start",
            job_status: "failed",
            created_at: Utc::now() - TimeDelta::minutes(10 + i),
            ready: false,
        };
        fixtures::prebuild(&c, &fx, &spec).await;
    }
    c.execute(
        "UPDATE template_version_presets SET prebuild_status = 'hard_limited' WHERE id = $1",
        &[&fx.preset_id],
    )
    .await
    .unwrap();
    let _provisioner = FakeProvisioner::start(&broker, |_| FakeOutcome::Succeed).await;
    let (_worker, _) = stack::start("prebuilds-worker", &db, &broker, &[]);
    // Default 30 min cooldown: only the reset can bring the pool back within the test.
    let out = ctl(
        &db,
        &broker,
        &["preset", "reset", &fx.preset_id.to_string()],
    )
    .await;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("from hard_limited to healthy"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The reset's own reconcile request (through the outbox) refills the pool: no tick here.
    wait_for(
        Duration::from_secs(20),
        "pool refilled after reset",
        || async { pool_counts(&db, fx.preset_id).await.eligible == 1 },
    )
    .await;
    assert_eq!(preset_status(&db, fx.preset_id).await, "healthy");

    // validation_failed is cleared the same way; an unknown id is an error.
    c.execute(
        "UPDATE template_version_presets SET prebuild_status = 'validation_failed' WHERE id = $1",
        &[&fx.preset_id],
    )
    .await
    .unwrap();
    ctl(
        &db,
        &broker,
        &["preset", "reset", &fx.preset_id.to_string()],
    )
    .await;
    assert_eq!(preset_status(&db, fx.preset_id).await, "healthy");
    let out = tokio::process::Command::new(binary("prebuildsctl"))
        .args(["preset", "reset", &Uuid::new_v4().to_string()])
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &broker.url)
        .env("PREBUILDS_AMQP_PREFIX", broker.prefix())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[tokio::test]
async fn the_inflight_cap_holds_with_fair_progress_and_claims_pass() {
    const PRESETS: usize = 20;
    const CAP: i64 = 5;
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let user = fixtures::user(&c, "alice", false).await;
    let mut presets = Vec::new();
    for i in 0..PRESETS {
        presets.push(fixtures::template_with_preset(&c, org, &format!("t{i}"), Some(1)).await);
    }
    // A warm pool whose prebuild is ready before anything runs (needs no create).
    let warm = fixtures::template_with_preset(&c, org, "warm", Some(1)).await;
    fixtures::prebuild(&c, &warm, &PrebuildSpec::running(Utc::now())).await;

    // Jobs are held; the test answers them, a few at a time.
    let provisioner = FakeProvisioner::start(&broker, |_| FakeOutcome::Hold).await;
    let env = [("PREBUILDS_MAX_INFLIGHT_JOBS", "5")];
    // Two workers: the cap must hold across processes.
    let (_w1, _) = stack::start("prebuilds-worker", &db, &broker, &env);
    let (_w2, _) = stack::start("prebuilds-worker", &db, &broker, &env);
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    let answers = Publisher::new(&broker.url, "test-answers", broker.topology.clone());
    for fx in &presets {
        request_reconcile(&publisher, fx.preset_id).await;
    }
    wait_for(Duration::from_secs(20), "cap filled", || async {
        inflight_creates(&db).await == CAP
    })
    .await;
    // Stable at the cap while nothing completes.
    for _ in 0..10 {
        assert_eq!(inflight_creates(&db).await, CAP);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A claim while the cap is full: the claim build is published at once.
    let rpc = RpcClient::connect(&broker.url, "test-claims", broker.topology.clone())
        .await
        .unwrap();
    let request = CloudEvent::new(
        "test",
        Utc::now(),
        ClaimRequest {
            user_id: user,
            workspace_name: "alice-ws".into(),
            preset_id: Some(warm.preset_id),
            template_id: None,
            parameters: vec![],
        },
    );
    let reply: CloudEvent<ClaimReply> = rpc.call(&request, Duration::from_secs(10)).await.unwrap();
    assert_eq!(reply.data.outcome, ClaimOutcome::Claimed);
    wait_for(Duration::from_secs(5), "claim job published", || async {
        provisioner.received().iter().any(|j| {
            j.stage == BuildStage::Claim && j.workspace_id == reply.data.workspace_id.unwrap()
        })
    })
    .await;
    assert_eq!(inflight_creates(&db).await, CAP, "creates still capped");

    // Complete jobs as a slow provisioner would; sample the cap all along. No ticks: completions
    // alone must bring the held-back presets back.
    let mut answered: HashSet<Uuid> = HashSet::new();
    let mut max_seen = 0;
    let started = Instant::now();
    loop {
        let inflight = inflight_creates(&db).await;
        max_seen = max_seen.max(inflight);
        assert!(
            inflight <= CAP,
            "{inflight} create jobs in flight, cap {CAP}"
        );
        let mut done = 0;
        for fx in presets.iter().chain([&warm]) {
            if pool_counts(&db, fx.preset_id).await.eligible >= 1 {
                done += 1;
            }
        }
        if done == PRESETS + 1 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "only {done} of {} presets got a prebuild",
            PRESETS + 1
        );
        // Answer up to two open jobs per round.
        let open: Vec<_> = provisioner
            .received()
            .into_iter()
            .filter(|j| !answered.contains(&j.job_id))
            .take(2)
            .collect();
        for job in open {
            answered.insert(job.job_id);
            stack::answer(&answers, &job, FakeOutcome::Succeed).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(max_seen, CAP);
    let creates = provisioner
        .received()
        .iter()
        .filter(|j| j.stage == BuildStage::Create)
        .count();
    assert_eq!(
        creates,
        PRESETS + 1,
        "one create per preset, none duplicated"
    );
}

#[tokio::test]
async fn claims_count_hits_and_misses_and_status_shows_the_history() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let user = fixtures::user(&c, "alice", false).await;
    let fx = fixtures::template_with_preset(&c, org, "python", Some(1)).await;
    fixtures::prebuild(&c, &fx, &PrebuildSpec::running(Utc::now())).await;
    // Replacements never finish: the second claim finds nothing eligible.
    let _provisioner = FakeProvisioner::start(&broker, |_| FakeOutcome::Hold).await;
    let (_worker, port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    let rpc = RpcClient::connect(&broker.url, "test-claims", broker.topology.clone())
        .await
        .unwrap();
    let claim = |name: &str| {
        CloudEvent::new(
            "test",
            Utc::now(),
            ClaimRequest {
                user_id: user,
                workspace_name: name.into(),
                preset_id: Some(fx.preset_id),
                template_id: None,
                parameters: vec![],
            },
        )
    };
    let first = claim("one");
    let hit: CloudEvent<ClaimReply> = rpc.call(&first, Duration::from_secs(10)).await.unwrap();
    assert_eq!(hit.data.outcome, ClaimOutcome::Claimed);
    let miss: CloudEvent<ClaimReply> = rpc
        .call(&claim("two"), Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(miss.data.outcome, ClaimOutcome::NoEligiblePrebuild);
    // A retried request is answered from its record and not counted twice.
    let again: CloudEvent<ClaimReply> = rpc.call(&first, Duration::from_secs(10)).await.unwrap();
    assert_eq!(again.data, hit.data);

    let (_, metrics) = stack::http_get(port, "/metrics").await.unwrap();
    let series = |outcome: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("coderd_prebuilt_workspaces_claims_total{")
                    && l.contains(&format!("outcome=\"{outcome}\""))
                    && l.contains("template_name=\"python\"")
                    && l.contains("preset_name=\"default\"")
                    && l.contains("organization_name=\"acme\"")
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    assert_eq!(series("hit").as_deref(), Some("1"), "{metrics}");
    assert_eq!(series("miss").as_deref(), Some("1"), "{metrics}");

    let rows = status_json(&db, &broker, &[]).await;
    let row = rows
        .iter()
        .find(|r| r["preset_id"] == fx.preset_id.to_string())
        .unwrap();
    for window in ["5m", "10m", "30m", "60m", "120m"] {
        assert_eq!(row[format!("claims_{window}")], 1, "{row}");
        assert_eq!(row[format!("misses_{window}")], 1, "{row}");
    }
    // Older requests fall out of the short windows.
    c.execute(
        "UPDATE claim_requests SET created_at = now() - interval '20 minutes' WHERE outcome = 'claimed'",
        &[],
    )
    .await
    .unwrap();
    let rows = status_json(&db, &broker, &[]).await;
    assert_eq!(rows[0]["claims_10m"], 0);
    assert_eq!(rows[0]["claims_30m"], 1);
    let out = ctl(&db, &broker, &["status"]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("HITS/MISSES 60M"), "{table}");
    assert!(table.contains("1/1"), "{table}");
}

#[tokio::test]
async fn failed_prebuilds_are_cleaned_up_only_with_a_retention() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    // Desired 0: no creates (and no backoff) in the way; only the clean-up acts.
    let fx = fixtures::template_with_preset(&c, org, "python", Some(0)).await;
    let mut failed = Vec::new(); // newest first
    for i in 0..5 {
        let spec = PrebuildSpec {
            transition: "start",
            job_status: "failed",
            created_at: Utc::now() - TimeDelta::hours(2) - TimeDelta::minutes(i),
            ready: false,
        };
        failed.push(fixtures::prebuild(&c, &fx, &spec).await);
    }
    // A recent failure beyond the kept ones is not old enough.
    let recent = PrebuildSpec {
        transition: "start",
        job_status: "failed",
        created_at: Utc::now() - TimeDelta::minutes(5),
        ready: false,
    };
    let recent = fixtures::prebuild(&c, &fx, &recent).await;
    let _provisioner = FakeProvisioner::start(&broker, |_| FakeOutcome::Succeed).await;
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    let reconciled = || async {
        c.query_opt(
            "SELECT last_reconciled_at FROM preset_reconcile_state WHERE preset_id = $1",
            &[&fx.preset_id],
        )
        .await
        .unwrap()
        .map(|r| r.get::<_, chrono::DateTime<Utc>>(0))
    };
    let delete_builds = || async {
        c.query_one(
            "SELECT count(*) FROM workspace_builds WHERE transition = 'delete'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };

    // Off by default: a reconcile leaves every failed prebuild alone.
    let (mut worker, _) = stack::start("prebuilds-worker", &db, &broker, &[]);
    request_reconcile(&publisher, fx.preset_id).await;
    wait_for(Duration::from_secs(20), "reconciled", || async {
        reconciled().await.is_some()
    })
    .await;
    assert_eq!(delete_builds().await, 0);
    worker.terminate(Duration::from_secs(10)).await;

    // Retention 1h, keep 3: of the six failed, the newest three (recent + two of the old) stay;
    // the three older than 1 h beyond them are deleted.
    let (_worker, _) = stack::start(
        "prebuilds-worker",
        &db,
        &broker,
        &[
            ("PREBUILDS_FAILED_RETENTION", "1h"),
            ("PREBUILDS_FAILED_KEEP", "3"),
        ],
    );
    request_reconcile(&publisher, fx.preset_id).await;
    wait_for(
        Duration::from_secs(20),
        "old failed prebuilds deleted",
        || async {
            c.query_one(
                "SELECT count(*) FROM workspaces WHERE deleted AND id = ANY($1)",
                &[&failed[2..].to_vec()],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
                == 3
        },
    )
    .await;
    let live: Vec<Uuid> = c
        .query(
            "SELECT id FROM workspaces WHERE NOT deleted ORDER BY created_at DESC",
            &[],
        )
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(live, vec![recent, failed[0], failed[1]]);
    assert_eq!(delete_builds().await, 3);
}
