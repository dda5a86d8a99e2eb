//! Which presets need a reconcile, and requesting reconciles through the outbox.

use deadpool_postgres::GenericClient;
use prebuilds_runtime::outbox;
use prebuilds_schemas::{CloudEvent, ReconcilePreset, ReconcileReason};
use uuid::Uuid;

/// Presets with prebuilds configured on active versions, plus presets that still have live
/// prebuilds (docs/architecture.md).
pub async fn presets_needing_attention<C: GenericClient>(
    c: &C,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let rows = c
        .query(include_str!("sql/presets_needing_attention.sql"), &[])
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Writes one `reconcile.preset` job per preset to the outbox, in the caller's transaction.
/// `requested_at` is the database's clock at this statement, so it is comparable with the
/// worker's coalescing watermark (also the database's clock).
pub async fn request_reconciles<C: GenericClient>(
    c: &C,
    preset_ids: &[Uuid],
    reason: ReconcileReason,
    source: &str,
) -> Result<(), tokio_postgres::Error> {
    if preset_ids.is_empty() {
        return Ok(());
    }
    let now: chrono::DateTime<chrono::Utc> =
        c.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    for preset_id in preset_ids {
        let event = CloudEvent::new(
            source,
            now,
            ReconcilePreset {
                preset_id: *preset_id,
                reason,
                requested_at: now,
            },
        );
        outbox::enqueue(c, &event).await?;
    }
    Ok(())
}
