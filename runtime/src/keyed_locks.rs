//! In-process mutual exclusion by key (a job id, a workspace id): holders of one key run one at a
//! time, waiting without holding anything else (no database connection, no thread). Used where
//! work on one key must not overlap within a process: a provisioner's duplicate deliveries of a
//! job, its builds of one workspace, a worker's events of one job. Entries are removed when the
//! last holder or waiter leaves, so the map stays as small as the work in flight.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use uuid::Uuid;

#[derive(Debug, Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<Uuid, Arc<AsyncMutex<()>>>>,
}

/// Holds the lock of one key until dropped.
#[derive(Debug)]
pub struct KeyedGuard<'a> {
    locks: &'a KeyedLocks,
    key: Uuid,
    mutex: Arc<AsyncMutex<()>>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    pub async fn lock(&self, key: Uuid) -> KeyedGuard<'_> {
        let mutex = {
            // A poisoned map only means another thread panicked between two plain map operations;
            // the map itself is still consistent.
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(key).or_default().clone()
        };
        let guard = mutex.clone().lock_owned().await;
        KeyedGuard {
            locks: self,
            key,
            mutex,
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for KeyedGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map.lock().unwrap_or_else(|e| e.into_inner());
        // Clones are only made under the map lock, so the count is exact here: the map's own
        // reference plus ours means nobody else holds or waits for this key.
        if Arc::strong_count(&self.mutex) == 2 {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn same_key_is_exclusive_and_entries_are_cleaned_up() {
        let locks = Arc::new(KeyedLocks::default());
        let key = Uuid::new_v4();
        let first = locks.lock(key).await;
        let second = {
            let locks = locks.clone();
            tokio::spawn(async move {
                let _g = locks.lock(key).await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished(), "second holder waits");
        // Another key is independent.
        drop(locks.lock(Uuid::new_v4()).await);
        drop(first);
        second.await.unwrap();
        assert_eq!(locks.len(), 0);
    }
}
