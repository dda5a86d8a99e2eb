//! The reconciler's behaviour tables (given → expected) as named table cases (names kept so behaviour can be looked up).

mod common;

use chrono::TimeDelta;
use common::*;
use prebuilds_core::*;

/// §1 Single-case tests (backoff interval 5 s).
mod single_case {
    use super::*;

    fn five_secs() -> ReconcileConfig {
        config(secs(5))
    }

    #[test]
    fn table() {
        let old_ready = running(0, now(), true);

        let mut outdated_old = snapshot(inactive(1));
        outdated_old.running = vec![old_ready.clone()];

        let mut delete_outdated = snapshot(inactive(1));
        delete_outdated.running = vec![old_ready.clone()];
        delete_outdated.in_progress.deleting = 1;

        let mut cancel_inactive = snapshot(inactive(0));
        cancel_inactive.pending_non_active = 2;

        let mut cancel_active = snapshot(preset(0));
        cancel_active.pending_non_active = 2;

        let mut extraneous = snapshot(preset(1));
        extraneous.running = vec![
            running(1, now(), true),
            running(0, now() - TimeDelta::hours(1), true),
        ];

        let mut deprecated = snapshot(PresetInfo {
            template_deprecated: true,
            ..preset(1)
        });
        deprecated.running = vec![old_ready.clone()];

        // Backoff row NumFailed = 1, LastBuildAt = now: one failed build, created now.
        let mut latest_failed_c = snapshot(preset(1));
        latest_failed_c.start_builds = vec![failed(now())];
        let mut latest_failed_o = snapshot(preset(1));
        latest_failed_o.running = vec![old_ready.clone()];
        let after_backoff = now() + secs(5) + TimeDelta::microseconds(1);

        let mut multi_p1 = snapshot(preset(1));
        multi_p1.in_progress.starting = 1;
        let multi_p2 = snapshot(preset(1));

        let case = |name, snapshot, now, state, actions| Case {
            name,
            snapshot,
            now,
            config: five_secs(),
            state,
            actions,
        };
        check(vec![
            case("TestNoPrebuilds", snapshot(preset(0)), now(), ZERO, vec![]),
            case(
                "TestNetNew",
                snapshot(preset(1)),
                now(),
                PresetState { desired: 1, ..ZERO },
                vec![create(1)],
            ),
            case(
                "TestOutdatedPrebuilds/P_old",
                outdated_old,
                now(),
                PresetState { actual: 1, ..ZERO },
                vec![delete(&[0])],
            ),
            case(
                "TestOutdatedPrebuilds/P_new",
                snapshot(preset(1)),
                now(),
                PresetState { desired: 1, ..ZERO },
                vec![create(1)],
            ),
            case(
                "TestDeleteOutdatedPrebuilds",
                delete_outdated,
                now(),
                PresetState {
                    actual: 1,
                    deleting: 1,
                    ..ZERO
                },
                vec![delete(&[0])],
            ),
            case(
                "TestCancelPendingPrebuilds/CancelPendingPrebuildsNonActiveVersion",
                cancel_inactive,
                now(),
                ZERO,
                vec![Action::CancelPending],
            ),
            case(
                "TestCancelPendingPrebuilds/NotCancelPendingPrebuildsActiveVersion",
                cancel_active,
                now(),
                ZERO,
                vec![],
            ),
            case(
                "TestExtraneous",
                extraneous,
                now(),
                PresetState {
                    actual: 2,
                    desired: 1,
                    extraneous: 1,
                    eligible: 2,
                    ..ZERO
                },
                vec![delete(&[0])],
            ),
            case(
                "TestDeprecated",
                deprecated,
                now(),
                PresetState { actual: 1, ..ZERO },
                vec![delete(&[0])],
            ),
            case(
                "TestLatestBuildFailed/C",
                latest_failed_c.clone(),
                now(),
                PresetState { desired: 1, ..ZERO },
                vec![Action::Backoff {
                    until: now() + secs(5),
                }],
            ),
            case(
                "TestLatestBuildFailed/O",
                latest_failed_o,
                now(),
                PresetState {
                    actual: 1,
                    desired: 1,
                    eligible: 1,
                    ..ZERO
                },
                vec![],
            ),
            case(
                "TestLatestBuildFailed/C after 5s+1µs",
                latest_failed_c,
                after_backoff,
                PresetState { desired: 1, ..ZERO },
                vec![create(1)],
            ),
            case(
                "TestMultiplePresetsPerTemplateVersion/P1",
                multi_p1,
                now(),
                PresetState {
                    desired: 1,
                    starting: 1,
                    ..ZERO
                },
                vec![],
            ),
            case(
                "TestMultiplePresetsPerTemplateVersion/P2",
                multi_p2,
                now(),
                PresetState { desired: 1, ..ZERO },
                vec![create(1)],
            ),
        ]);
    }

