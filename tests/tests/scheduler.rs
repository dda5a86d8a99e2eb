//! Acceptance tests of `prebuilds-scheduler` on the real PostgreSQL and RabbitMQ: leader election
//! and fail-over, one publication per (preset, tick), pool-state metrics equal to the database,
//! deleted templates, global pause and resume, graceful shutdown.
//!
//! Build the binary first: `cargo build -p prebuilds-scheduler`.

mod scheduler_support;

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use prebuilds_runtime::amqp::QueueKind;
use prebuilds_tests::fixtures::template;
use prebuilds_tests::{eventually, fixtures, TestBroker, TestDb};
use scheduler_support::*;
use uuid::Uuid;

const SCRAPE: Duration = Duration::from_secs(20);

async fn presets(db: &TestDb, n: usize) -> Vec<Uuid> {
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let mut ids = Vec::new();
    for i in 0..n {
        let f = fixtures::template_with_preset(&c, org, &format!("tpl-{i}"), Some(1)).await;
        ids.push(f.preset_id);
    }
    ids
}

/// (a) Two replicas: one leads, only it publishes, and every (preset, tick) is published once.
#[tokio::test]
async fn two_schedulers_publish_each_tick_once_from_one_leader() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let ids = presets(&db, 3).await;

    let first_index = chrono::Utc::now().timestamp() - 1;
    let a = Scheduler::start(&db, &broker, &[]);
    let b = Scheduler::start(&db, &broker, &[]);
    let leader = wait_for_single_leader(&[&a, &b], SCRAPE).await;
    let jobs = drain_jobs(&broker, Duration::from_millis(4500)).await;
    let last_index = chrono::Utc::now().timestamp();

    // Still exactly one leader, the same one.
    assert_eq!(wait_for_single_leader(&[&a, &b], SCRAPE).await, leader);
    let leader_suffix = [&a, &b][leader].source_suffix();

    assert!(
        jobs.len() >= 3 * ids.len(),
        "expected ≥ 3 ticks, got {} jobs",
        jobs.len()
    );
    let mut per_id: HashMap<Uuid, usize> = HashMap::new();
    let mut per_preset: HashMap<Uuid, usize> = HashMap::new();
    for j in &jobs {
        assert_eq!(j.reason, "tick");
        assert!(
            j.source.ends_with(&leader_suffix),
            "job from {} but the leader is …{leader_suffix}",
            j.source
        );
        assert!(ids.contains(&j.preset_id));
        *per_id.entry(j.id).or_default() += 1;
        *per_preset.entry(j.preset_id).or_default() += 1;
        // The id is the deterministic (preset, tick) id of one of the ticks in the window.
        let known = (first_index..=last_index).any(|i| tick_job_id(j.preset_id, i) == j.id);
        assert!(known, "job id {} is not a (preset, tick) id", j.id);
    }
    assert!(
        per_id.values().all(|n| *n == 1),
        "some (preset, tick) was published twice: {per_id:?}"
    );
    // Every preset got the same number of ticks (± the window edges).
    let counts: HashSet<usize> = per_preset.values().copied().collect();
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{per_preset:?}"
    );
}

/// (b) SIGKILL the leader: the standby publishes within 2 × the lock retry interval (+ margin).
#[tokio::test]
async fn killing_the_leader_hands_over_within_two_lock_retry_intervals() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    presets(&db, 2).await;
    let retry = Duration::from_secs(1);
    let env = [
        ("PREBUILDS_LOCK_RETRY_INTERVAL", "1s"),
        ("PREBUILDS_RECONCILE_INTERVAL", "1m"),
    ];
    let mut replicas = [
        Scheduler::start(&db, &broker, &env),
        Scheduler::start(&db, &broker, &env),
    ];
    let leader = wait_for_single_leader(&[&replicas[0], &replicas[1]], SCRAPE).await;
    let standby = 1 - leader;
    let standby_suffix = replicas[standby].source_suffix();
    // The leader's first pass is on the queue; the standby has published nothing.
    let queue = broker.queue(QueueKind::Reconcile);
    eventually(SCRAPE, "the leader's first pass", || async {
        (reconcile_queue_depth(&broker).await >= 2).then_some(())
    })
    .await;
    let before = drain_jobs(&broker, Duration::from_millis(300)).await;
    assert!(before.iter().all(|j| !j.source.ends_with(&standby_suffix)));

    let killed_at = Instant::now();
    replicas[leader].service.kill().await;
    let took = loop {
        let message = broker
            .get(&queue, Duration::from_secs(10))
            .await
            .expect("the standby publishes after the leader died");
        let j = job(&message.data);
        if j.source.ends_with(&standby_suffix) {
            break killed_at.elapsed();
        }
    };
    eprintln!("standby published {took:?} after the leader was killed");
    assert!(
        took <= 2 * retry + Duration::from_millis(750),
        "take-over took {took:?}"
    );
    assert_eq!(replicas[standby].is_leader().await, Some(true));
}

