//! 5-field cron expressions read as continuous time ranges (the prebuild-schedule dialect).
//!
//! A schedule cron such as `* 9-18 * * 1-5` does not name instants: with its minute field fixed to
//! `*` it names whole hours, so `9-18` covers 09:00:00 through 18:59:59 (Sunday = 0). Matching
//! therefore only looks at the local hour, day of month, month and weekday of an instant — which
//! is the same as truncating it to the local minute and testing membership.
//!
//! We parse the expressions ourselves instead of through `croner` because:
//! 1. overlap detection needs the *sets* each field admits (here: bitsets), which croner keeps
//!    private, and deciding overlap by scanning a real calendar would be slow and only heuristic;
//! 2. croner accepts extensions (`L`, `W`, `#`, `@daily`, years, optional seconds) that Coder's
//!    robfig/cron-based validator rejects, so `prebuildsctl` would accept schedules Coder refuses;
//! 3. errors must say which field is wrong and why.
//!
//! The dialect follows robfig/cron's standard parser: numbers, `a-b` ranges, `,` lists, `*`,
//! `*/n`, `a-b/n` and `a/n` (= `a-max/n`) steps; month names `jan`–`dec` and weekday names
//! `sun`–`sat` (case-insensitive); `?` = `*` in day-of-month and day-of-week. Day-of-week runs
//! 0–6 (Sunday = 0): `7` is refused, as Coder refuses it. Day-of-month and day-of-week combine as
//! in POSIX cron and robfig: when either is a plain `*` (or `?`, or `*/1`) both must match,
//! otherwise either may match. A differential property test checks the matcher against croner.
//!
//! Two overlap notions live here. [`CronSpec::overlap`] is exact: a real local hour both cover.
//! [`CronSpec::overlaps_as_coder`] is the rule Coder's template provider uses to accept or refuse
//! a preset's schedule set, field by field; schedule sets are validated with it, so a template
//! Coder accepts is accepted here and one it refuses is refused (see `schedule` for the rest).

use std::fmt;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::schedule::ScheduleError;

/// The five fields of a cron expression, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CronField {
    Minute,
    Hour,
    DayOfMonth,
    Month,
    DayOfWeek,
}

impl CronField {
    fn name(self) -> &'static str {
        match self {
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::DayOfMonth => "day-of-month",
            Self::Month => "month",
            Self::DayOfWeek => "day-of-week",
        }
    }

    /// Inclusive bounds of the values the field accepts.
    fn bounds(self) -> (u32, u32) {
        match self {
            Self::Minute => (0, 59),
            Self::Hour => (0, 23),
            Self::DayOfMonth => (1, 31),
            Self::Month => (1, 12),
            Self::DayOfWeek => (0, 6),
        }
    }

    fn names(self) -> &'static [&'static str] {
        const MONTHS: &[&str] = &[
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ];
        const WEEKDAYS: &[&str] = &["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
        match self {
            Self::Month => MONTHS,
            Self::DayOfWeek => WEEKDAYS,
            _ => &[],
        }
    }

    /// Value of `names()[0]`: months count from 1, weekdays from 0.
    fn first_name_value(self) -> u32 {
        match self {
            Self::Month => 1,
            _ => 0,
        }
    }
}

impl fmt::Display for CronField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A parsed schedule cron: the set of local hours, days, months and weekdays it covers.
///
/// Bit `i` of each set stands for value `i` (days 1–31, months 1–12, weekdays 0–6 with Sunday 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CronSpec {
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    /// Day-of-month / day-of-week was unrestricted (`*`); decides AND vs OR of the two.
    dom_star: bool,
    dow_star: bool,
}

/// A concrete local slot that two overlapping schedules both cover, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OverlapWitness {
    pub month: u32,
    pub day: u32,
    pub weekday: Weekday,
    pub hour: u32,
}

impl fmt::Display for OverlapWitness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MONTHS: [&str; 12] = [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ];
        let month = MONTHS[(self.month as usize - 1) % 12];
        write!(
            f,
            "{:02}:00-{:02}:59 on {:?}, {} {}",
            self.hour, self.hour, self.weekday, month, self.day
        )
    }
}