    #[test]
    fn test_matches_cron() {
        let cases = [
            (
                "Right before the start of the time range",
                "2025-06-02T08:59:59Z",
                false,
            ),
            ("Start of the time range", "2025-06-02T09:00:00Z", true),
        ];
        for (name, instant, want) in cases {
            assert_eq!(
                matches_cron("* 9-18 * * 1-5", Tz::UTC, at(instant)),
                Ok(want),
                "{name}"
            );
        }
    }
}

/// §2 TestInProgressActions: active preset, running prebuilds not ready, created now.
mod in_progress_actions {
    use super::*;

    enum Transition {
        Start,
        Stop,
        Delete,
    }

    /// (name, desired, running, in-progress transition, in-progress count, state, actions).
    type Row = (
        &'static str,
        i32,
        usize,
        Transition,
        u32,
        PresetState,
        Vec<Action>,
    );

    #[test]
    fn table() {
        use Transition::*;
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("start-short", 1, 0, Start, 1, PresetState { desired: 1, starting: 1, ..ZERO }, vec![]),
            ("start-balanced", 2, 1, Start, 1, PresetState { actual: 1, desired: 2, starting: 1, ..ZERO }, vec![]),
            ("start-extraneous", 2, 2, Start, 1, PresetState { actual: 2, desired: 2, starting: 1, ..ZERO }, vec![]),
            ("stop-short", 1, 0, Stop, 1, PresetState { desired: 1, stopping: 1, ..ZERO }, vec![create(1)]),
            ("stop-balanced", 3, 2, Stop, 1, PresetState { actual: 2, desired: 3, stopping: 1, ..ZERO }, vec![create(1)]),
            ("stop-extraneous", 3, 3, Stop, 1, PresetState { actual: 3, desired: 3, stopping: 1, ..ZERO }, vec![]),
            ("delete-short", 1, 0, Delete, 1, PresetState { desired: 1, deleting: 1, ..ZERO }, vec![create(1)]),
            ("delete-balanced", 2, 1, Delete, 1, PresetState { actual: 1, desired: 2, deleting: 1, ..ZERO }, vec![create(1)]),
            ("delete-extraneous", 2, 2, Delete, 1, PresetState { actual: 2, desired: 2, deleting: 1, ..ZERO }, vec![]),
            ("start-inhibit", 3, 1, Start, 2, PresetState { actual: 1, desired: 3, starting: 2, ..ZERO }, vec![]),
            // In-flight deletes are not subtracted from the extraneous count; all created now, so
            // "oldest" falls back to the smallest workspace id.
            ("delete-inhibit", 3, 5, Delete, 2, PresetState { actual: 5, desired: 3, deleting: 2, extraneous: 2, ..ZERO }, vec![delete(&[0, 1])]),
        ];
        let cases = rows
            .into_iter()
            .map(
                |(name, desired, n_running, transition, n, state, actions)| {
                    let mut s = snapshot(preset(desired));
                    s.running = (0..n_running)
                        .rev()
                        .map(|i| running(i, now(), false))
                        .collect();
                    match transition {
                        Start => s.in_progress.starting = n,
                        Stop => s.in_progress.stopping = n,
                        Delete => s.in_progress.deleting = n,
                    }
                    Case {
                        name,
                        snapshot: s,
                        now: now(),
                        config: config(secs(5)),
                        state,
                        actions,
                    }
                },
            )
            .collect();
        check(cases);
    }
}

/// §3 TestExpiredPrebuilds: TTL 5 s, running prebuilds not ready.
mod expired_prebuilds {
    use super::*;

    /// (name, running, desired, expired, invalidated, state, actions).
    type Row = (
        &'static str,
        usize,
        i32,
        usize,
        usize,
        PresetState,
        Vec<Action>,
    );