/// A leader whose lock connection is terminated stops leading at once; leadership is re-won
/// (by either replica) and publishing continues.
#[tokio::test]
async fn a_leader_losing_its_lock_connection_steps_down_and_leadership_recovers() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let ids = presets(&db, 2).await;
    let a = Scheduler::start(&db, &broker, &[]);
    let b = Scheduler::start(&db, &broker, &[]);
    wait_for_single_leader(&[&a, &b], SCRAPE).await;

    let c = db.pool.get().await.unwrap();
    let terminated = c
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database()
               AND application_name = 'prebuilds-scheduler leader lock'
               AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(terminated, 1, "exactly one session holds the leader lock");

    // Two terms in total: the lost one and the new one, whoever won it.
    eventually(SCRAPE, "a second leader term", || async {
        let (ma, mb) = (a.scrape().await?, b.scrape().await?);
        let terms = ma.value("prebuilds_scheduler_leader_terms_total")?
            + mb.value("prebuilds_scheduler_leader_terms_total")?;
        let leaders = ma.value("prebuilds_scheduler_is_leader")?
            + mb.value("prebuilds_scheduler_is_leader")?;
        (terms == 2.0 && leaders == 1.0).then_some(())
    })
    .await;
    // Publishing goes on under the new term.
    let _ = drain_jobs(&broker, Duration::from_millis(200)).await;
    let jobs = drain_jobs(&broker, Duration::from_millis(2500)).await;
    let seen: HashSet<Uuid> = jobs.iter().map(|j| j.preset_id).collect();
    assert_eq!(seen, ids.iter().copied().collect());
}

