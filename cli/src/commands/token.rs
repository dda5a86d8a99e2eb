//! `prebuildsctl token create|list|revoke`: bearer tokens of the HTTP API (`prebuilds-api`).
//! `create` prints the secret once, alone on the last line of standard output (scripts take
//! `| tail -n1`); only its SHA-256 is stored. `revoke` makes the API refuse the token from its next
//! request on. Creating and revoking are audited like every change.

use anyhow::bail;
use prebuilds_core::ApiRole;
use prebuilds_store::api_tokens::{self, CreateError};
use serde::Serialize;

use crate::{
    context::{begin_write, connect_db, explain_lock_timeout, Ctx, UsageError},
    output,
};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a token; its secret is printed once, on the last line of standard output.
    #[command(
        after_help = "Roles: admin (everything), claimer (claims and reads), viewer \
        (reads).\n\nExamples:\n  \
        prebuildsctl token create --name portal --role claimer\n  \
        TOKEN=$(prebuildsctl token create --name ops --role admin | tail -n1)"
    )]
    Create {
        /// Name of the token (unique; the actor of the audit rows of its changes).
        #[arg(long)]
        name: String,
        /// What the token may do.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["admin", "claimer", "viewer"]))]
        role: String,
        /// Print a JSON array with the token (and its secret, under `token`).
        #[arg(long)]
        json: bool,
    },
    /// List the tokens (never their secrets).
    List {
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: the API refuses it from now on. The name stays taken.
    #[command(after_help = "Example:\n  prebuildsctl token revoke --name portal")]
    Revoke {
        /// Name of the token.
        #[arg(long)]
        name: String,
    },
}

#[derive(Debug, Serialize)]
struct Created {
    #[serde(flatten)]
    token: api_tokens::Token,
    /// The secret: `Authorization: Bearer <token>`.
    #[serde(rename = "token")]
    secret: String,
}

pub async fn run(ctx: &Ctx, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Create { name, role, json } => create(ctx, name, &role, json).await,
        Command::List { json } => list(ctx, json).await,
        Command::Revoke { name } => revoke(ctx, &name).await,
    }
}

async fn create(ctx: &Ctx, name: String, role: &str, json: bool) -> anyhow::Result<()> {
    let name = name.trim().to_owned();
    if name.is_empty() || name.len() > 100 {
        return Err(UsageError("--name must have 1 to 100 characters".into()).into());
    }
    let role: ApiRole = role
        .parse()
        .map_err(|e| UsageError(format!("--role: {e}")))?;
    let pool = connect_db(ctx).await?;
    let mut client = pool.get().await?;
    let tx = begin_write(&mut client, ctx).await?;
    let (token, secret) = match api_tokens::create(&tx, &name, role).await {
        Ok(created) => created,
        Err(CreateError::NameTaken(name)) => {
            return Err(UsageError(format!(
                "a token named '{name}' already exists (names are never reused, also after a \
                 revoke); choose another name"
            ))
            .into())
        }
        Err(CreateError::Database(e)) => {
            return Err(explain_lock_timeout(e.into(), ctx.lock_timeout))
        }
    };
    tx.commit().await?;
    if json {
        return output::print_json(&[Created { token, secret }]);
    }
    println!(
        "created token '{}' with role {} (id {}); its secret follows and is shown only now:",
        token.name, token.role, token.id
    );
    println!("{secret}");
    Ok(())
}

async fn list(ctx: &Ctx, json: bool) -> anyhow::Result<()> {
    let pool = connect_db(ctx).await?;
    let client = pool.get().await?;
    let tokens = api_tokens::list(&client).await?;
    output::print_rows(
        &tokens,
        json,
        &["name", "role", "id", "created", "revoked"],
        "no API tokens (create one with `prebuildsctl token create --name N --role viewer`)",
        |t| {
            vec![
                t.name.clone(),
                t.role.clone(),
                t.id.to_string(),
                output::time(t.created_at),
                output::opt_time(t.revoked_at),
            ]
        },
    )
}

async fn revoke(ctx: &Ctx, name: &str) -> anyhow::Result<()> {
    let pool = connect_db(ctx).await?;
    let mut client = pool.get().await?;
    let tx = begin_write(&mut client, ctx).await?;
    let revoked = api_tokens::revoke(&tx, name)
        .await
        .map_err(|e| explain_lock_timeout(e.into(), ctx.lock_timeout))?;
    match revoked {
        None => bail!("no token named '{name}' (`prebuildsctl token list` shows them)"),
        Some(false) => {
            // Nothing changed: no audit row either.
            drop(tx);
            println!("token '{name}' was already revoked; nothing changed");
        }
        Some(true) => {
            tx.commit().await?;
            println!("revoked token '{name}': the API refuses it from now on");
        }
    }
    Ok(())
}
