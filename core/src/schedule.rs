//! Desired instance count of a preset at an instant: base `desired_instances`, overridden by the
//! first schedule whose time range contains the instant; plus validation of a schedule set
//! (what `prebuildsctl` rejects up front and what makes the reconciler fall back to the base).

use chrono::{DateTime, Utc};
use chrono_tz::Tz;

use crate::cron::{CronField, CronSpec, OverlapWitness};
use crate::snapshot::{clamp_count, PresetInfo, Schedule};

/// Why a schedule set cannot be used. Messages say what is wrong and name the offending cron.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(
        "scheduling timezone is empty but {schedules} schedule(s) are defined; \
         set an IANA timezone such as 'UTC' or 'Europe/Berlin'"
    )]
    EmptyTimezone { schedules: usize },
    #[error(
        "unknown scheduling timezone '{timezone}'; \
         expected an IANA name such as 'UTC' or 'America/Los_Angeles'"
    )]
    UnknownTimezone { timezone: String },
    #[error(
        "cron expression '{cron}' has {found} fields; \
         expected 5 (minute hour day-of-month month day-of-week)"
    )]
    FieldCount { cron: String, found: usize },
    #[error(
        "cron expression '{cron}': minute field is '{minute}' but must be '*' \
         (a schedule covers whole hours)"
    )]
    MinuteNotStar { cron: String, minute: String },
    #[error("cron expression '{cron}': {field} field '{value}' is invalid: {reason}")]
    InvalidField {
        cron: String,
        field: CronField,
        value: String,
        reason: String,
    },
    #[error("schedule '{cron}' has negative desired instances {instances}; use 0 or more")]
    NegativeInstances { cron: String, instances: i32 },
    #[error(
        "schedules '{first}' and '{second}' overlap: {}; schedules of one preset must not \
         overlap (their hours, months and days are compared field by field, as Coder does)",
        overlap_detail(witness)
    )]
    Overlap {
        first: String,
        second: String,
        /// A real local hour both cover, when there is one (Coder's rule can refuse a pair that
        /// shares none, such as day 31 against April).
        witness: Option<OverlapWitness>,
    },
}

/// Where a desired count came from, so the shell can log (and report) it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredSource {
    /// The preset is inactive: desired is 0 whatever is configured.
    Inactive,
    /// `desired_instances IS NULL`: prebuilds are not configured; desired is 0.
    NotConfigured,
    /// The base `desired_instances` (no schedules, or none matched).
    Base,
    /// Schedule at this index (stored order) matched.
    Schedule { index: usize },
    /// The schedule set is unusable (the shell logs the error); the base value applies.
    InvalidSchedules(ScheduleError),
    /// The built-in demand policy of `autoscaling` ([`crate::autoscale::forecast`]).
    Autoscaling,
    /// The preset's `autoscaling.expression`.
    Expression,
    /// The expression failed at run time; the scheduled target (clamped) applies.
    ExpressionFallback(crate::autoscale::ExpressionFailure),
}

impl DesiredSource {
    /// The spelling of `status --json`'s `desired_source` and of the source gauge's label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Inactive => "inactive",
            Self::NotConfigured => "not_configured",
            Self::Base => "base",
            Self::Schedule { .. } => "schedule",
            Self::InvalidSchedules(_) => "invalid_schedules",
            Self::Autoscaling => "autoscaling",
            Self::Expression => "expression",
            Self::ExpressionFallback(_) => "expression_fallback",
        }
    }
}

/// A desired count and its source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredCount {
    pub count: u32,
    pub source: DesiredSource,
}

