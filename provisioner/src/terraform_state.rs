//! Where the terraform backend keeps each workspace's Terraform state.
//!
//! - **`pg`** (the default): terraform's own `pg` backend, in a schema of a PostgreSQL database
//!   given by `PREBUILDS_TERRAFORM_STATE_DATABASE_URL`, one terraform workspace (a row of
//!   `<schema>.states`) per prebuilds workspace, named by its id. Any replica can therefore resume
//!   any job: a job redelivered to another replica after a crash plans against the state the first
//!   one left (terraform saves it while an apply runs, at most every 20 s, and at its end) instead
//!   of creating everything again. Terraform takes the backend's lock (a PostgreSQL advisory lock
//!   on the state row) for every command that writes state, and waits for it up to
//!   `--terraform-timeout` (`-lock-timeout`), so two replicas never apply one workspace at once.
//! - **`local`**: `terraform.tfstate` in the workspace's working directory on this replica's disk;
//!   for a single replica with a persistent working directory.
//!
//! The state database URL is handed to terraform (as `PG_CONN_STR`), and so to everything a
//! template runs: it must name a role that may do nothing but read and write the state table,
//! never the provisioner's own `DATABASE_URL` (refused at start-up). The provisioner prepares the
//! schema's table itself ([`PgState::prepare`]), so terraform runs with its schema, table and
//! index creation switched off and needs no privilege beyond that table.

use anyhow::Context;
use clap::ValueEnum;
use deadpool_postgres::Pool;
use prebuilds_runtime::{config::Secret, db};
use uuid::Uuid;

use crate::backend::RunError;

/// Which state store the terraform backend uses (`--terraform-state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StateKind {
    /// Terraform's `pg` backend in PostgreSQL: shared by every replica.
    Pg,
    /// `terraform.tfstate` in the working directory: this replica only.
    Local,
}

/// The state store as configured.
#[derive(Debug, Clone)]
pub enum StateConfig {
    Local,
    Pg { url: Secret, schema: String },
}

/// The file the provisioner writes beside the template's `main.tf` to select the `pg` backend
/// (its settings come from the environment: [`PgState::environment`]).
pub const BACKEND_FILE: &str = "prebuilds_backend.tf";

/// The contents of [`BACKEND_FILE`].
pub const BACKEND_BLOCK: &str = "\
# Written by prebuilds-provisioner: this workspace's Terraform state lives in PostgreSQL
# (PREBUILDS_TERRAFORM_STATE=pg); the connection and schema come from the environment.
terraform {
  backend \"pg\" {}
}
";

/// The default state schema of a deployment: `<prefix>_terraform_state`, the AMQP prefix with
/// every character that is not a lowercase letter, digit or `_` replaced by `_` (so deployments
/// that share a database keep their states apart).
pub fn default_schema(prefix: &str) -> String {
    // 63 bytes at most in all: room for the suffix and a leading `_`.
    let clean: String = prefix
        .chars()
        .take(46)
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let schema = format!("{clean}_terraform_state");
    if schema.starts_with(|c: char| c.is_ascii_digit()) {
        format!("_{schema}")
    } else {
        schema
    }
}

/// A schema name the provisioner can use unquoted in SQL and pass to terraform: lowercase letters,
/// digits and `_`, not starting with a digit, at most 63 bytes (PostgreSQL's limit).
pub fn check_schema(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "--terraform-state-schema (PREBUILDS_TERRAFORM_STATE_SCHEMA) is {name:?}: use lowercase \
             letters, digits and `_`, not starting with a digit, at most 63 characters"
        ))
    }
}

/// The `pg` state store: its connection (for the provisioner's own checks) and settings.
#[derive(Debug)]
pub struct PgState {
    url: Secret,
    schema: String,
    pool: Pool,
}

