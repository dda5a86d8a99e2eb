//! `bench`: measures the prebuilds service on this machine and writes `BENCHMARKS.md`.
//!
//! Every figure is reported beside a floor measured in the same run on the same services (RPC echo
//! round trip, one claim-shaped transaction, confirmed publish and consume rates), because these
//! machines are shared and noisy: ratios travel, absolute numbers don't.
//!
//! Run: `cargo build --release --bins && cargo run --release -p bench -- all`.

mod demand;
mod report;
mod scenarios;
mod stats;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    All,
    Floors,
    Claims,
    Replenish,
    Reconcile,
    Fill,
    Events,
    Memory,
    Lanes,
    TimeToReady,
    /// A simulated day of bursty claims against fixed and autoscaled pools (no services).
    Demand,
}

#[derive(Debug, Parser)]
#[command(
    name = "bench",
    about = "Benchmark the prebuilds service against the local PostgreSQL and RabbitMQ."
)]
struct Args {
    /// Which scenario to run.
    #[arg(value_enum, default_value_t = Scenario::All)]
    scenario: Scenario,

    /// Smaller sizes; figures are then not comparable with the goals.
    #[arg(long)]
    quick: bool,

    /// Tiny sizes that only prove every scenario still runs (the test suite uses this).
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,

    /// Where to write the report (only `all` writes it).
    #[arg(long, default_value = "BENCHMARKS.md")]
    output: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.scenario == Scenario::Demand {
        print!("{}", report::demand(&demand::run(30)));
        return Ok(());
    }
    let sizes = if args.smoke {
        scenarios::Sizes::smoke()
    } else {
        scenarios::Sizes::new(args.quick)
    };
    let mut report = report::Report::new(&args, sizes);
    let run = |s: Scenario| args.scenario == Scenario::All || args.scenario == s;

    let floor_rig = scenarios::FloorRig::start(&sizes).await?;
    let floors = scenarios::floors(&sizes, &floor_rig).await?;
    report.floors(&floors);
    if run(Scenario::Claims) || run(Scenario::Replenish) {
        let claims = scenarios::claims(&sizes, &floor_rig).await?;
        report.claims(&claims);
    }
    floor_rig.stop().await?;
    if run(Scenario::Reconcile) || run(Scenario::Memory) {
        let reconcile = scenarios::reconcile(&sizes).await?;
        report.reconcile(&reconcile);
    }
    if run(Scenario::Fill) {
        let fill = scenarios::cold_fill(&sizes).await?;
        report.fill(&fill);
    }
    if run(Scenario::Events) {
        let events = scenarios::events(&sizes).await?;
        report.events(&events, &floors);
    }
    if run(Scenario::Lanes) {
        let lanes = scenarios::lanes(&sizes).await?;
        report.lanes(&lanes);
    }
    if run(Scenario::TimeToReady) {
        let ready = scenarios::time_to_ready(&sizes).await?;
        report.time_to_ready(&ready);
    }
    print!("{}", report.table());
    if args.scenario == Scenario::All {
        let previous = match std::fs::read_to_string(&args.output) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => anyhow::bail!(
                "cannot read {} to keep its commentary: {e}",
                args.output.display()
            ),
        };
        let commentary = report::kept_commentary(&previous)?;
        std::fs::write(&args.output, report.markdown(&commentary))?;
        println!("wrote {}", args.output.display());
    }
    Ok(())
}
