//! Property tests: invariants of `plan` over random snapshots, and a differential test of the
//! cron matcher against croner.

mod common;

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};
use common::{id, snapshot};
use prebuilds_core::*;
use proptest::prelude::*;

fn base() -> DateTime<Utc> {
    common::now()
}

fn status() -> impl Strategy<Value = PrebuildStatus> {
    prop_oneof![
        6 => Just(PrebuildStatus::Healthy),
        1 => Just(PrebuildStatus::HardLimited),
        1 => Just(PrebuildStatus::ValidationFailed),
    ]
}

fn outcome() -> impl Strategy<Value = BuildOutcome> {
    prop_oneof![
        Just(BuildOutcome::Succeeded),
        Just(BuildOutcome::Failed),
        Just(BuildOutcome::InProgress),
        Just(BuildOutcome::Canceled),
    ]
}

/// A few schedule sets: none, valid, valid in another timezone, overlapping, unparsable.
fn schedules() -> impl Strategy<Value = (String, Vec<Schedule>)> {
    let s = |c: &str, n| common::sched(c, n);
    prop_oneof![
        3 => Just((String::new(), vec![])),
        1 => Just(("UTC".to_owned(), vec![s("* 9-18 * * 1-5", 4), s("* 9-13 * * 6,0", 1)])),
        1 => Just(("Europe/Berlin".to_owned(), vec![s("* 0-11 * * *", 0), s("* 12-23 * * *", 6)])),
        1 => Just(("UTC".to_owned(), vec![s("* 9-18 * * *", 7), s("* 10 * * *", 2)])),
        1 => Just(("UTC".to_owned(), vec![s("5 9 * * *", 3)])),
    ]
}

prop_compose! {
    fn preset_info()(
        version_is_active in prop::bool::weighted(0.8),
        template_deleted in prop::bool::weighted(0.1),
        template_deprecated in prop::bool::weighted(0.1),
        desired_instances in prop::option::weighted(0.9, 0..6i32),
        invalidate_after_secs in prop::option::of(-5..400i32),
        invalidated_offset in prop::option::of(-600..600i64),
        prebuild_status in status(),
        paused in prop::bool::weighted(0.1),
    ) -> PresetInfo {
        PresetInfo {
            last_invalidated_at: invalidated_offset.map(|s| base() + TimeDelta::seconds(s)),
            version_is_active,
            template_deleted,
            template_deprecated,
            desired_instances,
            invalidate_after_secs,
            prebuild_status,
            paused,
            ..common::preset(0)
        }
    }
}

prop_compose! {
    fn preset_snapshot()(
        preset in preset_info(),
        (timezone, schedules) in schedules(),
        // Creation offsets in seconds before `base`; few distinct values so ties happen.
        running in prop::collection::vec((0..1200i64, any::<bool>()), 0..10),
        in_progress in (0..3u32, 0..3u32, 0..3u32),
        pending_non_active in 0..3u32,
        mut history in prop::collection::vec((0..10_800i64, outcome()), 0..8),
    ) -> PresetSnapshot {
        history.sort_by_key(|(ago, _)| *ago);
        let mut s = snapshot(PresetInfo { scheduling_timezone: timezone, ..preset });
        s.schedules = schedules;
        s.running = running
            .into_iter()
            .enumerate()
            .map(|(i, (ago, ready))| common::running(i, base() - TimeDelta::seconds(ago), ready))
            .collect();
        s.in_progress = InProgress { starting: in_progress.0, stopping: in_progress.1, deleting: in_progress.2 };
        s.pending_non_active = pending_non_active;
        s.start_builds = history
            .into_iter()
            .map(|(ago, outcome)| StartBuild { created_at: base() - TimeDelta::seconds(ago), outcome })
            .collect();
        s
    }
}

prop_compose! {
    fn reconcile_config()(interval in 1..600i64, lookback in 60..7200i64, limit in 0..4u32) -> ReconcileConfig {
        ReconcileConfig {
            backoff_interval: TimeDelta::seconds(interval),
            backoff_lookback: TimeDelta::seconds(lookback),
            failure_hard_limit: limit,
            ..ReconcileConfig::default()
        }
    }
}

