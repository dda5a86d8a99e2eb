//! `prebuildsctl migrate`: creates the database if it is missing, applies pending migrations under
//! the migration lock (see `prebuilds_schemas::migrations`), then declares the RabbitMQ topology
//! (`prebuilds_runtime::amqp::topology`), so that services whose broker users may not configure
//! anything can run with `PREBUILDS_DECLARE_TOPOLOGY=false`. The broker comes second: a database
//! that is migrated is useful on its own, a topology without the schema is not.

use anyhow::{anyhow, Context};
use prebuilds_runtime::{amqp::topology::Declared, config::Connection, db};

use crate::context::connect_amqp;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Declares the topology whatever PREBUILDS_DECLARE_TOPOLOGY says: this is \
    the step that needs the RabbitMQ configure permission, once.\n\n\
    Examples:\n  \
    prebuildsctl migrate\n  \
    prebuildsctl migrate --skip-broker --json"
)]
pub struct Args {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Migrate the database only; leave the RabbitMQ topology alone.
    #[arg(long)]
    skip_broker: bool,
}

pub async fn run(connection: &Connection, args: Args) -> anyhow::Result<()> {
    let url = connection.database_url.expose();
    ensure_database(url).await?;
    let mut client = db::connect_dedicated(url)
        .await
        .context("connecting to PostgreSQL (check DATABASE_URL and that the server is running)")?;
    let applied = prebuilds_schemas::migrations::run(&mut client).await?;
    drop(client);
    let declared = if args.skip_broker {
        None
    } else {
        Some(declare_topology(connection).await.map_err(|e| {
            // Say that the first half happened, so nobody rolls back a good migration.
            let database = if applied.is_empty() {
                "the database is up to date".to_owned()
            } else {
                format!("the database is migrated ({})", applied.join(", "))
            };
            anyhow!(
                "{database}, but declaring the RabbitMQ topology failed: {e:#}\n\
                 check AMQP_URL and that its user may configure '{prefix}' and the names under \
                 it (README \"Least privilege\"), or pass --skip-broker to migrate the database only",
                prefix = connection.amqp_prefix
            )
        })?)
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "applied": applied, "broker": declared })
        );
        return Ok(());
    }
    if applied.is_empty() {
        println!("database is up to date");
    } else {
        for name in &applied {
            println!("applied {name}");
        }
    }
    if let Some(declared) = &declared {
        println!(
            "declared RabbitMQ topology '{}': exchanges {}; queues {}; {} bindings",
            declared.prefix,
            declared.exchanges.join(", "),
            declared.queues.join(", "),
            declared.bindings.len()
        );
        for warning in &declared.warnings {
            eprintln!("warning: {warning}");
        }
    }
    Ok(())
}

/// Declares every exchange, queue and binding under the prefix (idempotent).
async fn declare_topology(connection: &Connection) -> anyhow::Result<Declared> {
    let amqp = connect_amqp(connection, "prebuildsctl migrate").await?;
    let channel = amqp.create_channel().await?;
    let declared = connection.topology().declare(&channel).await;
    let _ = amqp.close(200, "migrated".into()).await;
    Ok(declared?)
}

/// Creates the target database when the server is up but the database does not exist yet, so the
/// quick start needs no manual `createdb`.
async fn ensure_database(url: &str) -> anyhow::Result<()> {
    let parsed = db::DatabaseUrl::parse(url).map_err(anyhow::Error::msg)?;
    let Some(name) = parsed.config.get_dbname().map(str::to_owned) else {
        return Ok(());
    };
    match db::connect_dedicated(url).await {
        Ok(_) => return Ok(()),
        Err(db::DbError::Postgres(e))
            if e.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_DATABASE) => {}
        Err(e) => return Err(e).context("connecting to PostgreSQL"),
    }
    let mut admin_url = parsed.clone();
    admin_url.config.dbname("postgres");
    let admin = db::connect_parsed(&admin_url)
        .await
        .context("connecting to the 'postgres' database to create the target database")?;
    let quoted = format!("\"{}\"", name.replace('"', "\"\""));
    match admin
        .batch_execute(&format!("CREATE DATABASE {quoted}"))
        .await
    {
        Ok(()) => {
            tracing::info!(database = %name, "created database");
            Ok(())
        }
        // Another `migrate` created it a moment ago.
        Err(e)
            if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE)
                || e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) =>
        {
            Ok(())
        }
        Err(e) => Err(db::DbError::from(e)).context("creating the database"),
    }
}
