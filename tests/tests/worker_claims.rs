//! Claims against the real database: validation codes, preset matching, idempotence, concurrent
//! claimers, and the claim/delete race (in-process, many iterations).

use std::sync::Arc;

use chrono::{TimeDelta, Utc};
use prebuilds_core::ReconcileConfig;
use prebuilds_runtime::amqp::Publisher;
use prebuilds_schemas::{
    ClaimErrorCode, ClaimOutcome, ClaimReply, ClaimRequest, MissReason, Parameter, PresetParameters,
};
use prebuilds_tests::{
    fixtures::{self, PrebuildSpec, PresetFixture},
    TestBroker, TestDb,
};
use prebuilds_worker::{
    claims::{claim, ClaimsContext},
    metrics::WorkerMetrics,
    reconcile::{reconcile_preset, ReconcileContext, ReconcileOutcome},
};
use uuid::Uuid;

async fn contexts(db: &TestDb, broker: &TestBroker) -> (ClaimsContext, ReconcileContext) {
    let metrics = WorkerMetrics::register(&prometheus::Registry::new()).unwrap();
    let waker = Arc::new(tokio::sync::Notify::new());
    let claims = ClaimsContext {
        pool: db.pool.clone(),
        publisher: Arc::new(Publisher::new(&broker.url, "test", broker.topology.clone())),
        metrics: metrics.clone(),
        outbox_waker: waker.clone(),
        source: "test".into(),
    };
    let reconcile = ReconcileContext {
        pool: db.pool.clone(),
        config: ReconcileConfig::default(),
        metrics,
        outbox_waker: waker,
        source: "test".into(),
        demand_time_unit: std::time::Duration::from_secs(60),
    };
    (claims, reconcile)
}

fn request(user: Uuid, name: &str, preset: Uuid) -> ClaimRequest {
    ClaimRequest {
        user_id: user,
        workspace_name: name.into(),
        preset_id: Some(preset),
        template_id: None,
        parameters: vec![],
    }
}

async fn ask(ctx: &ClaimsContext, req: &ClaimRequest) -> ClaimReply {
    claim(ctx, Uuid::new_v4(), req).await.expect("claim").0
}

async fn workspaces_owned_by(db: &TestDb, user: Uuid) -> i64 {
    let c = db.pool.get().await.unwrap();
    c.query_one(
        "SELECT count(*) FROM workspaces WHERE owner_id = $1",
        &[&user],
    )
    .await
    .unwrap()
    .get(0)
}

async fn world(db: &TestDb, eligible: usize) -> (PresetFixture, Uuid) {
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, &format!("o{}", Uuid::new_v4().simple())).await;
    let fx = fixtures::template_with_preset(&c, org, "tpl", Some(eligible as i32)).await;
    for _ in 0..eligible {
        fixtures::prebuild(&c, &fx, &PrebuildSpec::running(Utc::now())).await;
    }
    let user = fixtures::user(
        &c,
        &format!("u{}", &Uuid::new_v4().simple().to_string()[..8]),
        false,
    )
    .await;
    (fx, user)
}

