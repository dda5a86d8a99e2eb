//! Payload types of every message of docs/messages.md, with the CloudEvents `type` and routing key of each.
//! Payloads are read tolerantly: a field this version does not know is ignored, so a newer producer
//! may add fields before every consumer knows them (UPGRADING.md). A known field that is missing
//! (unless optional) or has the wrong type or an unknown enum value is a schema violation,
//! dead-lettered with the decoder's message as the reason.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Implemented by every payload: ties a type to its CloudEvents `type` and routing key.
pub trait Payload: Serialize + JsonSchema {
    /// The CloudEvents `type` attribute.
    const TYPE: &'static str;
    /// The file stem of its checked-in JSON Schema (`schemas/json/<stem>.schema.json`).
    const SCHEMA_NAME: &'static str;
    fn routing_key(&self) -> String;
    /// A representative value, used in documentation and schema tests.
    fn example() -> Self;
}

/// Why a reconcile was requested. Only `tick` is periodic; every other reason is event-driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileReason {
    Tick,
    Claim,
    JobCompleted,
    TemplateChanged,
    SettingsChanged,
    Manual,
}

impl ReconcileReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileReason::Tick => "tick",
            ReconcileReason::Claim => "claim",
            ReconcileReason::JobCompleted => "job_completed",
            ReconcileReason::TemplateChanged => "template_changed",
            ReconcileReason::SettingsChanged => "settings_changed",
            ReconcileReason::Manual => "manual",
        }
    }
}

/// "Look at preset X now" — level-triggered: the worker reads the truth from the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReconcilePreset {
    pub preset_id: Uuid,
    pub reason: ReconcileReason,
    pub requested_at: DateTime<Utc>,
}

impl Payload for ReconcilePreset {
    const TYPE: &'static str = "prebuilds.reconcile.preset.v1";
    const SCHEMA_NAME: &'static str = "reconcile.preset.v1";
    fn routing_key(&self) -> String {
        "reconcile.preset".to_owned()
    }
    fn example() -> Self {
        ReconcilePreset {
            preset_id: example_uuid(1),
            reason: ReconcileReason::Tick,
            requested_at: example_time(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    Start,
    Stop,
    Delete,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Start => "start",
            Transition::Stop => "stop",
            Transition::Delete => "delete",
        }
    }
}

impl std::str::FromStr for Transition {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "start" => Ok(Transition::Start),
            "stop" => Ok(Transition::Stop),
            "delete" => Ok(Transition::Delete),
            other => Err(format!("unknown transition {other:?}")),
        }
    }
}

/// Prebuild build stage, as Coder's `PrebuiltWorkspaceBuildStage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BuildStage {
    Create,
    Claim,
    None,
}

impl BuildStage {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildStage::Create => "create",
            BuildStage::Claim => "claim",
            BuildStage::None => "none",
        }
    }
}

impl std::str::FromStr for BuildStage {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "create" => Ok(BuildStage::Create),
            "claim" => Ok(BuildStage::Claim),
            "none" => Ok(BuildStage::None),
            other => Err(format!("unknown build stage {other:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Parameter {
    pub name: String,
    pub value: String,
}

/// A build for a provisioner to execute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProvisionerJob {
    pub job_id: Uuid,
    pub build_id: Uuid,
    pub workspace_id: Uuid,
    pub workspace_name: String,
    pub owner_id: Uuid,
    pub owner_name: String,
    pub template_id: Uuid,
    pub template_version_id: Uuid,
    pub preset_id: Option<Uuid>,
    pub transition: Transition,
    pub build_number: i32,
    pub stage: BuildStage,
    /// Orphan delete: nothing was provisioned, so there is nothing to destroy.
    pub orphan: bool,
    pub parameters: Vec<Parameter>,
}

/// Which provisioner queue a job goes to (docs/messages.md "Topology": the two lanes): builds a user waits for
/// are served before, and apart from, the prebuild fill and drain behind them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// A build a user waits for: a claim build, or any build of a workspace a user owns.
    User,
    /// Prebuild fill and drain: builds of workspaces the prebuilds user owns.
    Prebuild,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::User, Lane::Prebuild];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::User => "user",
            Lane::Prebuild => "prebuild",
        }
    }
}

impl std::str::FromStr for Lane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "user" => Ok(Lane::User),
            "prebuild" => Ok(Lane::Prebuild),
            other => Err(format!("unknown lane {other:?} (lanes: user, prebuild)")),
        }
    }
}

