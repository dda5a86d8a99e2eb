//! The job reaper (docs/reconciliation.md; `scheduler/src/reaper.rs`) on the real PostgreSQL and,
//! end to end, with the real worker and scheduler binaries and a provisioner that goes silent:
//!
//! - the rule at its clock: a running job is failed `hung:` once silent for the hung timeout, a
//!   pending one `pending:` once not started within the pending timeout, in bounded batches, each
//!   with a reconcile request for its preset in the outbox;
//! - on the running system, with shortened timeouts: a provisioner that starts a job and goes
//!   silent, and one that never starts one; both jobs are reaped, the pools refill, and the silent
//!   provisioner's late `job_completed` and agent events change nothing.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use prebuilds_runtime::amqp::Publisher;
use prebuilds_scheduler::{
    metrics::SchedulerMetrics,
    reaper::{ReapedKind, Reaper, ReaperConfig, REAP_BATCH},
};
use prebuilds_schemas::{BuildStage, PREBUILDS_USER_ID};
use prebuilds_tests::{
    fixtures::{self, PrebuildSpec, PresetFixture},
    stack::{self, answer, pool_counts, request_reconcile, wait_for, FakeOutcome, FakeProvisioner},
    TestBroker, TestDb,
};
use uuid::Uuid;

fn reaper(db: &TestDb) -> Reaper {
    Reaper {
        pool: db.pool.clone(),
        config: ReaperConfig::for_timeouts(Duration::from_secs(600), Duration::from_secs(1800)),
        metrics: SchedulerMetrics::register(&prometheus::Registry::new()).unwrap(),
        source: "test-reaper".to_owned(),
    }
}

/// The job of a fixture prebuild's build #1.
async fn job_of(db: &TestDb, workspace_id: Uuid) -> Uuid {
    let client = db.pool.get().await.unwrap();
    client
        .query_one(
            "SELECT job_id FROM workspace_builds WHERE workspace_id = $1 AND build_number = 1",
            &[&workspace_id],
        )
        .await
        .unwrap()
        .get(0)
}

