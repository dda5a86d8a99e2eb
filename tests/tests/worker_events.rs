//! Provisioner events applied by the worker (in-process against the real database): idempotent
//! under redelivery, harmless when reordered, and a completed job never goes back.

use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use prebuilds_core::ReconcileConfig;
use prebuilds_schemas::{
    AgentLifecycle, AgentLifecycleState, AgentSpec, JobCompleted, JobLog, JobOutcome, JobStarted,
    LogLevel, LogLine, PlanResult, ProvisionerEvent, ResourceReplacement,
};
use prebuilds_tests::{fixtures, stack::pool_counts, TestDb};
use prebuilds_worker::{
    events::{apply, Applied, EventError, EventsContext},
    metrics::WorkerMetrics,
    reconcile::{reconcile_preset, ReconcileContext},
};
use uuid::Uuid;

fn ctx(db: &TestDb) -> EventsContext {
    EventsContext {
        pool: db.pool.clone(),
        metrics: WorkerMetrics::register(&prometheus::Registry::new()).unwrap(),
        outbox_waker: Arc::new(tokio::sync::Notify::new()),
        source: "test".into(),
        wakes_held_back: true,
    }
}

/// A preset desiring 1 and the job of the prebuild the reconciler queued for it.
async fn one_create_job(db: &TestDb) -> (fixtures::PresetFixture, Uuid) {
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "ev").await;
    let fx = fixtures::template_with_preset(&c, org, "tpl", Some(1)).await;
    let rctx = ReconcileContext {
        pool: db.pool.clone(),
        config: ReconcileConfig::default(),
        metrics: WorkerMetrics::register(&prometheus::Registry::new()).unwrap(),
        outbox_waker: Arc::new(tokio::sync::Notify::new()),
        source: "test".into(),
        demand_time_unit: std::time::Duration::from_secs(60),
    };
    reconcile_preset(&rctx, fx.preset_id, Utc::now() + TimeDelta::hours(1))
        .await
        .unwrap();
    let job: Uuid = c
        .query_one(
            "SELECT job_id FROM workspace_builds WHERE template_version_preset_id = $1",
            &[&fx.preset_id],
        )
        .await
        .unwrap()
        .get(0);
    (fx, job)
}

fn log_line(job: Uuid, output: &str) -> ProvisionerEvent {
    ProvisionerEvent::JobLog(JobLog {
        job_id: job,
        logs: vec![LogLine {
            created_at: Utc::now(),
            level: LogLevel::Info,
            stage: "apply".into(),
            output: output.into(),
        }],
    })
}

fn started(job: Uuid) -> ProvisionerEvent {
    ProvisionerEvent::JobStarted(JobStarted {
        job_id: job,
        started_at: Utc::now(),
    })
}
fn completed(job: Uuid, status: JobOutcome) -> ProvisionerEvent {
    ProvisionerEvent::JobCompleted(JobCompleted {
        job_id: job,
        status,
        error: None,
        completed_at: Utc::now(),
        agents: vec![AgentSpec {
            name: "main".into(),
        }],
    })
}
fn agent(job: Uuid, state: AgentLifecycleState) -> ProvisionerEvent {
    ProvisionerEvent::AgentLifecycle(AgentLifecycle {
        job_id: job,
        agent_name: "main".into(),
        lifecycle_state: state,
    })
}

async fn job_status(db: &TestDb, job: Uuid) -> String {
    db.pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT job_status FROM provisioner_jobs WHERE id = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn in_order_events_make_an_eligible_prebuild_and_trigger_a_reconcile() {
    let db = TestDb::new().await;
    let ctx = ctx(&db);
    let (fx, job) = one_create_job(&db).await;
    let outbox_before: i64 = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    for e in [
        started(job),
        completed(job, JobOutcome::Succeeded),
        agent(job, AgentLifecycleState::Starting),
        agent(job, AgentLifecycleState::Ready),
    ] {
        assert_eq!(
            apply(&ctx, Uuid::new_v4(), &e).await.unwrap(),
            Applied::Applied
        );
    }
    assert_eq!(job_status(&db, job).await, "succeeded");
    assert_eq!(pool_counts(&db, fx.preset_id).await.eligible, 1);
    let reconciles: i64 = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM outbox WHERE routing_key = 'reconcile.preset'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let outbox_after: i64 = db
        .pool
        .get()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        reconciles, 2,
        "completion and readiness each queue an immediate reconcile"
    );
    assert_eq!(outbox_after - outbox_before, 2);
}

