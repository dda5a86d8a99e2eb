//! The reliability suite of issue 11: fault-injection scenarios run against the real PostgreSQL and
//! RabbitMQ on loopback with the workspace's real binaries, and the invariants checked once the
//! system has converged.
//!
//! - [`profile`]: problem sizes and time bounds (CI, short, long).
//! - [`stack`]: one scenario's world — database, AMQP prefix, workers, scheduler, sim provisioner,
//!   and the taps that watch every provisioner job and event on the wire.
//! - [`wire`]: taps, the duplicating/reordering relay and a raw publisher for poison messages.
//! - [`faults`]: RabbitMQ and PostgreSQL stop/start, always undone by a drop guard.
//! - [`load`]: the claim load (with retries under the same request id) and the poison generator.
//! - [`invariants`]: the checks, each returning measured numbers.
//! - [`scenarios`]: the six scenarios; [`report`]: the table and `RELIABILITY.md`.
//!
//! The `reliability` binary runs them with release builds; `tests/tests/service_faults_reliability.rs`
//! runs a bounded CI form of the fault scenarios with debug builds.

pub mod faults;
pub mod invariants;
pub mod load;
pub mod profile;
pub mod report;
pub mod scenarios;
pub mod stack;
pub mod wire;

pub use invariants::Check;
pub use profile::Profile;
pub use scenarios::{Outcome, Scenario};
