//! The benchmark harness runs end to end at tiny sizes, so it never rots between benchmark runs.
//! Figures from this run mean nothing; only that every scenario completes and is reported.

#[test]
fn every_scenario_runs_and_is_reported() {
    let output =
        std::env::temp_dir().join(format!("prebuilds-bench-smoke-{}.md", std::process::id()));
    // An earlier report's commentary survives the new run.
    std::fs::write(
        &output,
        "old figures\n<!-- commentary: kept by `bench all`; edit freely -->\nWhy the figures are what they are.\n<!-- end of commentary -->\nold footer\n",
    )
    .unwrap();
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["all", "--smoke", "--output"])
        .arg(&output)
        .env("RUST_LOG", "error")
        .output()
        .expect("run the benchmark");
    assert!(
        run.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report = std::fs::read_to_string(&output).expect("report written");
    for row in [
        "floor: RabbitMQ RPC echo round trip, 1 clients",
        "floor: RabbitMQ RPC echo round trip, 8 clients",
        "floor: claim-shaped transaction, 8 connections",
        "claim latency, 1 clients",
        "claim latency, 8 clients",
        "HTTP claim latency, 1 clients",
        "the floor at 8 clients",
        "floors measured before each of the level's 5 rounds",
        "floors measured just before the level",
        "replenish: claim request",
        "reconcile pass, 50 presets at steady state, 2 worker(s)",
        "scheduler with 50 presets",
        "cold fill: 10 presets × 2 instances",
        "provisioner events applied by one worker",
    ] {
        assert!(report.contains(row), "report lacks {row:?}:\n{report}");
    }
    assert!(report.contains("--smoke"));
    assert!(report.contains("\nWhy the figures are what they are.\n<!-- end of commentary -->"));
    assert!(!report.contains("old figures") && !report.contains("old footer"));
    let _ = std::fs::remove_file(output);
}
