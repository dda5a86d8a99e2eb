//! The CI form of the reliability suite (issue 11): the fault scenarios of the `reliability` crate,
//! with its bounded CI profile and the debug binaries, so CI runs exactly the code the
//! `reliability` binary runs. The name starts with `service_faults`: `scripts/test` runs these in
//! its serial step, never beside other tests. The restart scenarios stop and start a private
//! PostgreSQL server and RabbitMQ node of their own (`Wiring::private_services`); the machine's
//! services are never touched, and `scripts/test` checks that they ran untouched throughout.

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

#[tokio::test(flavor = "multi_thread")]
async fn broker_node_kills_in_a_three_node_cluster_lose_and_duplicate_nothing() {
    passes(Scenario::BrokerNodeKill).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_outage_longer_than_every_retry_dead_letters_nothing_valid() {
    passes(Scenario::PostgresLongOutage).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_failover_mid_run_loses_and_duplicates_nothing() {
    passes(Scenario::PostgresFailover).await;
}
