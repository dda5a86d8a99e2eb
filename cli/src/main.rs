//! `prebuildsctl`: the operator's command-line tool. Talks to PostgreSQL and RabbitMQ with the same
//! configuration as the services; prints tables for people and `--json` for scripts. Exit codes:
//! 0 success, 1 failure, 2 usage error.

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use prebuilds_runtime::config::{ConnectionArgs, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "prebuildsctl",
    version,
    about = "Operate the prebuilds service: migrations, templates, pools, claims."
)]
struct Cli {
    #[command(flatten)]
    connection: ConnectionArgs,

    /// Log format of diagnostics on standard error.
    #[arg(long, env = "PREBUILDS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply pending database migrations (idempotent; safe to run concurrently).
    Migrate(commands::migrate::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    prebuilds_runtime::telemetry::init(cli.log_format);
    let result = match cli.command {
        Command::Migrate(args) => commands::migrate::run(&cli.connection, args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
