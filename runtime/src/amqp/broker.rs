//! Where the broker is and how to reach it: the one connector every AMQP connection of every binary
//! goes through (consumers, publishers, the outbox relay, the RPC client, the CLI).
//!
//! - `AMQP_URL` may list several nodes of a cluster, separated by commas; a connection attempt
//!   starts at the node after the one used last and tries each once, each bounded by a short
//!   timeout, so a dead or black-holed node costs seconds, not the kernel's TCP timeout.
//! - `amqps://` is always TLS (rustls, `ring`), verified against the system roots plus
//!   `PREBUILDS_AMQP_CA_FILE`, with an optional client certificate for mutual TLS. It never falls
//!   back to plaintext: a peer that does not speak TLS fails the handshake.
//! - No URL is ever printed as written: errors and logs name nodes redacted.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use lapin::{
    tcp::{OwnedIdentity, OwnedTLSConfig},
    uri::{AMQPScheme, AMQPUri},
    Connection, ConnectionProperties,
};

use crate::{redact::redact, tls};

/// How long one node may take to accept a connection (TCP, TLS and the AMQP handshake).
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TLS files for `amqps://` connections (all optional).
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// Extra trusted roots (PEM), on top of the system's.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM), for brokers that require mutual TLS.
    pub client_cert_file: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub client_key_file: Option<PathBuf>,
}

/// The broker nodes and the TLS settings to reach them; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    nodes: Arc<[String]>,
    tls: Arc<OwnedTLSConfig>,
    /// Index of the next node to try first (round robin over reconnects).
    next: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("nodes", &self.redacted())
            .field("client_certificate", &self.tls.identity.is_some())
            .field("extra_roots", &self.tls.cert_chain.is_some())
            .finish()
    }
}

/// Why a URL list or its TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BrokerConfigError(pub String);

impl From<tls::TlsError> for BrokerConfigError {
    fn from(e: tls::TlsError) -> Self {
        BrokerConfigError(e.0)
    }
}

impl Broker {
    /// `urls` (comma-separated) with `files` read and checked now, so a bad path or file fails at
    /// start-up with its name rather than at the first connection.
    pub fn new(urls: &str, files: &TlsFiles) -> Result<Broker, BrokerConfigError> {
        let broker = Broker::from(urls);
        if broker.nodes.is_empty() {
            return Err(BrokerConfigError("AMQP_URL is empty".into()));
        }
        for node in broker.nodes.iter() {
            parse_node(node).map_err(BrokerConfigError)?;
        }
        // Each file is read once: checked here, then handed to lapin as read.
        let mut config = OwnedTLSConfig::default();
        if let Some(path) = &files.ca_file {
            let what = "PREBUILDS_AMQP_CA_FILE";
            let pem = tls::read_pem(path, what)?;
            tls::root_store(
                tls::certificates(&pem, path, what)?,
                &format!("{what} {}", path.display()),
            )?;
            config.cert_chain = Some(String::from_utf8(pem).map_err(|_| {
                BrokerConfigError(format!(
                    "{what} {} is not text (PEM expected)",
                    path.display()
                ))
            })?);
        }
        match (&files.client_cert_file, &files.client_key_file) {
            (Some(cert), Some(key)) => {
                let cert_what = "PREBUILDS_AMQP_CLIENT_CERT_FILE";
                let key_what = "PREBUILDS_AMQP_CLIENT_KEY_FILE";
                let pem = tls::read_pem(cert, cert_what)?;
                let key_pem = tls::read_pem(key, key_what)?;
                tls::certificates(&pem, cert, cert_what)?;
                tls::private_key(&key_pem, key, key_what)?;
                config.identity = Some(OwnedIdentity::PKCS8 { pem, key: key_pem });
            }
            (None, None) => {}
            _ => {
                return Err(BrokerConfigError(
                    "PREBUILDS_AMQP_CLIENT_CERT_FILE and PREBUILDS_AMQP_CLIENT_KEY_FILE must be set together"
                        .into(),
                ))
            }
        }
        Ok(Broker {
            tls: Arc::new(config),
            ..broker
        })
    }

    /// The broker user this process authenticates as: the user of the URLs (lapin's `guest` when a
    /// URL names none). Publishers stamp it as the AMQP `user_id` property, which RabbitMQ checks
    /// against the connection, so consumers with allow-lists can trust it ([`super::trust`]).
    /// `None` when the nodes name different users (then no `user_id` is set: a cluster's nodes
    /// share their users, so list the same one for each).
    pub fn user(&self) -> Option<String> {
        let mut users = self
            .nodes
            .iter()
            .filter_map(|node| parse_node(node).ok())
            .map(|uri| uri.authority.userinfo.username);
        let first = users.next()?;
        users.all(|u| u == first).then_some(first)
    }

    /// The nodes, passwords replaced by `***`.
    pub fn redacted(&self) -> String {
        redact(&self.nodes.join(","))
    }

