//! In-process coalescing of reconcile jobs per preset. Jobs are level-triggered, so a reconcile
//! that *starts* after a job arrived satisfies that job. Per preset this process runs at most one
//! reconcile at a time; jobs arriving meanwhile wait for the next run, which starts after all of
//! them arrived and so answers them all. A burst of claims on one preset therefore costs a
//! couple of reconciles, not one each. A failed run satisfies nobody: its waiters run again.
//!
//! Runs of one preset also start at least `spacing` apart while jobs keep coming: a sustained
//! stream of claims on a large pool would otherwise keep a reconcile of it running back to back,
//! re-reading the whole pool each time. Jobs arriving during the gap join the next run.

use std::{collections::HashMap, future::Future, sync::Mutex, time::Duration};

use tokio::{sync::watch, time::Instant};
use uuid::Uuid;

#[derive(Debug)]
struct Slot<T> {
    /// Requests seen so far (a counter; each request needs a run that starts after it).
    requested: u64,
    /// Highest request number a completed run satisfied.
    satisfied: u64,
    running: bool,
    /// When the last run started (kept while the slot lives, i.e. while jobs keep coming).
    last_started: Option<Instant>,
    /// What the last successful run returned (handed to the requests it answered).
    last_output: Option<T>,
    /// Waiters currently interested in this slot (to drop idle slots).
    interested: usize,
    done: watch::Sender<u64>,
}

/// One caller's interest in a key, given up on drop (see [`SingleFlight::leave`]).
struct Interest<'a, T: Clone> {
    flight: &'a SingleFlight<T>,
    key: Uuid,
    /// This caller is running (or sleeping before) the key's run and has not finished it.
    running: bool,
}

impl<T: Clone> Drop for Interest<'_, T> {
    fn drop(&mut self) {
        self.flight.leave(self.key, self.running);
    }
}

/// What happened to one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Flight<T> {
    /// This request ran the reconcile.
    Ran(T),
    /// A run that started after this request arrived completed successfully with this result.
    Coalesced(T),
}

#[derive(Debug)]
pub struct SingleFlight<T> {
    slots: Mutex<HashMap<Uuid, Slot<T>>>,
    /// Least time between the starts of two runs of one key.
    spacing: Duration,
    /// When idle slots of all keys were last swept.
    swept_at: Mutex<Option<Instant>>,
}

impl<T: Clone> Default for SingleFlight<T> {
    fn default() -> Self {
        SingleFlight::with_spacing(Duration::ZERO)
    }
}

impl<T: Clone> SingleFlight<T> {
    pub fn with_spacing(spacing: Duration) -> Self {
        SingleFlight {
            slots: Mutex::default(),
            spacing,
            swept_at: Mutex::default(),
        }
    }

