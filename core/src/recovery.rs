//! Hard-limit recovery: a half-open circuit breaker per preset.
//!
//! A preset whose newest `failure_hard_limit` builds all failed is `hard_limited` (the circuit is
//! open: no creates). After a cooldown one **probe** create is allowed (half-open). The outcome of
//! that build decides:
//! - it succeeded → the history is no longer at the limit → `healthy` (closed), record cleared;
//! - it failed → still at the limit → wait again, the cooldown doubled (capped).
//!
//! The record (`HardLimitRecord`: since, cooldown, next probe time) is advanced at the moment the
//! probe is *made* (in the reconcile transaction that creates it), so a probe that is never
//! executed (backoff, pause, capacity) is not lost, and a failed probe already has its next,
//! longer cooldown stored.

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

use crate::failures::{is_hard_limited, newest_build};
use crate::snapshot::{
    BuildOutcome, HardLimitRecord, PrebuildStatus, PresetSnapshot, ReconcileConfig,
};

/// A change to the stored hard-limit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum HardLimitChange {
    Set(HardLimitRecord),
    Clear,
}

/// What the circuit breaker decides for a preset at an instant: one variant per state of the
/// breaker, so a decision can only carry the changes that state allows. The shell reads it through
/// the accessors below.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HardLimitDecision {
    /// Not hard-limited and nothing stored: creates run.
    #[default]
    Closed,
    /// Healthy below the limit, but a record from an earlier trip is still stored: clear it.
    ClosedClearRecord,
    /// A `validation_failed` preset whose history is also at the limit: creates held, nothing
    /// stored (validation owns the status).
    HeldForValidation,
    /// Healthy and now at the limit: store `hard_limited` and this fresh record; creates held.
    Trip(HardLimitRecord),
    /// Hard-limited and the probe create is still building: hold, wait for its outcome.
    Probing,
    /// Hard-limited but no longer at the limit (the probe succeeded, or an operator removed the
    /// failures): store `healthy`, clear the record; creates run.
    Recovered,
    /// Hard-limited and still at the limit: creates held until the record's next probe time.
    Open {
        /// The record in force.
        record: HardLimitRecord,
        /// The record must be stored (a preset limited before records existed).
        store: bool,
        /// One probe create is allowed now; when the shell makes it, it stores this record (the
        /// next probe time with the doubled cooldown).
        probe: Option<HardLimitRecord>,
    },
}

impl HardLimitDecision {
    /// Creates are held back by the hard limit (except a probe, when [`Self::probe`] is set).
    pub fn holds_creates(&self) -> bool {
        matches!(
            self,
            Self::HeldForValidation | Self::Trip(_) | Self::Probing | Self::Open { .. }
        )
    }

    /// A `prebuild_status` the shell must store.
    pub fn status_change(&self) -> Option<PrebuildStatus> {
        match self {
            Self::Trip(_) => Some(PrebuildStatus::HardLimited),
            Self::Recovered => Some(PrebuildStatus::Healthy),
            _ => None,
        }
    }

    /// A change to the stored record the shell must write (with the status).
    pub fn record_change(&self) -> Option<HardLimitChange> {
        match *self {
            Self::Trip(record)
            | Self::Open {
                record,
                store: true,
                ..
            } => Some(HardLimitChange::Set(record)),
            Self::ClosedClearRecord | Self::Recovered => Some(HardLimitChange::Clear),
            _ => None,
        }
    }

    /// The record to store with the probe create allowed now, if one is.
    pub fn probe(&self) -> Option<HardLimitRecord> {
        match *self {
            Self::Open { probe, .. } => probe,
            _ => None,
        }
    }

    /// When the next probe may run (`None` when not hard-limited or while a probe is building).
    pub fn next_probe_at(&self) -> Option<DateTime<Utc>> {
        match self {
            Self::Trip(record) | Self::Open { record, .. } => Some(record.next_probe_at),
            _ => None,
        }
    }
}