impl PgState {
    pub fn new(url: Secret, schema: String) -> anyhow::Result<PgState> {
        // Two connections: start-up preparation and the "is there a state to destroy" check.
        let pool = db::pool(url.expose(), 2)
            .map_err(|e| anyhow::anyhow!("PREBUILDS_TERRAFORM_STATE_DATABASE_URL ({url}): {e}"))?;
        Ok(PgState { url, schema, pool })
    }

    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// What terraform's `pg` backend reads from its environment: where the state is, and that the
    /// schema, table and index exist already (prepared here), so it creates nothing.
    pub fn environment(&self) -> [(&'static str, &str); 5] {
        [
            ("PG_CONN_STR", self.url.expose()),
            ("PG_SCHEMA_NAME", self.schema.as_str()),
            ("PG_SKIP_SCHEMA_CREATION", "true"),
            ("PG_SKIP_TABLE_CREATION", "true"),
            ("PG_SKIP_INDEX_CREATION", "true"),
        ]
    }

    /// Makes sure the state table exists and this role may use it, once at start-up. Creates the
    /// schema when it is missing (the role needs `CREATE` on the database for that; an operator
    /// can instead create it with `CREATE SCHEMA <schema> AUTHORIZATION <role>`, as
    /// `deploy/postgres/roles.sql` does) and the table when the role owns the schema. Replicas
    /// starting together serialise on a transaction-scoped advisory lock.
    pub async fn prepare(&self) -> anyhow::Result<()> {
        let schema = &self.schema;
        let mut client = self.pool.get().await.map_err(|e| {
            anyhow::anyhow!(
                "cannot connect to the terraform state database \
                 (PREBUILDS_TERRAFORM_STATE_DATABASE_URL {}): {}",
                self.url,
                db::describe_pool(&e)
            )
        })?;
        let tx = client.transaction().await.map_err(describe)?;
        let lock = format!(
            "SELECT pg_advisory_xact_lock({})",
            prebuilds_schemas::locks::TERRAFORM_STATE_KEY_SQL
        );
        tx.execute(&lock, &[schema]).await.map_err(describe)?;
        let row = tx
            .query_one(include_str!("sql/state_schema_exists.sql"), &[schema])
            .await
            .map_err(describe)?;
        let (schema_exists, table_exists, role): (bool, bool, String) =
            (row.get(0), row.get(1), row.get(2));
        if !schema_exists {
            tx.batch_execute(&format!("CREATE SCHEMA {schema}"))
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the terraform state schema {schema} does not exist and role {role} may \
                         not create it ({}): create it as a superuser with `CREATE SCHEMA \
                         {schema} AUTHORIZATION {role}` (deploy/postgres/roles.sql does), or set \
                         --terraform-state-schema",
                        db::describe_postgres(&e)
                    )
                })?;
        }
        if !table_exists {
            // Terraform's own layout of the pg backend's table; the id sequence is the schema's
            // own, so the role needs nothing in schema public.
            tx.batch_execute(&format!(
                "CREATE SEQUENCE {schema}.states_id_seq AS bigint;
                 CREATE TABLE {schema}.states (
                     id   bigint NOT NULL DEFAULT nextval('{schema}.states_id_seq') PRIMARY KEY,
                     name text UNIQUE,
                     data text
                 );
                 ALTER SEQUENCE {schema}.states_id_seq OWNED BY {schema}.states.id;"
            ))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot create the terraform state table {schema}.states as role {role} ({}): \
                     the role needs to own schema {schema} (`ALTER SCHEMA {schema} OWNER TO \
                     {role}`)",
                    db::describe_postgres(&e)
                )
            })?;
        }
        let row = tx
            .query_one(include_str!("sql/state_privileges.sql"), &[schema])
            .await
            .map_err(describe)?;
        let (table_ok, sequence_ok): (bool, bool) = (row.get(0), row.get(1));
        anyhow::ensure!(
            table_ok && sequence_ok,
            "role {role} may not use the terraform state table {schema}.states: grant it SELECT, \
             INSERT, UPDATE, DELETE on the table and USAGE on its id sequence (or make it the \
             schema's owner)"
        );
        tx.commit().await.map_err(describe)?;
        Ok(())
    }

    /// Whether the state store holds a state for `workspace` (a delete has something to destroy).
    pub async fn exists(&self, workspace: Uuid) -> Result<bool, RunError> {
        let client = self.pool.get().await.map_err(|e| {
            RunError::Transient(anyhow::anyhow!(
                "reading the terraform state: PostgreSQL pool: {}",
                db::describe_pool(&e)
            ))
        })?;
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {}.states WHERE name = $1)",
            self.schema
        );
        let row = client
            .query_one(&sql, &[&workspace.to_string()])
            .await
            .map_err(|e| {
                RunError::Transient(anyhow::anyhow!(
                    "reading the terraform state: {}",
                    db::describe_postgres(&e)
                ))
            })?;
        Ok(row.get(0))
    }
}

fn describe(e: deadpool_postgres::tokio_postgres::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "preparing the terraform state store: {}",
        db::describe_postgres(&e)
    )
}

/// The state store in use.
#[derive(Debug)]
pub enum StateStore {
    Local,
    Pg(PgState),
}

impl StateStore {
    pub fn open(config: &StateConfig) -> anyhow::Result<StateStore> {
        Ok(match config {
            StateConfig::Local => StateStore::Local,
            StateConfig::Pg { url, schema } => StateStore::Pg(
                PgState::new(url.clone(), schema.clone())
                    .context("opening the terraform state store")?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schema_follows_the_prefix_and_is_always_valid() {
        assert_eq!(default_schema("prebuilds"), "prebuilds_terraform_state");
        assert_eq!(default_schema("Team-A.prod"), "team_a_prod_terraform_state");
        assert_eq!(default_schema("1st"), "_1st_terraform_state");
        let long = "p".repeat(80);
        for prefix in [
            "prebuilds",
            "Team-A.prod",
            "1st",
            "ünï",
            "a b",
            long.as_str(),
        ] {
            check_schema(&default_schema(prefix)).unwrap();
        }
    }

    #[test]
    fn schema_names_are_checked() {
        check_schema("prebuilds_terraform_state").unwrap();
        for bad in ["", "Upper", "a-b", "a.b", "1abc", "a;drop", &"x".repeat(64)] {
            let err = check_schema(bad).unwrap_err();
            assert!(err.contains("--terraform-state-schema"), "{bad:?}: {err}");
        }
    }
}
