//! JSON Schema generation for every message: the schema of the whole CloudEvents envelope with the
//! payload's type, and the `type` attribute pinned to its one value. The checked-in files under
//! `schemas/json` are these, pretty-printed; a test fails when they drift.

use schemars::{generate::SchemaSettings, JsonSchema};
use serde_json::Value;

use crate::{envelope::CloudEvent, messages::*};

/// The schema of `CloudEvent<T>` as a JSON value.
pub fn envelope_schema<T: Payload + JsonSchema>() -> Value {
    let generator = SchemaSettings::draft2020_12().into_generator();
    let schema = generator.into_root_schema_for::<CloudEvent<T>>();
    let mut value = serde_json::to_value(&schema).expect("a generated schema serialises");
    if let Some(object) = value.as_object_mut() {
        object.insert("title".into(), Value::String(T::TYPE.to_owned()));
        object.insert(
            "$id".into(),
            Value::String(format!(
                "https://prebuilds.dev/schemas/{}.schema.json",
                T::SCHEMA_NAME
            )),
        );
        if let Some(props) = object.get_mut("properties").and_then(Value::as_object_mut) {
            props.insert("type".into(), serde_json::json!({ "const": T::TYPE }));
            props.insert("specversion".into(), serde_json::json!({ "const": "1.0" }));
            props.insert(
                "datacontenttype".into(),
                serde_json::json!({ "const": "application/json" }),
            );
        }
    }
    value
}

/// One generated schema and the example message that must validate against it.
#[derive(Debug)]
pub struct MessageSchema {
    pub file_name: String,
    pub schema: Value,
    pub example: Value,
}

fn entry<T: Payload + JsonSchema>() -> MessageSchema {
    let example = CloudEvent::with_id(
        uuid::Uuid::from_u128(0x0192_0000_0000_4000_8000_0000_0000_00ff),
        "prebuilds-example",
        chrono::DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z")
            .expect("constant timestamp is valid RFC 3339")
            .with_timezone(&chrono::Utc),
        T::example(),
    );
    MessageSchema {
        file_name: format!("{}.schema.json", T::SCHEMA_NAME),
        schema: envelope_schema::<T>(),
        example: example.to_json(),
    }
}

/// Every message of docs/messages.md.
pub fn all() -> Vec<MessageSchema> {
    vec![
        entry::<ReconcilePreset>(),
        entry::<ProvisionerJob>(),
        entry::<JobStarted>(),
        entry::<PlanResult>(),
        entry::<JobCompleted>(),
        entry::<AgentLifecycle>(),
        entry::<JobLog>(),
        entry::<ClaimRequest>(),
        entry::<ClaimReply>(),
        entry::<Notification>(),
    ]
}
