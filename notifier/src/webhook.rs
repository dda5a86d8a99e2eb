//! The webhook channel: one HTTP/1.1 POST of the notification as JSON per delivery, over a
//! connection of its own (rustls with ring for `https://`), signed with HMAC-SHA256 when a secret
//! is configured. Redirects are not followed and no proxy is used: the URL is the receiver.
//!
//! Headers of every request (README "Notifications" shows how to verify the signature):
//!
//! | header | value |
//! |---|---|
//! | `Content-Type` | `application/json` |
//! | `X-Prebuilds-Delivery` | the delivery's id: the same on every attempt, for receivers that deduplicate |
//! | `X-Prebuilds-Notification` | the notification's id |
//! | `X-Prebuilds-Timestamp` | Unix seconds when the attempt was signed |
//! | `X-Prebuilds-Signature` | `sha256=` + hex HMAC-SHA256 of `<timestamp>.<body>` with the secret (only with a secret) |
//!
//! A 2xx answer is a delivery; 5xx, a timeout or a connection failure is retried; any other
//! status (4xx, 3xx) is refused for good.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{
    header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, USER_AGENT},
    Request,
};
use hyper_util::rt::TokioIo;
use prebuilds_runtime::config::{ConfigError, Secret};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use url::{Position, Url};
use uuid::Uuid;

use crate::Failure;

/// Header carrying the delivery id (stable across attempts).
pub const DELIVERY_HEADER: &str = "x-prebuilds-delivery";
/// Header carrying the notification id.
pub const NOTIFICATION_HEADER: &str = "x-prebuilds-notification";
/// Header carrying the signing time (Unix seconds).
pub const TIMESTAMP_HEADER: &str = "x-prebuilds-timestamp";
/// Header carrying `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub const SIGNATURE_HEADER: &str = "x-prebuilds-signature";

/// Most of an error answer's body quoted in the delivery's error.
const QUOTED_BODY: usize = 200;

/// Where webhook deliveries go. `Debug` shows the origin only: a path or query may carry a token.
#[derive(Clone)]
pub struct WebhookTarget {
    url: Url,
    origin: String,
    secret: Option<Secret>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl fmt::Debug for WebhookTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookTarget")
            .field("origin", &self.origin)
            .field("signed", &self.secret.is_some())
            .finish()
    }
}

