//! Cached statements are prepared again once a table they read has grown: generic plans made
//! while a table was nearly empty must not outlive its growth (see
//! `prebuilds_runtime::db::refresh_plans_as_tables_grow`).

use std::time::Duration;

use prebuilds_runtime::db;
use prebuilds_tests::{stack::wait_for, TestDb};
use tokio_util::sync::CancellationToken;

const LOOKUP: &str = "SELECT v FROM plan_probe WHERE id = $1";

/// The server-side name of the pool's cached statement for [`LOOKUP`] (a new name = prepared
/// again). The pool has one connection, so this is the statement its callers use.
async fn statement_name(pool: &deadpool_postgres::Pool) -> String {
    let client = pool.get().await.unwrap();
    client.prepare_cached(LOOKUP).await.unwrap();
    client
        .query_one(
            "SELECT name FROM pg_prepared_statements WHERE statement = $1
             ORDER BY prepare_time DESC LIMIT 1",
            &[&LOOKUP],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn statements_are_prepared_again_when_a_table_doubles_and_only_then() {
    let db = TestDb::new().await;
    let setup = db.connect().await;
    setup
        .batch_execute("CREATE TABLE plan_probe (id int PRIMARY KEY, v int NOT NULL)")
        .await
        .unwrap();
    let pool = db::pool(&db.url, 1).unwrap();
    let first = statement_name(&pool).await;

    let stop = CancellationToken::new();
    let refresher = tokio::spawn(db::refresh_plans_as_tables_grow(
        pool.clone(),
        &["plan_probe"],
        Duration::from_millis(50),
        stop.clone(),
    ));
    // A few checks with the table unchanged: the cached statement stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(statement_name(&pool).await, first, "no growth, no refresh");

    // Grow far past the threshold (thousands of pages).
    setup
        .batch_execute("INSERT INTO plan_probe SELECT i, i FROM generate_series(1, 200000) i")
        .await
        .unwrap();
    wait_for(
        Duration::from_secs(10),
        "the statement prepared again",
        || async { statement_name(&pool).await != first },
    )
    .await;
    // The fresh plan is an index lookup, not the scan an empty table invited.
    let name = statement_name(&pool).await;
    let client = pool.get().await.unwrap();
    let plan = client
        .query(&format!("EXPLAIN EXECUTE {name}(42)"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(plan.contains("Index"), "{plan}");
    stop.cancel();
    refresher.await.unwrap();
}
