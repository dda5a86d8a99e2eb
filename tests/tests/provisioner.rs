//! `prebuilds-provisioner` end to end: the real binary against the real RabbitMQ (and, for the
//! terraform backend, the real PostgreSQL and the real `terraform` CLI). Each test has its own AMQP
//! prefix; the test plays the worker: it publishes provisioner jobs and reads the provisioner events
//! from `<prefix>.provisioner-events`.

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use prebuilds_runtime::amqp::{
    consumer::DEAD_REASON_HEADER, publisher::Outgoing, Publisher, QueueKind,
};
use prebuilds_schemas::{
    BuildStage, CloudEvent, Parameter, ProvisionerJob, RawEvent, Transition, PREBUILDS_USER_ID,
};
use prebuilds_tests::{fixtures, probe::http_get, Service, TestBroker, TestDb};
use serde_json::Value;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// Harness helpers (local to this file).

/// One event as the worker would see it.
#[derive(Debug, Clone, PartialEq)]
struct Received {
    id: Uuid,
    /// `job_started`, `job_log`, `plan_result`, `job_completed`, `agent_lifecycle`.
    kind: String,
    data: Value,
    routing_key: String,
}

impl Received {
    fn job_id(&self) -> Uuid {
        self.data["job_id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("every provisioner event carries a job_id")
    }

    /// `kind`, with the lifecycle state for agent events (`agent_lifecycle:ready`).
    fn label(&self) -> String {
        match self.kind.as_str() {
            "agent_lifecycle" => format!(
                "agent_lifecycle:{}",
                self.data["lifecycle_state"].as_str().unwrap_or("?")
            ),
            other => other.to_owned(),
        }
    }
}

/// Reads `<prefix>.provisioner-events` into memory as it arrives.
struct EventReader<'a> {
    broker: &'a TestBroker,
    queue: String,
    seen: Vec<Received>,
}

impl<'a> EventReader<'a> {
    fn new(broker: &'a TestBroker) -> Self {
        EventReader {
            broker,
            queue: broker.queue(QueueKind::ProvisionerEvents),
            seen: Vec::new(),
        }
    }

    /// Reads until `done(events of job)` holds; panics after `timeout` showing what arrived.
    async fn until(
        &mut self,
        job_id: Uuid,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.of(job_id);
            if done(&events) {
                return events;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; events of job {job_id}: {:?}",
                    labels(&events)
                );
            }
            self.read_for(Duration::from_millis(200)).await;
        }
    }

    /// Reads whatever arrives within `window`.
    async fn read_for(&mut self, window: Duration) {
        let Some(message) = self.broker.get(&self.queue, window).await else {
            return;
        };
        let delivery = message.delivery;
        let raw = RawEvent::parse(&delivery.data).expect("provisioner events are CloudEvents");
        assert_eq!(raw.specversion, "1.0");
        assert_eq!(raw.datacontenttype, "application/json");
        let kind = raw
            .event_type
            .strip_prefix("prebuilds.provisioner.")
            .and_then(|t| t.strip_suffix(".v1"))
            .unwrap_or_else(|| panic!("unexpected event type {}", raw.event_type))
            .to_owned();
        self.seen.push(Received {
            id: raw.id,
            kind,
            data: raw.data,
            routing_key: delivery.routing_key.to_string(),
        });
    }

    /// Drains for `window` (to check that nothing more arrives).
    async fn settle(&mut self, window: Duration) {
        let deadline = Instant::now() + window;
        while Instant::now() < deadline {
            self.read_for(Duration::from_millis(100)).await;
        }
    }

    fn of(&self, job_id: Uuid) -> Vec<Received> {
        self.seen
            .iter()
            .filter(|e| e.job_id() == job_id)
            .cloned()
            .collect()
    }
}

fn labels(events: &[Received]) -> Vec<String> {
    events.iter().map(Received::label).collect()
}

/// Labels with consecutive `job_log` batches collapsed into one.
fn shape(events: &[Received]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for label in labels(events) {
        if label == "job_log" && out.last().is_some_and(|l| l == "job_log") {
            continue;
        }
        out.push(label);
    }
    out
}

fn has(events: &[Received], label: &str) -> bool {
    events.iter().any(|e| e.label() == label)
}

fn count(events: &[Received], label: &str) -> usize {
    events.iter().filter(|e| e.label() == label).count()
}

fn the<'e>(events: &'e [Received], label: &str) -> &'e Received {
    let found: Vec<_> = events.iter().filter(|e| e.label() == label).collect();
    assert_eq!(found.len(), 1, "exactly one {label}: {:?}", labels(events));
    found[0]
}

