//! Trust boundaries (docs/messages.md "Trust", README "Trust model") on the real services: who may claim for whom,
//! request ids that cannot be reused for someone else, publisher allow-lists on RabbitMQ's
//! validated `user_id` (with broker users the test creates), job ownership of provisioner events,
//! and the audit log of `prebuildsctl`.

use std::{process::Output, sync::Arc, time::Duration};

use chrono::Utc;
use lapin::{options::BasicPublishOptions, BasicProperties};
use prebuilds_runtime::amqp::{
    consumer::{DEAD_PUBLISHER_HEADER, DEAD_REASON_HEADER},
    rpc::RpcClient,
    Publisher, Topology, TopologyMode,
};
use prebuilds_schemas::{
    AgentLifecycle, AgentLifecycleState, AgentSpec, ClaimErrorCode, ClaimOutcome, ClaimReply,
    ClaimRequest, CloudEvent, JobCompleted, JobOutcome, JobStarted, ProvisionerEvent,
    PREBUILDS_USER_ID,
};
use prebuilds_tests::{
    broker::amqp_url,
    fixtures::{self, PrebuildSpec, PresetFixture},
    probe,
    process::binary,
    stack::{self, wait_for},
    TestBroker, TestDb,
};
use prebuilds_worker::{
    claims::{claim, ClaimsContext},
    events::{apply_from, Applied, EventError, EventsContext},
    metrics::WorkerMetrics,
};
use serde_json::Value;
use uuid::Uuid;

fn claims_context(db: &TestDb, broker: &TestBroker) -> ClaimsContext {
    ClaimsContext {
        pool: db.pool.clone(),
        publisher: Arc::new(Publisher::new(&broker.url, "test", broker.topology.clone())),
        metrics: WorkerMetrics::register(&prometheus::Registry::new()).unwrap(),
        outbox_waker: Arc::new(tokio::sync::Notify::new()),
        source: "test".into(),
    }
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

/// An organization with a template whose preset has `eligible` ready prebuilds.
async fn pool(db: &TestDb, eligible: usize) -> PresetFixture {
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, &format!("o{}", Uuid::new_v4().simple())).await;
    let fx = fixtures::template_with_preset(&c, org, "tpl", Some(eligible as i32)).await;
    for _ in 0..eligible {
        fixtures::prebuild(&c, &fx, &PrebuildSpec::running(Utc::now())).await;
    }
    fx
}

/// Prebuilds of the preset's template still owned by the prebuilds user.
async fn unclaimed(db: &TestDb, fx: &PresetFixture) -> i64 {
    let c = db.pool.get().await.unwrap();
    c.query_one(
        "SELECT count(*) FROM workspaces WHERE template_id = $1 AND owner_id = $2 AND NOT deleted",
        &[&fx.template_id, &PREBUILDS_USER_ID],
    )
    .await
    .unwrap()
    .get(0)
}

fn code(reply: &ClaimReply) -> Option<ClaimErrorCode> {
    reply.error.as_ref().map(|e| e.code)
}

#[tokio::test]
async fn claims_by_the_system_user_a_deleted_user_or_an_outsider_are_forbidden_and_take_nothing() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let ctx = claims_context(&db, &broker);
    let fx = pool(&db, 1).await;
    let c = db.pool.get().await.unwrap();
    let deleted = fixtures::user(&c, "gone", false).await;
    c.execute("UPDATE users SET deleted = true WHERE id = $1", &[&deleted])
        .await
        .unwrap();
    // A member of another organization only.
    let other_org = fixtures::organization(&c, "elsewhere").await;
    let outsider = fixtures::outsider(&c, "mallory", false).await;
    fixtures::member(&c, outsider, other_org).await;

    for (who, user) in [
        ("the prebuilds system user", PREBUILDS_USER_ID),
        ("a deleted user", deleted),
        ("a user of another organization", outsider),
    ] {
        let reply = claim(&ctx, Uuid::new_v4(), &request(user, "ws", fx.preset_id))
            .await
            .unwrap()
            .0;
        assert_eq!(reply.outcome, ClaimOutcome::Rejected, "{who}: {reply:?}");
        assert_eq!(
            code(&reply),
            Some(ClaimErrorCode::Forbidden),
            "{who}: {reply:?}"
        );
        assert_eq!(reply.workspace_id, None, "{who}");
        assert_eq!(unclaimed(&db, &fx).await, 1, "{who} took a prebuild");
    }
    let message = claim(&ctx, Uuid::new_v4(), &request(outsider, "ws", fx.preset_id))
        .await
        .unwrap()
        .0
        .error
        .unwrap()
        .message;
    assert!(
        message.contains("not a member of organization"),
        "{message}"
    );

    // A member of the template's organization gets the prebuild.
    let alice = fixtures::user(&c, "alice", false).await;
    let reply = claim(&ctx, Uuid::new_v4(), &request(alice, "ws", fx.preset_id))
        .await
        .unwrap()
        .0;
    assert_eq!(reply.outcome, ClaimOutcome::Claimed, "{reply:?}");
    assert_eq!(unclaimed(&db, &fx).await, 0);
}

