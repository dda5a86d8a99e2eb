//! The worker's reconcile executor against the real database (in-process, so each case controls
//! the clock-free inputs precisely): idempotence, concurrency, the decision matrix of docs/reconciliation.md,
//! version changes, validation failures, TTL expiry and a crash mid-transaction.

use std::{sync::Arc, time::Duration};

use chrono::{TimeDelta, Utc};
use prebuilds_core::ReconcileConfig;
use prebuilds_tests::{
    fixtures::{self, PrebuildSpec, PresetFixture},
    stack::{pool_counts, table_counts},
    TestDb,
};
use prebuilds_worker::{
    metrics::WorkerMetrics,
    reconcile::{
        batch::Batcher, reconcile_batch, reconcile_preset, Attempt, Job, ReconcileContext,
        ReconcileOutcome,
    },
};
use uuid::Uuid;

fn context(db: &TestDb) -> ReconcileContext {
    ReconcileContext {
        pool: db.pool.clone(),
        config: ReconcileConfig::default(),
        metrics: WorkerMetrics::register(&prometheus::Registry::new()).unwrap(),
        outbox_waker: Arc::new(tokio::sync::Notify::new()),
        source: "test".into(),
        demand_time_unit: std::time::Duration::from_secs(60),
    }
}

/// A fresh request: never coalesced.
async fn reconcile(ctx: &ReconcileContext, preset_id: Uuid) -> ReconcileOutcome {
    reconcile_preset(ctx, preset_id, Utc::now() + TimeDelta::hours(1))
        .await
        .expect("reconcile")
}

async fn world(db: &TestDb, desired: Option<i32>) -> PresetFixture {
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, &format!("org-{}", Uuid::new_v4().simple())).await;
    fixtures::template_with_preset(&c, org, "tpl", desired).await
}

#[tokio::test]
async fn reconciling_the_same_preset_eight_times_gives_the_same_state() {
    let db = TestDb::new().await;
    let fx = world(&db, Some(3)).await;
    let ctx = context(&db);
    reconcile(&ctx, fx.preset_id).await;
    let after_first = table_counts(&db).await;
    assert_eq!(after_first["workspaces"], 3);
    assert_eq!(
        after_first["outbox"], 3,
        "one provisioner job message per create"
    );
    for _ in 0..7 {
        reconcile(&ctx, fx.preset_id).await;
    }
    assert_eq!(table_counts(&db).await, after_first);
    let counts = pool_counts(&db, fx.preset_id).await;
    assert_eq!(counts.in_progress, 3);
}

#[tokio::test]
async fn concurrent_reconciles_of_one_preset_never_create_more_than_desired() {
    let db = TestDb::new().await;
    let fx = world(&db, Some(4)).await;
    let ctx = context(&db);
    let runs = (0..16).map(|_| {
        let ctx = ctx.clone();
        tokio::spawn(async move { reconcile(&ctx, fx.preset_id).await })
    });
    for r in futures::future::join_all(runs).await {
        r.unwrap();
    }
    assert_eq!(pool_counts(&db, fx.preset_id).await.created, 4);
}

#[tokio::test]
async fn jobs_older_than_the_last_reconcile_are_coalesced() {
    let db = TestDb::new().await;
    let fx = world(&db, Some(1)).await;
    let ctx = context(&db);
    reconcile(&ctx, fx.preset_id).await;
    let stale = reconcile_preset(&ctx, fx.preset_id, Utc::now() - TimeDelta::minutes(5))
        .await
        .unwrap();
    assert_eq!(stale, ReconcileOutcome::Coalesced);
}

#[tokio::test]
async fn an_unknown_preset_is_reported_not_retried() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    assert_eq!(
        reconcile(&ctx, Uuid::new_v4()).await,
        ReconcileOutcome::UnknownPreset
    );
}

/// What the reconciler must do with one existing prebuild of a preset desiring 1 (docs/reconciliation.md "Actions").
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Nothing,
    Create,
    DeleteIt,
    CancelIt,
}

