//! In-flight capacity of prebuild creates (`PREBUILDS_MAX_INFLIGHT_JOBS`,
//! `PREBUILDS_MAX_INFLIGHT_PER_PRESET`): the global capacity lock, the count of in-flight create
//! jobs, and the list of presets held back (`preset_capacity_waits`).
//!
//! Race-freedom: a reconcile about to create takes the global transaction-level advisory lock
//! [`CAPACITY_LOCK_KEY`] *after* its preset lock, then counts. Holders are serialized, and each sees
//! every create committed by the previous one (READ COMMITTED: a new snapshot per statement), so the
//! global cap can never be exceeded by concurrent workers. Reconciles without creates never take it.

use deadpool_postgres::GenericClient;
use prebuilds_core::Capacity;
use prebuilds_runtime::db::cached;
use uuid::Uuid;

/// Advisory-lock key of the global capacity (the registry in `prebuilds_schemas::locks`).
pub const CAPACITY_LOCK_KEY: i64 = prebuilds_schemas::locks::Fixed::Capacity.key();

/// Takes the global capacity lock (released at commit) and counts the in-flight creates.
/// Without a global cap no lock is taken (the per-preset cap needs only the preset's lock, which
/// the caller holds).
pub async fn count_inflight<C: GenericClient>(
    tx: &C,
    preset_id: Uuid,
    max_inflight: u32,
    max_per_preset: u32,
) -> Result<Capacity, tokio_postgres::Error> {
    if max_inflight > 0 {
        cached::execute(
            tx,
            "SELECT pg_advisory_xact_lock($1)",
            &[&CAPACITY_LOCK_KEY],
        )
        .await?;
    }
    let statement = tx
        .prepare_cached(include_str!("sql/capacity_inflight.sql"))
        .await?;
    let row = tx.query_one(&statement, &[&preset_id]).await?;
    let count = |name: &str| u32::try_from(row.get::<_, i64>(name)).unwrap_or(u32::MAX);
    Ok(Capacity {
        max_inflight,
        inflight: count("inflight"),
        max_per_preset,
        preset_inflight: count("preset_inflight"),
        others_waiting: count("others_waiting"),
    })
}

/// Records that the preset was held back (keeps its place when already waiting), or that it got
/// everything it asked for (removes it).
pub async fn set_waiting<C: GenericClient>(
    tx: &C,
    preset_id: Uuid,
    waiting: bool,
) -> Result<(), tokio_postgres::Error> {
    if waiting {
        cached::execute(tx, include_str!("sql/capacity_wait_set.sql"), &[&preset_id]).await?;
    } else {
        cached::execute(
            tx,
            include_str!("sql/capacity_wait_clear.sql"),
            &[&preset_id],
        )
        .await?;
    }
    Ok(())
}

/// Takes up to `n` presets off the wait list, oldest first (see `sql/capacity_wake.sql`), under
/// the global capacity lock: a reconcile that counted the capacity before this completion and is
/// recording its wait has committed by then (its row is seen and woken), and one that counts after
/// sees the freed slot — so no held-back preset is missed by the last completion.
pub async fn take_waiting<C: GenericClient>(
    tx: &C,
    n: i64,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    cached::execute(
        tx,
        "SELECT pg_advisory_xact_lock($1)",
        &[&CAPACITY_LOCK_KEY],
    )
    .await?;
    let rows = cached::query(tx, include_str!("sql/capacity_wake.sql"), &[&n]).await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}