impl CronSpec {
    /// Parses a schedule cron.
    ///
    /// 1. Split on whitespace; exactly 5 fields.
    /// 2. The minute field must be exactly `*` (a schedule is a set of whole hours).
    /// 3. Parse hour, day-of-month, month and day-of-week as comma lists of items, each item a
    ///    value, a range or `*`, optionally with a `/step`; collect the admitted values as a set.
    pub fn parse(expression: &str) -> Result<Self, ScheduleError> {
        let fields: Vec<&str> = expression.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(ScheduleError::FieldCount {
                cron: expression.to_owned(),
                found: fields.len(),
            });
        };
        if minute != "*" {
            return Err(ScheduleError::MinuteNotStar {
                cron: expression.to_owned(),
                minute: minute.to_owned(),
            });
        }
        let field = |field: CronField, text: &str| {
            parse_field(field, text).map_err(|reason| ScheduleError::InvalidField {
                cron: expression.to_owned(),
                field,
                value: text.to_owned(),
                reason,
            })
        };
        let (hours, _) = field(CronField::Hour, hour)?;
        let (days, dom_star) = field(CronField::DayOfMonth, dom)?;
        let (months, _) = field(CronField::Month, month)?;
        let (weekdays, dow_star) = field(CronField::DayOfWeek, dow)?;
        // Truncations are lossless: the bounds above keep every bit inside the target width.
        Ok(Self {
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: weekdays as u8,
            dom_star,
            dow_star,
        })
    }

    /// Whether the local time of `at` lies inside the range (seconds and minutes are irrelevant
    /// because the minute field is always `*`).
    pub fn contains<Z: TimeZone>(&self, at: &DateTime<Z>) -> bool {
        self.covers(
            at.hour(),
            at.day(),
            at.month(),
            at.weekday().num_days_from_sunday(),
        )
    }

    /// Whether the local slot (hour, day of month, month, weekday with Sunday = 0) is covered.
    pub fn covers(&self, hour: u32, day: u32, month: u32, weekday: u32) -> bool {
        bit(self.hours, hour)
            && bit(u32::from(self.months), month)
            && self.day_matches(day, weekday)
    }

    /// robfig/POSIX rule: a `*` on either day field means both must match; otherwise either.
    fn day_matches(&self, day: u32, weekday: u32) -> bool {
        let dom = bit(self.days, day);
        let dow = bit(u32::from(self.weekdays), weekday);
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// Finds a local slot that both specs cover, if any.
    ///
    /// 1. No common hour → disjoint (the common case for schedules split by time of day).
    /// 2. Otherwise, for each common month and each weekday, intersect the days of the month
    ///    each spec admits on that weekday, limited to the days the month can have (29 February
    ///    included). Every (month, day, weekday) combination occurs in some year of the Gregorian
    ///    calendar, so this is exact, not a heuristic: at most 12 × 7 bitset intersections.
    pub fn overlap(&self, other: &Self) -> Option<OverlapWitness> {
        let hours = self.hours & other.hours;
        if hours == 0 {
            return None;
        }
        let months = u32::from(self.months & other.months);
        for month in (1..=12u32).filter(|m| bit(months, *m)) {
            // Bits 1..=days_in_month.
            let month_days = ((1u32 << days_in_month(month)) - 1) << 1;
            for weekday in 0..7u32 {
                let days = self.days_on(weekday) & other.days_on(weekday) & month_days;
                if days != 0 {
                    return Some(OverlapWitness {
                        month,
                        day: days.trailing_zeros(),
                        weekday: weekday_from_sunday(weekday),
                        hour: hours.trailing_zeros(),
                    });
                }
            }
        }
        None
    }

    /// Whether Coder's template provider counts the two as overlapping, which decides whether a
    /// schedule set is accepted. Field by field, not on a calendar: they overlap when their hours
    /// intersect, their months intersect, and their days do — where, if either day-of-month is
    /// `*`, days means the day-of-week sets; else, if either day-of-week is `*`, the day-of-month
    /// sets; else (both days restricted on both sides) either set intersecting.
    ///
    /// It differs from [`Self::overlap`] both ways: `* * 31 * *` and `* * * 4 *` overlap for
    /// Coder (day 31 against every day) though April has no 31st; `* 9 1 * 1` (the 1st or any
    /// Monday) and `* 9 15 * 3` (the 15th or any Wednesday) do not, though a Wednesday the 1st is
    /// in both — such a set is accepted, and the first matching schedule wins at run time.
    pub fn overlaps_as_coder(&self, other: &Self) -> bool {
        let hours = self.hours & other.hours != 0;
        let months = self.months & other.months != 0;
        let dom = self.days & other.days != 0;
        let dow = self.weekdays & other.weekdays != 0;
        let days = if self.dom_star || other.dom_star {
            dow
        } else if self.dow_star || other.dow_star {
            dom
        } else {
            dom || dow
        };
        hours && months && days
    }

    /// The days of the month (bit i = day i) this spec admits on a given weekday: the same rule
    /// as [`Self::day_matches`], for all days at once.
    fn days_on(&self, weekday: u32) -> u32 {
        const ALL_DAYS: u32 = !1; // bits 1..=31
        let dow = bit(u32::from(self.weekdays), weekday);
        match (self.dom_star || self.dow_star, dow) {
            (true, true) => self.days,
            (true, false) => 0,
            (false, true) => ALL_DAYS,
            (false, false) => self.days,
        }
    }
}

