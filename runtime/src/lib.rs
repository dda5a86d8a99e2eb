//! The shared runtime of every prebuilds binary — each piece exists once, here:
//! configuration and secrets ([`config`], [`redact`]), TLS ([`tls`]), logging ([`telemetry`]), trace
//! context, its propagation and OTLP export ([`tracing_context`]), the PostgreSQL pool and transaction retry
//! ([`db`]), the AMQP connector, topology, publisher and consumer supervisor ([`amqp`]), the transactional
//! outbox and its relay ([`outbox`]), the `/metrics` `/healthz` `/readyz` server ([`http`]),
//! process-level counters ([`metrics`]), readiness ([`health`]) and graceful shutdown
//! ([`shutdown`]), bounded retries ([`retry`]) and in-process locks by key ([`keyed_locks`]).

pub mod amqp;
pub mod config;
pub mod db;
pub mod health;
pub mod http;
pub mod keyed_locks;
pub mod metrics;
pub mod outbox;
pub mod redact;
pub mod retry;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod tracing_context;

pub use health::Health;
