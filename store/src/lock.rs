//! Per-preset serialization. Every transaction that decides about a preset's pool (reconcile,
//! CLI changes that must not interleave with one) first takes this transaction-level advisory lock,
//! so it reads a snapshot no concurrent decision can invalidate. Transaction-level locks only:
//! session-level ones would leak through pooled connections.

use deadpool_postgres::GenericClient;
use uuid::Uuid;

use prebuilds_schemas::locks;

/// Blocks until this transaction holds the preset's lock (released at commit or rollback).
pub async fn lock_preset<C: GenericClient>(
    tx: &C,
    preset_id: Uuid,
) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1)",
        &[&locks::entity(preset_id)],
    )
    .await?;
    Ok(())
}
