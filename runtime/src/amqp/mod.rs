//! RabbitMQ plumbing: the one connector ([`broker`]: node lists, TLS), the topology declared or
//! checked from one definition ([`topology`]), a confirming
//! publisher that reports unroutable messages ([`publisher`]), and the consumer supervisor that
//! survives broker restarts and settles every delivery exactly once ([`consumer`]); publisher
//! allow-lists on the broker's validated `user_id` ([`trust`]).

pub mod broker;
pub mod consumer;
pub mod publisher;
pub mod rpc;
pub mod topology;
pub mod trust;

use lapin::Connection;

pub use broker::{Broker, TlsFiles};
pub use consumer::{ConsumerSpec, Handler, HandlerError};
pub use publisher::{PublishError, Publisher};
pub use topology::{Entity, QueueKind, Topology, TopologyError, TopologyMode};
pub use trust::Publishers;

/// Opens a connection to `broker` (see [`Broker::connect`]) with a name the management UI shows.
pub async fn connect(broker: impl Into<Broker>, name: &str) -> Result<Connection, lapin::Error> {
    broker.into().connect(name).await
}
