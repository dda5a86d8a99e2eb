//! The SQL migrations in `schemas/migrations`, embedded at compile time, and the one way to apply
//! them. Applying is serialised across processes by a session-level advisory lock held on the
//! dedicated connection passed in (refinery itself has no cross-process lock), so two `migrate`
//! commands started at once both succeed and the second finds nothing to do.

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory-lock key serialising migration runs ("prebuilds-migrate").
pub const MIGRATION_LOCK_KEY: i64 = 0x7072_6562_6d69_6772;

/// Applies every pending migration; returns the names of those applied by this call.
///
/// `client` must be a dedicated connection (not pooled): the session-level lock is released when
/// the function unlocks it or when the connection closes.
pub async fn run(client: &mut tokio_postgres::Client) -> Result<Vec<String>, MigrationError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(MigrationError::Lock)?;
    let outcome = embedded::migrations::runner()
        .set_abort_divergent(true)
        .run_async(client)
        .await;
    // Unlock whatever happened; if this fails, closing the connection releases the lock anyway.
    let _ = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK_KEY])
        .await;
    let report = outcome.map_err(|e| MigrationError::Apply(Box::new(e)))?;
    Ok(report
        .applied_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect())
}

/// Names of every embedded migration, in order.
pub fn embedded_names() -> Vec<String> {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| m.to_string())
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("could not take the migration lock: {0}")]
    Lock(tokio_postgres::Error),
    #[error("migration failed: {}", describe(.0))]
    Apply(Box<refinery::Error>),
}

/// refinery's `Display` drops the database's message; include it.
fn describe(e: &refinery::Error) -> String {
    match std::error::Error::source(e.kind()) {
        Some(source) => format!("{e}: {source}"),
        None => format!("{e}: {:?}", e.kind()),
    }
}
