//! The CloudEvents 1.0 structured-mode envelope every message body uses, and the decoding consumers
//! apply before they touch a payload (a failure here is permanent: dead-letter it).
//!
//! The reader is tolerant: CloudEvents extension attributes (`subject`, `dataschema`,
//! `traceparent`, anything a newer producer or a tracing proxy adds) are accepted and ignored;
//! only a missing or invalid required attribute refuses the body.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use uuid::Uuid;

use crate::messages::Payload;

pub const SPEC_VERSION: &str = "1.0";
pub const CONTENT_TYPE: &str = "application/json";

/// A CloudEvents 1.0 envelope (structured mode) around a typed payload. Attributes not named here
/// are accepted on input and not kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEvent<T> {
    /// Always `1.0`.
    pub specversion: String,
    /// Unique per message; consumers use it as the idempotency key.
    pub id: Uuid,
    /// URI-reference naming the producer, e.g. `prebuilds-worker/<host>`.
    pub source: String,
    /// `prebuilds.<...>.v1`, one per payload type.
    #[serde(rename = "type")]
    pub event_type: String,
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    pub datacontenttype: String,
    pub data: T,
}

impl<T: Payload> CloudEvent<T> {
    /// A new envelope with a random id.
    pub fn new(source: impl Into<String>, time: DateTime<Utc>, data: T) -> Self {
        Self::with_id(Uuid::new_v4(), source, time, data)
    }

    /// A new envelope with a caller-chosen id (deterministic ids make re-publication deduplicable).
    pub fn with_id(id: Uuid, source: impl Into<String>, time: DateTime<Utc>, data: T) -> Self {
        CloudEvent {
            specversion: SPEC_VERSION.to_owned(),
            id,
            source: source.into(),
            event_type: T::TYPE.to_owned(),
            time,
            datacontenttype: CONTENT_TYPE.to_owned(),
            data,
        }
    }

    /// The AMQP routing key this message is published with.
    pub fn routing_key(&self) -> String {
        self.data.routing_key()
    }

    /// The payload alone as JSON (stored beside the envelope, e.g. as a job's input).
    pub fn data_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.data).expect("message types serialise to JSON")
    }

    pub fn to_json(&self) -> serde_json::Value {
        // Serialising plain data structs to a Value cannot fail (no maps with non-string keys).
        serde_json::to_value(self).expect("message types serialise to JSON")
    }
}

/// Why a body was refused. Every variant is permanent: the message is dead-lettered with this text.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("body is not valid JSON: {0}")]
    NotJson(serde_json::Error),
    #[error("body is not a CloudEvents 1.0 envelope: {0}")]
    BadEnvelope(serde_json::Error),
    #[error("unsupported specversion {0:?} (expected \"1.0\")")]
    SpecVersion(String),
    #[error("unsupported datacontenttype {0:?} (expected \"application/json\")")]
    ContentType(String),
    #[error("unexpected message type {found:?} (this queue takes {expected})")]
    UnexpectedType { found: String, expected: String },
    #[error("data of {event_type} violates its schema: {source}")]
    Schema {
        event_type: String,
        source: serde_json::Error,
    },
    #[error("body is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
}

/// An envelope whose payload is not decoded yet: consumers dispatch on `event_type` first.
pub type RawEvent = CloudEvent<serde_json::Value>;

/// Largest body any consumer accepts; larger ones are dead-lettered unparsed.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

impl RawEvent {
    /// Parses and checks the envelope (spec version, content type); the payload stays raw.
    pub fn parse(body: &[u8]) -> Result<RawEvent, EnvelopeError> {
        if body.len() > MAX_BODY_BYTES {
            return Err(EnvelopeError::TooLarge {
                size: body.len(),
                limit: MAX_BODY_BYTES,
            });
        }
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(EnvelopeError::NotJson)?;
        let raw: RawEvent = serde_json::from_value(value).map_err(EnvelopeError::BadEnvelope)?;
        if raw.specversion != SPEC_VERSION {
            return Err(EnvelopeError::SpecVersion(raw.specversion));
        }
        if raw.datacontenttype != CONTENT_TYPE {
            return Err(EnvelopeError::ContentType(raw.datacontenttype));
        }
        Ok(raw)
    }

    /// Decodes the payload as `T`, refusing any other type or a payload that violates `T`'s schema.
    pub fn decode<T: Payload + DeserializeOwned>(self) -> Result<CloudEvent<T>, EnvelopeError> {
        if self.event_type != T::TYPE {
            return Err(EnvelopeError::UnexpectedType {
                found: self.event_type,
                expected: T::TYPE.to_owned(),
            });
        }
        let data: T =
            serde_json::from_value(self.data).map_err(|source| EnvelopeError::Schema {
                event_type: self.event_type.clone(),
                source,
            })?;
        Ok(CloudEvent {
            specversion: self.specversion,
            id: self.id,
            source: self.source,
            event_type: self.event_type,
            time: self.time,
            datacontenttype: self.datacontenttype,
            data,
        })
    }
}
