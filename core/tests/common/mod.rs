//! Fixtures shared by the scenario and property tests.
#![allow(dead_code)]

use chrono::{DateTime, TimeDelta, Utc};
use prebuilds_core::*;
use uuid::Uuid;

/// Monday 2 June 2025, 12:00 UTC.
pub fn now() -> DateTime<Utc> {
    at("2025-06-02T12:00:00Z")
}

/// Parses an RFC 3339 instant (any offset) into UTC.
pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("fixture instant is RFC 3339")
        .with_timezone(&Utc)
}

pub fn secs(n: i64) -> TimeDelta {
    TimeDelta::seconds(n)
}

/// Workspace id of fixture prebuild `#i`.
pub fn id(i: usize) -> Uuid {
    Uuid::from_u128(0x1000 + i as u128)
}

/// An active preset with `desired` instances, nothing else set.
pub fn preset(desired: i32) -> PresetInfo {
    PresetInfo {
        id: Uuid::from_u128(1),
        name: "preset".into(),
        version_is_active: true,
        template_deleted: false,
        template_deprecated: false,
        desired_instances: Some(desired),
        invalidate_after_secs: None,
        last_invalidated_at: None,
        scheduling_timezone: String::new(),
        prebuild_status: PrebuildStatus::Healthy,
        paused: false,
    }
}

/// A preset on a non-active version.
pub fn inactive(desired: i32) -> PresetInfo {
    PresetInfo {
        version_is_active: false,
        ..preset(desired)
    }
}

pub fn snapshot(preset: PresetInfo) -> PresetSnapshot {
    PresetSnapshot {
        preset,
        schedules: Vec::new(),
        running: Vec::new(),
        in_progress: InProgress::default(),
        pending_non_active: 0,
        start_builds: Vec::new(),
        hard_limit: None,
        failures_reset_at: None,
        failed: Vec::new(),
        autoscaling: None,
        demand: Default::default(),
    }
}

/// Fixture prebuild `#i`.
pub fn running(i: usize, created_at: DateTime<Utc>, ready: bool) -> RunningPrebuild {
    RunningPrebuild {
        workspace_id: id(i),
        created_at,
        ready,
    }
}

pub fn failed(created_at: DateTime<Utc>) -> StartBuild {
    StartBuild {
        created_at,
        outcome: BuildOutcome::Failed,
    }
}

pub fn sched(cron: &str, n: i32) -> Schedule {
    Schedule {
        cron_expression: cron.into(),
        desired_instances: n,
    }
}

pub fn create(count: u32) -> Action {
    Action::Create { count }
}

/// `Delete` of fixture prebuilds by index, in the given order.
pub fn delete(indices: &[usize]) -> Action {
    Action::Delete {
        workspace_ids: indices.iter().map(|i| id(*i)).collect(),
    }
}

pub fn config(backoff_interval: TimeDelta) -> ReconcileConfig {
    ReconcileConfig {
        backoff_interval,
        ..ReconcileConfig::default()
    }
}

pub const ZERO: PresetState = PresetState {
    actual: 0,
    desired: 0,
    eligible: 0,
    extraneous: 0,
    expired: 0,
    starting: 0,
    stopping: 0,
    deleting: 0,
};

/// A named given → expected case.
pub struct Case {
    pub name: &'static str,
    pub snapshot: PresetSnapshot,
    pub now: DateTime<Utc>,
    pub config: ReconcileConfig,
    pub state: PresetState,
    pub actions: Vec<Action>,
}

/// Asserts state and actions of every case, naming the failing one; also checks that `plan`,
/// `state` and `actions` agree.
pub fn check(cases: Vec<Case>) {
    for case in cases {
        let plan = plan(&case.snapshot, case.now, &case.config);
        assert_eq!(plan.state, case.state, "{}: state", case.name);
        assert_eq!(plan.actions, case.actions, "{}: actions", case.name);
        assert_eq!(
            state(&case.snapshot, case.now),
            plan.state,
            "{}: state()",
            case.name
        );
        assert_eq!(
            actions(&case.snapshot, case.now, &case.config),
            plan.actions,
            "{}: actions()",
            case.name
        );
    }
}
