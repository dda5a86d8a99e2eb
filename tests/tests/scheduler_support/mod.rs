//! Helpers shared by the scheduler acceptance tests: starting `prebuilds-scheduler` replicas,
//! scraping `/metrics` over plain HTTP/1.0, reading reconcile jobs, and a fixture for prebuild
//! workspaces with their builds, jobs and agents.

#![allow(dead_code)]

use std::{collections::HashMap, time::Duration};

use deadpool_postgres::GenericClient;
use prebuilds_runtime::amqp::QueueKind;
use prebuilds_schemas::PREBUILDS_USER_ID;
use prebuilds_tests::{eventually, Service, TestBroker, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

/// The scheduler's v5 namespace for job ids (`prebuilds_scheduler::jobs::JOB_ID_NAMESPACE`),
/// repeated here on purpose: the ids are a contract, not an implementation detail.
pub const JOB_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5c1e_d0b2_6f1a_4c3e_9a57_2d8e_41b0_7f13);

/// The id the scheduler gives the `tick` job of `preset` in tick `index`.
pub fn tick_job_id(preset: Uuid, index: i64) -> Uuid {
    Uuid::new_v5(
        &JOB_ID_NAMESPACE,
        format!("{preset}/tick/{index}").as_bytes(),
    )
}

/// A free localhost port (bound then released).
pub fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr.to_string()
}

/// One running scheduler replica.
#[derive(Debug)]
pub struct Scheduler {
    pub service: Service,
    pub addr: String,
}

impl Scheduler {
    /// Starts a replica on `db`/`broker`; `env` adds or overrides variables.
    pub fn start(db: &TestDb, broker: &TestBroker, env: &[(&str, &str)]) -> Scheduler {
        let addr = free_addr();
        let mut all: Vec<(&str, &str)> = vec![
            ("DATABASE_URL", &db.url),
            ("AMQP_URL", &broker.url),
            ("PREBUILDS_AMQP_PREFIX", broker.prefix()),
            ("PREBUILDS_METRICS_ADDR", &addr),
            ("PREBUILDS_RECONCILE_INTERVAL", "1s"),
            ("PREBUILDS_METRICS_INTERVAL", "1s"),
            ("PREBUILDS_LOCK_RETRY_INTERVAL", "500ms"),
            ("PREBUILDS_SETTINGS_POLL_INTERVAL", "500ms"),
            ("PREBUILDS_SHUTDOWN_TIMEOUT", "10s"),
            ("RUST_LOG", "info"),
        ];
        for (k, v) in env {
            all.retain(|(key, _)| key != k);
            all.push((k, v));
        }
        let service = Service::start("prebuilds-scheduler", &[], &all);
        Scheduler { service, addr }
    }

    /// The CloudEvents `source` of this replica's jobs.
    pub fn source_suffix(&self) -> String {
        format!("/{}", self.service.pid().expect("running"))
    }

    pub async fn scrape(&self) -> Option<Metrics> {
        scrape(&self.addr).await
    }

    /// Waits until `/metrics` answers and returns `prebuilds_scheduler_is_leader`.
    pub async fn is_leader(&self) -> Option<bool> {
        let m = self.scrape().await?;
        m.value("prebuilds_scheduler_is_leader").map(|v| v == 1.0)
    }
}

