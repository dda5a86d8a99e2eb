//! `reliability`: runs the fault-injection scenarios of issue 11 against the local PostgreSQL and
//! RabbitMQ with the release binaries, prints a table and writes `RELIABILITY.md`.
//!
//! Run: `cargo build --release --bins && cargo run --release -p reliability -- [--long]
//! [--only SCENARIO]… [--output RELIABILITY.md]`.

use std::process::ExitCode;

use clap::Parser;
use reliability::{faults, report, scenarios, Profile, Scenario};

#[derive(Debug, Parser)]
#[command(
    name = "reliability",
    about = "Fault-injection suite of the prebuilds service against the local PostgreSQL and RabbitMQ."
)]
struct Args {
    /// Larger pools, longer fault windows (tens of minutes).
    #[arg(long)]
    long: bool,

    /// Run only these scenarios (repeatable); their rows replace theirs in the existing report and
    /// every other row is kept as it was.
    #[arg(long, value_enum)]
    only: Vec<Scenario>,

    /// Where to write the report.
    #[arg(long, default_value = "RELIABILITY.md")]
    output: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let profile = if args.long {
        Profile::long()
    } else {
        Profile::short()
    };
    let selected: Vec<Scenario> = if args.only.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.only.clone()
    };
    let mut outcomes = Vec::new();
    for scenario in selected {
        eprintln!(
            "reliability: running {} ({})",
            scenario.name(),
            profile.name
        );
        let outcome = scenarios::run(scenario, profile).await;
        eprintln!(
            "reliability: {} {} in {:.0}s",
            scenario.name(),
            if outcome.passed() { "passed" } else { "FAILED" },
            outcome.seconds
        );
        outcomes.push(outcome);
    }
    let restored = faults::machine_services_running();
    print!("{}", report::table(&outcomes));
    let command = format!(
        "cargo run --release -p reliability --{}",
        if args.long { " --long" } else { "" }
    );
    let document = match std::fs::read_to_string(&args.output) {
        Ok(existing) if !args.only.is_empty() => {
            report::merged(&existing, &outcomes, &profile, &command)
        }
        _ => report::markdown(&outcomes, &profile, &command),
    };
    if let Err(e) = std::fs::write(&args.output, document) {
        eprintln!("reliability: cannot write {}: {e}", args.output.display());
        return ExitCode::FAILURE;
    }
    println!("wrote {}", args.output.display());
    println!(
        "services: RabbitMQ {}, PostgreSQL {}",
        if faults::rabbit_running() {
            "running"
        } else {
            "DOWN"
        },
        if faults::postgres_running() {
            "running"
        } else {
            "DOWN"
        }
    );
    if restored && outcomes.iter().all(|o| o.passed()) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