#[tokio::test]
async fn a_claim_transfers_a_ready_prebuild_and_queues_the_claim_build_and_a_replenish() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (ctx, _) = contexts(&db, &broker).await;
    let (fx, user) = world(&db, 1).await;
    let reply = ask(&ctx, &request(user, "my-ws", fx.preset_id)).await;
    assert_eq!(reply.outcome, ClaimOutcome::Claimed, "{reply:?}");
    let c = db.pool.get().await.unwrap();
    let row = c
        .query_one(
            "SELECT w.owner_id, w.name, b.build_number, b.transition, b.stage, b.initiator_id, j.job_status
             FROM workspaces w JOIN workspace_builds b ON b.workspace_id = w.id
             JOIN provisioner_jobs j ON j.id = b.job_id
             WHERE w.id = $1 AND b.id = $2",
            &[&reply.workspace_id.unwrap(), &reply.build_id.unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Uuid>(0), user);
    assert_eq!(row.get::<_, String>(1), "my-ws");
    assert_eq!(row.get::<_, i32>(2), 2);
    assert_eq!(row.get::<_, String>(3), "start");
    assert_eq!(row.get::<_, String>(4), "claim");
    assert_eq!(row.get::<_, Uuid>(5), user);
    assert_eq!(row.get::<_, String>(6), "pending");
    let outbox: Vec<String> = c
        .query("SELECT routing_key FROM outbox ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The claim build goes to the user lane.
    assert_eq!(
        outbox,
        vec!["provisioner.job.user.start", "reconcile.preset"]
    );
    // The pool is now empty: the next claim misses.
    let miss = ask(&ctx, &request(user, "other", fx.preset_id)).await;
    assert_eq!(miss.outcome, ClaimOutcome::NoEligiblePrebuild);
    assert_eq!(miss.reason, Some(MissReason::PoolEmpty));
    assert_eq!(miss.preset_id, Some(fx.preset_id));
}

#[tokio::test]
async fn rejections_carry_the_spec_codes() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (ctx, _) = contexts(&db, &broker).await;
    let (fx, user) = world(&db, 2).await;
    let c = db.pool.get().await.unwrap();
    let before = prebuilds_tests::stack::table_counts(&db).await;
    let code = |r: ClaimReply| r.error.map(|e| e.code);
    assert_eq!(
        code(ask(&ctx, &request(Uuid::new_v4(), "ws", fx.preset_id)).await),
        Some(ClaimErrorCode::UnknownUser)
    );
    assert_eq!(
        code(ask(&ctx, &request(user, "bad name!", fx.preset_id)).await),
        Some(ClaimErrorCode::InvalidName)
    );
    assert_eq!(
        code(ask(&ctx, &request(user, &"a".repeat(33), fx.preset_id)).await),
        Some(ClaimErrorCode::InvalidName)
    );
    assert_eq!(
        code(ask(&ctx, &request(user, "ws", Uuid::new_v4())).await),
        Some(ClaimErrorCode::UnknownPreset)
    );
    let mut neither = request(user, "ws", fx.preset_id);
    neither.preset_id = None;
    assert_eq!(
        code(ask(&ctx, &neither).await),
        Some(ClaimErrorCode::InvalidRequest)
    );
    // Rejections change nothing but their own request record.
    assert_eq!(prebuilds_tests::stack::table_counts(&db).await, before);
    assert_eq!(
        ask(&ctx, &request(user, "taken", fx.preset_id))
            .await
            .outcome,
        ClaimOutcome::Claimed
    );
    assert_eq!(
        code(ask(&ctx, &request(user, "TAKEN", fx.preset_id)).await),
        Some(ClaimErrorCode::NameConflict)
    );
    c.execute(
        "UPDATE templates SET deprecated = 'old' WHERE id = $1",
        &[&fx.template_id],
    )
    .await
    .unwrap();
    let after_claim = prebuilds_tests::stack::table_counts(&db).await;
    assert_eq!(
        code(ask(&ctx, &request(user, "ws2", fx.preset_id)).await),
        Some(ClaimErrorCode::PresetInactive)
    );
    assert_eq!(prebuilds_tests::stack::table_counts(&db).await, after_claim);
}

#[tokio::test]
async fn a_claim_without_a_preset_matches_the_most_specific_preset_by_parameters() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (ctx, _) = contexts(&db, &broker).await;
    let (fx, user) = world(&db, 1).await;
    let c = db.pool.get().await.unwrap();
    // The fixture preset sets region=eu; a second preset on the same version sets nothing.
    c.execute(
        "INSERT INTO template_version_preset_parameters VALUES ($1, 'region', 'eu')",
        &[&fx.preset_id],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO template_version_presets (id, template_version_id, name) VALUES ($1, $2, 'bare')",
        &[&Uuid::new_v4(), &fx.version_id],
    )
    .await
    .unwrap();
    let mut req = request(user, "matched", fx.preset_id);
    req.preset_id = None;
    req.template_id = Some(fx.template_id);
    req.parameters = vec![
        Parameter {
            name: "region".into(),
            value: "eu".into(),
        },
        Parameter {
            name: "dotfiles".into(),
            value: "x".into(),
        },
    ];
    let reply = ask(&ctx, &req).await;
    assert_eq!(reply.outcome, ClaimOutcome::Claimed);
    assert_eq!(reply.preset_id, Some(fx.preset_id));
    // The claim build carries the preset's values and the user's extras.
    let params: serde_json::Value = c
        .query_one(
            "SELECT parameters FROM workspace_builds WHERE id = $1",
            &[&reply.build_id.unwrap()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        params,
        serde_json::json!([{"name": "dotfiles", "value": "x"}, {"name": "region", "value": "eu"}])
    );
}