/// Desired number of prebuilds of `preset` at `at`.
///
/// 1. Inactive preset → 0 (`Inactive`).
/// 2. Prebuilds not configured → 0 (`NotConfigured`).
/// 3. No schedules → base (`Base`).
/// 4. Empty or unknown timezone, an unparsable schedule, a negative count or an overlapping pair
///    → base (`InvalidSchedules(error)`); nothing from a broken set is trusted.
/// 5. The first schedule (stored order) whose range contains `at` in the preset's timezone →
///    its count (`Schedule { index }`).
/// 6. Otherwise base (`Base`).
pub fn desired_instances(
    preset: &PresetInfo,
    schedules: &[Schedule],
    at: DateTime<Utc>,
) -> DesiredCount {
    if !preset.is_active() {
        return DesiredCount {
            count: 0,
            source: DesiredSource::Inactive,
        };
    }
    let Some(base) = preset.desired_instances else {
        return DesiredCount {
            count: 0,
            source: DesiredSource::NotConfigured,
        };
    };
    let base = clamp_count(base);
    if schedules.is_empty() {
        return DesiredCount {
            count: base,
            source: DesiredSource::Base,
        };
    }
    let (tz, specs) = match parse_schedules(&preset.scheduling_timezone, schedules) {
        Ok(parsed) => parsed,
        Err(error) => {
            return DesiredCount {
                count: base,
                source: DesiredSource::InvalidSchedules(error),
            }
        }
    };
    let local = at.with_timezone(&tz);
    match specs.iter().position(|spec| spec.contains(&local)) {
        Some(index) => DesiredCount {
            count: clamp_count(schedules[index].desired_instances),
            source: DesiredSource::Schedule { index },
        },
        None => DesiredCount {
            count: base,
            source: DesiredSource::Base,
        },
    }
}

/// Checks a preset's timezone and schedule set the way the reconciler will read it.
///
/// 1. A non-empty timezone must be a known IANA name; an empty one is only allowed without
///    schedules.
/// 2. Every cron must parse (5 fields, minute `*`, valid hour/day/month/weekday fields).
/// 3. No schedule may ask for a negative count.
/// 4. No two schedules may overlap by Coder's rule ([`CronSpec::overlaps_as_coder`]): hours,
///    months and days compared field by field. A set that passes may still share real hours
///    (`* 9 1 * 1` and `* 9 15 * 3` both cover a Wednesday the 1st); there the first schedule in
///    stored order wins, as in Coder ([`desired_instances`], step 5).
///
/// Stricter than [`desired_instances`] in one respect: an unknown timezone is reported even when
/// there are no schedules (it would break the first schedule added later).
pub fn validate_schedules(timezone: &str, schedules: &[Schedule]) -> Result<(), ScheduleError> {
    if schedules.is_empty() && !timezone.is_empty() {
        parse_timezone(timezone)?;
    }
    parse_schedules(timezone, schedules).map(|_| ())
}

/// Parses the timezone and every cron, then checks counts and pairwise overlap.
fn parse_schedules(
    timezone: &str,
    schedules: &[Schedule],
) -> Result<(Tz, Vec<CronSpec>), ScheduleError> {
    if schedules.is_empty() {
        return Ok((Tz::UTC, Vec::new()));
    }
    if timezone.is_empty() {
        return Err(ScheduleError::EmptyTimezone {
            schedules: schedules.len(),
        });
    }
    let tz = parse_timezone(timezone)?;
    let mut specs = Vec::with_capacity(schedules.len());
    for schedule in schedules {
        specs.push(CronSpec::parse(&schedule.cron_expression)?);
        if schedule.desired_instances < 0 {
            return Err(ScheduleError::NegativeInstances {
                cron: schedule.cron_expression.clone(),
                instances: schedule.desired_instances,
            });
        }
    }
    for (i, a) in specs.iter().enumerate() {
        for (j, b) in specs.iter().enumerate().skip(i + 1) {
            if a.overlaps_as_coder(b) {
                return Err(ScheduleError::Overlap {
                    first: schedules[i].cron_expression.clone(),
                    second: schedules[j].cron_expression.clone(),
                    witness: a.overlap(b),
                });
            }
        }
    }
    Ok((tz, specs))
}

/// The overlap error's middle part: the shared hour when there is one.
fn overlap_detail(witness: &Option<OverlapWitness>) -> String {
    match witness {
        Some(witness) => format!("both cover {witness}"),
        None => {
            "their hours, months and days intersect (though no calendar date has both)".to_owned()
        }
    }
}

