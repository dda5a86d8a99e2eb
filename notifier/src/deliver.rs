//! The handler of `<prefix>.notifications`: one message is one notification for one user; it is
//! delivered on every configured channel (webhook, e-mail) at once, each through its row in
//! `notification_deliveries`, keyed by (notification, recipient, channel):
//!
//! 1. **Intent before sending.** An attempt starts by taking the row (`begin_attempt.sql`): it is
//!    inserted, or taken over when it waits for a retry, and marked `sending` with a lease of the
//!    attempt's timeout plus a margin. Only the attempt that took it sends.
//! 2. **Outcome after sending.** Accepted → `sent`. Retryable (5xx, SMTP 4yz, timeout,
//!    connection) → `pending` with the next attempt's time (doubling backoff, capped), and the
//!    handler waits for it — the delivery stays unacknowledged meanwhile. Refused (4xx, SMTP 5yz)
//!    or out of attempts → `failed`, and the message is dead-lettered with the reason.
//! 3. **A row someone else holds** (`sending`, lease running): a duplicate message being handled
//!    by another notifier at the same moment; wait for its outcome. A settled row (`sent`,
//!    `interrupted`, `skipped`): nothing is sent, the message is acknowledged.
//! 4. **The crash window.** A notifier killed between the intent and the outcome leaves the row
//!    `sending`; its message returns to the queue and the next notifier waits out the lease, then
//!    marks the row `interrupted` and sends nothing: the receiver may have it (a request that got
//!    there before the kill) or not (one that did not), and telling the two apart would need the
//!    receiver's help. At most once, then, for that narrow window — never twice. Receivers that
//!    want at-least-once for it can deduplicate on the delivery id (`X-Prebuilds-Delivery`, the
//!    e-mail's `Message-ID`), which is the same on every attempt; `prebuildsctl notifications list
//!    --status interrupted` shows what to check. A timeout, by contrast, is retried: the notifier
//!    is alive to see it, and the retry carries the same delivery id.
//!
//! A graceful shutdown lets an attempt in flight finish and record its outcome; a delivery
//! waiting for its next attempt is requeued and resumes, with its attempt count, elsewhere.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::Context;
use deadpool_postgres::Pool;
use prebuilds_runtime::amqp::{consumer::Incoming, Handler, HandlerError};
use prebuilds_schemas::{Notification, RawEvent, RESOURCE_REPLACED_TEMPLATE_ID};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::{Delivery, RetryPolicy},
    email::SmtpTarget,
    metrics::{outcome, NotifierMetrics},
    render::render,
    webhook::WebhookTarget,
    Failure,
};

/// Coder's "Prebuild Failure Limit Reached" template (migration V1).
const FAILURE_LIMIT_TEMPLATE_ID: Uuid = uuid::uuid!("414d9331-c1fc-4761-b40c-d1f4702279eb");

/// Everything the handler needs.
#[derive(Debug, Clone)]
pub struct DeliverContext {
    pub pool: Pool,
    pub delivery: Delivery,
    pub metrics: NotifierMetrics,
    /// Cancelled on shutdown: waits between attempts end and the delivery is requeued.
    pub shutdown: CancellationToken,
}

/// The consumer's handler.
#[derive(Debug, Clone)]
pub struct NotificationHandler {
    ctx: Arc<DeliverContext>,
}

impl NotificationHandler {
    pub fn new(ctx: DeliverContext) -> Self {
        NotificationHandler { ctx: Arc::new(ctx) }
    }
}

