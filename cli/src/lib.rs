//! The library behind `prebuildsctl` (see `main.rs` for the tool itself): its commands, and the
//! pieces `prebuilds-api` reuses so a change made over HTTP follows exactly the rules of the same
//! change made on the command line — one write transaction with its audit row and reconcile jobs
//! ([`context::apply_change_on`]), the same status rows ([`commands::status::rows`]), pause scopes
//! ([`commands::pause::set_paused`]), template invalidation
//! ([`commands::template::invalidate_change`]) and job listing ([`commands::jobs::list_jobs`]).

pub mod args;
pub mod audit;
pub mod commands;
pub mod context;
pub mod output;
