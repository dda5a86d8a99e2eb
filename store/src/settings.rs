//! The global settings row (`prebuilds_settings`): reconciliation pause.

use deadpool_postgres::GenericClient;

pub async fn reconciliation_paused<C: GenericClient>(c: &C) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_opt(include_str!("sql/settings_paused.sql"), &[])
        .await?;
    Ok(row.map(|r| r.get(0)).unwrap_or(false))
}

/// Sets the global pause; returns whether it changed.
pub async fn set_reconciliation_paused<C: GenericClient>(
    c: &C,
    paused: bool,
) -> Result<bool, tokio_postgres::Error> {
    let changed = c
        .execute(include_str!("sql/settings_set_paused.sql"), &[&paused])
        .await?;
    Ok(changed > 0)
}
