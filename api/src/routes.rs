//! The endpoints, each declared once in [`endpoints`] with its handler, the role it needs and what
//! the OpenAPI document says about it ([`crate::openapi`] is generated from the same list, so the
//! document cannot drift from the router).
//!
//! Every `/api/v1` handler first authenticates ([`Caller`], 401) and checks the role (403), then
//! parses its input (400/413/422), so a caller without the right learns nothing about the input's
//! validity. Changes run through the same code as `prebuildsctl`'s (one transaction with the
//! audit row, the token's name as actor, and the reconcile jobs the change needs); a claim goes
//! through the worker's claim RPC, exactly like `prebuildsctl claim`.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{rejection::JsonRejection, Path, RawQuery, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post, put, MethodRouter},
    Json, Router,
};
use chrono::{DateTime, Utc};
use prebuilds_core::{request_id_for_key, ApiAction};
use prebuilds_runtime::amqp::rpc::RpcError;
use prebuilds_schemas::{ClaimErrorCode, ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent};
use prebuildsctl::{
    audit::{self, Entry},
    commands::{
        jobs::{self, JobRow},
        pause::{self, Scope},
        status::{self, Row},
        template::invalidate_change,
    },
    context::{apply_change_on, retry_conflicts, Conflict, Ctx, NotFound, UsageError},
};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::{app::AppState, auth::Caller, problem::Problem};

type Shared = State<Arc<AppState>>;

/// The CloudEvents source of the claims the API sends.
const EVENT_SOURCE: &str = "prebuilds-api";
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;
/// Most jobs one `GET /api/v1/jobs` returns.
pub const MAX_JOBS: i64 = 1000;

/// Where a parameter goes.
#[derive(Debug, Clone, Copy)]
pub enum In {
    Path,
    Query,
    Header,
}

/// One documented parameter.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: &'static str,
    pub at: In,
    pub required: bool,
    pub description: &'static str,
    pub schema: Value,
}

type SchemaFn = fn(&mut SchemaGenerator) -> Schema;