impl WebhookTarget {
    /// Checks `url` (http or https, with a host) and builds the TLS settings for https.
    pub fn new(
        url: &str,
        secret: Option<Secret>,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, ConfigError> {
        let parsed = Url::parse(url).map_err(|e| {
            ConfigError(format!(
                "PREBUILDS_NOTIFY_WEBHOOK_URL is not a URL ({e}); write it like https://hooks.example.com/prebuilds"
            ))
        })?;
        let https = match parsed.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(ConfigError(format!(
                    "PREBUILDS_NOTIFY_WEBHOOK_URL has scheme '{other}'; use http:// or https://"
                )))
            }
        };
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(ConfigError(
                "PREBUILDS_NOTIFY_WEBHOOK_URL names no host".into(),
            ));
        }
        let tls = if https {
            Some(Arc::new(
                crate::tls::client_config(extra_roots).map_err(|e| ConfigError(e.0))?,
            ))
        } else {
            None
        };
        let origin = parsed.origin().ascii_serialization();
        Ok(WebhookTarget {
            url: parsed,
            origin,
            secret,
            tls,
        })
    }

    /// What deliveries record as the recipient: `scheme://host:port`, never the path or query.
    pub fn recipient(&self) -> &str {
        &self.origin
    }

    /// POSTs `body` once, within `timeout`.
    pub async fn post(
        &self,
        body: Vec<u8>,
        delivery_id: Uuid,
        notification_id: Uuid,
        timeout: Duration,
    ) -> Result<(), Failure> {
        match tokio::time::timeout(timeout, self.exchange(body, delivery_id, notification_id)).await
        {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::Retryable(format!(
                "{} gave no answer within {}",
                self.origin,
                humanize(timeout)
            ))),
        }
    }

    async fn exchange(
        &self,
        body: Vec<u8>,
        delivery_id: Uuid,
        notification_id: Uuid,
    ) -> Result<(), Failure> {
        let host = self.url.host_str().unwrap_or_default().to_owned();
        // `host_str` keeps an IPv6 literal's brackets, which a socket address must not have.
        let connect_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = self.url.port_or_known_default().unwrap_or(80);
        let tcp = tokio::net::TcpStream::connect((connect_host.as_str(), port))
            .await
            .map_err(|e| {
                Failure::Retryable(format!("cannot connect to webhook {}: {e}", self.origin))
            })?;
        let _ = tcp.set_nodelay(true);
        let request = self.request(body, delivery_id, notification_id)?;
        match &self.tls {
            None => self.send(tcp, request).await,
            Some(config) => {
                let name = ServerName::try_from(connect_host).map_err(|e| {
                    Failure::Permanent(format!("webhook host {host} is not a TLS server name: {e}"))
                })?;
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| {
                        Failure::Retryable(format!("TLS with webhook {} failed: {e}", self.origin))
                    })?;
                self.send(stream, request).await
            }
        }
    }

    fn request(
        &self,
        body: Vec<u8>,
        delivery_id: Uuid,
        notification_id: Uuid,
    ) -> Result<Request<Full<Bytes>>, Failure> {
        let host_header = &self.url[Position::BeforeHost..Position::AfterPort];
        let target = &self.url[Position::BeforePath..Position::AfterQuery];
        let mut builder = Request::post(if target.is_empty() { "/" } else { target })
            .header(HOST, host_header)
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len())
            .header(
                USER_AGENT,
                concat!("prebuilds-notifier/", env!("CARGO_PKG_VERSION")),
            )
            .header(DELIVERY_HEADER, delivery_id.to_string())
            .header(NOTIFICATION_HEADER, notification_id.to_string());
        if !self.url.username().is_empty() {
            let credentials = format!(
                "{}:{}",
                percent_decode(self.url.username()),
                percent_decode(self.url.password().unwrap_or(""))
            );
            builder = builder.header(
                AUTHORIZATION,
                format!(
                    "Basic {}",
                    data_encoding::BASE64.encode(credentials.as_bytes())
                ),
            );
        }
        if let Some(secret) = &self.secret {
            let timestamp = chrono::Utc::now().timestamp();
            builder = builder
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(
                    SIGNATURE_HEADER,
                    signature(secret.expose().as_bytes(), timestamp, &body),
                );
        }
        builder
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failure::Permanent(format!("cannot build the webhook request: {e}")))
    }

    async fn send<S>(&self, io: S, request: Request<Full<Bytes>>) -> Result<(), Failure>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let lost = |e: hyper::Error| {
            Failure::Retryable(format!("webhook {} connection failed: {e}", self.origin))
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(lost)?;
        // The connection is driven on its own task for this one request, and ends with it.
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let outcome = async {
            let response = sender.send_request(request).await.map_err(lost)?;
            let status = response.status();
            let quoted = match Limited::new(response.into_body(), 16 * 1024)
                .collect()
                .await
            {
                Ok(body) => quote(&body.to_bytes()),
                Err(_) => String::new(),
            };
            let answered = format!(
                "{} answered {status}{}",
                self.origin,
                if quoted.is_empty() {
                    String::new()
                } else {
                    format!(": {quoted}")
                }
            );
            if status.is_success() {
                Ok(())
            } else if status.is_server_error() {
                Err(Failure::Retryable(answered))
            } else if status.is_redirection() {
                Err(Failure::Permanent(format!(
                    "{answered} (redirects are not followed: set PREBUILDS_NOTIFY_WEBHOOK_URL to the final address)"
                )))
            } else {
                Err(Failure::Permanent(answered))
            }
        }
        .await;
        driver.abort();
        outcome
    }
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, `"<timestamp>.<body>"`): what a receiver recomputes to
/// verify a request (and rejects when the timestamp is too old, against replays).
pub fn signature(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut context = ring::hmac::Context::with_key(&key);
    context.update(timestamp.to_string().as_bytes());
    context.update(b".");
    context.update(body);
    format!(
        "sha256={}",
        data_encoding::HEXLOWER.encode(context.sign().as_ref())
    )
}

/// The start of an answer's body on one line, for the error text.
fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() > QUOTED_BODY {
        format!("{}…", line.chars().take(QUOTED_BODY).collect::<String>())
    } else {
        line
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// `10s`, `1.5s`, `250ms`.
pub(crate) fn humanize(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example (README "Notifications"): a receiver recomputes exactly this, e.g.
    /// `hmac.new(b"secret", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()` in Python.
    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        let sig = signature(b"secret", 1700000000, br#"{"a":1}"#);
        assert_eq!(
            sig,
            "sha256=49f24e537407743fa4a0242bb63b94b9a47ee99cbbe071ccd8a22550ae411686"
        );
        assert_ne!(sig, signature(b"other", 1700000000, br#"{"a":1}"#));
        assert_ne!(sig, signature(b"secret", 1700000001, br#"{"a":1}"#));
    }

    #[test]
    fn the_recipient_is_the_origin_only() {
        let target = WebhookTarget::new(
            "http://user:pw@hooks.example.com:8080/T0K3N/path?key=abc",
            None,
            vec![],
        )
        .unwrap();
        assert_eq!(target.recipient(), "http://hooks.example.com:8080");
        let shown = format!("{target:?}");
        assert!(!shown.contains("T0K3N") && !shown.contains("pw"), "{shown}");
        assert!(WebhookTarget::new("ftp://x", None, vec![]).is_err());
        assert!(WebhookTarget::new("not a url", None, vec![]).is_err());
    }

    #[test]
    fn error_bodies_are_quoted_on_one_bounded_line() {
        assert_eq!(quote(b"bad\n  request "), "bad request");
        assert_eq!(quote(&[b'x'; 500]).chars().count(), QUOTED_BODY + 1);
    }
}
