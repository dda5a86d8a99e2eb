//! Readiness shared between the components of one process: `/readyz` is true only while the
//! database and the broker are reachable and the process is not draining.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

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
