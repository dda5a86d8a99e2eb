//! The command line of `prebuildsctl`: global options and the subcommand tree. Kept in the
//! library so the generated configuration reference (`docs/configuration.md`) is rendered from
//! the same definition `main.rs` parses.

use std::time::Duration;

use clap::{Parser, Subcommand};
use prebuilds_runtime::config::{parse_duration, ConnectionArgs, LogFormat};

use crate::commands;

#[derive(Debug, Parser)]
#[command(
    name = "prebuildsctl",
    version,
    about = "Operate the prebuilds service: migrations, templates, pools, claims.",
    after_help = "Connection settings come from DATABASE_URL, AMQP_URL and PREBUILDS_AMQP_PREFIX \
                  (or the flags above). Exit codes: 0 success, 1 failure, 2 usage error.\n\n\
                  Examples:\n  \
                  prebuildsctl migrate\n  \
                  prebuildsctl org create acme\n  \
                  prebuildsctl template push examples/python-dev.yaml\n  \
                  prebuildsctl status --watch\n  \
                  prebuildsctl claim --user alice --template python-dev --param cpus=8 --name dev"
)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    /// Log format of diagnostics on standard error.
    #[arg(long, env = "PREBUILDS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// How long a write waits for a lock held by another writer (a worker's reconcile pass of a
    /// preset, another push) before it gives up, saying what it waited for; 0 waits as long as
    /// it takes.
    #[arg(long, env = "PREBUILDS_CLI_LOCK_TIMEOUT", default_value = "10s", value_parser = parse_duration, global = true)]
    pub lock_timeout: Duration,

    /// Who is acting, recorded in the audit log with every change (default: the OS user); e.g.
    /// the person behind an automation, or a token name.
    #[arg(long, env = "PREBUILDS_ACTOR", global = true)]
    pub actor: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply pending database migrations (idempotent; safe to run concurrently).
    Migrate(commands::migrate::Args),
    /// Manage organizations.
    #[command(subcommand)]
    Org(commands::org::Command),
    /// Manage users.
    #[command(subcommand)]
    User(commands::user::Command),
    /// Push, activate, invalidate, deprecate and delete templates.
    #[command(subcommand)]
    Template(commands::template::Command),
    /// Show the pool of every preset: desired, running, eligible, in-progress builds, status.
    Status(commands::status::Args),
    /// Pause reconciliation globally, for one template or for one preset (claims continue).
    Pause(commands::pause::Args),
    /// Resume reconciliation paused with `pause` and reconcile the affected presets at once.
    Resume(commands::pause::Args),
    /// Operate on one preset (reset a hard-limited or validation-failed preset).
    #[command(subcommand)]
    Preset(commands::preset::Command),
    /// Claim a prebuilt workspace for a user (what the platform does when a user creates one).
    Claim(commands::claim::Args),
    /// Inspect prebuilt workspaces.
    #[command(subcommand)]
    Prebuilds(commands::prebuilds::Command),
    /// Inspect and cancel provisioner jobs.
    #[command(subcommand)]
    Jobs(commands::jobs::Command),
    /// Show notification deliveries: sent, pending, failed, interrupted (prebuilds-notifier).
    #[command(subcommand)]
    Notifications(commands::notifications::Command),
    /// Inspect and replay dead-lettered messages (queue `<prefix>.dead`).
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(commands::dead_letters::Command),
    /// List the audit log: who changed what with prebuildsctl, and when.
    Audit(commands::audit::Args),
    /// Create, list and revoke the bearer tokens of the HTTP API (prebuilds-api).
    #[command(subcommand)]
    Token(commands::token::Command),
}