    #[test]
    fn table() {
        #[rustfmt::skip]
        let rows: Vec<Row> = vec![
            ("no expired prebuilds - no actions taken", 2, 2, 0, 0,
                PresetState { actual: 2, desired: 2, ..ZERO }, vec![]),
            ("one expired prebuild – deleted and replaced", 2, 2, 1, 0,
                PresetState { actual: 2, desired: 2, expired: 1, ..ZERO }, vec![delete(&[0]), create(1)]),
            ("all prebuilds expired – all deleted and recreated", 2, 2, 2, 0,
                PresetState { actual: 2, desired: 2, expired: 2, ..ZERO }, vec![delete(&[0, 1]), create(2)]),
            ("expired prebuilds deleted to reach desired count", 4, 2, 2, 0,
                PresetState { actual: 4, desired: 2, expired: 2, extraneous: 0, ..ZERO }, vec![delete(&[0, 1])]),
            ("expired prebuild deleted first, then extraneous", 4, 2, 1, 0,
                PresetState { actual: 4, desired: 2, expired: 1, extraneous: 1, ..ZERO }, vec![delete(&[0]), delete(&[1])]),
            ("preset has been invalidated - both instances expired", 2, 2, 0, 2,
                PresetState { actual: 2, desired: 2, expired: 2, ..ZERO }, vec![delete(&[0, 1]), create(2)]),
            ("preset has been invalidated, but one prebuild instance is newer", 2, 2, 0, 1,
                PresetState { actual: 2, desired: 2, expired: 1, ..ZERO }, vec![delete(&[0]), create(1)]),
        ];
        let cases = rows
            .into_iter()
            .map(
                |(name, n, desired, n_expired, n_invalidated, state, actions)| {
                    let mut p = preset(desired);
                    p.invalidate_after_secs = Some(5);
                    let invalidated_case = n_invalidated > 0;
                    if invalidated_case {
                        p.last_invalidated_at = Some(now() + TimeDelta::minutes(1));
                    }
                    let mut s = snapshot(p);
                    // Prebuild #i is older than #i+1; each offset is a distinct millisecond.
                    let ms = |i: usize| TimeDelta::milliseconds(i as i64);
                    s.running = (0..n)
                        .map(|i| {
                            let created_at = if i < n_expired {
                                // TTL + 10 s in the past.
                                now() - secs(15) + ms(i)
                            } else if invalidated_case && i < n_invalidated {
                                now() + ms(i)
                            } else if invalidated_case {
                                now() + TimeDelta::minutes(2) + ms(i)
                            } else {
                                now() - TimeDelta::milliseconds(100) + ms(i)
                            };
                            running(i, created_at, false)
                        })
                        .rev()
                        .collect();
                    Case {
                        name,
                        snapshot: s,
                        now: now(),
                        config: config(secs(5)),
                        state,
                        actions,
                    }
                },
            )
            .collect();
        check(cases);
    }
}

/// §4 TestPrebuildScheduling: two presets, timezone UTC, base desired 1, nothing running.
mod prebuild_scheduling {
    use super::*;

    #[test]
    fn table() {
        let with = |schedules: Vec<Schedule>| {
            let mut s = snapshot(PresetInfo {
                scheduling_timezone: "UTC".into(),
                ..preset(1)
            });
            s.schedules = schedules;
            s
        };
        let p1 = with(vec![sched("* 2-4 * * 1-5", 2), sched("* 6-8 * * 1-5", 3)]);
        let p2 = with(vec![
            sched("* 10-12 * * 1-5", 4),
            sched("* 14-16 * * 1-5", 5),
        ]);
        let rows = [
            ("Before the 1st schedule", "2025-06-02T01:00:00Z", 1, 1),
            ("1st schedule", "2025-06-02T03:00:00Z", 2, 1),
            ("2nd schedule", "2025-06-02T07:00:00Z", 3, 1),
            ("3rd schedule", "2025-06-02T11:00:00Z", 1, 4),
            ("4th schedule", "2025-06-02T15:00:00Z", 1, 5),
        ];
        let mut cases = Vec::new();
        for (name, instant, d1, d2) in rows {
            for (snap, desired) in [(&p1, d1), (&p2, d2)] {
                cases.push(Case {
                    name,
                    snapshot: snap.clone(),
                    now: at(instant),
                    config: ReconcileConfig::default(),
                    state: PresetState { desired, ..ZERO },
                    actions: vec![create(desired)],
                });
            }
        }
        check(cases);
    }
}

/// §5 TestCalculateDesiredInstances: active preset, base desired 1.
mod calculate_desired_instances {
    use super::*;

