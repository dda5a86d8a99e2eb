//! The notifier: delivers the notifications the workers publish to `<prefix>.notifications` to
//! the people they are for, by webhook and by e-mail, once per recipient as far as a receiver can
//! tell. Any number of notifiers run at once, and each may be killed at any moment: what was
//! delivered lives in `notification_deliveries`, not in the process.
//!
//! - [`deliver`]: the message handler — the delivery record, attempts, retries and outcomes.
//! - [`render`]: a notification's title and body from its template.
//! - [`webhook`], [`email`]: the two channels; [`tls`]: their TLS settings.
//! - [`config`], [`metrics`], [`app`]: settings, counters, and the wiring of one process.

pub mod app;
pub mod config;
pub mod deliver;
pub mod email;
pub mod metrics;
pub mod render;
pub mod tls;
pub mod webhook;

/// How one attempt failed, which decides whether another follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth another attempt: 5xx, SMTP 4yz, a timeout, a lost or refused connection.
    Retryable(String),
    /// Never worth another attempt: 4xx (and 3xx), SMTP 5yz, an invalid address.
    Permanent(String),
}
