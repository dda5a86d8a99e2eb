//! Input types: everything the shell reads about one preset (under the preset's lock) and hands
//! to the pure core, plus the reconciler's tunables. Nothing here is derived; see `state` and
//! `actions` for what is computed from it.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::autoscale::{Autoscaling, Demand};

/// The preset's stored `prebuild_status` (column `template_version_presets.prebuild_status`).
///
/// Only the reconciler moves a preset away from `Healthy`. A `hard_limited` preset recovers through
/// the probe of [`crate::recovery`]; `validation_failed` is cleared by an operator
/// (`prebuildsctl preset reset`) or a new template version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PrebuildStatus {
    #[default]
    Healthy,
    HardLimited,
    ValidationFailed,
}

impl PrebuildStatus {
    /// The database / JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::HardLimited => "hard_limited",
            Self::ValidationFailed => "validation_failed",
        }
    }
}

impl fmt::Display for PrebuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `prebuild_status` value that is none of the three known spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown prebuild status '{0}': expected 'healthy', 'hard_limited' or 'validation_failed'")]
pub struct UnknownStatus(pub String);

impl FromStr for PrebuildStatus {
    type Err = UnknownStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "healthy" => Ok(Self::Healthy),
            "hard_limited" => Ok(Self::HardLimited),
            "validation_failed" => Ok(Self::ValidationFailed),
            other => Err(UnknownStatus(other.to_owned())),
        }
    }
}

/// One row of `template_version_preset_prebuild_schedules`, in stored order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// 5-field cron whose minute field is `*`, read as a continuous time range.
    pub cron_expression: String,
    pub desired_instances: i32,
}

/// The preset row and the flags of its template/version that the rules need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresetInfo {
    pub id: Uuid,
    pub name: String,
    /// The preset's version is its template's active version.
    pub version_is_active: bool,
    pub template_deleted: bool,
    /// The template's deprecation message is non-empty.
    pub template_deprecated: bool,
    /// `None` = prebuilds not configured for this preset; `Some(0)` is a valid configured value.
    pub desired_instances: Option<i32>,
    /// `None` or `<= 0` = no TTL.
    pub invalidate_after_secs: Option<i32>,
    pub last_invalidated_at: Option<DateTime<Utc>>,
    /// IANA name; `""` = none.
    pub scheduling_timezone: String,
    pub prebuild_status: PrebuildStatus,
    /// Global OR template OR preset pause, already resolved by the shell.
    pub paused: bool,
}

impl PresetInfo {
    /// An active, healthy, unpaused preset with `desired` instances in `timezone`, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_test(desired: i32, timezone: &str) -> PresetInfo {
        PresetInfo {
            id: uuid::Uuid::nil(),
            name: "p".into(),
            version_is_active: true,
            template_deleted: false,
            template_deprecated: false,
            desired_instances: Some(desired),
            invalidate_after_secs: None,
            last_invalidated_at: None,
            scheduling_timezone: timezone.into(),
            prebuild_status: Default::default(),
            paused: false,
        }
    }

    /// A preset is active when its version is the template's active version and the template is
    /// neither deleted nor deprecated. Inactive presets only get cleaned up.
    pub fn is_active(&self) -> bool {
        self.version_is_active && !self.template_deleted && !self.template_deprecated
    }

    /// The base `desired_instances` as a count (unconfigured and negative values read as 0).
    pub fn base_desired(&self) -> u32 {
        self.desired_instances.map_or(0, clamp_count)
    }

    /// The TTL, when one is set (`invalidate_after_secs > 0`).
    pub fn ttl(&self) -> Option<TimeDelta> {
        self.invalidate_after_secs
            .filter(|secs| *secs > 0)
            .map(|secs| TimeDelta::seconds(i64::from(secs)))
    }
}

/// A prebuild whose latest build is a `start` whose job succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningPrebuild {
    pub workspace_id: Uuid,
    /// The workspace's creation time (what TTL and invalidation compare against).
    pub created_at: DateTime<Utc>,
    /// Every non-deleted agent of its latest build is lifecycle `ready` (false if none).
    pub ready: bool,
}

/// Prebuild builds of this preset whose job is `pending` or `running`, per transition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct InProgress {
    pub starting: u32,
    pub stopping: u32,
    pub deleting: u32,
}

/// The job outcome of a prebuild's latest `start` build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildOutcome {
    Succeeded,
    Failed,
    /// Pending or running.
    InProgress,
    Canceled,
}

/// One prebuild of this preset whose latest build is a `start`, with that build's creation time
/// and job outcome; the shell passes them newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartBuild {
    pub created_at: DateTime<Utc>,
    pub outcome: BuildOutcome,
}

