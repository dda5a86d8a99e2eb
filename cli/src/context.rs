//! What every command shares: connecting to PostgreSQL and RabbitMQ with errors that say what to
//! check, applying a change together with the reconcile jobs it causes (and relaying them after the
//! commit), resolving templates by name, and the usage-error type that maps to exit code 2.
//!
//! Writes never hang behind another writer: every write transaction starts with
//! [`begin_write`], which sets `lock_timeout` (`PREBUILDS_CLI_LOCK_TIMEOUT`), and a lock wait that
//! runs out (SQLSTATE 55P03) becomes an error naming what the command waited for and who holds it
//! ([`waited_for`], [`explain_lock_timeout`]).

use std::{ops::Deref, sync::Arc, time::Duration};

use anyhow::{anyhow, bail, Context as _};
use deadpool_postgres::{GenericClient, Object, Pool, Transaction};
use prebuilds_runtime::{
    amqp::{self, Entity, Publisher, QueueKind},
    config::Connection,
    db,
    outbox::{Relay, RelayConfig},
};
use prebuilds_schemas::ReconcileReason;
use uuid::Uuid;

use crate::audit;

/// What every command gets: the connection settings, and how long the CLI's writes wait for a
/// lock. Dereferences to the [`Connection`], so commands that only read take `&Connection`.
#[derive(Debug)]
pub struct Ctx {
    pub connection: Connection,
    /// `lock_timeout` of every write transaction (0 = wait as long as it takes).
    pub lock_timeout: Duration,
    /// The audit row every write transaction of this command writes (`None`: a read-only
    /// command).
    pub audit: Option<audit::Entry>,
}

impl Deref for Ctx {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

/// Something the command names does not exist (a template, a preset): the API answers 404.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// A change that the current state does not allow (e.g. invalidating a template without an active
/// version): the API answers 409.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Conflict(pub String);

/// A bad argument value found after parsing (exit code 2, like clap's own usage errors).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// How long a command waits for its outbox rows to be published before leaving them to the
/// workers' relay.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

/// The source recorded in the CloudEvents the CLI writes.
pub const EVENT_SOURCE: &str = "prebuildsctl";

/// A small pool to the database, checked to be reachable and migrated.
pub async fn connect_db(connection: &Connection) -> anyhow::Result<Pool> {
    let url = &connection.database_url;
    let pool = db::pool(url.expose(), 2)?;
    db::ping(&pool).await.map_err(|e| {
        anyhow!(
            "cannot connect to PostgreSQL at {url}: {e}\n\
             check DATABASE_URL (or --database-url) and that the server is running"
        )
    })?;
    let client = pool.get().await?;
    let migrated: bool = client
        .query_one(
            "SELECT to_regclass('template_version_presets') IS NOT NULL",
            &[],
        )
        .await?
        .get(0);
    if !migrated {
        bail!("the database at {url} has no prebuilds schema; run `prebuildsctl migrate` first");
    }
    Ok(pool)
}

/// Connects to RabbitMQ for a command that talks to the broker directly.
pub async fn connect_amqp(
    connection: &Connection,
    name: &str,
) -> anyhow::Result<lapin::Connection> {
    amqp::connect(&connection.broker, name)
        .await
        .map_err(|e| amqp_unreachable(connection, e))
}

/// The error for a broker the CLI cannot reach, however it connected (plain connection or RPC
/// client): it names the redacted URL and what to check.
pub fn amqp_unreachable(connection: &Connection, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!(
        "cannot connect to RabbitMQ at {}: {e}\n\
         check AMQP_URL (or --amqp-url) and that the broker is running",
        connection.broker.redacted()
    )
}

/// A confirming publisher on the configured prefix; what the CLI publishes from the outbox is
/// reconcile jobs.
pub fn publisher(connection: &Connection) -> Publisher {
    Publisher::new(&connection.broker, "prebuildsctl", connection.topology())
        .uses(&[Entity::Exchange, Entity::Queue(QueueKind::Reconcile)])
}

/// Publishes what this command committed to the outbox (and anything else waiting there), bounded
/// in time. Never fails the command: the change is committed, and unpublished rows stay in the
/// outbox for the workers' relay. Returns how many messages were published.
pub async fn relay_outbox(pool: &Pool, connection: &Connection, queued: usize) -> usize {
    if queued == 0 {
        return 0;
    }
    let publisher = Arc::new(publisher(connection));
    if let Err(e) = publisher.ensure_connected().await {
        eprintln!(
            "warning: the change is committed, but RabbitMQ is unreachable ({e}); \
             {queued} reconcile job(s) stay queued in the outbox and will be published by the \
             workers' relay (check AMQP_URL and that the broker is running)"
        );
        return 0;
    }
    let relay = Relay::new(pool.clone(), publisher.clone(), RelayConfig::default());
    let drained = tokio::time::timeout(DRAIN_DEADLINE + Duration::from_secs(5), async {
        relay.drain(DRAIN_DEADLINE).await
    })
    .await;
    publisher.close().await;
    match drained {
        Ok(Ok(report)) if report.failed == 0 => report.published,
        Ok(Ok(report)) => {
            eprintln!(
                "warning: {} outbox message(s) could not be published now; they stay queued in \
                 the outbox and will be published by the workers' relay",
                report.failed
            );
            report.published
        }
        Ok(Err(e)) => {
            eprintln!(
                "warning: the change is committed, but relaying the outbox failed ({e}); the \
                 reconcile jobs stay queued and will be published by the workers' relay"
            );
            0
        }
        Err(_) => {
            eprintln!(
                "warning: the change is committed, but publishing took longer than {:?}; the \
                 remaining reconcile jobs stay queued and will be published by the workers' relay",
                DRAIN_DEADLINE
            );
            0
        }
    }
}

/// Starts a write transaction whose lock waits give up after `lock_timeout` (with SQLSTATE 55P03,
/// which [`explain_lock_timeout`] turns into a message) instead of hanging behind another writer,
/// and writes the command's audit row in it ([`crate::audit`]).
pub async fn begin_write<'a>(
    client: &'a mut Object,
    ctx: &Ctx,
) -> Result<Transaction<'a>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    // Milliseconds, rounded up so a sub-millisecond timeout does not mean "wait forever" (0).
    let millis = ctx.lock_timeout.as_nanos().div_ceil(1_000_000);
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {millis}"))
        .await?;
    // Who is making this change, in the change's own transaction.
    if let Some(entry) = &ctx.audit {
        audit::record(&tx, entry).await?;
    }
    Ok(tx)
}