/// Waits until exactly one of `replicas` reports being leader; returns its index.
pub async fn wait_for_single_leader(replicas: &[&Scheduler], timeout: Duration) -> usize {
    eventually(timeout, "exactly one leader", || async {
        let mut leaders = Vec::new();
        for (i, r) in replicas.iter().enumerate() {
            match r.is_leader().await {
                Some(true) => leaders.push(i),
                Some(false) => {}
                None => return None,
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    })
    .await
}

/// Parsed Prometheus text: series (as printed, e.g. `name{a="b"}`) → value.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub text: String,
    pub series: HashMap<String, f64>,
}

impl Metrics {
    pub fn value(&self, series: &str) -> Option<f64> {
        self.series.get(series).copied()
    }

    /// The value of a per-preset series.
    pub fn preset(&self, name: &str, template: &str, preset: &str, org: &str) -> Option<f64> {
        self.value(&preset_series(name, template, preset, org))
    }

    /// Every series whose printed form contains `needle`.
    pub fn matching(&self, needle: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .series
            .keys()
            .filter(|k| k.contains(needle))
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// `name{template_name="t",preset_name="p",organization_name="o"}` (the scheduler's label order).
pub fn preset_series(name: &str, template: &str, preset: &str, org: &str) -> String {
    format!(
        "{name}{{template_name=\"{template}\",preset_name=\"{preset}\",organization_name=\"{org}\"}}"
    )
}

/// GET /metrics with a raw HTTP/1.0 request; `None` unless the answer is 200 with a body.
pub async fn scrape(addr: &str) -> Option<Metrics> {
    let body = http_get(addr, "/metrics").await?;
    let mut series = HashMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, value) = line.rsplit_once(' ')?;
        series.insert(name.to_owned(), value.parse::<f64>().ok()?);
    }
    Some(Metrics { text: body, series })
}

/// A raw HTTP/1.0 GET; the body when the status is 200.
pub async fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut stream =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut raw))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status_line = head.lines().next()?;
    status_line
        .split_whitespace()
        .nth(1)
        .filter(|code| *code == "200")?;
    Some(body.to_owned())
}

/// A reconcile job as it arrived.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: Uuid,
    pub source: String,
    pub preset_id: Uuid,
    pub reason: String,
    pub time: chrono::DateTime<chrono::Utc>,
}

pub fn job(body: &[u8]) -> Job {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON body");
    assert_eq!(v["type"], "prebuilds.reconcile.preset.v1");
    Job {
        id: v["id"].as_str().unwrap().parse().unwrap(),
        source: v["source"].as_str().unwrap().to_owned(),
        preset_id: v["data"]["preset_id"].as_str().unwrap().parse().unwrap(),
        reason: v["data"]["reason"].as_str().unwrap().to_owned(),
        time: v["time"].as_str().unwrap().parse().unwrap(),
    }
}

/// Every reconcile job arriving within `window`.
pub async fn drain_jobs(broker: &TestBroker, window: Duration) -> Vec<Job> {
    broker
        .drain(&broker.queue(QueueKind::Reconcile), window)
        .await
        .iter()
        .map(|d| job(&d.data))
        .collect()
}

/// Messages currently in the reconcile queue.
pub async fn reconcile_queue_depth(broker: &TestBroker) -> u32 {
    let q = broker
        .channel
        .queue_declare(
            broker.queue(QueueKind::Reconcile).as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("passive declare");
    q.message_count()
}

/// How a fixture prebuild looks.
#[derive(Debug, Clone, Copy)]
pub struct Prebuild<'a> {
    /// Job status of build #1.
    pub job_status: &'a str,
    /// Lifecycle states of build #1's agents.
    pub agents: &'a [&'a str],
    /// `Some(user)`: claimed by that user (owner changed, build #2 `start` by the user).
    pub claimed_by: Option<Uuid>,
    /// Workspace age.
    pub age: Duration,
    pub deleted: bool,
}

impl Default for Prebuild<'_> {
    fn default() -> Self {
        Prebuild {
            job_status: "succeeded",
            agents: &["ready"],
            claimed_by: None,
            age: Duration::from_secs(60),
            deleted: false,
        }
    }
}

/// Where a fixture prebuild belongs.
#[derive(Debug, Clone, Copy)]
pub struct PresetRef {
    pub organization_id: Uuid,
    pub template_id: Uuid,
    pub version_id: Uuid,
    pub preset_id: Uuid,
}

