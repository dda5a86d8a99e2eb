//! `prebuilds-notifier` on the real services, with a webhook receiver and an SMTP sink started by
//! each test (`prebuilds_tests::notify`): a drift on claim reaches every template admin once by
//! webhook and once by e-mail; 503s are retried into exactly one delivery; a 400 is dead-lettered
//! with its reason (and a replay of the dead letter delivers it); duplicated messages and a
//! notifier killed mid-delivery send nothing twice; the notifications queue dead-letters its
//! oldest message when full; TLS receivers are verified against `PREBUILDS_NOTIFY_CA_FILE`, and
//! SMTP credentials come from a file and are never printed. Every wait is on what the receivers,
//! the database or the broker show.

use std::{process::Command, time::Duration};

use chrono::Utc;
use prebuilds_runtime::amqp::{consumer::DEAD_REASON_HEADER, rpc::RpcClient, Publisher, QueueKind};
use prebuilds_schemas::{
    ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent, Notification, Payload,
    RESOURCE_REPLACED_TEMPLATE_ID,
};
use prebuilds_tests::{
    certs::TestCa,
    eventually,
    notify::{Reply, SmtpSink, WebhookReceiver},
    process::binary,
    stack::{self, pool_counts, wait_for},
    Service, TestBroker, TestDb,
};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);
const SECRET: &str = "webhook-test-secret";

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

/// Starts a notifier for the receivers given, with quick retries and a short attempt timeout.
fn notifier(
    db: &TestDb,
    broker: &TestBroker,
    webhook: Option<&WebhookReceiver>,
    smtp: Option<&SmtpSink>,
) -> (Service, u16) {
    let mut env: Vec<(&str, &str)> = vec![
        ("PREBUILDS_NOTIFY_TIMEOUT", "2s"),
        ("PREBUILDS_NOTIFY_RETRY_INITIAL_DELAY", "50ms"),
        ("PREBUILDS_NOTIFY_RETRY_MAX_DELAY", "200ms"),
        ("PREBUILDS_NOTIFY_MAX_ATTEMPTS", "5"),
    ];
    if let Some(webhook) = webhook {
        env.push(("PREBUILDS_NOTIFY_WEBHOOK_URL", &webhook.url));
        env.push(("PREBUILDS_NOTIFY_WEBHOOK_SECRET", SECRET));
    }
    if let Some(smtp) = smtp {
        env.push(("PREBUILDS_SMTP_URL", &smtp.url));
        env.push(("PREBUILDS_NOTIFY_FROM", "Prebuilds <prebuilds@example.com>"));
    }
    stack::start("prebuilds-notifier", db, broker, &env)
}

/// A template admin and a notification for them (as the worker writes it), and its message.
async fn notification(db: &TestDb, username: &str) -> CloudEvent<Notification> {
    let c = db.pool.get().await.unwrap();
    let user = Uuid::new_v4();
    c.execute(
        "INSERT INTO users (id, username, email, rbac_roles) VALUES ($1, $2, $3, '{template-admin}')",
        &[&user, &username, &format!("{username}@example.com")],
    )
    .await
    .unwrap();
    let id = Uuid::new_v4();
    let mut example = Notification::example();
    example.notification_id = id;
    example.user_id = user;
    let payload = serde_json::json!({ "labels": example.labels, "data": example.data });
    c.execute(
        "INSERT INTO notification_messages (id, notification_template_id, user_id, payload, dedupe_key)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &id,
            &RESOURCE_REPLACED_TEMPLATE_ID,
            &user,
            &payload,
            &format!("test:{id}"),
        ],
    )
    .await
    .unwrap();
    CloudEvent::new("test", Utc::now(), example)
}