fn param(name: &str, value: &str) -> Parameter {
    Parameter {
        name: name.into(),
        value: value.into(),
    }
}

/// The demo template's shape (examples/demo-template.yaml): `cpus` required, `region` defaulting
/// to `eu`; presets `small` {cpus 2, region eu} with one ready prebuild and `large` {cpus 8,
/// region eu} with none.
#[tokio::test]
async fn template_claims_take_parameter_defaults_and_misses_say_why() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (ctx, _) = contexts(&db, &broker).await;
    let (small, user) = world(&db, 1).await;
    let c = db.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO template_version_parameters (template_version_id, name, required, default_value)
         VALUES ($1, 'cpus', true, NULL), ($1, 'region', false, 'eu')",
        &[&small.version_id],
    )
    .await
    .unwrap();
    let large = Uuid::new_v4();
    c.execute(
        "INSERT INTO template_version_presets (id, template_version_id, name, desired_instances)
         VALUES ($1, $2, 'large', 1)",
        &[&large, &small.version_id],
    )
    .await
    .unwrap();
    for (preset, cpus) in [(small.preset_id, "2"), (large, "8")] {
        c.execute(
            "INSERT INTO template_version_preset_parameters VALUES ($1, 'cpus', $2), ($1, 'region', 'eu')",
            &[&preset, &cpus],
        )
        .await
        .unwrap();
    }
    let by_template = |name: &str, parameters: Vec<Parameter>| ClaimRequest {
        user_id: user,
        workspace_name: name.into(),
        preset_id: None,
        template_id: Some(small.template_id),
        parameters,
    };

    // region left out: it takes its default and the request matches `small`, which has a prebuild.
    let reply = ask(&ctx, &by_template("defaulted", vec![param("cpus", "2")])).await;
    assert_eq!(reply.outcome, ClaimOutcome::Claimed, "{reply:?}");
    assert_eq!(reply.preset_id, Some(small.preset_id));
    assert_eq!((reply.reason, reply.presets.len()), (None, 0));

    // Matches `large` through the default, whose pool is empty.
    let reply = ask(&ctx, &by_template("large", vec![param("cpus", "8")])).await;
    assert_eq!(reply.outcome, ClaimOutcome::NoEligiblePrebuild);
    assert_eq!(reply.reason, Some(MissReason::PoolEmpty));
    assert_eq!(reply.preset_id, Some(large));
    assert!(reply.presets.is_empty());

    // An explicit value overrides the default, and then nothing matches: the reply lists what
    // would have, by name.
    let reply = ask(
        &ctx,
        &by_template("us", vec![param("cpus", "2"), param("region", "us")]),
    )
    .await;
    assert_eq!(reply.outcome, ClaimOutcome::NoEligiblePrebuild);
    assert_eq!(reply.reason, Some(MissReason::NoMatchingPreset));
    assert_eq!(reply.preset_id, None);
    let listed = |id, name: &str, cpus: &str| PresetParameters {
        preset_id: id,
        name: name.into(),
        parameters: vec![param("cpus", cpus), param("region", "eu")],
    };
    assert_eq!(
        reply.presets,
        vec![
            listed(small.preset_id, "default", "2"),
            listed(large, "large", "8")
        ]
    );
    // A request without parameters matches neither (cpus has no default).
    let reply = ask(&ctx, &by_template("bare", vec![])).await;
    assert_eq!(reply.reason, Some(MissReason::NoMatchingPreset));
    // The reason is part of the stored reply: a retry of the request gets it again.
    let id = Uuid::new_v4();
    let first = claim(&ctx, id, &by_template("again", vec![]))
        .await
        .unwrap()
        .0;
    let again = claim(&ctx, id, &by_template("again", vec![]))
        .await
        .unwrap()
        .0;
    assert_eq!(first, again);
    assert_eq!(again.reason, Some(MissReason::NoMatchingPreset));
    assert_eq!(again.presets.len(), 2);
    // Misses are counted as such in claim_requests (the status history).
    let misses: i64 = c
        .query_one(
            "SELECT count(*) FROM claim_requests WHERE outcome = 'no_eligible_prebuild'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(misses, 4);
}

