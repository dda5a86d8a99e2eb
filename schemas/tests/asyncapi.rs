//! The AsyncAPI document names every queue, routing key, message type and schema file that the
//! code defines, so the document cannot silently drift from the contract.

use prebuilds_schemas::json_schema;

fn document() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/asyncapi.yaml")).unwrap()
}

#[test]
fn every_message_type_and_schema_file_is_documented() {
    let doc = document();
    for entry in json_schema::all() {
        let title = entry.schema["title"].as_str().unwrap();
        assert!(
            doc.contains(title),
            "asyncapi.yaml does not mention {title}"
        );
        assert!(
            doc.contains(&format!("./json/{}", entry.file_name)),
            "asyncapi.yaml does not reference {}",
            entry.file_name
        );
    }
}

/// Queues and binding keys are checked against the topology itself in
/// `runtime/tests/asyncapi_topology.rs`; these are the conventions around them.
#[test]
fn dead_lettering_conventions_are_documented() {
    let doc = document();
    for key in [
        "x-delivery-limit: 5",
        "{prefix}.dlx",
        "x-prebuilds-dead-reason",
        "Tolerant reader",
        "traceparent",
    ] {
        assert!(doc.contains(key), "{key} missing");
    }
}
