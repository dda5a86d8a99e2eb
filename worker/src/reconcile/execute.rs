//! Executing a preset's plan inside the reconcile transaction. Every effect a provisioner must act
//! on is written to the outbox in the same transaction, so a crash before commit leaves nothing
//! behind and a crash after commit loses nothing.
//!
//! Safety checks at execution time (defence in depth on top of the plan):
//! - creates are re-derived by `prebuilds_core::creates_to_execute` (clamped to the desired count,
//!   skipped when hard-limited, validation-failed or paused);
//! - the preset's parameters are validated once per cycle before the first create; a problem marks
//!   the preset `validation_failed` and no create of the cycle is attempted;
//! - a delete marks and locks the workspace row in one guarded statement, so a claimed workspace
//!   is never deleted;
//! - creates are limited to the in-flight capacity (`prebuilds_store::capacity`, fair share from
//!   `prebuilds_core::creates_allowed`), counted under the global capacity lock only when a create
//!   is about to happen; a held-back preset is recorded so a completing create re-queues it.
//!   Deletes and cancels are never held back;
//! - what the capacity allows is then taken from the transaction's create budget
//!   (`PREBUILDS_MAX_CREATES_PER_PASS`, `prebuilds_core::CreateBudget`); creates it defers are
//!   reported, and the caller re-queues the preset for a follow-up pass;
//! - the hard-limit record (`prebuilds_core::recovery`) is stored with the status; a probe create
//!   stores the next probe time with it.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use prebuilds_core::{
    Action, CreateBudget, HardLimitChange, HardLimitRecord, Plan, PrebuildStatus, TemplateParameter,
};
use prebuilds_runtime::db::cached;
use prebuilds_runtime::{db::DbError, outbox};
use prebuilds_schemas::{
    BuildStage, CloudEvent, Parameter, ProvisionerJob, Transition, PREBUILDS_USER_ID,
};
use prebuilds_store::PresetView;
use uuid::Uuid;

use super::ReconcileContext;

/// What one execution did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutionReport {
    pub created: u32,
    pub deleted: u32,
    /// Deletes refused because the workspace was claimed (or already deleting) meanwhile.
    pub delete_skipped: u32,
    pub canceled: u32,
    pub validation_failed: bool,
    /// Creates held back by the in-flight capacity.
    pub held_back: u32,
    /// Creates the capacity allowed but the transaction's create budget left for a follow-up
    /// pass (the caller re-queues the preset).
    pub deferred: u32,
    /// A hard-limit probe create was made.
    pub probed: bool,
    pub outbox_rows: u32,
}

