//! Readiness shared between the components of one process: `/readyz` is true only while the
//! database and the broker are reachable and the process is not draining. [`watch_database`] is
//! the one database probe every service runs.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
struct Flags {
    database: AtomicBool,
    broker: AtomicBool,
    draining: AtomicBool,
}

/// Cheap to clone; every clone sees the same flags.
#[derive(Debug, Clone, Default)]
pub struct Health(Arc<Flags>);

impl Health {
    pub fn set_database(&self, up: bool) {
        self.0.database.store(up, Ordering::Relaxed);
    }
    pub fn set_broker(&self, up: bool) {
        self.0.broker.store(up, Ordering::Relaxed);
    }
    pub fn set_draining(&self) {
        self.0.draining.store(true, Ordering::Relaxed);
    }
    pub fn is_ready(&self) -> bool {
        self.0.database.load(Ordering::Relaxed)
            && self.0.broker.load(Ordering::Relaxed)
            && !self.0.draining.load(Ordering::Relaxed)
    }
    /// A short explanation for `/readyz`.
    pub fn describe(&self) -> String {
        format!(
            "database={} broker={} draining={}",
            up(self.0.database.load(Ordering::Relaxed)),
            up(self.0.broker.load(Ordering::Relaxed)),
            self.0.draining.load(Ordering::Relaxed)
        )
    }
}

fn up(v: bool) -> &'static str {
    if v {
        "up"
    } else {
        "down"
    }
}

/// How often [`watch_database`] pings, and how long one ping may take before it counts as down.
pub const DATABASE_PROBE_INTERVAL: Duration = Duration::from_secs(2);
pub const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Keeps the database flag of `health` current until `shutdown`: a ping every
/// [`DATABASE_PROBE_INTERVAL`], down when it fails or takes longer than
/// [`DATABASE_PROBE_TIMEOUT`]. An outage is logged once when it starts, with `needed_for` (what
/// the process reads or writes there), and once when it ends.
pub async fn watch_database(
    pool: deadpool_postgres::Pool,
    health: Health,
    shutdown: CancellationToken,
    needed_for: &'static str,
) {
    let mut was_up = true;
    loop {
        let probe = tokio::time::timeout(DATABASE_PROBE_TIMEOUT, crate::db::ping(&pool)).await;
        let up = matches!(probe, Ok(Ok(())));
        health.set_database(up);
        match (&probe, was_up) {
            (Ok(Err(e)), true) => {
                tracing::warn!(error = %e, "PostgreSQL is not reachable ({needed_for})")
            }
            (Err(_), true) => tracing::warn!(
                "PostgreSQL did not answer within {DATABASE_PROBE_TIMEOUT:?} ({needed_for})"
            ),
            (Ok(Ok(())), false) => tracing::info!("PostgreSQL answers again"),
            _ => {}
        }
        was_up = up;
        tokio::select! {
            _ = tokio::time::sleep(DATABASE_PROBE_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
