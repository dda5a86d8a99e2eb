//! SQL shared by the prebuilds binaries, each query once: reading per-preset snapshots for the
//! pure core ([`snapshot`]), the per-preset transaction lock ([`lock`]), and global settings
//! ([`settings`]), claim history ([`claims`]), the demand inputs of autoscaled presets ([`demand`])
//! and in-flight capacity ([`capacity`]). The SQL lives in `src/sql/*.sql`, one file per query, with
//! a comment on every predicate. API tokens ([`api_tokens`]) live here too: the CLI makes them, the
//! API checks them.

pub mod api_tokens;
pub mod attention;
pub mod capacity;
pub mod claims;
pub mod demand;
pub mod lock;
pub mod settings;
pub mod snapshot;

pub use snapshot::{load_snapshots, PresetView};

/// Tables that grow with use and that hot-path statements look rows up in: when one of them has
/// doubled, cached generic plans are made again (`prebuilds_runtime::db::refresh_plans_as_tables_grow`).
pub const GROWING_TABLES: &[&str] = &[
    "workspaces",
    "workspace_builds",
    "provisioner_jobs",
    "workspace_agents",
    "processed_messages",
    "claim_requests",
    "outbox",
];