fn expected(transition: &str, status: &str, active: bool) -> Expect {
    let running = transition == "start" && status == "succeeded";
    let pending_create = transition == "start" && status == "pending";
    let starting = transition == "start" && matches!(status, "pending" | "running");
    if !active {
        return if running {
            Expect::DeleteIt
        } else if pending_create {
            Expect::CancelIt
        } else {
            Expect::Nothing
        };
    }
    if running || starting {
        Expect::Nothing
    } else {
        // Failed, canceled, stopped and deleting prebuilds don't count: a replacement is made.
        Expect::Create
    }
}

#[tokio::test]
async fn every_latest_build_state_on_active_and_inactive_presets_gets_the_spec_action() {
    decision_matrix(Reconciled::OneByOne).await;
}

#[tokio::test]
async fn a_batch_of_all_matrix_presets_takes_the_same_actions_as_one_by_one() {
    decision_matrix(Reconciled::InOneBatch).await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconciled {
    OneByOne,
    InOneBatch,
}

/// One preset per (transition × status × active/old version/deleted template) with one prebuild
/// in that state, each checked against docs/reconciliation.md.
async fn decision_matrix(how: Reconciled) {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "matrix").await;
    // Old enough to be outside the backoff lookback, so a failed start does not back off.
    let created_at = Utc::now() - TimeDelta::hours(2);
    let mut cases = Vec::new();
    for transition in ["start", "stop", "delete"] {
        for status in [
            "pending",
            "running",
            "succeeded",
            "failed",
            "canceling",
            "canceled",
        ] {
            for (inactive_how, active) in
                [("active", true), ("old_version", false), ("deleted", false)]
            {
                let name = format!("t-{transition}-{status}-{inactive_how}");
                let fx = fixtures::template_with_preset(&c, org, &name, Some(1)).await;
                let workspace = fixtures::prebuild(
                    &c,
                    &fx,
                    &PrebuildSpec {
                        transition,
                        job_status: status,
                        created_at,
                        ready: true,
                    },
                )
                .await;
                match inactive_how {
                    "old_version" => {
                        fixtures::new_active_version(&c, &fx, Some(0)).await;
                    }
                    "deleted" => {
                        c.execute(
                            "UPDATE templates SET deleted = true WHERE id = $1",
                            &[&fx.template_id],
                        )
                        .await
                        .unwrap();
                    }
                    _ => {}
                }
                let want = expected(transition, status, active);
                cases.push((name, fx.preset_id, workspace, want));
            }
        }
    }
    assert_eq!(cases.len(), 54);
    let outcomes: Vec<ReconcileOutcome> = match how {
        Reconciled::OneByOne => {
            let mut outcomes = Vec::new();
            for (_, preset_id, _, _) in &cases {
                outcomes.push(reconcile(&ctx, *preset_id).await);
            }
            outcomes
        }
        Reconciled::InOneBatch => {
            let jobs: Vec<Job> = cases.iter().map(|(_, p, _, _)| fresh_job(*p)).collect();
            reconcile_batch(&ctx, &jobs)
                .await
                .expect("batch")
                .into_iter()
                .map(|attempt| match attempt {
                    Attempt::Done(outcome) => outcome,
                    Attempt::Alone => panic!("nothing else holds a lock, and no cap is set"),
                })
                .collect()
        }
    };
    for ((name, _, workspace, want), outcome) in cases.into_iter().zip(outcomes) {
        let ReconcileOutcome::Reconciled(report) = outcome else {
            panic!("{name}: {outcome:?}");
        };
        let got = if report.created > 0 {
            Expect::Create
        } else if report.deleted > 0 {
            Expect::DeleteIt
        } else if report.canceled > 0 {
            Expect::CancelIt
        } else {
            Expect::Nothing
        };
        assert_eq!(got, want, "{name}: {report:?}");
        assert!(report.created <= 1, "{name}: never more than desired");
        // Effects are in the tables, not just in the report.
        let latest: (String, String, bool) = {
            let r = c
                .query_one(
                    "SELECT lb.transition, j.job_status, w.deleted FROM workspaces w
                     JOIN LATERAL (SELECT * FROM workspace_builds b WHERE b.workspace_id = w.id
                                   ORDER BY build_number DESC LIMIT 1) lb ON true
                     JOIN provisioner_jobs j ON j.id = lb.job_id WHERE w.id = $1",
                    &[&workspace],
                )
                .await
                .unwrap();
            (r.get(0), r.get(1), r.get(2))
        };
        match want {
            Expect::DeleteIt => assert_eq!(
                (latest.0.as_str(), latest.1.as_str()),
                ("delete", "pending"),
                "{name}"
            ),
            Expect::CancelIt => assert!(latest.2, "{name}: orphan-deleted"),
            _ => assert!(!latest.2, "{name}: untouched"),
        }
    }
}

