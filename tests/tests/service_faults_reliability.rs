//! The CI form of the reliability suite (issue 11): the fault scenarios of the `reliability` crate,
//! with its bounded CI profile and the debug binaries, so CI runs exactly the code the
//! `reliability` binary runs. The name starts with `service_faults`: `scripts/test` runs these in
//! its serial step, never beside other tests, because they stop and start RabbitMQ and PostgreSQL
//! (always restored, whatever happens).

use reliability::{scenarios, Profile, Scenario};

async fn passes(scenario: Scenario) {
    let outcome = scenarios::run(scenario, Profile::ci()).await;
    assert!(
        outcome.passed(),
        "{} failed after {:.0}s:\n{}",
        scenario.name(),
        outcome.seconds,
        outcome.failures()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_sigkill_loop_loses_and_duplicates_nothing() {
    passes(Scenario::WorkerKill).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restart_mid_run_loses_and_duplicates_nothing() {
    passes(Scenario::RabbitmqRestart).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_restart_mid_run_loses_and_duplicates_nothing() {
    passes(Scenario::PostgresRestart).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_interleaved_with_valid_traffic_is_dead_lettered_with_reasons() {
    passes(Scenario::Poison).await;
}