    #[test]
    fn table() {
        let work = || vec![sched("* 9-18 * * 1-5", 3)];
        let three = || {
            vec![
                sched("* 6-10 * * 1-5", 2),
                sched("* 12-16 * * 1-5", 3),
                sched("* 18-22 * * 1-5", 4),
            ]
        };
        let week = || vec![sched("* 9-18 * * 1-5", 2), sched("* 9-13 * * 6,0", 3)];
        let la = || vec![sched("* 9-13 * * 1-5", 3)];
        const LA: &str = "America/Los_Angeles";
        #[rustfmt::skip]
        let rows: Vec<(&str, &str, Vec<Schedule>, &str, u32)> = vec![
            ("Right before the start of the time range", "UTC", work(), "2025-06-02T08:59:59Z", 1),
            ("Start of the time range", "UTC", work(), "2025-06-02T09:00:00Z", 3),
            ("9:01AM - One minute after the start", "UTC", work(), "2025-06-02T09:01:00Z", 3),
            ("2PM - The middle of the time range", "UTC", work(), "2025-06-02T14:00:00Z", 3),
            ("6PM - One hour before the end", "UTC", work(), "2025-06-02T18:00:00Z", 3),
            ("End of the time range", "UTC", work(), "2025-06-02T18:59:59Z", 3),
            ("Right after the end of the time range", "UTC", work(), "2025-06-02T19:00:00Z", 1),
            ("7:01PM - Around one minute after the end", "UTC", work(), "2025-06-02T19:01:00Z", 1),
            ("2AM - Significantly outside the time range", "UTC", work(), "2025-06-02T02:00:00Z", 1),
            ("Outside the day range #1", "UTC", work(), "2025-06-07T14:00:00Z", 1),
            ("Outside the day range #2", "UTC", work(), "2025-06-08T14:00:00Z", 1),
            ("Before the first schedule", "UTC", three(), "2025-06-02T05:00:00Z", 1),
            ("The middle of the first schedule", "UTC", three(), "2025-06-02T08:00:00Z", 2),
            ("Between the first and second schedule", "UTC", three(), "2025-06-02T11:00:00Z", 1),
            ("The middle of the second schedule", "UTC", three(), "2025-06-02T14:00:00Z", 3),
            ("The middle of the third schedule", "UTC", three(), "2025-06-02T20:00:00Z", 4),
            ("After the last schedule", "UTC", three(), "2025-06-02T23:00:00Z", 1),
            ("First schedule (week)", "UTC", week(), "2025-06-02T14:00:00Z", 2),
            ("Second schedule (week)", "UTC", week(), "2025-06-07T10:00:00Z", 3),
            ("Outside schedule (week)", "UTC", week(), "2025-06-07T14:00:00Z", 1),
            ("3PM UTC - 8AM America/Los_Angeles; an hour before start", LA, la(), "2025-06-02T15:00:00Z", 1),
            ("4PM UTC - 9AM America/Los_Angeles; start of range", LA, la(), "2025-06-02T16:00:00Z", 3),
            ("8:59PM UTC - 1:58PM America/Los_Angeles; right before end", LA, la(), "2025-06-02T20:59:00Z", 3),
            ("9PM UTC - 2PM America/Los_Angeles; right after end", LA, la(), "2025-06-02T21:00:00Z", 1),
            ("11PM UTC - 4PM America/Los_Angeles; outside", LA, la(), "2025-06-02T23:00:00Z", 1),
            ("8AM - before the start", "UTC", work(), "2025-06-02T04:00:00-04:00", 1),
            ("9AM - after the start", "UTC", work(), "2025-06-02T05:00:00-04:00", 3),
        ];
        for (name, tz, schedules, instant, want) in rows {
            let p = PresetInfo {
                scheduling_timezone: tz.into(),
                ..preset(1)
            };
            let got = desired_instances(&p, &schedules, at(instant));
            assert_eq!(got.count, want, "{name}");
            assert!(
                !matches!(got.source, DesiredSource::InvalidSchedules(_)),
                "{name}: {:?}",
                got.source
            );
        }
    }
}

/// §6 TestCanSkipReconciliation: backoff interval 5 min; backoff rows use LastBuildAt = now − 1 min.
mod can_skip_reconciliation {
    use super::*;