/// A job requested after everything so far: never coalesced.
fn fresh_job(preset_id: Uuid) -> Job {
    Job {
        preset_id,
        requested_at: Utc::now() + TimeDelta::hours(1),
    }
}

#[tokio::test]
async fn a_batch_skips_presets_locked_elsewhere_and_coalesces_what_is_already_answered() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "batch").await;
    let fill = fixtures::template_with_preset(&c, org, "fill", Some(2)).await;
    let busy = fixtures::template_with_preset(&c, org, "busy", Some(1)).await;
    let answered = fixtures::template_with_preset(&c, org, "answered", Some(1)).await;
    reconcile(&ctx, answered.preset_id).await;
    let unknown = Uuid::new_v4();

    // Another transaction (a worker reconciling it alone) holds `busy`'s lock throughout.
    let mut holder = db.pool.get().await.unwrap();
    let holding = holder.transaction().await.unwrap();
    prebuilds_store::lock::lock_preset(&holding, busy.preset_id)
        .await
        .unwrap();

    let jobs = [
        fresh_job(fill.preset_id),
        fresh_job(busy.preset_id),
        Job {
            preset_id: answered.preset_id,
            requested_at: Utc::now() - TimeDelta::minutes(5),
        },
        fresh_job(unknown),
        fresh_job(fill.preset_id),
    ];
    let attempts = tokio::time::timeout(Duration::from_secs(10), reconcile_batch(&ctx, &jobs))
        .await
        .expect("a batch never waits for a lock")
        .expect("batch");
    assert!(
        matches!(&attempts[0], Attempt::Done(ReconcileOutcome::Reconciled(r)) if r.created == 2),
        "{:?}",
        attempts[0]
    );
    assert_eq!(attempts[1], Attempt::Alone);
    assert_eq!(attempts[2], Attempt::Done(ReconcileOutcome::Coalesced));
    assert_eq!(attempts[3], Attempt::Done(ReconcileOutcome::UnknownPreset));
    assert_eq!(
        attempts[4],
        Attempt::Done(ReconcileOutcome::Coalesced),
        "a repeat in the same batch is answered by the first"
    );
    assert_eq!(pool_counts(&db, fill.preset_id).await.created, 2);
    assert_eq!(
        pool_counts(&db, busy.preset_id).await.created,
        0,
        "a busy preset is left alone"
    );
    holding.rollback().await.unwrap();
}

#[tokio::test]
async fn under_a_global_cap_a_batch_leaves_creates_to_lone_reconciles() {
    let db = TestDb::new().await;
    let ctx = ReconcileContext {
        config: ReconcileConfig {
            max_inflight_jobs: 5,
            ..ReconcileConfig::default()
        },
        ..context(&db)
    };
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "capped").await;
    let empty = fixtures::template_with_preset(&c, org, "empty", Some(2)).await;
    let steady = fixtures::template_with_preset(&c, org, "steady", Some(0)).await;
    let attempts = reconcile_batch(
        &ctx,
        &[fresh_job(empty.preset_id), fresh_job(steady.preset_id)],
    )
    .await
    .expect("batch");
    // The global capacity lock would be held for the rest of the batch: the create goes alone.
    assert_eq!(attempts[0], Attempt::Alone);
    assert!(matches!(
        attempts[1],
        Attempt::Done(ReconcileOutcome::Reconciled(_))
    ));
    assert_eq!(pool_counts(&db, empty.preset_id).await.created, 0);
    // Alone, it creates within the cap.
    reconcile(&ctx, empty.preset_id).await;
    assert_eq!(pool_counts(&db, empty.preset_id).await.created, 2);
}

