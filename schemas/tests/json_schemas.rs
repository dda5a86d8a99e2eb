//! The checked-in JSON Schemas equal the ones generated from the Rust types, every example message
//! validates against its schema, and the schemas reject what the decoder rejects.
//!
//! To regenerate after changing a message type: `UPDATE_SCHEMAS=1 cargo test -p prebuilds-schemas`.

use std::path::PathBuf;

use prebuilds_schemas::json_schema;

fn json_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json")
}

#[test]
fn checked_in_schemas_match_the_types() {
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some();
    let mut drifted = Vec::new();
    for entry in json_schema::all() {
        let path = json_dir().join(&entry.file_name);
        let generated = serde_json::to_string_pretty(&entry.schema).unwrap() + "\n";
        if update {
            std::fs::write(&path, &generated).unwrap();
            continue;
        }
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        if on_disk != generated {
            drifted.push(entry.file_name);
        }
    }
    assert!(
        drifted.is_empty(),
        "schemas/json is out of date for {drifted:?}; run UPDATE_SCHEMAS=1 cargo test -p prebuilds-schemas"
    );
}

#[test]
fn no_stale_schema_files() {
    let expected: Vec<String> = json_schema::all()
        .into_iter()
        .map(|e| e.file_name)
        .collect();
    for file in std::fs::read_dir(json_dir()).unwrap() {
        let name = file.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            expected.contains(&name),
            "stale schema file schemas/json/{name}"
        );
    }
}

#[test]
fn every_example_validates_against_its_schema() {
    for entry in json_schema::all() {
        let validator = jsonschema::validator_for(&entry.schema)
            .unwrap_or_else(|e| panic!("{} is not a valid schema: {e}", entry.file_name));
        let errors: Vec<String> = validator
            .iter_errors(&entry.example)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", entry.file_name);
    }
}

/// The schemas refuse what the decoder refuses (a wrong type, a missing known field) and accept
/// what it accepts: fields a newer producer added and CloudEvents extension attributes.
#[test]
fn schemas_reject_wrong_type_and_missing_fields_and_accept_additions() {
    for entry in json_schema::all() {
        let validator = jsonschema::validator_for(&entry.schema).unwrap();
        let mut wrong_type = entry.example.clone();
        wrong_type["type"] = "prebuilds.something.else.v1".into();
        assert!(
            !validator.is_valid(&wrong_type),
            "{} accepted a wrong type",
            entry.file_name
        );

        let mut missing = entry.example.clone();
        missing.as_object_mut().unwrap().remove("id");
        assert!(
            !validator.is_valid(&missing),
            "{} accepted a missing id",
            entry.file_name
        );

        let mut newer = entry.example.clone();
        newer["data"]["added_in_a_later_version"] = serde_json::json!({"any": ["shape"]});
        newer["subject"] = "workspace/42".into();
        newer["dataschema"] = "https://prebuilds.dev/schemas/x.schema.json".into();
        newer["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into();
        let errors: Vec<String> = validator
            .iter_errors(&newer)
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "{} refused an added field or extension attribute: {errors:?}",
            entry.file_name
        );
    }
}

/// A miss says why (`reason`, and with `no_matching_preset` the presets tried); replies stored
/// before the field existed still decode, and the schema refuses a reason it does not know.
#[test]
fn claim_replies_carry_a_miss_reason_and_old_replies_still_decode() {
    use prebuilds_schemas::{ClaimReply, MissReason};
    let entry = json_schema::all()
        .into_iter()
        .find(|e| e.file_name == "claim.reply.v1.schema.json")
        .unwrap();
    let validator = jsonschema::validator_for(&entry.schema).unwrap();
    let miss = serde_json::json!({
        "outcome": "no_eligible_prebuild", "workspace_id": null, "build_id": null,
        "job_id": null, "preset_id": null, "error": null, "reason": "no_matching_preset",
        "presets": [{"preset_id": "0192f1a4-0000-4000-8000-000000000001", "name": "large",
                     "parameters": [{"name": "cpus", "value": "8"}]}]
    });
    let mut event = entry.example.clone();
    event["data"] = miss.clone();
    assert!(validator.is_valid(&event), "{event}");
    let reply: ClaimReply = serde_json::from_value(miss).unwrap();
    assert_eq!(reply.reason, Some(MissReason::NoMatchingPreset));
    assert_eq!(reply.presets[0].parameters[0].value, "8");

    event["data"]["reason"] = "bad_luck".into();
    assert!(!validator.is_valid(&event), "an unknown reason is refused");

    let old = serde_json::json!({
        "outcome": "no_eligible_prebuild", "workspace_id": null, "build_id": null,
        "job_id": null, "preset_id": null, "error": null
    });
    let reply: ClaimReply = serde_json::from_value(old).unwrap();
    assert_eq!((reply.reason, reply.presets.len()), (None, 0));
    // A reply without a reason leaves the fields out rather than writing nulls.
    let written = serde_json::to_value(&reply).unwrap();
    assert!(written.get("reason").is_none() && written.get("presets").is_none());
}

/// No object anywhere in a message (nested ones included: parameters, agents, replacements) is
/// closed to additions, so the tolerant reader holds at every depth.
#[test]
fn no_schema_closes_an_object_to_additions() {
    fn closed(value: &serde_json::Value, path: &str, found: &mut Vec<String>) {
        match value {
            serde_json::Value::Object(map) => {
                if map.get("additionalProperties") == Some(&serde_json::Value::Bool(false)) {
                    found.push(path.to_owned());
                }
                for (key, child) in map {
                    closed(child, &format!("{path}/{key}"), found);
                }
            }
            serde_json::Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    closed(child, &format!("{path}/{i}"), found);
                }
            }
            _ => {}
        }
    }
    for entry in json_schema::all() {
        let mut found = Vec::new();
        closed(&entry.schema, "", &mut found);
        assert!(found.is_empty(), "{} closes {found:?}", entry.file_name);
    }
}
