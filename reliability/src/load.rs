//! The load the scenarios run beside their faults, every loop stopped by a token:
//!
//! - [`ClaimLoad`]: clients claiming from random presets over the claim RPC. A request that times
//!   out or loses its connection is retried with the *same* request id (the claim is idempotent by
//!   id), and every fifth answered request is replayed to check it returns its first outcome.
//! - [`poison`]: the poison-message corpus (bad JSON, wrong type, schema violations, unknown ids,
//!   oversized bodies, wrong content type) and valid reconcile jobs to interleave with it.

use std::{
    sync::{Arc, RwLock},
    time::Duration,
};

use lapin::BasicProperties;
use prebuilds_runtime::amqp::{rpc::RpcClient, Topology};
use prebuilds_schemas::{
    ClaimReply, ClaimRequest, CloudEvent, JobCompleted, JobOutcome, ReconcilePreset,
    ReconcileReason,
};
use rand::Rng;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One answered claim request.
#[derive(Debug, Clone)]
pub struct ClaimRecord {
    pub request_id: Uuid,
    pub user: Uuid,
    pub preset: Uuid,
    pub reply: ClaimReply,
}

/// What the claim clients saw.
#[derive(Debug, Default, Clone)]
pub struct ClaimStats {
    pub records: Vec<ClaimRecord>,
    /// Requests abandoned after every retry failed (or the load stopped mid-request).
    pub gave_up: usize,
    /// Re-sends of a request under the same id after a timeout or a lost connection.
    pub retries: usize,
    /// Answered requests sent again on purpose, and how many got a different reply.
    pub replays: usize,
    pub replay_mismatches: usize,
}

impl ClaimStats {
    fn merge(&mut self, other: ClaimStats) {
        self.records.extend(other.records);
        self.gave_up += other.gave_up;
        self.retries += other.retries;
        self.replays += other.replays;
        self.replay_mismatches += other.replay_mismatches;
    }

    pub fn claimed(&self) -> usize {
        self.records
            .iter()
            .filter(|r| r.reply.workspace_id.is_some())
            .count()
    }
}

/// Claim clients running in the background.
#[derive(Debug)]
pub struct ClaimLoad {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<ClaimStats>>,
}

const CALL_TIMEOUT: Duration = Duration::from_secs(8);
const ATTEMPTS: usize = 8;

impl ClaimLoad {
    /// `presets` may change while the load runs (version changes add presets).
    pub fn start(
        url: &str,
        topology: Topology,
        users: &[Uuid],
        presets: Arc<RwLock<Vec<Uuid>>>,
        clients: usize,
        pause: Duration,
    ) -> ClaimLoad {
        let stop = CancellationToken::new();
        let tasks = (0..clients)
            .map(|c| {
                tokio::spawn(client_loop(
                    c,
                    url.to_owned(),
                    topology.clone(),
                    users[c % users.len()],
                    presets.clone(),
                    pause,
                    stop.clone(),
                ))
            })
            .collect();
        ClaimLoad { stop, tasks }
    }

    /// Stops the clients (an in-flight request finishes or is abandoned within its retries).
    pub async fn finish(self) -> ClaimStats {
        self.stop.cancel();
        let mut stats = ClaimStats::default();
        for t in self.tasks {
            if let Ok(s) = t.await {
                stats.merge(s);
            }
        }
        stats
    }
}

async fn connect(
    url: &str,
    name: &str,
    topology: &Topology,
    stop: &CancellationToken,
) -> Option<RpcClient> {
    // Bounded: a broker that stays down for a minute ends the client.
    for _ in 0..120 {
        if let Ok(c) = RpcClient::connect(url, name, topology.clone()).await {
            return Some(c);
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    None
}

async fn client_loop(
    index: usize,
    url: String,
    topology: Topology,
    user: Uuid,
    presets: Arc<RwLock<Vec<Uuid>>>,
    pause: Duration,
    stop: CancellationToken,
) -> ClaimStats {
    let name = format!("reliability-claims-{index}");
    let mut stats = ClaimStats::default();
    let mut client = connect(&url, &name, &topology, &stop).await;
    let mut n = 0usize;
    while !stop.is_cancelled() {
        let preset = {
            let list = presets.read().expect("presets lock");
            list[rand::rng().random_range(0..list.len())]
        };
        n += 1;
        let request = CloudEvent::new(
            "reliability",
            chrono::Utc::now(),
            ClaimRequest {
                user_id: user,
                workspace_name: format!("rel-{index}-{n}"),
                preset_id: Some(preset),
                template_id: None,
                parameters: vec![],
            },
        );
        let mut reply = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                stats.retries += 1;
            }
            let Some(c) = client.as_ref() else {
                client = connect(&url, &name, &topology, &stop).await;
                if client.is_none() {
                    break;
                }
                continue;
            };
            match c.call::<_, ClaimReply>(&request, CALL_TIMEOUT).await {
                Ok(r) => {
                    reply = Some(r.data);
                    break;
                }
                Err(_) => {
                    // Timed out, unroutable or connection lost: reconnect and resend the same id.
                    client = None;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        let Some(reply) = reply else {
            stats.gave_up += 1;
            continue;
        };
        if n % 5 == 0 {
            if let Some(c) = client.as_ref() {
                if let Ok(again) = c.call::<_, ClaimReply>(&request, CALL_TIMEOUT).await {
                    stats.replays += 1;
                    if again.data.outcome != reply.outcome
                        || again.data.workspace_id != reply.workspace_id
                    {
                        stats.replay_mismatches += 1;
                    }
                }
            }
        }
        stats.records.push(ClaimRecord {
            request_id: request.id,
            user,
            preset,
            reply,
        });
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    stats
}

/// A message to publish as is.
#[derive(Debug, Clone)]
pub struct RawMessage {
    /// AMQP `message_id`: `poison-<n>-<kind>` for poison, the CloudEvents id for valid jobs.
    pub message_id: String,
    pub kind: &'static str,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub content_type: String,
}

impl RawMessage {
    pub fn properties(&self) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(self.message_id.as_str().into())
            .with_content_type(self.content_type.as_str().into())
    }
}

fn envelope(event_type: &str, content_type: &str, data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "specversion": "1.0",
        "id": Uuid::new_v4(),
        "source": "reliability/poison",
        "type": event_type,
        "time": chrono::Utc::now(),
        "datacontenttype": content_type,
        "data": data,
    }))
    .expect("json")
}

