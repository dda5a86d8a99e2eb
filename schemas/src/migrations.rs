//! The SQL migrations in `schemas/migrations`, embedded at compile time, and the one way to apply
//! them. Applying is serialised across processes by a session-level advisory lock held on the
//! dedicated connection passed in (refinery itself has no cross-process lock), so two `migrate`
//! commands started at once both succeed and the second finds nothing to do.
//!
//! Services check the other direction at start-up ([`check_schema`]): a database whose schema is
//! older than the newest migration embedded in the binary is refused with a message that says to
//! run `prebuildsctl migrate`; a newer schema is fine (migrations only expand while older
//! versions still run, UPGRADING.md).

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Advisory-lock key serialising migration runs.
pub const MIGRATION_LOCK_KEY: i64 = crate::locks::Fixed::Migrations.key();

/// Applies every pending migration; returns the names of those applied by this call.
///
/// `client` must be a dedicated connection (not pooled): the session-level lock is released when
/// the function unlocks it or when the connection closes.
pub async fn run(client: &mut tokio_postgres::Client) -> Result<Vec<String>, MigrationError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
        .await
        .map_err(MigrationError::Lock)?;
    // Session-wide, so it bounds every migration's transaction (refinery opens one per file).
    client
        .batch_execute(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'"))
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

/// How long one migration may wait for a table lock before it fails, unless a migration sets its
/// own `lock_timeout`. A migration queued behind a long transaction would otherwise hold every
/// later statement on that table behind it; failing fast leaves the service running, and
/// `prebuildsctl migrate` can simply be run again.
pub const LOCK_TIMEOUT: &str = "5s";

/// The newest embedded migration: the schema version this build needs.
pub fn required_version() -> i32 {
    embedded::migrations::runner()
        .get_migrations()
        .iter()
        .map(|m| i32::try_from(m.version()).expect("migration versions are small"))
        .max()
        .unwrap_or(0)
}

/// Why a service must not start against this database.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    #[error(
        "the database schema is at version {found}, older than version {required} that this          build needs: run `prebuildsctl migrate` (as the operator) before starting it"
    )]
    Behind { found: String, required: i32 },
    #[error("could not read the database schema version: {0}")]
    Read(tokio_postgres::Error),
}

/// Refuses a schema older than [`required_version`]. Reads `prebuilds_schema_version()` (V7), so
/// it needs no grant on refinery's history table; its absence means a schema older than V7, and
/// an empty database has it not either.
pub async fn check_schema(client: &impl tokio_postgres::GenericClient) -> Result<i32, SchemaError> {
    let required = required_version();
    match client
        .query_one("SELECT prebuilds_schema_version()", &[])
        .await
    {
        Ok(row) => {
            let found: Option<i32> = row.get(0);
            match found {
                Some(found) if found >= required => Ok(found),
                found => Err(SchemaError::Behind {
                    found: found.map_or("no migration applied".to_owned(), |v| {
                        format!("it is at version {v}")
                    }),
                    required,
                }),
            }
        }
        Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_FUNCTION) => {
            Err(SchemaError::Behind {
                found: "it predates version 7, or was never migrated".to_owned(),
                required,
            })
        }
        Err(e) => Err(SchemaError::Read(e)),
    }
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
