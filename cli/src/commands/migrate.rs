//! `prebuildsctl migrate`: creates the database if it is missing, then applies pending migrations
//! under the migration lock (see `prebuilds_schemas::migrations`).

use anyhow::Context;
use prebuilds_runtime::{config::Connection, db};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(connection: &Connection, args: Args) -> anyhow::Result<()> {
    let url = connection.database_url.expose();
    ensure_database(url).await?;
    let mut client = db::connect_dedicated(url)
        .await
        .context("connecting to PostgreSQL (check DATABASE_URL and that the server is running)")?;
    let applied = prebuilds_schemas::migrations::run(&mut client).await?;
    if args.json {
        println!("{}", serde_json::json!({ "applied": applied }));
    } else if applied.is_empty() {
        println!("database is up to date");
    } else {
        for name in &applied {
            println!("applied {name}");
        }
    }
    Ok(())
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
