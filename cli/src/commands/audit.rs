//! `prebuildsctl audit [--since WHEN] [--limit N] [--json]`: the audit log, newest first.

use chrono::{DateTime, Utc};
use prebuilds_runtime::config::{parse_duration, Connection};
use serde::Serialize;

use crate::{
    context::{connect_db, UsageError},
    output,
};

#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    prebuildsctl audit --since 1h\n  \
    prebuildsctl audit --since 2026-12-01T00:00:00Z --json")]
pub struct Args {
    /// Only entries at or after this time: a duration back from now (`30m`, `1h`, `7d`) or an
    /// RFC 3339 timestamp.
    #[arg(long)]
    since: Option<String>,
    /// At most this many entries (the newest).
    #[arg(long, default_value_t = 100)]
    limit: i64,
    /// Print a JSON array.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    id: i64,
    occurred_at: DateTime<Utc>,
    actor: String,
    os_user: String,
    db_role: String,
    action: String,
    arguments: serde_json::Value,
}

/// `--since` as an instant.
fn since(value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, UsageError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(value) {
        return Ok(t.with_timezone(&Utc));
    }
    let back = parse_duration(value).map_err(|_| {
        UsageError(format!(
            "--since {value:?} is neither a duration (30m, 1h, 7d) nor an RFC 3339 time \
             (2026-12-01T00:00:00Z)"
        ))
    })?;
    let back = chrono::Duration::from_std(back)
        .map_err(|_| UsageError(format!("--since {value:?} is too far back")))?;
    Ok(now - back)
}

pub async fn run(connection: &Connection, args: Args) -> anyhow::Result<()> {
    if args.limit < 1 {
        return Err(UsageError("--limit must be at least 1".into()).into());
    }
    let since = args
        .since
        .as_deref()
        .map(|s| since(s, Utc::now()))
        .transpose()?;
    let pool = connect_db(connection).await?;
    let client = pool.get().await?;
    let rows: Vec<Row> = client
        .query(
            "SELECT id, occurred_at, actor, os_user, db_role, action, arguments FROM audit_log
             WHERE $1::timestamptz IS NULL OR occurred_at >= $1
             ORDER BY occurred_at DESC, id DESC LIMIT $2",
            &[&since, &args.limit],
        )
        .await?
        .iter()
        .map(|r| Row {
            id: r.get("id"),
            occurred_at: r.get("occurred_at"),
            actor: r.get("actor"),
            os_user: r.get("os_user"),
            db_role: r.get("db_role"),
            action: r.get("action"),
            arguments: r.get("arguments"),
        })
        .collect();
    output::print_rows(
        &rows,
        args.json,
        &["time", "actor", "action", "arguments", "os user", "db role"],
        "no audit entries",
        |r| {
            vec![
                output::time(r.occurred_at),
                r.actor.clone(),
                r.action.clone(),
                r.arguments.to_string(),
                r.os_user.clone(),
                r.db_role.clone(),
            ]
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_durations_and_timestamps() {
        let now = DateTime::parse_from_rfc3339("2026-12-04T05:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            since("1h", now).unwrap(),
            DateTime::parse_from_rfc3339("2026-12-04T04:00:00Z").unwrap()
        );
        assert_eq!(
            since("2026-12-01T00:00:00Z", now).unwrap(),
            DateTime::parse_from_rfc3339("2026-12-01T00:00:00Z").unwrap()
        );
        assert!(since("yesterday", now).is_err());
    }
}