/// The deliveries of a notification: (channel, status, attempts, last error).
async fn deliveries(db: &TestDb, id: Uuid) -> Vec<(String, String, i32, Option<String>)> {
    let c = db.pool.get().await.unwrap();
    c.query(
        "SELECT channel, status, attempts, last_error FROM notification_deliveries
         WHERE notification_id = $1 ORDER BY channel",
        &[&id],
    )
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

async fn statuses(db: &TestDb, id: Uuid) -> Vec<String> {
    deliveries(db, id)
        .await
        .into_iter()
        .map(|(channel, status, _, _)| format!("{channel}:{status}"))
        .collect()
}

/// The value of one sample line of the notifier's `/metrics`, 0 when absent.
async fn metric(port: u16, sample: &str) -> f64 {
    let Some((_, body)) = stack::http_get(port, "/metrics").await else {
        return 0.0;
    };
    body.lines()
        .find_map(|line| line.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

async fn wait_for_metric(port: u16, sample: &str, value: f64) {
    eventually(WAIT, sample, || async {
        (metric(port, sample).await >= value).then_some(())
    })
    .await;
}

async fn publish(broker: &TestBroker, event: &CloudEvent<Notification>, times: usize) {
    let publisher = Publisher::new(&broker.url, "test", broker.topology.clone());
    for _ in 0..times {
        publisher.publish_event(event).await.expect("publish");
    }
    publisher.close().await;
}

fn verify_signature(request: &prebuilds_tests::notify::Request) {
    let timestamp: i64 = request
        .header("x-prebuilds-timestamp")
        .expect("a timestamp header")
        .parse()
        .unwrap();
    let expected =
        prebuilds_notifier::webhook::signature(SECRET.as_bytes(), timestamp, &request.body);
    assert_eq!(
        request.header("x-prebuilds-signature"),
        Some(expected.as_str()),
        "the signature verifies with the secret"
    );
}

/// Pushes a template whose claims replace a resource (the sim at replacement rate 1), with two
/// template admins who have e-mail addresses; returns (preset id, claimant id).
async fn drift_world(db: &TestDb, broker: &TestBroker) -> (Uuid, Uuid) {
    let dir = std::env::temp_dir().join(format!("prebuilds-notify-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("main.tf"), "# sim backend: not read\n").unwrap();
    std::fs::write(
        dir.join("template.yaml"),
        "organization: acme\ntemplate: drift\nversion: v1\nactivate: true\nsource: ./main.tf\n\
         presets:\n  - name: default\n    prebuilds:\n      instances: 1\n",
    )
    .unwrap();
    ctl(db, broker, &["org", "create", "acme"]);
    for admin in ["admin-a", "admin-b"] {
        let email = format!("{admin}@example.com");
        ctl(
            db,
            broker,
            &[
                "user",
                "create",
                "--username",
                admin,
                "--email",
                &email,
                "--role",
                "template-admin",
            ],
        );
    }
    // A claimant must belong to the template's organization.
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

#[tokio::test]
async fn a_drift_on_claim_reaches_every_template_admin_once_by_webhook_and_once_by_email() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let (preset, alice) = drift_world(&db, &broker).await;
    let receiver = WebhookReceiver::start(vec![]).await;
    let sink = SmtpSink::start().await;
    let (_worker, _) = stack::start("prebuilds-worker", &db, &broker, &[]);
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
    let (_notifier, notifier_port) = notifier(&db, &broker, Some(&receiver), Some(&sink));
    // A reconcile now (no scheduler here). Not `template invalidate`: landing after the push's
    // reconcile had made the prebuild, it left that prebuild counted ready yet unclaimable.
    let publisher = Publisher::new(&broker.url, "notify-reconcile", broker.topology.clone());
    stack::request_reconcile(&publisher, preset).await;
    wait_for(WAIT, "a ready prebuild", || async {
        pool_counts(&db, preset).await.eligible == 1
    })
    .await;

    let rpc = RpcClient::connect(&broker.url, "notify", broker.topology.clone())
        .await
        .unwrap();
    let claimed_at = std::time::Instant::now();
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
    eventually(WAIT, "two webhook POSTs and two e-mails", || async {
        (receiver.delivered().len() >= 2 && sink.mails().len() >= 2).then_some(())
    })
    .await;
    eprintln!(
        "claim reply → both admins notified on both channels: {:?}",
        claimed_at.elapsed()
    );

    // Webhook: one POST per admin, signed, naming template, preset, workspace, owner, resource.
    let posts = receiver.requests();
    assert_eq!(posts.len(), 2, "one POST per admin: {posts:?}");
    let mut users: Vec<String> = Vec::new();
    for post in &posts {
        assert_eq!(post.method, "POST");
        assert_eq!(post.path, "/hook");
        verify_signature(post);
        let json = post.json();
        assert_eq!(json["template"], "resource_replaced");
        assert_eq!(json["labels"]["template"], "drift");
        assert!(json["notification_id"].is_string() && json["data"]["replacements"].is_object());
        let body = json["body"].as_str().unwrap();
        for expected in [
            "drift",
            "default",
            "alice-ws",
            "alice",
            "docker_container.workspace[0]",
        ] {
            assert!(body.contains(expected), "the body names {expected}: {body}");
        }
        assert!(!json["title"].as_str().unwrap().is_empty());
        assert_eq!(
            json["user"]["email"],
            format!("{}@example.com", json["user"]["username"].as_str().unwrap())
        );
        users.push(json["user"]["username"].as_str().unwrap().to_owned());
    }
    users.sort();
    assert_eq!(users, ["admin-a", "admin-b"]);

    // E-mail: one per admin, to their address, with the same title and body.
    let mails = sink.mails();
    assert_eq!(mails.len(), 2, "one e-mail per admin");
    let mut recipients: Vec<String> = mails.iter().flat_map(|m| m.to.clone()).collect();
    recipients.sort();
    assert_eq!(
        recipients,
        ["<admin-a@example.com>", "<admin-b@example.com>"]
    );
    for mail in &mails {
        assert_eq!(mail.from, "<prebuilds@example.com>");
        let text = mail.text();
        for expected in ["drift", "alice-ws", "docker_container.workspace[0]"] {
            assert!(
                text.contains(expected),
                "the e-mail names {expected}: {text}"
            );
        }
        assert!(mail.header("Subject").is_some_and(|s| !s.is_empty()));
        assert!(mail
            .header("Message-ID")
            .is_some_and(|id| id.ends_with("@prebuilds-notifier>")));
    }

    // What was sent, as an operator sees it.
    let listed: serde_json::Value =
        serde_json::from_str(&ctl(&db, &broker, &["notifications", "list", "--json"])).unwrap();
    let rows = listed.as_array().unwrap();
    assert_eq!(rows.len(), 4, "{listed}");
    assert!(rows.iter().all(|r| r["status"] == "sent"), "{listed}");
    let table = ctl(&db, &broker, &["notifications", "list", "--status", "sent"]);
    assert!(
        table.contains("admin-a@example.com") && table.contains("webhook"),
        "{table}"
    );
    wait_for_metric(
        notifier_port,
        "prebuilds_notifications_total{channel=\"email\",outcome=\"sent\"}",
        2.0,
    )
    .await;
    assert_eq!(
        metric(
            notifier_port,
            "prebuilds_notifications_total{channel=\"webhook\",outcome=\"sent\"}"
        )
        .await,
        2.0
    );
}

#[tokio::test]
async fn a_receiver_failing_twice_with_503_gets_exactly_one_successful_delivery() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let receiver = WebhookReceiver::start(vec![
        Reply::Status(503, "busy"),
        Reply::Status(503, "still busy"),
    ])
    .await;
    let (_notifier, port) = notifier(&db, &broker, Some(&receiver), None);
    let event = notification(&db, "admin").await;
    publish(&broker, &event, 1).await;
    let id = event.data.notification_id;
    eventually(WAIT, "the webhook delivery sent", || async {
        (statuses(&db, id).await == ["webhook:sent"]).then_some(())
    })
    .await;
    let requests = receiver.requests();
    assert_eq!(
        requests.iter().map(|r| r.answered).collect::<Vec<_>>(),
        [Some(503), Some(503), Some(200)]
    );
    assert_eq!(receiver.delivered().len(), 1);
    let delivery_ids: Vec<_> = requests
        .iter()
        .map(|r| r.header("x-prebuilds-delivery").unwrap().to_owned())
        .collect();
    assert!(
        delivery_ids.windows(2).all(|w| w[0] == w[1]),
        "every attempt carries the same delivery id: {delivery_ids:?}"
    );
    let (_, _, attempts, last_error) = deliveries(&db, id).await.remove(0);
    assert_eq!(attempts, 3);
    assert!(last_error.unwrap().contains("503"));
    wait_for_metric(
        port,
        "prebuilds_notifications_total{channel=\"webhook\",outcome=\"retried\"}",
        2.0,
    )
    .await;
    assert!(
        broker
            .get(&broker.topology.dead_queue(), Duration::from_millis(200))
            .await
            .is_none(),
        "nothing dead-lettered"
    );
}

#[tokio::test]
async fn a_400_is_dead_lettered_with_its_reason_never_retried_and_a_replay_delivers_it() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let receiver = WebhookReceiver::start(vec![Reply::Status(400, "unknown field 'labels'")]).await;
    let (_notifier, port) = notifier(&db, &broker, Some(&receiver), None);
    let event = notification(&db, "admin").await;
    publish(&broker, &event, 1).await;
    // As an operator reads it (the list leaves the dead letter where it is, for the replay).
    let dead = eventually(WAIT, "a dead letter", || async {
        let listed: serde_json::Value =
            serde_json::from_str(&ctl(&db, &broker, &["dead-letters", "list", "--json"])).unwrap();
        (listed.as_array().unwrap().len() == 1).then(|| listed[0].clone())
    })
    .await;
    assert_eq!(dead["source_queue"], broker.queue(QueueKind::Notifications));
    let reason = dead["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.contains("400") && reason.contains("unknown field 'labels'"),
        "{reason}"
    );
    assert!(
        reason.contains(&event.data.notification_id.to_string()),
        "{reason}"
    );
    assert_eq!(receiver.requests().len(), 1, "a 4xx is never retried");
    let rows = deliveries(&db, event.data.notification_id).await;
    assert_eq!(rows[0].1, "failed");
    assert_eq!(rows[0].2, 1);
    let failed: serde_json::Value = serde_json::from_str(&ctl(
        &db,
        &broker,
        &["notifications", "list", "--status", "failed", "--json"],
    ))
    .unwrap();
    assert!(
        failed[0]["last_error"].as_str().unwrap().contains("400"),
        "{failed}"
    );
    assert_eq!(
        metric(
            port,
            "prebuilds_dead_lettered_total{queue=\"notifications\",reason=\"delivery_failed\"}"
        )
        .await,
        1.0
    );
    // The receiver is fixed (its script is used up: 200 from now on); replaying the dead letter
    // tries the failed delivery again, once.
    ctl(&db, &broker, &["dead-letters", "replay"]);
    eventually(WAIT, "the replayed delivery sent", || async {
        (statuses(&db, event.data.notification_id).await == ["webhook:sent"]).then_some(())
    })
    .await;
    assert_eq!(
        receiver
            .requests()
            .iter()
            .map(|r| r.answered)
            .collect::<Vec<_>>(),
        [Some(400), Some(200)]
    );
}

#[tokio::test]
async fn duplicated_notification_messages_send_nothing_twice() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let receiver = WebhookReceiver::start(vec![]).await;
    let sink = SmtpSink::start().await;
    let (_notifier, port) = notifier(&db, &broker, Some(&receiver), Some(&sink));
    let event = notification(&db, "admin").await;
    // Three copies at once (a relay that published twice after a lost confirm, a replay), …
    publish(&broker, &event, 3).await;
    let acked = "prebuilds_messages_total{outcome=\"ack\",queue=\"notifications\"}";
    wait_for_metric(port, acked, 3.0).await;
    // … and one more after everything was sent.
    publish(&broker, &event, 1).await;
    wait_for_metric(port, acked, 4.0).await;
    assert_eq!(
        statuses(&db, event.data.notification_id).await,
        ["email:sent", "webhook:sent"]
    );
    assert_eq!(receiver.requests().len(), 1, "one POST");
    assert_eq!(sink.mails().len(), 1, "one e-mail");
    assert_eq!(
        metric(
            port,
            "prebuilds_notifications_total{channel=\"webhook\",outcome=\"duplicate\"}"
        )
        .await,
        3.0
    );
}

#[tokio::test]
async fn a_notifier_killed_mid_delivery_sends_nothing_twice() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    // The first POST is held unanswered: the notifier is killed while it waits for the answer.
    let receiver = WebhookReceiver::start(vec![Reply::Hold]).await;
    let sink = SmtpSink::start().await;
    let (mut first, _) = notifier(&db, &broker, Some(&receiver), Some(&sink));
    let event = notification(&db, "admin").await;
    let id = event.data.notification_id;
    publish(&broker, &event, 1).await;
    eventually(WAIT, "the POST held and the e-mail sent", || async {
        (receiver.requests().len() == 1
            && statuses(&db, id).await == ["email:sent", "webhook:sending"])
        .then_some(())
    })
    .await;
    first.kill().await;

    // The message returns to the queue; the next notifier finds the e-mail sent and the webhook
    // held by a dead attempt, waits out its lease, and sends neither again.
    let (_second, port) = notifier(&db, &broker, Some(&receiver), Some(&sink));
    eventually(WAIT, "the webhook delivery marked interrupted", || async {
        (statuses(&db, id).await == ["email:sent", "webhook:interrupted"]).then_some(())
    })
    .await;
    wait_for_metric(
        port,
        "prebuilds_messages_total{outcome=\"ack\",queue=\"notifications\"}",
        1.0,
    )
    .await;
    assert_eq!(receiver.requests().len(), 1, "the webhook got one request");
    assert_eq!(sink.mails().len(), 1, "the e-mail was sent once");
    let interrupted: serde_json::Value = serde_json::from_str(&ctl(
        &db,
        &broker,
        &["notifications", "list", "--status", "interrupted", "--json"],
    ))
    .unwrap();
    assert_eq!(interrupted.as_array().unwrap().len(), 1, "{interrupted}");
    assert_eq!(
        metric(
            port,
            "prebuilds_notifications_total{channel=\"webhook\",outcome=\"interrupted\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn a_full_notifications_queue_dead_letters_its_oldest_message() {
    let broker = TestBroker::undeclared().await;
    let topology = broker.topology.clone().with_notifications_max_length(2);
    topology.declare(&broker.channel).await.expect("declare");
    let publisher = Publisher::new(&broker.url, "test", topology.clone());
    let mut ids = Vec::new();
    for _ in 0..4 {
        let mut data = Notification::example();
        data.notification_id = Uuid::new_v4();
        let event = CloudEvent::new("test", Utc::now(), data);
        ids.push(event.id.to_string());
        publisher.publish_event(&event).await.expect("publish");
    }
    publisher.close().await;
    for expected in &ids[..2] {
        let dead = broker
            .get(&topology.dead_queue(), WAIT)
            .await
            .expect("the oldest notifications dead-lettered");
        assert_eq!(
            dead.delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string()),
            Some(expected.clone())
        );
        let headers = dead.delivery.properties.headers().clone().expect("headers");
        let Some(lapin::types::AMQPValue::LongString(reason)) =
            headers.inner().get("x-first-death-reason")
        else {
            panic!("the broker says why: {headers:?}");
        };
        assert_eq!(reason.as_bytes(), b"maxlen");
    }
    let kept = broker
        .get(&topology.queue(QueueKind::Notifications), WAIT)
        .await
        .expect("the newest are kept");
    assert_eq!(
        kept.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(ids[2].clone())
    );
}

#[tokio::test]
async fn tls_receivers_are_verified_against_the_ca_file_and_smtp_credentials_come_from_a_file() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let dir =
        std::env::temp_dir().join(format!("prebuilds-notify-tls-{}", Uuid::new_v4().simple()));
    let ca = TestCa::new(&dir, "notify-ca");
    let server = ca.server("receivers", &["127.0.0.1"]);
    let receiver = WebhookReceiver::start_tls(vec![], &server).await;
    let smtps = SmtpSink::start_tls(&server).await;
    let starttls = SmtpSink::start_starttls(&server).await;
    let quick = [
        ("PREBUILDS_NOTIFY_TIMEOUT", "2s"),
        ("PREBUILDS_NOTIFY_RETRY_INITIAL_DELAY", "50ms"),
        ("PREBUILDS_NOTIFY_RETRY_MAX_DELAY", "100ms"),
        ("PREBUILDS_NOTIFY_MAX_ATTEMPTS", "2"),
        ("PREBUILDS_NOTIFY_FROM", "prebuilds@example.com"),
    ];

    // 1. Without the CA the receivers' certificates are not trusted: nothing reaches them, and the
    //    deliveries fail naming the certificate.
    let mut env: Vec<(&str, &str)> = quick.to_vec();
    env.push(("PREBUILDS_NOTIFY_WEBHOOK_URL", &receiver.url));
    env.push(("PREBUILDS_SMTP_URL", &smtps.url));
    let (mut untrusting, _) = stack::start("prebuilds-notifier", &db, &broker, &env);
    publish(&broker, &notification(&db, "admin-1").await, 1).await;
    let dead = broker
        .get(&broker.topology.dead_queue(), WAIT)
        .await
        .expect("a dead letter");
    let headers = dead.delivery.properties.headers().clone().expect("headers");
    let Some(lapin::types::AMQPValue::LongString(reason)) = headers.inner().get(DEAD_REASON_HEADER)
    else {
        panic!("a string reason header: {headers:?}");
    };
    let reason = String::from_utf8_lossy(reason.as_bytes()).into_owned();
    assert!(
        reason.contains("webhook: ")
            && reason.contains("email: ")
            && reason.contains("certificate"),
        "{reason}"
    );
    assert!(receiver.requests().is_empty() && smtps.mails().is_empty());
    untrusting.kill().await;

    // 2. With PREBUILDS_NOTIFY_CA_FILE: https, and STARTTLS with credentials read from
    //    PREBUILDS_SMTP_URL_FILE, which never show in the log.
    let url_file = dir.join("smtp-url");
    std::fs::write(
        &url_file,
        format!(
            "smtp://mailer:pw-marker-smtp%21@127.0.0.1:{}?tls=required\n",
            starttls.port
        ),
    )
    .unwrap();
    let ca_file = ca.cert.display().to_string();
    let url_file = url_file.display().to_string();
    let log = dir.join("notifier.log");
    let port = stack::free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut env: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", &db.url),
        ("AMQP_URL", &broker.url),
        ("PREBUILDS_AMQP_PREFIX", broker.prefix()),
        ("PREBUILDS_METRICS_ADDR", &metrics_addr),
        ("PREBUILDS_DB_POOL_SIZE", "4"),
        ("RUST_LOG", "debug"),
        ("PREBUILDS_NOTIFY_CA_FILE", &ca_file),
        ("PREBUILDS_NOTIFY_WEBHOOK_URL", &receiver.url),
        ("PREBUILDS_SMTP_URL_FILE", &url_file),
    ];
    env.extend_from_slice(&quick);
    let mut trusting = Service::start_logged("prebuilds-notifier", &[], &env, &log);
    let second = notification(&db, "admin-2").await;
    publish(&broker, &second, 1).await;
    eventually(WAIT, "delivered over https and STARTTLS", || async {
        (statuses(&db, second.data.notification_id).await == ["email:sent", "webhook:sent"])
            .then_some(())
    })
    .await;
    assert_eq!(receiver.delivered().len(), 1);
    let mails = starttls.mails();
    assert_eq!(mails.len(), 1);
    assert!(mails[0].encrypted, "the message went over TLS");
    assert_eq!(
        mails[0].login,
        Some(("mailer".to_owned(), "pw-marker-smtp!".to_owned())),
        "the credentials of the URL file, percent-decoded, after STARTTLS"
    );
    trusting.terminate(Duration::from_secs(10)).await;
    let printed = std::fs::read_to_string(&log).unwrap();
    assert!(printed.contains("notifier starting"), "{printed}");
    assert!(
        !printed.contains("pw-marker-smtp"),
        "the SMTP password is never printed: {printed}"
    );

    // 3. smtps:// with the CA: TLS from the first byte.
    let mut env: Vec<(&str, &str)> = quick.to_vec();
    env.push(("PREBUILDS_NOTIFY_CA_FILE", &ca_file));
    env.push(("PREBUILDS_SMTP_URL", &smtps.url));
    let (_smtps_notifier, _) = stack::start("prebuilds-notifier", &db, &broker, &env);
    let third = notification(&db, "admin-3").await;
    publish(&broker, &third, 1).await;
    eventually(WAIT, "delivered over smtps", || async {
        (statuses(&db, third.data.notification_id).await == ["email:sent"]).then_some(())
    })
    .await;
    assert!(smtps.mails().iter().all(|m| m.encrypted) && smtps.mails().len() == 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A broker upgraded from a version whose notifications queue had no length limit: RabbitMQ
/// refuses to change a live queue's arguments, so declaring keeps it (and its messages), warns
/// with the policy to apply, declares everything else, and the notifier consumes from it.
#[tokio::test]
async fn a_notifications_queue_of_an_older_version_is_kept_and_consumed() {
    let db = TestDb::new().await;
    let broker = TestBroker::undeclared().await;
    let topology = broker.topology.clone();
    let old = topology.queue(QueueKind::Notifications);
    broker
        .channel
        .queue_declare(
            old.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            topology.work_queue_arguments(),
        )
        .await
        .expect("the old queue");
    let connection = prebuilds_runtime::amqp::connect(&broker.url, "upgrade")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let declared = topology
        .declare(&channel)
        .await
        .expect("declaring keeps the old queue");
    assert_eq!(declared.warnings.len(), 1, "{declared:?}");
    assert!(
        declared.warnings[0].contains("rabbitmqctl set_policy")
            && declared.warnings[0].contains(&old),
        "{declared:?}"
    );
    // Its binding was the old version's; bind it as that version did.
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_bind(
            old.as_str().into(),
            topology.exchange().as_str().into(),
            "notification.*".into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let receiver = WebhookReceiver::start(vec![]).await;
    let (_notifier, _) = notifier(&db, &broker, Some(&receiver), None);
    let event = notification(&db, "admin").await;
    publish(&broker, &event, 1).await;
    eventually(WAIT, "delivered from the old queue", || async {
        (statuses(&db, event.data.notification_id).await == ["webhook:sent"]).then_some(())
    })
    .await;
    assert_eq!(receiver.delivered().len(), 1);
}
