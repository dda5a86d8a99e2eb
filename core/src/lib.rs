//! Pure reconciliation core of the prebuilds service: a per-preset snapshot plus a clock in,
//! derived state and an ordered list of actions out.
//!
//! No I/O and no ambient inputs: the current time and random bytes are arguments, so every
//! decision is reproducible in a test. The shell (worker, scheduler, CLI) reads the snapshot under
//! the preset's lock, calls [`plan`], and executes the actions, guarding creates with
//! [`creates_to_execute`].
//!
//! Modules: [`snapshot`] (inputs), [`state`](mod@state) (derived counts), [`schedule`] and [`cron`] (desired
//! count over time and schedule validation), [`failures`] (backoff and hard limit), [`actions`](mod@actions)
//! (the plan), [`recovery`] (the hard-limit circuit breaker), [`capacity`] (in-flight caps,
//! their fair share, and the per-transaction create budget), [`names`] (workspace names),
//! [`claim`] (preset matching for claims), [`job_events`] (which provisioner event a job accepts in
//! each of its states), [`expr`] (the sizing expression language), [`autoscale`] (demand-driven
//! desired counts) and [`access`] (API token roles and what each may do).

pub mod access;
pub mod actions;
pub mod autoscale;
pub mod capacity;
pub mod claim;
pub mod cron;
pub mod expr;
pub mod failures;
pub mod job_events;
pub mod names;
pub mod parameters;
pub mod recovery;
pub mod schedule;
pub mod snapshot;
pub mod state;

pub use access::{request_id_for_key, ApiAction, ApiRole};
pub use actions::{
    actions, can_skip, creates_to_execute, plan, Action, CreateDecision, Plan, SkipReason,
};
pub use autoscale::{
    desired_count, expression_inputs, forecast, Autoscaling, Demand, ExpressionFailure, Forecast,
};
pub use capacity::{creates_allowed, Capacity, CreateBudget};
pub use claim::{match_preset, PresetCandidate};
pub use cron::{matches_cron, CronField, CronSpec, OverlapWitness};
pub use expr::{EvalError, EvalErrorKind, Expression, Inputs, ParseError, Var, WINDOW_MINUTES};
pub use failures::{backoff, backoff_until, failed_to_delete, is_hard_limited, Backoff};
pub use job_events::{admit, Admission, JobEventKind, JobStatus};
pub use names::{prebuild_name, validate_workspace_name, NameError, MAX_WORKSPACE_NAME_LEN};
pub use parameters::{build_parameters, ParameterProblem, TemplateParameter};
pub use recovery::{hard_limit, HardLimitChange, HardLimitDecision};
pub use schedule::{
    desired_instances, validate_schedules, DesiredCount, DesiredSource, ScheduleError,
};
pub use snapshot::{
    BuildOutcome, FailedPrebuild, HardLimitRecord, InProgress, PrebuildStatus, PresetInfo,
    PresetSnapshot, ReconcileConfig, RunningPrebuild, Schedule, StartBuild, UnknownStatus,
};
pub use state::{is_expired, state, PresetState};

/// Re-exported so callers can name the timezone type of [`matches_cron`] without a direct
/// dependency.
pub use chrono_tz::Tz;