fn parse_timezone(timezone: &str) -> Result<Tz, ScheduleError> {
    timezone
        .parse::<Tz>()
        .map_err(|_| ScheduleError::UnknownTimezone {
            timezone: timezone.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(cron: &str, n: i32) -> Schedule {
        Schedule {
            cron_expression: cron.to_owned(),
            desired_instances: n,
        }
    }

    #[test]
    fn valid_sets_pass() {
        assert_eq!(validate_schedules("", &[]), Ok(()));
        assert_eq!(validate_schedules("UTC", &[]), Ok(()));
        let set = [sched("* 9-18 * * 1-5", 2), sched("* 9-13 * * 6,0", 3)];
        assert_eq!(validate_schedules("Europe/Berlin", &set), Ok(()));
    }

    /// A set Coder accepts although two schedules share real hours (each restricts both day
    /// fields, and neither the days of month nor the weekdays meet): accepted, and where both
    /// cover an hour the first in stored order wins, as in Coder.
    #[test]
    fn a_coder_valid_set_with_shared_hours_resolves_by_first_match() {
        let set = [sched("* 9 1 * 1", 2), sched("* 9 15 * 3", 5)];
        assert_eq!(validate_schedules("UTC", &set), Ok(()));
        let preset = PresetInfo::for_test(1, "UTC");
        let at = |s: &str| s.parse::<DateTime<Utc>>().unwrap();
        // Monday 15 June 2026: the first (a Monday) and the second (the 15th) both cover it.
        let both = desired_instances(&preset, &set, at("2026-06-15T09:30:00Z"));
        assert_eq!(
            (both.count, both.source),
            (2, DesiredSource::Schedule { index: 0 })
        );
        // Wednesday 17 June: only the second (a Wednesday).
        let second = desired_instances(&preset, &set, at("2026-06-17T09:30:00Z"));
        assert_eq!(
            (second.count, second.source),
            (5, DesiredSource::Schedule { index: 1 })
        );
        // 10:00 is outside both.
        assert_eq!(
            desired_instances(&preset, &set, at("2026-06-15T10:00:00Z")).source,
            DesiredSource::Base
        );
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        let cases: Vec<(&str, Vec<Schedule>, &str)> = vec![
            (
                "",
                vec![sched("* 9 * * *", 1)],
                "scheduling timezone is empty but 1 schedule(s) are defined; set an IANA timezone",
            ),
            ("Mars/Olympus", vec![], "unknown scheduling timezone 'Mars/Olympus'"),
            ("Mars/Olympus", vec![sched("* 9 * * *", 1)], "unknown scheduling timezone 'Mars/Olympus'"),
            (
                "UTC",
                vec![sched("30 9 * * *", 1)],
                "cron expression '30 9 * * *': minute field is '30' but must be '*'",
            ),
            (
                "UTC",
                vec![sched("* 9 * 13 *", 1)],
                "cron expression '* 9 * 13 *': month field '13' is invalid: 13 is out of range 1-12",
            ),
            (
                "UTC",
                vec![sched("* 9 * * mon-fry", 1)],
                "day-of-week field 'mon-fry' is invalid: 'fry' is not a number or a weekday name",
            ),
            ("UTC", vec![sched("* 9 *", 1)], "cron expression '* 9 *' has 3 fields; expected 5"),
            (
                "UTC",
                vec![sched("* 9 * * *", -1)],
                "schedule '* 9 * * *' has negative desired instances -1",
            ),
            (
                "UTC",
                vec![sched("* 8-18 * * 1-5", 2), sched("* 2-4 * * *", 1), sched("* 18-20 * * 5", 3)],
                "schedules '* 8-18 * * 1-5' and '* 18-20 * * 5' overlap: both cover 18:00-18:59 on Fri",
            ),
        ];
        for (tz, set, want) in cases {
            let err = validate_schedules(tz, &set).unwrap_err().to_string();
            assert!(err.contains(want), "got: {err}\nwant: {want}");
        }
    }

    #[test]
    fn broken_set_falls_back_to_base_with_error() {
        let preset = PresetInfo::for_test(1, "UTC");
        let at = "2025-06-02T10:00:00Z".parse().unwrap();
        let set = [sched("* 9-18 * * 1-5", 3), sched("* 10 * * *", 4)];
        let got = desired_instances(&preset, &set, at);
        assert_eq!(got.count, 1);
        assert!(matches!(
            got.source,
            DesiredSource::InvalidSchedules(ScheduleError::Overlap { .. })
        ));

        let no_tz = PresetInfo {
            scheduling_timezone: String::new(),
            ..preset.clone()
        };
        let got = desired_instances(&no_tz, &set[..1], at);
        assert_eq!(got.count, 1);
        assert!(matches!(
            got.source,
            DesiredSource::InvalidSchedules(ScheduleError::EmptyTimezone { .. })
        ));

        let unconfigured = PresetInfo {
            desired_instances: None,
            ..preset
        };
        assert_eq!(
            desired_instances(&unconfigured, &set[..1], at).source,
            DesiredSource::NotConfigured
        );
    }
}
