//! The checked-in OpenAPI document (`schemas/openapi.json`) is the one the API serves: generated
//! from the code, kept equal by this test (`UPDATE_SCHEMAS=1 cargo nextest run --workspace -E
//! 'binary(openapi)'` rewrites it after a change to the API).

use std::path::PathBuf;

fn checked_in() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/openapi.json")
}

#[test]
fn the_checked_in_document_is_the_generated_one() {
    let generated =
        serde_json::to_string_pretty(&prebuilds_api::openapi::document()).unwrap() + "\n";
    let path = checked_in();
    if std::env::var_os("UPDATE_SCHEMAS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let stored = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        stored == generated,
        "schemas/openapi.json differs from what the API serves; run \
         `UPDATE_SCHEMAS=1 cargo nextest run --workspace -E 'binary(openapi)'` and commit the result"
    );
}

#[test]
fn every_operation_is_documented_completely() {
    let doc = prebuilds_api::openapi::document();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    for required in [
        "/openapi.json",
        "/api/v1/claims",
        "/api/v1/presets",
        "/api/v1/templates",
        "/api/v1/jobs",
        "/api/v1/settings",
        "/api/v1/templates/{name}/prebuilds/invalidate",
        "/api/v1/templates/{name}/pause",
        "/api/v1/templates/{name}/resume",
        "/api/v1/presets/{id}/pause",
        "/api/v1/presets/{id}/resume",
    ] {
        assert!(paths.contains_key(required), "{required} is missing");
    }
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            assert!(responses.contains_key("200"), "{method} {path}");
            if path.starts_with("/api/") {
                for status in ["401", "403"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path} lacks {status}"
                    );
                }
            }
            // Every reference resolves.
            let text = op.to_string();
            for reference in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
                let name = reference.split('"').next().unwrap();
                assert!(
                    schemas.contains_key(name),
                    "{method} {path}: unknown schema {name}"
                );
            }
        }
    }
}
