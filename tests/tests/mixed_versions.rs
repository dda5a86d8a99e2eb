//! Rolling upgrades: producers of the *next* version against today's worker. A newer provisioner,
//! scheduler and claim client add payload fields (at the top of `data` and inside nested objects)
//! and CloudEvents extension attributes (`subject`, `dataschema`, `traceparent`, `tracestate`);
//! the worker must apply every one of their messages and dead-letter none.

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions},
    types::FieldTable,
};
use prebuilds_runtime::amqp::{publisher::Outgoing, rpc::RpcClient, Publisher, QueueKind};
use prebuilds_schemas::{
    messages::Payload, AgentLifecycle, AgentLifecycleState, AgentSpec, ClaimReply, ClaimRequest,
    CloudEvent, JobCompleted, JobOutcome, JobStarted, ProvisionerJob, RawEvent, ReconcilePreset,
    ReconcileReason, Transition,
};
use prebuilds_tests::{fixtures, stack, TestBroker, TestDb};
use serde_json::{json, Value};

/// `event` as a producer of the next version would write it: one unknown field in `data` and in
/// every object nested in `data`, plus extension attributes on the envelope.
fn next_version_body<T: Payload>(event: &CloudEvent<T>) -> Vec<u8> {
    fn add_fields(value: &mut Value) {
        match value {
            Value::Object(map) => {
                for child in map.values_mut() {
                    add_fields(child);
                }
                map.insert("added_in_v1_1".into(), json!({"nested": [1, "two"]}));
            }
            Value::Array(items) => items.iter_mut().for_each(add_fields),
            _ => {}
        }
    }
    let mut body = event.to_json();
    add_fields(&mut body["data"]);
    let envelope = body.as_object_mut().expect("an envelope is an object");
    envelope.insert("subject".into(), json!("preset/next-version"));
    envelope.insert(
        "dataschema".into(),
        json!("https://prebuilds.dev/schemas/next.schema.json"),
    );
    envelope.insert(
        "traceparent".into(),
        json!("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    envelope.insert("tracestate".into(), json!("prebuilds=next"));
    serde_json::to_vec(&body).expect("JSON")
}

async fn publish_next<T: Payload>(publisher: &Publisher, event: CloudEvent<T>) {
    let body = next_version_body(&event);
    let exchange = publisher.topology().exchange();
    let routing_key = event.routing_key();
    let mut message = Outgoing::new(&exchange, &routing_key, &body);
    message.message_id = Some(event.id.to_string());
    message.event_type = Some(event.event_type.clone());
    publisher
        .publish(message)
        .await
        .expect("publish a next-version message");
}

/// A provisioner of the next version: takes jobs from both lanes and answers each with started,
/// completed (one agent for a start) and agent ready, all written in the newer shape.
fn next_version_provisioner(broker: &TestBroker) -> tokio::task::JoinHandle<()> {
    let url = broker.url.clone();
    let topology = broker.topology.clone();
    let queues: Vec<String> = prebuilds_schemas::Lane::ALL
        .iter()
        .map(|lane| broker.queue(QueueKind::provisioner_jobs(*lane)))
        .collect();
    tokio::spawn(async move {
        let connection = prebuilds_runtime::amqp::connect(&url, "next-provisioner")
            .await
            .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let mut lanes = Vec::new();
        for queue in &queues {
            lanes.push(
                channel
                    .basic_consume(
                        queue.as_str().into(),
                        format!("next-{queue}").as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .expect("consume"),
            );
        }
        let mut jobs = futures::stream::select_all(lanes);
        let publisher = Publisher::new(&url, "next-provisioner-events", topology);
        while let Some(Ok(delivery)) = jobs.next().await {
            let job: ProvisionerJob = RawEvent::parse(&delivery.data)
                .and_then(|raw| raw.decode())
                .expect("today's worker publishes valid jobs")
                .data;
            let now = chrono::Utc::now();
            let event = |data| CloudEvent::new("next-provisioner", chrono::Utc::now(), data);
            publish_next(
                &publisher,
                event(JobStarted {
                    job_id: job.job_id,
                    started_at: now,
                }),
            )
            .await;
            let start = job.transition == Transition::Start;
            publish_next(
                &publisher,
                CloudEvent::new(
                    "next-provisioner",
                    chrono::Utc::now(),
                    JobCompleted {
                        job_id: job.job_id,
                        status: JobOutcome::Succeeded,
                        error: None,
                        completed_at: chrono::Utc::now(),
                        agents: if start {
                            vec![AgentSpec {
                                name: "main".into(),
                            }]
                        } else {
                            vec![]
                        },
                    },
                ),
            )
            .await;
            if start {
                publish_next(
                    &publisher,
                    CloudEvent::new(
                        "next-provisioner",
                        chrono::Utc::now(),
                        AgentLifecycle {
                            job_id: job.job_id,
                            agent_name: "main".into(),
                            lifecycle_state: AgentLifecycleState::Ready,
                        },
                    ),
                )
                .await;
            }
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
        }
    })
}

/// The value of `prebuilds_dead_lettered_total` summed over its series on a process's `/metrics`.
async fn dead_lettered(port: u16) -> f64 {
    let (_, body) = stack::http_get(port, "/metrics")
        .await
        .expect("GET /metrics");
    body.lines()
        .filter(|l| l.starts_with("prebuilds_dead_lettered_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn next_version_provisioner_scheduler_and_claim_client_are_served_by_todays_worker() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (fx, user) = {
        let c = db.pool.get().await.expect("db");
        let org = fixtures::organization(&c, "next").await;
        let fx = fixtures::template_with_preset(&c, org, "tpl", Some(2)).await;
        let user = fixtures::user(&c, "newer-client", false).await;
        (fx, user)
    };
    let (_worker, port) = stack::start("prebuilds-worker", &db, &broker, &[]);
    prebuilds_tests::eventually(Duration::from_secs(30), "worker ready", || async {
        matches!(stack::http_get(port, "/readyz").await, Some((200, _))).then_some(())
    })
    .await;
    let provisioner = next_version_provisioner(&broker);

    // A scheduler of the next version asks for the fill.
    let publisher = Publisher::new(&broker.url, "next-scheduler", broker.topology.clone());
    publish_next(
        &publisher,
        CloudEvent::new(
            "next-scheduler",
            chrono::Utc::now(),
            ReconcilePreset {
                preset_id: fx.preset_id,
                reason: ReconcileReason::Manual,
                requested_at: chrono::Utc::now(),
            },
        ),
    )
    .await;
    stack::wait_for(
        Duration::from_secs(60),
        "two eligible prebuilds",
        || async { stack::pool_counts(&db, fx.preset_id).await.eligible == 2 },
    )
    .await;

    // A claim client of the next version claims one of them.
    let rpc = RpcClient::connect(&broker.url, "next-claims", broker.topology.clone())
        .await
        .expect("rpc client");
    let request = CloudEvent::new(
        "next-claims",
        chrono::Utc::now(),
        ClaimRequest {
            user_id: user,
            workspace_name: "from-the-future".into(),
            preset_id: Some(fx.preset_id),
            template_id: None,
            parameters: vec![],
        },
    );
    let body = next_version_body(&request);
    let reply = rpc
        .request(
            &broker.topology.exchange(),
            &request.routing_key(),
            &body,
            &request.id.to_string(),
            &request.event_type,
            Duration::from_secs(30),
        )
        .await
        .expect("a reply");
    let reply: CloudEvent<ClaimReply> = RawEvent::parse(&reply)
        .and_then(|raw| raw.decode())
        .expect("a claim reply");
    assert_eq!(
        reply.data.outcome.as_str(),
        "claimed",
        "the claim was served: {:?}",
        reply.data
    );
    let claimed = reply.data.workspace_id.expect("the claimed workspace");

    // The claim build completes (its events are newer too) and the pool is refilled.
    stack::wait_for(
        Duration::from_secs(60),
        "claim build done, pool refilled",
        || async {
            let c = db.pool.get().await.expect("db");
            let owner_build_done: bool = c
                .query_one(
                    "SELECT w.owner_id = $2 AND j.job_status = 'succeeded'
                     FROM workspaces w
                     JOIN LATERAL (SELECT job_id FROM workspace_builds b WHERE b.workspace_id = w.id
                                   ORDER BY build_number DESC LIMIT 1) lb ON true
                     JOIN provisioner_jobs j ON j.id = lb.job_id
                     WHERE w.id = $1",
                    &[&claimed, &user],
                )
                .await
                .expect("claimed workspace")
                .get(0);
            owner_build_done && stack::pool_counts(&db, fx.preset_id).await.eligible == 2
        },
    )
    .await;

    // Nothing went to the dead-letter queue, and the worker dead-lettered nothing.
    assert!(
        broker
            .get(&broker.topology.dead_queue(), Duration::from_millis(500))
            .await
            .is_none(),
        "a next-version message was dead-lettered"
    );
    assert_eq!(dead_lettered(port).await, 0.0);
    provisioner.abort();
}
