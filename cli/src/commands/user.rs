//! `prebuildsctl user create --username U [--email E] [--role template-admin] [--organization O]`
//! and `user delete --username U`.

use anyhow::{bail, Context as _};

use serde::Serialize;
use uuid::Uuid;

use crate::{
    context::{
        begin_write, connect_db, explain_lock_timeout, is_unique_violation, Ctx, UsageError,
    },
    output,
};

/// Site roles (Coder's names). `template-admin`s receive the resource-replacement notifications.
const ROLES: [&str; 4] = ["owner", "template-admin", "user-admin", "auditor"];

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a user, optionally with site roles and organization memberships (one transaction).
    #[command(after_help = "Examples:\n  \
        prebuildsctl user create --username alice --email alice@example.com\n  \
        prebuildsctl user create --username bob --role template-admin --organization acme")]
    Create {
        /// Username (unique).
        #[arg(long)]
        username: String,
        /// E-mail address.
        #[arg(long, default_value = "")]
        email: String,
        /// Site role; repeat for several.
        #[arg(long = "role", value_parser = clap::builder::PossibleValuesParser::new(ROLES))]
        roles: Vec<String>,
        /// Organization to add the user to; repeat for several.
        #[arg(long = "organization")]
        organizations: Vec<String>,
        /// Print the created user as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a user: it keeps its row (history refers to it) but may claim nothing any more
    /// (claims for it are refused with `forbidden`). Its workspaces are left as they are.
    #[command(after_help = "Example:\n  prebuildsctl user delete --username mallory")]
    Delete {
        /// Username.
        #[arg(long)]
        username: String,
    },
}

#[derive(Debug, Serialize)]
struct Created {
    id: Uuid,
    username: String,
    email: String,
    roles: Vec<String>,
    organizations: Vec<String>,
}

pub async fn run(connection: &Ctx, command: Command) -> anyhow::Result<()> {
    if let Command::Delete { username } = command {
        return delete(connection, &username).await;
    }
    let Command::Create {
        username,
        email,
        mut roles,
        mut organizations,
        json,
    } = command
    else {
        unreachable!("delete is handled above");
    };
    if username.trim().is_empty() {
        return Err(UsageError("--username must not be empty".into()).into());
    }
    roles.sort();
    roles.dedup();
    organizations.sort();
    organizations.dedup();
    let pool = connect_db(connection).await?;
    let mut client = pool.get().await?;
    let written: anyhow::Result<Uuid> = async {
    let tx = begin_write(&mut client, connection).await?;
    let id = Uuid::new_v4();
    match tx
        .execute(
            "INSERT INTO users (id, username, email, rbac_roles) VALUES ($1, $2, $3, $4)",
            &[&id, &username, &email, &roles],
        )
        .await
    {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => bail!("user '{username}' already exists"),
        Err(e) => return Err(e).context("creating the user"),
    }
    for org in &organizations {
        let added = tx
            .execute(
                "INSERT INTO organization_members (user_id, organization_id)
                 SELECT $1, id FROM organizations WHERE name = $2
                 ON CONFLICT DO NOTHING",
                &[&id, org],
            )
            .await?;
        if added == 0 {
            // Rolls back the user too: never a half-made change.
            bail!(
                "organization '{org}' does not exist (create it with `prebuildsctl org create {org}`); \
                 nothing was created"
            );
        }
    }
    tx.commit().await?;
    Ok(id)
    }
    .await;
    let id = written.map_err(|e| explain_lock_timeout(e, connection.lock_timeout))?;
    if json {
        output::print_json(&[Created {
            id,
            username,
            email,
            roles,
            organizations,
        }])?;
    } else {
        let roles = if roles.is_empty() {
            String::new()
        } else {
            format!(", roles {}", roles.join(","))
        };
        println!("created user {username} ({id}){roles}");
    }
    Ok(())
}

/// `user delete`: marks the user deleted, in one audited transaction.
async fn delete(connection: &Ctx, username: &str) -> anyhow::Result<()> {
    let pool = connect_db(connection).await?;
    let mut client = pool.get().await?;
    let deleted: anyhow::Result<u64> = async {
        let tx = begin_write(&mut client, connection).await?;
        let row = tx
            .query_opt(
                "SELECT is_system, deleted FROM users WHERE username = $1 FOR UPDATE",
                &[&username],
            )
            .await?;
        match row {
            None => bail!("user '{username}' does not exist; nothing was deleted"),
            Some(r) if r.get::<_, bool>(0) => {
                bail!("user '{username}' is a system user and cannot be deleted")
            }
            Some(r) if r.get::<_, bool>(1) => return Ok(0),
            Some(_) => {}
        }
        let n = tx
            .execute(
                "UPDATE users SET deleted = true WHERE username = $1",
                &[&username],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }
    .await;
    match deleted.map_err(|e| explain_lock_timeout(e, connection.lock_timeout))? {
        0 => println!("user {username} was already deleted"),
        _ => println!("deleted user {username}: it may claim no workspace any more"),
    }
    Ok(())
}