/// The stored hard-limit circuit breaker of a preset (columns `hard_limited_at`,
/// `hard_limit_probe_at`, `hard_limit_cooldown_secs`): when it tripped, the current cooldown and
/// when the next probe create may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardLimitRecord {
    pub since: DateTime<Utc>,
    pub cooldown_secs: i64,
    pub next_probe_at: DateTime<Utc>,
}

impl HardLimitRecord {
    pub fn cooldown(&self) -> TimeDelta {
        TimeDelta::try_seconds(self.cooldown_secs).unwrap_or(TimeDelta::MAX)
    }
}

/// A prebuild whose latest build is a `start` whose job failed (kept as evidence; see
/// `failures::failed_to_delete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedPrebuild {
    pub workspace_id: Uuid,
    /// The workspace's creation time.
    pub created_at: DateTime<Utc>,
}

/// Everything the rules look at for one preset, read in one consistent snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresetSnapshot {
    pub preset: PresetInfo,
    /// Schedule rows in stored order (the first matching one wins).
    pub schedules: Vec<Schedule>,
    /// Running prebuilds, expired included, in any order.
    pub running: Vec<RunningPrebuild>,
    pub in_progress: InProgress,
    /// Pending build-#1 `start` jobs of this preset (only acted on when the preset is inactive).
    pub pending_non_active: u32,
    /// Failure-history input, newest first.
    pub start_builds: Vec<StartBuild>,
    /// The stored hard-limit record, when the preset has one.
    #[serde(default)]
    pub hard_limit: Option<HardLimitRecord>,
    /// An operator reset the preset (`prebuildsctl preset reset`) at this instant: builds created
    /// before it no longer count toward backoff or the hard limit.
    #[serde(default)]
    pub failures_reset_at: Option<DateTime<Utc>>,
    /// Failed prebuilds of the preset, in any order.
    #[serde(default)]
    pub failed: Vec<FailedPrebuild>,
    /// The preset's `autoscaling` block, when it has one ([`crate::autoscale`]).
    #[serde(default)]
    pub autoscaling: Option<Autoscaling>,
    /// Recent claims, misses and create durations (only read with `autoscaling`).
    #[serde(default)]
    pub demand: Demand,
}

/// The reconciler's tunables (`PREBUILDS_BACKOFF_INTERVAL`, `PREBUILDS_BACKOFF_LOOKBACK`,
/// `PREBUILDS_FAILURE_HARD_LIMIT`, `PREBUILDS_HARD_LIMIT_COOLDOWN[_MAX]`,
/// `PREBUILDS_MAX_INFLIGHT_JOBS`, `PREBUILDS_MAX_INFLIGHT_PER_PRESET`,
/// `PREBUILDS_MAX_CREATES_PER_PASS`, `PREBUILDS_FAILED_RETENTION`, `PREBUILDS_FAILED_KEEP`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileConfig {
    /// Added to the last failure once per failure in the lookback window.
    pub backoff_interval: TimeDelta,
    /// Failures older than this no longer cause backoff.
    pub backoff_lookback: TimeDelta,
    /// This many newest builds all failed → hard limited. 0 disables.
    pub failure_hard_limit: u32,
    /// Wait before the first probe create of a hard-limited preset.
    pub hard_limit_cooldown: TimeDelta,
    /// The cooldown doubles after each failed probe, up to this.
    pub hard_limit_cooldown_max: TimeDelta,
    /// Global cap on in-flight prebuild create jobs (0 = unlimited).
    pub max_inflight_jobs: u32,
    /// Per-preset cap on in-flight prebuild create jobs (0 = unlimited).
    pub max_inflight_per_preset: u32,
    /// Most prebuild creates one reconcile transaction makes, over all its presets (0 =
    /// unlimited); the rest are made by follow-up passes ([`crate::capacity::CreateBudget`]).
    pub max_creates_per_pass: u32,
    /// Failed prebuilds older than this are deleted (beyond the newest `failed_keep`); `None` =
    /// never (the default: failed prebuilds are evidence).
    pub failed_retention: Option<TimeDelta>,
    /// Newest failed prebuilds per preset that are always kept.
    pub failed_keep: u32,
}

/// Default of [`ReconcileConfig::max_creates_per_pass`] (`PREBUILDS_MAX_CREATES_PER_PASS`).
pub const DEFAULT_MAX_CREATES_PER_PASS: u32 = 50;

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            backoff_interval: TimeDelta::minutes(1),
            backoff_lookback: TimeDelta::hours(1),
            failure_hard_limit: 3,
            hard_limit_cooldown: TimeDelta::minutes(30),
            hard_limit_cooldown_max: TimeDelta::hours(4),
            max_inflight_jobs: 0,
            max_inflight_per_preset: 0,
            max_creates_per_pass: DEFAULT_MAX_CREATES_PER_PASS,
            failed_retention: None,
            failed_keep: 3,
        }
    }
}

/// Reads a stored `i32` count; negative values (rejected by validation, but the column allows
/// them) count as 0.
pub(crate) fn clamp_count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}