/// The JSON body of a webhook request (README "Notifications").
#[derive(Debug, Clone, Serialize)]
pub struct WebhookBody {
    pub notification_id: Uuid,
    /// A stable short name of the template: `resource_replaced`, `prebuild_failure_limit_reached`.
    pub template: String,
    pub template_id: Uuid,
    pub title: String,
    pub body: String,
    pub user: WebhookUser,
    pub labels: BTreeMap<String, String>,
    pub data: serde_json::Value,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WebhookUser {
    pub id: Uuid,
    pub username: String,
    pub email: String,
}

/// A notification as the channels need it: rendered, with its recipient.
#[derive(Debug, Clone)]
struct Rendered {
    id: Uuid,
    created_at: chrono::DateTime<chrono::Utc>,
    webhook: WebhookBody,
}

/// How one channel's delivery ended for this message.
#[derive(Debug)]
enum Settled {
    /// Sent now, already sent before, skipped or interrupted: nothing more to do.
    Done,
    /// Refused for good: dead-letter the message with this reason.
    Failed(String),
    /// Shutting down while waiting for the next attempt: requeue.
    Stopped,
}

/// The bounded template name webhook receivers switch on.
pub fn template_key(id: Uuid, name: &str) -> String {
    match id {
        RESOURCE_REPLACED_TEMPLATE_ID => "resource_replaced".to_owned(),
        FAILURE_LIMIT_TEMPLATE_ID => "prebuild_failure_limit_reached".to_owned(),
        _ => name
            .split(|c: char| !c.is_ascii_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join("_"),
    }
}

impl Handler for NotificationHandler {
    async fn handle(&self, message: &Incoming) -> Result<(), HandlerError> {
        let raw = RawEvent::parse(&message.body)
            .map_err(|e| HandlerError::permanent("envelope", e.to_string()))?;
        let event = raw
            .decode::<Notification>()
            .map_err(|e| HandlerError::permanent("schema", e.to_string()))?;
        let notification_id = event.data.notification_id;
        let rendered = load(&self.ctx.pool, notification_id).await?;
        let ctx = &self.ctx;
        let webhook = async {
            match &ctx.delivery.webhook {
                Some(target) => Some(deliver_webhook(ctx, target, &rendered).await),
                None => None,
            }
        };
        let email = async {
            match &ctx.delivery.smtp {
                Some(target) => Some(deliver_email(ctx, target, &rendered).await),
                None => None,
            }
        };
        let (webhook, email) = tokio::join!(webhook, email);
        let mut failures = Vec::new();
        let mut stopped = false;
        for (channel, settled) in [("webhook", webhook), ("email", email)] {
            match settled {
                None | Some(Ok(Settled::Done)) => {}
                Some(Ok(Settled::Failed(reason))) => failures.push(format!("{channel}: {reason}")),
                Some(Ok(Settled::Stopped)) => stopped = true,
                Some(Err(e)) => return Err(HandlerError::Transient(e)),
            }
        }
        if !failures.is_empty() {
            // A channel that was sent stays sent: a replay of the dead letter retries only the
            // failed one (its row is `failed`, the other's `sent`).
            return Err(HandlerError::permanent(
                "delivery_failed",
                format!(
                    "notification {notification_id} could not be delivered: {}",
                    failures.join("; ")
                ),
            ));
        }
        if stopped {
            return Err(HandlerError::Transient(anyhow::anyhow!(
                "shutting down while notification {notification_id} waits for its next attempt"
            )));
        }
        Ok(())
    }
}

/// Reads and renders the notification a message names.
async fn load(pool: &Pool, id: Uuid) -> Result<Rendered, HandlerError> {
    let client = pool.get().await.map_err(|e| {
        HandlerError::Transient(anyhow::anyhow!(prebuilds_runtime::db::describe_pool(&e)))
    })?;
    let statement = client
        .prepare_cached(include_str!("sql/notification.sql"))
        .await
        .map_err(transient_db)?;
    let row = client
        .query_opt(&statement, &[&id])
        .await
        .map_err(transient_db)?
        .ok_or_else(|| {
            HandlerError::permanent(
                "unknown_notification",
                format!(
                    "notification {id} is not in notification_messages: the message comes from \
                     another database, or the row was deleted (check DATABASE_URL)"
                ),
            )
        })?;
    let payload: serde_json::Value = row.get("payload");
    let labels: BTreeMap<String, String> = payload
        .get("labels")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| HandlerError::permanent("payload", format!("notification {id}: labels: {e}")))?
        .unwrap_or_default();
    let data = payload
        .get("data")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    let template_id: Uuid = row.get("template_id");
    let template_name: String = row.get("template_name");
    let title_template: String = row.get("title_template");
    let body_template: String = row.get("body_template");
    let rendering = |what: &str, template: &str| {
        render(template, &labels, &data).map_err(|e| {
            HandlerError::permanent(
                "template",
                format!("template '{template_name}' ({what}) cannot be rendered: {e}"),
            )
        })
    };
    let title = rendering("title", &title_template)?;
    let body = rendering("body", &body_template)?;
    let created_at = row.get("created_at");
    Ok(Rendered {
        id,
        created_at,
        webhook: WebhookBody {
            notification_id: id,
            template: template_key(template_id, &template_name),
            template_id,
            title,
            body,
            user: WebhookUser {
                id: row.get("user_id"),
                username: row.get("username"),
                email: row.get("email"),
            },
            labels,
            data,
            created_at,
        },
    })
}

fn transient_db(e: tokio_postgres::Error) -> HandlerError {
    HandlerError::Transient(anyhow::anyhow!(prebuilds_runtime::db::describe_postgres(
        &e
    )))
}

async fn deliver_webhook(
    ctx: &DeliverContext,
    target: &WebhookTarget,
    n: &Rendered,
) -> anyhow::Result<Settled> {
    let body = serde_json::to_vec(&n.webhook).context("encoding the webhook body")?;
    let timeout = ctx.delivery.policy.timeout;
    deliver(ctx, n, "webhook", target.recipient(), |delivery_id| {
        target.post(body.clone(), delivery_id, n.id, timeout)
    })
    .await
}

async fn deliver_email(
    ctx: &DeliverContext,
    target: &SmtpTarget,
    n: &Rendered,
) -> anyhow::Result<Settled> {
    let user = &n.webhook.user;
    if user.email.trim().is_empty() {
        let client = ctx.pool.get().await?;
        let inserted = client
            .execute(
                include_str!("sql/insert_skipped.sql"),
                &[
                    &Uuid::new_v4(),
                    &n.id,
                    &"email",
                    &format!(
                        "user {} has no e-mail address (prebuildsctl user create --email)",
                        user.username
                    ),
                ],
            )
            .await?;
        let counted = if inserted == 1 {
            outcome::SKIPPED
        } else {
            outcome::DUPLICATE
        };
        ctx.metrics
            .deliveries
            .with_label_values(&["email", counted])
            .inc();
        return Ok(Settled::Done);
    }
    let timeout = ctx.delivery.policy.timeout;
    deliver(ctx, n, "email", &user.email, |delivery_id| {
        target.send(
            &user.username,
            &user.email,
            &n.webhook.title,
            &n.webhook.body,
            delivery_id,
            timeout,
        )
    })
    .await
}

/// The delivery loop of one channel (see the module documentation).
async fn deliver<F, Fut>(
    ctx: &DeliverContext,
    n: &Rendered,
    channel: &'static str,
    recipient: &str,
    mut attempt: F,
) -> anyhow::Result<Settled>
where
    F: FnMut(Uuid) -> Fut,
    Fut: std::future::Future<Output = Result<(), Failure>>,
{
    let policy: RetryPolicy = ctx.delivery.policy;
    let count = |what: &str| {
        ctx.metrics
            .deliveries
            .with_label_values(&[channel, what])
            .inc()
    };
    loop {
        let client = ctx
            .pool
            .get()
            .await
            .map_err(|e| anyhow::anyhow!(prebuilds_runtime::db::describe_pool(&e)))?;
        let begin = client
            .prepare_cached(include_str!("sql/begin_attempt.sql"))
            .await?;
        let taken = client
            .query_opt(
                &begin,
                &[
                    &Uuid::new_v4(),
                    &n.id,
                    &channel,
                    &recipient,
                    &policy.lease().as_secs_f64(),
                ],
            )
            .await?;
        if let Some(row) = taken {
            let delivery_id: Uuid = row.get("id");
            let number = u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(u32::MAX);
            // No connection is held while the receiver is talked to.
            drop(client);
            let started = std::time::Instant::now();
            let result = attempt(delivery_id).await;
            ctx.metrics
                .attempt_seconds
                .with_label_values(&[channel])
                .observe(started.elapsed().as_secs_f64());
            return match result {
                Ok(()) => {
                    record(
                        ctx,
                        include_str!("sql/mark_sent.sql"),
                        delivery_id,
                        None,
                        None,
                    )
                    .await?;
                    count(outcome::SENT);
                    let latency = (chrono::Utc::now() - n.created_at)
                        .to_std()
                        .unwrap_or_default();
                    ctx.metrics
                        .latency_seconds
                        .with_label_values(&[channel])
                        .observe(latency.as_secs_f64());
                    tracing::info!(notification_id = %n.id, %delivery_id, channel, attempt = number, "notification delivered");
                    Ok(Settled::Done)
                }
                Err(Failure::Retryable(reason)) if number < policy.max_attempts => {
                    let delay = policy.delay_after(number);
                    record(
                        ctx,
                        include_str!("sql/mark_retry.sql"),
                        delivery_id,
                        Some(&reason),
                        Some(delay),
                    )
                    .await?;
                    count(outcome::RETRIED);
                    tracing::warn!(notification_id = %n.id, %delivery_id, channel, attempt = number, max_attempts = policy.max_attempts, retry_in = ?delay, error = %reason, "delivery failed; retrying");
                    continue;
                }
                Err(failure) => {
                    let reason = match failure {
                        Failure::Retryable(reason) => {
                            format!("gave up after {number} attempts: {reason}")
                        }
                        Failure::Permanent(reason) => reason,
                    };
                    record(
                        ctx,
                        include_str!("sql/mark_failed.sql"),
                        delivery_id,
                        Some(&reason),
                        None,
                    )
                    .await?;
                    count(outcome::FAILED);
                    tracing::warn!(notification_id = %n.id, %delivery_id, channel, attempt = number, error = %reason, "delivery failed for good");
                    Ok(Settled::Failed(reason))
                }
            };
        }
        // Not ours to send: see where it stands.
        let state = client
            .query_opt(
                include_str!("sql/delivery_state.sql"),
                &[&n.id, &channel, &recipient],
            )
            .await?;
        drop(client);
        let Some(state) = state else {
            // Deleted between the two statements (the notification was removed): try again.
            continue;
        };
        let status: String = state.get("status");
        let wait = match status.as_str() {
            "sent" | "skipped" | "interrupted" => {
                count(outcome::DUPLICATE);
                tracing::info!(notification_id = %n.id, channel, %status, "already settled; nothing sent");
                return Ok(Settled::Done);
            }
            "sending" if state.get::<_, bool>("lease_expired") => {
                let id: Uuid = state.get("id");
                let client = ctx.pool.get().await?;
                let marked = client
                    .execute(include_str!("sql/mark_interrupted.sql"), &[&id])
                    .await?;
                if marked == 1 {
                    count(outcome::INTERRUPTED);
                    tracing::warn!(notification_id = %n.id, delivery_id = %id, channel, "a notifier stopped during this delivery; not sending it again (the receiver may have it)");
                    return Ok(Settled::Done);
                }
                // Someone settled it meanwhile: look again.
                Duration::ZERO
            }
            // Held by a live attempt elsewhere: wait for the lease to run out or the row to settle.
            "sending" => seconds(state.get("lease_left")).min(Duration::from_secs(1)),
            // Waiting for its next attempt (ours or another notifier's).
            _ => seconds(state.get("next_in")),
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = ctx.shutdown.cancelled() => return Ok(Settled::Stopped),
            }
        } else if ctx.shutdown.is_cancelled() {
            return Ok(Settled::Stopped);
        }
    }
}

