//! Derived per-preset state: the counts every decision (and the status/metrics output) is based
//! on, plus the expiry rule that splits running prebuilds.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::autoscale::desired_count;
use crate::snapshot::{PresetInfo, PresetSnapshot, RunningPrebuild};

/// Counts derived from a snapshot at an instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PresetState {
    /// Running prebuilds, expired included.
    pub actual: u32,
    /// Desired count at `now` (0 when inactive).
    pub desired: u32,
    /// Non-expired running prebuilds that are ready, i.e. claimable (0 when inactive).
    pub eligible: u32,
    /// Non-expired running prebuilds beyond `desired` (0 when inactive).
    pub extraneous: u32,
    /// Running prebuilds that are expired.
    pub expired: u32,
    pub starting: u32,
    pub stopping: u32,
    pub deleting: u32,
}

/// Whether a running prebuild is expired at `now`:
/// 1. it was created before the preset's `last_invalidated_at`, or
/// 2. the preset has a TTL (> 0) and the prebuild is strictly older than it.
pub fn is_expired(preset: &PresetInfo, prebuild: &RunningPrebuild, now: DateTime<Utc>) -> bool {
    if preset
        .last_invalidated_at
        .is_some_and(|at| prebuild.created_at < at)
    {
        return true;
    }
    preset
        .ttl()
        .is_some_and(|ttl| now.signed_duration_since(prebuild.created_at) > ttl)
}

/// The state of a preset at `now` (desired count evaluated at `now`).
pub fn state(snapshot: &PresetSnapshot, now: DateTime<Utc>) -> PresetState {
    let desired = desired_count(snapshot, now).count;
    state_with_desired(snapshot, now, desired)
}

/// State with an already computed desired count (the planner computes it once).
pub(crate) fn state_with_desired(
    snapshot: &PresetSnapshot,
    now: DateTime<Utc>,
    desired: u32,
) -> PresetState {
    let preset = &snapshot.preset;
    let active = preset.is_active();
    let mut expired = 0u32;
    let mut ready = 0u32;
    for prebuild in &snapshot.running {
        if is_expired(preset, prebuild, now) {
            expired += 1;
        } else if prebuild.ready {
            ready += 1;
        }
    }
    let actual = count(snapshot.running.len());
    let fresh = actual - expired;
    PresetState {
        actual,
        desired,
        eligible: if active { ready } else { 0 },
        extraneous: if active {
            fresh.saturating_sub(desired)
        } else {
            0
        },
        expired,
        starting: snapshot.in_progress.starting,
        stopping: snapshot.in_progress.stopping,
        deleting: snapshot.in_progress.deleting,
    }
}

/// A collection length as a count; a preset with more than `u32::MAX` prebuilds is not a thing.
pub(crate) fn count(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}
