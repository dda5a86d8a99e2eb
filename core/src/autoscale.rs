//! Demand-driven sizing: the desired count of a preset with `autoscaling: {min, max,
//! expression}`, from the scheduled target ([`crate::schedule`]), the recent claims and misses
//! and the preset's measured provisioning time.
//!
//! [`desired_count`] is the one home of "how many prebuilds should this preset have now": the
//! planner, the execution-time guard, `prebuildsctl status` and the benchmark all call it.
//!
//! Without an expression the built-in policy applies ([`forecast`]): cover the claims expected
//! during one provisioning lead time, with Poisson headroom. With one, the expression's value is
//! used, and a run-time failure falls back to the scheduled target. Either way the result is
//! clamped to `[min, max]`.

use chrono::{DateTime, Datelike, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::expr::{clamp_count, EvalError, Expression, Inputs, ParseError, WINDOW_MINUTES};
use crate::schedule::{desired_instances, DesiredCount, DesiredSource};
use crate::snapshot::PresetSnapshot;
use crate::state::state_with_desired;

/// A preset's `autoscaling` block (columns `autoscaling_min`, `autoscaling_max`,
/// `autoscaling_expression`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Autoscaling {
    pub min: u32,
    pub max: u32,
    /// `None`: the built-in policy.
    pub expression: Option<String>,
}

/// Recent demand of a preset, gathered by the shell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    /// Claims (hits) per window of [`WINDOW_MINUTES`].
    pub claims: [u32; 5],
    /// Misses per window of [`WINDOW_MINUTES`].
    pub misses: [u32; 5],
    /// 90th percentile of the preset's recent create durations in milliseconds (job queued →
    /// succeeded), when any were measured.
    pub create_p90_ms: Option<i64>,
    /// Length of one "minute" of the windows in milliseconds: 60 000 in production; tests
    /// shorten it (`PREBUILDS_DEMAND_TIME_UNIT`) so that `claims_5m` covers 5 s. Rates are per
    /// real second, so the forecast stays consistent with the measured lead time.
    pub window_unit_ms: i64,
}

impl Default for Demand {
    fn default() -> Self {
        Self {
            claims: [0; 5],
            misses: [0; 5],
            create_p90_ms: None,
            window_unit_ms: 60_000,
        }
    }
}

/// Lead time assumed before any create of the preset was measured.
pub const DEFAULT_LEAD_TIME: TimeDelta = TimeDelta::minutes(2);

/// Standard deviations of headroom over the expected claims (Poisson: σ = √λ).
pub const HEADROOM_SIGMAS: f64 = 2.0;

/// Why an expression produced no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpressionFailure {
    /// A stored expression no longer parses (it was validated at push; kept for defence).
    #[error("expression does not parse: {0}")]
    Parse(ParseError),
    #[error("expression failed: {0}")]
    Eval(EvalError),
}

/// The built-in policy's inputs and result, for `status --explain` and the forecast gauges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    /// Claims plus misses per second: the highest rate over the windows.
    pub rate_per_sec: f64,
    /// The window (minutes of [`WINDOW_MINUTES`]) that gave the rate, when any demand was seen.
    pub rate_window: Option<u32>,
    /// Provisioning lead time used (the measured p90 or [`DEFAULT_LEAD_TIME`]).
    pub lead_time: TimeDelta,
    /// Expected claims during one lead time, `λ = rate × lead`.
    pub expected: f64,
    /// `HEADROOM_SIGMAS × √λ`.
    pub headroom: f64,
    /// `ceil(λ + headroom)`, before the schedule floor and the clamp.
    pub target: u32,
}

