//! `prebuildsctl jobs list [--status S] [--initiator USER] [--json]` and `jobs cancel ID…`.

use std::collections::HashMap;

use anyhow::bail;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

use prebuilds_schemas::ReconcileReason;
use serde::Serialize;
use uuid::Uuid;

use crate::{
    context::{apply_change, connect_db, Applied, Change, Ctx},
    output,
};

/// Every status a provisioner job can have.
pub const STATUSES: [&str; 6] = [
    "pending",
    "running",
    "succeeded",
    "failed",
    "canceling",
    "canceled",
];

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List provisioner jobs, newest first.
    #[command(after_help = "Examples:\n  \
        prebuildsctl jobs list --status pending\n  \
        prebuildsctl jobs list --initiator prebuilds --json")]
    List {
        /// Only jobs in this status.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(STATUSES))]
        status: Option<String>,
        /// Only jobs started by this user (`prebuilds` = the reconciler).
        #[arg(long)]
        initiator: Option<String>,
        /// At most this many jobs.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Cancel jobs: pending ones become `canceled` at once, running ones `canceling` (the
    /// provisioner finishes the cancellation). Finished jobs are reported and left alone.
    #[command(
        after_help = "Exit code 1 when a job had already finished (the others are still \
        canceled).\n\nExample:\n  prebuildsctl jobs cancel 5f0c…  8e1a…"
    )]
    Cancel {
        /// Job ids.
        #[arg(required = true, num_args = 1..)]
        ids: Vec<Uuid>,
        /// Print the result as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

/// One provisioner job as listed (`jobs list --json`, `GET /api/v1/jobs`).
#[derive(Debug, Serialize, schemars::JsonSchema)]
#[schemars(rename = "Job")]
pub struct JobRow {
    id: Uuid,
    workspace: Option<String>,
    workspace_id: Option<Uuid>,
    build_number: Option<i32>,
    transition: Option<String>,
    status: String,
    initiator: String,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    completed_at: Option<DateTime<Utc>>,
    canceled_at: Option<DateTime<Utc>>,
    error: Option<String>,
}

#[derive(Debug, Serialize)]
struct CancelRow {
    id: Uuid,
    previous_status: String,
    status: String,
    result: String,
}

pub async fn run(connection: &Ctx, command: Command) -> anyhow::Result<()> {
    match command {
        Command::List {
            status,
            initiator,
            limit,
            json,
        } => list(connection, status, initiator, limit, json).await,
        Command::Cancel { ids, json } => cancel(connection, ids, json).await,
    }
}

async fn list(
    connection: &Ctx,
    status: Option<String>,
    initiator: Option<String>,
    limit: i64,
    json: bool,
) -> anyhow::Result<()> {
    let pool = connect_db(connection).await?;
    let client = pool.get().await?;
    let rows = list_jobs(&client, status.as_deref(), initiator.as_deref(), limit).await?;
    output::print_rows(
        &rows,
        json,
        &[
            "id",
            "workspace",
            "build",
            "status",
            "initiator",
            "created",
            "started",
            "completed",
            "error",
        ],
        "no provisioner jobs",
        |r| {
            vec![
                r.id.to_string(),
                output::opt_text(r.workspace.as_deref()),
                match (&r.transition, r.build_number) {
                    (Some(t), Some(n)) => format!("#{n} {t}"),
                    _ => "-".to_owned(),
                },
                r.status.clone(),
                r.initiator.clone(),
                output::time(r.created_at),
                output::opt_time(r.started_at),
                output::opt_time(r.completed_at),
                output::opt_text(r.error.as_deref()),
            ]
        },
    )
}

/// Provisioner jobs, newest first: at most `limit`, optionally only in `status` or started by the
/// user `initiator`.
pub async fn list_jobs<C: GenericClient>(
    client: &C,
    status: Option<&str>,
    initiator: Option<&str>,
    limit: i64,
) -> Result<Vec<JobRow>, tokio_postgres::Error> {
    Ok(client
        .query(
            "SELECT j.id, w.name AS workspace, b.workspace_id, b.build_number, b.transition,
                    j.job_status, u.username AS initiator, j.created_at, j.started_at,
                    j.completed_at, j.canceled_at, j.error
             FROM provisioner_jobs j
             JOIN users u ON u.id = j.initiator_id
             LEFT JOIN workspace_builds b ON b.job_id = j.id        -- the build the job runs
             LEFT JOIN workspaces w ON w.id = b.workspace_id
             WHERE ($1::text IS NULL OR j.job_status = $1)          -- --status
               AND ($2::text IS NULL OR u.username = $2)            -- --initiator
             ORDER BY j.created_at DESC, j.id
             LIMIT $3",
            &[&status, &initiator, &limit.max(0)],
        )
        .await?
        .into_iter()
        .map(|r| JobRow {
            id: r.get("id"),
            workspace: r.get("workspace"),
            workspace_id: r.get("workspace_id"),
            build_number: r.get("build_number"),
            transition: r.get("transition"),
            status: r.get("job_status"),
            initiator: r.get("initiator"),
            created_at: r.get("created_at"),
            started_at: r.get("started_at"),
            completed_at: r.get("completed_at"),
            canceled_at: r.get("canceled_at"),
            error: r.get("error"),
        })
        .collect())
}

async fn cancel(connection: &Ctx, mut ids: Vec<Uuid>, json: bool) -> anyhow::Result<()> {
    ids.sort();
    ids.dedup();
    let Applied {
        outcome: (results, finished),
        ..
    } = apply_change(connection, async |tx| {
        let current: HashMap<Uuid, String> = tx
            .query(
                "SELECT id, job_status FROM provisioner_jobs WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE",
                &[&ids],
            )
            .await?
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !current.contains_key(id))
            .map(Uuid::to_string)
            .collect();
        if !missing.is_empty() {
            // Nothing is changed: the transaction rolls back.
            bail!(
                "no provisioner job with id {}; nothing was canceled (`prebuildsctl jobs list` shows the jobs)",
                missing.join(", ")
            );
        }
        let mut results = Vec::with_capacity(ids.len());
        let mut changed = Vec::new();
        let mut finished = 0;
        for id in &ids {
            let previous = current[id].clone();
            let (status, result) = match previous.as_str() {
                "pending" => {
                    // Nobody picked it up: canceled and completed now.
                    tx.execute(
                        "UPDATE provisioner_jobs
                         SET job_status = 'canceled', canceled_at = now(), completed_at = now(),
                             updated_at = now()
                         WHERE id = $1",
                        &[id],
                    )
                    .await?;
                    changed.push(*id);
                    ("canceled", "canceled".to_owned())
                }
                "running" => {
                    // The provisioner is working on it: it completes the cancellation.
                    tx.execute(
                        "UPDATE provisioner_jobs
                         SET job_status = 'canceling', canceled_at = now(), updated_at = now()
                         WHERE id = $1",
                        &[id],
                    )
                    .await?;
                    changed.push(*id);
                    (
                        "canceling",
                        "cancel requested (the provisioner stops it)".to_owned(),
                    )
                }
                "canceling" | "canceled" => (previous.as_str(), format!("already {previous}")),
                _ => {
                    finished += 1;
                    (
                        previous.as_str(),
                        format!("not canceled: already finished ({previous})"),
                    )
                }
            };
            results.push(CancelRow {
                id: *id,
                status: status.to_owned(),
                previous_status: previous.clone(),
                result,
            });
        }
        // Pools of prebuilds whose builds were canceled are reconciled at once.
        let presets: Vec<Uuid> = tx
            .query(
                "SELECT DISTINCT b.template_version_preset_id
                 FROM workspace_builds b
                 JOIN workspaces w ON w.id = b.workspace_id
                 WHERE b.job_id = ANY($1)
                   AND b.template_version_preset_id IS NOT NULL               -- builds of a preset
                   AND w.owner_id = 'c42fdf75-3097-471c-8c33-fb52454d81c0'    -- of a prebuild",
                &[&changed],
            )
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        Ok(Change {
            outcome: (results, finished),
            reconcile: presets,
            reason: ReconcileReason::Manual,
        })
    })
    .await?;
    output::print_rows(&results, json, &["id", "was", "now", "result"], "", |r| {
        vec![
            r.id.to_string(),
            r.previous_status.clone(),
            r.status.clone(),
            r.result.clone(),
        ]
    })?;
    if finished > 0 {
        bail!("{finished} job(s) had already finished and were not changed");
    }
    Ok(())
}
