//! PostgreSQL access shared by every binary: the connection pool (closed connections replaced, bounded
//! waits, so a dead server surfaces as an error instead of a hang), dedicated connections for
//! session-scoped work (leader lock, migrations), the refresh of cached plans as tables grow
//! ([`refresh_plans_as_tables_grow`]), and the classification of errors into transient (retry) and
//! permanent (give up) for [`crate::retry`]. [`pipelined`] has transactions whose `BEGIN` and
//! `COMMIT` share round trips with their statements.

pub mod dsn;
pub mod pipelined;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use deadpool_postgres::{
    Hook, HookError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime, Timeouts,
};
use tokio_postgres::error::SqlState;

pub use dsn::DatabaseUrl;

pub use deadpool_postgres::{Client as PooledClient, Transaction};

/// Builds the pool. Connections are opened lazily; [`ping`] checks reachability.
pub fn pool(database_url: &str, max_size: usize) -> Result<Pool, DbError> {
    let url = DatabaseUrl::parse(database_url).map_err(DbError::Config)?;
    let tls = tls_connector(&url)?;
    let hosts = url.config.get_hosts().len().max(1) as u32;
    epoch();
    let mut pg_config = url.config;
    // Hot-path statements are prepared once per connection (see [`cached`]); generic plans make
    // each execution skip planning too, instead of re-planning the first five times on every
    // pooled connection. Our statements look rows up by key, so a generic plan is also the plan
    // the planner would pick. Options given in DATABASE_URL come first and still apply.
    let options = match pg_config.get_options() {
        Some(existing) => format!("{existing} -c plan_cache_mode=force_generic_plan"),
        None => "-c plan_cache_mode=force_generic_plan".to_owned(),
    };
    pg_config.options(&options);
    connection_defaults(&mut pg_config);
    let manager = Manager::from_config(
        pg_config,
        tls,
        ManagerConfig {
            // Fast: a connection the server closed while idle (restart, idle timeout) is already
            // marked closed by its connection task and is replaced before use; checking every
            // checkout with a round trip (Verified) added ~0.1–0.2 ms to each claim. A connection
            // that breaks silently surfaces as a transient error, which handlers retry in place.
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size.max(1))
        .runtime(Runtime::Tokio1)
        .timeouts(Timeouts {
            wait: Some(Duration::from_secs(10)),
            // Every host of a multi-host URL may take its connect timeout before the next is tried.
            create: Some(connect_bound(hosts)),
            recycle: Some(Duration::from_secs(5)),
        })
        // A connection made before a failover was seen is never handed out again.
        .pre_recycle(Hook::sync_fn(|_, metrics| {
            if predates_failover(metrics.created) {
                Err(HookError::message("made before a failover was seen"))
            } else {
                Ok(())
            }
        }))
        .build()
        .map_err(|e| DbError::Config(format!("cannot build the PostgreSQL pool: {e}")))
}

/// How long one host of `DATABASE_URL` may take to accept a connection when the URL sets no
/// `connect_timeout`: with a multi-host URL, a dead or black-holed host costs this much before the
/// next host is tried.
pub const HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The bound on opening one connection: every host may take its connect timeout.
fn connect_bound(hosts: u32) -> Duration {
    HOST_CONNECT_TIMEOUT * hosts + Duration::from_secs(1)
}

/// What every connection (pooled or dedicated) gets unless `DATABASE_URL` says otherwise: a
/// connection that dies silently (failover, a dropped NAT entry) must fail within seconds, not
/// hang a handler for the kernel's defaults (hours of keepalive, minutes of retransmits), and a
/// dead host of a multi-host list must cost a bounded connect timeout. Checkouts do not verify
/// connections with a round trip, so these bounds are what notices a dead server.
fn connection_defaults(config: &mut tokio_postgres::Config) {
    if config.get_keepalives_idle() == Duration::from_secs(2 * 60 * 60) {
        config.keepalives_idle(Duration::from_secs(30));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(10));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(HOST_CONNECT_TIMEOUT);
    }
}

/// When this process last saw a server say it can no longer take writes from an existing session
/// (nanoseconds after [`epoch`]; 0 = never). See [`note_failover`].
static FAILOVER_SEEN: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Whether `e` says its session sits on a server that is no longer the writable primary: read-only
/// (SQLSTATE 25006: a demoted primary, a standby reached without `target_session_attrs`) or
/// administratively shut down (57P01, 57P02, 57P03: a stopping or restarting server).
pub fn is_failover_error(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|code| {
        *code == SqlState::READ_ONLY_SQL_TRANSACTION
            || *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW
    })
}

/// Records `e` when it is a failover error ([`is_failover_error`]): from then on every pooled
/// connection made before this moment is dropped at its next checkout instead of being reused, and
/// the replacement is opened afresh — with `target_session_attrs=read-write`, on whichever host is
/// the primary now. All of them, not only the one that failed: they were all opened to the server
/// that just said it is no longer the primary. Called wherever errors are classified
/// ([`DbError`], [`is_transient_postgres`], the consumers' transient failures).
pub fn note_failover(e: &tokio_postgres::Error) {
    if is_failover_error(e) {
        let now = epoch().elapsed().as_nanos() as u64;
        FAILOVER_SEEN.fetch_max(now.max(1), Ordering::Relaxed);
        tracing::warn!(error = %describe_postgres(e), "the database says this session can no longer write; dropping pooled connections made before now");
    }
}

