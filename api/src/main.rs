//! `prebuilds-api`: parse configuration, initialise logging, serve until SIGTERM.

use clap::Parser;
use prebuilds_api::{app, config::ApiArgs};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = ApiArgs::parse();
    prebuilds_runtime::telemetry::init(args.service.log_format);
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    let budget = args.service.shutdown_timeout;
    let outcome = app::run(args, prebuilds_runtime::shutdown::on_signals()).await;
    // Spans still queued go out within what is left of the shutdown budget.
    prebuilds_runtime::telemetry::flush(prebuilds_runtime::shutdown::remaining(budget)).await;
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "api failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
