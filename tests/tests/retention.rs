//! Retention (`scheduler/src/retention.rs`) on the real PostgreSQL: each growing table loses its
//! rows past the window and keeps the rest, in bounded batches; an open job keeps its log lines and
//! a notification with a delivery still under way is kept whatever its age; `off` keeps a table.

use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use prebuilds_scheduler::{
    metrics::SchedulerMetrics,
    retention::{Retention, RetentionConfig, Table, RETENTION_BATCH},
};
use prebuilds_schemas::RESOURCE_REPLACED_TEMPLATE_ID;
use prebuilds_tests::{
    fixtures::{self, PrebuildSpec},
    TestDb,
};
use uuid::Uuid;

const DAY: Duration = Duration::from_secs(86_400);

fn retention(db: &TestDb, config: RetentionConfig) -> Retention {
    Retention {
        pool: db.pool.clone(),
        config,
        metrics: SchedulerMetrics::register(&prometheus::Registry::new()).unwrap(),
    }
}

fn windows(days: u64) -> RetentionConfig {
    RetentionConfig {
        processed_messages: Some(DAY * days as u32),
        claim_requests: Some(DAY * days as u32),
        job_logs: Some(DAY * days as u32),
        notifications: Some(DAY * days as u32),
        interval: Duration::from_secs(600),
    }
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    let c = db.pool.get().await.unwrap();
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// `n` processed message ids recorded at `at`.
async fn processed(db: &TestDb, n: i64, at: DateTime<Utc>) {
    let c = db.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO processed_messages (consumer, message_id, processed_at)
         SELECT 'retention-test', gen_random_uuid(), $2 FROM generate_series(1, $1::bigint)",
        &[&n, &at],
    )
    .await
    .unwrap();
}

async fn claim_request(db: &TestDb, at: DateTime<Utc>) {
    let c = db.pool.get().await.unwrap();
    c.execute(
        "INSERT INTO claim_requests (request_id, outcome, reply, created_at)
         VALUES (gen_random_uuid(), 'no_eligible_prebuild', '{}', $1)",
        &[&at],
    )
    .await
    .unwrap();
}

/// A job in `status` with one log line written at `at`.
async fn job_with_log(db: &TestDb, status: &'static str, at: DateTime<Utc>) -> Uuid {
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, &format!("org-{}", Uuid::new_v4())).await;
    let fx = fixtures::template_with_preset(&c, org, "tpl", Some(1)).await;
    let workspace = fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec {
            transition: "start",
            job_status: status,
            created_at: at,
            ready: false,
        },
    )
    .await;
    let job: Uuid = fixtures::latest_job(&c, workspace).await;
    c.execute(
        "INSERT INTO provisioner_job_logs (job_id, created_at, level, output) VALUES ($1, $2, 'info', 'line')",
        &[&job, &at],
    )
    .await
    .unwrap();
    job
}

/// A notification created at `at` with one delivery in `delivery_status`.
async fn notification(db: &TestDb, delivery_status: &str, at: DateTime<Utc>) -> Uuid {
    let c = db.pool.get().await.unwrap();
    let user = fixtures::user(&c, &format!("u-{}", Uuid::new_v4()), true).await;
    let id = Uuid::new_v4();
    c.execute(
        "INSERT INTO notification_messages (id, notification_template_id, user_id, payload, dedupe_key, created_at)
         VALUES ($1, $2, $3, '{}', $4, $5)",
        &[&id, &RESOURCE_REPLACED_TEMPLATE_ID, &user, &id.to_string(), &at],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO notification_deliveries (id, notification_id, channel, recipient, status, created_at)
         VALUES (gen_random_uuid(), $1, 'email', 'a@example.com', $2, $3)",
        &[&id, &delivery_status, &at],
    )
    .await
    .unwrap();
    id
}

#[tokio::test]
async fn rows_past_their_window_go_and_the_rest_stay() {
    let db = TestDb::new().await;
    let now = Utc::now();
    let old = now - TimeDelta::days(8);
    let recent = now - TimeDelta::days(6);
    processed(&db, 3, old).await;
    processed(&db, 2, recent).await;
    claim_request(&db, old).await;
    claim_request(&db, recent).await;
    let ended = job_with_log(&db, "succeeded", old).await;
    let open = job_with_log(&db, "running", old).await;
    let fresh = job_with_log(&db, "failed", recent).await;
    let sent = notification(&db, "sent", old).await;
    let in_flight = notification(&db, "sending", old).await;
    let new_one = notification(&db, "sent", recent).await;

    let deleted = retention(&db, windows(7)).pass(now).await.unwrap();
    assert_eq!(
        deleted,
        vec![
            (Table::ProcessedMessages, 3),
            (Table::ClaimRequests, 1),
            (Table::JobLogs, 1),
            (Table::Notifications, 1),
        ]
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'retention-test'"
        )
        .await,
        2
    );
    assert_eq!(count(&db, "SELECT count(*) FROM claim_requests").await, 1);
    let lines = |job: Uuid| {
        let db = &db;
        async move {
            let c = db.pool.get().await.unwrap();
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM provisioner_job_logs WHERE job_id = $1",
                    &[&job],
                )
                .await
                .unwrap()
                .get(0);
            n
        }
    };
    assert_eq!(lines(ended).await, 0, "an ended job's old lines go");
    assert_eq!(lines(open).await, 1, "an open job keeps its lines");
    assert_eq!(lines(fresh).await, 1, "recent lines stay");
    let kept: Vec<Uuid> = db
        .pool
        .get()
        .await
        .unwrap()
        .query("SELECT id FROM notification_messages", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!kept.contains(&sent), "a settled old notification goes");
    assert!(kept.contains(&in_flight), "one still sending stays");
    assert!(kept.contains(&new_one));
    assert_eq!(
        count(
            &db,
            &format!(
                "SELECT count(*) FROM notification_deliveries WHERE notification_id = '{sent}'"
            )
        )
        .await,
        0,
        "its deliveries go with it"
    );

    // A second pass finds nothing more; `off` keeps a table whatever the age.
    let again = retention(&db, windows(7)).pass(now).await.unwrap();
    assert!(again.iter().all(|(_, n)| *n == 0), "{again:?}");
    let forever = RetentionConfig {
        processed_messages: None,
        ..windows(1)
    };
    let deleted = retention(&db, forever).pass(now).await.unwrap();
    assert_eq!(deleted[0], (Table::ProcessedMessages, 0));
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM processed_messages WHERE consumer = 'retention-test'"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_backlog_goes_in_bounded_batches() {
    let db = TestDb::new().await;
    let now = Utc::now();
    processed(&db, 2 * RETENTION_BATCH + 500, now - TimeDelta::days(30)).await;
    let retention = retention(&db, windows(7));
    let mut batches = Vec::new();
    loop {
        let n = retention
            .batch(Table::ProcessedMessages, now)
            .await
            .unwrap();
        batches.push(n);
        if n == 0 {
            break;
        }
    }
    let batch = RETENTION_BATCH as u64;
    assert_eq!(batches, vec![batch, batch, 500, 0]);
    assert_eq!(
        retention
            .metrics
            .retention_deleted
            .with_label_values(&["processed_messages"])
            .get(),
        2 * batch + 500
    );
}