    #[test]
    fn table() {
        let cfg = config(TimeDelta::minutes(5));
        let recent = now() - TimeDelta::minutes(1);
        // Hard-limit history outside the lookback window, so it does not also cause backoff.
        let old = now() - TimeDelta::hours(2);
        let with = |p: PresetInfo, f: &dyn Fn(&mut PresetSnapshot)| {
            let mut s = snapshot(p);
            f(&mut s);
            s
        };
        let three_failed_at = |t| vec![failed(t), failed(t), failed(t)];
        // NumFailed 3 from 3 failures at now − 1 min: until = now − 1 min + 3 × 5 min.
        let backoff = Action::Backoff {
            until: recent + TimeDelta::minutes(15),
        };

        #[rustfmt::skip]
        let rows: Vec<(&str, PresetSnapshot, bool, Vec<Action>)> = vec![
            ("inactive_with_nothing_to_cleanup", snapshot(inactive(5)), true, vec![]),
            ("inactive_with_running_workspaces",
                with(inactive(5), &|s| s.running = vec![running(0, now(), true)]), false, vec![delete(&[0])]),
            ("inactive_with_pending_jobs",
                with(inactive(5), &|s| s.pending_non_active = 3), false, vec![Action::CancelPending]),
            // Backoff rows only exist for presets on the active version of a non-deleted
            // template (see `failures`), so this preset is inactive through deprecation.
            ("inactive_with_backoff",
                with(PresetInfo { template_deprecated: true, ..preset(5) }, &|s| s.start_builds = three_failed_at(recent)),
                false, vec![backoff.clone()]),
            ("inactive_deleted_template_with_nothing_to_cleanup",
                snapshot(PresetInfo { template_deleted: true, ..preset(5) }), true, vec![]),
            ("inactive_deprecated_template_with_nothing_to_cleanup",
                snapshot(PresetInfo { template_deprecated: true, ..preset(5) }), true, vec![]),
            ("inactive_hard_limited",
                with(PresetInfo { prebuild_status: PrebuildStatus::HardLimited, ..inactive(5) },
                     &|s| s.start_builds = three_failed_at(old)),
                true, vec![]),
            ("active_with_desired_instances",
                with(preset(2), &|s| s.running = vec![running(0, now(), true), running(1, now(), true)]), false, vec![]),
            ("active_with_no_workspaces", snapshot(preset(5)), false, vec![create(5)]),
            ("active_with_backoff",
                with(preset(5), &|s| s.start_builds = three_failed_at(recent)), false, vec![backoff.clone()]),
            ("active_hard_limited",
                with(PresetInfo { prebuild_status: PrebuildStatus::HardLimited, ..preset(5) },
                     &|s| s.start_builds = three_failed_at(old)),
                false, vec![create(5)]),
        ];
        for (name, s, want_skip, want_actions) in rows {
            let skip = can_skip(&s, now(), &cfg);
            let acts = actions(&s, now(), &cfg);
            assert_eq!(skip, want_skip, "{name}: can_skip");
            assert_eq!(acts, want_actions, "{name}: actions");
            if skip {
                assert!(
                    acts.iter().all(Action::is_noop),
                    "{name}: skippable but actions {acts:?}"
                );
            }
        }
    }

    #[test]
    fn active_hard_limited_create_is_suppressed_at_execution() {
        let mut s = snapshot(PresetInfo {
            prebuild_status: PrebuildStatus::HardLimited,
            ..preset(5)
        });
        s.start_builds = vec![failed(now() - TimeDelta::hours(2)); 3];
        let plan = plan(&s, now(), &ReconcileConfig::default());
        assert!(plan.hard_limited);
        assert_eq!(plan.status_change, None, "already stored as hard_limited");
        let decision = creates_to_execute(5, &s, &plan, now());
        assert_eq!(
            decision,
            CreateDecision {
                count: 0,
                clamped_from: None,
                skipped: Some(SkipReason::HardLimited),
                probe: false,
            }
        );
    }
}

/// Rules beyond the scenario tables: execution guard, pause, status changes, backoff details.
mod execution {
    use super::*;

    #[test]
    fn create_is_clamped_to_desired_now() {
        let s = snapshot(preset(2));
        let plan = plan(&s, now(), &ReconcileConfig::default());
        assert_eq!(
            creates_to_execute(5, &s, &plan, now()),
            CreateDecision {
                count: 2,
                clamped_from: Some(5),
                skipped: None,
                probe: false,
            }
        );
        assert_eq!(
            creates_to_execute(2, &s, &plan, now()),
            CreateDecision {
                count: 2,
                clamped_from: None,
                skipped: None,
                probe: false,
            }
        );
    }

