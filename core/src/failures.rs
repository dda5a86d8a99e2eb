//! Failure accounting from a preset's build history: backoff after recent failed creates, and
//! the hard limit that stops creation after consecutive failures.
//!
//! Input population (`PresetSnapshot::start_builds`): the preset's prebuilds whose latest build
//! is a `start`, newest first. Failed prebuilds are never deleted by the reconciler, so they keep
//! counting until they leave the lookback window or an operator removes them.
//!
//! Builds created before the preset's `failures_reset_at` (an operator's `prebuildsctl preset
//! reset`) are left out of that population: a reset forgives the history that caused the limit.
//!
//! Failed-prebuild clean-up ([`failed_to_delete`]) is opt-in (`PREBUILDS_FAILED_RETENTION`).
//!
//! Which presets are considered mirrors Coder's queries, so the shell can pass the history of
//! any preset unfiltered:
//! - backoff: only presets whose version is the template's active version and whose template is
//!   not deleted (`GetPresetsBackoff`). A *deprecated* template is not excluded, so a preset that
//!   is inactive only through deprecation can still be in backoff — which then also defers its
//!   cleanup, as the `inactive_with_backoff` scenario expects;
//! - hard limit: only presets on the active version, deleted templates included
//!   (`GetPresetsAtFailureLimit`).

use std::borrow::Cow;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use uuid::Uuid;

use crate::snapshot::{BuildOutcome, PresetSnapshot, ReconcileConfig, StartBuild};
use crate::state::count;

/// Recent failures of a preset (Coder's backoff row).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backoff {
    /// Failed builds within the lookback window (whole history, not only the newest N).
    pub num_failed: u32,
    /// Creation time of the newest failed build among the newest N within the window.
    pub last_failed_at: DateTime<Utc>,
}

impl Backoff {
    /// `last_failed_at + num_failed × interval`, saturating at the end of time.
    pub fn until(&self, interval: TimeDelta) -> DateTime<Utc> {
        let factor = i32::try_from(self.num_failed).unwrap_or(i32::MAX);
        interval
            .checked_mul(factor)
            .and_then(|delay| self.last_failed_at.checked_add_signed(delay))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// The backoff row of a preset, if it has one.
///
/// 1. Only presets on the active version of a non-deleted template are considered.
/// 2. N = the base `desired_instances`; the window starts at `now − backoff_lookback`
///    (inclusive).
/// 3. Among the newest N builds, the failed ones created inside the window; none → no backoff.
/// 4. `last_failed_at` = the newest of those; `num_failed` = failed builds inside the window
///    over the whole history.
///
/// Whether the backoff is still in effect (`now <= until`) is [`backoff_until`]'s concern.
pub fn backoff(
    snapshot: &PresetSnapshot,
    now: DateTime<Utc>,
    config: &ReconcileConfig,
) -> Option<Backoff> {
    let preset = &snapshot.preset;
    if !preset.version_is_active || preset.template_deleted {
        return None;
    }
    let n = preset.base_desired() as usize;
    let window_start = now
        .checked_sub_signed(config.backoff_lookback)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let in_window =
        |b: &&StartBuild| b.outcome == BuildOutcome::Failed && b.created_at >= window_start;
    let builds = history(snapshot);
    let last_failed_at = builds
        .iter()
        .take(n)
        .filter(in_window)
        .map(|b| b.created_at)
        .max()?;
    let num_failed = count(builds.iter().filter(in_window).count());
    Some(Backoff {
        num_failed,
        last_failed_at,
    })
}

/// The end of the backoff, while it is in effect (`now <= until`); `None` otherwise.
pub fn backoff_until(
    snapshot: &PresetSnapshot,
    now: DateTime<Utc>,
    config: &ReconcileConfig,
) -> Option<DateTime<Utc>> {
    backoff(snapshot, now, config)
        .map(|b| b.until(config.backoff_interval))
        .filter(|until| now <= *until)
}

/// Whether the preset is at the failure hard limit: it is on the active version, the limit is
/// not 0, at least `failure_hard_limit` builds exist and the newest that many all failed.
pub fn is_hard_limited(snapshot: &PresetSnapshot, config: &ReconcileConfig) -> bool {
    let limit = config.failure_hard_limit as usize;
    if limit == 0 || !snapshot.preset.version_is_active {
        return false;
    }
    let builds = history(snapshot);
    if builds.len() < limit {
        return false;
    }
    builds
        .iter()
        .take(limit)
        .all(|b| b.outcome == BuildOutcome::Failed)
}

/// The newest start build of the counted history (after any reset), if there is one.
pub fn newest_build(snapshot: &PresetSnapshot) -> Option<StartBuild> {
    history(snapshot).first().copied()
}

/// The counted history newest first: builds created before `failures_reset_at` are left out. The
/// shell already sorts it; a copy is made only if it did not (or a reset filters it), so "the
/// newest N" never depends on the caller getting the order right.
fn history(snapshot: &PresetSnapshot) -> Cow<'_, [StartBuild]> {
    let builds = &snapshot.start_builds;
    let forgiven = |b: &StartBuild| {
        snapshot
            .failures_reset_at
            .is_some_and(|at| b.created_at < at)
    };
    if builds.is_sorted_by(|a, b| a.created_at >= b.created_at) && !builds.iter().any(forgiven) {
        return Cow::Borrowed(builds);
    }
    let mut sorted: Vec<StartBuild> = builds.iter().filter(|b| !forgiven(b)).copied().collect();
    sorted.sort_by_key(|b| std::cmp::Reverse(b.created_at));
    Cow::Owned(sorted)
}

/// Failed prebuilds to delete (opt-in clean-up), oldest first:
/// 1. nothing unless `failed_retention` is set;
/// 2. the newest `failed_keep` failed prebuilds (by creation time, then id) are always kept as
///    evidence;
/// 3. of the rest, those created strictly before `now − failed_retention` are deleted.
pub fn failed_to_delete(
    snapshot: &PresetSnapshot,
    now: DateTime<Utc>,
    config: &ReconcileConfig,
) -> Vec<Uuid> {
    let Some(retention) = config.failed_retention else {
        return Vec::new();
    };
    let cutoff = now
        .checked_sub_signed(retention)
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    let mut failed: Vec<_> = snapshot.failed.iter().collect();
    // Newest first; ties broken by id so the result does not depend on the input order.
    failed.sort_unstable_by_key(|f| std::cmp::Reverse((f.created_at, f.workspace_id)));
    let mut doomed: Vec<_> = failed
        .into_iter()
        .skip(config.failed_keep as usize)
        .filter(|f| f.created_at < cutoff)
        .collect();
    doomed.reverse();
    doomed.into_iter().map(|f| f.workspace_id).collect()
}
