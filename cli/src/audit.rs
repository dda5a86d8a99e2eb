//! The audit trail (docs/database.md, table `audit_log`): every state-changing command writes
//! who acted, what it did, when, and with which arguments, in the same transaction as the change
//! itself ([`crate::context::begin_write`]) — a change that commits has its row, a change that
//! rolls back leaves none. A dead-letter replay, which publishes rather than writes, records its
//! row right after acting ([`record_standalone`]). Not audited: `migrate` and `claim` (see
//! [`UNAUDITED`]).
//!
//! Who: `--actor` / `PREBUILDS_ACTOR` when given (a person acting through automation, a token
//! name), else the OS user (`USER`, `LOGNAME`). Both are what the caller says, like any client
//! claim: the row also keeps the OS user and the database role (`current_user`, which the client
//! cannot choose), so the trust rests on the database credentials (see README "Trust model").
//!
//! Arguments: the subcommand's own arguments as given (command line or environment), by name.
//! Connection settings (URLs, credential files, TLS files) are global options of `prebuildsctl`,
//! never a subcommand's, so they are never recorded.

use clap::{parser::ValueSource, ArgMatches};
use deadpool_postgres::Transaction;
use serde_json::{Map, Value};

/// One row of `audit_log`, known before the command runs.
#[derive(Debug, Clone)]
pub struct Entry {
    pub actor: String,
    pub os_user: String,
    /// e.g. `template push`.
    pub action: String,
    pub arguments: Value,
}

/// Commands with no audit row: those that change nothing; `migrate`, which changes the schema
/// (the table may not exist yet; migrations are recorded by refinery's own history table); and
/// `claim`, whose change is the worker's and is recorded in `claim_requests` (who, for whom, when).
const UNAUDITED: [&str; 9] = [
    "status",
    "token list",
    "prebuilds list",
    "jobs list",
    "dead-letters list",
    "audit",
    "help",
    "migrate",
    "claim",
];

impl Entry {
    /// The entry of the command `matches` parsed; `globals` are the ids of `prebuildsctl`'s own
    /// options (excluded). `None` for the commands in [`UNAUDITED`].
    pub fn from_matches(
        matches: &ArgMatches,
        globals: &[&str],
        actor: Option<&str>,
    ) -> Option<Entry> {
        let mut path = Vec::new();
        let mut leaf = matches;
        while let Some((name, sub)) = leaf.subcommand() {
            path.push(name.to_owned());
            leaf = sub;
        }
        let action = path.join(" ");
        if action.is_empty() || UNAUDITED.contains(&action.as_str()) {
            return None;
        }
        let mut arguments = Map::new();
        for id in leaf.ids() {
            let id = id.as_str();
            if globals.contains(&id) {
                continue;
            }
            // Only what the caller gave, not defaults.
            if !matches!(
                leaf.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            let Some(raw) = leaf.get_raw(id) else {
                continue;
            };
            let values: Vec<Value> = raw
                .map(|v| Value::String(v.to_string_lossy().into_owned()))
                .collect();
            let value = match values.len() {
                // A flag (`--json`): given.
                0 => Value::Bool(true),
                1 => values.into_iter().next().expect("one value"),
                _ => Value::Array(values),
            };
            arguments.insert(id.to_owned(), value);
        }
        let os_user = os_user();
        Some(Entry {
            actor: actor
                .map(str::trim)
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
                .unwrap_or_else(|| os_user.clone()),
            os_user,
            action,
            arguments: Value::Object(arguments),
        })
    }
}

/// The OS user running the command, as the environment names it.
pub fn os_user() -> String {
    ["USER", "LOGNAME", "USERNAME"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

const INSERT: &str =
    "INSERT INTO audit_log (actor, os_user, action, arguments) VALUES ($1, $2, $3, $4)";

/// Writes `entry` in `tx` (committed or rolled back with the change).
pub async fn record(tx: &Transaction<'_>, entry: &Entry) -> Result<(), tokio_postgres::Error> {
    tx.execute(
        INSERT,
        &[
            &entry.actor,
            &entry.os_user,
            &entry.action,
            &entry.arguments,
        ],
    )
    .await
    .map(|_| ())
}

/// Writes `entry` on its own, for commands whose change is not a transaction of theirs.
pub async fn record_standalone(
    client: &deadpool_postgres::Object,
    entry: &Entry,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            INSERT,
            &[
                &entry.actor,
                &entry.os_user,
                &entry.action,
                &entry.arguments,
            ],
        )
        .await
        .map(|_| ())
}