fn seconds(s: f64) -> Duration {
    // A few milliseconds more, so the next look does not land just before the moment it waits for.
    Duration::from_secs_f64(s.max(0.0)) + Duration::from_millis(20)
}

/// Records an attempt's outcome; retried for a while, since the receiver already answered and
/// only the record is missing (if it never lands, the lease runs out and the delivery is marked
/// interrupted, never sent twice).
async fn record(
    ctx: &DeliverContext,
    sql: &'static str,
    id: Uuid,
    error: Option<&str>,
    delay: Option<Duration>,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + ctx.delivery.policy.lease();
    let mut pause = Duration::from_millis(100);
    loop {
        let outcome = async {
            let client = ctx
                .pool
                .get()
                .await
                .map_err(|e| anyhow::anyhow!(prebuilds_runtime::db::describe_pool(&e)))?;
            let statement = client.prepare_cached(sql).await?;
            let result = match (error, delay) {
                (None, _) => client.execute(&statement, &[&id]).await,
                (Some(e), None) => client.execute(&statement, &[&id, &e]).await,
                (Some(e), Some(d)) => {
                    client
                        .execute(&statement, &[&id, &e, &d.as_secs_f64()])
                        .await
                }
            };
            result.map(|_| ()).map_err(anyhow::Error::from)
        }
        .await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(delivery_id = %id, error = %format!("{e:#}"), "cannot record the delivery's outcome yet; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e.context(format!("recording the outcome of delivery {id}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_keys_are_short_and_stable() {
        assert_eq!(
            template_key(RESOURCE_REPLACED_TEMPLATE_ID, "whatever"),
            "resource_replaced"
        );
        assert_eq!(
            template_key(FAILURE_LIMIT_TEMPLATE_ID, "x"),
            "prebuild_failure_limit_reached"
        );
        assert_eq!(
            template_key(Uuid::nil(), "Workspace Deleted (Manual)"),
            "workspace_deleted_manual"
        );
    }
}