/// An instant within a week of the base, so schedules both match and miss.
fn instant() -> impl Strategy<Value = DateTime<Utc>> {
    (0..7 * 24 * 3600i64).prop_map(|s| base() + TimeDelta::seconds(s))
}

fn created(a: &[Action]) -> u32 {
    a.iter()
        .map(|a| match a {
            Action::Create { count } => *count,
            _ => 0,
        })
        .sum()
}

fn deleted(a: &[Action]) -> Vec<uuid::Uuid> {
    a.iter()
        .flat_map(|a| match a {
            Action::Delete { workspace_ids } => workspace_ids.clone(),
            _ => Vec::new(),
        })
        .collect()
}

/// Makes the preset active and unpaused, so the active branch applies unless it backs off.
fn make_acting(mut s: PresetSnapshot) -> PresetSnapshot {
    s.preset.version_is_active = true;
    s.preset.template_deleted = false;
    s.preset.template_deprecated = false;
    s.preset.paused = false;
    s
}

fn cases(n: u32) -> ProptestConfig {
    // Failures print the shrunk input; no regression files next to the sources.
    ProptestConfig {
        cases: n,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases(2000))]

    #[test]
    fn create_count_never_exceeds_desired(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        let p = plan(&s, now, &cfg);
        let n = created(&p.actions);
        prop_assert!(n <= p.state.desired);
        prop_assert!(n <= desired_instances(&s.preset, &s.schedules, now).count);
        let creates = p.actions.iter().filter(|a| matches!(a, Action::Create { .. })).count();
        prop_assert!(creates <= 1);
        let d = creates_to_execute(n, &s, &p, now);
        prop_assert!(d.count <= n && d.clamped_from.is_none());
    }

    #[test]
    fn no_create_during_backoff_or_when_inactive(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        let p = plan(&s, now, &cfg);
        if let Some(until) = p.backoff_until {
            prop_assert!(now <= until);
            if !s.preset.paused {
                prop_assert_eq!(&p.actions, &vec![Action::Backoff { until }]);
            }
        }
        if p.backoff_until.is_some() || !s.preset.is_active() {
            prop_assert_eq!(created(&p.actions), 0);
        }
        if !s.preset.is_active() {
            prop_assert_eq!(p.state.desired, 0);
            prop_assert_eq!(p.state.eligible, 0);
            prop_assert_eq!(p.state.extraneous, 0);
        }
    }

    #[test]
    fn deletes_are_distinct_running_prebuilds(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        let p = plan(&s, now, &cfg);
        let ids = deleted(&p.actions);
        let running: HashSet<_> = s.running.iter().map(|r| r.workspace_id).collect();
        let unique: HashSet<_> = ids.iter().copied().collect();
        prop_assert_eq!(unique.len(), ids.len(), "repeated id in {:?}", p.actions);
        prop_assert!(unique.is_subset(&running));
        prop_assert!(p.actions.iter().all(|a| !a.is_noop()));
    }

    #[test]
    fn expired_prebuilds_of_an_acting_preset_are_deleted(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        let s = make_acting(s);
        let p = plan(&s, now, &cfg);
        if p.backoff_until.is_some() {
            return Ok(());
        }
        let ids: HashSet<_> = deleted(&p.actions).into_iter().collect();
        for r in &s.running {
            if is_expired(&s.preset, r, now) {
                prop_assert!(ids.contains(&r.workspace_id));
            }
        }
    }

    #[test]
    fn extraneous_deletes_take_the_oldest(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        let s = make_acting(s);
        let p = plan(&s, now, &cfg);
        if p.backoff_until.is_some() {
            return Ok(());
        }
        let mut fresh: Vec<_> = s.running.iter().filter(|r| !is_expired(&s.preset, r, now)).collect();
        fresh.sort_by_key(|r| (r.created_at, r.workspace_id));
        let want: Vec<_> = fresh.iter().take(p.state.extraneous as usize).map(|r| r.workspace_id).collect();
        let expired: HashSet<_> = s.running.iter().filter(|r| is_expired(&s.preset, r, now)).map(|r| r.workspace_id).collect();
        let got: Vec<_> = deleted(&p.actions).into_iter().filter(|i| !expired.contains(i)).collect();
        prop_assert_eq!(got, want);
        // And what remains fresh afterwards is exactly the desired count, when there was excess.
        if p.state.extraneous > 0 {
            prop_assert_eq!(fresh.len() as u32 - p.state.extraneous, p.state.desired);
        }
    }

    #[test]
    fn deterministic_and_independent_of_running_order(
        s in preset_snapshot(), now in instant(), cfg in reconcile_config(), seed in any::<u64>(),
    ) {
        let p = plan(&s, now, &cfg);
        prop_assert_eq!(&p, &plan(&s, now, &cfg));
        let mut shuffled = s.clone();
        // A cheap deterministic permutation from the seed.
        let n = shuffled.running.len();
        if n > 1 {
            for i in (1..n).rev() {
                let j = ((seed.rotate_left(i as u32) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) % (i as u64 + 1)) as usize;
                shuffled.running.swap(i, j);
            }
        }
        prop_assert_eq!(&p, &plan(&shuffled, now, &cfg));
    }

    #[test]
    fn inactive_with_nothing_to_clean_up_yields_no_action(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        let mut s = s;
        s.preset.version_is_active = false;
        s.running.clear();
        s.pending_non_active = 0;
        prop_assert!(can_skip(&s, now, &cfg));
        prop_assert!(actions(&s, now, &cfg).is_empty());
    }

    #[test]
    fn can_skip_implies_no_actions(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        if can_skip(&s, now, &cfg) {
            prop_assert!(actions(&s, now, &cfg).iter().all(Action::is_noop));
        }
    }

    #[test]
    fn paused_means_no_actions(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        let mut s = s;
        s.preset.paused = true;
        let p = plan(&s, now, &cfg);
        prop_assert!(p.actions.is_empty());
        s.preset.paused = false;
        prop_assert_eq!(p.state, plan(&s, now, &cfg).state, "pause does not change the state");
    }

    #[test]
    fn plan_and_actions_agree(s in preset_snapshot(), now in instant(), cfg in reconcile_config()) {
        let p = plan(&s, now, &cfg);
        prop_assert_eq!(&p.actions, &actions(&s, now, &cfg));
        prop_assert_eq!(p.state, state(&s, now));
        prop_assert_eq!(p.state.actual as usize, s.running.len());
        prop_assert!(p.state.expired <= p.state.actual);
        prop_assert!(p.state.eligible + p.state.expired <= p.state.actual);
    }

    #[test]
    fn prebuild_names_are_valid_workspace_names(bytes in any::<[u8; 9]>()) {
        let name = prebuild_name(bytes);
        prop_assert_eq!(name.len(), 24);
        prop_assert!(validate_workspace_name(&name).is_ok());
    }

    #[test]
    fn workspace_name_rule_matches_the_regex(name in "[a-zA-Z0-9_ -]{0,40}") {
        // ^[a-zA-Z0-9](-?[a-zA-Z0-9])*$ written out by hand, plus the 32-character limit.
        let b = name.as_bytes();
        let alnum = |c: &u8| c.is_ascii_alphanumeric();
        let regex = !b.is_empty()
            && alnum(&b[0])
            && alnum(&b[b.len() - 1])
            && b.iter().all(|c| alnum(c) || *c == b'-')
            && !name.contains("--");
        prop_assert_eq!(validate_workspace_name(&name).is_ok(), regex && b.len() <= 32);
    }
}

