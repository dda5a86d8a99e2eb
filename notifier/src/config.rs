//! Notifier configuration: connection and service settings (shared with every binary), the two
//! delivery channels (webhook, SMTP) with their secrets, and the retry policy. Everything is
//! validated at start-up ([`NotifierArgs::resolve`]); a secret is never printed, not by `--help`,
//! `Debug` or a log line.

use std::{fmt, path::PathBuf, time::Duration};

use clap::Parser;
use prebuilds_runtime::{
    config::{parse_duration, secret_value, ConfigError, ConnectionArgs, Secret, ServiceArgs},
    redact::redact,
};

use crate::{email::SmtpTarget, webhook::WebhookTarget};

#[derive(Clone, Parser)]
#[command(
    name = "prebuilds-notifier",
    version,
    about = "Delivers the notifications on <prefix>.notifications (drift on claim, …) to people: by \
             webhook and/or by e-mail over SMTP, once per recipient, with retries.",
    after_help = "At least one of PREBUILDS_NOTIFY_WEBHOOK_URL and PREBUILDS_SMTP_URL is needed.\n\n\
                  Examples:\n  \
                  PREBUILDS_NOTIFY_WEBHOOK_URL=https://hooks.example.com/prebuilds \\\n  \
                  PREBUILDS_NOTIFY_WEBHOOK_SECRET_FILE=/run/secrets/webhook prebuilds-notifier\n  \
                  PREBUILDS_SMTP_URL='smtp://mailer:pw@smtp.example.com:587?tls=required' \\\n  \
                  PREBUILDS_NOTIFY_FROM='Prebuilds <prebuilds@example.com>' prebuilds-notifier"
)]
pub struct NotifierArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub service: ServiceArgs,

    /// Webhook that receives every notification as an HTTP POST of JSON (README "Notifications").
    /// http:// or https:// (verified against the system roots plus PREBUILDS_NOTIFY_CA_FILE).
    #[arg(
        long,
        env = "PREBUILDS_NOTIFY_WEBHOOK_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    webhook_url: Option<String>,

    /// File holding the webhook URL (a Docker or Kubernetes secret). Not together with
    /// PREBUILDS_NOTIFY_WEBHOOK_URL.
    #[arg(long, env = "PREBUILDS_NOTIFY_WEBHOOK_URL_FILE", value_name = "PATH")]
    webhook_url_file: Option<PathBuf>,

    /// Key of the HMAC-SHA256 signature in the X-Prebuilds-Signature header of every webhook
    /// request; without it requests are unsigned.
    #[arg(
        long,
        env = "PREBUILDS_NOTIFY_WEBHOOK_SECRET",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    webhook_secret: Option<String>,

    /// File holding the webhook secret. Not together with PREBUILDS_NOTIFY_WEBHOOK_SECRET.
    #[arg(
        long,
        env = "PREBUILDS_NOTIFY_WEBHOOK_SECRET_FILE",
        value_name = "PATH"
    )]
    webhook_secret_file: Option<PathBuf>,

    /// SMTP server for e-mail: smtp://[user:password@]host[:port] (plaintext, or STARTTLS with
    /// ?tls=required or ?tls=opportunistic) or smtps://… (TLS from the first byte, port 465).
    #[arg(
        long,
        env = "PREBUILDS_SMTP_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    smtp_url: Option<String>,

    /// File holding the SMTP URL with its credentials. Not together with PREBUILDS_SMTP_URL.
    #[arg(long, env = "PREBUILDS_SMTP_URL_FILE", value_name = "PATH")]
    smtp_url_file: Option<PathBuf>,

    /// Sender of the e-mails, e.g. "Prebuilds <prebuilds@example.com>" (needed with an SMTP URL).
    #[arg(long, env = "PREBUILDS_NOTIFY_FROM", value_name = "ADDRESS")]
    pub from: Option<String>,

    /// Extra CA certificates (PEM) trusted for https:// webhooks and SMTP TLS, on top of the
    /// system roots.
    #[arg(long, env = "PREBUILDS_NOTIFY_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,

    /// Longest one attempt may take (connect, TLS, request and answer); a timeout is retried.
    #[arg(long, env = "PREBUILDS_NOTIFY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Attempts per delivery while the receiver answers 5xx (SMTP 4yz) or times out; then the
    /// delivery fails and its message is dead-lettered with the last error.
    #[arg(long, env = "PREBUILDS_NOTIFY_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,

    /// Wait before the second attempt; it doubles per attempt (with jitter) up to
    /// PREBUILDS_NOTIFY_RETRY_MAX_DELAY.
    #[arg(long, env = "PREBUILDS_NOTIFY_RETRY_INITIAL_DELAY", default_value = "1s", value_parser = parse_duration)]
    pub retry_initial_delay: Duration,

    /// Longest wait between two attempts.
    #[arg(long, env = "PREBUILDS_NOTIFY_RETRY_MAX_DELAY", default_value = "1m", value_parser = parse_duration)]
    pub retry_max_delay: Duration,

    /// Notifications delivered at once (the queue's prefetch).
    #[arg(long, env = "PREBUILDS_NOTIFIER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,
}