    #[test]
    fn clamp_uses_the_schedule_at_execution_time() {
        let mut s = snapshot(PresetInfo {
            scheduling_timezone: "UTC".into(),
            ..preset(1)
        });
        s.schedules = vec![sched("* 11 * * *", 4)];
        let planned_at = at("2025-06-02T11:59:59Z");
        let plan = plan(&s, planned_at, &ReconcileConfig::default());
        assert_eq!(plan.actions, vec![create(4)]);
        let decision = creates_to_execute(4, &s, &plan, at("2025-06-02T12:00:01Z"));
        assert_eq!(
            decision,
            CreateDecision {
                count: 1,
                clamped_from: Some(4),
                skipped: None,
                probe: false,
            }
        );
    }

    #[test]
    fn skip_reasons() {
        let cfg = ReconcileConfig::default();
        let paused = snapshot(PresetInfo {
            paused: true,
            ..preset(2)
        });
        let invalid = snapshot(PresetInfo {
            prebuild_status: PrebuildStatus::ValidationFailed,
            ..preset(2)
        });
        for (s, reason) in [
            (paused, SkipReason::Paused),
            (invalid, SkipReason::ValidationFailed),
        ] {
            let p = plan(&s, now(), &cfg);
            assert_eq!(creates_to_execute(2, &s, &p, now()).skipped, Some(reason));
            assert_eq!(creates_to_execute(2, &s, &p, now()).count, 0);
        }
    }

    #[test]
    fn paused_preset_gets_no_actions_but_state() {
        let mut s = snapshot(PresetInfo {
            paused: true,
            invalidate_after_secs: Some(5),
            ..preset(1)
        });
        s.running = vec![
            running(0, now() - secs(60), true),
            running(1, now(), true),
            running(2, now(), true),
        ];
        s.start_builds = vec![failed(now())];
        let p = plan(&s, now(), &ReconcileConfig::default());
        assert!(p.actions.is_empty());
        assert_eq!(
            p.state,
            PresetState {
                actual: 3,
                desired: 1,
                eligible: 2,
                extraneous: 1,
                expired: 1,
                ..ZERO
            }
        );
        assert!(p.backoff_until.is_some(), "backoff is still reported");
    }

    #[test]
    fn inactive_preset_deletes_expired_too_oldest_first() {
        let mut s = snapshot(PresetInfo {
            invalidate_after_secs: Some(5),
            ..inactive(3)
        });
        s.running = vec![
            running(1, now(), true),
            running(0, now() - secs(60), true),
            running(2, now() + secs(1), true),
        ];
        s.pending_non_active = 1;
        let p = plan(&s, now(), &ReconcileConfig::default());
        assert_eq!(
            p.state,
            PresetState {
                actual: 3,
                expired: 1,
                ..ZERO
            }
        );
        assert_eq!(p.actions, vec![Action::CancelPending, delete(&[0, 1, 2])]);
    }

    #[test]
    fn hard_limit_status_changes() {
        let cfg = ReconcileConfig::default();
        let old = now() - TimeDelta::hours(2);
        let mut s = snapshot(preset(1));
        s.start_builds = vec![failed(old); 3];
        assert_eq!(
            plan(&s, now(), &cfg).status_change,
            Some(PrebuildStatus::HardLimited)
        );
        // A success among the newest three: not (or no longer) hard limited.
        s.start_builds[1].outcome = BuildOutcome::Succeeded;
        assert_eq!(plan(&s, now(), &cfg).status_change, None);
        s.preset.prebuild_status = PrebuildStatus::HardLimited;
        assert_eq!(
            plan(&s, now(), &cfg).status_change,
            Some(PrebuildStatus::Healthy)
        );
        // Fewer builds than the limit, or limit 0: never hard limited.
        s.start_builds = vec![failed(old); 2];
        assert!(!plan(&s, now(), &cfg).hard_limited);
        s.start_builds = vec![failed(old); 5];
        assert!(
            !plan(
                &s,
                now(),
                &ReconcileConfig {
                    failure_hard_limit: 0,
                    ..cfg
                }
            )
            .hard_limited
        );
        // validation_failed is sticky, even at the hard limit.
        s.preset.prebuild_status = PrebuildStatus::ValidationFailed;
        assert_eq!(plan(&s, now(), &cfg).status_change, None);
        assert_eq!(
            plan(
                &s,
                now(),
                &ReconcileConfig {
                    failure_hard_limit: 0,
                    ..cfg
                }
            )
            .status_change,
            None
        );
    }