/// The built-in policy.
///
/// 1. Demand rate: for each window `w`, `(claims_w + misses_w) / w`; the highest wins. A burst
///    shows in the 5-minute window at once (fast up); as the windows pass it leaves them one by
///    one, so the estimate steps down over two hours of quiet (decay back to `min`).
/// 2. Lead time: the preset's p90 create duration (how long a replacement takes to be ready).
/// 3. `λ = rate × lead`: claims expected while one replacement is provisioning — the prebuilds
///    that must already be waiting.
/// 4. Headroom for Poisson arrivals: `2√λ`; target `ceil(λ + 2√λ)` (0 with no demand).
pub fn forecast(demand: &Demand) -> Forecast {
    // A unit of 0 (never configured so) would make every rate infinite: read it as 1 ms.
    let unit = demand.window_unit_ms.max(1) as f64 / 1000.0;
    let mut rate_per_sec = 0.0;
    let mut rate_window = None;
    for (i, minutes) in WINDOW_MINUTES.iter().enumerate() {
        let seen = f64::from(demand.claims[i]) + f64::from(demand.misses[i]);
        let rate = seen / (f64::from(*minutes) * unit);
        if seen > 0.0 && rate > rate_per_sec {
            rate_per_sec = rate;
            rate_window = Some(*minutes);
        }
    }
    let lead_time = demand
        .create_p90_ms
        .filter(|ms| *ms > 0)
        .map_or(DEFAULT_LEAD_TIME, TimeDelta::milliseconds);
    let expected = rate_per_sec * lead_time.as_seconds_f64();
    let headroom = HEADROOM_SIGMAS * expected.sqrt();
    let target = clamp_count((expected + headroom).ceil(), 0, u32::MAX);
    Forecast {
        rate_per_sec,
        rate_window,
        lead_time,
        expected,
        headroom,
        target,
    }
}

/// The expression variables at `now` for a snapshot whose scheduled target is known.
pub fn expression_inputs(
    snapshot: &PresetSnapshot,
    now: DateTime<Utc>,
    scheduled_target: u32,
) -> Inputs {
    let state = state_with_desired(snapshot, now, 0);
    // An unusable timezone reads as UTC here; the schedule validation reports it.
    let tz: Tz = snapshot
        .preset
        .scheduling_timezone
        .parse()
        .unwrap_or(Tz::UTC);
    let local = now.with_timezone(&tz);
    Inputs {
        scheduled_target,
        running: state.actual,
        eligible: state.eligible,
        claims: snapshot.demand.claims,
        misses: snapshot.demand.misses,
        hour: local.hour(),
        weekday: local.weekday().num_days_from_sunday(),
    }
}

/// Desired number of prebuilds of the snapshot's preset at `now`.
///
/// 1. The scheduled target: [`desired_instances`] (inactive → 0, not configured → 0, base, or
///    the matching schedule). Without `autoscaling` that is the answer.
/// 2. Inactive or unconfigured presets stay at 0 whatever the autoscaling says.
/// 3. With an expression: its value, rounded to the nearest count and clamped to `[min, max]`
///    (`Expression`); when it fails, the scheduled target clamped to `[min, max]`
///    (`ExpressionFallback`, carrying the failure).
/// 4. Without: the built-in [`forecast`]; a matching schedule is a floor under it (a known rush
///    is warmed ahead), then the clamp to `[min, max]`. `Autoscaling`, or `Schedule` when the
///    floor decided.
pub fn desired_count(snapshot: &PresetSnapshot, now: DateTime<Utc>) -> DesiredCount {
    let scheduled = desired_instances(&snapshot.preset, &snapshot.schedules, now);
    let Some(auto) = &snapshot.autoscaling else {
        return scheduled;
    };
    if matches!(
        scheduled.source,
        DesiredSource::Inactive | DesiredSource::NotConfigured
    ) {
        return scheduled;
    }
    let (min, max) = (auto.min, auto.max.max(auto.min));
    if let Some(source) = &auto.expression {
        let inputs = expression_inputs(snapshot, now, scheduled.count);
        let value = Expression::parse(source)
            .map_err(ExpressionFailure::Parse)
            .and_then(|e| e.evaluate(&inputs).map_err(ExpressionFailure::Eval));
        return match value {
            Ok(v) => DesiredCount {
                count: clamp_count(v, min, max),
                source: DesiredSource::Expression,
            },
            Err(failure) => DesiredCount {
                count: scheduled.count.clamp(min, max),
                source: DesiredSource::ExpressionFallback(failure),
            },
        };
    }
    let target = forecast(&snapshot.demand).target;
    let floor = match scheduled.source {
        DesiredSource::Schedule { .. } => scheduled.count,
        _ => 0,
    };
    if floor > target {
        DesiredCount {
            count: floor.clamp(min, max),
            source: scheduled.source,
        }
    } else {
        DesiredCount {
            count: target.clamp(min, max),
            source: DesiredSource::Autoscaling,
        }
    }
}
