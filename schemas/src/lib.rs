//! Contracts of the prebuilds service: the database migrations (`schemas/migrations`) and the
//! messages that travel over RabbitMQ (docs/messages.md), each a CloudEvents 1.0 envelope around a typed
//! payload. The JSON Schema files in `schemas/json` and the AsyncAPI document are generated from, or
//! checked against, the types here.

pub mod column;
pub mod envelope;
pub mod json_schema;
pub mod locks;
pub mod messages;
pub mod migrations;
pub mod plan;

pub use envelope::{CloudEvent, EnvelopeError, RawEvent};
pub use messages::*;

/// The fixed id of the prebuilds system user (Coder's id): every prebuild is owned by it.
pub const PREBUILDS_USER_ID: uuid::Uuid = uuid::uuid!("c42fdf75-3097-471c-8c33-fb52454d81c0");
/// Coder's "Prebuilt Workspace Resource Replaced" notification template.
pub const RESOURCE_REPLACED_TEMPLATE_ID: uuid::Uuid =
    uuid::uuid!("89d9745a-816e-4695-a17f-3d0a229e2b8d");
