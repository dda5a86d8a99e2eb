//! Running the real binaries against a test's database and AMQP prefix, and a scriptable fake
//! provisioner for tests that must control build outcomes precisely.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::FieldTable,
};
use prebuilds_runtime::amqp::{self, Publisher, QueueKind};
use prebuilds_schemas::{
    AgentLifecycle, AgentLifecycleState, AgentSpec, CloudEvent, JobCompleted, JobOutcome,
    JobStarted, ProvisionerJob, RawEvent, Transition,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Service, TestBroker, TestDb};

/// A free TCP port on loopback, reserved against every other test ([`crate::ports`]).
pub fn free_port() -> u16 {
    crate::ports::reserve()
}

/// Starts `binary` wired to the test's database and prefix, with extra environment.
pub fn start(
    binary: &str,
    db: &TestDb,
    broker: &TestBroker,
    extra: &[(&str, &str)],
) -> (Service, u16) {
    start_with(db, broker, extra, |env| Service::start(binary, &[], env))
}

/// [`start`], with everything the process prints appended to `log`.
pub fn start_logged(
    binary: &str,
    db: &TestDb,
    broker: &TestBroker,
    extra: &[(&str, &str)],
    log: &std::path::Path,
) -> (Service, u16) {
    start_with(db, broker, extra, |env| {
        Service::start_logged(binary, &[], env, log)
    })
}

/// The environment every service of a test gets (its database, prefix and a metrics port of its
/// own), with `extra` on top, handed to `spawn`.
fn start_with(
    db: &TestDb,
    broker: &TestBroker,
    extra: &[(&str, &str)],
    spawn: impl FnOnce(&[(&str, &str)]) -> Service,
) -> (Service, u16) {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut env: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", &db.url),
        ("AMQP_URL", &broker.url),
        ("PREBUILDS_AMQP_PREFIX", broker.prefix()),
        ("PREBUILDS_METRICS_ADDR", &addr),
        ("RUST_LOG", "info"),
        // Tests run several services at once against one server (max_connections is 100 by
        // default): keep each process's pool small unless a test asks for more.
        ("PREBUILDS_DB_POOL_SIZE", "8"),
    ];
    // Later entries win, so `extra` overrides the defaults above.
    env.extend_from_slice(extra);
    (spawn(&env), port)
}

pub use crate::probe::http_get;

/// The outcome a fake provisioner gives a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeOutcome {
    /// Succeeds; start builds get one agent that becomes ready.
    Succeed,
    Fail,
    /// Never answers (the job stays pending).
    Hold,
    /// Sends `job_started`, then nothing (a provisioner that died mid-build).
    StartThenSilent,
}

type Decide = dyn Fn(&ProvisionerJob) -> FakeOutcome + Send + Sync;

/// Consumes `<prefix>.provisioner-jobs` and answers with events, as a provisioner would.
pub struct FakeProvisioner {
    pub jobs: Arc<Mutex<Vec<ProvisionerJob>>>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for FakeProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeProvisioner").finish_non_exhaustive()
    }
}

impl FakeProvisioner {
    pub async fn start(
        broker: &TestBroker,
        decide: impl Fn(&ProvisionerJob) -> FakeOutcome + Send + Sync + 'static,
    ) -> FakeProvisioner {
        let decide: Arc<Decide> = Arc::new(decide);
        let jobs = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let connection = amqp::connect(&broker.url, "fake-provisioner")
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .basic_qos(64, BasicQosOptions::default())
            .await
            .expect("qos");
        // Both lanes, like a provisioner started with its default `--lanes user,prebuild`.
        let mut lanes = Vec::new();
        for lane in prebuilds_schemas::Lane::ALL {
            let queue = broker.queue(QueueKind::provisioner_jobs(lane));
            let lane_consumer = channel
                .basic_consume(
                    queue.as_str().into(),
                    format!("fake-provisioner-{}", lane.as_str())
                        .as_str()
                        .into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("consume");
            lanes.push(lane_consumer);
        }
        let mut consumer = futures::stream::select_all(lanes);
        let publisher =
            Publisher::new(&broker.url, "fake-provisioner-pub", broker.topology.clone());
        let seen = jobs.clone();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let _connection = connection;
            loop {
                let delivery = tokio::select! {
                    _ = token.cancelled() => return,
                    d = consumer.next() => match d { Some(Ok(d)) => d, _ => return },
                };
                let job: CloudEvent<ProvisionerJob> = RawEvent::parse(&delivery.data)
                    .and_then(|r| r.decode())
                    .expect("worker publishes valid jobs");
                let job = job.data;
                seen.lock().unwrap().push(job.clone());
                let outcome = if job.orphan {
                    FakeOutcome::Succeed
                } else {
                    decide(&job)
                };
                if outcome != FakeOutcome::Hold {
                    answer(&publisher, &job, outcome).await;
                }
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }
        });
        FakeProvisioner {
            jobs,
            stop,
            task: Some(task),
        }
    }

    pub fn received(&self) -> Vec<ProvisionerJob> {
        self.jobs.lock().unwrap().clone()
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for FakeProvisioner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Publishes the events a provisioner sends for `job` with `outcome`.
pub async fn answer(publisher: &Publisher, job: &ProvisionerJob, outcome: FakeOutcome) {
    let now = chrono::Utc::now();
    let send = |data| async move {
        publisher
            .publish_event(&CloudEvent::new(
                "fake-provisioner",
                chrono::Utc::now(),
                data,
            ))
            .await
            .expect("publish event");
    };
    send(JobStarted {
        job_id: job.job_id,
        started_at: now,
    })
    .await;
    if outcome == FakeOutcome::StartThenSilent {
        return;
    }
    let succeeded = outcome == FakeOutcome::Succeed;
    let with_agent = succeeded && job.transition == Transition::Start;
    publisher
        .publish_event(&CloudEvent::new(
            "fake-provisioner",
            chrono::Utc::now(),
            JobCompleted {
                job_id: job.job_id,
                status: if succeeded {
                    JobOutcome::Succeeded
                } else {
                    JobOutcome::Failed
                },
                error: (!succeeded).then(|| "simulated failure".to_owned()),
                completed_at: chrono::Utc::now(),
                agents: if with_agent {
                    vec![AgentSpec {
                        name: "main".into(),
                    }]
                } else {
                    vec![]
                },
            },
        ))
        .await
        .expect("publish completion");
    if with_agent {
        publisher
            .publish_event(&CloudEvent::new(
                "fake-provisioner",
                chrono::Utc::now(),
                AgentLifecycle {
                    job_id: job.job_id,
                    agent_name: "main".into(),
                    lifecycle_state: AgentLifecycleState::Ready,
                },
            ))
            .await
            .expect("publish agent");
    }
}

/// Counts of a preset's prebuilds by state, read straight from the tables.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolCounts {
    /// Live prebuilds whose latest build is a successful start.
    pub running: i64,
    /// Of those, with every agent ready.
    pub eligible: i64,
    /// Live prebuilds with an open (pending/running) latest build.
    pub in_progress: i64,
    /// Every workspace ever created for the preset (build #1 carries it).
    pub created: i64,
}