impl fmt::Debug for NotifierArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotifierArgs")
            .field("connection", &self.connection)
            .field("service", &self.service)
            .field("webhook_url", &self.webhook_url.as_deref().map(redact))
            .field("webhook_url_file", &self.webhook_url_file)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "***"),
            )
            .field("webhook_secret_file", &self.webhook_secret_file)
            .field("smtp_url", &self.smtp_url.as_deref().map(redact))
            .field("smtp_url_file", &self.smtp_url_file)
            .field("from", &self.from)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("max_attempts", &self.max_attempts)
            .field("retry_initial_delay", &self.retry_initial_delay)
            .field("retry_max_delay", &self.retry_max_delay)
            .field("concurrency", &self.concurrency)
            .finish()
    }
}

/// The channels and policy, validated.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub webhook: Option<WebhookTarget>,
    pub smtp: Option<SmtpTarget>,
    pub policy: RetryPolicy,
}

/// How often and how far apart a delivery is attempted.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub timeout: Duration,
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// How long an attempt holds its delivery row: the attempt's own bound plus a margin for the
    /// database round trips around it. A row still `sending` after this belongs to a notifier that
    /// stopped mid-attempt.
    pub fn lease(&self) -> Duration {
        self.timeout + Duration::from_secs(5)
    }

    /// The wait after failed attempt number `attempt` (1-based): doubling, capped, with up to 20 %
    /// jitter taken off so that many notifiers retrying one receiver spread out.
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let doubled = self
            .initial_delay
            .saturating_mul(2u32.saturating_pow(attempt.saturating_sub(1).min(30)));
        let capped = doubled.min(self.max_delay);
        let jitter = rand::random::<f64>() * 0.2;
        capped.mul_f64(1.0 - jitter)
    }
}