/// Whether `cron` (a schedule cron, minute `*`) covers the instant `at` in timezone `tz`.
pub fn matches_cron(cron: &str, tz: Tz, at: DateTime<Utc>) -> Result<bool, ScheduleError> {
    let spec = CronSpec::parse(cron)?;
    Ok(spec.contains(&at.with_timezone(&tz)))
}

fn bit(set: u32, value: u32) -> bool {
    value < 32 && set & (1 << value) != 0
}

/// The longest a month can be in any year (February: 29, so leap days count as reachable).
fn days_in_month(month: u32) -> u32 {
    match month {
        2 => 29,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn weekday_from_sunday(n: u32) -> Weekday {
    match n {
        0 => Weekday::Sun,
        1 => Weekday::Mon,
        2 => Weekday::Tue,
        3 => Weekday::Wed,
        4 => Weekday::Thu,
        5 => Weekday::Fri,
        _ => Weekday::Sat,
    }
}

/// Parses one field into a value set (bit i = value i) and whether it was unrestricted (`*`).
/// The error is the reason, without the field context (the caller adds it).
fn parse_field(field: CronField, text: &str) -> Result<(u64, bool), String> {
    let (min, max) = field.bounds();
    let mut set = 0u64;
    let mut star = false;
    for item in text.split(',') {
        if item.is_empty() {
            return Err("empty list item".to_owned());
        }
        let step_given = item.contains('/');
        let (range, step) = match item.split_once('/') {
            Some((range, step)) => (range, Some(step)),
            None => (item, None),
        };
        let step = match step {
            None => 1,
            Some(s) => match s.parse::<u32>() {
                Ok(n) if n >= 1 => n,
                _ => return Err(format!("step '{s}' must be a positive whole number")),
            },
        };
        let (start, end, item_star) = match range {
            "*" => (min, max, true),
            "?" if matches!(field, CronField::DayOfMonth | CronField::DayOfWeek) => {
                (min, max, true)
            }
            "?" => return Err("'?' is only allowed in day-of-month and day-of-week".to_owned()),
            _ => match range.split_once('-') {
                Some((a, b)) => (value(field, a)?, value(field, b)?, false),
                // robfig: "a/n" means "a-max/n"; a bare "a" is the single value.
                None if step_given => (value(field, range)?, max, false),
                None => {
                    let v = value(field, range)?;
                    (v, v, false)
                }
            },
        };
        if start > end {
            return Err(format!("range start {start} is after range end {end}"));
        }
        // As in robfig, `*/n` with n > 1 is a restriction, not a wildcard.
        star |= item_star && step == 1;
        let mut v = start;
        while v <= end {
            set |= 1 << v;
            v += step;
        }
    }
    Ok((set, star))
}

/// Parses a single value: a number within the field's bounds, or a month/weekday name.
fn value(field: CronField, text: &str) -> Result<u32, String> {
    let (min, max) = field.bounds();
    if let Some(index) = field
        .names()
        .iter()
        .position(|name| name.eq_ignore_ascii_case(text))
    {
        // At most 12 names, so the cast is lossless.
        return Ok(index as u32 + field.first_name_value());
    }
    let Ok(v) = text.parse::<u32>() else {
        let hint = match field {
            CronField::Month => " or a month name (jan-dec)",
            CronField::DayOfWeek => " or a weekday name (sun-sat)",
            _ => "",
        };
        return Err(format!("'{text}' is not a number{hint}"));
    };
    if v < min || v > max {
        return Err(format!("{v} is out of range {min}-{max}"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> CronSpec {
        CronSpec::parse(s).unwrap()
    }

    #[test]
    fn parses_ranges_lists_steps_and_names() {
        let s = spec("* 9-17/2,20 1,15 jan-MAR */2");
        assert!(s.covers(9, 1, 1, 0));
        assert!(s.covers(11, 15, 3, 3)); // OR of dom/dow: day 15 matches
        assert!(s.covers(20, 2, 2, 2)); // weekday Tuesday (2) matches
        assert!(!s.covers(10, 1, 1, 0)); // 10 not in 9-17/2
        assert!(!s.covers(9, 1, 4, 0)); // April
        assert!(!s.covers(9, 2, 1, 1)); // neither day 2 nor Monday
    }

    #[test]
    fn single_value_with_step_runs_to_max() {
        let s = spec("* 20/2 * * *");
        assert!(s.covers(20, 1, 1, 0));
        assert!(s.covers(22, 1, 1, 0));
        assert!(!s.covers(21, 1, 1, 0));
    }

    #[test]
    fn sunday_is_0_and_7_is_refused_as_coder_refuses_it() {
        let s = spec("* * * * 0,5-6");
        assert!(s.covers(0, 1, 1, 0));
        assert!(s.covers(0, 1, 1, 6));
        assert!(!s.covers(0, 1, 1, 1));
        for cron in ["* * * * 7", "* * * * 5-7"] {
            let err = CronSpec::parse(cron).unwrap_err().to_string();
            assert!(err.contains("out of range 0-6"), "{cron}: {err}");
        }
    }

    /// Coder's acceptance rule, case by case (each pair: does Coder's provider refuse it?).
    #[test]
    fn overlap_as_coder_decides_field_by_field() {
        let cases = [
            // Split by hour or by month: never.
            ("* 8-18 * * 1-5", "* 19-23 * * 1-5", false),
            ("* * * 1-6 *", "* * * 7-12 *", false),
            // Weekdays against weekend, same hours: no.
            ("* 9-18 * * 1-5", "* 9-13 * * 6,0", false),
            ("* 8-18 * * 1-5", "* 18-20 * * 5", true),
            // A `*` day-of-month compares the weekdays only…
            ("* 9 1 * 1", "* 9 * * 1", true),
            ("* 9 * * 2", "* 9 1 * 1", false),
            // …a `*` day-of-week (with both days of month restricted) the days of month only,
            // on the field sets, not on a calendar: day 31 meets every day of April here.
            ("* * 31 * *", "* * * 4 *", true),
            ("* * 1-10 * *", "* * 11-20 * *", false),
            // Both restricted on both sides: either set meeting is an overlap…
            ("* 9 1 * 1", "* 9 15 * 1", true),
            ("* 9 1 * 1", "* 9 1 * 3", true),
            // …and neither meeting is none, though a Wednesday the 1st is in both.
            ("* 9 1 * 1", "* 9 15 * 3", false),
        ];
        for (a, b, coder) in cases {
            assert_eq!(spec(a).overlaps_as_coder(&spec(b)), coder, "{a} / {b}");
            assert_eq!(spec(b).overlaps_as_coder(&spec(a)), coder, "{b} / {a}");
        }
        // The last pair really shares hours (a Monday the 15th, a Wednesday the 1st): what Coder
        // accepts is a set where the first schedule that matches wins.
        let (a, b) = (spec("* 9 1 * 1"), spec("* 9 15 * 3"));
        let w = a.overlap(&b).expect("a shared hour");
        let weekday = w.weekday.num_days_from_sunday();
        assert!(
            a.covers(w.hour, w.day, w.month, weekday) && b.covers(w.hour, w.day, w.month, weekday)
        );
    }

    #[test]
    fn star_day_field_means_and() {
        let s = spec("* * 1 * *");
        assert!(s.covers(0, 1, 6, 3));
        assert!(!s.covers(0, 2, 6, 3));
        let s = spec("* * ? * mon");
        assert!(s.covers(0, 9, 6, 1));
        assert!(!s.covers(0, 9, 6, 2));
    }

    #[test]
    fn rejections() {
        let cases = [
            ("0 * * * *", "minute field is '0'"),
            ("* * * *", "has 4 fields"),
            ("* * * * * *", "has 6 fields"),
            (
                "* 24 * * *",
                "hour field '24' is invalid: 24 is out of range 0-23",
            ),
            ("* 5-3 * * *", "range start 5 is after range end 3"),
            ("* */0 * * *", "step '0' must be a positive whole number"),
            (
                "* * 0 * *",
                "day-of-month field '0' is invalid: 0 is out of range 1-31",
            ),
            ("* * * foo *", "'foo' is not a number or a month name"),
            (
                "* * * * 8",
                "day-of-week field '8' is invalid: 8 is out of range 0-6",
            ),
            ("* 1,,2 * * *", "empty list item"),
            ("* ? * * *", "'?' is only allowed"),
            ("* * L * *", "'L' is not a number"),
            ("@daily", "has 1 fields"),
        ];
        for (cron, want) in cases {
            let err = CronSpec::parse(cron).unwrap_err().to_string();
            assert!(err.contains(want), "{cron}: {err}");
        }
    }

    #[test]
    fn overlap_is_exact() {
        assert!(spec("* 9-18 * * 1-5")
            .overlap(&spec("* 9-13 * * 6,0"))
            .is_none());
        assert!(spec("* 2-4 * * *").overlap(&spec("* 5-8 * * *")).is_none());
        // 31 April never exists, 31 May does.
        assert!(spec("* * 31 * *").overlap(&spec("* * * 4 *")).is_none());
        let w = spec("* * 31 * *").overlap(&spec("* * * 5 *")).unwrap();
        assert_eq!((w.month, w.day), (5, 31));
        // Day 1 OR Monday vs. Monday only: overlap on a Monday.
        let w = spec("* 9 1 * 1").overlap(&spec("* 9 * * mon")).unwrap();
        assert_eq!(w.weekday, Weekday::Mon);
        assert_eq!(w.to_string(), "09:00-09:59 on Mon, January 1");
    }
}