/// One endpoint: its route, handler, permission and documentation.
pub struct Endpoint {
    pub method: Method,
    /// The route template (axum's and OpenAPI's syntax are the same: `{name}`).
    pub path: &'static str,
    pub operation_id: &'static str,
    pub summary: &'static str,
    pub description: &'static str,
    /// `None`: no token needed.
    pub action: Option<ApiAction>,
    pub params: Vec<Param>,
    pub body: Option<SchemaFn>,
    /// The success status and the schema of its JSON body.
    pub ok: (StatusCode, SchemaFn),
    /// Error statuses this endpoint may answer besides the ones every protected endpoint has.
    pub errors: Vec<StatusCode>,
    pub handler: MethodRouter<Arc<AppState>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("method", &self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn schema_of<T: JsonSchema>(generator: &mut SchemaGenerator) -> Schema {
    generator.subschema_for::<T>()
}

fn query(name: &'static str, description: &'static str, schema: Value) -> Param {
    Param {
        name,
        at: In::Query,
        required: false,
        description,
        schema,
    }
}

fn organization_param() -> Param {
    query(
        "organization",
        "Organization of the template (needed when the name exists in several).",
        text_schema(),
    )
}

fn template_path_param() -> Param {
    Param {
        name: "name",
        at: In::Path,
        required: true,
        description: "Template name.",
        schema: text_schema(),
    }
}

fn preset_path_param() -> Param {
    Param {
        name: "id",
        at: In::Path,
        required: true,
        description: "Preset id (as `GET /api/v1/presets` lists it).",
        schema: json!({"type": "string", "format": "uuid"}),
    }
}

/// Every endpoint of the API.
pub fn endpoints() -> Vec<Endpoint> {
    vec![
        Endpoint {
            method: Method::GET,
            path: "/openapi.json",
            operation_id: "openapi",
            summary: "This OpenAPI document",
            description: "Needs no token.",
            action: None,
            params: vec![],
            body: None,
            ok: (StatusCode::OK, |_| json!({"type": "object"}).try_into().expect("an object")),
            errors: vec![],
            handler: get(openapi),
        },
        Endpoint {
            method: Method::POST,
            path: "/api/v1/claims",
            operation_id: "createClaim",
            summary: "Claim a prebuilt workspace for a user",
            description: "Sends the body as a `prebuilds.claim.request.v1` to the workers' claim RPC and \
                answers with its reply. `claimed` and `no_eligible_prebuild` (with its `reason`) are 200; \
                a refused claim is a problem whose `reply` member holds the worker's reply (403 \
                forbidden, 409 request_conflict / name_conflict / preset_inactive, 422 otherwise). The \
                `Idempotency-Key` is the request id: a retry with the same key and body gets the first \
                outcome, the same key with another body 409. A 504 means no reply came in time: \
                retry with the same key. Needs role claimer or admin.",
            action: Some(ApiAction::Claim),
            params: vec![Param {
                name: "Idempotency-Key",
                at: In::Header,
                required: false,
                description: "The claim's request id: a UUID, or any other text (mapped to a UUID by name). \
                    Without it every request is a new claim.",
                schema: json!({"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY}),
            }],
            body: Some(schema_of::<ClaimRequest>),
            ok: (StatusCode::OK, schema_of::<ClaimReply>),
            errors: vec![
                StatusCode::BAD_REQUEST,
                StatusCode::CONFLICT,
                StatusCode::PAYLOAD_TOO_LARGE,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                StatusCode::UNPROCESSABLE_ENTITY,
                StatusCode::GATEWAY_TIMEOUT,
            ],
            handler: post(claim),
        },
        Endpoint {
            method: Method::GET,
            path: "/api/v1/presets",
            operation_id: "listPresets",
            summary: "The pool of every preset",
            description: "The rows of `prebuildsctl status --json`: desired, running, eligible, \
                in-progress builds, status, pause and claim history per preset. Any role.",
            action: Some(ApiAction::Read),
            params: vec![
                query("template", "Only this template.", text_schema()),
                organization_param(),
            ],
            body: None,
            ok: (StatusCode::OK, schema_of::<Vec<Row>>),
            errors: vec![StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND],
            handler: get(presets),
        },
        Endpoint {
            method: Method::GET,
            path: "/api/v1/templates",
            operation_id: "listTemplates",
            summary: "The templates",
            description: "Every live template with its active version, pause and deprecation. Any role.",
            action: Some(ApiAction::Read),
            params: vec![organization_param()],
            body: None,
            ok: (StatusCode::OK, schema_of::<Vec<TemplateRow>>),
            errors: vec![StatusCode::BAD_REQUEST],
            handler: get(templates),
        },
        Endpoint {
            method: Method::GET,
            path: "/api/v1/jobs",
            operation_id: "listJobs",
            summary: "Provisioner jobs, newest first",
            description: "The rows of `prebuildsctl jobs list --json`. Any role.",
            action: Some(ApiAction::Read),
            params: vec![
                query(
                    "status",
                    "Only jobs in this status.",
                    json!({"type": "string", "enum": jobs::STATUSES}),
                ),
                query(
                    "initiator",
                    "Only jobs started by this user (`prebuilds` = the reconciler).",
                    text_schema(),
                ),
                query(
                    "limit",
                    "At most this many jobs (default 100).",
                    json!({"type": "integer", "minimum": 1, "maximum": MAX_JOBS}),
                ),
            ],
            body: None,
            ok: (StatusCode::OK, schema_of::<Vec<JobRow>>),
            errors: vec![StatusCode::BAD_REQUEST],
            handler: get(list_jobs),
        },
        Endpoint {
            method: Method::PUT,
            path: "/api/v1/settings",
            operation_id: "putSettings",
            summary: "Pause or resume reconciliation globally",
            description: "`{\"reconciliation_paused\": true}` stops every create and delete (claims go on); \
                `false` resumes and reconciles every preset that needs it at once. Audited. Role admin.",
            action: Some(ApiAction::Administer),
            params: vec![],
            body: Some(schema_of::<Settings>),
            ok: (StatusCode::OK, schema_of::<SettingsChanged>),
            errors: vec![
                StatusCode::BAD_REQUEST,
                StatusCode::PAYLOAD_TOO_LARGE,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                StatusCode::UNPROCESSABLE_ENTITY,
            ],
            handler: put(put_settings),
        },
        Endpoint {
            method: Method::POST,
            path: "/api/v1/templates/{name}/prebuilds/invalidate",
            operation_id: "invalidateTemplatePrebuilds",
            summary: "Replace a template's prebuilds",
            description: "Every prebuild of the template's active version counts as expired and is \
                replaced (`prebuildsctl template invalidate`). Audited. Role admin.",
            action: Some(ApiAction::Administer),
            params: vec![template_path_param(), organization_param()],
            body: None,
            ok: (StatusCode::OK, schema_of::<Invalidated>),
            errors: vec![StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND, StatusCode::CONFLICT],
            handler: post(invalidate),
        },
    ]
    .into_iter()
    .chain(pause_endpoints())
    .collect()
}

/// The pause and resume endpoints of the template and preset scopes: one request shape, answer
/// and audit each, `pause` true or false (the global scope is `PUT /api/v1/settings`).
fn pause_endpoints() -> Vec<Endpoint> {
    /// (path, operation id, summary, description) of one scope's pause or resume.
    type Doc = (&'static str, &'static str, &'static str, &'static str);
    const TEMPLATE: [Doc; 2] = [
        (
            "/api/v1/templates/{name}/pause",
            "pauseTemplate",
            "Pause reconciliation of a template",
            "Like `prebuildsctl pause --template NAME`. Audited. Role admin.",
        ),
        (
            "/api/v1/templates/{name}/resume",
            "resumeTemplate",
            "Resume reconciliation of a template",
            "Like `prebuildsctl resume --template NAME`: its presets are reconciled at once. \
             Audited. Role admin.",
        ),
    ];
    const PRESET: [Doc; 2] = [
        (
            "/api/v1/presets/{id}/pause",
            "pausePreset",
            "Pause reconciliation of a preset",
            "Like `prebuildsctl pause --preset ID`. Audited. Role admin.",
        ),
        (
            "/api/v1/presets/{id}/resume",
            "resumePreset",
            "Resume reconciliation of a preset",
            "Like `prebuildsctl resume --preset ID`: the preset is reconciled at once. \
             Audited. Role admin.",
        ),
    ];
    let endpoint = |(path, operation_id, summary, description): Doc, params, handler| Endpoint {
        method: Method::POST,
        path,
        operation_id,
        summary,
        description,
        action: Some(ApiAction::Administer),
        params,
        body: None,
        ok: (StatusCode::OK, schema_of::<PauseOutcome> as SchemaFn),
        errors: vec![StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND],
        handler,
    };
    let mut endpoints = Vec::new();
    for (doc, pause) in TEMPLATE.into_iter().zip([true, false]) {
        let params = vec![template_path_param(), organization_param()];
        let handler = post(move |s: Shared, c: Caller, p: Path<String>, q: RawQuery| {
            pause_template(s, c, p, q, pause)
        });
        endpoints.push(endpoint(doc, params, handler));
    }
    for (doc, pause) in PRESET.into_iter().zip([true, false]) {
        let handler =
            post(move |s: Shared, c: Caller, p: Path<String>| pause_preset(s, c, p, pause));
        endpoints.push(endpoint(doc, vec![preset_path_param()], handler));
    }
    endpoints
}

/// The route template a response answered (a response extension the metrics read).
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

/// The router of [`endpoints`], with problem answers for unknown routes and methods.
pub fn router() -> Router<Arc<AppState>> {
    let mut by_path: Vec<(&'static str, MethodRouter<Arc<AppState>>)> = Vec::new();
    for e in endpoints() {
        match by_path.iter_mut().find(|(p, _)| *p == e.path) {
            Some((_, existing)) => *existing = std::mem::take(existing).merge(e.handler),
            None => by_path.push((e.path, e.handler)),
        }
    }
    let mut router = Router::new();
    for (path, handler) in by_path {
        // Tag the answer with its route template, for the metrics' bounded `route` label.
        let handler = handler.layer(axum::middleware::map_response(
            move |mut r: Response| async move {
                r.extensions_mut().insert(RouteLabel(path));
                r
            },
        ));
        router = router.route(path, handler);
    }
    router
        .fallback(|| async { StatusCode::NOT_FOUND })
        .method_not_allowed_fallback(|| async { StatusCode::METHOD_NOT_ALLOWED })
}

// ---- inputs and outputs ----

/// `PUT /api/v1/settings`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `true` stops reconciliation everywhere (claims go on); `false` resumes it.
    pub reconciliation_paused: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct SettingsChanged {
    pub reconciliation_paused: bool,
    /// Whether the setting was different before.
    pub changed: bool,
    /// Reconcile jobs requested by a resume.
    pub reconciles_requested: usize,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct PauseOutcome {
    /// What was paused or resumed, e.g. `template acme/python-dev`.
    pub scope: String,
    pub paused: bool,
    pub changed: bool,
    pub reconciles_requested: usize,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct Invalidated {
    pub organization: String,
    pub template: String,
    pub presets_invalidated: usize,
    pub reconciles_requested: usize,
}

#[derive(Debug, Serialize, JsonSchema)]
#[schemars(rename = "Template")]
pub struct TemplateRow {
    pub id: Uuid,
    pub organization: String,
    pub name: String,
    pub active_version: Option<String>,
    pub active_version_id: Option<Uuid>,
    pub paused: bool,
    /// The deprecation message; null when the template is not deprecated.
    pub deprecated: Option<String>,
    pub created_at: DateTime<Utc>,
}

// ---- handlers ----

async fn openapi() -> Json<Value> {
    Json(crate::openapi::document())
}

/// The query string's parameters (the last value of a repeated one wins). Text PostgreSQL cannot
/// store (a NUL character) is refused here, once for every parameter, as a 400.
fn query_params(raw: &RawQuery) -> Result<HashMap<String, String>, Problem> {
    let params: HashMap<String, String> = raw
        .0
        .as_deref()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    for (name, value) in &params {
        storable(value, name)?;
    }
    Ok(params)
}

/// Refuses text with a NUL character (PostgreSQL's text cannot hold one).
fn storable(value: &str, what: &str) -> Result<(), Problem> {
    if value.contains('\0') {
        return Err(Problem::bad_request(format!(
            "{what} contains a NUL character, which no name can contain"
        )));
    }
    Ok(())
}

/// The schema of a text parameter: any string without NUL ([`storable`]).
fn text_schema() -> Value {
    json!({"type": "string", "pattern": "^[^\\u0000]*$"})
}

/// A command error as an answer: the typed errors callers can act on keep their status; anything
/// else is logged and answered 500 without internals.
fn command_problem(e: anyhow::Error) -> Problem {
    if let Some(e) = e.downcast_ref::<NotFound>() {
        return Problem::new(StatusCode::NOT_FOUND, "not_found", e.0.clone());
    }
    if let Some(e) = e.downcast_ref::<UsageError>() {
        return Problem::bad_request(e.0.clone());
    }
    if let Some(e) = e.downcast_ref::<Conflict>() {
        return Problem::new(StatusCode::CONFLICT, "conflict", e.0.clone());
    }
    let text = format!("{e:#}");
    if text.starts_with("timed out after") {
        // explain_lock_timeout's message: another writer holds the lock; nothing was written.
        return Problem::unavailable(text);
    }
    if let Some(problem) = e
        .chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .find_map(crate::app::missing_grant)
    {
        return problem;
    }
    if e.chain()
        .any(|c| c.downcast_ref::<tokio_postgres::Error>().is_some())
        || e.chain()
            .any(|c| c.downcast_ref::<deadpool_postgres::PoolError>().is_some())
    {
        tracing::warn!(error = %text, "database error");
        return Problem::unavailable(
            "the database failed to answer; nothing was changed — try again shortly",
        );
    }
    tracing::error!(error = %text, "request failed");
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the request failed unexpectedly; the API's log has the details",
    )
}

/// The context of one audited change: the token's name is the actor.
fn change_ctx(state: &AppState, caller: &Caller, action: &str, arguments: Value) -> Ctx {
    let mut arguments = arguments;
    if let Some(object) = arguments.as_object_mut() {
        object.insert("via".to_owned(), json!("api"));
        object.insert("role".to_owned(), json!(caller.role.as_str()));
    }
    Ctx {
        connection: state.connection.clone(),
        lock_timeout: state.lock_timeout,
        audit: Some(Entry {
            actor: caller.name.clone(),
            os_user: audit::os_user(),
            action: action.to_owned(),
            arguments,
        }),
    }
}

async fn presets(State(state): Shared, caller: Caller, raw: RawQuery) -> Result<Response, Problem> {
    caller.require(ApiAction::Read)?;
    let q = query_params(&raw)?;
    let client = state.client().await?;
    let rows = status::rows(
        &client,
        q.get("template").map(String::as_str),
        q.get("organization").map(String::as_str),
        &state.rules,
        state.demand_time_unit,
        Utc::now(),
    )
    .await
    .map_err(command_problem)?;
    Ok(Json(rows).into_response())
}

async fn templates(
    State(state): Shared,
    caller: Caller,
    raw: RawQuery,
) -> Result<Response, Problem> {
    caller.require(ApiAction::Read)?;
    let q = query_params(&raw)?;
    let organization = q.get("organization");
    let client = state.client().await?;
    let rows = client
        .query(include_str!("sql/templates.sql"), &[&organization])
        .await
        .map_err(|e| state.database_problem(e))?;
    let rows: Vec<TemplateRow> = rows
        .iter()
        .map(|r| {
            let deprecated: String = r.get("deprecated");
            TemplateRow {
                id: r.get("id"),
                organization: r.get("organization"),
                name: r.get("name"),
                active_version: r.get("active_version"),
                active_version_id: r.get("active_version_id"),
                paused: r.get("paused"),
                deprecated: (!deprecated.is_empty()).then_some(deprecated),
                created_at: r.get("created_at"),
            }
        })
        .collect();
    Ok(Json(rows).into_response())
}

async fn list_jobs(
    State(state): Shared,
    caller: Caller,
    raw: RawQuery,
) -> Result<Response, Problem> {
    caller.require(ApiAction::Read)?;
    let q = query_params(&raw)?;
    let status = q.get("status").map(String::as_str);
    if let Some(s) = status {
        if !jobs::STATUSES.contains(&s) {
            return Err(Problem::bad_request(format!(
                "status '{s}' is not one of {}",
                jobs::STATUSES.join(", ")
            )));
        }
    }
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_JOBS).contains(l))
            .ok_or_else(|| {
                Problem::bad_request(format!("limit '{l}' is not a number from 1 to {MAX_JOBS}"))
            })?,
    };
    let client = state.client().await?;
    let rows = jobs::list_jobs(
        &client,
        status,
        q.get("initiator").map(String::as_str),
        limit,
    )
    .await
    .map_err(|e| state.database_problem(e))?;
    Ok(Json(rows).into_response())
}

/// A JSON body, or the problem axum's rejection describes (status kept: 400, 413, 415, 422).
fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T, Problem> {
    parsed.map(|Json(v)| v).map_err(|r| {
        let status = r.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            StatusCode::UNPROCESSABLE_ENTITY => "invalid_body",
            _ => "bad_request",
        };
        Problem::new(status, code, r.body_text())
    })
}

async fn put_settings(
    State(state): Shared,
    caller: Caller,
    parsed: Result<Json<Settings>, JsonRejection>,
) -> Result<Response, Problem> {
    caller.require(ApiAction::Administer)?;
    let settings = body(parsed)?;
    let paused = settings.reconciliation_paused;
    let action = if paused { "pause" } else { "resume" };
    let ctx = change_ctx(
        &state,
        &caller,
        action,
        json!({"reconciliation_paused": paused}),
    );
    let applied = retry_conflicts(|| {
        apply_change_on(&state.pool, &ctx, async |tx| {
            pause::set_paused(tx, &Scope::Global, paused).await
        })
    })
    .await
    .map_err(command_problem)?;
    Ok(Json(SettingsChanged {
        reconciliation_paused: paused,
        changed: applied.outcome.1,
        reconciles_requested: applied.requested,
    })
    .into_response())
}

async fn invalidate(
    State(state): Shared,
    caller: Caller,
    Path(name): Path<String>,
    raw: RawQuery,
) -> Result<Response, Problem> {
    caller.require(ApiAction::Administer)?;
    storable(&name, "the template name")?;
    let q = query_params(&raw)?;
    let organization = q.get("organization").cloned();
    let ctx = change_ctx(
        &state,
        &caller,
        "template invalidate",
        json!({"name": name, "organization": organization}),
    );
    let applied = retry_conflicts(|| {
        apply_change_on(&state.pool, &ctx, async |tx| {
            invalidate_change(tx, &name, organization.as_deref()).await
        })
    })
    .await
    .map_err(command_problem)?;
    let (template, presets_invalidated) = applied.outcome;
    Ok(Json(Invalidated {
        organization: template.organization_name,
        template: template.name,
        presets_invalidated,
        reconciles_requested: applied.requested,
    })
    .into_response())
}

async fn set_paused(
    state: &AppState,
    caller: &Caller,
    scope: Scope,
    arguments: Value,
    pause: bool,
) -> Result<Response, Problem> {
    let action = if pause { "pause" } else { "resume" };
    let ctx = change_ctx(state, caller, action, arguments);
    let applied = retry_conflicts(|| {
        apply_change_on(&state.pool, &ctx, async |tx| {
            pause::set_paused(tx, &scope, pause).await
        })
    })
    .await
    .map_err(command_problem)?;
    let (scope, changed) = applied.outcome;
    Ok(Json(PauseOutcome {
        scope,
        paused: pause,
        changed,
        reconciles_requested: applied.requested,
    })
    .into_response())
}

async fn pause_template(
    State(state): Shared,
    caller: Caller,
    Path(name): Path<String>,
    raw: RawQuery,
    pause: bool,
) -> Result<Response, Problem> {
    caller.require(ApiAction::Administer)?;
    storable(&name, "the template name")?;
    let organization = query_params(&raw)?.get("organization").cloned();
    let arguments = json!({"template": name, "organization": organization});
    let scope = Scope::Template { name, organization };
    set_paused(&state, &caller, scope, arguments, pause).await
}

async fn pause_preset(
    State(state): Shared,
    caller: Caller,
    Path(id): Path<String>,
    pause: bool,
) -> Result<Response, Problem> {
    caller.require(ApiAction::Administer)?;
    let id = Uuid::parse_str(&id)
        .map_err(|_| Problem::bad_request(format!("'{id}' is not a preset id (a UUID)")))?;
    let arguments = json!({"preset": id});
    set_paused(&state, &caller, Scope::Preset(id), arguments, pause).await
}

/// The HTTP status of a worker's claim reply: answers are 200, refusals say why.
pub fn claim_status(reply: &ClaimReply) -> StatusCode {
    match (reply.outcome, reply.error.as_ref().map(|e| e.code)) {
        (ClaimOutcome::Claimed | ClaimOutcome::NoEligiblePrebuild, _) => StatusCode::OK,
        (ClaimOutcome::Rejected, Some(ClaimErrorCode::Forbidden)) => StatusCode::FORBIDDEN,
        (
            ClaimOutcome::Rejected,
            Some(
                ClaimErrorCode::RequestConflict
                | ClaimErrorCode::NameConflict
                | ClaimErrorCode::PresetInactive,
            ),
        ) => StatusCode::CONFLICT,
        (ClaimOutcome::Rejected, _) => StatusCode::UNPROCESSABLE_ENTITY,
    }
}

async fn claim(
    State(state): Shared,
    caller: Caller,
    headers: HeaderMap,
    parsed: Result<Json<ClaimRequest>, JsonRejection>,
) -> Result<Response, Problem> {
    caller.require(ApiAction::Claim)?;
    let request = body(parsed)?;
    let request_id = match headers.get("idempotency-key") {
        None => Uuid::new_v4(),
        Some(v) => {
            let key = v
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY)
                .ok_or_else(|| {
                    Problem::bad_request(format!(
                        "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
                    ))
                })?;
            request_id_for_key(key)
        }
    };
    let event = CloudEvent::with_id(request_id, EVENT_SOURCE, Utc::now(), request.clone());
    let rpc = state.rpc().await?;
    let reply = match rpc.call::<ClaimRequest, ClaimReply>(&event, state.claim_timeout).await {
        Ok(reply) => reply.data,
        Err(RpcError::Timeout(after)) => {
            return Err(Problem::new(
                StatusCode::GATEWAY_TIMEOUT,
                "claim_timeout",
                format!(
                    "no reply from the workers within {after:?}; the claim may still be made — retry \
                     with the same Idempotency-Key to get its outcome"
                ),
            )
            .with("request_id", request_id.to_string()))
        }
        Err(RpcError::Unroutable) => {
            return Err(Problem::unavailable(
                "the claim request was unroutable: the claims queue is missing (run `prebuildsctl migrate`)",
            ))
        }
        Err(e) => {
            state.rpc_failed(&rpc, &e).await;
            return Err(Problem::unavailable(format!(
                "the broker connection failed ({e}); retry with the same Idempotency-Key"
            ))
            .with("request_id", request_id.to_string()));
        }
    };
    // The claim itself is the worker's transaction (recorded in claim_requests); who asked for it
    // over HTTP is recorded here, after the reply.
    record_claim(&state, &caller, request_id, &request, &reply).await;
    let status = claim_status(&reply);
    let mut response = if status == StatusCode::OK {
        Json(&reply).into_response()
    } else {
        let (code, message) = reply
            .error
            .as_ref()
            .map(|e| (error_code(e.code), e.message.clone()))
            .unwrap_or_else(|| ("rejected".to_owned(), "the claim was rejected".to_owned()));
        Problem::new(status, code, message)
            .with("reply", serde_json::to_value(&reply).unwrap_or(Value::Null))
            .into_response()
    };
    if let Ok(v) = HeaderValue::from_str(&request_id.to_string()) {
        response.headers_mut().insert("x-request-id", v);
    }
    Ok(response)
}

/// The wire name of a claim error code (`request_conflict`, …), as the reply spells it.
fn error_code(code: ClaimErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "rejected".to_owned())
}

async fn record_claim(
    state: &AppState,
    caller: &Caller,
    request_id: Uuid,
    request: &ClaimRequest,
    reply: &ClaimReply,
) {
    let ctx = change_ctx(
        state,
        caller,
        "claim",
        json!({
            "request_id": request_id,
            "user_id": request.user_id,
            // jsonb cannot hold a NUL; a hostile name (which the worker refuses) is kept readable.
            "workspace_name": request.workspace_name.replace('\0', "\u{fffd}"),
            "preset_id": request.preset_id,
            "template_id": request.template_id,
            "outcome": reply.outcome.as_str(),
            "workspace_id": reply.workspace_id,
        }),
    );
    let recorded = async {
        let client = state.pool.get().await?;
        audit::record_standalone(&client, ctx.audit.as_ref().expect("set above")).await?;
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = recorded {
        // The claim is made and its reply must reach the caller; the missing row is logged.
        tracing::error!(error = %format!("{e:#}"), %request_id, actor = %caller.name, "claim made but its audit row could not be written");
    }
}
