//! The e-mail channel: one plain-text message per delivery through the SMTP server of
//! `PREBUILDS_SMTP_URL`, with `lettre` over rustls (ring). The URL follows lettre's form:
//!
//! | URL | transport | default port |
//! |---|---|---|
//! | `smtp://host` | plaintext (a local relay or mail catcher) | 25 |
//! | `smtp://host?tls=required` | STARTTLS, or the delivery fails | 587 |
//! | `smtp://host?tls=opportunistic` | STARTTLS when the server offers it | 587 |
//! | `smtps://host` | TLS from the first byte | 465 |
//!
//! Credentials come from the URL's `user:password@` (percent-encoded), and so from
//! `PREBUILDS_SMTP_URL_FILE` when the URL is a secret. They are refused over a plaintext link to
//! anything but loopback, and never printed. A server's 5yz answer is a permanent failure, a 4yz
//! answer, a timeout or a lost connection is retried.

use std::{fmt, time::Duration};

use lettre::{
    message::{header::ContentType, Mailbox},
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
        extension::ClientId,
    },
    AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor,
};
use prebuilds_runtime::config::ConfigError;
use rustls::pki_types::CertificateDer;
use url::Url;
use uuid::Uuid;

use crate::{webhook::humanize, Failure};

/// How the link to the SMTP server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    Plaintext,
    StartTlsRequired,
    StartTlsOpportunistic,
    Tls,
}

/// The SMTP server and sender. `Debug` shows host, port and protection, never the credentials.
#[derive(Clone)]
pub struct SmtpTarget {
    host: String,
    port: u16,
    protection: Protection,
    from: Mailbox,
    authenticated: bool,
    transport: AsyncSmtpTransport<Tokio1Executor>,
}

impl fmt::Debug for SmtpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmtpTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("protection", &self.protection)
            .field("from", &self.from.to_string())
            .field("authenticated", &self.authenticated)
            .finish()
    }
}