/// A fresh record: tripped at `now`, base cooldown.
fn tripped(now: DateTime<Utc>, config: &ReconcileConfig) -> HardLimitRecord {
    HardLimitRecord {
        since: now,
        cooldown_secs: config.hard_limit_cooldown.num_seconds().max(0),
        next_probe_at: add(now, config.hard_limit_cooldown),
    }
}

fn add(at: DateTime<Utc>, d: TimeDelta) -> DateTime<Utc> {
    at.checked_add_signed(d).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// The circuit breaker's decision.
///
/// Inputs: the stored status and record, the start-build history (after any reset) and `now`.
/// 1. `validation_failed`: not this module's concern; creates are held while the history is at the
///    limit, nothing is stored.
/// 2. `healthy` at the limit → `hard_limited`, record = (now, base cooldown, now + cooldown);
///    `healthy` with a stale record → clear it.
/// 3. `hard_limited`:
///    1. the newest build is still building (the probe) → hold, wait for its outcome;
///    2. no longer at the limit (the probe succeeded, or an operator removed the failures) →
///       `healthy`, record cleared;
///    3. at the limit without a record (limited before records existed) → store a fresh one;
///    4. at the limit and `now >= next_probe_at` → allow one probe; the record to store with it
///       has cooldown = min(2 × cooldown, max) and next probe = now + that cooldown.
pub fn hard_limit(
    snapshot: &PresetSnapshot,
    now: DateTime<Utc>,
    config: &ReconcileConfig,
) -> HardLimitDecision {
    let at_limit = is_hard_limited(snapshot, config);
    match snapshot.preset.prebuild_status {
        PrebuildStatus::ValidationFailed if at_limit => HardLimitDecision::HeldForValidation,
        PrebuildStatus::ValidationFailed => HardLimitDecision::Closed,
        PrebuildStatus::Healthy if at_limit => HardLimitDecision::Trip(tripped(now, config)),
        PrebuildStatus::Healthy if snapshot.hard_limit.is_some() => {
            HardLimitDecision::ClosedClearRecord
        }
        PrebuildStatus::Healthy => HardLimitDecision::Closed,
        PrebuildStatus::HardLimited => {
            let probing = snapshot.preset.version_is_active
                && newest_build(snapshot).is_some_and(|b| b.outcome == BuildOutcome::InProgress);
            if probing {
                return HardLimitDecision::Probing;
            }
            if !at_limit {
                return HardLimitDecision::Recovered;
            }
            let (record, store) = match snapshot.hard_limit {
                Some(r) => (r, false),
                None => (tripped(now, config), true),
            };
            let probe = (now >= record.next_probe_at).then(|| {
                let doubled = record
                    .cooldown()
                    .checked_mul(2)
                    .unwrap_or(TimeDelta::MAX)
                    .min(config.hard_limit_cooldown_max)
                    .max(
                        config
                            .hard_limit_cooldown
                            .min(config.hard_limit_cooldown_max),
                    );
                HardLimitRecord {
                    since: record.since,
                    cooldown_secs: doubled.num_seconds().max(0),
                    next_probe_at: add(now, doubled),
                }
            });
            HardLimitDecision::Open {
                record,
                store,
                probe,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{InProgress, PresetInfo, StartBuild};
    use chrono::TimeZone;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn snapshot(status: PrebuildStatus, outcomes: &[BuildOutcome]) -> PresetSnapshot {
        PresetSnapshot {
            preset: PresetInfo {
                prebuild_status: status,
                ..PresetInfo::for_test(1, "")
            },
            schedules: vec![],
            running: vec![],
            in_progress: InProgress::default(),
            pending_non_active: 0,
            // Newest first, one second apart.
            start_builds: outcomes
                .iter()
                .enumerate()
                .map(|(i, o)| StartBuild {
                    created_at: t(-(i as i64)),
                    outcome: *o,
                })
                .collect(),
            hard_limit: None,
            failures_reset_at: None,
            failed: vec![],
            autoscaling: None,
            demand: Default::default(),
        }
    }

    fn cfg() -> ReconcileConfig {
        ReconcileConfig {
            hard_limit_cooldown: TimeDelta::seconds(60),
            hard_limit_cooldown_max: TimeDelta::seconds(200),
            ..ReconcileConfig::default()
        }
    }

    use BuildOutcome::{Failed, InProgress as Building, Succeeded};

    #[test]
    fn trips_waits_probes_doubles_and_recovers() {
        let cfg = cfg();
        // Healthy at the limit: trips.
        let mut s = snapshot(PrebuildStatus::Healthy, &[Failed, Failed, Failed]);
        let d = hard_limit(&s, t(0), &cfg);
        assert_eq!(d.status_change(), Some(PrebuildStatus::HardLimited));
        assert!(d.holds_creates() && d.probe().is_none());
        let Some(HardLimitChange::Set(record)) = d.record_change() else {
            panic!("record stored")
        };
        assert_eq!(record.next_probe_at, t(60));
        // Stored: waits until the cooldown ends.
        s.preset.prebuild_status = PrebuildStatus::HardLimited;
        s.hard_limit = Some(record);
        let d = hard_limit(&s, t(59), &cfg);
        assert!(d.holds_creates() && d.probe().is_none() && d.status_change().is_none());
        assert_eq!(d.next_probe_at(), Some(t(60)));
        // Cooldown over: one probe, the next cooldown doubled.
        let d = hard_limit(&s, t(60), &cfg);
        let probe = d.probe().expect("probe allowed");
        assert_eq!(probe.cooldown_secs, 120);
        assert_eq!(probe.next_probe_at, t(180));
        // While the probe builds: hold, no status change.
        s.hard_limit = Some(probe);
        s.start_builds.insert(
            0,
            StartBuild {
                created_at: t(61),
                outcome: Building,
            },
        );
        let d = hard_limit(&s, t(62), &cfg);
        assert!(d.holds_creates() && d.probe().is_none() && d.status_change().is_none());
        // The probe failed: wait for the doubled cooldown, then probe with the capped one.
        s.start_builds[0].outcome = Failed;
        assert!(hard_limit(&s, t(179), &cfg).probe().is_none());
        let next = hard_limit(&s, t(180), &cfg).probe().expect("second probe");
        assert_eq!(next.cooldown_secs, 200, "capped at the maximum");
        // The probe succeeded: healthy, record cleared.
        s.start_builds[0].outcome = Succeeded;
        let d = hard_limit(&s, t(200), &cfg);
        assert_eq!(d.status_change(), Some(PrebuildStatus::Healthy));
        assert_eq!(d.record_change(), Some(HardLimitChange::Clear));
        assert!(!d.holds_creates());
    }

    #[test]
    fn a_limited_preset_without_a_record_gets_one_and_validation_failed_is_untouched() {
        let cfg = cfg();
        let s = snapshot(PrebuildStatus::HardLimited, &[Failed, Failed, Failed]);
        let d = hard_limit(&s, t(0), &cfg);
        assert!(d.probe().is_none());
        assert!(
            matches!(d.record_change(), Some(HardLimitChange::Set(r)) if r.next_probe_at == t(60))
        );
        let s = snapshot(PrebuildStatus::ValidationFailed, &[Failed, Failed, Failed]);
        let d = hard_limit(&s, t(0), &cfg);
        assert_eq!(
            (d.status_change(), d.record_change(), d.probe()),
            (None, None, None)
        );
    }

    #[test]
    fn a_reset_forgives_the_history() {
        let cfg = cfg();
        let mut s = snapshot(PrebuildStatus::Healthy, &[Failed, Failed, Failed]);
        s.failures_reset_at = Some(t(1));
        let d = hard_limit(&s, t(2), &cfg);
        assert_eq!(d, HardLimitDecision::default());
    }
}