#[tokio::test]
async fn a_retried_claim_returns_its_first_outcome_and_claims_once() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (ctx, _) = contexts(&db, &broker).await;
    let (fx, user) = world(&db, 3).await;
    let id = Uuid::new_v4();
    let req = request(user, "once", fx.preset_id);
    // Concurrent duplicates and a later retry.
    let (a, b) = tokio::join!(claim(&ctx, id, &req), claim(&ctx, id, &req));
    let (a, b) = (a.unwrap().0, b.unwrap().0);
    let c = claim(&ctx, id, &req).await.unwrap().0;
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_eq!(a.outcome, ClaimOutcome::Claimed);
    assert_eq!(workspaces_owned_by(&db, user).await, 1);
}

/// Deliveries of one request that all waited on the request lock: the first to get it claims;
/// each later one finds the stored reply in the statement that follows the lock, claims nothing
/// and answers the same.
#[tokio::test]
async fn duplicates_waiting_on_the_request_lock_all_answer_the_first_claim() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (ctx, _) = contexts(&db, &broker).await;
    let (fx, user) = world(&db, 3).await;
    let id = Uuid::new_v4();
    let req = request(user, "queued", fx.preset_id);
    let mut holder = db.connect().await;
    let lock = holder.transaction().await.unwrap();
    lock.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&prebuilds_schemas::locks::entity(id)],
    )
    .await
    .unwrap();
    let deliveries: Vec<_> = (0..4)
        .map(|_| {
            let (ctx, req) = (ctx.clone(), req.clone());
            tokio::spawn(async move { claim(&ctx, id, &req).await.unwrap().0 })
        })
        .collect();
    let watcher = db.connect().await;
    let four_waiting = "four deliveries waiting on the request lock";
    prebuilds_tests::stack::wait_for(std::time::Duration::from_secs(10), four_waiting, || async {
        // Waiters on this request's lock in this database only: tests run in parallel on one
        // server, and other tests' advisory waiters must not count.
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_locks
                 WHERE locktype = 'advisory' AND NOT granted
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND objsubid = 1
                   AND ((classid::bigint << 32) | objid::bigint) = $1",
                &[&prebuilds_schemas::locks::entity(id)],
            )
            .await
            .unwrap()
            .get(0);
        waiting == 4
    })
    .await;
    lock.rollback().await.unwrap();
    let replies: Vec<ClaimReply> = futures::future::join_all(deliveries)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(replies[0].outcome, ClaimOutcome::Claimed);
    assert!(replies.iter().all(|r| r == &replies[0]), "{replies:#?}");
    assert_eq!(workspaces_owned_by(&db, user).await, 1);
}

#[tokio::test]
async fn sixty_four_concurrent_claims_against_twenty_prebuilds_claim_each_once() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (ctx, _) = contexts(&db, &broker).await;
    let (fx, user) = world(&db, 20).await;
    let claims = (0..64).map(|i| {
        let ctx = ctx.clone();
        tokio::spawn(
            async move { ask(&ctx, &request(user, &format!("ws-{i}"), fx.preset_id)).await },
        )
    });
    let replies: Vec<ClaimReply> = futures::future::join_all(claims)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    let claimed: Vec<Uuid> = replies
        .iter()
        .filter(|r| r.outcome == ClaimOutcome::Claimed)
        .map(|r| r.workspace_id.unwrap())
        .collect();
    assert_eq!(claimed.len(), 20);
    let unique: std::collections::HashSet<_> = claimed.iter().collect();
    assert_eq!(unique.len(), 20, "no prebuild claimed twice");
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.outcome == ClaimOutcome::NoEligiblePrebuild)
            .count(),
        44
    );
}