/// `reconcile.preset` jobs for `preset_id` waiting in the outbox (a pass's follow-up requests).
async fn follow_ups(db: &TestDb, preset_id: Uuid) -> Vec<serde_json::Value> {
    let c = db.pool.get().await.unwrap();
    c.query(
        "SELECT body::jsonb FROM outbox
         WHERE routing_key = 'reconcile.preset' AND body::jsonb -> 'data' ->> 'preset_id' = $1",
        &[&preset_id.to_string()],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test]
async fn a_pool_larger_than_the_create_budget_fills_over_re_queued_passes() {
    let db = TestDb::new().await;
    let ctx = ReconcileContext {
        config: ReconcileConfig {
            max_creates_per_pass: 3,
            ..ReconcileConfig::default()
        },
        ..context(&db)
    };
    let fx = world(&db, Some(7)).await;
    // (creates of the pass, follow-ups queued so far): 3 + 3 + 1, a follow-up after each short pass.
    for (created, queued) in [(3, 1), (6, 2), (7, 2)] {
        let ReconcileOutcome::Reconciled(report) = reconcile(&ctx, fx.preset_id).await else {
            panic!("reconciled");
        };
        assert_eq!(pool_counts(&db, fx.preset_id).await.created, created);
        assert_eq!(report.deferred, 7 - created as u32, "{report:?}");
        let jobs = follow_ups(&db, fx.preset_id).await;
        assert_eq!(jobs.len(), queued, "{jobs:#?}");
        assert_eq!(jobs[0]["data"]["reason"], "tick");
        assert_eq!(jobs[0]["source"], "test");
    }
    // Full: nothing more to do, nothing re-queued.
    reconcile(&ctx, fx.preset_id).await;
    assert_eq!(pool_counts(&db, fx.preset_id).await.created, 7);
    assert_eq!(follow_ups(&db, fx.preset_id).await.len(), 2);

    // The budget is per transaction: a batch shares it among its presets, in order.
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "budget").await;
    let first = fixtures::template_with_preset(&c, org, "first", Some(2)).await;
    let second = fixtures::template_with_preset(&c, org, "second", Some(2)).await;
    let attempts = reconcile_batch(
        &ctx,
        &[fresh_job(first.preset_id), fresh_job(second.preset_id)],
    )
    .await
    .expect("batch");
    let deferred = |a: &Attempt| match a {
        Attempt::Done(ReconcileOutcome::Reconciled(r)) => (r.created, r.deferred),
        other => panic!("{other:?}"),
    };
    assert_eq!(deferred(&attempts[0]), (2, 0));
    assert_eq!(deferred(&attempts[1]), (1, 1));
    assert!(follow_ups(&db, first.preset_id).await.is_empty());
    assert_eq!(follow_ups(&db, second.preset_id).await.len(), 1);

    // 0 = unlimited: one pass creates everything.
    let unlimited = ReconcileContext {
        config: ReconcileConfig {
            max_creates_per_pass: 0,
            ..ReconcileConfig::default()
        },
        ..context(&db)
    };
    let big = fixtures::template_with_preset(&c, org, "big", Some(60)).await;
    reconcile(&unlimited, big.preset_id).await;
    assert_eq!(pool_counts(&db, big.preset_id).await.created, 60);
    // The default budget is 50.
    let default = fixtures::template_with_preset(&c, org, "default", Some(60)).await;
    reconcile(&context(&db), default.preset_id).await;
    assert_eq!(pool_counts(&db, default.preset_id).await.created, 50);
    assert_eq!(follow_ups(&db, default.preset_id).await.len(), 1);
}