/// Inserts a prebuild workspace exactly as the reconciler leaves one: owned by the prebuilds
/// user, build #1 `start` initiated by it with the preset, stage `create`, its job and agents.
pub async fn prebuild<C: GenericClient>(c: &C, at: PresetRef, p: Prebuild<'_>) -> Uuid {
    let workspace_id = Uuid::new_v4();
    let job_id = Uuid::new_v4();
    let owner = p.claimed_by.unwrap_or(PREBUILDS_USER_ID);
    let age_secs = p.age.as_secs_f64();
    let name = format!("prebuild-{}", &Uuid::new_v4().simple().to_string()[..15]);
    c.execute(
        "INSERT INTO workspaces (id, owner_id, organization_id, template_id, name, deleted, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, now() - make_interval(secs => $7))",
        &[&workspace_id, &owner, &at.organization_id, &at.template_id, &name, &p.deleted, &age_secs],
    )
    .await
    .expect("insert workspace");
    let finished = matches!(p.job_status, "succeeded" | "failed" | "canceled");
    c.execute(
        "INSERT INTO provisioner_jobs (id, initiator_id, created_at, started_at, completed_at, job_status, error)
         VALUES ($1, $2, now() - make_interval(secs => $3),
                 CASE WHEN $4 <> 'pending' THEN now() - make_interval(secs => $3) END,
                 CASE WHEN $5 THEN now() - make_interval(secs => $3 / 2) END,
                 $4, CASE WHEN $4 = 'failed' THEN 'boom' END)",
        &[&job_id, &PREBUILDS_USER_ID, &age_secs, &p.job_status, &finished],
    )
    .await
    .expect("insert job");
    c.execute(
        "INSERT INTO workspace_builds (id, workspace_id, template_version_id, build_number, transition,
                                       initiator_id, job_id, template_version_preset_id, stage, created_at)
         VALUES ($1, $2, $3, 1, 'start', $4, $5, $6, 'create', now() - make_interval(secs => $7))",
        &[&Uuid::new_v4(), &workspace_id, &at.version_id, &PREBUILDS_USER_ID, &job_id, &at.preset_id, &age_secs],
    )
    .await
    .expect("insert build #1");
    for (i, state) in p.agents.iter().enumerate() {
        c.execute(
            "INSERT INTO workspace_agents (id, job_id, name, lifecycle_state) VALUES ($1, $2, $3, $4)",
            &[&Uuid::new_v4(), &job_id, &format!("agent{i}"), state],
        )
        .await
        .expect("insert agent");
    }
    if let Some(user) = p.claimed_by {
        let claim_job = Uuid::new_v4();
        c.execute(
            "INSERT INTO provisioner_jobs (id, initiator_id, started_at, completed_at, job_status)
             VALUES ($1, $2, now(), now(), 'succeeded')",
            &[&claim_job, &user],
        )
        .await
        .expect("insert claim job");
        c.execute(
            "INSERT INTO workspace_builds (id, workspace_id, template_version_id, build_number, transition,
                                           initiator_id, job_id, template_version_preset_id, stage)
             VALUES ($1, $2, $3, 2, 'start', $4, $5, $6, 'claim')",
            &[&Uuid::new_v4(), &workspace_id, &at.version_id, &user, &claim_job, &at.preset_id],
        )
        .await
        .expect("insert claim build");
    }
    workspace_id
}

/// Adds a version (not activated) to a template.
pub async fn version<C: GenericClient>(c: &C, template_id: Uuid, name: &str) -> Uuid {
    let id = Uuid::new_v4();
    c.execute(
        "INSERT INTO template_versions (id, template_id, name) VALUES ($1, $2, $3)",
        &[&id, &template_id, &name],
    )
    .await
    .expect("insert version");
    id
}

/// Adds a preset to a version.
pub async fn preset<C: GenericClient>(
    c: &C,
    org: Uuid,
    template_id: Uuid,
    version_id: Uuid,
    name: &str,
    desired: Option<i32>,
    status: &str,
) -> PresetRef {
    let preset_id = Uuid::new_v4();
    c.execute(
        "INSERT INTO template_version_presets (id, template_version_id, name, desired_instances, prebuild_status)
         VALUES ($1, $2, $3, $4, $5)",
        &[&preset_id, &version_id, &name, &desired, &status],
    )
    .await
    .expect("insert preset");
    PresetRef {
        organization_id: org,
        template_id,
        version_id,
        preset_id,
    }
}
