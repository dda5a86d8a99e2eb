//! The library behind `prebuilds-provisioner` (see `main.rs` for the binary): consumes
//! provisioner jobs from RabbitMQ, executes them with the `sim` or `terraform` backend, and
//! publishes provisioner events ([docs/messages.md](../../docs/messages.md)).
//!
//! Modules: [`config`] (flags and validation), [`app`] (wiring and shutdown), `handler` (one job
//! delivery, start to ack), `events` (deterministic event ids, recording and publishing),
//! `backend`, `sim` and `terraform` (the executors), `records` (in-process idempotence, with
//! `prebuilds_runtime::keyed_locks`), `metrics`. Only the configuration and the entry point are
//! public: the configuration reference in `docs/` is generated from [`config::Cli`].

mod admission;
pub mod app;
mod backend;
pub mod config;
mod events;
mod handler;
mod metrics;
mod records;
mod sim;
mod terraform;
mod terraform_state;