#[tokio::test]
async fn a_claim_and_a_delete_never_both_win_the_same_workspace() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (claims, reconcile) = contexts(&db, &broker).await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "race").await;
    let user = fixtures::user(&c, "racer", false).await;
    let mut claimed_wins = 0;
    let mut delete_wins = 0;
    for i in 0..40 {
        // desired 0: the one running prebuild is extraneous, so the reconcile deletes it.
        let fx = fixtures::template_with_preset(&c, org, &format!("race-{i}"), Some(0)).await;
        let ws = fixtures::prebuild(
            &c,
            &fx,
            &PrebuildSpec::running(Utc::now() - TimeDelta::minutes(1)),
        )
        .await;
        let req = request(user, &format!("race-{i}"), fx.preset_id);
        let (claim_reply, reconciled) = tokio::join!(
            ask(&claims, &req),
            reconcile_preset(&reconcile, fx.preset_id, Utc::now() + TimeDelta::hours(1))
        );
        let ReconcileOutcome::Reconciled(report) = reconciled.unwrap() else {
            panic!()
        };
        let delete_builds: i64 = c
            .query_one(
                "SELECT count(*) FROM workspace_builds WHERE workspace_id = $1 AND transition = 'delete'",
                &[&ws],
            )
            .await
            .unwrap()
            .get(0);
        match claim_reply.outcome {
            ClaimOutcome::Claimed => {
                assert_eq!(claim_reply.workspace_id, Some(ws));
                assert_eq!(
                    delete_builds, 0,
                    "iteration {i}: a claimed workspace got a delete build"
                );
                assert_eq!(report.deleted, 0);
                claimed_wins += 1;
            }
            ClaimOutcome::NoEligiblePrebuild => {
                assert_eq!(delete_builds, 1, "iteration {i}");
                delete_wins += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(claimed_wins + delete_wins, 40);
    println!("claim won {claimed_wins}, delete won {delete_wins}");
}

#[tokio::test]
async fn replacements_on_a_claim_build_warn_count_and_notify_each_admin_exactly_once() {
    use prebuilds_schemas::{PlanResult, ProvisionerEvent, ResourceReplacement};
    use prebuilds_worker::events::{apply, EventsContext};
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (ctx, _) = contexts(&db, &broker).await;
    let (fx, user) = world(&db, 1).await;
    let c = db.pool.get().await.unwrap();
    let admins = [
        fixtures::user(&c, "admin-a", true).await,
        fixtures::user(&c, "admin-b", true).await,
    ];
    let reply = ask(&ctx, &request(user, "drifty", fx.preset_id)).await;
    let job = reply.job_id.unwrap();
    let registry = prometheus::Registry::new();
    let events = EventsContext {
        pool: db.pool.clone(),
        metrics: WorkerMetrics::register(&registry).unwrap(),
        outbox_waker: Arc::new(tokio::sync::Notify::new()),
        source: "test".into(),
        wakes_held_back: true,
    };
    let plan = ProvisionerEvent::PlanResult(PlanResult {
        job_id: job,
        resource_replacements: vec![
            ResourceReplacement {
                resource: "docker_container.ws[0]".into(),
                paths: vec!["env".into(), "image".into()],
            },
            ResourceReplacement {
                resource: "coder_agent.main".into(),
                paths: vec!["token".into()],
            },
        ],
    });
    // The build started (a plan result waits for that), then the plan result is delivered three
    // times, twice under new ids (a provisioner retry): one effect.
    let started = ProvisionerEvent::JobStarted(prebuilds_schemas::JobStarted {
        job_id: job,
        started_at: chrono::Utc::now(),
    });
    apply(&events, Uuid::new_v4(), &started).await.unwrap();
    let id = Uuid::new_v4();
    for event_id in [id, id, Uuid::new_v4()] {
        apply(&events, event_id, &plan).await.unwrap();
    }
    let rows = c
        .query(
            "SELECT user_id, payload FROM notification_messages ORDER BY user_id",
            &[],
        )
        .await
        .unwrap();
    let mut recipients: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let mut expected = admins.to_vec();
    recipients.sort();
    expected.sort();
    assert_eq!(recipients, expected);
    let payload: serde_json::Value = rows[0].get(1);
    assert_eq!(payload["labels"]["workspace"], "drifty");
    assert_eq!(payload["labels"]["preset"], "default");
    assert_eq!(payload["labels"]["workspace_build_num"], "2");
    assert_eq!(
        payload["data"]["replacements"],
        serde_json::json!({"docker_container.ws[0]": "env,image"})
    );
    let queued: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE routing_key LIKE 'notification.%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(queued, 2);
    let warns = fixtures::job_log_lines(&c, job, Some("warn")).await;
    assert_eq!(warns.len(), 1, "coder_ resources are ignored: {warns:?}");
    assert!(warns[0].contains("docker_container.ws[0]") && warns[0].contains("env, image"));
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("coderd_prebuilt_workspaces_resource_replacements_total{organization_name=")
            && text.contains("preset_name=\"default\",template_name=\"tpl\"} 1"),
        "{text}"
    );
}