    /// Opens a connection to the first node that accepts one, trying each node once (starting
    /// after the one used last). `name` shows in the management UI.
    pub async fn connect(&self, name: &str) -> Result<Connection, lapin::Error> {
        let count = self.nodes.len().max(1);
        let first = self.next.fetch_add(1, Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for offset in 0..count {
            let index = (first + offset) % count;
            let node = &self.nodes[index];
            match self.connect_node(node, name).await {
                Ok(connection) => {
                    // The next reconnect starts here again: this node was good a moment ago.
                    self.next.store(index, Ordering::Relaxed);
                    return Ok(connection);
                }
                Err(e) => {
                    tracing::debug!(node = %redact(node), error = %e, "broker node unreachable");
                    failures.push(format!("{}: {e}", redact(node)));
                }
            }
        }
        Err(io_error(
            std::io::ErrorKind::ConnectionRefused,
            if failures.len() == 1 {
                failures.remove(0)
            } else {
                format!("no broker node reachable ({})", failures.join("; "))
            },
        ))
    }

    async fn connect_node(&self, node: &str, name: &str) -> Result<Connection, lapin::Error> {
        let uri = parse_node(node).map_err(|e| io_error(std::io::ErrorKind::InvalidInput, e))?;
        let tls_scheme = uri.scheme == AMQPScheme::AMQPS;
        let props = ConnectionProperties::default().with_connection_name(name.to_owned().into());
        let runtime = lapin::runtime::default_runtime()?;
        // lapin asks rustls for the process's default provider: make sure it is ours (ring).
        tls::provider();
        let attempt = Connection::connect_uri_with_config(uri, props, (*self.tls).clone(), runtime);
        match tokio::time::timeout(NODE_CONNECT_TIMEOUT, attempt).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) if tls_scheme && matches!(e.kind(), lapin::ErrorKind::IOError(_)) => {
                Err(io_error(
                    std::io::ErrorKind::Other,
                    format!(
                    "{e} (amqps:// is TLS only and never falls back to plaintext: check that this \
                     port speaks TLS and that its certificate is trusted — system roots plus \
                     PREBUILDS_AMQP_CA_FILE)"
                ),
                ))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(io_error(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {NODE_CONNECT_TIMEOUT:?}"),
            )),
        }
    }
}

/// A URL list as written; TLS files default to none (system roots only). For tests and tools: the
/// binaries build theirs with [`Broker::new`] from the configuration.
impl From<&str> for Broker {
    fn from(urls: &str) -> Broker {
        let nodes: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Broker {
            nodes: nodes.into(),
            tls: Arc::new(OwnedTLSConfig::default()),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl From<&String> for Broker {
    fn from(urls: &String) -> Broker {
        Broker::from(urls.as_str())
    }
}

impl From<String> for Broker {
    fn from(urls: String) -> Broker {
        Broker::from(urls.as_str())
    }
}

impl From<&Broker> for Broker {
    fn from(broker: &Broker) -> Broker {
        broker.clone()
    }
}

/// One node's URL, parsed; the error names the node redacted (lapin's own parse error would quote
/// the URL, password included).
fn parse_node(node: &str) -> Result<AMQPUri, String> {
    node.parse::<AMQPUri>().map_err(|e| {
        // lapin's message may quote the URL (and its password): keep only messages that don't.
        let reason = if e.contains("://") || e.contains('@') {
            "not a valid URL".to_owned()
        } else {
            e
        };
        format!(
            "AMQP_URL entry {} is not an AMQP URL ({reason}); write amqp://user:password@host:5672/vhost \
             or amqps://… for TLS",
            redact(node)
        )
    })
}

fn io_error(kind: std::io::ErrorKind, message: String) -> lapin::Error {
    lapin::Error::from(lapin::ErrorKind::IOError(Arc::new(std::io::Error::new(
        kind, message,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_is_the_urls_user() {
        assert_eq!(
            Broker::from("amqp://claims:x@n1/%2f,amqp://claims:y@n2/%2f").user(),
            Some("claims".to_owned())
        );
        assert_eq!(
            Broker::from("amqp://n1/%2f").user(),
            Some("guest".to_owned())
        );
        assert_eq!(
            Broker::from("amqp://a:x@n1/%2f,amqp://b:y@n2/%2f").user(),
            None
        );
    }

    #[test]
    fn url_lists_split_on_commas() {
        let broker = Broker::from(" amqp://a:x@n1/%2f, amqps://a:y@n2/%2f ,");
        assert_eq!(broker.nodes.len(), 2);
        assert_eq!(
            broker.redacted(),
            "amqp://a:***@n1/%2f,amqps://a:***@n2/%2f"
        );
        assert!(!format!("{broker:?}").contains(":x@"));
    }

    #[test]
    fn bad_entries_are_refused_without_their_password() {
        let err =
            Broker::new("amqp://u:pw1@h/%2f,http://u:pw2@h", &TlsFiles::default()).unwrap_err();
        assert!(err.0.contains("http://u:***@h"), "{err}");
        assert!(!err.0.contains("pw2"), "{err}");
        assert!(Broker::new("", &TlsFiles::default()).is_err());
    }

    #[test]
    fn tls_files_are_checked_at_start() {
        let missing = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let err = Broker::new("amqps://h/%2f", &missing).unwrap_err();
        assert!(
            err.0.contains("PREBUILDS_AMQP_CA_FILE /nonexistent/ca.pem"),
            "{err}"
        );
        let half = TlsFiles {
            client_cert_file: Some("/c.pem".into()),
            ..TlsFiles::default()
        };
        assert!(Broker::new("amqps://h/%2f", &half)
            .unwrap_err()
            .0
            .contains("together"));
    }
}