/// A cron field item our dialect and croner agree on (no `?`, no `a/n`, no `*/1`, no 7).
fn item(min: u32, max: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        (min..=max).prop_map(|v| v.to_string()),
        (min..=max, min..=max).prop_map(|(a, b)| format!("{}-{}", a.min(b), a.max(b))),
        (min..=max, min..=max, 2..5u32).prop_map(|(a, b, s)| format!(
            "{}-{}/{s}",
            a.min(b),
            a.max(b)
        )),
        (2..5u32).prop_map(|s| format!("*/{s}")),
    ]
}

fn field(min: u32, max: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        1 => Just("*".to_owned()),
        3 => prop::collection::vec(item(min, max), 1..3).prop_map(|v| v.join(",")),
    ]
}

prop_compose! {
    fn cron()(h in field(0, 23), dom in field(1, 31), mon in field(1, 12), dow in field(0, 6)) -> String {
        format!("* {h} {dom} {mon} {dow}")
    }
}

proptest! {
    #![proptest_config(cases(3000))]

    /// Our matcher agrees with croner on the instant truncated to the minute (croner's 5-field
    /// patterns match second 0 only).
    #[test]
    fn cron_matches_like_croner(
        expr in cron(),
        secs in 0..(20 * 365 * 24 * 3600i64),
        tz in prop::sample::select(vec![Tz::UTC, Tz::America__Los_Angeles, Tz::Europe__Berlin, Tz::Asia__Kolkata]),
    ) {
        let t = DateTime::<Utc>::from_timestamp(1_577_836_800 + secs / 60 * 60, 0).expect("in range");
        let ours = matches_cron(&expr, tz, t).expect("generated crons are valid");
        let theirs = expr.parse::<croner::Cron>().expect("croner parses").is_time_matching(&t.with_timezone(&tz)).expect("valid time");
        prop_assert_eq!(ours, theirs, "{} at {}", expr, t.with_timezone(&tz));
    }

    /// Overlap detection is exact: if a sample instant is covered by both, overlap is reported.
    #[test]
    fn overlap_is_found_whenever_both_cover_an_instant(a in cron(), b in cron(), secs in 0..(28 * 365 * 24 * 3600i64)) {
        let t = DateTime::<Utc>::from_timestamp(1_577_836_800 + secs, 0).expect("in range");
        let (sa, sb) = (CronSpec::parse(&a).expect("valid"), CronSpec::parse(&b).expect("valid"));
        if sa.contains(&t) && sb.contains(&t) {
            prop_assert!(sa.overlap(&sb).is_some(), "{} and {} both cover {}", a, b, t);
        }
        if let Some(w) = sa.overlap(&sb) {
            let wd = w.weekday.num_days_from_sunday();
            prop_assert!(sa.covers(w.hour, w.day, w.month, wd) && sb.covers(w.hour, w.day, w.month, wd));
        }
    }
}