impl NotifierArgs {
    /// Checks every setting, reads the secret files and builds the delivery targets.
    pub fn resolve(&self) -> Result<Delivery, ConfigError> {
        self.connection.resolve()?;
        if self.concurrency == 0 {
            return Err(ConfigError(
                "PREBUILDS_NOTIFIER_CONCURRENCY must be at least 1".into(),
            ));
        }
        if self.max_attempts == 0 {
            return Err(ConfigError(
                "PREBUILDS_NOTIFY_MAX_ATTEMPTS must be at least 1".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError(
                "PREBUILDS_NOTIFY_TIMEOUT must be more than 0 (e.g. 10s)".into(),
            ));
        }
        if self.retry_initial_delay > self.retry_max_delay {
            return Err(ConfigError(
                "PREBUILDS_NOTIFY_RETRY_INITIAL_DELAY is longer than PREBUILDS_NOTIFY_RETRY_MAX_DELAY"
                    .into(),
            ));
        }
        let extra_roots = match &self.ca_file {
            Some(path) => {
                prebuilds_runtime::tls::read_certificates(path, "PREBUILDS_NOTIFY_CA_FILE")
                    .map_err(|e| ConfigError(e.0))?
            }
            None => Vec::new(),
        };
        let webhook_url = secret_value(
            (
                "PREBUILDS_NOTIFY_WEBHOOK_URL",
                "--webhook-url",
                self.webhook_url.as_deref(),
            ),
            (
                "PREBUILDS_NOTIFY_WEBHOOK_URL_FILE",
                "--webhook-url-file",
                self.webhook_url_file.as_deref(),
            ),
        )?;
        let webhook_secret = secret_value(
            (
                "PREBUILDS_NOTIFY_WEBHOOK_SECRET",
                "--webhook-secret",
                self.webhook_secret.as_deref(),
            ),
            (
                "PREBUILDS_NOTIFY_WEBHOOK_SECRET_FILE",
                "--webhook-secret-file",
                self.webhook_secret_file.as_deref(),
            ),
        )?;
        let smtp_url = secret_value(
            ("PREBUILDS_SMTP_URL", "--smtp-url", self.smtp_url.as_deref()),
            (
                "PREBUILDS_SMTP_URL_FILE",
                "--smtp-url-file",
                self.smtp_url_file.as_deref(),
            ),
        )?;
        if webhook_secret.is_some() && webhook_url.is_none() {
            return Err(ConfigError(
                "PREBUILDS_NOTIFY_WEBHOOK_SECRET is set but PREBUILDS_NOTIFY_WEBHOOK_URL is not: \
                 set the webhook URL, or drop the secret"
                    .into(),
            ));
        }
        let webhook = webhook_url
            .map(|url| {
                WebhookTarget::new(&url, webhook_secret.map(Secret::from), extra_roots.clone())
            })
            .transpose()?;
        let smtp = match smtp_url {
            Some(url) => {
                let from = self.from.as_deref().ok_or_else(|| {
                    ConfigError(
                        "PREBUILDS_SMTP_URL is set but PREBUILDS_NOTIFY_FROM is not: name the \
                         sender, e.g. PREBUILDS_NOTIFY_FROM='Prebuilds <prebuilds@example.com>'"
                            .into(),
                    )
                })?;
                Some(SmtpTarget::new(&url, from, extra_roots)?)
            }
            None => None,
        };
        if webhook.is_none() && smtp.is_none() {
            return Err(ConfigError(
                "nothing to deliver to: set PREBUILDS_NOTIFY_WEBHOOK_URL and/or PREBUILDS_SMTP_URL \
                 (or their _FILE variants)"
                    .into(),
            ));
        }
        Ok(Delivery {
            webhook,
            smtp,
            policy: RetryPolicy {
                timeout: self.timeout,
                max_attempts: self.max_attempts,
                initial_delay: self.retry_initial_delay,
                max_delay: self.retry_max_delay,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> NotifierArgs {
        let mut argv = vec!["prebuilds-notifier"];
        argv.extend_from_slice(extra);
        NotifierArgs::try_parse_from(argv).unwrap()
    }

    #[test]
    fn some_channel_is_required() {
        let e = args(&[]).resolve().unwrap_err();
        assert!(e.0.contains("nothing to deliver to"), "{e}");
    }

    #[test]
    fn smtp_needs_a_sender_and_secrets_never_show_in_debug() {
        let a = args(&["--smtp-url", "smtps://mailer:hunter2@smtp.example.com"]);
        let e = a.resolve().unwrap_err();
        assert!(e.0.contains("PREBUILDS_NOTIFY_FROM"), "{e}");
        let a = args(&[
            "--smtp-url",
            "smtps://mailer:hunter2@smtp.example.com",
            "--from",
            "p@example.com",
            "--webhook-url",
            "https://hooks.example.com/x",
            "--webhook-secret",
            "s3cret-key",
        ]);
        let delivery = a.resolve().unwrap();
        for shown in [format!("{a:?}"), format!("{delivery:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!shown.contains("s3cret-key"), "{shown}");
        }
    }

    #[test]
    fn a_secret_without_a_webhook_is_refused() {
        let e = args(&["--smtp-url", "smtp://localhost:25", "--from", "a@b.c"]);
        assert!(e.resolve().is_ok());
        let e = args(&["--webhook-secret", "x", "--smtp-url", "smtp://localhost:25"]);
        assert!(e.resolve().is_err());
    }

    #[test]
    fn the_delay_doubles_and_is_capped() {
        let policy = RetryPolicy {
            timeout: Duration::from_secs(1),
            max_attempts: 10,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        };
        let d1 = policy.delay_after(1);
        let d3 = policy.delay_after(3);
        let d9 = policy.delay_after(9);
        assert!(d1 <= Duration::from_secs(1) && d1 >= Duration::from_millis(800));
        assert!(d3 <= Duration::from_secs(4) && d3 >= Duration::from_millis(3200));
        assert!(d9 <= Duration::from_secs(10) && d9 >= Duration::from_secs(8));
        assert!(policy.delay_after(u32::MAX) <= Duration::from_secs(10));
    }
}
