//! Decoding of envelopes: what consumers dead-letter and why, and what they tolerate.

use prebuilds_schemas::{
    envelope::{EnvelopeError, MAX_BODY_BYTES},
    messages::{Payload, ReconcilePreset},
    CloudEvent, ProvisionerEvent, RawEvent,
};

fn example_body() -> Vec<u8> {
    let event = CloudEvent::new("test", chrono::Utc::now(), ReconcilePreset::example());
    serde_json::to_vec(&event).unwrap()
}

#[test]
fn round_trips_a_typed_message() {
    let raw = RawEvent::parse(&example_body()).unwrap();
    let decoded: CloudEvent<ReconcilePreset> = raw.decode().unwrap();
    assert_eq!(decoded.data, ReconcilePreset::example());
    assert_eq!(decoded.routing_key(), "reconcile.preset");
}

#[test]
fn rejects_bad_json_bad_envelopes_and_oversized_bodies() {
    assert!(matches!(
        RawEvent::parse(b"{not json"),
        Err(EnvelopeError::NotJson(_))
    ));
    assert!(matches!(
        RawEvent::parse(b"{\"a\":1}"),
        Err(EnvelopeError::BadEnvelope(_))
    ));
    let mut v: serde_json::Value = serde_json::from_slice(&example_body()).unwrap();
    v["specversion"] = "0.3".into();
    let body = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        RawEvent::parse(&body),
        Err(EnvelopeError::SpecVersion(_))
    ));
    v["specversion"] = "1.0".into();
    v["datacontenttype"] = "text/plain".into();
    let body = serde_json::to_vec(&v).unwrap();
    assert!(matches!(
        RawEvent::parse(&body),
        Err(EnvelopeError::ContentType(_))
    ));
    let big = vec![b' '; MAX_BODY_BYTES + 1];
    assert!(matches!(
        RawEvent::parse(&big),
        Err(EnvelopeError::TooLarge { .. })
    ));
}

#[test]
fn rejects_schema_violations_and_wrong_types() {
    let mut v: serde_json::Value = serde_json::from_slice(&example_body()).unwrap();
    v["data"]["reason"] = "because".into();
    let raw = RawEvent::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
    let err = raw.decode::<ReconcilePreset>().unwrap_err();
    assert!(matches!(err, EnvelopeError::Schema { .. }), "{err}");

    let raw = RawEvent::parse(&example_body()).unwrap();
    let err = ProvisionerEvent::decode(raw).unwrap_err();
    assert!(matches!(err, EnvelopeError::UnexpectedType { .. }), "{err}");
}

/// A message of a later version: an added payload field and CloudEvents extension attributes
/// decode to the same value; a missing known field is still a schema violation.
#[test]
fn tolerates_added_fields_and_extension_attributes_but_not_missing_ones() {
    let mut v: serde_json::Value = serde_json::from_slice(&example_body()).unwrap();
    v["data"]["priority"] = 7.into();
    v["subject"] = "preset/0192".into();
    v["dataschema"] = "https://prebuilds.dev/schemas/reconcile.preset.v2.schema.json".into();
    v["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into();
    v["tracestate"] = "vendor=1".into();
    let raw = RawEvent::parse(&serde_json::to_vec(&v).unwrap()).unwrap();
    let decoded: CloudEvent<ReconcilePreset> = raw.decode().unwrap();
    assert_eq!(decoded.data, ReconcilePreset::example());

    let mut missing = v.clone();
    missing["data"].as_object_mut().unwrap().remove("preset_id");
    let raw = RawEvent::parse(&serde_json::to_vec(&missing).unwrap()).unwrap();
    let err = raw.decode::<ReconcilePreset>().unwrap_err();
    assert!(matches!(err, EnvelopeError::Schema { .. }), "{err}");

    let mut no_source = v;
    no_source.as_object_mut().unwrap().remove("source");
    assert!(matches!(
        RawEvent::parse(&serde_json::to_vec(&no_source).unwrap()),
        Err(EnvelopeError::BadEnvelope(_))
    ));
}
