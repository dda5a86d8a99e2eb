//! `prebuilds-scheduler` entry point: parse and validate the configuration, install logging and
//! signal handling, run [`prebuilds_scheduler::app::run`] and bound the shutdown.

use std::process::ExitCode;

use clap::Parser;
use prebuilds_runtime::{shutdown, telemetry};
use prebuilds_scheduler::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("prebuilds-scheduler: invalid configuration: {e}");
        return ExitCode::from(2);
    }
    telemetry::init(config.service.log_format);
    tracing::info!(config = ?config, "starting prebuilds-scheduler");

    let signals = shutdown::on_signals();
    let bound = config.service.shutdown_timeout;
    let run = prebuilds_scheduler::app::run(config, signals.clone());
    tokio::pin!(run);
    let deadline = async {
        signals.cancelled().await;
        tokio::time::sleep(bound).await;
    };
    let code = tokio::select! {
        result = &mut run => match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "prebuilds-scheduler failed");
                ExitCode::FAILURE
            }
        },
        _ = deadline => {
            tracing::error!(?bound, "did not stop within the shutdown timeout; exiting anyway");
            ExitCode::FAILURE
        }
    };
    // Spans still queued go out within what is left of the shutdown budget.
    telemetry::flush(shutdown::remaining(bound)).await;
    code
}
