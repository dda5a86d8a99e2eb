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
    match app::run(args, prebuilds_runtime::shutdown::on_signals()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "api failed");
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