proptest! {
    #![proptest_config(cases(300))]

    /// Overlap detection equals a brute-force search over every (month, day, weekday, hour) slot.
    #[test]
    fn overlap_equals_brute_force(a in cron(), b in cron()) {
        let (sa, sb) = (CronSpec::parse(&a).expect("valid"), CronSpec::parse(&b).expect("valid"));
        let days_in = |m: u32| match m { 2 => 29, 4 | 6 | 9 | 11 => 30, _ => 31 };
        let brute = (1..=12u32).any(|m| {
            (1..=days_in(m)).any(|d| {
                (0..7u32).any(|w| (0..24u32).any(|h| sa.covers(h, d, m, w) && sb.covers(h, d, m, w)))
            })
        });
        prop_assert_eq!(sa.overlap(&sb).is_some(), brute, "{} vs {}", a, b);
    }

    /// Coder's acceptance rule is symmetric, and it lets a real overlap through only where one
    /// side restricts both day fields (its days are "day-of-month OR day-of-week", which a
    /// field-by-field comparison cannot see): everywhere else, sharing a real hour is refused.
    #[test]
    fn coder_overlap_misses_real_overlaps_only_with_both_day_fields_restricted(a in cron(), b in cron()) {
        let (sa, sb) = (CronSpec::parse(&a).expect("valid"), CronSpec::parse(&b).expect("valid"));
        prop_assert_eq!(sa.overlaps_as_coder(&sb), sb.overlaps_as_coder(&sa), "{} vs {}", a, b);
        let both_days_restricted = |cron: &str| {
            let f: Vec<&str> = cron.split_whitespace().collect();
            f[2] != "*" && f[4] != "*"
        };
        if sa.overlap(&sb).is_some() && !sa.overlaps_as_coder(&sb) {
            prop_assert!(both_days_restricted(&a) || both_days_restricted(&b), "{} vs {}", a, b);
        }
    }
}

#[test]
fn ids_are_distinct() {
    assert_ne!(id(0), id(1));
}

// Issue 12: capacity, failed clean-up, hard-limit recovery.