#[tokio::test]
async fn a_request_id_reused_for_another_user_or_body_is_refused_not_answered() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let ctx = claims_context(&db, &broker);
    let fx = pool(&db, 2).await;
    let c = db.pool.get().await.unwrap();
    let alice = fixtures::user(&c, "alice", false).await;
    let bob = fixtures::user(&c, "bob", false).await;
    let id = Uuid::new_v4();
    let first = claim(&ctx, id, &request(alice, "ws", fx.preset_id))
        .await
        .unwrap()
        .0;
    assert_eq!(first.outcome, ClaimOutcome::Claimed, "{first:?}");

    // Another user with the same id: refused, and nothing of alice's reply leaks.
    let stolen = claim(&ctx, id, &request(bob, "ws", fx.preset_id))
        .await
        .unwrap()
        .0;
    assert_eq!(
        code(&stolen),
        Some(ClaimErrorCode::RequestConflict),
        "{stolen:?}"
    );
    assert_eq!(stolen.workspace_id, None);
    assert_eq!(stolen.build_id, None);
    assert!(
        stolen
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("another user"),
        "{stolen:?}"
    );
    // The same user with another body: refused too.
    let changed = claim(&ctx, id, &request(alice, "other-name", fx.preset_id))
        .await
        .unwrap()
        .0;
    assert_eq!(
        code(&changed),
        Some(ClaimErrorCode::RequestConflict),
        "{changed:?}"
    );
    // Neither took a prebuild; the second prebuild is still there.
    assert_eq!(unclaimed(&db, &fx).await, 1);
    let bobs: i64 = c
        .query_one(
            "SELECT count(*) FROM workspaces WHERE owner_id = $1",
            &[&bob],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bobs, 0);

    // A true retry (same user, same body) still gets the first reply.
    let retry = claim(&ctx, id, &request(alice, "ws", fx.preset_id))
        .await
        .unwrap()
        .0;
    assert_eq!(retry, first);
}

/// A RabbitMQ user of the test's own, allowed to publish to the prefix's exchange only (no
/// configure, no read); deleted on drop.
struct BrokerUser {
    name: String,
    password: String,
}