impl ProvisionerJob {
    /// The one home of the lane rule: a claim build, or a build of a workspace that is no longer
    /// the prebuilds user's, is a user's; every other build fills or drains a pool.
    pub fn lane(&self) -> Lane {
        if self.stage == BuildStage::Claim || self.owner_id != crate::PREBUILDS_USER_ID {
            Lane::User
        } else {
            Lane::Prebuild
        }
    }
}

impl Payload for ProvisionerJob {
    const TYPE: &'static str = "prebuilds.provisioner.job.v1";
    const SCHEMA_NAME: &'static str = "provisioner.job.v1";
    /// `provisioner.job.<transition>` for the prebuild lane (bound to `<prefix>.provisioner-jobs`),
    /// `provisioner.job.user.<transition>` for the user lane (`<prefix>.provisioner-jobs-user`).
    fn routing_key(&self) -> String {
        match self.lane() {
            Lane::Prebuild => format!("provisioner.job.{}", self.transition.as_str()),
            Lane::User => format!("provisioner.job.user.{}", self.transition.as_str()),
        }
    }
    fn example() -> Self {
        ProvisionerJob {
            job_id: example_uuid(2),
            build_id: example_uuid(3),
            workspace_id: example_uuid(4),
            workspace_name: "prebuild-abcdefghijklmno".to_owned(),
            owner_id: crate::PREBUILDS_USER_ID,
            owner_name: "prebuilds".to_owned(),
            template_id: example_uuid(5),
            template_version_id: example_uuid(6),
            preset_id: Some(example_uuid(1)),
            transition: Transition::Start,
            build_number: 1,
            stage: BuildStage::Create,
            orphan: false,
            parameters: vec![Parameter {
                name: "cpus".to_owned(),
                value: "8".to_owned(),
            }],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobStarted {
    pub job_id: Uuid,
    pub started_at: DateTime<Utc>,
}

impl Payload for JobStarted {
    const TYPE: &'static str = "prebuilds.provisioner.job_started.v1";
    const SCHEMA_NAME: &'static str = "provisioner.job_started.v1";
    fn routing_key(&self) -> String {
        "provisioner.event.job_started".to_owned()
    }
    fn example() -> Self {
        JobStarted {
            job_id: example_uuid(2),
            started_at: example_time(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ResourceReplacement {
    /// Resource address, e.g. `docker_container.workspace[0]`.
    pub resource: String,
    /// Attribute paths forcing the replacement, segments joined by `.`.
    pub paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanResult {
    pub job_id: Uuid,
    pub resource_replacements: Vec<ResourceReplacement>,
}

impl Payload for PlanResult {
    const TYPE: &'static str = "prebuilds.provisioner.plan_result.v1";
    const SCHEMA_NAME: &'static str = "provisioner.plan_result.v1";
    fn routing_key(&self) -> String {
        "provisioner.event.plan_result".to_owned()
    }
    fn example() -> Self {
        PlanResult {
            job_id: example_uuid(2),
            resource_replacements: vec![ResourceReplacement {
                resource: "docker_container.workspace[0]".to_owned(),
                paths: vec!["env".to_owned(), "image".to_owned()],
            }],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobOutcome {
    Succeeded,
    Failed,
    Canceled,
}

impl JobOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Succeeded => "succeeded",
            JobOutcome::Failed => "failed",
            JobOutcome::Canceled => "canceled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentSpec {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobCompleted {
    pub job_id: Uuid,
    pub status: JobOutcome,
    pub error: Option<String>,
    pub completed_at: DateTime<Utc>,
    /// Agents created by this build (lifecycle `created`).
    pub agents: Vec<AgentSpec>,
}

impl Payload for JobCompleted {
    const TYPE: &'static str = "prebuilds.provisioner.job_completed.v1";
    const SCHEMA_NAME: &'static str = "provisioner.job_completed.v1";
    fn routing_key(&self) -> String {
        "provisioner.event.job_completed".to_owned()
    }
    fn example() -> Self {
        JobCompleted {
            job_id: example_uuid(2),
            status: JobOutcome::Succeeded,
            error: None,
            completed_at: example_time(),
            agents: vec![AgentSpec {
                name: "main".to_owned(),
            }],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AgentLifecycleState {
    Starting,
    Ready,
    StartError,
    ShuttingDown,
    Off,
}

impl AgentLifecycleState {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentLifecycleState::Starting => "starting",
            AgentLifecycleState::Ready => "ready",
            AgentLifecycleState::StartError => "start_error",
            AgentLifecycleState::ShuttingDown => "shutting_down",
            AgentLifecycleState::Off => "off",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentLifecycle {
    pub job_id: Uuid,
    pub agent_name: String,
    pub lifecycle_state: AgentLifecycleState,
}

impl Payload for AgentLifecycle {
    const TYPE: &'static str = "prebuilds.provisioner.agent_lifecycle.v1";
    const SCHEMA_NAME: &'static str = "provisioner.agent_lifecycle.v1";
    fn routing_key(&self) -> String {
        "provisioner.event.agent_lifecycle".to_owned()
    }
    fn example() -> Self {
        AgentLifecycle {
            job_id: example_uuid(2),
            agent_name: "main".to_owned(),
            lifecycle_state: AgentLifecycleState::Ready,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Trace => "trace",
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LogLine {
    pub created_at: DateTime<Utc>,
    pub level: LogLevel,
    pub stage: String,
    pub output: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JobLog {
    pub job_id: Uuid,
    pub logs: Vec<LogLine>,
}

impl Payload for JobLog {
    const TYPE: &'static str = "prebuilds.provisioner.job_log.v1";
    const SCHEMA_NAME: &'static str = "provisioner.job_log.v1";
    fn routing_key(&self) -> String {
        "provisioner.event.job_log".to_owned()
    }
    fn example() -> Self {
        JobLog {
            job_id: example_uuid(2),
            logs: vec![LogLine {
                created_at: example_time(),
                level: LogLevel::Info,
                stage: "apply".to_owned(),
                output: "Apply complete! Resources: 1 added, 0 changed, 0 destroyed.".to_owned(),
            }],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimRequest {
    pub user_id: Uuid,
    pub workspace_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset_id: Option<Uuid>,
    /// Required when `preset_id` is absent: the preset is matched from `parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<Uuid>,
    #[serde(default)]
    pub parameters: Vec<Parameter>,
}

impl Payload for ClaimRequest {
    const TYPE: &'static str = "prebuilds.claim.request.v1";
    const SCHEMA_NAME: &'static str = "claim.request.v1";
    fn routing_key(&self) -> String {
        "claim.request".to_owned()
    }
    fn example() -> Self {
        ClaimRequest {
            user_id: example_uuid(7),
            workspace_name: "my-workspace".to_owned(),
            preset_id: Some(example_uuid(1)),
            template_id: None,
            parameters: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClaimOutcome {
    Claimed,
    NoEligiblePrebuild,
    Rejected,
}

impl ClaimOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimOutcome::Claimed => "claimed",
            ClaimOutcome::NoEligiblePrebuild => "no_eligible_prebuild",
            ClaimOutcome::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClaimErrorCode {
    InvalidRequest,
    UnknownUser,
    UnknownPreset,
    PresetInactive,
    InvalidName,
    NameConflict,
    /// The user may not claim here: the prebuilds system user, a deleted user, a user who is not
    /// a member of the template's organization, or a publisher not in `PREBUILDS_CLAIM_PUBLISHERS`
    /// (docs/messages.md "Trust").
    Forbidden,
    /// The request id was used before for another user or another body; the first reply is not
    /// repeated to someone else. Send a new request id for a new claim.
    RequestConflict,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimError {
    pub code: ClaimErrorCode,
    pub message: String,
}

/// Why a claim got `no_eligible_prebuild` (docs/reconciliation.md "Claim").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MissReason {
    /// No preset of the template's active version matches the request's parameters (template
    /// parameter defaults included).
    NoMatchingPreset,
    /// The preset (named or matched) has no eligible prebuild right now.
    PoolEmpty,
}

impl MissReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MissReason::NoMatchingPreset => "no_matching_preset",
            MissReason::PoolEmpty => "pool_empty",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ClaimReply {
    pub outcome: ClaimOutcome,
    pub workspace_id: Option<Uuid>,
    pub build_id: Option<Uuid>,
    pub job_id: Option<Uuid>,
    pub preset_id: Option<Uuid>,
    pub error: Option<ClaimError>,
    /// Set exactly when `outcome` is `no_eligible_prebuild` (absent from replies of workers that
    /// predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<MissReason>,
    /// With `no_matching_preset`: the presets of the template's active version the request was
    /// matched against, so the requester can see what it could have asked for. Absent otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub presets: Vec<PresetParameters>,
}

/// A preset and the parameter values it fixes (a claim matches it when it gives, or defaults to,
/// every one of them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PresetParameters {
    pub preset_id: Uuid,
    pub name: String,
    pub parameters: Vec<Parameter>,
}

impl Payload for ClaimReply {
    const TYPE: &'static str = "prebuilds.claim.reply.v1";
    const SCHEMA_NAME: &'static str = "claim.reply.v1";
    /// Replies go to the requester's `reply_to` queue through the default exchange; this key is
    /// only used when documenting the message.
    fn routing_key(&self) -> String {
        "claim.reply".to_owned()
    }
    fn example() -> Self {
        ClaimReply {
            outcome: ClaimOutcome::Claimed,
            workspace_id: Some(example_uuid(4)),
            build_id: Some(example_uuid(8)),
            job_id: Some(example_uuid(9)),
            preset_id: Some(example_uuid(1)),
            error: None,
            reason: None,
            presets: vec![],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Notification {
    pub notification_id: Uuid,
    pub notification_template_id: Uuid,
    pub user_id: Uuid,
    pub labels: BTreeMap<String, String>,
    pub data: serde_json::Value,
}

impl Payload for Notification {
    const TYPE: &'static str = "prebuilds.notification.v1";
    const SCHEMA_NAME: &'static str = "notification.v1";
    fn routing_key(&self) -> String {
        "notification.resource_replaced".to_owned()
    }
    fn example() -> Self {
        let labels = [
            ("org", "acme"),
            ("workspace", "my-workspace"),
            ("template", "python-dev"),
            ("template_version", "v2"),
            ("preset", "large"),
            ("workspace_build_num", "2"),
            ("claimant", "alice"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        Notification {
            notification_id: example_uuid(10),
            notification_template_id: crate::RESOURCE_REPLACED_TEMPLATE_ID,
            user_id: example_uuid(11),
            labels,
            data: serde_json::json!({"replacements": {"docker_container.workspace[0]": "env,image"}}),
        }
    }
}

/// Any event a provisioner publishes on `provisioner.event.*`, dispatched by CloudEvents type.
#[derive(Debug, Clone, PartialEq)]
pub enum ProvisionerEvent {
    JobStarted(JobStarted),
    PlanResult(PlanResult),
    JobCompleted(JobCompleted),
    AgentLifecycle(AgentLifecycle),
    JobLog(JobLog),
}

impl ProvisionerEvent {
    /// Decodes a raw envelope into the event its `type` names.
    pub fn decode(
        raw: crate::RawEvent,
    ) -> Result<(uuid::Uuid, ProvisionerEvent), crate::EnvelopeError> {
        let id = raw.id;
        let event = match raw.event_type.as_str() {
            JobStarted::TYPE => ProvisionerEvent::JobStarted(raw.decode()?.data),
            PlanResult::TYPE => ProvisionerEvent::PlanResult(raw.decode()?.data),
            JobCompleted::TYPE => ProvisionerEvent::JobCompleted(raw.decode()?.data),
            AgentLifecycle::TYPE => ProvisionerEvent::AgentLifecycle(raw.decode()?.data),
            JobLog::TYPE => ProvisionerEvent::JobLog(raw.decode()?.data),
            other => {
                return Err(crate::EnvelopeError::UnexpectedType {
                    found: other.to_owned(),
                    expected: "a prebuilds.provisioner.*.v1 event".to_owned(),
                })
            }
        };
        Ok((id, event))
    }

    pub fn job_id(&self) -> Uuid {
        match self {
            ProvisionerEvent::JobStarted(e) => e.job_id,
            ProvisionerEvent::PlanResult(e) => e.job_id,
            ProvisionerEvent::JobCompleted(e) => e.job_id,
            ProvisionerEvent::AgentLifecycle(e) => e.job_id,
            ProvisionerEvent::JobLog(e) => e.job_id,
        }
    }
}

fn example_uuid(n: u128) -> Uuid {
    Uuid::from_u128(0x0192_0000_0000_4000_8000_0000_0000_0000 | n)
}

fn example_time() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z")
        .expect("constant timestamp is valid RFC 3339")
        .with_timezone(&Utc)
}