/// [`note_failover`] for every PostgreSQL error in `e`'s chain.
pub fn note_failover_in(e: &(dyn std::error::Error + 'static)) {
    let mut next = Some(e);
    while let Some(cause) = next {
        if let Some(pg) = cause.downcast_ref::<tokio_postgres::Error>() {
            note_failover(pg);
        } else if let Some(DbError::Postgres(pg)) = cause.downcast_ref::<DbError>() {
            note_failover(pg);
        }
        next = cause.source();
    }
}

/// Whether a connection made at `created` was made before the last failover error was seen.
fn predates_failover(created: Instant) -> bool {
    let seen = FAILOVER_SEEN.load(Ordering::Relaxed);
    seen != 0 && created.saturating_duration_since(epoch()).as_nanos() as u64 <= seen
}

/// A table must reach this many pages before its growth triggers a refresh (below it, plans for a
/// tiny table are cheap whatever their shape).
const PLAN_REFRESH_MIN_PAGES: i64 = 8;

/// Drops every pooled connection's cached statements whenever one of `tables` has doubled in size
/// since the statements were prepared, so their generic plans are made again.
///
/// Why: a generic plan is made once per connection and kept until the server invalidates it
/// (DDL, or an ANALYZE — autovacuum's runs at most once a minute, and only after 10% growth).
/// Made while a table was nearly empty (a fresh deployment, a cold fill), it scans that table
/// where an index lookup is due, and each execution then costs O(table) — measured: snapshot
/// reads of a 3-prebuild preset at 24–600 ms during a cold fill of 3,000 prebuilds, 0.9 ms with a
/// fresh plan. The planner scales its estimates by a table's current size, so a plan prepared
/// after the growth fits it. Checking the sizes costs one cheap query every `check_every`.
pub async fn refresh_plans_as_tables_grow(
    pool: Pool,
    tables: &'static [&'static str],
    check_every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let tables: Vec<String> = tables.iter().map(|t| (*t).to_owned()).collect();
    let mut planned_at: Option<Vec<i64>> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(check_every) => {}
        }
        let Ok(client) = pool.get().await else {
            continue;
        };
        let pages: Vec<i64> = match cached::query_one(
            &client,
            "SELECT array_agg(pg_relation_size(t::regclass) / current_setting('block_size')::bigint
                              ORDER BY n)
             FROM unnest($1::text[]) WITH ORDINALITY AS u(t, n)",
            &[&tables],
        )
        .await
        {
            Ok(row) => row.get(0),
            Err(_) => continue,
        };
        let grown = match &planned_at {
            None => false,
            Some(before) => before
                .iter()
                .zip(&pages)
                .any(|(then, now)| *now >= PLAN_REFRESH_MIN_PAGES && *now >= 2 * then.max(&1)),
        };
        if grown {
            tracing::info!(
                ?tables,
                ?pages,
                "tables doubled since their plans were made; re-preparing cached statements"
            );
            pool.manager().statement_caches.clear();
        }
        if grown || planned_at.is_none() {
            planned_at = Some(pages);
        }
    }
}

/// Opens a connection outside the pool, for session-scoped state (advisory locks held across
/// transactions). The connection closes — releasing such locks — when the client is dropped.
pub async fn connect_dedicated(database_url: &str) -> Result<tokio_postgres::Client, DbError> {
    connect_parsed(&DatabaseUrl::parse(database_url).map_err(DbError::Config)?).await
}

/// [`connect_dedicated`] for a connection string already parsed (and perhaps adjusted).
pub async fn connect_parsed(url: &DatabaseUrl) -> Result<tokio_postgres::Client, DbError> {
    let tls = tls_connector(url)?;
    let mut config = url.config.clone();
    connection_defaults(&mut config);
    let hosts = config.get_hosts().len().max(1) as u32;
    let (client, connection) = tokio::time::timeout(connect_bound(hosts), config.connect(tls))
        .await
        .map_err(|_| DbError::Timeout("connecting to PostgreSQL"))??;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "dedicated PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// The TLS connector for `url`, its certificate files read and checked.
fn tls_connector(url: &DatabaseUrl) -> Result<tokio_postgres_rustls::MakeRustlsConnect, DbError> {
    url.connector()
        .map_err(|e| DbError::Config(format!("PostgreSQL TLS: {e}")))
}

/// `SELECT 1` through the pool.
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    let client = pool.get().await?;
    client.simple_query("SELECT 1").await?;
    Ok(())
}

