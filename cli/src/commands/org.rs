//! `prebuildsctl org create NAME`.

use anyhow::bail;

use serde::Serialize;
use uuid::Uuid;

use crate::{
    context::{
        begin_write, connect_db, explain_lock_timeout, is_unique_violation, Ctx, UsageError,
    },
    output,
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create an organization.
    #[command(after_help = "Example:\n  prebuildsctl org create acme")]
    Create {
        /// Organization name (unique).
        name: String,
        /// Print the created organization as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct Created {
    id: Uuid,
    name: String,
}

pub async fn run(connection: &Ctx, command: Command) -> anyhow::Result<()> {
    let Command::Create { name, json } = command;
    let name = name.trim().to_owned();
    if name.is_empty() {
        return Err(UsageError("organization name must not be empty".into()).into());
    }
    let pool = connect_db(connection).await?;
    let mut client = pool.get().await?;
    let id = Uuid::new_v4();
    let tx = begin_write(&mut client, connection).await?;
    match tx
        .execute(
            "INSERT INTO organizations (id, name) VALUES ($1, $2)",
            &[&id, &name],
        )
        .await
    {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => {
            bail!("organization '{name}' already exists")
        }
        Err(e) => return Err(explain_lock_timeout(e.into(), connection.lock_timeout)),
    }
    tx.commit().await?;
    if json {
        output::print_json(&[Created { id, name }])?;
    } else {
        println!("created organization {name} ({id})");
    }
    Ok(())
}
