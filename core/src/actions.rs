//! The decision: from a snapshot and a clock to an ordered list of actions (the [`Plan`]), and the
//! execution-time guard on creates ([`creates_to_execute`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::autoscale::desired_count;
use crate::failures::{backoff, failed_to_delete, Backoff};
use crate::recovery::{hard_limit, HardLimitDecision};
use crate::schedule::DesiredCount;
use crate::snapshot::{PrebuildStatus, PresetSnapshot, ReconcileConfig, RunningPrebuild};
use crate::state::{is_expired, state_with_desired, PresetState};

/// One thing the shell must do for a preset. A plan never contains a no-op action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Action {
    /// Recent creates failed: do nothing for this preset until `until` (inclusive).
    Backoff { until: DateTime<Utc> },
    /// Cancel the preset's pending build-#1 start jobs and orphan-delete their workspaces.
    CancelPending,
    /// Delete these prebuilds, in this order (oldest first).
    Delete { workspace_ids: Vec<Uuid> },
    /// Create this many prebuilds.
    Create { count: u32 },
}

impl Action {
    /// Coder's `IsNoop`: a create of 0 or a delete of nothing. Backoff and CancelPending always
    /// mean something.
    pub fn is_noop(&self) -> bool {
        match self {
            Self::Backoff { .. } | Self::CancelPending => false,
            Self::Delete { workspace_ids } => workspace_ids.is_empty(),
            Self::Create { count } => *count == 0,
        }
    }
}

/// Everything decided about one preset at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub state: PresetState,
    /// The ordered actions (empty = nothing to do).
    pub actions: Vec<Action>,
    /// The desired count and where it came from (log `InvalidSchedules` errors).
    pub desired: DesiredCount,
    /// The preset's backoff row, in effect or not.
    pub backoff: Option<Backoff>,
    /// End of the backoff while it is in effect (`now <= until`).
    pub backoff_until: Option<DateTime<Utc>>,
    /// The hard limit holds creates back: they are skipped at execution, except one probe when
    /// `hard_limit.probe()` is set (see [`crate::recovery`]).
    pub hard_limited: bool,
    /// A `prebuild_status` the shell must store:
    /// 1. `healthy` at the hard limit → `HardLimited`;
    /// 2. `hard_limited` no longer at the limit (the probe succeeded, or an operator removed the
    ///    failed prebuilds) → `Healthy`;
    /// 3. `validation_failed` never changes here: it is set by the shell on a rejected create and
    ///    cleared by an operator (`prebuildsctl preset reset`) or a new template version.
    pub status_change: Option<PrebuildStatus>,
    /// The hard-limit circuit breaker's full decision (record to store, probe, next probe time).
    pub hard_limit: HardLimitDecision,
}

/// Plans one preset at `now`.
///
/// 1. Desired count at `now` and the state.
/// 2. Backoff row, hard limit, status change.
/// 3. Actions, the first matching rule wins:
///    1. paused → none (state and status are still reported);
///    2. backoff in effect (`now <= until`) → `[Backoff(until)]` only: no deletes or cancels
///       either;
///    3. inactive → `[CancelPending]` if pending build-#1 jobs exist, then
///       `[Delete(all running, expired included, oldest first)]`;
///    4. active → `[Delete(expired, oldest first)]`, `[Delete(oldest extraneous non-expired)]`,
///       `[Create(max(desired − (actual − expired) − starting, 0))]`, each only when non-empty;
///    5. in both 3 and 4, when `failed_retention` is set, `[Delete(failed prebuilds beyond the
///       newest failed_keep and older than the retention, oldest first)]` before any create.
///
/// "Oldest first" orders by `created_at`, then by workspace id, so the result does not depend on
/// the order of `running`. In-flight stops and deletes never reduce the create count, and in-flight
/// deletes are not subtracted from the extraneous count (the next cycle sees the truth).
pub fn plan(snapshot: &PresetSnapshot, now: DateTime<Utc>, config: &ReconcileConfig) -> Plan {
    let preset = &snapshot.preset;
    let desired = desired_count(snapshot, now);
    let state = state_with_desired(snapshot, now, desired.count);

    let backoff = backoff(snapshot, now, config);
    let backoff_until = backoff
        .map(|b| b.until(config.backoff_interval))
        .filter(|until| now <= *until);
    let hard_limit = hard_limit(snapshot, now, config);

    let actions = if preset.paused {
        Vec::new()
    } else if let Some(until) = backoff_until {
        vec![Action::Backoff { until }]
    } else {
        decide(snapshot, now, &state, config)
    };

    Plan {
        state,
        actions,
        desired,
        backoff,
        backoff_until,
        hard_limited: hard_limit.holds_creates(),
        status_change: hard_limit.status_change(),
        hard_limit,
    }
}