pub async fn execute(
    tx: &Transaction<'_>,
    ctx: &ReconcileContext,
    view: &PresetView,
    plan: &Plan,
    now: DateTime<Utc>,
    budget: &mut CreateBudget,
) -> Result<ExecutionReport, DbError> {
    let preset_id = view.preset_id();
    let mut report = ExecutionReport::default();
    if let Some(status) = plan.status_change {
        tracing::warn!(%preset_id, preset = %view.preset_name, status = %status,
            next_probe_at = ?plan.hard_limit.next_probe_at(), "preset status changed");
        set_status(tx, preset_id, status).await?;
    }
    if let Some(change) = plan.hard_limit.record_change() {
        set_hard_limit(tx, preset_id, change).await?;
    }
    for action in &plan.actions {
        match action {
            Action::Backoff { until } => {
                tracing::warn!(%preset_id, preset = %view.preset_name, backoff_until = %until,
                    seconds_remaining = (*until - now).num_seconds(),
                    "template prebuild state retrieved, backing off");
            }
            Action::CancelPending => {
                let canceled = cancel_pending(tx, preset_id, now).await?;
                tracing::info!(%preset_id, canceled, "canceled pending prebuild jobs for inactive version");
                report.canceled += canceled;
            }
            Action::Delete { workspace_ids } => {
                for id in workspace_ids {
                    if delete_prebuild(tx, ctx, view, *id, now).await? {
                        report.deleted += 1;
                        report.outbox_rows += 1;
                    } else {
                        tracing::info!(%preset_id, workspace_id = %id, "prebuilt workspace is not owned by prebuild user anymore, probably it was claimed; not deleting");
                        report.delete_skipped += 1;
                    }
                }
            }
            Action::Create { count } => {
                let decision =
                    prebuilds_core::creates_to_execute(*count, &view.snapshot, plan, now);
                if let Some(from) = decision.clamped_from {
                    tracing::error!(%preset_id, requested = from, clamped_to = decision.count,
                        "determined excessive count of prebuilds to create; clamping to desired count");
                }
                if let Some(reason) = decision.skipped {
                    tracing::warn!(%preset_id, reason = ?reason, requested = count, "skipping prebuild creation");
                    continue;
                }
                if decision.count == 0 {
                    continue;
                }
                let allowed = within_capacity(tx, ctx, view, decision.count).await?;
                report.held_back += decision.count - allowed;
                if allowed == 0 {
                    continue;
                }
                let parameters = match validated_parameters(tx, view).await? {
                    Ok(p) => p,
                    Err(problem) => {
                        tracing::warn!(%preset_id, preset = %view.preset_name, %problem, "marking preset as failed validation");
                        set_status(tx, preset_id, PrebuildStatus::ValidationFailed).await?;
                        report.validation_failed = true;
                        continue;
                    }
                };
                // Capacity first: a preset waiting for capacity is woken by a completion, so only
                // what the budget alone defers needs a follow-up pass.
                let count = budget.take(allowed);
                if count < allowed {
                    tracing::info!(%preset_id, preset = %view.preset_name, allowed, now = count,
                        "prebuild creates split over passes (PREBUILDS_MAX_CREATES_PER_PASS); the rest follow");
                }
                report.deferred += allowed - count;
                for _ in 0..count {
                    create_prebuild(tx, ctx, view, &parameters, now).await?;
                    report.created += 1;
                    report.outbox_rows += 1;
                }
                if let (true, Some(next)) = (decision.probe && count > 0, plan.hard_limit.probe()) {
                    tracing::warn!(%preset_id, preset = %view.preset_name, next_probe_at = %next.next_probe_at,
                        "hard-limited preset: probe create queued");
                    set_hard_limit(tx, preset_id, HardLimitChange::Set(next)).await?;
                    report.probed = true;
                }
            }
        }
    }
    Ok(report)
}

impl ExecutionReport {
    /// Counts the report's actions; call after the transaction committed (a rolled-back batch is
    /// re-run, and its actions must not count twice).
    pub fn count(&self, metrics: &crate::metrics::WorkerMetrics) {
        let actions = &metrics.reconcile_actions;
        actions
            .with_label_values(&["create"])
            .inc_by(self.created.into());
        actions
            .with_label_values(&["delete"])
            .inc_by(self.deleted.into());
        actions
            .with_label_values(&["cancel"])
            .inc_by(self.canceled.into());
        actions
            .with_label_values(&["create_held_back"])
            .inc_by(self.held_back.into());
        actions
            .with_label_values(&["create_deferred"])
            .inc_by(self.deferred.into());
    }
}

/// How many of `wanted` creates fit the in-flight capacity (all of them when no cap is set).
/// With a cap, records whether the preset is left waiting for capacity.
async fn within_capacity(
    tx: &Transaction<'_>,
    ctx: &ReconcileContext,
    view: &PresetView,
    wanted: u32,
) -> Result<u32, DbError> {
    let (max_inflight, max_per_preset) = (
        ctx.config.max_inflight_jobs,
        ctx.config.max_inflight_per_preset,
    );
    if max_inflight == 0 && max_per_preset == 0 {
        return Ok(wanted);
    }
    let preset_id = view.preset_id();
    let capacity =
        prebuilds_store::capacity::count_inflight(tx, preset_id, max_inflight, max_per_preset)
            .await?;
    let allowed = prebuilds_core::creates_allowed(wanted, &capacity);
    if allowed < wanted {
        tracing::info!(%preset_id, preset = %view.preset_name, wanted, allowed, ?capacity,
            "prebuild creates held back by the in-flight capacity");
    }
    prebuilds_store::capacity::set_waiting(tx, preset_id, allowed < wanted).await?;
    Ok(allowed)
}

