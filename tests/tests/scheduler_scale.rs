//! (f) The cost of one reconcile tick and one pool-metrics refresh at 10,000 presets, measured on
//! the real services. The bound is deliberately generous (debug build, shared CI machine); the
//! figures are printed for the record.

mod scheduler_support;

use std::time::{Duration, Instant};

use prebuilds_tests::{eventually, fixtures, TestBroker, TestDb};
use scheduler_support::*;

const PRESETS: i64 = 10_000;

#[tokio::test]
async fn a_tick_over_10000_presets_publishes_every_job_quickly() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    // 1,000 templates × 10 presets, all on active versions with prebuilds configured.
    c.batch_execute(&format!(
        "INSERT INTO templates (id, organization_id, name)
             SELECT gen_random_uuid(), '{org}', 'tpl-' || g FROM generate_series(1, {t}) g;
         INSERT INTO template_versions (id, template_id, name)
             SELECT gen_random_uuid(), id, 'v1' FROM templates;
         UPDATE templates t SET active_version_id = v.id FROM template_versions v WHERE v.template_id = t.id;
         INSERT INTO template_version_presets (id, template_version_id, name, desired_instances)
             SELECT gen_random_uuid(), v.id, 'preset-' || g, 1
             FROM template_versions v, generate_series(1, 10) g;
         ANALYZE;",
        t = PRESETS / 10
    ))
    .await
    .unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM template_version_presets", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, PRESETS);

    let started = Instant::now();
    let s = Scheduler::start(
        &db,
        &broker,
        &[
            ("PREBUILDS_RECONCILE_INTERVAL", "10m"),
            ("PREBUILDS_METRICS_INTERVAL", "10m"),
        ],
    );
    let m = eventually(Duration::from_secs(120), "the first tick pass", || async {
        let m = s.scrape().await?;
        (m.value("prebuilds_scheduler_last_pass_jobs")? == PRESETS as f64).then_some(m)
    })
    .await;
    let wall = started.elapsed();
    let pass = m
        .value("prebuilds_scheduler_last_pass_duration_seconds")
        .unwrap();
    let depth = eventually(
        Duration::from_secs(30),
        "every job on the queue",
        || async {
            let d = reconcile_queue_depth(&broker).await;
            (d as i64 >= PRESETS).then_some(d)
        },
    )
    .await;
    assert_eq!(depth as i64, PRESETS, "one job per preset, no more");
    let m = eventually(
        Duration::from_secs(120),
        "the first metrics refresh",
        || async {
            let m = s.scrape().await?;
            m.value("coderd_prebuilt_workspaces_metrics_last_updated")?;
            Some(m)
        },
    )
    .await;
    let refresh = m
        .value("prebuilds_scheduler_metrics_refresh_duration_seconds")
        .unwrap();
    let desired = m.matching("coderd_prebuilt_workspaces_desired{").len();
    assert_eq!(desired as i64, PRESETS);
    eprintln!(
        "10,000 presets: tick pass {pass:.3}s (query + 10,000 confirmed publishes), \
         metrics refresh {refresh:.3}s, process start to pass done {wall:?}"
    );
    assert!(pass < 30.0, "tick pass took {pass}s");
    assert!(refresh < 30.0, "metrics refresh took {refresh}s");
}