    /// Runs `work` for `key` unless a run starting after this call completes first.
    pub async fn run<E, F, Fut>(&self, key: Uuid, mut work: F) -> Result<Flight<T>, E>
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
                last_started: None,
                last_output: None,
                interested: 0,
                done: watch::channel(0).0,
            });
            slot.requested += 1;
            slot.interested += 1;
            (slot.requested, slot.done.subscribe())
        };
        // Dropped when this call ends, returned or cancelled: gives up the interest (and the run,
        // if it was ours and unfinished, so waiters do not wait for it forever).
        let mut guard = Interest {
            flight: self,
            key,
            running: false,
        };
        loop {
            let start = self.with_slot(key, |slot| {
                if slot.satisfied >= mine {
                    let output = slot
                        .last_output
                        .clone()
                        .expect("a satisfied request was answered by a successful run");
                    return Err(output);
                }
                if slot.running {
                    Ok(None)
                } else {
                    slot.running = true;
                    Ok(Some(slot.last_started))
                }
            });
            let start = match start {
                Err(output) => return Ok(Flight::Coalesced(output)),
                Ok(start) => start,
            };
            let Some(last_started) = start else {
                // Someone else is running: wait for it to finish, then look again.
                let _ = done.changed().await;
                continue;
            };
            guard.running = true;
            if let Some(last_started) = last_started {
                tokio::time::sleep_until(last_started + self.spacing).await;
            }
            let covers = self.with_slot(key, |slot| {
                slot.last_started = Some(Instant::now());
                // Every request seen so far arrived before this run starts.
                slot.requested
            });
            let result = work().await;
            guard.running = false;
            self.with_slot(key, |slot| {
                slot.running = false;
                if let Ok(output) = &result {
                    slot.satisfied = slot.satisfied.max(covers);
                    slot.last_output = Some(output.clone());
                }
                slot.done.send_replace(slot.satisfied);
            });
            return result.map(Flight::Ran);
        }
    }

    /// Gives up one caller's interest in `key` (ending its unfinished run, if any) and drops idle
    /// slots whose spacing has passed.
    fn leave(&self, key: Uuid, abandoned_run: bool) {
        let mut slots = self
            .slots
            .lock()
            .expect("single-flight map is never poisoned");
        let now = Instant::now();
        let spacing = self.spacing;
        // Idle slots go once their spacing has passed; one that ran recently stays, so the next
        // job for its key still waits out the gap. Other keys' stale slots are swept at most once
        // per spacing (the map holds only keys active within about one spacing).
        let stale = |slot: &Slot<T>| {
            slot.interested == 0
                && !slot.running
                && slot.last_started.is_none_or(|t| now >= t + spacing)
        };
        if let Some(slot) = slots.get_mut(&key) {
            if abandoned_run {
                // Nobody was answered: wake the waiters so one of them runs instead.
                slot.running = false;
                slot.done.send_replace(slot.satisfied);
            }
            slot.interested -= 1;
            if stale(slot) {
                slots.remove(&key);
            }
        }
        let mut swept_at = self.swept_at.lock().expect("never poisoned");
        if swept_at.is_none_or(|t| now >= t + spacing) {
            slots.retain(|_, slot| !stale(slot));
            *swept_at = Some(now);
        }
    }

    /// Runs `f` on the slot of `key`, which lives while someone is interested in it.
    fn with_slot<R>(&self, key: Uuid, f: impl FnOnce(&mut Slot<T>) -> R) -> R {
        let mut slots = self
            .slots
            .lock()
            .expect("single-flight map is never poisoned");
        f(slots
            .get_mut(&key)
            .expect("the slot lives while someone is interested"))
    }

    /// Presets with a slot (for tests: idle slots are dropped once their spacing has passed).
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
        Arc, Mutex,
    };

    use super::*;

    /// Requests of `key` waiting or running now (for tests to synchronise on).
    fn interested<T: Clone>(flight: &SingleFlight<T>, key: Uuid) -> usize {
        flight
            .slots
            .lock()
            .unwrap()
            .get(&key)
            .map_or(0, |slot| slot.interested)
    }

    #[tokio::test]
    async fn a_burst_during_a_run_costs_exactly_one_more_run_and_everyone_is_answered() {
        let flight = Arc::new(SingleFlight::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let key = Uuid::new_v4();
        // Run 1 is held open until the whole burst has arrived behind it.
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        let release = Arc::new(Mutex::new(Some(release_rx)));
        let request = |flight: Arc<SingleFlight<usize>>| {
            let (runs, release) = (runs.clone(), release.clone());
            tokio::spawn(async move {
                flight
                    .run(key, || {
                        let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                        let gate = release.lock().unwrap().take();
                        async move {
                            if let Some(gate) = gate {
                                let _ = gate.await;
                            }
                            Ok::<_, ()>(run)
                        }
                    })
                    .await
            })
        };
        let first = request(flight.clone());
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let burst: Vec<_> = (0..49).map(|_| request(flight.clone())).collect();
        while interested(&flight, key) < 50 {
            tokio::task::yield_now().await;
        }
        release_tx.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap(), Flight::Ran(1));
        let mut ran = 0;
        for task in burst {
            match task.await.unwrap().unwrap() {
                // The burst arrived during run 1: only a run that started after it answers it.
                Flight::Ran(run) => {
                    assert_eq!(run, 2);
                    ran += 1;
                }
                Flight::Coalesced(run) => assert_eq!(run, 2),
            }
        }
        assert_eq!(
            ran, 1,
            "one of the burst ran, the others were answered by it"
        );
        assert_eq!(runs.load(Ordering::SeqCst), 2, "a burst of 49 cost one run");
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

    #[tokio::test(start_paused = true)]
    async fn runs_of_one_key_start_at_least_the_spacing_apart_and_share_the_gap() {
        let spacing = Duration::from_millis(100);
        let flight = Arc::new(SingleFlight::with_spacing(spacing));
        let key = Uuid::new_v4();
        let starts = Arc::new(Mutex::new(Vec::new()));
        // A steady stream: a job every 10 ms for a second, each run taking 5 ms.
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let flight = flight.clone();
            let starts = starts.clone();
            tasks.push(tokio::spawn(async move {
                flight
                    .run(key, || {
                        let starts = starts.clone();
                        async move {
                            starts.lock().unwrap().push(Instant::now());
                            tokio::time::sleep(Duration::from_millis(5)).await;
                            Ok::<_, ()>(())
                        }
                    })
                    .await
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for t in tasks {
            assert!(t.await.unwrap().is_ok(), "every job is answered");
        }
        let starts = starts.lock().unwrap();
        for pair in starts.windows(2) {
            assert!(
                pair[1] - pair[0] >= spacing,
                "runs {:?} apart",
                pair[1] - pair[0]
            );
        }
        assert!(
            (9..=12).contains(&starts.len()),
            "{} runs for 100 jobs over a second",
            starts.len()
        );
    }

    #[tokio::test]
    async fn a_run_abandoned_midway_does_not_stall_its_key() {
        let flight = Arc::new(SingleFlight::default());
        let key = Uuid::new_v4();
        let stuck = {
            let flight = flight.clone();
            tokio::spawn(async move {
                flight
                    .run(key, std::future::pending::<Result<i32, ()>>)
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        // A request arrives while the first run hangs; then the first is cancelled.
        let waiter = {
            let flight = flight.clone();
            tokio::spawn(async move { flight.run(key, || async { Ok::<_, ()>(2) }).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        stuck.abort();
        let answer = tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("the waiter runs instead of waiting forever")
            .unwrap()
            .unwrap();
        assert_eq!(answer, Flight::Ran(2));
        assert_eq!(flight.tracked(), 0, "no slot left behind");
    }

    #[tokio::test]
    async fn a_failed_run_satisfies_nobody() {
        let flight = SingleFlight::default();
        let key = Uuid::new_v4();
        assert!(flight
            .run(key, || async { Err::<i32, _>("down") })
            .await
            .is_err());
        assert_eq!(
            flight.run(key, || async { Ok::<_, ()>(7) }).await.unwrap(),
            Flight::Ran(7)
        );
    }
}
