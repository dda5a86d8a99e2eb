//! Reading per-preset snapshots for the pure core. Three queries serve any number of presets (the
//! worker asks for one, the scheduler and `prebuildsctl status` for all): presets, schedules, and
//! live prebuilds with their latest build. Everything else — running, in-progress counts, pending
//! build-#1 jobs, the failure history, failed prebuilds — is derived here from those rows, so the rules about which
//! build counts for what live in one place.
//!
//! Call it inside the transaction that holds the preset's lock when acting on the result. The three
//! reads are pipelined; under READ COMMITTED each sees every commit made before it started.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use prebuilds_core::JobStatus;
use prebuilds_core::{
    Autoscaling, BuildOutcome, FailedPrebuild, HardLimitRecord, InProgress, PrebuildStatus,
    PresetInfo, PresetSnapshot, RunningPrebuild, Schedule, StartBuild,
};
use prebuilds_runtime::db::cached;
use prebuilds_schemas::{column::Parsed, Transition, PREBUILDS_USER_ID};
use uuid::Uuid;

/// A preset's snapshot plus the names and ids around it (for logs, metrics and the CLI).
#[derive(Debug, Clone)]
pub struct PresetView {
    pub snapshot: PresetSnapshot,
    pub preset_name: String,
    pub template_id: Uuid,
    pub template_name: String,
    pub template_version_id: Uuid,
    pub template_version_name: String,
    pub organization_id: Uuid,
    pub organization_name: String,
    pub global_paused: bool,
    pub template_paused: bool,
    pub preset_paused: bool,
}

impl PresetView {
    pub fn preset_id(&self) -> Uuid {
        self.snapshot.preset.id
    }
}

/// Loads the snapshots of `preset_ids` (unknown ids are simply absent from the result).
pub async fn load_snapshots<C: GenericClient>(
    client: &C,
    preset_ids: &[Uuid],
) -> Result<Vec<PresetView>, tokio_postgres::Error> {
    if preset_ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids = preset_ids.to_vec();
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&ids];
    // Sent together (prepared once per connection): one round trip of latency, not three.
    let (presets, schedule_rows, prebuild_rows) = futures::try_join!(
        cached::query(client, include_str!("sql/presets.sql"), &params),
        cached::query(client, include_str!("sql/schedules.sql"), &params),
        cached::query(client, include_str!("sql/prebuilds.sql"), &params),
    )?;

    let mut schedules: HashMap<Uuid, Vec<Schedule>> = HashMap::new();
    for r in schedule_rows {
        schedules
            .entry(r.get("preset_id"))
            .or_default()
            .push(Schedule {
                cron_expression: r.get("cron_expression"),
                desired_instances: r.get("desired_instances"),
            });
    }

    let mut derived: HashMap<Uuid, Derived> = HashMap::new();
    for r in prebuild_rows {
        let preset_id: Uuid = r.get("preset_id");
        derived.entry(preset_id).or_default().add(&PrebuildRow {
            workspace_id: r.get("workspace_id"),
            workspace_created_at: r.get("workspace_created_at"),
            build_number: r.get("build_number"),
            transition: r.get::<_, Parsed<Transition>>("transition").0,
            initiator_id: r.get("initiator_id"),
            build_created_at: r.get("build_created_at"),
            job_status: r.get::<_, Parsed<JobStatus>>("job_status").0,
            job_started_at: r.get("job_started_at"),
            ready: r.get("ready"),
        });
    }

    let mut views = Vec::with_capacity(presets.len());
    for r in presets {
        let preset_id: Uuid = r.get("preset_id");
        // The column's CHECK constraint admits only the three values the type knows.
        let status: Parsed<PrebuildStatus> = r.get("prebuild_status");
        let global_paused: bool = r.get("global_paused");
        let template_paused: bool = r.get("template_paused");
        let preset_paused: bool = r.get("preset_paused");
        let mut d = derived.remove(&preset_id).unwrap_or_default();
        // Newest first, as the core expects.
        d.start_builds
            .sort_by_key(|b| std::cmp::Reverse(b.created_at));
        let preset = PresetInfo {
            id: preset_id,
            name: r.get("preset_name"),
            version_is_active: r.get("version_is_active"),
            template_deleted: r.get("template_deleted"),
            template_deprecated: r.get("template_deprecated"),
            desired_instances: r.get("desired_instances"),
            invalidate_after_secs: r.get("invalidate_after_secs"),
            last_invalidated_at: r.get("last_invalidated_at"),
            scheduling_timezone: r.get("scheduling_timezone"),
            prebuild_status: status.0,
            paused: global_paused || template_paused || preset_paused,
        };
        // The three columns are written together; a partial row reads as no record.
        let hard_limit = match (
            r.get::<_, Option<DateTime<Utc>>>("hard_limited_at"),
            r.get::<_, Option<i64>>("hard_limit_cooldown_secs"),
            r.get::<_, Option<DateTime<Utc>>>("hard_limit_probe_at"),
        ) {
            (Some(since), Some(cooldown_secs), Some(next_probe_at)) => Some(HardLimitRecord {
                since,
                cooldown_secs,
                next_probe_at,
            }),
            _ => None,
        };
        views.push(PresetView {
            snapshot: PresetSnapshot {
                preset,
                schedules: schedules.remove(&preset_id).unwrap_or_default(),
                running: d.running,
                in_progress: d.in_progress,
                pending_non_active: d.pending_build_one,
                start_builds: d.start_builds,
                hard_limit,
                failures_reset_at: r.get("failures_reset_at"),
                failed: d.failed,
                autoscaling: autoscaling(&r),
                // Filled in by `demand::attach_demand` for presets that autoscale.
                demand: Default::default(),
            },
            preset_name: r.get("preset_name"),
            template_id: r.get("template_id"),
            template_name: r.get("template_name"),
            template_version_id: r.get("template_version_id"),
            template_version_name: r.get("template_version_name"),
            organization_id: r.get("organization_id"),
            organization_name: r.get("organization_name"),
            global_paused,
            template_paused,
            preset_paused,
        });
    }
    Ok(views)
}

