//! `prebuilds_runtime::db::pipelined`: `BEGIN` and `COMMIT` share round trips with the
//! transaction's statements, yet the transaction stays atomic, a failed one writes nothing, and
//! no connection goes back to the pool inside an open transaction.

use deadpool_postgres::Pool;
use prebuilds_runtime::db::{
    self,
    pipelined::{PipelinedTransaction, Step},
};
use prebuilds_tests::TestDb;

const INSERT: &str = "INSERT INTO pipelined_probe (id) VALUES ($1)";

async fn setup() -> (TestDb, Pool) {
    let db = TestDb::new().await;
    db.connect()
        .await
        .batch_execute("CREATE TABLE pipelined_probe (id int PRIMARY KEY)")
        .await
        .unwrap();
    // One connection: every checkout is the connection the previous user gave back.
    let pool = db::pool(&db.url, 1).unwrap();
    (db, pool)
}

async fn ids(db: &TestDb) -> Vec<i32> {
    db.connect()
        .await
        .query("SELECT id FROM pipelined_probe ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether the pool's connection is inside a transaction block: `SAVEPOINT` fails outside one
/// with `no_active_sql_transaction`.
async fn pooled_connection_in_transaction(pool: &Pool) -> bool {
    let client = pool.get().await.unwrap();
    match client.batch_execute("SAVEPOINT probe").await {
        Ok(()) => true,
        Err(e) => e.code() != Some(&tokio_postgres::error::SqlState::NO_ACTIVE_SQL_TRANSACTION),
    }
}

#[tokio::test]
async fn statements_between_begin_and_commit_are_one_transaction() {
    let (db, pool) = setup().await;
    let tx = PipelinedTransaction::new(pool.get().await.unwrap());
    let insert = tx.client().prepare_cached(INSERT).await.unwrap();
    // An id assigned to the current transaction: only if the insert before ran in it.
    let in_tx = tx
        .client()
        .prepare_cached("SELECT pg_current_xact_id_if_assigned() IS NOT NULL")
        .await
        .unwrap();
    let rows = tx
        .begin_with(&[(&insert, &[&1i32]), (&in_tx, &[])])
        .await
        .unwrap();
    assert!(rows[0].is_empty(), "an INSERT returns no rows");
    assert!(
        rows[1][0].get::<_, bool>(0),
        "statements sent with BEGIN run inside the transaction"
    );
    tx.client().execute(&insert, &[&2i32]).await.unwrap();
    assert!(
        ids(&db).await.is_empty(),
        "nothing is visible before COMMIT"
    );
    let counts = tx.commit_with(&[(&insert, &[&3i32])]).await.unwrap();
    assert_eq!(counts, vec![1]);
    assert_eq!(ids(&db).await, vec![1, 2, 3]);
    drop(tx);
    assert_eq!(
        pool.status().size,
        1,
        "a committed transaction keeps its connection"
    );
    assert!(!pooled_connection_in_transaction(&pool).await);
}

#[tokio::test]
async fn a_statement_failing_before_commit_writes_nothing_and_keeps_the_connection() {
    let (db, pool) = setup().await;
    let tx = PipelinedTransaction::new(pool.get().await.unwrap());
    let insert = tx.client().prepare_cached(INSERT).await.unwrap();
    tx.begin_with(&[(&insert, &[&1i32])]).await.unwrap();
    // The second insert violates the primary key; the COMMIT behind it becomes a rollback.
    let err = tx
        .commit_with(&[(&insert, &[&2i32]), (&insert, &[&1i32])])
        .await
        .unwrap_err();
    let db::DbError::Postgres(err) = err else {
        panic!("expected the server's error, got {err}");
    };
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
    );
    drop(tx);
    assert!(
        ids(&db).await.is_empty(),
        "the failed transaction wrote nothing"
    );
    assert_eq!(
        pool.status().size,
        1,
        "the COMMIT answered, so the block is known to be over: the connection is kept"
    );
    assert!(!pooled_connection_in_transaction(&pool).await);
}

/// A parameter that can't be encoded fails on this side, before it reaches the server: were
/// the steps behind it and COMMIT sent anyway, they would commit without it.
#[tokio::test]
async fn a_step_that_cannot_be_encoded_sends_nothing_and_commits_nothing() {
    let (db, pool) = setup().await;
    let tx = PipelinedTransaction::new(pool.get().await.unwrap());
    let insert = tx.client().prepare_cached(INSERT).await.unwrap();
    tx.begin_with(&[(&insert, &[&1i32])]).await.unwrap();
    let wrong_type = tx
        .commit_with(&[(&insert, &[&"two"]), (&insert, &[&3i32])])
        .await
        .unwrap_err();
    assert!(
        matches!(wrong_type, db::DbError::Unexpected(_)),
        "{wrong_type}"
    );
    let wrong_count = tx
        .commit_with(&[(&insert, &[&2i32, &2i32]), (&insert, &[&3i32])])
        .await
        .unwrap_err();
    assert!(
        matches!(wrong_count, db::DbError::Unexpected(_)),
        "{wrong_count}"
    );
    drop(tx);
    assert!(ids(&db).await.is_empty(), "nothing committed");
    assert_eq!(pool.status().size, 0, "the transaction was still open");
}

#[tokio::test]
async fn a_transaction_left_open_closes_its_connection_instead_of_returning_it() {
    let (db, pool) = setup().await;
    // Dropped after BEGIN (an error in between, or the caller's future cancelled).
    let tx = PipelinedTransaction::new(pool.get().await.unwrap());
    let insert = tx.client().prepare_cached(INSERT).await.unwrap();
    tx.begin_with(&[(&insert, &[&1i32])]).await.unwrap();
    drop(tx);
    assert_eq!(pool.status().size, 0, "the open connection left the pool");

    // Cancelled while the first round trip is in flight.
    let client = pool.get().await.unwrap();
    let insert = client.prepare_cached(INSERT).await.unwrap();
    let tx = PipelinedTransaction::new(client);
    {
        let steps: [Step<'_>; 1] = [(&insert, &[&2i32])];
        let begin = tx.begin_with(&steps);
        futures::pin_mut!(begin);
        // One poll sends BEGIN and the insert; then the future is dropped unanswered.
        assert!(futures::poll!(begin.as_mut()).is_pending());
    }
    drop(tx);
    assert_eq!(pool.status().size, 0);

    assert!(ids(&db).await.is_empty(), "the server rolled both back");
    assert!(!pooled_connection_in_transaction(&pool).await);

    // An explicit rollback ends the block and keeps the connection.
    let tx = PipelinedTransaction::new(pool.get().await.unwrap());
    let insert = tx.client().prepare_cached(INSERT).await.unwrap();
    tx.begin_with(&[(&insert, &[&3i32])]).await.unwrap();
    tx.rollback().await.unwrap();
    drop(tx);
    assert_eq!(pool.status().size, 1);
    assert!(ids(&db).await.is_empty());
}
