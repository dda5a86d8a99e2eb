//! `prebuilds-scheduler`: the leader-elected scheduler of the prebuilds service (docs/architecture.md, docs/metrics.md).
//!
//! Any number of replicas run; the one holding a PostgreSQL advisory lock leads ([`leader`]).
//! The leader
//! - publishes one `reconcile.preset` job (reason `tick`) per preset needing attention every
//!   reconcile interval ([`ticker`], [`pass`], [`jobs`]), nothing while globally paused;
//! - publishes `settings_changed` jobs for every such preset when it sees the global pause lifted
//!   ([`settings_watch`]);
//! - exports the pool-state metrics from a cached database snapshot ([`pool_metrics`]);
//! - reaps provisioner jobs a provisioner went silent on ([`reaper`]);
//! - trims the tables that grow with traffic to their retention windows ([`retention`]).
//!
//! [`app`] wires it together with the shared runtime; [`config`] is the command line;
//! [`metrics`] holds the scheduler's own counters.

pub mod app;
pub mod config;
pub mod jobs;
pub mod leader;
pub mod metrics;
pub mod pass;
pub mod pool_metrics;
pub mod reaper;
pub mod retention;
pub mod settings_watch;
pub mod ticker;

pub use config::Config;