fn log_lines(events: &[Received]) -> Vec<(String, String, String)> {
    events
        .iter()
        .filter(|e| e.kind == "job_log")
        .flat_map(|e| e.data["logs"].as_array().cloned().unwrap_or_default())
        .map(|l| {
            (
                l["level"].as_str().unwrap_or_default().to_owned(),
                l["stage"].as_str().unwrap_or_default().to_owned(),
                l["output"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn job(transition: Transition, stage: BuildStage, parameters: &[(&str, &str)]) -> ProvisionerJob {
    ProvisionerJob {
        job_id: Uuid::new_v4(),
        build_id: Uuid::new_v4(),
        workspace_id: Uuid::new_v4(),
        workspace_name: "prebuild-abcdefghijklmno".to_owned(),
        owner_id: PREBUILDS_USER_ID,
        owner_name: "prebuilds".to_owned(),
        template_id: Uuid::new_v4(),
        template_version_id: Uuid::new_v4(),
        preset_id: Some(Uuid::new_v4()),
        transition,
        build_number: 1,
        stage,
        orphan: false,
        parameters: parameters
            .iter()
            .map(|(name, value)| Parameter {
                name: (*name).to_owned(),
                value: (*value).to_owned(),
            })
            .collect(),
    }
}

/// The next build of the same workspace.
fn next_build(
    previous: &ProvisionerJob,
    transition: Transition,
    stage: BuildStage,
    parameters: &[(&str, &str)],
) -> ProvisionerJob {
    let mut next = job(transition, stage, parameters);
    next.workspace_id = previous.workspace_id;
    next.template_id = previous.template_id;
    next.template_version_id = previous.template_version_id;
    next.preset_id = previous.preset_id;
    next.build_number = previous.build_number + 1;
    next
}

async fn publish(publisher: &Publisher, job: &ProvisionerJob) -> CloudEvent<ProvisionerJob> {
    let event = CloudEvent::new("test", chrono::Utc::now(), job.clone());
    publish_again(publisher, &event).await;
    event
}

async fn publish_again(publisher: &Publisher, event: &CloudEvent<ProvisionerJob>) {
    let lane = match event.data.lane() {
        prebuilds_schemas::Lane::User => "user.",
        prebuilds_schemas::Lane::Prebuild => "",
    };
    assert_eq!(
        event.routing_key(),
        format!("provisioner.job.{lane}{}", event.data.transition.as_str())
    );
    publisher
        .publish_event(event)
        .await
        .expect("publish provisioner job");
}

/// The next dead letter of the broker's prefix: its `x-prebuilds-dead-reason` and its body.
async fn dead_letter(broker: &TestBroker) -> (String, Vec<u8>) {
    let dead = broker
        .get(&broker.topology.dead_queue(), WAIT)
        .await
        .expect("a dead letter");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    let Some(lapin::types::AMQPValue::LongString(reason)) = headers.inner().get(DEAD_REASON_HEADER)
    else {
        panic!("a string reason header: {headers:?}");
    };
    (
        String::from_utf8_lossy(reason.as_bytes()).into_owned(),
        dead.delivery.data.clone(),
    )
}

use prebuilds_tests::stack::free_port;

/// Starts the real binary on the broker's prefix with `args` added.
fn provisioner(
    broker: &TestBroker,
    metrics_port: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> Service {
    let addr = format!("127.0.0.1:{metrics_port}");
    let mut all = vec!["--amqp-prefix", broker.prefix(), "--metrics-addr", &addr];
    all.extend_from_slice(args);
    let mut environment = vec![("AMQP_URL", broker.url.as_str()), ("RUST_LOG", "info")];
    environment.extend_from_slice(env);
    Service::start("prebuilds-provisioner", &all, &environment)
}

/// The value of one sample line of `/metrics` (`name{labels}` as printed), 0 when absent.
async fn metric(port: u16, series: &str) -> f64 {
    let (_, body) = http_get(port, "/metrics").await.expect("GET /metrics");
    body.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_ready(port: u16) {
    prebuilds_tests::eventually(WAIT, "provisioner /readyz = 200", || async {
        let (status, _) = http_get(port, "/readyz").await?;
        (status == 200).then_some(())
    })
    .await;
}

fn test_publisher(broker: &TestBroker) -> Publisher {
    Publisher::new(&broker.url, "test-jobs", broker.topology.clone())
}

const FAST_SIM: [&str; 6] = [
    "--sim-duration-min",
    "0",
    "--sim-duration-max",
    "50ms",
    "--sim-agent-ready-delay",
    "0",
];

// ---------------------------------------------------------------------------------------------
// Simulated backend.

#[tokio::test]
async fn sim_start_build_publishes_its_events_in_order_and_drains_on_sigterm() {
    let broker = TestBroker::new().await;
    let port = free_port();
    let mut service = provisioner(
        &broker,
        port,
        &[
            "--sim-duration-min",
            "50ms",
            "--sim-duration-max",
            "200ms",
            "--sim-agent-ready-delay",
            "300ms",
        ],
        &[],
    );
    wait_ready(port).await;
    let publisher = test_publisher(&broker);
    let mut reader = EventReader::new(&broker);
    let job = job(Transition::Start, BuildStage::Create, &[("cpus", "8")]);
    publish(&publisher, &job).await;

    let events = reader
        .until(job.job_id, WAIT, "agent ready", |e| {
            has(e, "agent_lifecycle:ready")
        })
        .await;
    assert_eq!(
        shape(&events),
        [
            "job_started",
            "job_log",
            "plan_result",
            "job_log",
            "job_completed",
            "agent_lifecycle:starting",
            "agent_lifecycle:ready"
        ],
        "documented order"
    );
    for e in &events {
        assert_eq!(e.job_id(), job.job_id);
        assert_eq!(e.routing_key, format!("provisioner.event.{}", e.kind));
        assert_eq!(e.id.get_version_num(), 5, "deterministic (UUID v5) ids");
    }
    let unique: HashSet<_> = events.iter().map(|e| e.id).collect();
    assert_eq!(unique.len(), events.len(), "ids are unique within a job");

    let completed = the(&events, "job_completed");
    assert_eq!(completed.data["status"], "succeeded");
    assert!(completed.data["error"].is_null());
    assert_eq!(
        completed.data["agents"],
        serde_json::json!([{"name": "main"}])
    );
    assert_eq!(
        the(&events, "plan_result").data["resource_replacements"],
        serde_json::json!([]),
        "a create build replaces nothing"
    );
    let ready = the(&events, "agent_lifecycle:ready");
    assert_eq!(ready.data["agent_name"], "main");
    assert!(log_lines(&events)
        .iter()
        .any(|(_, stage, output)| stage == "apply" && output.contains("Apply complete")));

    // Acknowledged only after everything was confirmed: nothing is left on the job queue.
    assert!(broker
        .get(
            &broker.queue(QueueKind::ProvisionerJobs),
            Duration::from_millis(300)
        )
        .await
        .is_none());
    assert_eq!(
        metric(
            port,
            "prebuilds_provisioner_jobs_total{status=\"succeeded\",transition=\"start\"}"
        )
        .await,
        1.0
    );

    // SIGTERM with a job in flight: it finishes, is acknowledged, and the process exits cleanly.
    let slow = next_build(&job, Transition::Stop, BuildStage::None, &[]);
    publish(&publisher, &slow).await;
    reader
        .until(slow.job_id, WAIT, "stop build started", |e| {
            has(e, "job_started")
        })
        .await;
    let status = service
        .terminate(Duration::from_secs(20))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    let events = reader
        .until(slow.job_id, WAIT, "in-flight stop build completed", |e| {
            has(e, "job_completed")
        })
        .await;
    assert_eq!(the(&events, "job_completed").data["status"], "succeeded");
    assert_eq!(
        the(&events, "job_completed").data["agents"],
        serde_json::json!([])
    );
    assert!(
        !has(&events, "plan_result"),
        "plan_result is for start builds"
    );
    assert!(broker
        .get(
            &broker.queue(QueueKind::ProvisionerJobs),
            Duration::from_millis(300)
        )
        .await
        .is_none());
}

#[tokio::test]
async fn sim_failure_rate_one_fails_start_builds_without_agents() {
    let broker = TestBroker::new().await;
    let port = free_port();
    let mut args = FAST_SIM.to_vec();
    args.extend(["--sim-failure-rate", "1.0"]);
    let _service = provisioner(&broker, port, &args, &[]);
    let publisher = test_publisher(&broker);
    let mut reader = EventReader::new(&broker);
    let job = job(Transition::Start, BuildStage::Create, &[]);
    publish(&publisher, &job).await;

    reader
        .until(job.job_id, WAIT, "job_completed", |e| {
            has(e, "job_completed")
        })
        .await;
    reader.settle(Duration::from_millis(700)).await;
    let events = reader.of(job.job_id);
    let completed = the(&events, "job_completed");
    assert_eq!(completed.data["status"], "failed");
    let error = completed.data["error"].as_str().unwrap_or_default();
    assert!(error.contains("simulated failure"), "{error}");
    assert_eq!(completed.data["agents"], serde_json::json!([]));
    assert!(
        !events.iter().any(|e| e.kind == "agent_lifecycle"),
        "no agent of a failed build: {:?}",
        labels(&events)
    );
    assert!(log_lines(&events)
        .iter()
        .any(|(level, _, output)| level == "error" && output.contains("simulated failure")));
    assert_eq!(
        metric(
            port,
            "prebuilds_provisioner_jobs_total{status=\"failed\",transition=\"start\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_redelivered_job_republishes_the_same_event_ids_and_runs_once() {
    let broker = TestBroker::new().await;
    let port = free_port();
    let _service = provisioner(
        &broker,
        port,
        &[
            "--concurrency",
            "4",
            "--sim-duration-min",
            "100ms",
            "--sim-duration-max",
            "300ms",
            "--sim-agent-ready-delay",
            "100ms",
        ],
        &[],
    );
    let publisher = test_publisher(&broker);
    let mut reader = EventReader::new(&broker);

    // Redelivered after it finished.
    let job_a = job(Transition::Start, BuildStage::Create, &[]);
    let message = publish(&publisher, &job_a).await;
    let first = reader
        .until(job_a.job_id, WAIT, "first run", |e| {
            has(e, "agent_lifecycle:ready")
        })
        .await;
    publish_again(&publisher, &message).await;
    let both = reader
        .until(job_a.job_id, WAIT, "republication", |e| {
            count(e, "agent_lifecycle:ready") == 2
        })
        .await;
    let second = &both[first.len()..];
    assert_eq!(
        first.iter().map(|e| e.id).collect::<Vec<_>>(),
        second.iter().map(|e| e.id).collect::<Vec<_>>(),
        "same ids, same order"
    );
    // Same timestamps too: the recorded outcome was republished, the build did not run again.
    assert_eq!(first, second);

    // Two deliveries at once: the second waits for the first, then republishes its record.
    let job_b = job(Transition::Start, BuildStage::Create, &[]);
    let message = publish(&publisher, &job_b).await;
    publish_again(&publisher, &message).await;
    let events = reader
        .until(job_b.job_id, WAIT, "both deliveries answered", |e| {
            count(e, "agent_lifecycle:ready") == 2
        })
        .await;
    let mut per_id: HashMap<Uuid, usize> = HashMap::new();
    for e in &events {
        *per_id.entry(e.id).or_default() += 1;
    }
    assert!(per_id.values().all(|n| *n == 2), "{per_id:?}");
    assert_eq!(count(&events, "job_started"), 2);
    assert_eq!(events[..events.len() / 2], events[events.len() / 2..]);

    assert_eq!(
        metric(
            port,
            "prebuilds_provisioner_jobs_total{status=\"succeeded\",transition=\"start\"}"
        )
        .await,
        2.0,
        "each job executed once"
    );
    assert_eq!(
        metric(port, "prebuilds_provisioner_jobs_replayed_total").await,
        2.0
    );
}

#[tokio::test]
async fn a_job_rerun_after_a_crash_publishes_the_same_ids() {
    let broker = TestBroker::new().await;
    // The first process dies while waiting for the agent to become ready (job not yet acked).
    let mut first_process = provisioner(
        &broker,
        free_port(),
        &[
            "--sim-duration-min",
            "0",
            "--sim-duration-max",
            "100ms",
            "--sim-agent-ready-delay",
            "1h",
        ],
        &[],
    );
    let publisher = test_publisher(&broker);
    let mut reader = EventReader::new(&broker);
    let job = job(Transition::Start, BuildStage::Claim, &[]);
    publish(&publisher, &job).await;
    let before = reader
        .until(job.job_id, WAIT, "agent starting", |e| {
            has(e, "agent_lifecycle:starting")
        })
        .await;
    first_process.kill().await;

    // Another process (no memory of the job) gets the redelivery and runs it again.
    let _second_process = provisioner(&broker, free_port(), &FAST_SIM, &[]);
    let all = reader
        .until(job.job_id, WAIT, "rerun finished", |e| {
            has(e, "agent_lifecycle:ready")
        })
        .await;
    let rerun = &all[before.len()..];
    assert_eq!(
        before.iter().map(|e| e.id).collect::<Vec<_>>(),
        rerun[..before.len()]
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>(),
        "the rerun republishes the same ids: {:?} vs {:?}",
        labels(&before),
        labels(rerun)
    );
    assert_eq!(
        the(&before, "job_completed").data["status"],
        rerun
            .iter()
            .find(|e| e.kind == "job_completed")
            .expect("rerun completed")
            .data["status"],
        "same seed and job id → same outcome"
    );
}

#[tokio::test]
async fn an_orphan_delete_succeeds_at_once() {
    let broker = TestBroker::new().await;
    // Builds would take 20 s: an orphan delete must not wait for any of it.
    let _service = provisioner(
        &broker,
        free_port(),
        &["--sim-duration-min", "20s", "--sim-duration-max", "20s"],
        &[],
    );
    let publisher = test_publisher(&broker);
    let mut reader = EventReader::new(&broker);
    let mut orphan = job(Transition::Delete, BuildStage::None, &[]);
    orphan.orphan = true;
    let started = Instant::now();
    publish(&publisher, &orphan).await;
    let events = reader
        .until(orphan.job_id, WAIT, "orphan delete completed", |e| {
            has(e, "job_completed")
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(shape(&events), ["job_started", "job_log", "job_completed"]);
    let completed = the(&events, "job_completed");
    assert_eq!(completed.data["status"], "succeeded");
    assert_eq!(completed.data["agents"], serde_json::json!([]));
    assert!(log_lines(&events)
        .iter()
        .any(|(_, _, output)| output.contains("nothing to destroy")));
}

#[tokio::test]
async fn a_claim_build_with_replacement_rate_one_reports_replacements() {
    let broker = TestBroker::new().await;
    let mut args = FAST_SIM.to_vec();
    args.extend(["--sim-replacement-rate", "1"]);
    let _service = provisioner(&broker, free_port(), &args, &[]);
    let publisher = test_publisher(&broker);
    let mut reader = EventReader::new(&broker);

    let create = job(Transition::Start, BuildStage::Create, &[]);
    let mut claim = next_build(&create, Transition::Start, BuildStage::Claim, &[]);
    claim.owner_id = Uuid::new_v4();
    claim.owner_name = "alice".into();
    publish(&publisher, &create).await;
    publish(&publisher, &claim).await;

    let created = reader
        .until(create.job_id, WAIT, "create finished", |e| {
            has(e, "job_completed")
        })
        .await;
    assert_eq!(
        the(&created, "plan_result").data["resource_replacements"],
        serde_json::json!([]),
        "only claim builds replace"
    );
    let claimed = reader
        .until(claim.job_id, WAIT, "claim finished", |e| {
            has(e, "agent_lifecycle:ready")
        })
        .await;
    let replacements = the(&claimed, "plan_result").data["resource_replacements"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!((1..=2).contains(&replacements.len()), "{replacements:?}");
    assert_eq!(replacements[0]["resource"], "docker_container.workspace[0]");
    for r in &replacements {
        let paths = r["paths"].as_array().expect("paths");
        assert!(!paths.is_empty(), "{r}");
    }
    assert!(
        log_lines(&claimed)
            .iter()
            .any(|(level, stage, output)| level == "warn"
                && stage == "plan"
                && output.contains("forces replacement")),
        "{:?}",
        log_lines(&claimed)
    );
    assert_eq!(the(&claimed, "job_completed").data["status"], "succeeded");
}

#[tokio::test]
async fn an_undecodable_job_is_dead_lettered_with_the_reason() {
    let broker = TestBroker::new().await;
    let _service = provisioner(&broker, free_port(), &FAST_SIM, &[]);
    let publisher = test_publisher(&broker);
    let exchange = broker.topology.exchange();
    publisher
        .publish(Outgoing::new(
            &exchange,
            "provisioner.job.start",
            b"{\"not\":\"a job\"}",
        ))
        .await
        .unwrap();
    let (reason, _) = dead_letter(&broker).await;
    assert!(
        reason.contains("not a CloudEvents 1.0 envelope"),
        "{reason}"
    );
    // Dead-lettered, not retried: nothing is left on the job queue and no event was published.
    assert!(broker
        .get(
            &broker.queue(QueueKind::ProvisionerJobs),
            Duration::from_millis(300)
        )
        .await
        .is_none());
    assert!(broker
        .get(
            &broker.queue(QueueKind::ProvisionerEvents),
            Duration::from_millis(300)
        )
        .await
        .is_none());
}

// ---------------------------------------------------------------------------------------------
// Terraform backend.

/// A template using only the built-in `terraform_data` resource (no provider download): the
/// container's `triggers_replace` follows the `image` build parameter, so changing it at claim
/// replaces the resource.
const TEMPLATE: &str = r#"
variable "image" {
  type = string
}
variable "owner_name" {
  type = string
}
variable "transition" {
  type = string
}
resource "terraform_data" "workspace" {
  count            = var.transition == "start" ? 1 : 0
  triggers_replace = [var.image]
  input            = var.owner_name
}
resource "terraform_data" "home" {
  input = "home volume"
}
output "agents" {
  value = ["main"]
}
"#;

fn terraform_available() -> bool {
    let found = std::process::Command::new("terraform")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!(
            "\n!!!!!!!! `terraform` is NOT INSTALLED on this machine: the terraform backend test \
             is SKIPPED, not passed !!!!!!!!\n"
        );
    }
    found
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("prebuilds-tf-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What every terraform test starts from: a fresh database and broker, and the provisioner binary
/// on the terraform backend in its own working directory (`extra` flags appended), ready. `None`,
/// with a loud note, when terraform is not installed.
struct TerraformRig {
    db: TestDb,
    broker: TestBroker,
    workdir: TempDir,
    port: u16,
    service: Service,
    publisher: Publisher,
}

async fn terraform_rig(extra: &[&str]) -> Option<TerraformRig> {
    terraform_rig_with(extra, &[], None).await
}

/// [`terraform_rig`] with extra environment for the provisioner and, when `database_password` is
/// given, that password in its DATABASE_URL (PostgreSQL here trusts local connections, so any
/// password works: it only marks the URL).
async fn terraform_rig_with(
    extra: &[&str],
    env: &[(&str, &str)],
    database_password: Option<&str>,
) -> Option<TerraformRig> {
    if !terraform_available() {
        return None;
    }
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let workdir = TempDir::new();
    let port = free_port();
    let dir = workdir.0.to_str().expect("utf-8 path").to_owned();
    let mut args = vec![
        "--backend",
        "terraform",
        "--terraform-workdir",
        dir.as_str(),
    ];
    args.extend_from_slice(extra);
    let database_url = match database_password {
        Some(password) => format!("{}?password={password}", db.url),
        None => db.url.clone(),
    };
    let state_url = db.terraform_state_url().await;
    let mut environment = vec![
        ("DATABASE_URL", database_url.as_str()),
        ("PREBUILDS_TERRAFORM_STATE_DATABASE_URL", state_url.as_str()),
    ];
    environment.extend_from_slice(env);
    let service = provisioner(&broker, port, &args, &environment);
    wait_ready(port).await;
    let publisher = test_publisher(&broker);
    Some(TerraformRig {
        db,
        broker,
        workdir,
        port,
        service,
        publisher,
    })
}

/// A prebuild create job (build 1, `start`) of template version `version`.
fn create_job(version: Uuid, parameters: &[(&str, &str)]) -> ProvisionerJob {
    let mut create = job(Transition::Start, BuildStage::Create, parameters);
    create.template_version_id = version;
    create
}

/// Inserts a template version with `source` (None: a version without source).
async fn template_version(db: &TestDb, source: Option<&str>) -> Uuid {
    let client = db.pool.get().await.expect("db");
    let unique = Uuid::new_v4().simple().to_string();
    let org = fixtures::organization(&client, &format!("org-{unique}")).await;
    let fixture =
        fixtures::template_with_preset(&client, org, &format!("tf-{unique}"), Some(1)).await;
    client
        .execute(
            "UPDATE template_versions SET source = $1 WHERE id = $2",
            &[&source, &fixture.version_id],
        )
        .await
        .expect("set source");
    fixture.version_id
}

/// Records `job` as the worker would have, in full: its job row, its workspace (once) and its
/// `workspace_builds` row with its parameters, where a later delete build's variables come from.
async fn record_build(db: &TestDb, job: &ProvisionerJob) {
    job_row(db, job.job_id, "pending", false).await;
    let client = db.pool.get().await.expect("db");
    let parameters = serde_json::to_value(&job.parameters).expect("parameters serialise");
    client
        .execute(
            "INSERT INTO workspaces (id, owner_id, organization_id, template_id, name)
             SELECT $1, $2, t.organization_id, t.id, $3
             FROM template_versions v JOIN templates t ON t.id = v.template_id
             WHERE v.id = $4
             ON CONFLICT (id) DO NOTHING",
            &[
                &job.workspace_id,
                &PREBUILDS_USER_ID,
                &job.workspace_name,
                &job.template_version_id,
            ],
        )
        .await
        .expect("insert workspace");
    client
        .execute(
            "INSERT INTO workspace_builds (id, workspace_id, template_version_id, build_number,
                                           transition, initiator_id, job_id, parameters)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &job.build_id,
                &job.workspace_id,
                &job.template_version_id,
                &job.build_number,
                &job.transition.as_str(),
                &PREBUILDS_USER_ID,
                &job.job_id,
                &parameters,
            ],
        )
        .await
        .expect("insert workspace build");
}

/// The terraform state rows of the test's database (the pg store's table, whatever its schema):
/// (name, whether it records a resource named `resource`).
async fn terraform_states(db: &TestDb, resource: &str) -> Vec<(String, bool)> {
    let client = db.pool.get().await.expect("db");
    let schemas: Vec<String> = client
        .query(
            "SELECT table_schema::text FROM information_schema.tables WHERE table_name = 'states'",
            &[],
        )
        .await
        .expect("find the state table")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut states = Vec::new();
    for schema in schemas {
        let rows = client
            .query(
                &format!("SELECT name, coalesce(data, '') FROM {schema}.states ORDER BY id"),
                &[],
            )
            .await
            .expect("read the states");
        for row in rows {
            let data: String = row.get(1);
            states.push((
                row.get(0),
                data.contains(&format!("\"name\": \"{resource}\"")),
            ));
        }
    }
    states
}

/// Publishes `job` as a worker would have made it: with its `provisioner_jobs` row (`pending`
/// unless the test made it already), which a provisioner with database access requires
/// (admission: a job without a row is refused).
async fn submit(
    db: &TestDb,
    publisher: &Publisher,
    job: &ProvisionerJob,
) -> CloudEvent<ProvisionerJob> {
    job_row(db, job.job_id, "pending", false).await;
    publish(publisher, job).await
}

#[tokio::test]
async fn terraform_backend_creates_reports_replacements_at_claim_and_destroys() {
    let Some(rig) = terraform_rig(&["--terraform-timeout", "2m"]).await else {
        return;
    };
    let (db, workdir, publisher) = (&rig.db, &rig.workdir, &rig.publisher);
    let version = template_version(db, Some(TEMPLATE)).await;
    let mut reader = EventReader::new(&rig.broker);

    // 1. The prebuild is created.
    let create = create_job(version, &[("image", "ubuntu")]);
    let started = Instant::now();
    record_build(db, &create).await;
    submit(db, publisher, &create).await;
    let events = reader
        .until(
            create.job_id,
            Duration::from_secs(120),
            "create build",
            |e| {
                has(e, "agent_lifecycle:ready")
                    || (has(e, "job_completed")
                        && the(e, "job_completed").data["status"] != "succeeded")
            },
        )
        .await;
    eprintln!("terraform create build took {:?}", started.elapsed());
    let completed = the(&events, "job_completed");
    assert_eq!(
        completed.data["status"],
        "succeeded",
        "{completed:?}\n{:#?}",
        log_lines(&events)
    );
    assert_eq!(
        completed.data["agents"],
        serde_json::json!([{"name": "main"}])
    );
    assert_eq!(
        the(&events, "plan_result").data["resource_replacements"],
        serde_json::json!([])
    );
    let lines = log_lines(&events);
    assert!(
        lines
            .iter()
            .any(|(_, s, o)| s == "init" && o.contains("initialized")),
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|(_, s, o)| s == "apply" && o.contains("Apply complete! Resources: 2 added")),
        "{lines:#?}"
    );
    // The state is in PostgreSQL (the default store), one terraform workspace per workspace;
    // nothing of it on this replica's disk.
    assert_eq!(
        terraform_states(db, "workspace").await,
        [(create.workspace_id.to_string(), true)]
    );
    let local = workdir.0.join(create.workspace_id.to_string());
    assert!(!local.join("terraform.tfstate").exists());
    assert!(!local.join("terraform.tfstate.d").exists());

    // 2. The claim changes the image: the container is replaced.
    let mut claim = next_build(
        &create,
        Transition::Start,
        BuildStage::Claim,
        &[("image", "debian")],
    );
    claim.owner_id = Uuid::new_v4();
    claim.owner_name = "alice".into();
    let started = Instant::now();
    record_build(db, &claim).await;
    submit(db, publisher, &claim).await;
    let events = reader
        .until(claim.job_id, Duration::from_secs(120), "claim build", |e| {
            has(e, "agent_lifecycle:ready")
                || (has(e, "job_completed")
                    && the(e, "job_completed").data["status"] != "succeeded")
        })
        .await;
    eprintln!("terraform claim build took {:?}", started.elapsed());
    assert_eq!(
        the(&events, "job_completed").data["status"],
        "succeeded",
        "{:#?}",
        log_lines(&events)
    );
    assert_eq!(
        the(&events, "plan_result").data["resource_replacements"],
        serde_json::json!([{"resource": "terraform_data.workspace[0]", "paths": ["triggers_replace"]}])
    );
    assert_eq!(
        shape(&events)[..3],
        ["job_started", "job_log", "plan_result"],
        "plan_result follows the plan's log"
    );
    let lines = log_lines(&events);
    assert!(
        lines
            .iter()
            .any(|(_, s, o)| s == "plan"
                && o.contains("terraform_data.workspace[0] must be replaced")),
        "{lines:#?}"
    );

    // 3. Delete: no parameters (the previous build's are reused: `image` has no default, so
    //    without them the destroy fails), state destroyed and its row gone.
    let delete = next_build(&claim, Transition::Delete, BuildStage::None, &[]);
    let started = Instant::now();
    record_build(db, &delete).await;
    submit(db, publisher, &delete).await;
    let events = reader
        .until(
            delete.job_id,
            Duration::from_secs(120),
            "delete build",
            |e| has(e, "job_completed"),
        )
        .await;
    eprintln!("terraform delete build took {:?}", started.elapsed());
    assert_eq!(
        the(&events, "job_completed").data["status"],
        "succeeded",
        "{:#?}",
        log_lines(&events)
    );
    assert!(!has(&events, "plan_result"));
    let lines = log_lines(&events);
    assert!(
        lines
            .iter()
            .any(|(_, s, o)| s == "destroy"
                && o.contains("Destroy complete! Resources: 2 destroyed")),
        "{lines:#?}"
    );
    assert!(
        !workdir.0.join(delete.workspace_id.to_string()).exists(),
        "working directory removed after destroy"
    );
    assert_eq!(terraform_states(db, "workspace").await, []);
}

#[tokio::test]
async fn terraform_failures_are_reported_with_terraforms_error() {
    let Some(rig) = terraform_rig(&[]).await else {
        return;
    };
    let needs_image = template_version(&rig.db, Some(TEMPLATE)).await;
    let without_source = template_version(&rig.db, None).await;
    let mut reader = EventReader::new(&rig.broker);

    // A required variable is missing.
    let missing_var = create_job(needs_image, &[]);
    // No source at all.
    let no_source = create_job(without_source, &[]);
    submit(&rig.db, &rig.publisher, &missing_var).await;
    submit(&rig.db, &rig.publisher, &no_source).await;

    for (job, expected) in [
        (&missing_var, "No value for required variable"),
        (&no_source, "has no Terraform source"),
    ] {
        reader
            .until(job.job_id, Duration::from_secs(120), "failed build", |e| {
                has(e, "job_completed")
            })
            .await;
        reader.settle(Duration::from_millis(300)).await;
        let events = reader.of(job.job_id);
        let completed = the(&events, "job_completed");
        assert_eq!(completed.data["status"], "failed");
        let error = completed.data["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{error}");
        assert_eq!(completed.data["agents"], serde_json::json!([]));
        assert!(!events.iter().any(|e| e.kind == "agent_lifecycle"));
    }
}

/// A template whose apply runs a command for `var.seconds` (the built-in `local-exec`
/// provisioner: still no provider download).
const SLOW_TEMPLATE: &str = r#"
variable "seconds" {
  type    = string
  default = "60"
}
resource "terraform_data" "slow" {
  provisioner "local-exec" {
    command = "sleep ${var.seconds}"
  }
}
"#;

#[tokio::test]
async fn terraform_invocations_are_bounded_by_the_timeout() {
    let Some(rig) = terraform_rig(&["--terraform-timeout", "3s"]).await else {
        return;
    };
    let version = template_version(&rig.db, Some(SLOW_TEMPLATE)).await;
    let mut reader = EventReader::new(&rig.broker);
    let slow = create_job(version, &[]);
    let started = Instant::now();
    submit(&rig.db, &rig.publisher, &slow).await;
    let events = reader
        .until(
            slow.job_id,
            Duration::from_secs(60),
            "timed-out build",
            |e| has(e, "job_completed"),
        )
        .await;
    let completed = the(&events, "job_completed");
    assert_eq!(completed.data["status"], "failed");
    let error = completed.data["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("terraform apply timed out after 3s"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the sleep was cut short: {:?}",
        started.elapsed()
    );
}

/// Submits a create of [`SLOW_TEMPLATE`] and reads its events until terraform is in the apply's
/// minute-long `local-exec`.
async fn slow_apply_running<'b>(
    db: &TestDb,
    publisher: &Publisher,
    broker: &'b TestBroker,
) -> (ProvisionerJob, EventReader<'b>) {
    let version = template_version(db, Some(SLOW_TEMPLATE)).await;
    let slow = create_job(version, &[]);
    submit(db, publisher, &slow).await;
    let mut reader = EventReader::new(broker);
    reader
        .until(slow.job_id, Duration::from_secs(60), "apply running", |e| {
            log_lines(e).iter().any(|(_, stage, output)| {
                stage == "apply" && output.contains("Provisioning with 'local-exec'")
            })
        })
        .await;
    (slow, reader)
}

#[tokio::test]
async fn shutdown_interrupts_a_long_terraform_build_and_requeues_its_job() {
    let Some(mut rig) = terraform_rig(&["--shutdown-timeout", "6s"]).await else {
        return;
    };
    let (slow, mut reader) = slow_apply_running(&rig.db, &rig.publisher, &rig.broker).await;
    let stopping = Instant::now();
    let status = rig
        .service
        .terminate(Duration::from_secs(20))
        .await
        .expect("exits within the bound");
    assert!(status.success(), "{status:?}");
    assert!(
        stopping.elapsed() < Duration::from_secs(12),
        "{:?}",
        stopping.elapsed()
    );
    reader.settle(Duration::from_millis(300)).await;
    assert!(
        !has(&reader.of(slow.job_id), "job_completed"),
        "an interrupted build has no outcome: {:?}",
        labels(&reader.of(slow.job_id))
    );
    let requeued = rig
        .broker
        .get(
            &rig.broker.queue(QueueKind::ProvisionerJobs),
            Duration::from_secs(5),
        )
        .await
        .expect("the interrupted job is back on its queue");
    let again: CloudEvent<ProvisionerJob> =
        serde_json::from_slice(&requeued.delivery.data).expect("a job");
    assert_eq!(again.data.job_id, slow.job_id);
}

/// A template whose apply prints terraform's whole environment (`env` through the built-in
/// `local-exec` provisioner: no provider download).
const ENV_TEMPLATE: &str = r#"
resource "terraform_data" "env" {
  provisioner "local-exec" {
    command = "env"
  }
}
"#;

#[tokio::test]
async fn terraform_runs_without_the_provisioners_secrets() {
    // Distinctive values: a password in DATABASE_URL and a secret in one of our own settings
    // (neither may reach terraform), a variable the operator lets through, one nobody listed, and
    // one of terraform's own `TF_*`.
    let leak = format!("tf-leak-{}", Uuid::new_v4().simple());
    let passed = format!("passed-{}", Uuid::new_v4().simple());
    let unlisted = format!("unlisted-{}", Uuid::new_v4().simple());
    let Some(rig) = terraform_rig_with(
        &[
            "--terraform-timeout",
            "2m",
            "--terraform-pass-env",
            "TEST_PASSED_THROUGH",
        ],
        &[
            ("PREBUILDS_TEST_SECRET_MARKER", leak.as_str()),
            ("TEST_PASSED_THROUGH", passed.as_str()),
            ("TEST_NOT_LISTED", unlisted.as_str()),
            ("TF_X_TEST_SETTING", "operator-tf-setting"),
        ],
        Some(&leak),
    )
    .await
    else {
        return;
    };
    let version = template_version(&rig.db, Some(ENV_TEMPLATE)).await;
    let mut reader = EventReader::new(&rig.broker);
    let create = create_job(version, &[]);
    submit(&rig.db, &rig.publisher, &create).await;
    reader
        .until(create.job_id, Duration::from_secs(120), "env build", |e| {
            has(e, "job_completed")
        })
        .await;
    reader.settle(Duration::from_millis(300)).await;
    let events = reader.of(create.job_id);
    let lines = log_lines(&events);
    // The build read its source through the marked DATABASE_URL: the secret was really there.
    assert_eq!(
        the(&events, "job_completed").data["status"],
        "succeeded",
        "{lines:#?}"
    );
    let env_lines: Vec<&str> = lines
        .iter()
        .filter(|(_, stage, output)| stage == "apply" && output.contains("(local-exec): "))
        .map(|(_, _, output)| output.as_str())
        .collect();
    for expected in [
        "PATH=".to_owned(),
        "TF_IN_AUTOMATION=1".to_owned(),
        "TF_X_TEST_SETTING=operator-tf-setting".to_owned(),
        format!("TEST_PASSED_THROUGH={passed}"),
    ] {
        assert!(
            env_lines.iter().any(|l| l.contains(&expected)),
            "terraform's environment lacks {expected}: {env_lines:#?}"
        );
    }
    for (_, stage, output) in &lines {
        for secret in [
            leak.as_str(),
            unlisted.as_str(),
            "DATABASE_URL",
            "AMQP_URL",
            "amqp://",
            "PREBUILDS_",
        ] {
            assert!(
                !output.contains(secret),
                "{secret} reached terraform ({stage}): {output}"
            );
        }
    }
}

/// Inserts the `provisioner_jobs` row of `job_id` with `job_status`, canceled now when `canceled`
/// (as the worker's `cancel_pending` leaves it, or an operator's cancel that is still in progress).
async fn job_row(db: &TestDb, job_id: Uuid, job_status: &str, canceled: bool) {
    let client = db.pool.get().await.expect("db");
    client
        .execute(
            "INSERT INTO provisioner_jobs (id, initiator_id, job_status, canceled_at, completed_at)
             VALUES ($1, $2, $3, CASE WHEN $4 THEN now() END,
                     CASE WHEN $3 = 'canceled' THEN now() END)
             ON CONFLICT (id) DO NOTHING",
            &[&job_id, &PREBUILDS_USER_ID, &job_status, &canceled],
        )
        .await
        .expect("insert provisioner job");
}

#[tokio::test]
async fn terraform_backend_does_not_run_a_job_canceled_while_queued() {
    let Some(rig) = terraform_rig(&["--terraform-timeout", "2m"]).await else {
        return;
    };
    let (db, workdir, port, publisher) = (&rig.db, &rig.workdir, &rig.port, &rig.publisher);
    let version = template_version(db, Some(TEMPLATE)).await;
    let mut reader = EventReader::new(&rig.broker);

    // The reconciler canceled the pending create (`cancel_pending`) after its message was queued;
    // and a job whose cancel is still in progress (`canceling`, no `canceled_at` yet).
    let image = [("image", "ubuntu")];
    let canceled = create_job(version, &image);
    job_row(db, canceled.job_id, "canceled", true).await;
    let canceling = create_job(version, &image);
    job_row(db, canceling.job_id, "canceling", false).await;
    // A pending job with a row runs as before (the check only stops canceled ones).
    let pending = create_job(version, &image);
    job_row(db, pending.job_id, "pending", false).await;
    let message = submit(db, publisher, &canceled).await;
    submit(db, publisher, &canceling).await;
    submit(db, publisher, &pending).await;

    for job in [&canceled, &canceling] {
        reader
            .until(job.job_id, Duration::from_secs(120), "job_completed", |e| {
                has(e, "job_completed")
            })
            .await;
    }
    let events = reader
        .until(
            pending.job_id,
            Duration::from_secs(120),
            "pending job built",
            |e| has(e, "agent_lifecycle:ready") || has(e, "job_completed"),
        )
        .await;
    assert_eq!(
        the(&events, "job_completed").data["status"],
        "succeeded",
        "{:#?}",
        log_lines(&events)
    );
    // Only the pending job built anything: one state, of its workspace.
    assert_eq!(
        terraform_states(db, "workspace").await,
        [(pending.workspace_id.to_string(), true)]
    );
    reader.settle(Duration::from_millis(700)).await;
    let mut first_run = Vec::new();
    for job in [&canceled, &canceling] {
        let events = reader.of(job.job_id);
        // Nothing ran: no job_started (the job never started), no plan, no agents.
        assert_eq!(
            shape(&events),
            ["job_log", "job_completed"],
            "{:#?}",
            log_lines(&events)
        );
        let completed = the(&events, "job_completed");
        assert_eq!(completed.data["status"], "canceled");
        assert!(completed.data["error"].is_null(), "{completed:?}");
        assert_eq!(completed.data["agents"], serde_json::json!([]));
        let lines = log_lines(&events);
        assert!(
            !lines
                .iter()
                .any(|(_, stage, _)| stage == "plan" || stage == "apply"),
            "terraform did not run: {lines:#?}"
        );
        assert!(
            lines.iter().any(|(_, _, o)| o.contains("canceled")),
            "{lines:#?}"
        );
        assert!(
            !workdir.0.join(job.workspace_id.to_string()).exists(),
            "no working directory, no terraform state for a canceled job"
        );
        first_run.push(events);
    }

    // A duplicate delivery republishes the recorded events (same ids, same content).
    publish_again(publisher, &message).await;
    let both = reader
        .until(canceled.job_id, WAIT, "republication", |e| {
            count(e, "job_completed") == 2
        })
        .await;
    assert_eq!(both[..both.len() / 2], both[both.len() / 2..]);
    assert_eq!(both[..both.len() / 2], first_run[0][..]);
    assert!(!workdir.0.join(canceled.workspace_id.to_string()).exists());

    assert_eq!(
        metric(
            *port,
            "prebuilds_provisioner_jobs_total{status=\"canceled\",transition=\"start\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric(
            *port,
            "prebuilds_provisioner_jobs_total{status=\"succeeded\",transition=\"start\"}"
        )
        .await,
        1.0,
        "only the pending job ran"
    );
    assert_eq!(
        metric(*port, "prebuilds_provisioner_jobs_replayed_total").await,
        1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Lanes, admission, heartbeats and cancels of running jobs (issue #18).

/// A build a user waits for: the claim build of a workspace now owned by a user.
fn claim_build(parameters: &[(&str, &str)]) -> ProvisionerJob {
    let mut claim = job(Transition::Start, BuildStage::Claim, parameters);
    claim.owner_id = Uuid::new_v4();
    claim.owner_name = "alice".to_owned();
    claim.build_number = 2;
    claim
}

fn started(events: &[Received]) -> bool {
    has(events, "job_started")
}

#[tokio::test]
async fn a_claim_build_is_served_ahead_of_a_long_prebuild_backlog() {
    let broker = TestBroker::new().await;
    let port = free_port();
    // One slot per lane and builds of a second: FIFO would start the claim build after the whole
    // backlog (20 s).
    let sim = [
        "--sim-duration-min",
        "1s",
        "--sim-duration-max",
        "1s",
        "--sim-agent-ready-delay",
        "0",
        "--concurrency",
        "1",
        "--user-concurrency",
        "1",
    ];
    let mut service = provisioner(&broker, port, &sim, &[]);
    wait_ready(port).await;
    let publisher = test_publisher(&broker);
    let backlog: Vec<ProvisionerJob> = (0..20)
        .map(|_| job(Transition::Start, BuildStage::Create, &[]))
        .collect();
    for create in &backlog {
        let event = CloudEvent::new("test", chrono::Utc::now(), create.clone());
        publisher.publish_event(&event).await.expect("publish");
    }
    let claim = claim_build(&[]);
    assert_eq!(
        publish(&publisher, &claim).await.routing_key(),
        "provisioner.job.user.start"
    );

    let mut reader = EventReader::new(&broker);
    reader
        .until(claim.job_id, WAIT, "the claim build completed", |e| {
            has(e, "job_completed")
        })
        .await;
    let creates_started = backlog
        .iter()
        .filter(|create| started(&reader.of(create.job_id)))
        .count();
    assert!(
        creates_started <= 3,
        "the claim build waited behind {creates_started} prebuild creates"
    );
    assert!(service.terminate(WAIT).await.expect("exits").success());
}

#[tokio::test]
async fn a_provisioner_serving_one_lane_leaves_the_other_alone() {
    let broker = TestBroker::new().await;
    let port = free_port();
    let mut args = FAST_SIM.to_vec();
    args.extend(["--lanes", "prebuild"]);
    let mut service = provisioner(&broker, port, &args, &[]);
    wait_ready(port).await;
    let publisher = test_publisher(&broker);
    let claim = claim_build(&[]);
    let create = job(Transition::Start, BuildStage::Create, &[]);
    publish(&publisher, &claim).await;
    publish(&publisher, &create).await;
    let mut reader = EventReader::new(&broker);
    reader
        .until(create.job_id, WAIT, "the create completed", |e| {
            has(e, "job_completed")
        })
        .await;
    reader.settle(Duration::from_millis(500)).await;
    assert!(
        reader.of(claim.job_id).is_empty(),
        "the user lane is not served"
    );
    let waiting = broker
        .get(
            &broker.queue(QueueKind::ProvisionerJobsUser),
            Duration::from_secs(5),
        )
        .await
        .expect("the claim build waits on the user lane");
    let waiting: CloudEvent<ProvisionerJob> =
        serde_json::from_slice(&waiting.delivery.data).expect("a job");
    assert_eq!(waiting.data.job_id, claim.job_id);
    assert!(service.terminate(WAIT).await.expect("exits").success());
}

#[tokio::test]
async fn with_database_access_only_pending_jobs_run() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let port = free_port();
    let mut service = provisioner(&broker, port, &FAST_SIM, &[("DATABASE_URL", &db.url)]);
    wait_ready(port).await;
    let publisher = test_publisher(&broker);

    let unknown = job(Transition::Start, BuildStage::Create, &[]);
    let succeeded = job(Transition::Start, BuildStage::Create, &[]);
    job_row(&db, succeeded.job_id, "succeeded", false).await;
    // Reaped: failed by the job reaper while its message was still queued.
    let reaped = job(Transition::Start, BuildStage::Create, &[]);
    job_row(&db, reaped.job_id, "failed", false).await;
    // Running elsewhere; this copy is a duplicate publish, not a redelivery.
    let running = job(Transition::Start, BuildStage::Create, &[]);
    job_row(&db, running.job_id, "running", false).await;
    let pending = job(Transition::Start, BuildStage::Create, &[]);
    job_row(&db, pending.job_id, "pending", false).await;
    for job in [&unknown, &succeeded, &reaped, &running, &pending] {
        publish(&publisher, job).await;
    }

    let mut reader = EventReader::new(&broker);
    reader
        .until(pending.job_id, WAIT, "the pending job built", |e| {
            has(e, "job_completed")
        })
        .await;
    let (reason, dead) = dead_letter(&broker).await;
    assert!(
        reason.contains("does not exist in the database"),
        "{reason}"
    );
    let body: CloudEvent<ProvisionerJob> = serde_json::from_slice(&dead).unwrap();
    assert_eq!(body.data.job_id, unknown.job_id);
    prebuilds_tests::eventually(WAIT, "three refusals counted", || async {
        let total = metric(
            port,
            "prebuilds_provisioner_jobs_refused_total{reason=\"already_succeeded\"}",
        )
        .await
            + metric(
                port,
                "prebuilds_provisioner_jobs_refused_total{reason=\"already_failed\"}",
            )
            .await
            + metric(
                port,
                "prebuilds_provisioner_jobs_refused_total{reason=\"already_running\"}",
            )
            .await;
        (total == 3.0).then_some(())
    })
    .await;
    reader.settle(Duration::from_millis(500)).await;
    for refused in [&unknown, &succeeded, &reaped, &running] {
        assert!(
            reader.of(refused.job_id).is_empty(),
            "a refused job publishes nothing: {:?}",
            labels(&reader.of(refused.job_id))
        );
    }
    assert!(service.terminate(WAIT).await.expect("exits").success());
}

#[tokio::test]
async fn a_long_build_sends_heartbeats_every_quarter_of_the_hung_timeout() {
    let broker = TestBroker::new().await;
    let port = free_port();
    let args = [
        "--sim-duration-min",
        "3s",
        "--sim-duration-max",
        "3s",
        "--sim-agent-ready-delay",
        "0",
        "--job-hung-timeout",
        "2s",
    ];
    let mut service = provisioner(&broker, port, &args, &[]);
    wait_ready(port).await;
    let create = job(Transition::Start, BuildStage::Create, &[]);
    publish(&test_publisher(&broker), &create).await;
    let mut reader = EventReader::new(&broker);
    let events = reader
        .until(create.job_id, WAIT, "the build completed", |e| {
            has(e, "job_completed")
        })
        .await;
    let beats = log_lines(&events)
        .into_iter()
        .filter(|(_, stage, output)| stage == "heartbeat" && output.starts_with("Still running"))
        .count();
    // A 3 s build with a heartbeat every 0.5 s: 5 in theory; at least 3 whatever the scheduling.
    assert!(beats >= 3, "{beats} heartbeats: {:#?}", log_lines(&events));
    assert!(service.terminate(WAIT).await.expect("exits").success());
}

/// Moves a job to `canceling`, as `prebuildsctl jobs cancel` does with a running job.
async fn cancel_running(db: &TestDb, job_id: Uuid) {
    let client = db.pool.get().await.expect("db");
    client
        .execute(
            "UPDATE provisioner_jobs SET job_status = 'canceling', canceled_at = now() WHERE id = $1",
            &[&job_id],
        )
        .await
        .expect("cancel");
}

#[tokio::test]
async fn a_running_terraform_build_is_interrupted_by_a_cancel_and_completes_canceled() {
    let Some(rig) = terraform_rig(&["--terraform-timeout", "2m"]).await else {
        return;
    };
    let (slow, mut reader) = slow_apply_running(&rig.db, &rig.publisher, &rig.broker).await;
    let canceling = Instant::now();
    cancel_running(&rig.db, slow.job_id).await;
    let events = reader
        .until(slow.job_id, Duration::from_secs(30), "job_completed", |e| {
            has(e, "job_completed")
        })
        .await;
    // The poll (2 s) plus terraform's interrupt grace (5 s), far below the 60 s sleep.
    assert!(
        canceling.elapsed() < Duration::from_secs(20),
        "{:?}",
        canceling.elapsed()
    );
    let completed = the(&events, "job_completed");
    assert_eq!(
        completed.data["status"],
        "canceled",
        "{:#?}",
        log_lines(&events)
    );
    assert!(!has(&events, "agent_lifecycle:ready"));
    assert!(log_lines(&events)
        .iter()
        .any(|(_, stage, output)| stage == "cancel" && output.contains("canceled while it ran")));
}

#[tokio::test]
async fn a_build_longer_than_the_job_bound_is_interrupted_and_fails() {
    let broker = TestBroker::new().await;
    let port = free_port();
    let args = [
        "--sim-duration-min",
        "60s",
        "--sim-duration-max",
        "60s",
        "--job-max-duration",
        "1s",
    ];
    let mut service = provisioner(&broker, port, &args, &[]);
    wait_ready(port).await;
    let create = job(Transition::Start, BuildStage::Create, &[]);
    publish(&test_publisher(&broker), &create).await;
    let started = Instant::now();
    let mut reader = EventReader::new(&broker);
    let events = reader
        .until(create.job_id, WAIT, "job_completed", |e| {
            has(e, "job_completed")
        })
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let completed = the(&events, "job_completed");
    assert_eq!(completed.data["status"], "failed");
    let error = completed.data["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("timeout: ") && error.contains("1s"),
        "{error}"
    );
    assert!(!has(&events, "agent_lifecycle:ready"));
    assert!(service.terminate(WAIT).await.expect("exits").success());
}

/// Three resources in a row, each appending its name to the ledger file when it is created (a
/// resource created twice shows twice). `middle` takes 21 s: terraform saves the state of a
/// running apply when a resource completes at least 20 s after the last save, so once `middle` is
/// done the state holds `first` and `middle`. `last` waits until the release file exists.
const RESUMABLE_TEMPLATE: &str = r#"
variable "ledger" {
  type = string
}
variable "release" {
  type = string
}
resource "terraform_data" "first" {
  provisioner "local-exec" {
    command = "echo first >> ${var.ledger}"
  }
}
resource "terraform_data" "middle" {
  depends_on = [terraform_data.first]
  provisioner "local-exec" {
    command = "sleep 21; echo middle >> ${var.ledger}"
  }
}
resource "terraform_data" "last" {
  depends_on = [terraform_data.middle]
  provisioner "local-exec" {
    command = "while [ ! -e ${var.release} ]; do sleep 0.2; done; echo last >> ${var.ledger}"
  }
}
"#;

#[tokio::test]
async fn a_build_interrupted_by_a_dying_replica_is_finished_by_another_without_duplicates() {
    let Some(rig) = terraform_rig(&["--terraform-timeout", "3m"]).await else {
        return;
    };
    let TerraformRig {
        db,
        broker,
        mut service,
        publisher,
        ..
    } = rig;
    // The rig's provisioner is not in a process group of its own: replace it with replicas that
    // are, so that killing one kills its terraform too, as a container's death would.
    service.terminate(Duration::from_secs(10)).await;
    let state_url = db.terraform_state_url().await;
    let replica = |workdir: &TempDir, port: u16| {
        let dir = workdir.0.to_str().expect("utf-8 path").to_owned();
        let addr = format!("127.0.0.1:{port}");
        let args = [
            "--amqp-prefix",
            broker.prefix(),
            "--metrics-addr",
            addr.as_str(),
            "--backend",
            "terraform",
            "--terraform-timeout",
            "3m",
            "--terraform-workdir",
            dir.as_str(),
        ];
        let env = [
            ("AMQP_URL", broker.url.as_str()),
            ("DATABASE_URL", db.url.as_str()),
            ("PREBUILDS_TERRAFORM_STATE_DATABASE_URL", state_url.as_str()),
            ("RUST_LOG", "info"),
        ];
        Service::start_group("prebuilds-provisioner", &args, &env)
    };
    let (workdir_a, workdir_b) = (TempDir::new(), TempDir::new());
    let (port_a, port_b) = (free_port(), free_port());
    let mut replica_a = replica(&workdir_a, port_a);
    wait_ready(port_a).await;

    let files = TempDir::new();
    let ledger = files.0.join("ledger");
    let release = files.0.join("release");
    let version = template_version(&db, Some(RESUMABLE_TEMPLATE)).await;
    let create = create_job(
        version,
        &[
            ("ledger", ledger.to_str().expect("utf-8 path")),
            ("release", release.to_str().expect("utf-8 path")),
        ],
    );
    let mut reader = EventReader::new(&broker);
    submit(&db, &publisher, &create).await;

    // Replica A applies until the state in PostgreSQL holds `middle`; then it dies mid-apply,
    // with `last` in progress.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !terraform_states(&db, "middle").await.iter().any(|s| s.1) {
        assert!(
            Instant::now() < deadline,
            "replica A never saved `middle` to the state: {:#?}",
            log_lines(&reader.of(create.job_id))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    replica_a.kill_group().await;
    std::fs::write(&release, "go").expect("write the release file");

    // Replica B, with an empty working directory of its own, gets the redelivered job.
    let _replica_b = replica(&workdir_b, port_b);
    wait_ready(port_b).await;
    let events = reader
        .until(
            create.job_id,
            Duration::from_secs(150),
            "the job finished by replica B",
            |e| has(e, "job_completed"),
        )
        .await;
    let lines = log_lines(&events);
    assert_eq!(
        the(&events, "job_completed").data["status"],
        "succeeded",
        "{lines:#?}"
    );
    // Each resource was created once: B planned against A's state and created only `last`.
    let created = std::fs::read_to_string(&ledger).expect("read the ledger");
    assert_eq!(
        created.lines().collect::<Vec<_>>(),
        ["first", "middle", "last"],
        "{lines:#?}"
    );
    assert!(
        lines
            .iter()
            .any(|(_, stage, output)| stage == "plan" && output.contains("1 to add, 0 to change")),
        "replica B planned only the missing resource: {lines:#?}"
    );
    assert!(!workdir_a
        .0
        .join(create.workspace_id.to_string())
        .join("terraform.tfstate")
        .exists());
}

/// Shutdown fits one budget (`PREBUILDS_SHUTDOWN_TIMEOUT`, 4 s here): SIGTERM during a build that
/// would take a minute, `/readyz` answers 503 (`draining=true`) while the provisioner drains —
/// it does not disappear — the build is interrupted, its job returns to the queue, and the process
/// exits within the budget.
#[tokio::test]
async fn shutdown_answers_503_while_draining_and_exits_within_its_budget() {
    const BUDGET: Duration = Duration::from_secs(4);
    let broker = TestBroker::new().await;
    let port = free_port();
    let mut service = provisioner(
        &broker,
        port,
        &["--sim-duration-min", "60s", "--sim-duration-max", "60s"],
        &[("PREBUILDS_SHUTDOWN_TIMEOUT", "4s")],
    );
    wait_ready(port).await;
    let publisher = test_publisher(&broker);
    let mut reader = EventReader::new(&broker);
    let long = job(Transition::Start, BuildStage::Create, &[]);
    publish(&publisher, &long).await;
    reader
        .until(long.job_id, WAIT, "long build started", |e| {
            has(e, "job_started")
        })
        .await;

    let pid = service.pid().expect("running").to_string();
    let signalled = std::time::Instant::now();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(sent.success());
    let (status, body) =
        prebuilds_tests::eventually(BUDGET, "/readyz answering 503 while draining", || async {
            let (status, body) = http_get(port, "/readyz").await?;
            (status == 503).then_some((status, body))
        })
        .await;
    assert_eq!(status, 503);
    assert!(body.contains("draining=true"), "{body}");

    let exit = service
        .terminate(BUDGET * 2)
        .await
        .expect("exits after SIGTERM");
    let took = signalled.elapsed();
    assert!(exit.success(), "clean exit: {exit:?}");
    assert!(
        took <= BUDGET + Duration::from_millis(500),
        "exited {took:?} after SIGTERM, over its {BUDGET:?} budget"
    );
    // The interrupted build is not lost: its job is back on the queue for another replica.
    let back = broker
        .get(&broker.queue(QueueKind::ProvisionerJobs), WAIT)
        .await
        .expect("the interrupted job requeued");
    let requeued: CloudEvent<ProvisionerJob> = serde_json::from_slice(&back.data).unwrap();
    assert_eq!(requeued.data.job_id, long.job_id);
}
