//! Per-preset claim history (warm hits and cold misses) from `claim_requests`, for
//! `prebuildsctl status`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use serde::Serialize;
use uuid::Uuid;

/// Claims (a prebuild was handed over) and misses (`no_eligible_prebuild`) in the last 5, 10, 30,
/// 60 and 120 minutes. Serialized flat, as `claims_5m`, `misses_5m`, … (the `status --json` keys).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct ClaimHistory {
    pub claims_5m: i64,
    pub misses_5m: i64,
    pub claims_10m: i64,
    pub misses_10m: i64,
    pub claims_30m: i64,
    pub misses_30m: i64,
    pub claims_60m: i64,
    pub misses_60m: i64,
    pub claims_120m: i64,
    pub misses_120m: i64,
}

impl ClaimHistory {
    /// Claims per window, in the order of `prebuilds_core::WINDOW_MINUTES`.
    pub fn claims(&self) -> [u32; 5] {
        [
            self.claims_5m,
            self.claims_10m,
            self.claims_30m,
            self.claims_60m,
            self.claims_120m,
        ]
        .map(count)
    }

    /// Misses per window, in the same order.
    pub fn misses(&self) -> [u32; 5] {
        [
            self.misses_5m,
            self.misses_10m,
            self.misses_30m,
            self.misses_60m,
            self.misses_120m,
        ]
        .map(count)
    }
}

fn count(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The history of `preset_ids` at `now`, with windows of `unit` minutes (one minute in
/// production; presets without claims are absent: read them as zero).
pub async fn claim_history<C: GenericClient>(
    c: &C,
    preset_ids: &[Uuid],
    now: DateTime<Utc>,
    unit: Duration,
) -> Result<HashMap<Uuid, ClaimHistory>, tokio_postgres::Error> {
    let ids = preset_ids.to_vec();
    // As a PostgreSQL interval in microseconds; the statement multiplies it per window.
    let unit = format!("{} microseconds", unit.as_micros());
    let rows = c
        .query(include_str!("sql/claim_history.sql"), &[&ids, &now, &unit])
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get("preset_id"),
                ClaimHistory {
                    claims_5m: r.get("claims_5m"),
                    misses_5m: r.get("misses_5m"),
                    claims_10m: r.get("claims_10m"),
                    misses_10m: r.get("misses_10m"),
                    claims_30m: r.get("claims_30m"),
                    misses_30m: r.get("misses_30m"),
                    claims_60m: r.get("claims_60m"),
                    misses_60m: r.get("misses_60m"),
                    claims_120m: r.get("claims_120m"),
                    misses_120m: r.get("misses_120m"),
                },
            )
        })
        .collect())
}
