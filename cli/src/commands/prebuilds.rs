//! `prebuildsctl prebuilds list [--preset ID] [--template T] [--json]`: the live prebuilt
//! workspaces (owned by the prebuilds user, not deleted) with their latest build.

use chrono::{DateTime, Utc};
use prebuilds_runtime::config::Connection;
use serde::Serialize;
use uuid::Uuid;

use crate::{context::connect_db, output};

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List prebuilt workspaces with their latest build and readiness.
    #[command(after_help = "Examples:\n  \
        prebuildsctl prebuilds list\n  \
        prebuildsctl prebuilds list --template python-dev --json")]
    List {
        /// Only prebuilds of this preset.
        #[arg(long)]
        preset: Option<Uuid>,
        /// Only prebuilds of this template.
        #[arg(long)]
        template: Option<String>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct Row {
    id: Uuid,
    name: String,
    organization: String,
    template: String,
    template_version: String,
    preset: Option<String>,
    preset_id: Option<Uuid>,
    created_at: DateTime<Utc>,
    build_number: i32,
    transition: String,
    job_status: String,
    ready: bool,
}

pub async fn run(connection: &Connection, command: Command) -> anyhow::Result<()> {
    let Command::List {
        preset,
        template,
        json,
    } = command;
    let pool = connect_db(connection).await?;
    let client = pool.get().await?;
    let rows: Vec<Row> = client
        .query(
            "SELECT wp.id, wp.name, o.name AS organization, t.name AS template,
                    v.name AS template_version, p.name AS preset, wp.current_preset_id AS preset_id,
                    wp.created_at, lb.build_number, lb.transition, lb.job_status, wp.ready
             FROM workspace_prebuilds wp                                 -- live prebuilds
             JOIN templates t ON t.id = wp.template_id
             JOIN organizations o ON o.id = t.organization_id
             JOIN workspace_latest_builds lb ON lb.workspace_id = wp.id  -- with their latest build
             JOIN template_versions v ON v.id = lb.template_version_id
             LEFT JOIN template_version_presets p ON p.id = wp.current_preset_id
             WHERE ($1::uuid IS NULL OR wp.current_preset_id = $1)       -- --preset
               AND ($2::text IS NULL OR t.name = $2)                     -- --template
             ORDER BY o.name, t.name, p.name, wp.created_at, wp.id",
            &[&preset, &template],
        )
        .await?
        .into_iter()
        .map(|r| Row {
            id: r.get("id"),
            name: r.get("name"),
            organization: r.get("organization"),
            template: r.get("template"),
            template_version: r.get("template_version"),
            preset: r.get("preset"),
            preset_id: r.get("preset_id"),
            created_at: r.get("created_at"),
            build_number: r.get("build_number"),
            transition: r.get("transition"),
            job_status: r.get("job_status"),
            ready: r.get("ready"),
        })
        .collect();
    output::print_rows(
        &rows,
        json,
        &[
            "id",
            "name",
            "template",
            "version",
            "preset",
            "created",
            "latest build",
            "ready",
        ],
        "no prebuilt workspaces",
        |r| {
            vec![
                r.id.to_string(),
                r.name.clone(),
                format!("{}/{}", r.organization, r.template),
                r.template_version.clone(),
                output::opt_text(r.preset.as_deref()),
                output::time(r.created_at),
                format!("#{} {} {}", r.build_number, r.transition, r.job_status),
                output::yes_no(r.ready),
            ]
        },
    )
}
