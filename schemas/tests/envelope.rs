//! Strict decoding of envelopes: what consumers dead-letter and why.

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