    #[test]
    fn backoff_counts_the_window_but_triggers_on_the_newest_n() {
        let cfg = config(TimeDelta::minutes(1));
        let ok = |t| StartBuild {
            created_at: t,
            outcome: BuildOutcome::Succeeded,
        };
        let mut s = snapshot(preset(2));
        // Newest 2: a success and a failure 10 min ago; older failures at 20 and 30 min (in the
        // window) and 2 h (outside).
        s.start_builds = vec![
            ok(now() - TimeDelta::minutes(5)),
            failed(now() - TimeDelta::minutes(10)),
            failed(now() - TimeDelta::minutes(20)),
            failed(now() - TimeDelta::minutes(30)),
            failed(now() - TimeDelta::hours(2)),
        ];
        let b = backoff(&s, now(), &cfg).unwrap();
        assert_eq!(
            b,
            Backoff {
                num_failed: 3,
                last_failed_at: now() - TimeDelta::minutes(10)
            }
        );
        assert_eq!(b.until(cfg.backoff_interval), now() - TimeDelta::minutes(7));
        // Ended 7 minutes ago: no longer in effect.
        assert_eq!(backoff_until(&s, now(), &cfg), None);
        assert_eq!(actions(&s, now(), &cfg), vec![create(2)]);
        // The failure only among older builds does not trigger backoff.
        s.start_builds[1].outcome = BuildOutcome::Succeeded;
        assert_eq!(backoff(&s, now(), &cfg), None);
        // Order of the history given by the caller does not matter.
        s.start_builds[1].outcome = BuildOutcome::Failed;
        s.start_builds.reverse();
        assert_eq!(backoff(&s, now(), &cfg), Some(b));
        // Inclusive boundaries: a failure exactly at the window start counts, and backoff holds
        // at `now == until`.
        let mut edge = snapshot(preset(1));
        edge.start_builds = vec![failed(now() - cfg.backoff_lookback)];
        let until = backoff(&edge, now(), &cfg)
            .unwrap()
            .until(cfg.backoff_interval);
        assert_eq!(actions(&edge, until, &cfg), vec![Action::Backoff { until }]);
    }

    #[test]
    fn backoff_ignores_inactive_versions_and_deleted_templates() {
        let cfg = ReconcileConfig::default();
        for p in [
            inactive(1),
            PresetInfo {
                template_deleted: true,
                ..preset(1)
            },
        ] {
            let mut s = snapshot(p);
            s.start_builds = vec![failed(now())];
            s.running = vec![running(0, now(), true)];
            assert_eq!(backoff(&s, now(), &cfg), None);
            assert_eq!(actions(&s, now(), &cfg), vec![delete(&[0])]);
        }
    }

    #[test]
    fn invalid_schedules_fall_back_to_base() {
        let mut s = snapshot(preset(2));
        s.schedules = vec![sched("* 9-18 * * 1-5", 5)];
        // Timezone empty: base, with the error for the log.
        let p = plan(&s, at("2025-06-02T10:00:00Z"), &ReconcileConfig::default());
        assert_eq!(p.desired.count, 2);
        assert!(matches!(
            p.desired.source,
            DesiredSource::InvalidSchedules(ScheduleError::EmptyTimezone { .. })
        ));
        s.preset.scheduling_timezone = "Nowhere/Special".into();
        let p = plan(&s, at("2025-06-02T10:00:00Z"), &ReconcileConfig::default());
        assert_eq!(p.desired.count, 2);
        assert!(matches!(
            p.desired.source,
            DesiredSource::InvalidSchedules(ScheduleError::UnknownTimezone { .. })
        ));
    }

    #[test]
    fn status_round_trips() {
        for s in [
            PrebuildStatus::Healthy,
            PrebuildStatus::HardLimited,
            PrebuildStatus::ValidationFailed,
        ] {
            assert_eq!(s.as_str().parse::<PrebuildStatus>(), Ok(s));
        }
        assert!("broken"
            .parse::<PrebuildStatus>()
            .unwrap_err()
            .to_string()
            .contains("'broken'"));
    }
}