impl SmtpTarget {
    /// Parses `url` (see the module documentation) and `from`, and builds the transport.
    pub fn new(
        url: &str,
        from: &str,
        extra_roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, ConfigError> {
        let parsed = Url::parse(url).map_err(|e| {
            ConfigError(format!(
                "PREBUILDS_SMTP_URL is not a URL ({e}); write it like smtps://user:password@smtp.example.com"
            ))
        })?;
        let host = parsed
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| ConfigError("PREBUILDS_SMTP_URL names no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls_param = parsed
            .query_pairs()
            .find(|(k, _)| k == "tls")
            .map(|(_, v)| v.into_owned());
        let (protection, default_port) = match (parsed.scheme(), tls_param.as_deref()) {
            ("smtp", None | Some("none")) => (Protection::Plaintext, 25),
            ("smtp", Some("required")) => (Protection::StartTlsRequired, 587),
            ("smtp", Some("opportunistic")) => (Protection::StartTlsOpportunistic, 587),
            ("smtps", None | Some("wrapper")) => (Protection::Tls, 465),
            (scheme, tls) => {
                return Err(ConfigError(format!(
                    "PREBUILDS_SMTP_URL: scheme '{scheme}' with tls={} is not understood; use \
                     smtp://host (plaintext), smtp://host?tls=required (STARTTLS) or smtps://host (TLS)",
                    tls.unwrap_or("(none)")
                )))
            }
        };
        let port = parsed.port().unwrap_or(default_port);
        let from: Mailbox = from.parse().map_err(|e| {
            ConfigError(format!(
                "PREBUILDS_NOTIFY_FROM '{from}' is not an e-mail address ({e}); write it like \
                 prebuilds@example.com or 'Prebuilds <prebuilds@example.com>'"
            ))
        })?;
        let credentials = (!parsed.username().is_empty()).then(|| {
            Credentials::new(
                percent_decode(parsed.username()),
                percent_decode(parsed.password().unwrap_or("")),
            )
        });
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if credentials.is_some()
            && matches!(
                protection,
                Protection::Plaintext | Protection::StartTlsOpportunistic
            )
            && !loopback
        {
            return Err(ConfigError(format!(
                "PREBUILDS_SMTP_URL has credentials for {host} but does not require TLS, so the \
                 password could cross the network in clear: use smtps://… or add ?tls=required"
            )));
        }
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host.clone())
            .port(port)
            .timeout(None);
        if parsed.path().len() > 1 {
            // lettre's convention: the path is the EHLO name.
            builder =
                builder.hello_name(ClientId::Domain(parsed.path().trim_matches('/').to_owned()));
        }
        if protection != Protection::Plaintext {
            let mut parameters = TlsParameters::builder(host.clone());
            for root in extra_roots {
                let certificate = Certificate::from_der(root.to_vec()).map_err(|e| {
                    ConfigError(format!(
                        "PREBUILDS_NOTIFY_CA_FILE: a certificate is unusable: {e}"
                    ))
                })?;
                parameters = parameters.add_root_certificate(certificate);
            }
            let parameters = parameters
                .build_rustls()
                .map_err(|e| ConfigError(format!("SMTP TLS settings: {e}")))?;
            builder = builder.tls(match protection {
                Protection::StartTlsRequired => Tls::Required(parameters),
                Protection::StartTlsOpportunistic => Tls::Opportunistic(parameters),
                _ => Tls::Wrapper(parameters),
            });
        }
        let authenticated = credentials.is_some();
        if let Some(credentials) = credentials {
            builder = builder.credentials(credentials);
        }
        Ok(SmtpTarget {
            host,
            port,
            protection,
            from,
            authenticated,
            transport: builder.build(),
        })
    }

    /// Sends one message to `address` within `timeout`. `delivery_id` becomes the Message-ID, the
    /// same on every attempt, so a mail client shows a resent message once.
    pub async fn send(
        &self,
        username: &str,
        address: &str,
        subject: &str,
        body: &str,
        delivery_id: Uuid,
        timeout: Duration,
    ) -> Result<(), Failure> {
        let to = address
            .parse()
            .map(|address| Mailbox::new(Some(username.to_owned()), address))
            .map_err(|e| {
                Failure::Permanent(format!(
                    "e-mail address '{address}' of user {username} is not valid: {e}"
                ))
            })?;
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .message_id(Some(format!("<{delivery_id}@prebuilds-notifier>")))
            .header(ContentType::TEXT_PLAIN)
            .body(body.to_owned())
            .map_err(|e| Failure::Permanent(format!("cannot build the e-mail: {e}")))?;
        let server = format!("SMTP server {}:{}", self.host, self.port);
        match tokio::time::timeout(timeout, self.transport.send(message)).await {
            Err(_) => Err(Failure::Retryable(format!(
                "{server} did not accept the message within {}",
                humanize(timeout)
            ))),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.is_permanent() || e.is_client() => {
                Err(Failure::Permanent(format!("{server} refused it: {e}")))
            }
            Ok(Err(e)) => Err(Failure::Retryable(format!("{server}: {e}"))),
        }
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<SmtpTarget, ConfigError> {
        SmtpTarget::new(url, "Prebuilds <prebuilds@example.com>", vec![])
    }

    #[test]
    fn urls_choose_protection_and_port() {
        let t = target("smtp://mail.example.com").unwrap();
        assert_eq!((t.protection, t.port), (Protection::Plaintext, 25));
        let t = target("smtp://u:p@mail.example.com?tls=required").unwrap();
        assert_eq!((t.protection, t.port), (Protection::StartTlsRequired, 587));
        let t = target("smtps://u:p@mail.example.com").unwrap();
        assert_eq!((t.protection, t.port), (Protection::Tls, 465));
        let t = target("smtp://127.0.0.1:1025").unwrap();
        assert_eq!(t.port, 1025);
        assert!(target("http://mail.example.com").is_err());
        assert!(target("smtp://mail.example.com?tls=sometimes").is_err());
    }

    #[test]
    fn a_password_never_goes_in_clear_over_the_network() {
        let e = target("smtp://u:hunter2@mail.example.com").unwrap_err();
        assert!(e.0.contains("tls=required"), "{e}");
        assert!(!e.0.contains("hunter2"), "{e}");
        assert!(target("smtp://u:p@mail.example.com?tls=opportunistic").is_err());
        // A relay on loopback is the one exception.
        assert!(target("smtp://u:p@127.0.0.1:1025").is_ok());
        let t = target("smtps://u:hunter2@mail.example.com").unwrap();
        assert!(!format!("{t:?}").contains("hunter2"));
    }

    #[test]
    fn the_sender_must_be_an_address() {
        let e = SmtpTarget::new("smtp://localhost", "not an address", vec![]).unwrap_err();
        assert!(e.0.contains("PREBUILDS_NOTIFY_FROM"), "{e}");
    }
}