#[tokio::test]
async fn concurrent_deliveries_of_one_log_event_append_its_lines_once() {
    let db = TestDb::new().await;
    let ctx = ctx(&db);
    let (_fx, job) = one_create_job(&db).await;
    let log = log_line(job, "once");
    let id = Uuid::new_v4();
    let results = futures::future::join_all((0..8).map(|_| apply(&ctx, id, &log))).await;
    let count = |want: Applied| {
        results
            .iter()
            .filter(|r| matches!(r, Ok(a) if *a == want))
            .count()
    };
    assert_eq!(
        (count(Applied::Applied), count(Applied::Duplicate)),
        (1, 7),
        "{results:?}"
    );
    let c = db.pool.get().await.unwrap();
    assert_eq!(fixtures::job_log_lines(&c, job, None).await, vec!["once"]);
}

/// A state event in flight holds its job's row (`job_for_event.sql`, the worker's own
/// statement); the job's log lines still append meanwhile, since their foreign-key check needs
/// only a key-share lock.
#[tokio::test]
async fn log_lines_append_while_a_state_event_holds_the_job() {
    let db = TestDb::new().await;
    let ctx = ctx(&db);
    let (_fx, job) = one_create_job(&db).await;
    let mut holder = db.connect().await;
    let state_event = holder.transaction().await.unwrap();
    state_event
        .query_opt(
            include_str!("../../worker/src/sql/job_for_event.sql"),
            &[&job, &"state-event-in-flight", &Uuid::new_v4()],
        )
        .await
        .unwrap()
        .expect("the job's row");
    let appended = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        apply(&ctx, Uuid::new_v4(), &log_line(job, "meanwhile")),
    )
    .await
    .expect("the log line waited for the state event's lock");
    assert_eq!(appended.unwrap(), Applied::Applied);
    state_event.rollback().await.unwrap();
}

#[tokio::test]
async fn redelivered_events_are_acknowledged_without_effect() {
    let db = TestDb::new().await;
    let ctx = ctx(&db);
    let (_fx, job) = one_create_job(&db).await;
    let log = log_line(job, "it's \"quoted\"; DROP TABLE users; --\u{0}");
    let id = Uuid::new_v4();
    assert_eq!(apply(&ctx, id, &log).await.unwrap(), Applied::Applied);
    for _ in 0..3 {
        assert_eq!(apply(&ctx, id, &log).await.unwrap(), Applied::Duplicate);
    }
    let c = db.pool.get().await.unwrap();
    let lines = fixtures::job_log_lines(&c, job, None).await;
    assert_eq!(
        lines,
        vec!["it's \"quoted\"; DROP TABLE users; --\u{FFFD}".to_owned()],
        "stored literally, once"
    );
    let users: i64 = c
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert!(users >= 1);
}

#[tokio::test]
async fn reordered_events_wait_for_their_step_and_never_move_a_job_or_agent_backwards() {
    let db = TestDb::new().await;
    let ctx = ctx(&db);
    let (fx, job) = one_create_job(&db).await;
    let not_yet = |result: Result<Applied, EventError>, what: &str| match result {
        Err(EventError::NotYet { .. }) => {}
        other => panic!("{what}: expected NotYet, got {other:?}"),
    };
    // The agent's ready and the completion overtake the start: neither applies yet.
    let ready = agent(job, AgentLifecycleState::Ready);
    let completion = completed(job, JobOutcome::Succeeded);
    not_yet(apply(&ctx, Uuid::new_v4(), &ready).await, "ready first");
    not_yet(
        apply(&ctx, Uuid::new_v4(), &completion).await,
        "completion first",
    );
    assert_eq!(job_status(&db, job).await, "pending");
    assert_eq!(
        apply(&ctx, Uuid::new_v4(), &started(job)).await.unwrap(),
        Applied::Applied
    );
    // Ready still overtakes the completion: it waits for it.
    not_yet(
        apply(&ctx, Uuid::new_v4(), &ready).await,
        "ready before completion",
    );
    assert_eq!(
        apply(&ctx, Uuid::new_v4(), &completion).await.unwrap(),
        Applied::Applied
    );
    assert_eq!(
        apply(&ctx, Uuid::new_v4(), &ready).await.unwrap(),
        Applied::Applied
    );
    // Late copies change nothing.
    assert_eq!(
        apply(&ctx, Uuid::new_v4(), &started(job)).await.unwrap(),
        Applied::Stale
    );
    assert_eq!(
        apply(
            &ctx,
            Uuid::new_v4(),
            &agent(job, AgentLifecycleState::Starting)
        )
        .await
        .unwrap(),
        Applied::Stale
    );
    assert_eq!(
        apply(&ctx, Uuid::new_v4(), &completed(job, JobOutcome::Failed))
            .await
            .unwrap(),
        Applied::Stale
    );
    assert_eq!(job_status(&db, job).await, "succeeded");
    assert_eq!(pool_counts(&db, fx.preset_id).await.eligible, 1);
}

