//! `plan()` over 10,000 presets × 10 running prebuilds each: a mix of expired, extraneous and
//! ready prebuilds, a quarter of the presets with schedules, a short build history for all.
//! Report: time per iteration / 10,000 = ns per preset.

use std::hint::black_box;

use chrono::{DateTime, TimeDelta, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use prebuilds_core::*;
use uuid::Uuid;

const PRESETS: usize = 10_000;
const PREBUILDS: usize = 10;

/// A fixed xorshift stream: the fixture is the same on every run, and the core stays free of
/// `rand` even in its benches.
struct Stream(u64);

impl Stream {
    fn next(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

fn fixture(now: DateTime<Utc>) -> Vec<PresetSnapshot> {
    let mut rng = Stream(0x5eed_1234_abcd_ef01);
    (0..PRESETS)
        .map(|p| {
            let scheduled = p % 4 == 0;
            let preset = PresetInfo {
                id: Uuid::from_u128(p as u128),
                name: format!("preset-{p}"),
                version_is_active: p % 10 != 0,
                template_deleted: false,
                template_deprecated: p % 50 == 1,
                desired_instances: Some(rng.next(12) as i32),
                invalidate_after_secs: if p % 3 == 0 { Some(3600) } else { None },
                last_invalidated_at: if p % 7 == 0 {
                    Some(now - TimeDelta::minutes(30))
                } else {
                    None
                },
                scheduling_timezone: if scheduled {
                    "Europe/Berlin".into()
                } else {
                    String::new()
                },
                prebuild_status: PrebuildStatus::Healthy,
                paused: false,
            };
            let schedules = if scheduled {
                vec![
                    Schedule {
                        cron_expression: "* 8-18 * * 1-5".into(),
                        desired_instances: 8,
                    },
                    Schedule {
                        cron_expression: "* 9-13 * * 6,0".into(),
                        desired_instances: 2,
                    },
                ]
            } else {
                Vec::new()
            };
            let running = (0..PREBUILDS)
                .map(|i| RunningPrebuild {
                    workspace_id: Uuid::from_u128(((p * PREBUILDS + i) as u128) << 16),
                    created_at: now - TimeDelta::seconds(rng.next(7200) as i64),
                    ready: rng.next(4) != 0,
                })
                .collect();
            let mut start_builds: Vec<StartBuild> = (0..5)
                .map(|_| StartBuild {
                    created_at: now - TimeDelta::seconds(rng.next(4 * 3600) as i64),
                    outcome: if rng.next(10) == 0 {
                        BuildOutcome::Failed
                    } else {
                        BuildOutcome::Succeeded
                    },
                })
                .collect();
            start_builds.sort_by_key(|b| std::cmp::Reverse(b.created_at));
            PresetSnapshot {
                preset,
                schedules,
                running,
                in_progress: InProgress {
                    starting: rng.next(2) as u32,
                    stopping: 0,
                    deleting: rng.next(2) as u32,
                },
                pending_non_active: rng.next(2) as u32,
                start_builds,
                hard_limit: None,
                failures_reset_at: None,
                failed: Vec::new(),
                autoscaling: None,
                demand: Default::default(),
            }
        })
        .collect()
}

fn bench_plan(c: &mut Criterion) {
    // Monday 10:00 UTC = 12:00 Europe/Berlin: the scheduled presets are inside a schedule.
    let now = DateTime::parse_from_rfc3339("2025-06-02T10:00:00Z")
        .expect("valid")
        .with_timezone(&Utc);
    let snapshots = fixture(now);
    let config = ReconcileConfig::default();
    let mut group = c.benchmark_group("plan");
    group.throughput(Throughput::Elements(PRESETS as u64));
    group.bench_function("10k_presets_x_10_prebuilds", |b| {
        b.iter(|| {
            let mut creates = 0u32;
            for s in &snapshots {
                let p = plan(black_box(s), now, &config);
                creates += p.state.desired;
                black_box(&p);
            }
            creates
        })
    });
    group.finish();
}

criterion_group!(benches, bench_plan);
criterion_main!(benches);