/// Stores or clears the hard-limit record (`recovery`).
async fn set_hard_limit(
    tx: &Transaction<'_>,
    preset_id: Uuid,
    change: HardLimitChange,
) -> Result<(), DbError> {
    let record: Option<HardLimitRecord> = match change {
        HardLimitChange::Set(r) => Some(r),
        HardLimitChange::Clear => None,
    };
    cached::execute(
        tx,
        include_str!("../sql/set_hard_limit.sql"),
        &[
            &preset_id,
            &record.map(|r| r.since),
            &record.map(|r| r.next_probe_at),
            &record.map(|r| r.cooldown_secs),
        ],
    )
    .await?;
    Ok(())
}

async fn set_status(
    tx: &Transaction<'_>,
    preset_id: Uuid,
    status: PrebuildStatus,
) -> Result<(), DbError> {
    cached::execute(
        tx,
        include_str!("../sql/set_prebuild_status.sql"),
        &[&preset_id, &status.as_str()],
    )
    .await?;
    Ok(())
}

async fn validated_parameters(
    tx: &Transaction<'_>,
    view: &PresetView,
) -> Result<Result<Vec<Parameter>, prebuilds_core::ParameterProblem>, DbError> {
    let rows = cached::query(
        tx,
        include_str!("../sql/preset_parameters.sql"),
        &[&view.template_version_id, &view.preset_id()],
    )
    .await?;
    let mut template = Vec::new();
    let mut preset = Vec::new();
    for r in rows {
        let kind: &str = r.get("kind");
        if kind == "template" {
            template.push(TemplateParameter {
                name: r.get("name"),
                required: r.get("required"),
                default_value: r.get("default_value"),
            });
        } else {
            preset.push((r.get("name"), r.get("value")));
        }
    }
    Ok(
        prebuilds_core::build_parameters(&template, &preset).map(|values| {
            values
                .into_iter()
                .map(|(name, value)| Parameter { name, value })
                .collect()
        }),
    )
}

/// Inserts a job and its build, and queues the job for provisioners through the outbox.
async fn queue_build(
    tx: &Transaction<'_>,
    ctx: &ReconcileContext,
    job: ProvisionerJob,
    version_id: Uuid,
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let event = CloudEvent::new(ctx.source.clone(), now, job);
    let job = &event.data;
    let parameters = serde_json::to_value(&job.parameters).expect("parameters serialise");
    cached::execute(
        tx,
        include_str!("../sql/insert_job.sql"),
        &[
            &job.job_id,
            &PREBUILDS_USER_ID,
            &event.data_json(),
            &now,
            &"pending",
        ],
    )
    .await?;
    cached::execute(
        tx,
        include_str!("../sql/insert_build.sql"),
        &[
            &job.build_id,
            &job.workspace_id,
            &version_id,
            &job.build_number,
            &job.transition.as_str(),
            &PREBUILDS_USER_ID,
            &job.job_id,
            &job.preset_id,
            &job.stage.as_str(),
            &job.orphan,
            &parameters,
            &now,
        ],
    )
    .await?;
    outbox::enqueue(tx, &event).await?;
    Ok(())
}

