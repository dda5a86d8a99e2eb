//! `prebuilds-worker`: parse configuration, initialise logging, run until SIGTERM.

use clap::Parser;
use prebuilds_worker::{app, config::WorkerArgs};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = WorkerArgs::parse();
    prebuilds_runtime::telemetry::init(args.service.log_format);
    if let Err(e) = args.validate() {
        eprintln!("error: {e}");
        return std::process::ExitCode::from(2);
    }
    match app::run(args, prebuilds_runtime::shutdown::on_signals()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "worker failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