async fn job(db: &TestDb, job_id: Uuid) -> (String, Option<String>) {
    let client = db.pool.get().await.unwrap();
    let row = client
        .query_one(
            "SELECT job_status, error FROM provisioner_jobs WHERE id = $1",
            &[&job_id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Presets with an unpublished reconcile request in the outbox.
async fn requested(db: &TestDb) -> Vec<Uuid> {
    let client = db.pool.get().await.unwrap();
    let rows = client
        .query(
            "SELECT (body->'data'->>'preset_id')::uuid FROM outbox
             WHERE routing_key = 'reconcile.preset' AND published_at IS NULL ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    rows.iter().map(|r| r.get(0)).collect()
}

async fn preset(db: &TestDb, name: &str) -> PresetFixture {
    let client = db.pool.get().await.unwrap();
    let org = fixtures::organization(&client, &format!("org-{name}")).await;
    fixtures::template_with_preset(&client, org, name, Some(1)).await
}

#[tokio::test]
async fn silent_jobs_are_failed_at_their_timeouts_and_their_presets_reconciled() {
    let db = TestDb::new().await;
    let now = Utc::now();
    let (a, b, c) = (
        preset(&db, "a").await,
        preset(&db, "b").await,
        preset(&db, "c").await,
    );
    let client = db.pool.get().await.unwrap();
    let spec = |job_status| PrebuildSpec {
        transition: "start",
        job_status,
        created_at: now,
        ready: false,
    };
    let running = job_of(&db, fixtures::prebuild(&client, &a, &spec("running")).await).await;
    let pending = job_of(&db, fixtures::prebuild(&client, &b, &spec("pending")).await).await;
    let done = job_of(
        &db,
        fixtures::prebuild(&client, &c, &spec("succeeded")).await,
    )
    .await;
    let reaper = reaper(&db);
    let at = |minutes| Some(now + TimeDelta::minutes(minutes));

    // Within both timeouts: nothing.
    assert!(reaper.pass(at(9)).await.unwrap().is_empty());
    assert!(requested(&db).await.is_empty());

    // Past the hung timeout: the running job only.
    let reaped = reaper.pass(at(11)).await.unwrap();
    assert_eq!(reaped.len(), 1, "{reaped:?}");
    assert_eq!(
        (reaped[0].job_id, reaped[0].kind, reaped[0].preset_id),
        (running, ReapedKind::Hung, Some(a.preset_id))
    );
    let (status, error) = job(&db, running).await;
    assert_eq!(status, "failed");
    assert!(error.as_deref().unwrap().starts_with("hung: "), "{error:?}");
    assert_eq!(requested(&db).await, [a.preset_id]);
    // Idempotent: a failed job is not reaped again.
    assert!(reaper.pass(at(12)).await.unwrap().is_empty());

    // Past the pending timeout: the pending job; the completed one is never touched.
    let reaped = reaper.pass(at(31)).await.unwrap();
    assert_eq!(
        reaped
            .iter()
            .map(|r| (r.job_id, r.kind))
            .collect::<Vec<_>>(),
        [(pending, ReapedKind::Pending)]
    );
    let (status, error) = job(&db, pending).await;
    assert_eq!(status, "failed");
    assert!(
        error.as_deref().unwrap().starts_with("pending: "),
        "{error:?}"
    );
    assert_eq!(job(&db, done).await, ("succeeded".to_owned(), None));
    let mut expected = vec![a.preset_id, b.preset_id];
    expected.sort();
    assert_eq!(requested(&db).await, expected);

    // A reaped job counts as a failed build of its preset (backoff, hard limit).
    let failed: i64 = client
        .query_one(
            "SELECT count(*) FROM provisioner_jobs j JOIN workspace_builds b ON b.job_id = j.id
             WHERE b.template_version_preset_id = ANY($1) AND j.job_status = 'failed'",
            &[&vec![a.preset_id, b.preset_id]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(failed, 2);
}

#[tokio::test]
async fn a_backlog_is_reaped_in_bounded_batches() {
    let db = TestDb::new().await;
    let now = Utc::now();
    let fx = preset(&db, "many").await;
    let client = db.pool.get().await.unwrap();
    let total = REAP_BATCH + 5;
    client
        .execute(
            "WITH jobs AS (
                 INSERT INTO provisioner_jobs (id, initiator_id, job_status, created_at, started_at, updated_at)
                 SELECT gen_random_uuid(), $1, 'running', $2, $2, $2 FROM generate_series(1, $3)
                 RETURNING id
             )
             INSERT INTO workspaces (id, owner_id, organization_id, template_id, name)
             SELECT id, $1, $4, $5, 'w-' || id FROM jobs",
            &[&PREBUILDS_USER_ID, &now, &(total as i32), &fx.organization_id, &fx.template_id],
        )
        .await
        .unwrap();
    let reaper = reaper(&db);
    let later = Some(now + TimeDelta::minutes(11));
    assert_eq!(reaper.pass(later).await.unwrap().len() as i64, REAP_BATCH);
    assert_eq!(reaper.pass(later).await.unwrap().len() as i64, 5);
    assert!(reaper.pass(later).await.unwrap().is_empty());
}

/// The provisioner's late answer for a job the reaper already failed.
async fn late_answer(broker: &TestBroker, job: &prebuilds_schemas::ProvisionerJob) {
    let publisher = Publisher::new(&broker.url, "late-provisioner", broker.topology.clone());
    answer(&publisher, job, FakeOutcome::Succeed).await;
}

#[tokio::test]
async fn silent_provisioners_are_reaped_on_the_running_system_and_the_pools_refill() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let silent = preset(&db, "silent").await;
    let never = preset(&db, "never").await;
    let (silent_id, never_id) = (silent.preset_id, never.preset_id);
    // The first create of `silent` starts and goes quiet; the first of `never` is never started;
    // every later build succeeds.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let provisioner = FakeProvisioner::start(&broker, move |job| {
        let first = seen.lock().unwrap().insert(job.preset_id);
        match job.preset_id {
            Some(p) if first && p == silent_id && job.stage == BuildStage::Create => {
                FakeOutcome::StartThenSilent
            }
            Some(p) if first && p == never_id && job.stage == BuildStage::Create => {
                FakeOutcome::Hold
            }
            _ => FakeOutcome::Succeed,
        }
    })
    .await;
    let timeouts = [
        ("PREBUILDS_JOB_HUNG_TIMEOUT", "3s"),
        ("PREBUILDS_JOB_PENDING_TIMEOUT", "4s"),
        ("PREBUILDS_BACKOFF_INTERVAL", "1s"),
        ("PREBUILDS_RECONCILE_INTERVAL", "1h"),
    ];
    let (_worker, worker_port) = stack::start("prebuilds-worker", &db, &broker, &timeouts);
    let (_scheduler, scheduler_port) = stack::start("prebuilds-scheduler", &db, &broker, &timeouts);
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    for fx in [&silent, &never] {
        request_reconcile(&publisher, fx.preset_id).await;
    }

    // Both pools refill once the stuck jobs are reaped: no tick helps (1 h interval; the tick at
    // the scheduler's start ran before the first jobs existed or while they were in progress).
    for fx in [&silent, &never] {
        wait_for(
            Duration::from_secs(60),
            "the pool refilled after the reap",
            || async { pool_counts(&db, fx.preset_id).await.eligible == 1 },
        )
        .await;
    }
    let client = db.pool.get().await.unwrap();
    let reaped = client
        .query(
            "SELECT b.template_version_preset_id, j.error FROM provisioner_jobs j
             JOIN workspace_builds b ON b.job_id = j.id
             WHERE j.job_status = 'failed' ORDER BY j.created_at",
            &[],
        )
        .await
        .unwrap();
    let errors: Vec<(Uuid, String)> = reaped.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for (preset, prefix) in [(silent_id, "hung: "), (never_id, "pending: ")] {
        assert!(
            errors
                .iter()
                .any(|(p, e)| *p == preset && e.starts_with(prefix)),
            "{prefix} for {preset}: {errors:?}"
        );
    }
    let (_, metrics) = stack::http_get(scheduler_port, "/metrics").await.unwrap();
    assert!(
        metrics.contains("prebuilds_scheduler_jobs_reaped_total{kind=\"hung\"} 1"),
        "{metrics}"
    );

    // The silent provisioner wakes up and reports its job done, with a ready agent: too late.
    let hung_job = provisioner
        .received()
        .into_iter()
        .find(|j| j.preset_id == Some(silent_id))
        .expect("the silent job");
    late_answer(&broker, &hung_job).await;
    wait_for(
        Duration::from_secs(20),
        "the late events applied as stale",
        || async {
            let Some((_, metrics)) = stack::http_get(worker_port, "/metrics").await else {
                return false;
            };
            metrics.contains(
                r#"prebuilds_provisioner_events_total{kind="job_completed",result="stale"} 1"#,
            ) && metrics.contains(
                r#"prebuilds_provisioner_events_total{kind="agent_lifecycle",result="stale"} 1"#,
            )
        },
    )
    .await;
    let (status, _) = job(&db, hung_job.job_id).await;
    assert_eq!(status, "failed", "a late job_completed changes nothing");
    let agents: i64 = client
        .query_one(
            "SELECT count(*) FROM workspace_agents WHERE job_id = $1",
            &[&hung_job.job_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(agents, 0, "a late agent event creates no agent");
    assert_eq!(pool_counts(&db, silent_id).await.eligible, 1);
    provisioner.stop().await;
}