/// What a write was waiting for when its `lock_timeout` ran out.
#[derive(Debug, thiserror::Error)]
#[error("lock timeout waiting for {what}")]
pub struct LockWait {
    /// e.g. `a lock on template 'python-dev'`.
    pub what: String,
    #[source]
    pub source: tokio_postgres::Error,
}

/// Whether `e` is PostgreSQL giving up a lock wait (`lock_timeout`, SQLSTATE 55P03).
pub fn is_lock_timeout(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// For `map_err` on a statement that takes a lock: a lock timeout becomes a [`LockWait`] naming
/// `what` (e.g. `a lock on template 'x'`); any other error passes through.
pub fn waited_for(
    what: impl FnOnce() -> String,
) -> impl FnOnce(tokio_postgres::Error) -> anyhow::Error {
    move |e| {
        if is_lock_timeout(&e) {
            LockWait {
                what: what(),
                source: e,
            }
            .into()
        } else {
            e.into()
        }
    }
}

/// A write's error as the user should read it: a lock timeout anywhere in `e` says how long the
/// command waited, for what ([`LockWait`], or the rows it changes when the statement was not
/// named), that another writer holds it, and what to do. Other errors are returned unchanged.
pub fn explain_lock_timeout(e: anyhow::Error, lock_timeout: Duration) -> anyhow::Error {
    let what = if let Some(wait) = e.chain().find_map(|c| c.downcast_ref::<LockWait>()) {
        wait.what.clone()
    } else if e
        .chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(is_lock_timeout)
    {
        "a lock on the rows this command changes".to_owned()
    } else {
        return e;
    };
    anyhow!(
        "timed out after {lock_timeout:?} waiting for {what}; another writer (a worker's \
         reconcile pass or another push) holds it; nothing was written — try again \
         (PREBUILDS_CLI_LOCK_TIMEOUT or --lock-timeout sets how long to wait)"
    )
}

/// A template addressed by name.
#[derive(Debug, Clone)]
pub struct TemplateRef {
    pub id: Uuid,
    pub name: String,
    pub organization_name: String,
    pub active_version_id: Option<Uuid>,
}

/// Finds the live (not deleted) template `name`, in `organization` when given. With `lock`, the
/// template row is locked for the rest of the transaction.
///
/// Errors: no such template; the name exists in several organizations and none was given.
pub async fn resolve_template<C: GenericClient>(
    c: &C,
    name: &str,
    organization: Option<&str>,
    lock: bool,
) -> anyhow::Result<TemplateRef> {
    let sql = format!(
        "SELECT t.id, t.name, o.name AS organization_name, t.active_version_id
         FROM templates t
         JOIN organizations o ON o.id = t.organization_id
         WHERE t.name = $1
           AND NOT t.deleted                        -- deleted templates are not addressable
           AND ($2::text IS NULL OR o.name = $2)    -- --organization narrows the search
         ORDER BY o.name
         {}",
        if lock { "FOR UPDATE OF t" } else { "" }
    );
    let rows = c
        .query(&sql, &[&name, &organization])
        .await
        .map_err(waited_for(|| format!("a lock on template '{name}'")))
        .context("looking up the template")?;
    match rows.len() {
        0 => {
            if let Some(org) = organization {
                let exists = c
                    .query_opt("SELECT 1 FROM organizations WHERE name = $1", &[&org])
                    .await?
                    .is_some();
                if !exists {
                    return Err(NotFound(format!(
                        "organization '{org}' does not exist (create it with `prebuildsctl org create {org}`)"
                    ))
                    .into());
                }
                return Err(NotFound(format!(
                    "template '{name}' not found in organization '{org}' \
                     (push one with `prebuildsctl template push FILE`)"
                ))
                .into());
            }
            Err(NotFound(format!(
                "template '{name}' not found (push one with `prebuildsctl template push FILE`; \
                 `prebuildsctl status` lists the templates with prebuilds)"
            ))
            .into())
        }
        1 => {
            let r = &rows[0];
            Ok(TemplateRef {
                id: r.get("id"),
                name: r.get("name"),
                organization_name: r.get("organization_name"),
                active_version_id: r.get("active_version_id"),
            })
        }
        _ => {
            let orgs: Vec<String> = rows
                .iter()
                .map(|r| r.get::<_, String>("organization_name"))
                .collect();
            Err(UsageError(format!(
                "template name '{name}' exists in several organizations ({}); \
                 pass --organization ORG to choose one",
                orgs.join(", ")
            ))
            .into())
        }
    }
}

/// Presets whose pool a change to this template affects: the template's presets that need a
/// reconcile (the view `presets_needing_attention`: its active presets with prebuilds configured,
/// plus every preset with live prebuilds — old versions draining). A change that takes presets
/// out of the view (deleting, deprecating) reads it before the change; one that puts them in,
/// after. ([`request_reconciles`] drops duplicates.)
pub async fn template_presets<C: GenericClient>(
    c: &C,
    template_id: Uuid,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT preset_id FROM presets_needing_attention WHERE template_id = $1 ORDER BY preset_id",
            &[&template_id],
        )
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Presets of one template version.
pub async fn version_presets<C: GenericClient>(
    c: &C,
    version_id: Uuid,
) -> Result<Vec<Uuid>, tokio_postgres::Error> {
    let rows = c
        .query(
            "SELECT id FROM template_version_presets WHERE template_version_id = $1 ORDER BY id",
            &[&version_id],
        )
        .await?;
    Ok(rows.into_iter().map(|r| r.get(0)).collect())
}

/// Whether a PostgreSQL error is a unique-constraint violation.
pub fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// Writes one reconcile job per preset to the outbox, in the caller's transaction, after taking
/// each preset's lock (in id order, so two commands cannot deadlock). Holding the locks until
/// commit means a reconcile that was running finishes first (its coalescing watermark is then older
/// than these jobs) and one that starts later waits for the commit (it sees the change): the change
/// can never be missed by a coalesced job. Returns how many jobs were written.
pub async fn request_reconciles<C: GenericClient>(
    c: &C,
    preset_ids: &[Uuid],
    reason: ReconcileReason,
) -> anyhow::Result<usize> {
    let mut ids = preset_ids.to_vec();
    ids.sort();
    ids.dedup();
    for id in &ids {
        prebuilds_store::lock::lock_preset(c, *id)
            .await
            .map_err(waited_for(|| format!("the reconcile lock of preset {id}")))?;
    }
    prebuilds_store::attention::request_reconciles(c, &ids, reason, EVENT_SOURCE).await?;
    Ok(ids.len())
}

/// What a change made through [`apply_change`] returns: the presets whose pools it affects, and
/// whatever the command reports about it.
#[derive(Debug)]
pub struct Change<T> {
    pub outcome: T,
    /// May be empty: then no reconcile job is written.
    pub reconcile: Vec<Uuid>,
    pub reason: ReconcileReason,
}

/// A committed change: its outcome, how many reconcile jobs it wrote and how many of them were
/// published before the command returned.
#[derive(Debug)]
pub struct Applied<T> {
    pub outcome: T,
    pub requested: usize,
    pub published: usize,
}

/// Runs `change` in one write transaction ([`begin_write`]), writes its reconcile jobs to the
/// outbox in that same transaction, commits, and relays the outbox. The jobs thus exist exactly
/// when the change does; an error from `change` rolls everything back (a lock timeout is
/// explained by [`explain_lock_timeout`]).
pub async fn apply_change<T>(
    ctx: &Ctx,
    change: impl AsyncFnOnce(&Transaction<'_>) -> anyhow::Result<Change<T>>,
) -> anyhow::Result<Applied<T>> {
    let pool = connect_db(&ctx.connection).await?;
    let written = write_change(&pool, ctx, change).await;
    relay_written(&pool, ctx, written).await
}

/// [`apply_change`] on a pool the caller keeps (the API's, shared by its requests).
pub async fn apply_change_on<T>(
    pool: &Pool,
    ctx: &Ctx,
    change: impl AsyncFnOnce(&Transaction<'_>) -> anyhow::Result<Change<T>>,
) -> anyhow::Result<Applied<T>> {
    let written = write_change(pool, ctx, change).await;
    relay_written(pool, ctx, written).await
}

/// How often [`retry_conflicts`] runs a change.
const CHANGE_ATTEMPTS: usize = 5;

/// Runs `attempt` (a whole change, e.g. one [`apply_change_on`]) again when PostgreSQL aborted it
/// as a deadlock victim or a serialization failure (40P01, 40001: e.g. a resume meeting a
/// worker's reconcile of the same preset), up to [`CHANGE_ATTEMPTS`] times. The change rolled
/// back whole, audit row included, so running it again is safe.
pub async fn retry_conflicts<T, F, Fut>(mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut n = 1;
    loop {
        match attempt().await {
            Err(e) if n < CHANGE_ATTEMPTS && lost_a_conflict(&e) => {
                tracing::info!(error = %format!("{e:#}"), attempt = n, "change lost a conflict; running it again");
                // A short, growing pause lets the winner of the conflict finish first.
                tokio::time::sleep(std::time::Duration::from_millis(20 * n as u64)).await;
                n += 1;
            }
            result => return result,
        }
    }
}

/// Whether `e` is PostgreSQL aborting the transaction to resolve a conflict (deadlock victim or
/// serialization failure): running it again can succeed.
fn lost_a_conflict(e: &anyhow::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(|e| {
            matches!(
                e.code(),
                Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
            )
        })
}

/// One write transaction of `change` with its audit row and reconcile jobs, committed.
async fn write_change<T>(
    pool: &Pool,
    ctx: &Ctx,
    change: impl AsyncFnOnce(&Transaction<'_>) -> anyhow::Result<Change<T>>,
) -> anyhow::Result<(T, usize)> {
    let mut client = pool.get().await?;
    let tx = begin_write(&mut client, ctx).await?;
    let Change {
        outcome,
        reconcile,
        reason,
    } = change(&tx).await?;
    let requested = request_reconciles(&tx, &reconcile, reason).await?;
    tx.commit().await?;
    Ok((outcome, requested))
}

/// After [`write_change`]: explains a lock timeout, or relays the committed reconcile jobs.
async fn relay_written<T>(
    pool: &Pool,
    ctx: &Ctx,
    written: anyhow::Result<(T, usize)>,
) -> anyhow::Result<Applied<T>> {
    let (outcome, requested) = written.map_err(|e| explain_lock_timeout(e, ctx.lock_timeout))?;
    // The write's connection is back in the pool: the relay takes its connections from it.
    let published = relay_outbox(pool, &ctx.connection, requested).await;
    Ok(Applied {
        outcome,
        requested,
        published,
    })
}
