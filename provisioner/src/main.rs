//! `prebuilds-provisioner`: consumes provisioner jobs from RabbitMQ, executes them with the `sim`
//! or `terraform` backend, and publishes provisioner events (SPEC.md §1, §4). See `--help`.
//!
//! Modules: [`config`] (flags and validation), [`app`] (wiring and shutdown), [`handler`] (one job
//! delivery, start to ack), [`events`] (deterministic event ids, recording and publishing),
//! [`backend`], [`sim`] and [`terraform`] (the executors), [`records`] (in-process idempotence,
//! with `prebuilds_runtime::keyed_locks`), [`metrics`].

mod admission;
mod app;
mod backend;
mod config;
mod events;
mod handler;
mod metrics;
mod records;
mod sim;
mod terraform;
mod terraform_state;

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
