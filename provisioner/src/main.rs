//! `prebuilds-provisioner`: consumes provisioner jobs from RabbitMQ, executes them with the `sim`
//! or `terraform` backend, and publishes provisioner events. See `--help`; the code is in the
//! library (`lib.rs`).

use prebuilds_provisioner::{app, config};

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = config::Cli::parse();
    if let Err(message) = cli.validate() {
        config::Cli::command()
            .error(clap::error::ErrorKind::ValueValidation, message)
            .exit();
    }
    prebuilds_runtime::telemetry::init(cli.service.log_format);
    let budget = cli.service.shutdown_timeout;
    let outcome = app::run(cli).await;
    // Spans still queued go out within what is left of the shutdown budget.
    prebuilds_runtime::telemetry::flush(prebuilds_runtime::shutdown::remaining(budget)).await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "prebuilds-provisioner failed");
            eprintln!("prebuilds-provisioner: {e:#}");
            ExitCode::FAILURE
        }
    }
}