#[tokio::test]
async fn a_successful_delete_build_deletes_the_workspace() {
    let db = TestDb::new().await;
    let ctx = ctx(&db);
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "del").await;
    let fx = fixtures::template_with_preset(&c, org, "tpl", Some(0)).await;
    let ws = fixtures::prebuild(&c, &fx, &fixtures::PrebuildSpec::running(Utc::now())).await;
    let rctx = ReconcileContext {
        pool: db.pool.clone(),
        config: ReconcileConfig::default(),
        metrics: WorkerMetrics::register(&prometheus::Registry::new()).unwrap(),
        outbox_waker: Arc::new(tokio::sync::Notify::new()),
        source: "test".into(),
        demand_time_unit: std::time::Duration::from_secs(60),
    };
    reconcile_preset(&rctx, fx.preset_id, Utc::now() + TimeDelta::hours(1))
        .await
        .unwrap();
    let job: Uuid = c
        .query_one(
            "SELECT job_id FROM workspace_builds WHERE workspace_id = $1 AND transition = 'delete'",
            &[&ws],
        )
        .await
        .unwrap()
        .get(0);
    for event in [started(job), completed(job, JobOutcome::Succeeded)] {
        apply(&ctx, Uuid::new_v4(), &event).await.unwrap();
    }
    let deleted: bool = c
        .query_one("SELECT deleted FROM workspaces WHERE id = $1", &[&ws])
        .await
        .unwrap()
        .get(0);
    assert!(deleted);
}

/// Both paths: a state event (its own transaction, job row locked) and a log line (one
/// statement, no lock).
#[tokio::test]
async fn events_for_unknown_jobs_are_refused_and_not_recorded() {
    let db = TestDb::new().await;
    let ctx = ctx(&db);
    let unknown_job = Uuid::new_v4();
    let c = db.pool.get().await.unwrap();
    for event in [started(unknown_job), log_line(unknown_job, "orphan line")] {
        let id = Uuid::new_v4();
        let err = apply(&ctx, id, &event).await.unwrap_err();
        assert!(matches!(err, EventError::UnknownJob(_)), "{event:?}");
        let recorded: i64 = c
            .query_one(
                "SELECT count(*) FROM processed_messages WHERE message_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(recorded, 0, "{event:?}");
    }
    assert!(fixtures::job_log_lines(&c, unknown_job, None)
        .await
        .is_empty());
}

#[tokio::test]
async fn plan_results_of_non_claim_builds_are_recorded_but_notify_no_one() {
    let db = TestDb::new().await;
    let ctx = ctx(&db);
    let (_fx, job) = one_create_job(&db).await;
    let c = db.pool.get().await.unwrap();
    fixtures::user(&c, "admin", true).await;
    apply(&ctx, Uuid::new_v4(), &started(job)).await.unwrap();
    let e = ProvisionerEvent::PlanResult(PlanResult {
        job_id: job,
        resource_replacements: vec![ResourceReplacement {
            resource: "docker_container.ws".into(),
            paths: vec!["image".into()],
        }],
    });
    assert_eq!(
        apply(&ctx, Uuid::new_v4(), &e).await.unwrap(),
        Applied::Applied
    );
    let stored: serde_json::Value = c
        .query_one(
            "SELECT resource_replacements FROM provisioner_jobs WHERE id = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored[0]["resource"], "docker_container.ws");
    let notifications: i64 = c
        .query_one("SELECT count(*) FROM notification_messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(notifications, 0);
}
