//! `prebuildsctl notifications list [--status S] [--limit N] [--json]`: what the notifier sent, is
//! sending, will retry and gave up on — one row per delivery (notification × channel), plus one
//! `queued` row for each notification no notifier has picked up yet (none running, or a backlog).

use chrono::{DateTime, Utc};
use prebuilds_runtime::config::Connection;
use serde::Serialize;
use uuid::Uuid;

use crate::{context::connect_db, output};

/// Every status a row can have: the delivery's (`notification_deliveries.status`), or `queued`.
const STATUSES: [&str; 7] = [
    "queued",
    "pending",
    "sending",
    "sent",
    "failed",
    "interrupted",
    "skipped",
];

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// List notification deliveries, newest notification first.
    #[command(
        after_help = "Statuses: queued (no notifier has taken it yet), pending (waiting for \
        its next attempt), sending, sent, failed (refused or out of attempts: dead-lettered; a \
        replay tries again), interrupted (a notifier stopped mid-attempt: not sent again, the \
        receiver may have it), skipped (nothing to send to, e.g. a user without an e-mail \
        address).\n\n\
        Examples:\n  \
        prebuildsctl notifications list\n  \
        prebuildsctl notifications list --status failed\n  \
        prebuildsctl notifications list --status interrupted --json"
    )]
    List {
        /// Only rows with this status.
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(STATUSES))]
        status: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Serialize)]
struct Row {
    notification_id: Uuid,
    delivery_id: Option<Uuid>,
    template: String,
    user: String,
    channel: Option<String>,
    recipient: Option<String>,
    status: String,
    attempts: i32,
    last_error: Option<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    sent_at: Option<DateTime<Utc>>,
}

pub async fn run(connection: &Connection, command: Command) -> anyhow::Result<()> {
    let Command::List {
        status,
        limit,
        json,
    } = command;
    let pool = connect_db(connection).await?;
    let client = pool.get().await?;
    let rows: Vec<Row> = client
        .query(
            "SELECT m.id AS notification_id, d.id AS delivery_id, t.name AS template,
                    u.username AS user, d.channel, d.recipient,
                    coalesce(d.status, 'queued') AS status, coalesce(d.attempts, 0) AS attempts,
                    d.last_error, m.created_at, coalesce(d.updated_at, m.created_at) AS updated_at,
                    d.sent_at
             FROM notification_messages m
             JOIN notification_templates t ON t.id = m.notification_template_id
             JOIN users u ON u.id = m.user_id
             LEFT JOIN notification_deliveries d ON d.notification_id = m.id  -- none yet: queued
             WHERE ($1::text IS NULL OR coalesce(d.status, 'queued') = $1)      -- --status
             ORDER BY m.created_at DESC, m.id, d.channel
             LIMIT $2",
            &[&status, &limit.max(0)],
        )
        .await?
        .into_iter()
        .map(|r| Row {
            notification_id: r.get("notification_id"),
            delivery_id: r.get("delivery_id"),
            template: r.get("template"),
            user: r.get("user"),
            channel: r.get("channel"),
            recipient: r.get("recipient"),
            status: r.get("status"),
            attempts: r.get("attempts"),
            last_error: r.get("last_error"),
            created_at: r.get("created_at"),
            updated_at: r.get("updated_at"),
            sent_at: r.get("sent_at"),
        })
        .collect();
    output::print_rows(
        &rows,
        json,
        &[
            "notification",
            "template",
            "user",
            "channel",
            "recipient",
            "status",
            "attempts",
            "updated",
            "last error",
        ],
        "no notifications",
        |r| {
            vec![
                r.notification_id.to_string(),
                r.template.clone(),
                r.user.clone(),
                output::opt_text(r.channel.as_deref()),
                output::opt_text(r.recipient.as_deref()),
                r.status.clone(),
                r.attempts.to_string(),
                output::time(r.updated_at),
                output::opt_text(r.last_error.as_deref()),
            ]
        },
    )
}