/// The preset row's autoscaling block; both bounds are set together (a CHECK constraint), a
/// negative one is refused by the same constraint and reads as 0 here.
fn autoscaling(r: &tokio_postgres::Row) -> Option<Autoscaling> {
    let min: Option<i32> = r.get("autoscaling_min");
    let max: Option<i32> = r.get("autoscaling_max");
    let (min, max) = (min?, max?);
    Some(Autoscaling {
        min: u32::try_from(min).unwrap_or(0),
        max: u32::try_from(max).unwrap_or(0),
        expression: r.get("autoscaling_expression"),
    })
}

struct PrebuildRow {
    workspace_id: Uuid,
    workspace_created_at: DateTime<Utc>,
    build_number: i32,
    transition: Transition,
    initiator_id: Uuid,
    build_created_at: DateTime<Utc>,
    job_status: JobStatus,
    job_started_at: Option<DateTime<Utc>>,
    ready: bool,
}

#[derive(Default)]
struct Derived {
    running: Vec<RunningPrebuild>,
    in_progress: InProgress,
    pending_build_one: u32,
    start_builds: Vec<StartBuild>,
    failed: Vec<FailedPrebuild>,
}

impl Derived {
    /// Classifies one live prebuild by its latest build (docs/reconciliation.md "Snapshot").
    fn add(&mut self, row: &PrebuildRow) {
        let open = matches!(row.job_status, JobStatus::Pending | JobStatus::Running);
        let start = row.transition == Transition::Start;
        // 1. Running: the latest build is a successful start.
        if start && row.job_status == JobStatus::Succeeded {
            self.running.push(RunningPrebuild {
                workspace_id: row.workspace_id,
                created_at: row.workspace_created_at,
                ready: row.ready,
            });
        }
        // 2. In progress: reconciler-initiated latest builds whose job is pending or running.
        if open && row.initiator_id == PREBUILDS_USER_ID {
            match row.transition {
                Transition::Start => self.in_progress.starting += 1,
                Transition::Stop => self.in_progress.stopping += 1,
                Transition::Delete => self.in_progress.deleting += 1,
            }
        }
        // 3. Pending build #1: a create no provisioner has picked up yet (cancellable when the
        //    preset is inactive).
        if row.build_number == 1
            && start
            && row.job_status == JobStatus::Pending
            && row.job_started_at.is_none()
        {
            self.pending_build_one += 1;
        }
        // 4. Failure history: prebuilds whose latest build is a start, with its outcome.
        if start {
            let outcome = match row.job_status {
                JobStatus::Succeeded => BuildOutcome::Succeeded,
                JobStatus::Failed => BuildOutcome::Failed,
                JobStatus::Canceled | JobStatus::Canceling => BuildOutcome::Canceled,
                JobStatus::Pending | JobStatus::Running => BuildOutcome::InProgress,
            };
            self.start_builds.push(StartBuild {
                created_at: row.build_created_at,
                outcome,
            });
            // 5. Failed prebuilds (clean-up candidates): the latest build is a failed start.
            if outcome == BuildOutcome::Failed {
                self.failed.push(FailedPrebuild {
                    workspace_id: row.workspace_id,
                    created_at: row.workspace_created_at,
                });
            }
        }
    }
}
