//! The bounded memory of finished jobs: a redelivered job found here republishes its recorded
//! events instead of running again. Oldest records are forgotten first; a job redelivered after its
//! record was forgotten runs again, which is still safe because event ids are deterministic and the
//! sim backend's outcome is a function of the job (a real terraform build is re-planned against its
//! state, see `terraform`).

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
};

use uuid::Uuid;

use crate::events::JobRecord;

#[derive(Debug)]
pub struct CompletedJobs {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    records: HashMap<Uuid, Arc<JobRecord>>,
    order: VecDeque<Uuid>,
}

impl CompletedJobs {
    pub fn new(capacity: usize) -> Self {
        CompletedJobs {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn get(&self, job_id: Uuid) -> Option<Arc<JobRecord>> {
        // Poisoning cannot leave the map half-updated: every operation below is a plain insert or
        // remove.
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.records.get(&job_id).cloned()
    }

    pub fn insert(&self, record: Arc<JobRecord>) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner
            .records
            .insert(record.job_id, record.clone())
            .is_none()
        {
            inner.order.push_back(record.job_id);
        }
        while inner.order.len() > self.capacity {
            if let Some(oldest) = inner.order.pop_front() {
                inner.records.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use prebuilds_schemas::JobOutcome;

    use super::*;

    fn record(n: u128) -> Arc<JobRecord> {
        Arc::new(JobRecord {
            job_id: Uuid::from_u128(n),
            status: JobOutcome::Succeeded,
            events: vec![],
        })
    }

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let jobs = CompletedJobs::new(2);
        jobs.insert(record(1));
        jobs.insert(record(2));
        jobs.insert(record(2));
        assert!(jobs.get(Uuid::from_u128(1)).is_some());
        jobs.insert(record(3));
        assert!(jobs.get(Uuid::from_u128(1)).is_none());
        assert!(jobs.get(Uuid::from_u128(2)).is_some());
        assert!(jobs.get(Uuid::from_u128(3)).is_some());
    }
}