#[tokio::test]
async fn a_preset_that_fails_inside_a_batch_fails_only_its_own_job() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "faulty").await;
    let mut presets = Vec::new();
    for i in 0..6 {
        presets.push(
            fixtures::template_with_preset(&c, org, &format!("p{i}"), Some(1))
                .await
                .preset_id,
        );
    }
    let faulty = presets[3];
    // Injected fault: any build of the faulty preset is refused by the database.
    c.batch_execute(&format!(
        "CREATE FUNCTION refuse_faulty_build() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE EXCEPTION 'injected fault'; END $$;
         CREATE TRIGGER refuse_faulty_build BEFORE INSERT ON workspace_builds FOR EACH ROW
         WHEN (NEW.template_version_preset_id = '{faulty}') EXECUTE FUNCTION refuse_faulty_build();"
    ))
    .await
    .unwrap();
    let jobs: Vec<Job> = presets.iter().map(|p| fresh_job(*p)).collect();
    assert!(
        reconcile_batch(&ctx, &jobs).await.is_err(),
        "the fault fails a whole batch"
    );

    // Through the batcher every other preset still gets its prebuild.
    let batcher = Batcher::start(ctx.clone(), 2, 32);
    let results = futures::future::join_all(jobs.iter().map(|job| batcher.reconcile(*job))).await;
    for (preset_id, result) in presets.iter().zip(results) {
        if *preset_id == faulty {
            assert!(result.is_err(), "the faulty preset reports its error");
        } else {
            assert!(
                matches!(result, Ok(ReconcileOutcome::Reconciled(ref r)) if r.created == 1),
                "{preset_id}: {result:?}"
            );
            assert_eq!(pool_counts(&db, *preset_id).await.created, 1);
        }
    }
}

#[tokio::test]
async fn a_version_change_cancels_pending_creates_and_deletes_running_prebuilds() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let fx = world(&db, Some(3)).await;
    let c = db.pool.get().await.unwrap();
    let running = fixtures::prebuild(&c, &fx, &PrebuildSpec::running(Utc::now())).await;
    reconcile(&ctx, fx.preset_id).await; // creates 2 (pending)
    assert_eq!(pool_counts(&db, fx.preset_id).await.in_progress, 2);

    let new = fixtures::new_active_version(&c, &fx, Some(2)).await;
    let ReconcileOutcome::Reconciled(old) = reconcile(&ctx, fx.preset_id).await else {
        panic!("reconciled")
    };
    assert_eq!((old.canceled, old.deleted, old.created), (2, 1, 0));
    let ReconcileOutcome::Reconciled(fresh) = reconcile(&ctx, new.preset_id).await else {
        panic!("reconciled")
    };
    assert_eq!(
        fresh.created, 2,
        "the old preset's drain does not block the new pool"
    );

    let canceled: i64 = c
        .query_one(
            "SELECT count(*) FROM provisioner_jobs j JOIN workspace_builds b ON b.job_id = j.id
             WHERE b.template_version_preset_id = $1 AND j.job_status = 'canceled'",
            &[&fx.preset_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(canceled, 2);
    // Orphan deletes publish nothing; the running one gets a real delete job on the old version.
    let delete_build: (Uuid, Option<Uuid>) = {
        let r = c
            .query_one(
                "SELECT template_version_id, template_version_preset_id FROM workspace_builds
                 WHERE workspace_id = $1 AND transition = 'delete'",
                &[&running],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(delete_build, (fx.version_id, None));
}

#[tokio::test]
async fn a_preset_missing_a_required_parameter_ends_validation_failed_with_no_workspace() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let fx = world(&db, Some(2)).await;
    let c = db.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO template_version_parameters (template_version_id, name, required) VALUES ($1, 'cpus', true)",
        &[&fx.version_id],
    )
    .await
    .unwrap();
    let ReconcileOutcome::Reconciled(report) = reconcile(&ctx, fx.preset_id).await else {
        panic!()
    };
    assert!(report.validation_failed);
    assert_eq!(table_counts(&db).await["workspaces"], 0);
    let status: String = c
        .query_one(
            "SELECT prebuild_status FROM template_version_presets WHERE id = $1",
            &[&fx.preset_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "validation_failed");
    // And it stays so: later cycles skip creates.
    reconcile(&ctx, fx.preset_id).await;
    assert_eq!(table_counts(&db).await["workspaces"], 0);
}

#[tokio::test]
async fn an_unknown_preset_parameter_also_fails_validation_but_a_default_satisfies_required() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let fx = world(&db, Some(1)).await;
    let c = db.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO template_version_parameters (template_version_id, name, required, default_value)
         VALUES ($1, 'region', true, 'eu')",
        &[&fx.version_id],
    )
    .await
    .unwrap();
    let ReconcileOutcome::Reconciled(ok) = reconcile(&ctx, fx.preset_id).await else {
        panic!()
    };
    assert_eq!(ok.created, 1);

    let fx2 = world(&db, Some(1)).await;
    c.execute(
        "INSERT INTO template_version_preset_parameters (template_version_preset_id, name, value) VALUES ($1, 'gpus', '1')",
        &[&fx2.preset_id],
    )
    .await
    .unwrap();
    let ReconcileOutcome::Reconciled(bad) = reconcile(&ctx, fx2.preset_id).await else {
        panic!()
    };
    assert!(bad.validation_failed);
    assert_eq!(bad.created, 0);
}

