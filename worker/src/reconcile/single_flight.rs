//! In-process coalescing of reconcile jobs per preset. Jobs are level-triggered, so a reconcile
//! that *starts* after a job arrived satisfies that job. Per preset this process runs at most one
//! reconcile at a time; jobs arriving meanwhile wait for the next run, which starts after all of
//! them arrived and so answers them all. A burst of claims on one preset therefore costs a
//! couple of reconciles, not one each. A failed run satisfies nobody: its waiters run again.

use std::{collections::HashMap, future::Future, sync::Mutex};

use tokio::sync::watch;
use uuid::Uuid;

#[derive(Debug)]
struct Slot {
    /// Requests seen so far (a counter; each request needs a run that starts after it).
    requested: u64,
    /// Highest request number a completed run satisfied.
    satisfied: u64,
    running: bool,
    /// Waiters currently interested in this slot (to drop idle slots).
    interested: usize,
    done: watch::Sender<u64>,
}

/// What happened to one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Flight<T> {
    /// This request ran the reconcile.
    Ran(T),
    /// A run that started after this request arrived completed successfully.
    Coalesced,
}

#[derive(Debug, Default)]
pub struct SingleFlight {
    slots: Mutex<HashMap<Uuid, Slot>>,
}

impl SingleFlight {
    /// Runs `work` for `key` unless a run starting after this call completes first.
    pub async fn run<T, E, F, Fut>(&self, key: Uuid, mut work: F) -> Result<Flight<T>, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let (mine, mut done) = {
            let mut slots = self
                .slots
                .lock()
                .expect("single-flight map is never poisoned");
            let slot = slots.entry(key).or_insert_with(|| Slot {
                requested: 0,
                satisfied: 0,
                running: false,
                interested: 0,
                done: watch::channel(0).0,
            });
            slot.requested += 1;
            slot.interested += 1;
            (slot.requested, slot.done.subscribe())
        };
        let outcome = loop {
            let start = {
                let mut slots = self
                    .slots
                    .lock()
                    .expect("single-flight map is never poisoned");
                let slot = slots
                    .get_mut(&key)
                    .expect("the slot lives while someone is interested");
                if slot.satisfied >= mine {
                    break Ok(Flight::Coalesced);
                }
                if slot.running {
                    None
                } else {
                    slot.running = true;
                    // Every request seen so far arrived before this run starts.
                    Some(slot.requested)
                }
            };
            let Some(covers) = start else {
                // Someone else is running: wait for it to finish, then look again.
                let _ = done.changed().await;
                continue;
            };
            let result = work().await;
            let mut slots = self
                .slots
                .lock()
                .expect("single-flight map is never poisoned");
            let slot = slots
                .get_mut(&key)
                .expect("the slot lives while someone is interested");
            slot.running = false;
            if result.is_ok() {
                slot.satisfied = slot.satisfied.max(covers);
            }
            slot.done.send_replace(slot.satisfied);
            break result.map(Flight::Ran);
        };
        let mut slots = self
            .slots
            .lock()
            .expect("single-flight map is never poisoned");
        if let Some(slot) = slots.get_mut(&key) {
            slot.interested -= 1;
            if slot.interested == 0 && !slot.running {
                slots.remove(&key);
            }
        }
        outcome
    }

    /// Presets with a slot (for tests: idle slots are dropped).
    pub fn tracked(&self) -> usize {
        self.slots
            .lock()
            .expect("single-flight map is never poisoned")
            .len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use super::*;

    #[tokio::test]
    async fn a_burst_on_one_key_runs_at_most_twice_and_everyone_is_answered() {
        let flight = Arc::new(SingleFlight::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let key = Uuid::new_v4();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let flight = flight.clone();
                let runs = runs.clone();
                tokio::spawn(async move {
                    flight
                        .run(key, || async {
                            runs.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            Ok::<_, ()>(())
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
        let n = runs.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "{n} runs for one burst");
        assert_eq!(flight.tracked(), 0, "idle slots are dropped");
    }

    #[tokio::test]
    async fn a_request_arriving_during_a_run_gets_a_run_of_its_own() {
        let flight = Arc::new(SingleFlight::default());
        let key = Uuid::new_v4();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let first = {
            let flight = flight.clone();
            tokio::spawn(async move {
                let mut started = Some(started_tx);
                flight
                    .run(key, || {
                        let s = started.take();
                        async move {
                            if let Some(s) = s {
                                let _ = s.send(());
                            }
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            Ok::<_, ()>(1)
                        }
                    })
                    .await
            })
        };
        started_rx.await.unwrap();
        // Arrived after the first run started: the first run cannot answer it.
        let second = flight.run(key, || async { Ok::<_, ()>(2) }).await.unwrap();
        assert_eq!(second, Flight::Ran(2));
        assert_eq!(first.await.unwrap().unwrap(), Flight::Ran(1));
    }

    #[tokio::test]
    async fn a_failed_run_satisfies_nobody() {
        let flight = SingleFlight::default();
        let key = Uuid::new_v4();
        assert!(flight
            .run(key, || async { Err::<(), _>("down") })
            .await
            .is_err());
        assert_eq!(
            flight.run(key, || async { Ok::<_, ()>(7) }).await.unwrap(),
            Flight::Ran(7)
        );
    }
}
