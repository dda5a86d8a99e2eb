//! Distributed tracing on the real services: an OTLP/HTTP receiver of the test's own (axum on a
//! port it binds) collects the spans of the API, a worker and the sim provisioner, each started
//! with `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at it. One claim made over HTTP must yield one
//! trace holding the API's request span, the worker's claim, the replacement reconcile, the
//! provisioner jobs it caused and the worker's handling of their events, every span's parent
//! present in the trace and every span descending from the API's. A `traceparent` that does not
//! parse starts a new trace and is never poison; spans still queued at SIGTERM are sent before exit.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{extract::State, routing::post, Json, Router};
use chrono::Utc;
use lapin::{options::BasicPublishOptions, types::FieldTable, BasicProperties};
use prebuilds_tests::{
    api::{self, ApiRole},
    eventually,
    fixtures::{self, PrebuildSpec},
    probe::scrape_sum,
    stack::{self, http_get},
    TestBroker, TestDb,
};
use serde_json::{json, Value};
use uuid::Uuid;

/// One received span.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    trace_id: String,
    span_id: String,
    parent: Option<String>,
    name: String,
    attributes: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Received(Arc<Mutex<Vec<Span>>>);

impl Received {
    fn all(&self) -> Vec<Span> {
        self.0.lock().unwrap().clone()
    }
    fn trace(&self, trace_id: &str) -> Vec<Span> {
        self.all()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }
}

fn text(value: &Value) -> String {
    let v = &value["value"];
    for kind in ["stringValue", "intValue", "boolValue", "doubleValue"] {
        if let Some(x) = v.get(kind) {
            return x.as_str().map_or_else(|| x.to_string(), str::to_owned);
        }
    }
    String::new()
}

/// The OTLP/HTTP JSON receiver: `POST /v1/traces`, answering 200 with an empty partial success.
async fn receiver() -> (u16, Received) {
    let received = Received::default();
    async fn traces(State(r): State<Received>, Json(body): Json<Value>) -> Json<Value> {
        let mut spans = Vec::new();
        for resource in body["resourceSpans"].as_array().into_iter().flatten() {
            let service = resource["resource"]["attributes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["key"] == "service.name")
                .map(text)
                .unwrap_or_default();
            for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                for s in scope["spans"].as_array().into_iter().flatten() {
                    spans.push(Span {
                        service: service.clone(),
                        trace_id: s["traceId"].as_str().unwrap_or_default().to_owned(),
                        span_id: s["spanId"].as_str().unwrap_or_default().to_owned(),
                        parent: s["parentSpanId"]
                            .as_str()
                            .filter(|p| !p.is_empty())
                            .map(str::to_owned),
                        name: s["name"].as_str().unwrap_or_default().to_owned(),
                        attributes: s["attributes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|a| (a["key"].as_str().unwrap_or_default().to_owned(), text(a)))
                            .collect(),
                    });
                }
            }
        }
        r.0.lock().unwrap().extend(spans);
        Json(json!({}))
    }
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, received)
}

fn otel_env(endpoint: &str, service: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_owned()),
        ("OTEL_SERVICE_NAME", service.to_owned()),
        // Sent within 100 ms of finishing, so the test waits on spans, not on batches.
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
    ]
}

