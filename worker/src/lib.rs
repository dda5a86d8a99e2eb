//! The worker: turns the pure reconciliation core into effects against PostgreSQL and RabbitMQ.
//! Any number of workers run at once and each can be killed at any moment: every handler does its
//! work in one transaction and the delivery is acknowledged only after commit.
//!
//! - [`reconcile`]: `reconcile.preset` jobs — lock the preset, read its snapshot, plan, execute.
//! - [`events`]: provisioner events — job state, agents, logs — applied idempotently.
//! - [`claims`]: the claim RPC.
//! - [`app`]: wiring of consumers, outbox relay, metrics server and shutdown.

pub mod app;
pub mod claims;
pub mod config;
pub mod events;
pub mod metrics;
pub mod reconcile;

/// CloudEvents `source` of messages this process writes.
pub fn event_source() -> String {
    format!("prebuilds-worker/{}", std::process::id())
}
