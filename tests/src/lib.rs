//! Test harness for integration tests against the real PostgreSQL and RabbitMQ on this machine.
//!
//! - [`TestDb`]: a fresh database per test, cloned (`CREATE DATABASE … TEMPLATE`) from a template
//!   database that is migrated once per migration set; dropped when the value is dropped.
//! - [`TestBroker`]: a unique AMQP prefix per test with the topology declared; its exchanges and
//!   queues are deleted on drop.
//! - [`private_rabbit::PrivateRabbit`]: a RabbitMQ node of the test's own (TLS listener, faults),
//!   with [`certs::TestCa`] for certificates made in the test.
//! - [`notify`]: a webhook receiver and an SMTP sink for the notifier's tests.
//! - [`Service`]: a real binary of this workspace started as a child process, killed on drop.
//! - [`probe`]: a running process's HTTP endpoints and Prometheus series.
//!
//! Admin connections come from `PREBUILDS_TEST_PG` (default `postgres://postgres@127.0.0.1:5432`)
//! and `PREBUILDS_TEST_AMQP` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).

pub mod api;
pub mod broker;
pub mod bulk;
pub mod certs;
pub mod db;
pub mod fixtures;
pub mod notify;
pub mod ports;
pub mod private_postgres;
pub mod private_rabbit;
pub mod probe;
pub mod process;
pub mod stack;

pub use broker::TestBroker;
pub use db::TestDb;
pub use process::Service;

use std::{future::Future, time::Duration};

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