/// The `n`-th poison message. Kinds rotate; one in fifty is oversized (over the 1 MiB limit).
pub fn poison(n: usize) -> RawMessage {
    const KINDS: [&str; 9] = [
        "bad_json",
        "wrong_type",
        "unknown_type",
        "schema_violation",
        "unknown_job",
        "unknown_preset",
        "wrong_content_type",
        "bad_claim",
        "missing_fields",
    ];
    let kind = if n % 50 == 49 {
        "oversized"
    } else {
        KINDS[n % KINDS.len()]
    };
    let json = "application/json";
    let (routing_key, body, content_type) = match kind {
        "bad_json" => (
            "provisioner.event.job_completed",
            b"{\"specversion\": \"1.0\", \"id\": ".to_vec(),
            json,
        ),
        "wrong_type" => (
            "provisioner.event.job_started",
            envelope(
                "prebuilds.reconcile.preset.v1",
                json,
                serde_json::json!({"preset_id": Uuid::new_v4(), "reason": "manual", "requested_at": chrono::Utc::now()}),
            ),
            json,
        ),
        "unknown_type" => (
            "reconcile.preset",
            envelope("prebuilds.bogus.v1", json, serde_json::json!({"x": 1})),
            json,
        ),
        "schema_violation" => (
            "provisioner.event.job_completed",
            envelope(
                "prebuilds.provisioner.job_completed.v1",
                json,
                serde_json::json!({"job_id": "'; DROP TABLE provisioner_jobs; --", "status": "exploded"}),
            ),
            json,
        ),
        "unknown_job" => (
            "provisioner.event.job_completed",
            serde_json::to_vec(&CloudEvent::new(
                "reliability/poison",
                chrono::Utc::now(),
                JobCompleted {
                    job_id: Uuid::new_v4(),
                    status: JobOutcome::Succeeded,
                    error: None,
                    completed_at: chrono::Utc::now(),
                    agents: vec![],
                },
            ))
            .expect("json"),
            json,
        ),
        "unknown_preset" => (
            "reconcile.preset",
            serde_json::to_vec(&CloudEvent::new(
                "reliability/poison",
                chrono::Utc::now(),
                ReconcilePreset {
                    preset_id: Uuid::new_v4(),
                    reason: ReconcileReason::Manual,
                    requested_at: chrono::Utc::now(),
                },
            ))
            .expect("json"),
            json,
        ),
        "wrong_content_type" => (
            "reconcile.preset",
            envelope(
                "prebuilds.reconcile.preset.v1",
                "text/plain",
                serde_json::json!({"preset_id": Uuid::new_v4(), "reason": "manual", "requested_at": chrono::Utc::now()}),
            ),
            "text/plain",
        ),
        "bad_claim" => (
            "claim.request",
            envelope(
                "prebuilds.claim.request.v1",
                json,
                serde_json::json!({"user_id": 42, "workspace_name": ["x"]}),
            ),
            json,
        ),
        "missing_fields" => (
            "provisioner.event.agent_lifecycle",
            serde_json::to_vec(&serde_json::json!({"specversion": "1.0", "type": "prebuilds.provisioner.agent_lifecycle.v1"}))
                .expect("json"),
            json,
        ),
        _ => (
            "provisioner.event.job_log",
            envelope(
                "prebuilds.provisioner.job_log.v1",
                json,
                serde_json::json!({"job_id": Uuid::new_v4(), "logs": [{"created_at": chrono::Utc::now(), "level": "info", "stage": "apply", "output": "x".repeat(1_100_000)}]}),
            ),
            json,
        ),
    };
    RawMessage {
        message_id: format!("poison-{n}-{kind}"),
        kind,
        routing_key: routing_key.to_owned(),
        body,
        content_type: content_type.to_owned(),
    }
}

/// A valid reconcile job for `preset`.
pub fn valid_reconcile(preset: Uuid) -> RawMessage {
    let event = CloudEvent::new(
        "reliability",
        chrono::Utc::now(),
        ReconcilePreset {
            preset_id: preset,
            reason: ReconcileReason::Manual,
            requested_at: chrono::Utc::now(),
        },
    );
    RawMessage {
        message_id: event.id.to_string(),
        kind: "valid_reconcile",
        routing_key: event.routing_key(),
        body: serde_json::to_vec(&event).expect("json"),
        content_type: "application/json".into(),
    }
}