#[tokio::test]
async fn ttl_expired_prebuilds_are_deleted_and_replaced() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let fx = world(&db, Some(2)).await;
    let c = db.pool.get().await.unwrap();
    c.execute(
        "UPDATE template_version_presets SET invalidate_after_secs = 60 WHERE id = $1",
        &[&fx.preset_id],
    )
    .await
    .unwrap();
    let old = fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec::running(Utc::now() - TimeDelta::minutes(5)),
    )
    .await;
    let _fresh = fixtures::prebuild(&c, &fx, &PrebuildSpec::running(Utc::now())).await;
    let ReconcileOutcome::Reconciled(report) = reconcile(&ctx, fx.preset_id).await else {
        panic!()
    };
    assert_eq!((report.deleted, report.created), (1, 1));
    let deleting: bool = c
        .query_one(
            "SELECT deleting_at IS NOT NULL FROM workspaces WHERE id = $1",
            &[&old],
        )
        .await
        .unwrap()
        .get(0);
    assert!(deleting);
}

#[tokio::test]
async fn paused_presets_get_no_actions_at_any_scope() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let c = db.pool.get().await.unwrap();
    for scope in ["global", "template", "preset"] {
        let fx = world(&db, Some(1)).await;
        match scope {
            "global" => {
                c.execute(
                    "UPDATE prebuilds_settings SET reconciliation_paused = true",
                    &[],
                )
                .await
            }
            "template" => {
                c.execute(
                    "UPDATE templates SET paused = true WHERE id = $1",
                    &[&fx.template_id],
                )
                .await
            }
            _ => {
                c.execute(
                    "UPDATE template_version_presets SET paused = true WHERE id = $1",
                    &[&fx.preset_id],
                )
                .await
            }
        }
        .unwrap();
        let ReconcileOutcome::Reconciled(report) = reconcile(&ctx, fx.preset_id).await else {
            panic!()
        };
        assert_eq!(report.created, 0, "{scope}");
        c.execute(
            "UPDATE prebuilds_settings SET reconciliation_paused = false",
            &[],
        )
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn a_hard_limited_preset_creates_nothing_but_still_deletes() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let fx = world(&db, Some(1)).await;
    let c = db.pool.get().await.unwrap();
    // Three failed creates, outside the backoff window: the hard limit (3) is reached.
    for _ in 0..3 {
        fixtures::prebuild(
            &c,
            &fx,
            &PrebuildSpec {
                transition: "start",
                job_status: "failed",
                created_at: Utc::now() - TimeDelta::hours(2),
                ready: false,
            },
        )
        .await;
    }
    // Two older running ones: with desired 1, one is extraneous and must still be deleted.
    fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec::running(Utc::now() - TimeDelta::hours(4)),
    )
    .await;
    fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec::running(Utc::now() - TimeDelta::hours(3)),
    )
    .await;
    let ReconcileOutcome::Reconciled(report) = reconcile(&ctx, fx.preset_id).await else {
        panic!()
    };
    assert_eq!((report.created, report.deleted), (0, 1));
    let status: String = c
        .query_one(
            "SELECT prebuild_status FROM template_version_presets WHERE id = $1",
            &[&fx.preset_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(status, "hard_limited");
}

#[tokio::test]
async fn a_recent_failure_backs_the_preset_off() {
    let db = TestDb::new().await;
    let ctx = context(&db);
    let fx = world(&db, Some(1)).await;
    let c = db.pool.get().await.unwrap();
    fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec {
            transition: "start",
            job_status: "failed",
            created_at: Utc::now(),
            ready: false,
        },
    )
    .await;
    let ReconcileOutcome::Reconciled(report) = reconcile(&ctx, fx.preset_id).await else {
        panic!()
    };
    assert_eq!(report.created, 0, "backing off");
}