/// Rules 3.3 to 3.5 of [`plan`].
fn decide(
    snapshot: &PresetSnapshot,
    now: DateTime<Utc>,
    state: &PresetState,
    config: &ReconcileConfig,
) -> Vec<Action> {
    let preset = &snapshot.preset;
    let mut actions = Vec::new();

    if !preset.is_active() {
        if snapshot.pending_non_active > 0 {
            actions.push(Action::CancelPending);
        }
        let mut all: Vec<&RunningPrebuild> = snapshot.running.iter().collect();
        push_delete(&mut actions, oldest_first(&mut all));
        push_delete(
            &mut actions,
            failed_to_delete(snapshot, now, config).into_iter(),
        );
        return actions;
    }

    let (mut expired, mut fresh): (Vec<&RunningPrebuild>, Vec<&RunningPrebuild>) = snapshot
        .running
        .iter()
        .partition(|p| is_expired(preset, p, now));
    push_delete(&mut actions, oldest_first(&mut expired));
    let fresh = oldest_first(&mut fresh);
    // `extraneous` = fresh − desired when positive, so it is never more than `fresh.len()`.
    push_delete(&mut actions, fresh.take(state.extraneous as usize));
    push_delete(
        &mut actions,
        failed_to_delete(snapshot, now, config).into_iter(),
    );

    let create = state
        .desired
        .saturating_sub(state.actual - state.expired)
        .saturating_sub(state.starting);
    if create > 0 {
        actions.push(Action::Create { count: create });
    }
    actions
}

/// Sorts by `(created_at, workspace_id)` and yields the ids.
fn oldest_first<'a>(prebuilds: &'a mut [&RunningPrebuild]) -> impl Iterator<Item = Uuid> + 'a {
    prebuilds.sort_unstable_by_key(|p| (p.created_at, p.workspace_id));
    prebuilds.iter().map(|p| p.workspace_id)
}

fn push_delete(actions: &mut Vec<Action>, ids: impl Iterator<Item = Uuid>) {
    let workspace_ids: Vec<Uuid> = ids.collect();
    if !workspace_ids.is_empty() {
        actions.push(Action::Delete { workspace_ids });
    }
}

/// The ordered actions for a preset at `now` (see [`plan`]). Pure: a hard-limited preset still
/// gets its `Create`, which [`creates_to_execute`] suppresses.
pub fn actions(
    snapshot: &PresetSnapshot,
    now: DateTime<Utc>,
    config: &ReconcileConfig,
) -> Vec<Action> {
    plan(snapshot, now, config).actions
}

/// Coder's `CanSkipReconciliation`: an inactive preset with no running prebuilds (expired
/// included), no pending build-#1 jobs, no backoff row and no failed prebuilds due for clean-up
/// has nothing to do. Active presets are never skipped. The stored status is not considered (an
/// inactive preset's status is moot).
pub fn can_skip(snapshot: &PresetSnapshot, now: DateTime<Utc>, config: &ReconcileConfig) -> bool {
    !snapshot.preset.is_active()
        && snapshot.running.is_empty()
        && snapshot.pending_non_active == 0
        && backoff(snapshot, now, config).is_none()
        && failed_to_delete(snapshot, now, config).is_empty()
}

/// Why creates were not executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    Paused,
    HardLimited,
    ValidationFailed,
}

/// How many prebuilds to actually create for a planned `Create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateDecision {
    pub count: u32,
    /// The requested count when it exceeded the desired count (a bug upstream: log at error).
    pub clamped_from: Option<u32>,
    /// Set when a positive count is not executed.
    pub skipped: Option<SkipReason>,
    /// The count is the hard-limit probe (one create): the shell stores `plan.hard_limit.probe()`
    /// when it makes it.
    pub probe: bool,
}

/// Execution-time guard for a `Create { count: requested }` action (defence in depth: the plan
/// may be stale by the time it runs).
///
/// 1. Re-evaluate the desired count at `now`; a larger request is clamped to it.
/// 2. Nothing left → create nothing (no skip reason).
/// 3. Paused → skip. Hard limited (per `plan`) → skip, unless a probe is due: then create one.
///    Stored status `validation_failed` → skip.
/// 4. Otherwise create the (clamped) count.
pub fn creates_to_execute(
    requested: u32,
    snapshot: &PresetSnapshot,
    plan: &Plan,
    now: DateTime<Utc>,
) -> CreateDecision {
    let desired = desired_count(snapshot, now).count;
    let (count, clamped_from) = if requested > desired {
        (desired, Some(requested))
    } else {
        (requested, None)
    };
    let probe = count > 0
        && !snapshot.preset.paused
        && plan.hard_limited
        && plan.hard_limit.probe().is_some();
    let skipped = if count == 0 {
        None
    } else if snapshot.preset.paused {
        Some(SkipReason::Paused)
    } else if plan.hard_limited && !probe {
        Some(SkipReason::HardLimited)
    } else if snapshot.preset.prebuild_status == PrebuildStatus::ValidationFailed {
        Some(SkipReason::ValidationFailed)
    } else {
        None
    };
    let count = match (skipped, probe) {
        (Some(_), _) => 0,
        (None, true) => count.min(1),
        (None, false) => count,
    };
    CreateDecision {
        count,
        clamped_from,
        skipped,
        probe: probe && skipped.is_none(),
    }
}
