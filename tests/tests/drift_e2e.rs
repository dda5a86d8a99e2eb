//! Resource replacement at claim time, end to end with the real binaries: a template pushed with
//! the CLI, a worker, and the provisioner with the real `terraform` backend (and with the sim
//! backend at replacement rate 1). The claim's plan replaces the workspace resource; the worker
//! logs WARN lines naming it, counts it, and notifies each template admin exactly once however often
//! the plan result is delivered.

use std::{process::Command, time::Duration};

use chrono::Utc;
use prebuilds_runtime::amqp::{rpc::RpcClient, Publisher};
use prebuilds_schemas::{
    ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent, PlanResult, ResourceReplacement,
};
use prebuilds_tests::{
    fixtures, probe,
    process::binary,
    stack::{self, pool_counts, wait_for},
    TestBroker, TestDb,
};
use uuid::Uuid;

const MAIN_TF: &str = r#"
variable "owner_name" { type = string }
resource "terraform_data" "workspace" {
  # A new owner forces a new resource: exactly the drift a claim must report.
  triggers_replace = [var.owner_name]
}
"#;

fn ctl(db: &TestDb, broker: &TestBroker, args: &[&str]) -> String {
    let out = Command::new(binary("prebuildsctl"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &broker.url)
        .env("PREBUILDS_AMQP_PREFIX", broker.prefix())
        .output()
        .expect("run prebuildsctl");
    assert!(
        out.status.success(),
        "prebuildsctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Pushes the drift template and returns (preset id, claimant id).
async fn world(db: &TestDb, broker: &TestBroker) -> (Uuid, Uuid) {
    let dir = tempdir();
    std::fs::write(dir.join("main.tf"), MAIN_TF).unwrap();
    std::fs::write(
        dir.join("template.yaml"),
        "organization: acme\ntemplate: drift\nversion: v1\nactivate: true\nsource: ./main.tf\n\
         presets:\n  - name: default\n    prebuilds:\n      instances: 1\n",
    )
    .unwrap();
    ctl(db, broker, &["org", "create", "acme"]);
    ctl(
        db,
        broker,
        &[
            "user",
            "create",
            "--username",
            "admin-a",
            "--role",
            "template-admin",
        ],
    );
    ctl(
        db,
        broker,
        &[
            "user",
            "create",
            "--username",
            "admin-b",
            "--role",
            "template-admin",
        ],
    );
    ctl(
        db,
        broker,
        &[
            "user",
            "create",
            "--username",
            "alice",
            "--organization",
            "acme",
        ],
    );
    ctl(
        db,
        broker,
        &[
            "template",
            "push",
            dir.join("template.yaml").to_str().unwrap(),
        ],
    );
    let c = db.pool.get().await.unwrap();
    let preset: Uuid = c
        .query_one("SELECT id FROM template_version_presets", &[])
        .await
        .unwrap()
        .get(0);
    let alice: Uuid = c
        .query_one("SELECT id FROM users WHERE username = 'alice'", &[])
        .await
        .unwrap()
        .get(0);
    (preset, alice)
}

/// A reconcile of the preset now, not at a tick (there is no scheduler here). Not `template
/// invalidate`: invalidating after the push's own reconcile had created the prebuild made that
/// prebuild unclaimable while the pool count still showed it ready, and the claim missed.
async fn request_a_reconcile(broker: &TestBroker, preset: Uuid) {
    let publisher = prebuilds_runtime::amqp::Publisher::new(
        &broker.url,
        "drift-reconcile",
        broker.topology.clone(),
    );
    prebuilds_tests::stack::request_reconcile(&publisher, preset).await;
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("prebuilds-drift-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn claim_and_check_the_drift_report(
    db: &TestDb,
    broker: &TestBroker,
    worker_port: u16,
    preset: Uuid,
    alice: Uuid,
    resource: &str,
) {
    wait_for(Duration::from_secs(60), "a ready prebuild", || async {
        pool_counts(db, preset).await.eligible == 1
    })
    .await;
    let rpc = RpcClient::connect(&broker.url, "drift", broker.topology.clone())
        .await
        .unwrap();
    let request = CloudEvent::new(
        "test",
        Utc::now(),
        ClaimRequest {
            user_id: alice,
            workspace_name: "alice-ws".into(),
            preset_id: Some(preset),
            template_id: None,
            parameters: vec![],
        },
    );
    let reply: CloudEvent<ClaimReply> = rpc.call(&request, Duration::from_secs(10)).await.unwrap();
    assert_eq!(reply.data.outcome, ClaimOutcome::Claimed);
    let job = reply.data.job_id.unwrap();
    let c = db.pool.get().await.unwrap();
    wait_for(
        Duration::from_secs(60),
        "one notification per template admin",
        || async {
            let n: i64 = c
                .query_one("SELECT count(*) FROM notification_messages", &[])
                .await
                .unwrap()
                .get(0);
            n == 2
        },
    )
    .await;
    let warns = fixtures::job_log_lines(&c, job, Some("warn")).await;
    assert!(
        warns.iter().any(|w| w.contains(resource)),
        "WARN lines name {resource}: {warns:?}"
    );
    // Delivered three more times (a provisioner retry re-sends under new ids): still one each.
    let publisher = Publisher::new(&broker.url, "again", broker.topology.clone());
    let plan_results = || async {
        let labels = ["kind=\"plan_result\""];
        probe::scrape_sum(worker_port, "prebuilds_provisioner_events_total", &labels)
            .await
            .unwrap_or(0.0)
    };
    let before = plan_results().await;
    for _ in 0..3 {
        let again = PlanResult {
            job_id: job,
            resource_replacements: vec![ResourceReplacement {
                resource: resource.into(),
                paths: vec!["triggers_replace".into()],
            }],
        };
        publisher
            .publish_event(&CloudEvent::new("test", Utc::now(), again))
            .await
            .unwrap();
    }
    // Barrier: the worker has judged all three (whatever it decided); only then is "still one
    // each" a fact rather than "not yet".
    wait_for(
        Duration::from_secs(30),
        "the three duplicates consumed",
        || async { plan_results().await >= before + 3.0 },
    )
    .await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM notification_messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let (_, metrics) = stack::http_get(worker_port, "/metrics").await.unwrap();
    assert!(
        metrics.contains("coderd_prebuilt_workspaces_resource_replacements_total{organization_name=\"acme\",preset_name=\"default\",template_name=\"drift\"} 1"),
        "{metrics}"
    );
    let notified: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE routing_key = 'notification.resource_replaced'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        notified, 2,
        "each notification published once through the outbox"
    );
}

#[tokio::test]
async fn a_claim_that_replaces_a_terraform_resource_warns_counts_and_notifies_each_admin_once() {
    let terraform = Command::new("terraform").arg("version").output();
    assert!(
        terraform.map(|o| o.status.success()).unwrap_or(false),
        "TERRAFORM IS NOT INSTALLED: this acceptance test needs the real `terraform` CLI on PATH"
    );
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (preset, alice) = world(&db, &broker).await;
    let (_worker, worker_port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    let workdir = tempdir();
    let state_url = db.terraform_state_url().await;
    let (_provisioner, _) = stack::start(
        "prebuilds-provisioner",
        &db,
        &broker,
        &[
            ("PREBUILDS_PROVISIONER_BACKEND", "terraform"),
            ("PREBUILDS_TERRAFORM_WORKDIR", workdir.to_str().unwrap()),
            ("PREBUILDS_TERRAFORM_STATE_DATABASE_URL", state_url.as_str()),
        ],
    );
    request_a_reconcile(&broker, preset).await;
    claim_and_check_the_drift_report(
        &db,
        &broker,
        worker_port,
        preset,
        alice,
        "terraform_data.workspace",
    )
    .await;
}

#[tokio::test]
async fn the_same_flow_passes_with_the_sim_backend_at_replacement_rate_one() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (preset, alice) = world(&db, &broker).await;
    let (_worker, worker_port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    let (_provisioner, _) = stack::start(
        "prebuilds-provisioner",
        &db,
        &broker,
        &[
            ("PREBUILDS_SIM_DURATION_MIN", "0s"),
            ("PREBUILDS_SIM_DURATION_MAX", "50ms"),
            ("PREBUILDS_SIM_AGENT_READY_DELAY", "0s"),
            ("PREBUILDS_SIM_REPLACEMENT_RATE", "1"),
        ],
    );
    request_a_reconcile(&broker, preset).await;
    // The sim reports one or two resources; the first is always the workspace container.
    claim_and_check_the_drift_report(
        &db,
        &broker,
        worker_port,
        preset,
        alice,
        "docker_container.workspace[0]",
    )
    .await;
}