/// The start-up check every service with a database makes after its first ping: a schema older
/// than this build needs is refused, with a message that says to run `prebuildsctl migrate`
/// ([`prebuilds_schemas::migrations::check_schema`]). Returns the schema version found.
pub async fn require_schema(pool: &Pool) -> anyhow::Result<i32> {
    let client = pool.get().await?;
    let version = prebuilds_schemas::migrations::check_schema(&**client).await?;
    tracing::info!(
        schema_version = version,
        required = prebuilds_schemas::migrations::required_version(),
        "database schema is recent enough"
    );
    Ok(version)
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{0}")]
    Config(String),
    /// A connection could not be had: shown with the server's own message when the server
    /// refused it (no such database, authentication failed, …).
    #[error("PostgreSQL pool: {}", describe_pool(.0))]
    Pool(#[from] PoolError),
    /// Displayed with the server's own message, SQLSTATE, detail and hint (or the I/O or TLS
    /// cause), not tokio-postgres' bare "db error".
    #[error("PostgreSQL: {}", describe_postgres(.0))]
    Postgres(tokio_postgres::Error),
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// A statement or its result broke its contract (say, no row where exactly one is certain,
    /// or parameters that don't encode): a bug in this program, not in the database.
    #[error("PostgreSQL returned an unexpected result: {0}")]
    Unexpected(String),
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        note_failover(&e);
        DbError::Postgres(e)
    }
}

/// A pool error in full: a failed connection attempt is described by [`describe_postgres`]
/// (deadpool's own text ends in tokio-postgres' bare "db error").
pub fn describe_pool(e: &PoolError) -> String {
    match e {
        PoolError::Backend(e) => format!("cannot open a connection: {}", describe_postgres(e)),
        other => other.to_string(),
    }
}

/// What went wrong, in full: the server's `ERROR: message (SQLSTATE code)` with its detail and
/// hint for errors the server reported, otherwise tokio-postgres' description followed by its
/// causes (`error connecting to server: Connection refused`, a TLS verification failure, …).
pub fn describe_postgres(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        );
        if let Some(detail) = db.detail() {
            out.push_str(&format!("; DETAIL: {detail}"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!("; HINT: {hint}"));
        }
        return out;
    }
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

impl DbError {
    /// Transient errors are worth retrying: the server is unreachable or restarting, or the
    /// transaction lost a serialization race or a deadlock.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Config(_) | DbError::Unexpected(_) => false,
            DbError::Pool(_) | DbError::Timeout(_) => true,
            DbError::Postgres(e) => is_transient_postgres(e),
        }
    }
}

/// See [`DbError::is_transient`].
pub fn is_transient_postgres(e: &tokio_postgres::Error) -> bool {
    note_failover(e);
    if e.is_closed() {
        return true;
    }
    match e.code() {
        // No SQLSTATE: an I/O error on the connection.
        None => true,
        Some(code) => {
            *code == SqlState::T_R_SERIALIZATION_FAILURE
                || *code == SqlState::T_R_DEADLOCK_DETECTED
                // A demoted primary: the next connection goes to the new one.
                || *code == SqlState::READ_ONLY_SQL_TRANSACTION
                || *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS
                || code.code().starts_with("08")
        }
    }
}

impl crate::retry::Transient for DbError {
    fn is_transient(&self) -> bool {
        DbError::is_transient(self)
    }
}

impl crate::retry::Transient for tokio_postgres::Error {
    fn is_transient(&self) -> bool {
        is_transient_postgres(self)
    }
}

/// Statement helpers that prepare once per connection (deadpool's statement cache) instead of on
/// every call: hot paths run the same few statements thousands of times, and planning plus a parse
/// round trip per call is most of their cost.
pub mod cached {
    use deadpool_postgres::GenericClient;
    use tokio_postgres::{types::ToSql, Row};

    pub async fn execute<C: GenericClient>(
        c: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        let statement = c.prepare_cached(sql).await?;
        c.execute(&statement, params).await
    }

    pub async fn query<C: GenericClient>(
        c: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = c.prepare_cached(sql).await?;
        c.query(&statement, params).await
    }

    pub async fn query_one<C: GenericClient>(
        c: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        let statement = c.prepare_cached(sql).await?;
        c.query_one(&statement, params).await
    }

    pub async fn query_opt<C: GenericClient>(
        c: &C,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        let statement = c.prepare_cached(sql).await?;
        c.query_opt(&statement, params).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_get_bounded_timeouts_unless_the_url_sets_them() {
        let mut config: tokio_postgres::Config = "host=db1,db2 user=u".parse().unwrap();
        connection_defaults(&mut config);
        assert_eq!(config.get_connect_timeout(), Some(&HOST_CONNECT_TIMEOUT));
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(30));
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(
            config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(30))
        );
        assert_eq!(connect_bound(2), Duration::from_secs(11));

        let mut given: tokio_postgres::Config = "host=db1 connect_timeout=2 keepalives_idle=7"
            .parse()
            .unwrap();
        connection_defaults(&mut given);
        assert_eq!(given.get_connect_timeout(), Some(&Duration::from_secs(2)));
        assert_eq!(given.get_keepalives_idle(), Duration::from_secs(7));
    }
}