#[tokio::test]
async fn a_crash_mid_transaction_leaves_no_partial_effect() {
    let db = TestDb::new().await;
    let fx = world(&db, Some(3)).await;
    // The victim has its own connections, like a separate worker process.
    let ctx = ReconcileContext {
        pool: prebuilds_runtime::db::pool(&db.url, 2).unwrap(),
        ..context(&db)
    };
    // Hold the row the reconcile writes last, so it blocks after writing its creates.
    let blocker_client = db.connect().await;
    blocker_client
        .batch_execute(&format!(
            "INSERT INTO preset_reconcile_state VALUES ('{}', '2000-01-01');
             BEGIN; SELECT * FROM preset_reconcile_state FOR UPDATE;",
            fx.preset_id
        ))
        .await
        .unwrap();
    let running = tokio::spawn({
        let ctx = ctx.clone();
        async move { reconcile(&ctx, fx.preset_id).await }
    });
    // Barrier: the reconcile is blocked on the held row (its creates written, uncommitted).
    let blocked_backend = || async {
        let rows = db
            .pool
            .get()
            .await
            .unwrap()
            .query(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()
                 AND wait_event_type = 'Lock' AND query LIKE '%preset_reconcile_state%'",
                &[],
            )
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.get::<_, i32>(0))
            .collect::<Vec<i32>>()
    };
    let blocked = prebuilds_tests::eventually(
        Duration::from_secs(20),
        "the reconcile to block mid-transaction",
        || async { Some(blocked_backend().await).filter(|pids| !pids.is_empty()) },
    )
    .await;
    // Kill it: aborting the task drops its connection mid-transaction, as a SIGKILL would.
    running.abort();
    let _ = running.await;
    ctx.pool.close();
    blocker_client.batch_execute("COMMIT").await.unwrap();
    // Barrier: its backend has ended, so whatever it did is final.
    prebuilds_tests::eventually(
        Duration::from_secs(20),
        "the killed reconcile's backend gone",
        || async {
            let left: i64 = db
                .pool
                .get()
                .await
                .unwrap()
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
                    &[&blocked],
                )
                .await
                .unwrap()
                .get(0);
            (left == 0).then_some(())
        },
    )
    .await;
    let counts = table_counts(&db).await;
    assert_eq!(
        (counts["workspaces"], counts["outbox"]),
        (0, 0),
        "nothing half-made"
    );
    // The job is redone (by another worker: a fresh pool).
    let again = ReconcileContext {
        pool: prebuilds_runtime::db::pool(&db.url, 4).unwrap(),
        ..ctx
    };
    reconcile(&again, fx.preset_id).await;
    assert_eq!(table_counts(&db).await["workspaces"], 3);
}