impl BrokerUser {
    fn create(prefix: &str, role: &str) -> BrokerUser {
        let user = BrokerUser {
            name: format!("{prefix}-{role}"),
            password: Uuid::new_v4().simple().to_string(),
        };
        for args in [
            vec!["add_user", &user.name, &user.password],
            vec![
                "set_permissions",
                "-p",
                "/",
                &user.name,
                "^$",
                &format!("^{prefix}$"),
                "^$",
            ],
        ] {
            let out = std::process::Command::new("rabbitmqctl")
                .args(&args)
                .output()
                .expect("run rabbitmqctl");
            assert!(
                out.status.success(),
                "rabbitmqctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        user
    }

    fn url(&self) -> String {
        let base = amqp_url();
        let rest = base
            .split_once('@')
            .map(|(_, rest)| rest)
            .unwrap_or("127.0.0.1:5672/%2f");
        format!("amqp://{}:{}@{rest}", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// The next dead letter: (reason header, publisher header, body). A deferred event is dead-lettered
/// only after its last delivery, hence the generous wait (it returns as soon as one arrives).
async fn dead_letter(broker: &TestBroker) -> (String, Option<String>, Vec<u8>) {
    let message = broker
        .get(&broker.topology.dead_queue(), Duration::from_secs(60))
        .await
        .expect("a dead letter");
    let delivery = &message.delivery;
    let publisher = Some(header_text(delivery, DEAD_PUBLISHER_HEADER)).filter(|p| !p.is_empty());
    (
        header_text(delivery, DEAD_REASON_HEADER),
        publisher,
        delivery.data.clone(),
    )
}

async fn job_status(db: &TestDb, job: Uuid) -> String {
    let c = db.pool.get().await.unwrap();
    c.query_one(
        "SELECT job_status FROM provisioner_jobs WHERE id = $1",
        &[&job],
    )
    .await
    .unwrap()
    .get(0)
}

#[tokio::test]
async fn with_allow_lists_only_listed_broker_users_may_claim_and_report_events() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let listed = BrokerUser::create(broker.prefix(), "listed");
    let stranger = BrokerUser::create(broker.prefix(), "stranger");
    let fx = pool(&db, 1).await;
    let c = db.pool.get().await.unwrap();
    let alice = fixtures::user(&c, "alice", false).await;
    // A prebuild whose build has not started: what a forged or real job_started would move.
    let pending = fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec {
            transition: "start",
            job_status: "pending",
            created_at: Utc::now(),
            ready: false,
        },
    )
    .await;
    let job: Uuid = fixtures::latest_job(&c, pending).await;
    let lists = format!("{},someone-else", listed.name);
    let (_worker, port) = stack::start(
        "prebuilds-worker",
        &db,
        &broker,
        &[
            ("PREBUILDS_CLAIM_PUBLISHERS", &lists),
            ("PREBUILDS_PROVISIONER_PUBLISHERS", &lists),
        ],
    );
    // The test's users may not declare: they only check the topology, as services do.
    let checked = Topology::new(broker.prefix()).with_mode(TopologyMode::Check);
    let ask = |url: String, name: &'static str| {
        let checked = checked.clone();
        async move {
            let rpc = RpcClient::connect(&url, "trust-test", checked)
                .await
                .unwrap();
            let event = CloudEvent::new("test", Utc::now(), request(alice, name, fx.preset_id));
            let reply: CloudEvent<ClaimReply> =
                rpc.call(&event, Duration::from_secs(20)).await.unwrap();
            reply.data
        }
    };

    // 1. A claim from an unlisted broker user: forbidden, dead-lettered, nothing taken.
    let refused = ask(stranger.url(), "ws").await;
    assert_eq!(
        code(&refused),
        Some(ClaimErrorCode::Forbidden),
        "{refused:?}"
    );
    assert!(
        refused
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("PREBUILDS_CLAIM_PUBLISHERS"),
        "{refused:?}"
    );
    let (reason, publisher, _) = dead_letter(&broker).await;
    assert!(reason.contains(&format!("{:?}", stranger.name)), "{reason}");
    assert_eq!(publisher.as_deref(), Some(stranger.name.as_str()));
    assert_eq!(unclaimed(&db, &fx).await, 2);

    // 2. An event from an unlisted broker user: dead-lettered, the job does not move.
    let started = CloudEvent::new(
        "test",
        Utc::now(),
        JobStarted {
            job_id: job,
            started_at: Utc::now(),
        },
    );
    let forger = Publisher::new(stranger.url(), "trust-test", checked.clone());
    forger.publish_event(&started).await.unwrap();
    let (reason, publisher, body) = dead_letter(&broker).await;
    assert!(
        reason.contains("PREBUILDS_PROVISIONER_PUBLISHERS"),
        "{reason}"
    );
    assert_eq!(publisher.as_deref(), Some(stranger.name.as_str()));
    assert_eq!(body, serde_json::to_vec(&started).unwrap());
    assert_eq!(job_status(&db, job).await, "pending");

    // 3. An event without user_id (published raw by the harness): refused the same way.
    let anonymous = CloudEvent::new(
        "test",
        Utc::now(),
        JobStarted {
            job_id: job,
            started_at: Utc::now(),
        },
    );
    broker
        .channel
        .basic_publish(
            broker.prefix().into(),
            anonymous.routing_key().as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&anonymous).unwrap(),
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let (reason, publisher, _) = dead_letter(&broker).await;
    assert!(reason.contains("no user_id"), "{reason}");
    assert_eq!(publisher, None);
    assert_eq!(job_status(&db, job).await, "pending");

    // Refusals are counted.
    let refusals = probe::scrape_sum(
        port,
        "prebuilds_dead_lettered_total",
        &["reason=\"forbidden_publisher\""],
    )
    .await;
    assert_eq!(refusals, Some(3.0));

    // 4. The listed user's claim and event are accepted.
    let claimed = ask(listed.url(), "ws").await;
    assert_eq!(claimed.outcome, ClaimOutcome::Claimed, "{claimed:?}");
    let provisioner = Publisher::new(listed.url(), "trust-test", checked.clone());
    provisioner
        .publish_event(&CloudEvent::new(
            "test",
            Utc::now(),
            JobStarted {
                job_id: job,
                started_at: Utc::now(),
            },
        ))
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(15),
        "the listed job_started applied",
        || async { job_status(&db, job).await == "running" },
    )
    .await;
    // The worker records which broker user took the job, from the validated user_id.
    let owner: Option<String> = c
        .query_one(
            "SELECT started_by FROM provisioner_jobs WHERE id = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, Some(listed.name.clone()));
}

/// Runs `prebuildsctl` against the test's database and prefix with extra environment.
async fn ctl(db: &TestDb, broker: &TestBroker, args: &[&str], vars: &[(&str, &str)]) -> Output {
    tokio::process::Command::new(binary("prebuildsctl"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &broker.url)
        .env("PREBUILDS_AMQP_PREFIX", broker.prefix())
        .env("RUST_LOG", "warn")
        .env_remove("PREBUILDS_ACTOR")
        .envs(vars.iter().copied())
        .output()
        .await
        .expect("run prebuildsctl")
}

async fn ok(db: &TestDb, broker: &TestBroker, args: &[&str], vars: &[(&str, &str)]) -> Output {
    let out = ctl(db, broker, args, vars).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "prebuildsctl {args:?}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test]
async fn the_audit_log_records_who_pushed_paused_and_canceled() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let as_os_user = [("USER", "ops-on-call"), ("LOGNAME", "ops-on-call")];
    ok(&db, &broker, &["org", "create", "demo"], &as_os_user).await;
    // A user who leaves: deleted (claims for it are then forbidden); deleting again changes
    // nothing and leaves no entry.
    ok(
        &db,
        &broker,
        &[
            "user",
            "create",
            "--username",
            "gone",
            "--organization",
            "demo",
        ],
        &as_os_user,
    )
    .await;
    for _ in 0..2 {
        ok(
            &db,
            &broker,
            &["user", "delete", "--username", "gone", "--actor", "hr"],
            &as_os_user,
        )
        .await;
    }
    let c = db.pool.get().await.unwrap();
    let deleted: bool = c
        .query_one("SELECT deleted FROM users WHERE username = 'gone'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(deleted);
    let out = ctl(
        &db,
        &broker,
        &["user", "delete", "--username", "prebuilds"],
        &[],
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "the system user cannot be deleted"
    );
    let demo = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/demo-template.yaml"
    );
    // An actor given on the command line; the connection string on the command line too (it must
    // never be recorded).
    ok(
        &db,
        &broker,
        &[
            "template",
            "push",
            demo,
            "--actor",
            "release-bot",
            "--database-url",
            &db.url,
        ],
        &as_os_user,
    )
    .await;
    // The OS user by default.
    ok(
        &db,
        &broker,
        &["pause", "--template", "python-dev"],
        &as_os_user,
    )
    .await;
    // A job to cancel, and an actor from the environment.
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "jobs").await;
    let fx = fixtures::template_with_preset(&c, org, "tpl", Some(1)).await;
    let workspace = fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec {
            transition: "start",
            job_status: "pending",
            created_at: Utc::now(),
            ready: false,
        },
    )
    .await;
    let job: Uuid = fixtures::latest_job(&c, workspace).await;
    let mut vars = as_os_user.to_vec();
    vars.push(("PREBUILDS_ACTOR", "carol"));
    // A cancel that changes nothing (an unknown id rolls the whole command back): no entry.
    let out = ctl(
        &db,
        &broker,
        &[
            "jobs",
            "cancel",
            &job.to_string(),
            &Uuid::new_v4().to_string(),
        ],
        &vars,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    ok(&db, &broker, &["jobs", "cancel", &job.to_string()], &vars).await;
    // Read-only commands leave no entry.
    ok(&db, &broker, &["status"], &as_os_user).await;

    let out = ok(&db, &broker, &["audit", "--since", "1h", "--json"], &[]).await;
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    // Newest first.
    let entries: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["actor"].as_str().unwrap().to_owned(),
                r["os_user"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let entry = |a: &str, b: &str| (a.to_owned(), b.to_owned(), "ops-on-call".to_owned());
    assert_eq!(
        entries,
        vec![
            entry("jobs cancel", "carol"),
            entry("pause", "ops-on-call"),
            entry("template push", "release-bot"),
            entry("user delete", "hr"),
            entry("user create", "ops-on-call"),
            entry("org create", "ops-on-call"),
        ],
        "{rows:#?}"
    );
    assert_eq!(rows[0]["arguments"]["ids"], Value::String(job.to_string()));
    assert_eq!(rows[1]["arguments"]["template"], "python-dev");
    assert_eq!(rows[2]["arguments"]["file"], demo);
    assert_eq!(rows[3]["arguments"]["username"], "gone");
    assert_eq!(rows[4]["arguments"]["organizations"], "demo");
    assert_eq!(rows[5]["arguments"]["name"], "demo");
    // The database role that made the change is recorded by the database itself.
    assert_eq!(rows[0]["db_role"], "postgres");
    let all = String::from_utf8_lossy(&out.stdout);
    assert!(
        !all.contains("postgres://"),
        "a connection string was recorded: {all}"
    );

    // --since filters; a table for people.
    let out = ok(
        &db,
        &broker,
        &["audit", "--since", "2999-01-01T00:00:00Z"],
        &[],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "no audit entries"
    );
    let out = ok(&db, &broker, &["audit"], &[]).await;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("release-bot") && table.contains("template push"),
        "{table}"
    );
    let out = ctl(&db, &broker, &["audit", "--since", "yesterday"], &[]).await;
    assert_eq!(out.status.code(), Some(2));
}

/// A pending prebuild build of a fresh preset: its job id.
async fn pending_job(db: &TestDb, fx: &PresetFixture) -> Uuid {
    let c = db.pool.get().await.unwrap();
    let workspace = fixtures::prebuild(
        &c,
        fx,
        &PrebuildSpec {
            transition: "start",
            job_status: "pending",
            created_at: Utc::now(),
            ready: false,
        },
    )
    .await;
    fixtures::latest_job(&c, workspace).await
}

async fn agents(db: &TestDb, job: Uuid) -> Vec<String> {
    let c = db.pool.get().await.unwrap();
    c.query(
        "SELECT lifecycle_state FROM workspace_agents WHERE job_id = $1",
        &[&job],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
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

fn ready(job: Uuid) -> ProvisionerEvent {
    ProvisionerEvent::AgentLifecycle(AgentLifecycle {
        job_id: job,
        agent_name: "main".into(),
        lifecycle_state: AgentLifecycleState::Ready,
    })
}

#[tokio::test]
async fn a_job_belongs_to_the_broker_user_that_started_it_and_forged_events_change_nothing() {
    let db = TestDb::new().await;
    let ctx = EventsContext {
        pool: db.pool.clone(),
        metrics: WorkerMetrics::register(&prometheus::Registry::new()).unwrap(),
        outbox_waker: Arc::new(tokio::sync::Notify::new()),
        source: "test".into(),
        wakes_held_back: false,
    };
    let fx = pool(&db, 0).await;
    let job = pending_job(&db, &fx).await;
    let send = |event: ProvisionerEvent, publisher: Option<&'static str>| {
        let ctx = ctx.clone();
        async move {
            apply_from(&ctx, Uuid::new_v4(), &event, publisher)
                .await
                .unwrap()
        }
    };
    let started = ProvisionerEvent::JobStarted(JobStarted {
        job_id: job,
        started_at: Utc::now(),
    });
    assert_eq!(send(started, Some("prov-a")).await, Applied::Applied);
    let c = db.pool.get().await.unwrap();
    let owner: Option<String> = c
        .query_one(
            "SELECT started_by FROM provisioner_jobs WHERE id = $1",
            &[&job],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        owner.as_deref(),
        Some("prov-a"),
        "which provisioner took the job"
    );

    // Another broker user, or none at all, cannot complete the job or make its agent ready.
    for (what, forged, publisher) in [
        (
            "a completion from another user",
            completed(job, JobOutcome::Succeeded),
            Some("prov-b"),
        ),
        (
            "a completion without user_id",
            completed(job, JobOutcome::Succeeded),
            None,
        ),
        (
            "an agent ready from another user",
            ready(job),
            Some("prov-b"),
        ),
    ] {
        assert_eq!(send(forged, publisher).await, Applied::NotOwner, "{what}");
        assert_eq!(job_status(&db, job).await, "running", "{what}");
        assert!(agents(&db, job).await.is_empty(), "{what}");
    }
    assert_eq!(
        ctx.metrics
            .provisioner_events
            .with_label_values(&["job_completed", "not_owner"])
            .get(),
        2
    );
    // A refused event stays refused when redelivered (its id is recorded).
    let id = Uuid::new_v4();
    let forged = completed(job, JobOutcome::Failed);
    assert_eq!(
        apply_from(&ctx, id, &forged, Some("prov-b")).await.unwrap(),
        Applied::NotOwner
    );
    assert_eq!(
        apply_from(&ctx, id, &forged, Some("prov-a")).await.unwrap(),
        Applied::Duplicate
    );

    // The owner's events apply; afterwards the job is terminal and even the owner changes nothing.
    assert_eq!(
        send(completed(job, JobOutcome::Succeeded), Some("prov-a")).await,
        Applied::Applied
    );
    assert_eq!(send(ready(job), Some("prov-a")).await, Applied::Applied);
    assert_eq!(agents(&db, job).await, vec!["ready".to_owned()]);
    assert_eq!(
        send(completed(job, JobOutcome::Failed), Some("prov-a")).await,
        Applied::Stale
    );
    assert_eq!(job_status(&db, job).await, "succeeded");

    // A completion that comes before the job's start is not applied, nor recorded: the job stays
    // pending and the same event applies once the start has (reordered delivery stays harmless).
    let reordered = pending_job(&db, &fx).await;
    let early = Uuid::new_v4();
    let completion = completed(reordered, JobOutcome::Succeeded);
    let refused = apply_from(&ctx, early, &completion, Some("prov-a"))
        .await
        .unwrap_err();
    assert!(matches!(refused, EventError::NotYet { .. }), "{refused:?}");
    assert!(refused.to_string().contains("never started"), "{refused}");
    assert_eq!(job_status(&db, reordered).await, "pending");
    let start = ProvisionerEvent::JobStarted(JobStarted {
        job_id: reordered,
        started_at: Utc::now(),
    });
    assert_eq!(send(start, Some("prov-a")).await, Applied::Applied);
    assert_eq!(
        apply_from(&ctx, early, &completion, Some("prov-a"))
            .await
            .unwrap(),
        Applied::Applied
    );
    assert_eq!(job_status(&db, reordered).await, "succeeded");
}

/// Events that come before their step of the job, through the running worker: a completion that
/// overtook its start waits for it and then applies; a forged completion for a job that never
/// started, and a forged agent `ready` for a build still running, change nothing and are
/// dead-lettered with the reason once their deliveries run out.
#[tokio::test]
async fn events_before_their_step_wait_for_it_and_forged_ones_are_dead_lettered_with_the_reason() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let fx = pool(&db, 0).await;
    let (_worker, port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    probe::wait_ready(port).await;
    let provisioner = Publisher::new(&broker.url, "trust-test", broker.topology.clone());
    let publish = |event| publish_as_provisioner(&provisioner, event);
    let events = |result: &'static str| async move {
        let label = format!("result=\"{result}\"");
        probe::scrape_sum(port, "prebuilds_provisioner_events_total", &[&label])
            .await
            .expect("the worker's /metrics")
    };
    let start = |job| {
        ProvisionerEvent::JobStarted(JobStarted {
            job_id: job,
            started_at: Utc::now(),
        })
    };

    // 1. Reordered: the completion is seen (and deferred) before its start is even published.
    let job = pending_job(&db, &fx).await;
    publish(completed(job, JobOutcome::Succeeded)).await;
    wait_for(
        Duration::from_secs(15),
        "the early completion deferred",
        || async { events("deferred").await > 0.0 },
    )
    .await;
    assert_eq!(job_status(&db, job).await, "pending");
    publish(start(job)).await;
    wait_for(
        Duration::from_secs(30),
        "the completion applied after its start",
        || async { job_status(&db, job).await == "succeeded" },
    )
    .await;

    // 2. A completion for a job that never starts: dead-lettered with the reason, job untouched.
    let never_started = pending_job(&db, &fx).await;
    publish(completed(never_started, JobOutcome::Succeeded)).await;
    let (reason, _, _) = dead_letter(&broker).await;
    assert!(reason.contains("never started"), "{reason}");
    assert!(reason.contains("out of order"), "{reason}");
    assert_eq!(job_status(&db, never_started).await, "pending");

    // 3. An agent `ready` for a build that is running and never completes: dead-lettered, no agent.
    let running = pending_job(&db, &fx).await;
    publish(start(running)).await;
    wait_for(Duration::from_secs(15), "the job running", || async {
        job_status(&db, running).await == "running"
    })
    .await;
    publish(ready(running)).await;
    let (reason, _, _) = dead_letter(&broker).await;
    assert!(reason.contains("has not completed"), "{reason}");
    assert!(agents(&db, running).await.is_empty());
    assert_eq!(job_status(&db, running).await, "running");
    assert_eq!(agents(&db, job).await, vec!["created".to_owned()]);

    let out_of_order = probe::scrape_sum(
        port,
        "prebuilds_dead_lettered_total",
        &["reason=\"out_of_order\""],
    )
    .await;
    assert_eq!(out_of_order, Some(2.0));
}

/// Publishes a state event as a provisioner does, typed by its kind.
async fn publish_as_provisioner(provisioner: &Publisher, event: ProvisionerEvent) {
    let now = Utc::now();
    match event {
        ProvisionerEvent::JobStarted(e) => {
            provisioner
                .publish_event(&CloudEvent::new("test", now, e))
                .await
        }
        ProvisionerEvent::JobCompleted(e) => {
            provisioner
                .publish_event(&CloudEvent::new("test", now, e))
                .await
        }
        ProvisionerEvent::AgentLifecycle(e) => {
            provisioner
                .publish_event(&CloudEvent::new("test", now, e))
                .await
        }
        other => panic!("not published by this test: {other:?}"),
    }
    .unwrap();
}

/// A header of a delivery as text (empty when absent).
fn header_text(delivery: &lapin::message::Delivery, key: &str) -> String {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(key).cloned())
        .map(|v| match v {
            lapin::types::AMQPValue::LongString(s) => s.to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_dead_letter_replay_is_audited_with_the_messages_it_replayed() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    // A dead letter as a worker leaves one: a reconcile job with its reason, in `<prefix>.dead`.
    let message_id = Uuid::new_v4().to_string();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        DEAD_REASON_HEADER.into(),
        lapin::types::AMQPValue::LongString("schema: test".into()),
    );
    broker
        .channel
        .basic_publish(
            broker.topology.dead_letter_exchange().as_str().into(),
            "reconcile.preset".into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default()
                .with_message_id(message_id.as_str().into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the dead letter queued",
        || async {
            let out = ctl(&db, &broker, &["dead-letters", "list", "--json"], &[]).await;
            String::from_utf8_lossy(&out.stdout).contains(&message_id)
        },
    )
    .await;
    // Nothing replayed (an unknown id): no entry.
    let out = ctl(
        &db,
        &broker,
        &["dead-letters", "replay", "--id", "no-such-id"],
        &[("PREBUILDS_ACTOR", "dana")],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    ok(
        &db,
        &broker,
        &["dead-letters", "replay", "--id", &message_id],
        &[("PREBUILDS_ACTOR", "dana")],
    )
    .await;
    let out = ok(&db, &broker, &["audit", "--json"], &[]).await;
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["action"], "dead-letters replay");
    assert_eq!(rows[0]["actor"], "dana");
    assert_eq!(
        rows[0]["arguments"]["ids"],
        Value::String(message_id.clone())
    );
    assert_eq!(
        rows[0]["arguments"]["replayed"],
        Value::Array(vec![Value::String(message_id)])
    );
}
