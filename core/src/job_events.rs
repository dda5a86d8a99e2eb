//! Which provisioner event a job accepts in each of its states: the one home of that rule.
//!
//! A job moves `pending → running (→ canceling) → succeeded | failed | canceled`, and each event
//! kind belongs to one step of that path. An event that comes *after* its step is stale (a start
//! for a running job, anything that would change a terminal job): recorded and ignored, because
//! a redelivery or a late copy must never move a job backwards. An event that comes *before* its
//! step (a completion for a job that never started, an agent lifecycle change for a build that
//! has not completed) is either a forgery or overtook its predecessor on the way: workers apply
//! events concurrently and the broker redelivers out of order, so it is deferred — retried
//! shortly, and refused with its reason when what it follows never arrives.
//!
//! Log lines and the plan record are history rather than state; they are outside this rule
//! (a plan result is taken once for any job that has started, see [`admit`]).

use std::fmt;

/// A provisioner job's status, as stored in `provisioner_jobs.job_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Pending,
    Running,
    Canceling,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 6] = [
        JobStatus::Pending,
        JobStatus::Running,
        JobStatus::Canceling,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Running => "running",
            JobStatus::Canceling => "canceling",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    /// Parses the stored text; `None` for anything else (a schema this code does not know).
    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
    }

    /// No event changes a job in this state any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled
        )
    }
}

impl std::str::FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobStatus::parse(s).ok_or_else(|| format!("unknown job status {s:?}"))
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The provisioner events that are subject to the job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobEventKind {
    Started,
    PlanResult,
    Completed,
    AgentLifecycle,
}

impl JobEventKind {
    pub const ALL: [JobEventKind; 4] = [
        JobEventKind::Started,
        JobEventKind::PlanResult,
        JobEventKind::Completed,
        JobEventKind::AgentLifecycle,
    ];
}

/// What to do with an event, given the job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Apply it.
    Apply,
    /// It comes after its step: record it and change nothing. The text says why.
    Stale(&'static str),
    /// It comes before its step: defer it; refuse it with this reason if its predecessor never
    /// arrives.
    NotYet(&'static str),
}

/// Whether an event of `kind` applies to a job in `status`.
pub fn admit(kind: JobEventKind, status: JobStatus) -> Admission {
    use Admission::{Apply, NotYet, Stale};
    use JobStatus::*;
    match (kind, status) {
        (JobEventKind::Started, Pending) => Apply,
        (JobEventKind::Started, Running | Canceling) => Stale("the job has already started"),
        (JobEventKind::Started, Succeeded | Failed | Canceled) => Stale("the job has ended"),

        // A plan is made while the job runs; its record may arrive after the completion.
        (JobEventKind::PlanResult, Pending) => {
            NotYet("a plan result for a job that has not started")
        }
        (JobEventKind::PlanResult, _) => Apply,

        (JobEventKind::Completed, Pending) => NotYet("a completion for a job that never started"),
        (JobEventKind::Completed, Running | Canceling) => Apply,
        (JobEventKind::Completed, Succeeded | Failed | Canceled) => Stale("the job has ended"),

        // Agents exist only once the build that made them has succeeded.
        (JobEventKind::AgentLifecycle, Pending | Running | Canceling) => {
            NotYet("an agent event for a build that has not completed")
        }
        (JobEventKind::AgentLifecycle, Succeeded) => Apply,
        (JobEventKind::AgentLifecycle, Failed | Canceled) => {
            Stale("the build ended without a workspace, so it has no agents")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Admission::*;
    use JobEventKind as K;
    use JobStatus::*;

    #[test]
    fn every_event_in_every_state() {
        let apply = Apply;
        let stale = |s| Stale(s);
        let not_yet = |s| NotYet(s);
        let ended = "the job has ended";
        let cases: &[(K, JobStatus, Admission)] = &[
            (K::Started, Pending, apply),
            (K::Started, Running, stale("the job has already started")),
            (K::Started, Canceling, stale("the job has already started")),
            (K::Started, Succeeded, stale(ended)),
            (K::Started, Failed, stale(ended)),
            (K::Started, Canceled, stale(ended)),
            (
                K::PlanResult,
                Pending,
                not_yet("a plan result for a job that has not started"),
            ),
            (K::PlanResult, Running, apply),
            (K::PlanResult, Canceling, apply),
            (K::PlanResult, Succeeded, apply),
            (K::PlanResult, Failed, apply),
            (K::PlanResult, Canceled, apply),
            (
                K::Completed,
                Pending,
                not_yet("a completion for a job that never started"),
            ),
            (K::Completed, Running, apply),
            (K::Completed, Canceling, apply),
            (K::Completed, Succeeded, stale(ended)),
            (K::Completed, Failed, stale(ended)),
            (K::Completed, Canceled, stale(ended)),
            (
                K::AgentLifecycle,
                Pending,
                not_yet("an agent event for a build that has not completed"),
            ),
            (
                K::AgentLifecycle,
                Running,
                not_yet("an agent event for a build that has not completed"),
            ),
            (
                K::AgentLifecycle,
                Canceling,
                not_yet("an agent event for a build that has not completed"),
            ),
            (K::AgentLifecycle, Succeeded, apply),
            (
                K::AgentLifecycle,
                Failed,
                stale("the build ended without a workspace, so it has no agents"),
            ),
            (
                K::AgentLifecycle,
                Canceled,
                stale("the build ended without a workspace, so it has no agents"),
            ),
        ];
        assert_eq!(cases.len(), K::ALL.len() * JobStatus::ALL.len());
        for (kind, status, expected) in cases {
            assert_eq!(
                admit(*kind, *status),
                *expected,
                "{kind:?} for a {status} job"
            );
        }
    }

    #[test]
    fn nothing_changes_a_terminal_job_and_only_a_start_changes_a_pending_one() {
        for kind in K::ALL {
            for status in JobStatus::ALL {
                let admission = admit(kind, status);
                // An ended job's status never changes again: only the agents of a successful
                // build move on (and the plan's record, which is history, is kept).
                let job_state_event = matches!(kind, K::Started | K::Completed);
                let agents_of_a_failed_build =
                    kind == K::AgentLifecycle && matches!(status, Failed | Canceled);
                if status.is_terminal() && (job_state_event || agents_of_a_failed_build) {
                    assert!(
                        !matches!(admission, Apply),
                        "{kind:?} must not change a {status} job"
                    );
                }
                if status == Pending {
                    assert_eq!(
                        admission == Apply,
                        kind == K::Started,
                        "{kind:?} for a pending job"
                    );
                }
            }
        }
    }

    #[test]
    fn statuses_round_trip_through_their_stored_text() {
        for status in JobStatus::ALL {
            assert_eq!(JobStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(JobStatus::parse("exploded"), None);
    }
}
