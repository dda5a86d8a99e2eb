//! The OpenAPI 3.1 document of the API, generated from [`crate::routes::endpoints`] (paths,
//! parameters, roles, statuses) and the Rust types of bodies and answers (JSON Schema 2020-12 by
//! `schemars`, which is OpenAPI 3.1's schema dialect). Served at `GET /openapi.json` and checked in
//! as `schemas/openapi.json` (a test keeps the two equal: `UPDATE_SCHEMAS=1` rewrites the file).

use axum::http::StatusCode;
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use crate::routes::{endpoints, In};

/// The problem details schema (RFC 9457, with our `code`).
fn problem_schema() -> Value {
    json!({
        "type": "object",
        "description": "An RFC 9457 problem: `code` is stable, for programs; `detail` is for people.",
        "required": ["type", "title", "status", "detail", "code"],
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
            "code": {"type": "string"},
            "request_id": {"type": "string", "description": "The claim's request id (retry with it as Idempotency-Key)."},
            "reply": {"description": "A refused claim: the worker's reply."}
        }
    })
}

fn problem_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
    })
}

fn describe(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "The request is malformed (a parameter, header or body).",
        StatusCode::UNAUTHORIZED => "No token, or an unknown or revoked one.",
        StatusCode::FORBIDDEN => "The token's role may not do this (or, for a claim, the user may not claim here).",
        StatusCode::NOT_FOUND => "The named template or preset does not exist.",
        StatusCode::CONFLICT => "The current state does not allow this (see `code`).",
        StatusCode::PAYLOAD_TOO_LARGE => "The body is larger than PREBUILDS_API_MAX_BODY_BYTES.",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "The body is not `application/json`.",
        StatusCode::UNPROCESSABLE_ENTITY => "The body does not fit the schema, or the claim was refused as invalid.",
        StatusCode::INTERNAL_SERVER_ERROR => "A deployment error (e.g. `missing_grant`: the API's database role lacks a privilege) or a bug; the API's log has the details.",
        StatusCode::SERVICE_UNAVAILABLE => "The database or broker is unreachable, a lock was not free, or the request took too long.",
        StatusCode::GATEWAY_TIMEOUT => "No claim reply in time: retry with the same Idempotency-Key.",
        _ => "Error.",
    }
}

/// The whole document.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut generator = settings.into_generator();
    let mut paths: Map<String, Value> = Map::new();
    for e in endpoints() {
        let parameters: Vec<Value> = e
            .params
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "in": match p.at { In::Path => "path", In::Query => "query", In::Header => "header" },
                    "required": p.required,
                    "description": p.description,
                    "schema": p.schema,
                })
            })
            .collect();
        let mut responses = Map::new();
        let (ok_status, ok_schema) = e.ok;
        responses.insert(
            ok_status.as_u16().to_string(),
            json!({
                "description": "Success.",
                "content": {"application/json": {"schema": ok_schema(&mut generator)}}
            }),
        );
        let mut errors = e.errors.clone();
        if e.action.is_some() {
            errors.extend([
                StatusCode::UNAUTHORIZED,
                StatusCode::FORBIDDEN,
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::SERVICE_UNAVAILABLE,
            ]);
        }
        errors.sort();
        errors.dedup();
        for status in errors {
            responses.insert(
                status.as_u16().to_string(),
                problem_response(describe(status)),
            );
        }
        let mut operation = json!({
            "operationId": e.operation_id,
            "summary": e.summary,
            "description": e.description,
            "parameters": parameters,
            "responses": responses,
        });
        if let Some(body) = e.body {
            operation["requestBody"] = json!({
                "required": true,
                "content": {"application/json": {"schema": body(&mut generator)}}
            });
        }
        if e.action.is_none() {
            // An empty requirement list: this operation needs no token.
            operation["security"] = json!([]);
        }
        let method = e.method.as_str().to_ascii_lowercase();
        paths
            .entry(e.path)
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("an object")
            .insert(method, operation);
    }
    let mut schemas = generator.take_definitions(true);
    schemas.insert("Problem".to_owned(), problem_schema());
    // A stable order, so the checked-in file only changes when the API does.
    let schemas: Map<String, Value> = {
        let mut sorted: Vec<(String, Value)> = schemas.into_iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted.into_iter().collect()
    };
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "prebuilds API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Warm pools of prebuilt workspaces: claims, pools, templates, jobs, pause and \
                invalidate. Tokens are made with `prebuildsctl token create --name N --role admin|claimer|viewer`; \
                errors are RFC 9457 problem details."
        },
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "security": [{"bearer": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "A token from `prebuildsctl token create`."}
            },
            "schemas": schemas
        }
    })
}
