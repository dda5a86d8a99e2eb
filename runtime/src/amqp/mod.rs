//! RabbitMQ plumbing: the topology declared from one definition ([`topology`]), a confirming
//! publisher that reports unroutable messages ([`publisher`]), and the consumer supervisor that
//! survives broker restarts and settles every delivery exactly once ([`consumer`]).

pub mod consumer;
pub mod publisher;
pub mod rpc;
pub mod topology;

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

pub use consumer::{ConsumerSpec, Handler, HandlerError};
pub use publisher::{PublishError, Publisher};
pub use topology::{QueueKind, Topology};

/// Opens a connection with a name the management UI shows, bounded in time.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
    match tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props)).await {
        Ok(result) => result,
        Err(_) => Err(lapin::Error::from(lapin::ErrorKind::IOError(
            std::sync::Arc::new(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connecting to RabbitMQ timed out",
            )),
        ))),
    }
}