pub async fn pool_counts(db: &TestDb, preset_id: Uuid) -> PoolCounts {
    let client = db.pool.get().await.expect("pool");
    let row = client
        .query_one(
            "SELECT
               count(*) FILTER (WHERE NOT w.deleted AND w.owner_id = $2 AND lb.transition = 'start' AND j.job_status = 'succeeded') AS running,
               count(*) FILTER (WHERE NOT w.deleted AND w.owner_id = $2 AND lb.transition = 'start' AND j.job_status = 'succeeded'
                                AND EXISTS (SELECT 1 FROM workspace_agents a WHERE a.job_id = j.id)
                                AND NOT EXISTS (SELECT 1 FROM workspace_agents a WHERE a.job_id = j.id AND a.lifecycle_state <> 'ready')) AS eligible,
               count(*) FILTER (WHERE NOT w.deleted AND w.owner_id = $2 AND j.job_status IN ('pending','running')) AS in_progress,
               count(*) AS created
             FROM workspace_builds b1
             JOIN workspaces w ON w.id = b1.workspace_id
             JOIN LATERAL (SELECT * FROM workspace_builds b WHERE b.workspace_id = w.id ORDER BY build_number DESC LIMIT 1) lb ON true
             JOIN provisioner_jobs j ON j.id = lb.job_id
             WHERE b1.build_number = 1 AND b1.template_version_preset_id = $1",
            &[&preset_id, &prebuilds_schemas::PREBUILDS_USER_ID],
        )
        .await
        .expect("pool counts");
    PoolCounts {
        running: row.get("running"),
        eligible: row.get("eligible"),
        in_progress: row.get("in_progress"),
        created: row.get("created"),
    }
}

/// Whether every one of `presets` holds exactly one eligible prebuild with nothing in progress:
/// a one-instance pool settled.
pub async fn all_settled_at_one(db: &TestDb, presets: &[Uuid]) -> bool {
    for preset in presets {
        let counts = pool_counts(db, *preset).await;
        if counts.eligible != 1 || counts.in_progress != 0 {
            return false;
        }
    }
    true
}

/// Total rows per table, to compare database states.
pub async fn table_counts(db: &TestDb) -> HashMap<&'static str, i64> {
    let client = db.pool.get().await.expect("pool");
    let mut counts = HashMap::new();
    for table in [
        "workspaces",
        "workspace_builds",
        "provisioner_jobs",
        "outbox",
        "workspace_agents",
        "notification_messages",
    ] {
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .expect("count")
            .get(0);
        counts.insert(table, n);
    }
    counts
}

/// Waits until `check` holds, polling.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    crate::eventually(timeout, what, || {
        let f = check();
        async move { f.await.then_some(()) }
    })
    .await
}

/// Publishes a `reconcile.preset` job for `preset_id` (reason `manual`), as the scheduler or an
/// operator would.
pub async fn request_reconcile(publisher: &Publisher, preset_id: Uuid) {
    let job = CloudEvent::new(
        "test",
        chrono::Utc::now(),
        prebuilds_schemas::ReconcilePreset {
            preset_id,
            reason: prebuilds_schemas::ReconcileReason::Manual,
            requested_at: chrono::Utc::now(),
        },
    );
    publisher
        .publish_event(&job)
        .await
        .expect("publish a reconcile job");
}
