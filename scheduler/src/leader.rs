//! Leader election through a session-level PostgreSQL advisory lock held on a dedicated
//! (non-pooled) connection.
//!
//! 1. [`campaign`] keeps one dedicated connection and calls `pg_try_advisory_lock(key)` every
//!    retry interval until it succeeds (or shutdown), reconnecting when the connection fails.
//! 2. The winner owns a [`LeaderLock`]; the lock lives exactly as long as that session. The leader
//!    calls [`LeaderLock::check`] every retry interval: a dead connection, an error, a timeout or a
//!    lock that is somehow no longer held all mean "not leader any more", and the caller stops
//!    publishing at once.
//! 3. [`LeaderLock::release`] unlocks and closes the connection (graceful hand-over). A leader that
//!    is SIGKILLed needs no release: the kernel closes its socket, PostgreSQL ends the session and
//!    the lock is free for the next standby attempt.
//!
//! Session-level advisory locks are safe here only because the connection is never pooled: a
//! pooled connection would carry the lock to whoever borrows it next.
//!
//! Caveat: a leader whose connection dies *silently* (network partition without a reset) stops
//! publishing after its check times out, but the server keeps the session — and the lock — until it
//! notices the dead peer (the server's TCP keepalive settings). Until then no standby can lead; jobs
//! are delayed, never duplicated by two leaders. After a failover the lock lives on the new
//! primary, where nobody holds it: a standby takes it at its next attempt (the dedicated
//! connection tries each host of a multi-host `DATABASE_URL`, with `target_session_attrs`), while
//! the old leader stops at its next check (see README "Database failover" for the bound).

use std::time::Duration;

use prebuilds_runtime::db;
use tokio_util::sync::CancellationToken;

/// Default advisory-lock key (the registry in `prebuilds_schemas::locks`).
pub const DEFAULT_LOCK_KEY: i64 = prebuilds_schemas::locks::Fixed::SchedulerLeader.key();

/// Upper bound of one lock statement; a slower answer counts as a failure.
fn statement_timeout(retry_interval: Duration) -> Duration {
    retry_interval.clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// The leader lock: a live session holding the advisory lock.
#[derive(Debug)]
pub struct LeaderLock {
    client: tokio_postgres::Client,
    key: i64,
    timeout: Duration,
}

/// Why [`LeaderLock::check`] says leadership is gone.
#[derive(Debug, thiserror::Error)]
pub enum LockLost {
    #[error("the lock connection closed")]
    Closed,
    #[error("checking the lock failed: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("checking the lock took longer than {0:?}")]
    Timeout(Duration),
    #[error("the session no longer holds the advisory lock")]
    NotHeld,
}

/// Campaigns until this process holds the lock; `None` when `shutdown` fired first.
pub async fn campaign(
    database_url: &str,
    key: i64,
    retry_interval: Duration,
    shutdown: &CancellationToken,
) -> Option<LeaderLock> {
    let timeout = statement_timeout(retry_interval);
    let mut connection: Option<tokio_postgres::Client> = None;
    let mut logged_standby = false;
    loop {
        if shutdown.is_cancelled() {
            return None;
        }
        if connection.as_ref().is_none_or(|c| c.is_closed()) {
            connection = match open(database_url, timeout).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open the leader-lock connection; retrying");
                    None
                }
            };
        }
        if let Some(client) = connection.as_ref() {
            let attempt = tokio::time::timeout(
                timeout,
                client.query_one("SELECT pg_try_advisory_lock($1)", &[&key]),
            )
            .await;
            match attempt {
                Ok(Ok(row)) if row.get::<_, bool>(0) => {
                    let client = connection.take().expect("checked Some above");
                    return Some(LeaderLock {
                        client,
                        key,
                        timeout,
                    });
                }
                Ok(Ok(_)) => {
                    if !logged_standby {
                        tracing::info!("another replica leads; standing by");
                        logged_standby = true;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "trying the leader lock failed; reconnecting");
                    connection = None;
                }
                Err(_) => {
                    tracing::warn!(?timeout, "trying the leader lock timed out; reconnecting");
                    connection = None;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(retry_interval) => {}
        }
    }
}

async fn open(database_url: &str, timeout: Duration) -> anyhow::Result<tokio_postgres::Client> {
    let client = db::connect_dedicated(database_url).await?;
    // Lets an operator find (and, in a drill, terminate) the leader's session in pg_stat_activity.
    tokio::time::timeout(
        timeout,
        client.batch_execute("SET application_name = 'prebuilds-scheduler leader lock'"),
    )
    .await
    .map_err(|_| anyhow::anyhow!("setting application_name timed out"))??;
    Ok(client)
}

impl LeaderLock {
    /// Confirms the session is alive and still holds the lock.
    pub async fn check(&self) -> Result<(), LockLost> {
        if self.client.is_closed() {
            return Err(LockLost::Closed);
        }
        let held = tokio::time::timeout(
            self.timeout,
            self.client
                .query_one(include_str!("sql/leader_holds_lock.sql"), &[&self.key]),
        )
        .await
        .map_err(|_| LockLost::Timeout(self.timeout))??;
        if held.get::<_, bool>(0) {
            Ok(())
        } else {
            Err(LockLost::NotHeld)
        }
    }

    /// Unlocks (best effort) and closes the session; closing alone releases the lock too.
    pub async fn release(self) {
        if !self.client.is_closed() {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.key];
            let unlock = self
                .client
                .execute("SELECT pg_advisory_unlock($1)", &params);
            if tokio::time::timeout(self.timeout, unlock).await.is_err() {
                tracing::debug!("unlock timed out; closing the session releases the lock");
            }
        }
        drop(self.client);
    }
}