async fn create_prebuild(
    tx: &Transaction<'_>,
    ctx: &ReconcileContext,
    view: &PresetView,
    parameters: &[Parameter],
    now: DateTime<Utc>,
) -> Result<(), DbError> {
    let workspace_id = Uuid::new_v4();
    let name = prebuilds_core::prebuild_name(rand::random());
    cached::execute(
        tx,
        include_str!("../sql/create_workspace.sql"),
        &[
            &workspace_id,
            &view.organization_id,
            &view.template_id,
            &name,
            &now,
        ],
    )
    .await?;
    let job = ProvisionerJob {
        job_id: Uuid::new_v4(),
        build_id: Uuid::new_v4(),
        workspace_id,
        workspace_name: name.clone(),
        owner_id: PREBUILDS_USER_ID,
        owner_name: "prebuilds".to_owned(),
        template_id: view.template_id,
        template_version_id: view.template_version_id,
        preset_id: Some(view.preset_id()),
        transition: Transition::Start,
        build_number: 1,
        stage: BuildStage::Create,
        orphan: false,
        parameters: parameters.to_vec(),
    };
    tracing::info!(preset_id = %view.preset_id(), workspace = %name, job_id = %job.job_id, "prebuild job scheduled (create)");
    queue_build(tx, ctx, job, view.template_version_id, now).await
}

/// Queues a delete build unless the workspace stopped being a deletable prebuild; returns whether
/// it did.
async fn delete_prebuild(
    tx: &Transaction<'_>,
    ctx: &ReconcileContext,
    view: &PresetView,
    workspace_id: Uuid,
    now: DateTime<Utc>,
) -> Result<bool, DbError> {
    let Some(row) = cached::query_opt(
        tx,
        include_str!("../sql/mark_deleting.sql"),
        &[&workspace_id, &now],
    )
    .await?
    else {
        return Ok(false);
    };
    let previous_number: i32 = row.get("build_number");
    let version_id: Uuid = row.get("template_version_id");
    let job = ProvisionerJob {
        job_id: Uuid::new_v4(),
        build_id: Uuid::new_v4(),
        workspace_id,
        workspace_name: row.get("name"),
        owner_id: PREBUILDS_USER_ID,
        owner_name: "prebuilds".to_owned(),
        template_id: row.get("template_id"),
        // A delete uses the previous build's version and no parameters, so it works even when a
        // newer version added required parameters.
        template_version_id: version_id,
        preset_id: None,
        transition: Transition::Delete,
        build_number: previous_number + 1,
        stage: BuildStage::None,
        orphan: false,
        parameters: vec![],
    };
    tracing::info!(preset_id = %view.preset_id(), %workspace_id, job_id = %job.job_id, "prebuild job scheduled (delete)");
    queue_build(tx, ctx, job, version_id, now).await?;
    Ok(true)
}

/// Cancels the preset's still-pending create jobs and orphan-deletes their workspaces (nothing was
/// provisioned, so no provisioner job is needed). Returns how many were canceled.
async fn cancel_pending(
    tx: &Transaction<'_>,
    preset_id: Uuid,
    now: DateTime<Utc>,
) -> Result<u32, DbError> {
    let canceled = cached::query(
        tx,
        include_str!("../sql/cancel_pending.sql"),
        &[&preset_id, &now],
    )
    .await?;
    for row in &canceled {
        let workspace_id: Uuid = row.get("workspace_id");
        let version_id: Uuid = row.get("template_version_id");
        let deleted = cached::execute(
            tx,
            include_str!("../sql/orphan_delete.sql"),
            &[&workspace_id, &now],
        )
        .await?;
        if deleted == 0 {
            continue;
        }
        // A completed orphan delete build keeps the history truthful (build 2 = delete).
        let job_id = Uuid::new_v4();
        let input = serde_json::json!({ "orphan": true, "workspace_id": workspace_id });
        cached::execute(
            tx,
            include_str!("../sql/insert_job.sql"),
            &[&job_id, &PREBUILDS_USER_ID, &input, &now, &"succeeded"],
        )
        .await?;
        cached::execute(
            tx,
            include_str!("../sql/insert_build.sql"),
            &[
                &Uuid::new_v4(),
                &workspace_id,
                &version_id,
                &2i32,
                &"delete",
                &PREBUILDS_USER_ID,
                &job_id,
                &None::<Uuid>,
                &"none",
                &true,
                &serde_json::json!([]),
                &now,
            ],
        )
        .await?;
    }
    Ok(canceled.len() as u32)
}