/// (c) The pool-state metrics equal the database state of a fixture world.
#[tokio::test]
async fn pool_metrics_equal_the_database_state() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let alice = fixtures::user(&c, "alice", false).await;

    // python: v1 (old, still has a running prebuild) and v2 (active).
    let (python, v1) = template(&c, org, "python").await;
    let v2 = version(&c, python, "v2").await;
    c.execute(
        "UPDATE templates SET active_version_id = $1 WHERE id = $2",
        &[&v2, &python],
    )
    .await
    .unwrap();
    let old_small = preset(&c, org, python, v1, "small", Some(1), "healthy").await;
    let small = preset(&c, org, python, v2, "small", Some(3), "healthy").await;
    let hard = preset(&c, org, python, v2, "hl", Some(2), "hard_limited").await;
    preset(&c, org, python, v2, "unconfigured", None, "healthy").await;
    c.execute(
        "UPDATE template_version_presets SET last_invalidated_at = now() - interval '30 minutes'
         WHERE id = $1",
        &[&small.preset_id],
    )
    .await
    .unwrap();
    let (rust, rv1) = template(&c, org, "rust").await;
    let invalid = preset(&c, org, rust, rv1, "vf", Some(1), "validation_failed").await;

    let minute = Duration::from_secs(60);
    // small (active): running+ready, running+not ready, running+expired, failed, claimed,
    // deleted, in progress.
    prebuild(
        &c,
        small,
        Prebuild {
            agents: &["ready", "ready"],
            ..Default::default()
        },
    )
    .await;
    prebuild(
        &c,
        small,
        Prebuild {
            agents: &["ready", "starting"],
            ..Default::default()
        },
    )
    .await;
    prebuild(
        &c,
        small,
        Prebuild {
            age: 120 * minute,
            ..Default::default()
        },
    )
    .await;
    prebuild(
        &c,
        small,
        Prebuild {
            job_status: "failed",
            agents: &[],
            ..Default::default()
        },
    )
    .await;
    prebuild(
        &c,
        small,
        Prebuild {
            claimed_by: Some(alice),
            ..Default::default()
        },
    )
    .await;
    prebuild(
        &c,
        small,
        Prebuild {
            deleted: true,
            ..Default::default()
        },
    )
    .await;
    prebuild(
        &c,
        small,
        Prebuild {
            job_status: "running",
            agents: &[],
            ..Default::default()
        },
    )
    .await;
    // small on the old version: counted in the lifetime counters (same names), not in the gauges.
    prebuild(&c, old_small, Prebuild::default()).await;
    // hl: three failures.
    for _ in 0..3 {
        prebuild(
            &c,
            hard,
            Prebuild {
                job_status: "failed",
                agents: &[],
                ..Default::default()
            },
        )
        .await;
    }
    let _ = invalid;

    let s = Scheduler::start(&db, &broker, &[]);
    let m = eventually(SCRAPE, "pool metrics", || async {
        let m = s.scrape().await?;
        m.value("coderd_prebuilt_workspaces_metrics_last_updated")?;
        Some(m)
    })
    .await;
    let get = |name: &str, t: &str, p: &str| m.preset(name, t, p, "acme");

    // Counters: database aggregates over build #1 of prebuilds (lifetime, by names).
    assert_eq!(
        get(
            "coderd_prebuilt_workspaces_created_total",
            "python",
            "small"
        ),
        Some(8.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_failed_total", "python", "small"),
        Some(1.0)
    );
    assert_eq!(
        get(
            "coderd_prebuilt_workspaces_claimed_total",
            "python",
            "small"
        ),
        Some(1.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_created_total", "python", "hl"),
        Some(3.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_failed_total", "python", "hl"),
        Some(3.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_claimed_total", "python", "hl"),
        Some(0.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_created_total", "rust", "vf"),
        None
    );

    // Gauges: active presets with prebuilds configured.
    assert_eq!(
        get("coderd_prebuilt_workspaces_desired", "python", "small"),
        Some(3.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_running", "python", "small"),
        Some(3.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_eligible", "python", "small"),
        Some(1.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_desired", "python", "hl"),
        Some(2.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_running", "python", "hl"),
        Some(0.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_desired", "rust", "vf"),
        Some(1.0)
    );
    assert_eq!(
        get(
            "coderd_prebuilt_workspaces_desired",
            "python",
            "unconfigured"
        ),
        None
    );

    // Status flags: present (1) only for the affected presets.
    assert_eq!(
        get(
            "coderd_prebuilt_workspaces_preset_hard_limited",
            "python",
            "hl"
        ),
        Some(1.0)
    );
    assert_eq!(
        m.matching("coderd_prebuilt_workspaces_preset_hard_limited{"),
        vec![preset_series(
            "coderd_prebuilt_workspaces_preset_hard_limited",
            "python",
            "hl",
            "acme"
        )]
    );
    assert_eq!(
        m.matching("coderd_prebuilt_workspaces_preset_validation_failed{"),
        vec![preset_series(
            "coderd_prebuilt_workspaces_preset_validation_failed",
            "rust",
            "vf",
            "acme"
        )]
    );
    assert_eq!(
        get(
            "coderd_prebuilt_workspaces_preset_validation_failed",
            "rust",
            "vf"
        ),
        Some(1.0)
    );

    // Global series.
    assert_eq!(
        m.value("coderd_prebuilt_workspaces_reconciliation_paused"),
        Some(0.0)
    );
    let updated = m
        .value("coderd_prebuilt_workspaces_metrics_last_updated")
        .unwrap();
    let now = chrono::Utc::now().timestamp() as f64;
    assert!(
        (now - 60.0..=now + 5.0).contains(&updated),
        "last updated {updated}, now {now}"
    );
    assert_eq!(m.value("prebuilds_scheduler_is_leader"), Some(1.0));

    // Types and labels as Coder has them.
    for (name, kind) in [
        ("coderd_prebuilt_workspaces_created_total", "counter"),
        ("coderd_prebuilt_workspaces_failed_total", "counter"),
        ("coderd_prebuilt_workspaces_claimed_total", "counter"),
        ("coderd_prebuilt_workspaces_desired", "gauge"),
        ("coderd_prebuilt_workspaces_running", "gauge"),
        ("coderd_prebuilt_workspaces_eligible", "gauge"),
        ("coderd_prebuilt_workspaces_preset_hard_limited", "gauge"),
        (
            "coderd_prebuilt_workspaces_preset_validation_failed",
            "gauge",
        ),
        ("coderd_prebuilt_workspaces_reconciliation_paused", "gauge"),
        ("coderd_prebuilt_workspaces_metrics_last_updated", "gauge"),
    ] {
        assert!(
            m.text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind}"
        );
    }

    // A claim shows up at the next refresh: the running-and-ready prebuild of small is claimed.
    c.execute(
        "UPDATE workspaces SET owner_id = $1 WHERE id = (
             SELECT w.id FROM workspaces w JOIN workspace_builds b ON b.workspace_id = w.id
             JOIN workspace_agents a ON a.job_id = b.job_id
             WHERE b.template_version_preset_id = $2 AND w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'
               AND NOT w.deleted
             GROUP BY w.id HAVING count(*) = 2 AND bool_and(a.lifecycle_state = 'ready'))",
        &[&alice, &small.preset_id],
    )
    .await
    .unwrap();
    eventually(SCRAPE, "the claim in the metrics", || async {
        let m = s.scrape().await?;
        let claimed = m.preset(
            "coderd_prebuilt_workspaces_claimed_total",
            "python",
            "small",
            "acme",
        )?;
        let running = m.preset(
            "coderd_prebuilt_workspaces_running",
            "python",
            "small",
            "acme",
        )?;
        let eligible = m.preset(
            "coderd_prebuilt_workspaces_eligible",
            "python",
            "small",
            "acme",
        )?;
        (claimed == 2.0 && running == 2.0 && eligible == 0.0).then_some(())
    })
    .await;
}

/// (d) A deleted template's series disappear; a deleted and a live template sharing a name give
/// one series with the live template's values, and the scrape keeps working.
#[tokio::test]
async fn deleted_templates_series_disappear_and_shared_names_do_not_break_the_scrape() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;

    let (gone, gone_v) = template(&c, org, "gone").await;
    let gone_small = preset(&c, org, gone, gone_v, "small", Some(2), "hard_limited").await;
    prebuild(&c, gone_small, Prebuild::default()).await;

    let (old_shared, old_v) = template(&c, org, "shared").await;
    let old_small = preset(&c, org, old_shared, old_v, "small", Some(5), "healthy").await;
    prebuild(&c, old_small, Prebuild::default()).await;
    prebuild(
        &c,
        old_small,
        Prebuild {
            job_status: "failed",
            agents: &[],
            ..Default::default()
        },
    )
    .await;
    c.execute(
        "UPDATE templates SET deleted = true WHERE id = $1",
        &[&old_shared],
    )
    .await
    .unwrap();
    let (live_shared, live_v) = template(&c, org, "shared").await;
    let live_small = preset(&c, org, live_shared, live_v, "small", Some(2), "healthy").await;
    prebuild(&c, live_small, Prebuild::default()).await;
    prebuild(
        &c,
        live_small,
        Prebuild {
            agents: &["starting"],
            ..Default::default()
        },
    )
    .await;

    let s = Scheduler::start(&db, &broker, &[]);
    let m = eventually(SCRAPE, "pool metrics", || async {
        let m = s.scrape().await?;
        m.value("coderd_prebuilt_workspaces_metrics_last_updated")?;
        Some(m)
    })
    .await;
    let get = |name: &str, t: &str| m.preset(name, t, "small", "acme");
    assert_eq!(get("coderd_prebuilt_workspaces_running", "gone"), Some(1.0));
    assert_eq!(
        get("coderd_prebuilt_workspaces_preset_hard_limited", "gone"),
        Some(1.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_created_total", "gone"),
        Some(1.0)
    );
    // Only the live "shared" template counts.
    assert_eq!(
        get("coderd_prebuilt_workspaces_desired", "shared"),
        Some(2.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_running", "shared"),
        Some(2.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_eligible", "shared"),
        Some(1.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_created_total", "shared"),
        Some(2.0)
    );
    assert_eq!(
        get("coderd_prebuilt_workspaces_failed_total", "shared"),
        Some(0.0)
    );
    // Coder's six pool series, plus our desired-source gauge.
    assert_eq!(
        m.matching("template_name=\"shared\"").len(),
        7,
        "{:#?}",
        m.matching("shared")
    );

    c.execute(
        "UPDATE templates SET deleted = true WHERE id = $1",
        &[&gone],
    )
    .await
    .unwrap();
    let m = eventually(
        SCRAPE,
        "the deleted template's series to vanish",
        || async {
            let m = s.scrape().await?;
            m.matching("template_name=\"gone\"").is_empty().then_some(m)
        },
    )
    .await;
    assert_eq!(
        m.preset(
            "coderd_prebuilt_workspaces_running",
            "shared",
            "small",
            "acme"
        ),
        Some(2.0)
    );
    assert!(m
        .matching("coderd_prebuilt_workspaces_preset_hard_limited")
        .is_empty());
}

/// (e) Paused: no jobs at all. Resumed with a plain SQL UPDATE: one `settings_changed` job per
/// preset right away, then ticks again. Paused again: silence again.
#[tokio::test]
async fn pause_publishes_nothing_and_resume_reconciles_every_preset() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let ids = presets(&db, 3).await;
    let c = db.pool.get().await.unwrap();
    c.execute(
        "UPDATE prebuilds_settings SET reconciliation_paused = true",
        &[],
    )
    .await
    .unwrap();

    // A long tick, so that what arrives after the resume is the resume's doing.
    let s = Scheduler::start(&db, &broker, &[("PREBUILDS_RECONCILE_INTERVAL", "1m")]);
    eventually(SCRAPE, "the paused gauge", || async {
        let m = s.scrape().await?;
        (m.value("coderd_prebuilt_workspaces_reconciliation_paused")? == 1.0).then_some(())
    })
    .await;
    let silent = drain_jobs(&broker, Duration::from_secs(2)).await;
    assert!(silent.is_empty(), "published while paused: {silent:?}");

    c.execute(
        "UPDATE prebuilds_settings SET reconciliation_paused = false",
        &[],
    )
    .await
    .unwrap();
    let resumed_at = Instant::now();
    let jobs = drain_jobs(&broker, Duration::from_secs(3)).await;
    let changed: Vec<&Job> = jobs
        .iter()
        .filter(|j| j.reason == "settings_changed")
        .collect();
    let mut got: Vec<Uuid> = changed.iter().map(|j| j.preset_id).collect();
    got.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(got, want, "one settings_changed job per preset: {jobs:?}");
    assert!(resumed_at.elapsed() < Duration::from_secs(10));
    let m = s.scrape().await.unwrap();
    assert_eq!(
        m.value("coderd_prebuilt_workspaces_reconciliation_paused"),
        Some(0.0)
    );

    // With a 1s tick: paused → nothing, resumed → ticks again.
    drop(s);
    c.execute(
        "UPDATE prebuilds_settings SET reconciliation_paused = true",
        &[],
    )
    .await
    .unwrap();
    let s = Scheduler::start(&db, &broker, &[]);
    eventually(SCRAPE, "the paused gauge", || async {
        let m = s.scrape().await?;
        (m.value("coderd_prebuilt_workspaces_reconciliation_paused")? == 1.0).then_some(())
    })
    .await;
    let _ = drain_jobs(&broker, Duration::from_millis(300)).await;
    let silent = drain_jobs(&broker, Duration::from_millis(2500)).await;
    assert!(silent.is_empty(), "published while paused: {silent:?}");
    c.execute(
        "UPDATE prebuilds_settings SET reconciliation_paused = false",
        &[],
    )
    .await
    .unwrap();
    let jobs = drain_jobs(&broker, Duration::from_millis(2500)).await;
    assert!(
        jobs.iter().any(|j| j.reason == "tick"),
        "ticks resume: {jobs:?}"
    );
}

/// SIGTERM: the leader exits promptly and cleanly, and its lock is free at once.
#[tokio::test]
async fn sigterm_exits_promptly_and_releases_the_lock() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    presets(&db, 1).await;
    let env = [("PREBUILDS_LOCK_RETRY_INTERVAL", "1s")];
    let mut a = Scheduler::start(&db, &broker, &env);
    wait_for_single_leader(&[&a], SCRAPE).await;
    let b = Scheduler::start(&db, &broker, &env);
    eventually(SCRAPE, "the standby", || async {
        (!b.is_leader().await?).then_some(())
    })
    .await;

    // Both replicas are ready (database and broker reachable), leader or not.
    for r in [&a, &b] {
        eventually(SCRAPE, "/readyz", || async {
            http_get(&r.addr, "/readyz").await
        })
        .await;
        assert!(http_get(&r.addr, "/healthz").await.is_some());
    }

    let started = Instant::now();
    let status = a.service.terminate(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    // The standby's next attempt (≤ 1s) wins.
    eventually(Duration::from_secs(3), "the standby to lead", || async {
        b.is_leader().await?.then_some(())
    })
    .await;
}
