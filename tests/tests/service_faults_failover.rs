//! Database failover on private servers of the test's own (`private_postgres`: a primary and a
//! streaming standby on spare ports, own data directories; the machine's server on 5432 is never
//! stopped). The name starts with `service_faults`, so `scripts/test` runs it in its serial step.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use prebuilds_runtime::db;
use prebuilds_tests::{private_postgres::PrivatePostgres, probe, stack, TestBroker, TestDb};

/// The backend pid of a pooled connection.
async fn backend(pool: &deadpool_postgres::Pool) -> (deadpool_postgres::Object, i32) {
    let client = pool.get().await.expect("pooled connection");
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    (client, pid)
}

/// A session that answers "read-only" (SQLSTATE 25006) — as every session on a demoted primary
/// does — makes the pool drop every connection made before that answer: the next checkouts get
/// new sessions, not the old ones.
#[tokio::test]
async fn pooled_connections_made_before_a_read_only_answer_are_dropped_not_reused() {
    let db = TestDb::new().await;
    let pool = db::pool(&db.url, 2).expect("pool");
    let (a, first) = backend(&pool).await;
    let (b, second) = backend(&pool).await;
    drop((a, b));
    let old: HashSet<i32> = [first, second].into();

    let client = pool.get().await.expect("pooled connection");
    client
        .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
        .await
        .expect("read-only session");
    let refused = client
        .batch_execute("CREATE TABLE read_only_probe (x int)")
        .await
        .expect_err("a read-only session refuses writes");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );
    // How every caller classifies a database error.
    assert!(db::DbError::from(refused).is_transient());
    drop(client);

    let (c, third) = backend(&pool).await;
    let (d, fourth) = backend(&pool).await;
    assert!(
        !old.contains(&third) && !old.contains(&fourth),
        "old sessions {old:?} reused: {third}, {fourth}"
    );
    let writable: String = c
        .query_one("SHOW transaction_read_only", &[])
        .await
        .expect("show")
        .get(0);
    assert_eq!(writable, "off");
    drop((c, d));
}

/// The sum of a metric over processes' `/metrics` (a process that does not answer counts 0).
async fn sum(ports: &[u16], name: &str) -> f64 {
    let mut total = 0.0;
    for port in ports {
        total += probe::scrape_sum(*port, name, &[]).await.unwrap_or(0.0);
    }
    total
}

/// A primary and its streaming standby; a worker, two schedulers and the sim provisioner all
/// on the multi-host URL `postgresql://…primary…,…standby…/db?target_session_attrs=read-write`.
/// Mid-fill the primary crashes (`pg_ctl stop -m immediate`) and the standby is promoted. Writes
/// resume on the new primary (every pool converges there), a scheduler leads again within the
/// bound README gives, no session to the dead server is used again, and nothing valid is
/// dead-lettered.
#[tokio::test]
async fn a_primary_failover_mid_fill_moves_writes_and_the_leader_to_the_promoted_standby() {
    const PRESETS: usize = 40;
    let primary = PrivatePostgres::start();
    let mut db = TestDb::on(&primary.server_url()).await;
    let standby = PrivatePostgres::standby_of(&primary);
    let multi = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
        primary.port, standby.port, db.name
    );
    let presets = {
        let c = db.connect().await;
        prebuilds_tests::bulk::world(&c, PRESETS, 1, 0)
            .await
            .expect("presets")
    };
    // Everything the test reads and every service goes through the multi-host URL from here on.
    db.pool = db::pool(&multi, 4).expect("pool");
    db.url = multi.clone();
    let broker = TestBroker::new().await;
    let env = [
        ("PREBUILDS_SIM_DURATION_MIN", "200ms"),
        ("PREBUILDS_SIM_DURATION_MAX", "800ms"),
        ("PREBUILDS_SIM_AGENT_READY_DELAY", "0"),
        ("PREBUILDS_RECONCILE_INTERVAL", "1s"),
        ("PREBUILDS_LOCK_RETRY_INTERVAL", "1s"),
        ("PREBUILDS_RETRY_WINDOW", "5s"),
        ("RUST_LOG", "warn"),
    ];
    let (_worker, worker_port) = stack::start("prebuilds-worker", &db, &broker, &env);
    let (_provisioner, provisioner_port) =
        stack::start("prebuilds-provisioner", &db, &broker, &env);
    let (_s1, s1) = stack::start("prebuilds-scheduler", &db, &broker, &env);
    let (_s2, s2) = stack::start("prebuilds-scheduler", &db, &broker, &env);
    let schedulers = [s1, s2];
    for port in [worker_port, provisioner_port, s1, s2] {
        assert!(
            probe::ready_within(port, Duration::from_secs(60)).await,
            "service on {port} ready"
        );
    }
    let made = || async {
        let c = db.pool.get().await.ok()?;
        c.query_one(
            "SELECT count(*) FROM workspaces WHERE owner_id = $1",
            &[&prebuilds_schemas::PREBUILDS_USER_ID],
        )
        .await
        .ok()
        .map(|r| r.get::<_, i64>(0))
    };
    stack::wait_for(Duration::from_secs(60), "a quarter of the fill", || async {
        made().await.unwrap_or(0) >= (PRESETS / 4) as i64
    })
    .await;
    assert_eq!(sum(&schedulers, "prebuilds_scheduler_is_leader").await, 1.0);
    let terms_before = sum(&schedulers, "prebuilds_scheduler_leader_terms_total").await;

    // The primary dies; the standby is promoted.
    primary.crash();
    let failed_at = Instant::now();
    standby.promote();
    let promoted_after = failed_at.elapsed();

    // A new leader term on the new primary, within the bound.
    stack::wait_for(Duration::from_secs(60), "a new leader", || async {
        sum(&schedulers, "prebuilds_scheduler_leader_terms_total").await > terms_before
            && sum(&schedulers, "prebuilds_scheduler_is_leader").await == 1.0
    })
    .await;
    let leader_after = failed_at.elapsed();

    // Writes resume on the new primary: every pool converges there.
    let full = || stack::all_settled_at_one(&db, &presets);
    stack::wait_for(
        Duration::from_secs(120),
        "converged on the new primary",
        full,
    )
    .await;
    let converged_after = failed_at.elapsed();
    for preset in &presets {
        let counts = stack::pool_counts(&db, *preset).await;
        assert_eq!(counts.created, 1, "preset {preset}: nothing made twice");
    }
    // Nothing valid dead-lettered.
    let dead = broker
        .drain(&broker.topology.dead_queue(), Duration::from_secs(2))
        .await;
    assert!(dead.is_empty(), "{} dead-lettered", dead.len());
    assert!(!primary.running(), "the old primary stays down");
    eprintln!(
        "failover: promoted {:.1}s after the crash, a leader again after {:.1}s, converged after {:.1}s",
        promoted_after.as_secs_f64(),
        leader_after.as_secs_f64(),
        converged_after.as_secs_f64()
    );
    // Leader bound (README): the old session is gone at once (a crashed server resets it); a
    // standby's next attempt (lock retry interval 1 s) connects to the new primary within one
    // connect timeout per host.
    assert!(
        leader_after < promoted_after + Duration::from_secs(1 + 11 + 2),
        "leader after {leader_after:?}"
    );
}
