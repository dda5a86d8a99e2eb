//! `prebuildsctl`: the operator's command-line tool. Talks to PostgreSQL and RabbitMQ with the same
//! configuration as the services; prints tables for people and `--json` for scripts. Exit codes:
//! 0 success, 1 failure, 2 usage error.
//!
//! Every command that writes does so in one transaction; what must be published because of the
//! change (reconcile jobs) is written to the outbox in that transaction and relayed by the command
//! itself right after the commit, so the messages are on the broker before it exits (or, if the
//! broker is down, stay queued for the workers' relay). A write waits at most
//! `PREBUILDS_CLI_LOCK_TIMEOUT` for a lock another writer holds, then fails saying what it waited
//! for. Every change is recorded in the audit log (`audit_log`, listed by `prebuildsctl audit`)
//! with who made it ([`audit`]).

use prebuildsctl::{audit, commands, context};

use std::{process::ExitCode, time::Duration};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use prebuilds_runtime::config::{parse_duration, ConnectionArgs, LogFormat};

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
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,

    /// Log format of diagnostics on standard error.
    #[arg(long, env = "PREBUILDS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// How long a write waits for a lock held by another writer (a worker's reconcile pass of a
    /// preset, another push) before it gives up, saying what it waited for; 0 waits as long as
    /// it takes.
    #[arg(long, env = "PREBUILDS_CLI_LOCK_TIMEOUT", default_value = "10s", value_parser = parse_duration, global = true)]
    lock_timeout: Duration,

    /// Who is acting, recorded in the audit log with every change (default: the OS user); e.g.
    /// the person behind an automation, or a token name.
    #[arg(long, env = "PREBUILDS_ACTOR", global = true)]
    actor: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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

#[tokio::main]
async fn main() -> ExitCode {
    // Usage errors exit with 2 (clap's convention); --help and --version with 0.
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // prebuildsctl's own options (connection settings among them) are never audit arguments.
    let globals: Vec<String> = Cli::command()
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    let globals: Vec<&str> = globals.iter().map(String::as_str).collect();
    let audit = audit::Entry::from_matches(&matches, &globals, cli.actor.as_deref());
    prebuilds_runtime::telemetry::init(cli.log_format);
    let connection = match cli.connection.resolve() {
        Ok(connection) => connection,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let ctx = context::Ctx {
        connection,
        lock_timeout: cli.lock_timeout,
        audit,
    };
    let connection = &ctx;
    let result = match cli.command {
        Command::Migrate(args) => commands::migrate::run(connection, args).await,
        Command::Org(command) => commands::org::run(connection, command).await,
        Command::User(command) => commands::user::run(connection, command).await,
        Command::Template(command) => commands::template::run(connection, command).await,
        Command::Status(args) => commands::status::run(connection, args).await,
        Command::Pause(args) => commands::pause::run(connection, args, true).await,
        Command::Resume(args) => commands::pause::run(connection, args, false).await,
        Command::Preset(command) => commands::preset::run(connection, command).await,
        Command::Claim(args) => commands::claim::run(connection, args).await,
        Command::Prebuilds(command) => commands::prebuilds::run(connection, command).await,
        Command::Jobs(command) => commands::jobs::run(connection, command).await,
        Command::Notifications(command) => commands::notifications::run(connection, command).await,
        Command::DeadLetters(command) => commands::dead_letters::run(connection, command).await,
        Command::Audit(args) => commands::audit::run(connection, args).await,
        Command::Token(command) => commands::token::run(connection, command).await,
    };
    // With an OTLP endpoint set, the spans of this run (an outbox drain, say) go out before exit.
    prebuilds_runtime::telemetry::flush(std::time::Duration::from_secs(2)).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<context::UsageError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