fn borrowed<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Walks `span`'s parents within `trace`; returns the root it reaches (None if a parent is
/// missing from the trace).
fn root_of<'a>(span: &'a Span, by_id: &HashMap<&str, &'a Span>) -> Option<&'a Span> {
    let mut current = span;
    for _ in 0..100 {
        match &current.parent {
            None => return Some(current),
            Some(parent) => current = by_id.get(parent.as_str())?,
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_over_http_is_one_trace_from_the_api_to_the_provisioner_and_back() {
    let (otlp_port, received) = receiver().await;
    let endpoint = format!("http://127.0.0.1:{otlp_port}");
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let template = format!("tpl-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let fx = fixtures::template_with_preset(&c, org, &template, Some(1)).await;
    fixtures::prebuild(&c, &fx, &PrebuildSpec::running(Utc::now())).await;
    let user = fixtures::user(&c, "alice", false).await;
    drop(c);
    let claimer = api::token(&db, &broker, "portal", "claimer");

    let mut worker_env = otel_env(&endpoint, "prebuilds-worker");
    // Logs turned down do not turn the spans off.
    worker_env.push(("RUST_LOG", "warn".to_owned()));
    let (_worker, worker_metrics) =
        stack::start("prebuilds-worker", &db, &broker, &borrowed(&worker_env));
    let mut provisioner_env = otel_env(&endpoint, "prebuilds-provisioner");
    provisioner_env.extend([
        ("PREBUILDS_SIM_DURATION_MIN", "0s".to_owned()),
        ("PREBUILDS_SIM_DURATION_MAX", "50ms".to_owned()),
        ("PREBUILDS_SIM_AGENT_READY_DELAY", "0s".to_owned()),
        ("PREBUILDS_LOG_FORMAT", "json".to_owned()),
    ]);
    let (_provisioner, _) = stack::start(
        "prebuilds-provisioner",
        &db,
        &broker,
        &borrowed(&provisioner_env),
    );
    stack::wait_for(
        Duration::from_secs(30),
        "the worker to be ready",
        || async { matches!(http_get(worker_metrics, "/readyz").await, Some((200, _))) },
    )
    .await;
    let role = ApiRole::grant(&db);
    let api_env = otel_env(&endpoint, "prebuilds-api");
    let (_api, port) = api::start(&role.url, &db, &broker, &borrowed(&api_env)).await;

    let body =
        json!({"user_id": user, "workspace_name": "traced", "preset_id": fx.preset_id}).to_string();
    let answer = api::call(port, "POST", "/api/v1/claims", Some(&claimer), Some(&body)).await;
    assert_eq!(answer.status, 200, "claim: {}", answer.body);

    // The API's request span is the root of the claim's trace.
    let root = eventually(Duration::from_secs(30), "the API's claim span", || {
        let r = received.clone();
        async move {
            r.all().into_iter().find(|s| {
                s.service == "prebuilds-api"
                    && s.name == "POST /api/v1/claims"
                    && s.attributes
                        .get("http.response.status_code")
                        .map(String::as_str)
                        == Some("200")
            })
        }
    })
    .await;
    assert_eq!(root.parent, None, "the claim came without a traceparent");

    // Everything the claim set off lands in that trace: the worker's claim, the replacement's
    // reconcile, the provisioner jobs (the claim build and the replacement prebuild) and the
    // worker's handling of their events.
    let has = |spans: &[Span], service: &str, name: &str| -> usize {
        spans
            .iter()
            .filter(|s| s.service == service && s.name == name)
            .count()
    };
    let spans = eventually(
        Duration::from_secs(60),
        "one trace with the claim, the reconcile, two provisioner jobs and their events",
        || {
            let r = received.clone();
            let trace_id = root.trace_id.clone();
            async move {
                let spans = r.trace(&trace_id);
                let complete = has(&spans, "prebuilds-worker", "claim") == 1
                    && has(&spans, "prebuilds-worker", "reconcile.preset") >= 1
                    && has(&spans, "prebuilds-provisioner", "provisioner.job") >= 2
                    && has(&spans, "prebuilds-worker", "provisioner-events process") >= 4;
                complete.then_some(spans)
            }
        },
    )
    .await;
    // The replacement's provisioner job came out of the reconcile (create of a prebuild); the
    // claim build is a user-lane job out of the claim.
    for queue in ["provisioner-jobs", "provisioner-jobs-user"] {
        assert!(
            spans
                .iter()
                .any(|s| s.service == "prebuilds-provisioner"
                    && s.name == format!("{queue} process")),
            "a delivery of {queue} in the trace"
        );
    }

    // Links: every span's parent is in the trace, and every span descends from the API's.
    // (Spans still arriving are checked on the next read; give the last ones a moment.)
    let spans = eventually(Duration::from_secs(10), "every parent in the trace", || {
        let r = received.clone();
        let trace_id = root.trace_id.clone();
        let root_id = root.span_id.clone();
        async move {
            let spans = r.trace(&trace_id);
            let by_id: HashMap<&str, &Span> =
                spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
            let linked = spans
                .iter()
                .all(|s| root_of(s, &by_id).is_some_and(|r| r.span_id == root_id));
            linked.then(|| spans.clone())
        }
    })
    .await;
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    // Remote hops specifically: a worker delivery's parent is a span of the process that
    // published it.
    let claim_delivery = spans
        .iter()
        .find(|s| s.name == "claims process")
        .expect("the claim's delivery span");
    let parent = by_id[claim_delivery.parent.as_deref().unwrap()];
    assert_eq!(parent.service, "prebuilds-api", "the claim RPC's parent");
    let job = spans
        .iter()
        .find(|s| s.name == "provisioner.job")
        .expect("a provisioner job span");
    let delivery = by_id[job.parent.as_deref().unwrap()];
    let publish = by_id[delivery.parent.as_deref().unwrap()];
    assert_eq!(publish.service, "prebuilds-worker");
    assert!(
        publish.name.starts_with("provisioner.job.") && publish.name.ends_with(" publish"),
        "the job's delivery continues the outbox relay's publish span, not {}",
        publish.name
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_that_does_not_parse_starts_a_new_trace_and_is_not_poison() {
    let (otlp_port, received) = receiver().await;
    let endpoint = format!("http://127.0.0.1:{otlp_port}");
    let (db, broker, preset_id) = empty_preset().await;
    let env = otel_env(&endpoint, "prebuilds-worker");
    let (_worker, metrics) = stack::start("prebuilds-worker", &db, &broker, &borrowed(&env));
    stack::wait_for(
        Duration::from_secs(30),
        "the worker to be ready",
        || async { matches!(http_get(metrics, "/readyz").await, Some((200, _))) },
    )
    .await;

    let job = prebuilds_schemas::CloudEvent::new(
        "test",
        Utc::now(),
        prebuilds_schemas::ReconcilePreset {
            preset_id,
            reason: prebuilds_schemas::ReconcileReason::Manual,
            requested_at: Utc::now(),
        },
    );
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        lapin::types::AMQPValue::LongString("00-not-a-trace-context-at-all".into()),
    );
    headers.insert(
        "tracestate".into(),
        lapin::types::AMQPValue::LongString("vendor=garbage".into()),
    );
    broker
        .channel
        .basic_publish(
            broker.topology.exchange().as_str().into(),
            job.routing_key().as_str().into(),
            BasicPublishOptions::default(),
            &serde_json::to_vec(&job).unwrap(),
            BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(job.id.to_string().as_str().into())
                .with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    // Handled and acknowledged, in a delivery span that is the root of a trace of its own.
    let delivery = eventually(Duration::from_secs(30), "the job's delivery span", || {
        let r = received.clone();
        let id = job.id.to_string();
        async move {
            r.all().into_iter().find(|s| {
                s.name == "reconcile process"
                    && s.attributes.get("messaging.message.id") == Some(&id)
            })
        }
    })
    .await;
    assert_eq!(delivery.parent, None, "a garbage traceparent is no parent");
    assert_eq!(delivery.trace_id.len(), 32);
    let acked = scrape_sum(
        metrics,
        "prebuilds_messages_total",
        &["queue=\"reconcile\"", "outcome=\"ack\""],
    )
    .await
    .unwrap_or(0.0);
    assert_eq!(acked, 1.0, "the job was acknowledged");
    let dead = scrape_sum(metrics, "prebuilds_dead_lettered_total", &[])
        .await
        .unwrap_or(0.0);
    assert_eq!(dead, 0.0, "nothing dead-lettered");
    let dead_queue = broker
        .get(&broker.topology.dead_queue(), Duration::from_millis(200))
        .await;
    assert!(dead_queue.is_none(), "the dead-letter queue is empty");
}

/// A database and a prefix of the test's own with one template whose preset wants no prebuilds.
async fn empty_preset() -> (TestDb, TestBroker, Uuid) {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "tpl", Some(0)).await;
    drop(c);
    (db, broker, fx.preset_id)
}

/// Waits until the worker whose metrics listen on `port` is ready, then asks it for one reconcile
/// of `preset_id`; returns the publisher (close it at the end).
async fn reconcile_once(
    broker: &TestBroker,
    port: u16,
    preset_id: Uuid,
) -> prebuilds_runtime::amqp::Publisher {
    stack::wait_for(
        Duration::from_secs(30),
        "the worker to be ready",
        || async { matches!(http_get(port, "/readyz").await, Some((200, _))) },
    )
    .await;
    let publisher = prebuilds_runtime::amqp::Publisher::new(
        &broker.url,
        "tracing-test",
        broker.topology.clone(),
    );
    stack::request_reconcile(&publisher, preset_id).await;
    publisher
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_still_queued_at_sigterm_are_exported_before_exit() {
    let (otlp_port, received) = receiver().await;
    let endpoint = format!("http://127.0.0.1:{otlp_port}");
    let (db, broker, preset_id) = empty_preset().await;
    let mut env = otel_env(&endpoint, "prebuilds-worker");
    // A batch would wait a minute: only the shutdown flush can send these spans in time.
    env.retain(|(k, _)| *k != "OTEL_BSP_SCHEDULE_DELAY");
    env.push(("OTEL_BSP_SCHEDULE_DELAY", "60000".to_owned()));
    let (mut worker, metrics) = stack::start("prebuilds-worker", &db, &broker, &borrowed(&env));
    let publisher = reconcile_once(&broker, metrics, preset_id).await;
    stack::wait_for(Duration::from_secs(30), "the job acknowledged", || async {
        scrape_sum(
            metrics,
            "prebuilds_messages_total",
            &["queue=\"reconcile\"", "outcome=\"ack\""],
        )
        .await
        .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert!(
        received.all().is_empty(),
        "nothing sent before the batch delay"
    );
    let status = worker
        .terminate(Duration::from_secs(20))
        .await
        .expect("the worker exits on SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let names: Vec<String> = received.all().into_iter().map(|s| s.name).collect();
    assert!(
        names.iter().any(|n| n == "reconcile process")
            && names.iter().any(|n| n == "reconcile.job"),
        "the delivery's spans were flushed at exit: {names:?}"
    );
    publisher.close().await;
}

/// A managed collector: `https://` with a certificate of a CA the system does not trust
/// (`OTEL_EXPORTER_OTLP_CERTIFICATE`), and an API key in `OTEL_EXPORTER_OTLP_HEADERS`. The spans
/// arrive over TLS with the header; the key appears nowhere in the service's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_go_to_an_https_collector_with_its_headers_and_the_key_is_never_printed() {
    let dir = std::env::temp_dir().join(format!("prebuilds-otlp-tls-{}", Uuid::new_v4()));
    let ca = prebuilds_tests::certs::TestCa::new(&dir, "otlp-ca");
    let server = ca.server("collector", &["localhost"]);
    let collector = prebuilds_tests::notify::WebhookReceiver::start_tls(vec![], &server).await;
    // The receiver answers on 127.0.0.1; the certificate names `localhost`, so the name check
    // is exercised.
    let endpoint = collector.url.replace("127.0.0.1", "localhost");
    let key = format!("otlp-key-{}", Uuid::new_v4().simple());
    let (db, broker, preset_id) = empty_preset().await;
    let ca_file = ca.cert.display().to_string();
    let headers = format!("x-api-key={key},x-team=platform%20eng");
    let log = dir.join("worker.log");
    let env: Vec<(&str, &str)> = vec![
        ("PREBUILDS_DB_POOL_SIZE", "4"),
        ("PREBUILDS_LOG_FORMAT", "json"),
        ("RUST_LOG", "debug"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &endpoint),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", &ca_file),
        ("OTEL_EXPORTER_OTLP_HEADERS", &headers),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let (mut worker, port) = stack::start_logged("prebuilds-worker", &db, &broker, &env, &log);
    let publisher = reconcile_once(&broker, port, preset_id).await;
    stack::wait_for(
        Duration::from_secs(30),
        "spans at the https collector",
        || async {
            collector.delivered().iter().any(|r| {
                r.json()["resourceSpans"][0]["scopeSpans"][0]["spans"]
                    .as_array()
                    .is_some_and(|spans| spans.iter().any(|s| s["name"] == "reconcile.job"))
            })
        },
    )
    .await;
    for request in collector.delivered() {
        assert_eq!(request.header("x-api-key"), Some(key.as_str()));
        assert_eq!(request.header("x-team"), Some("platform eng"));
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    let status = worker.terminate(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    publisher.close().await;
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(
        output.contains("exporting spans to"),
        "the start-up says where spans go: {output}"
    );
    assert!(!output.contains(&key), "the collector key was printed");
    let _ = std::fs::remove_dir_all(&dir);
}
