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

use prebuildsctl::{
    args::{Cli, Command},
    audit, commands, context,
};

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

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