prop_compose! {
    fn capacity()(max_inflight in 0..10u32, inflight in 0..15u32, max_per_preset in 0..5u32,
                  preset_inflight in 0..6u32, others_waiting in 0..30u32) -> Capacity {
        Capacity { max_inflight, inflight, max_per_preset, preset_inflight, others_waiting }
    }
}

proptest! {
    /// Never more than asked, never past either cap, and progress whenever there is room.
    #[test]
    fn creates_allowed_respects_caps_and_progresses(requested in 0..20u32, c in capacity()) {
        let n = creates_allowed(requested, &c);
        prop_assert!(n <= requested);
        if c.max_inflight > 0 {
            prop_assert!(n == 0 || c.inflight + n <= c.max_inflight);
        }
        if c.max_per_preset > 0 {
            prop_assert!(n == 0 || c.preset_inflight + n <= c.max_per_preset);
        }
        let global_room = c.max_inflight == 0 || c.inflight < c.max_inflight;
        let preset_room = c.max_per_preset == 0 || c.preset_inflight < c.max_per_preset;
        if requested > 0 && global_room && preset_room {
            prop_assert!(n >= 1, "no progress: {:?}", c);
        }
    }

    /// Clean-up deletes only failed prebuilds older than the retention, always keeps the newest K,
    /// and does nothing without a retention.
    #[test]
    fn failed_clean_up_keeps_the_newest_and_the_recent(
        ages in prop::collection::vec(0..600i64, 0..12), keep in 0..5u32,
        retention in prop::option::of(0..300i64), now in instant(),
    ) {
        let mut s = snapshot(common::preset(1));
        s.failed = ages.iter().enumerate().map(|(i, age)| FailedPrebuild {
            workspace_id: id(i),
            created_at: now - TimeDelta::minutes(*age),
        }).collect();
        let cfg = ReconcileConfig {
            failed_retention: retention.map(TimeDelta::minutes),
            failed_keep: keep,
            ..ReconcileConfig::default()
        };
        let doomed = failed_to_delete(&s, now, &cfg);
        let Some(retention) = cfg.failed_retention else {
            prop_assert!(doomed.is_empty());
            return Ok(());
        };
        let mut newest: Vec<&FailedPrebuild> = s.failed.iter().collect();
        newest.sort_by_key(|f| std::cmp::Reverse((f.created_at, f.workspace_id)));
        let kept: HashSet<_> = newest.iter().take(keep as usize).map(|f| f.workspace_id).collect();
        for id in &doomed {
            let f = s.failed.iter().find(|f| f.workspace_id == *id).expect("a failed prebuild");
            prop_assert!(!kept.contains(id));
            prop_assert!(f.created_at < now - retention);
        }
        let expected = newest.iter().skip(keep as usize).filter(|f| f.created_at < now - retention).count();
        prop_assert_eq!(doomed.len(), expected);
    }

    /// The circuit breaker: a probe only when hard-limited, at the limit, past the stored probe
    /// time; the next probe is later than now and its cooldown within [base, max].
    #[test]
    fn hard_limit_probes_only_after_the_cooldown(
        s in preset_snapshot(), now in instant(), cfg in reconcile_config(),
        cooldown in 1..10_000i64, offset in -10_000..10_000i64,
    ) {
        let mut s = s;
        s.hard_limit = Some(HardLimitRecord {
            since: now - TimeDelta::seconds(20_000),
            cooldown_secs: cooldown,
            next_probe_at: now + TimeDelta::seconds(offset),
        });
        let d = hard_limit(&s, now, &cfg);
        if let Some(next) = d.probe() {
            prop_assert_eq!(s.preset.prebuild_status, PrebuildStatus::HardLimited);
            prop_assert!(offset <= 0);
            prop_assert!(is_hard_limited(&s, &cfg));
            prop_assert!(next.next_probe_at > now);
            prop_assert!(next.cooldown() <= cfg.hard_limit_cooldown_max);
            prop_assert!(d.holds_creates());
        }
        if d.holds_creates() && d.probe().is_none() {
            let p = plan(&s, now, &cfg);
            for a in &p.actions {
                if let Action::Create { count } = a {
                    prop_assert_eq!(creates_to_execute(*count, &s, &p, now).count, 0);
                }
            }
        }
    }
}
