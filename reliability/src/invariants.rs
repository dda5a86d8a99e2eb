//! The invariants checked after convergence. Each check returns measured numbers, pass or fail, so
//! the report says *how much* held, not just whether.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use prebuilds_runtime::amqp::{consumer::DEAD_REASON_HEADER, QueueKind};
use prebuilds_schemas::{ProvisionerEvent, ProvisionerJob, RawEvent, PREBUILDS_USER_ID};
use prebuilds_tests::{stack::pool_counts, TestDb};
use uuid::Uuid;

use crate::{load::ClaimStats, stack::Stack, wire};

/// One invariant's verdict with its measured numbers.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub pass: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: &'static str, pass: bool, detail: impl Into<String>) -> Check {
        Check {
            name,
            pass,
            detail: detail.into(),
        }
    }
}

async fn client(db: &TestDb) -> anyhow::Result<deadpool_postgres::Object> {
    Ok(db.pool.get().await?)
}

/// Every preset's pool equals its effective desired count (0 when inactive): that many running,
/// all ready, nothing in progress.
pub async fn presets_at_desired(db: &TestDb) -> anyhow::Result<Check> {
    let c = client(db).await?;
    let presets = c
        .query(
            "SELECT p.id,
                    CASE WHEN a.active THEN coalesce(p.desired_instances, 0) ELSE 0 END AS desired
             FROM template_version_presets p
             JOIN preset_activity a ON a.preset_id = p.id",
            &[],
        )
        .await?;
    let (mut at, mut want, mut have) = (0, 0i64, 0i64);
    let mut off = Vec::new();
    for row in &presets {
        let id: Uuid = row.get(0);
        let desired: i32 = row.get(1);
        let counts = pool_counts(db, id).await;
        want += desired as i64;
        have += counts.eligible;
        if counts.running == desired as i64
            && counts.eligible == desired as i64
            && counts.in_progress == 0
        {
            at += 1;
        } else if off.len() < 3 {
            off.push(format!(
                "{id}: desired {desired}, running {}, eligible {}, in progress {}",
                counts.running, counts.eligible, counts.in_progress
            ));
        }
    }
    let pass = at == presets.len();
    let mut detail = format!(
        "{at}/{} presets at desired ({have}/{want} prebuilds eligible)",
        presets.len()
    );
    if !pass {
        detail.push_str(&format!("; e.g. {}", off.join("; ")));
    }
    Ok(Check::new("presets at desired", pass, detail))
}

/// Nothing left to do: no open job, the outbox relayed, the work queues empty.
pub async fn drained(stack: &Stack, include_reconcile: bool) -> anyhow::Result<Check> {
    let c = client(&stack.db).await?;
    let open: i64 = c
        .query_one(
            "SELECT count(*) FROM provisioner_jobs WHERE job_status IN ('pending', 'running', 'canceling')",
            &[],
        )
        .await?
        .get(0);
    let unpublished: i64 = c
        .query_one(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL",
            &[],
        )
        .await?
        .get(0);
    let mut queues = vec![
        QueueKind::Claims,
        QueueKind::ProvisionerJobs,
        QueueKind::ProvisionerJobsUser,
        QueueKind::ProvisionerEvents,
    ];
    if include_reconcile {
        queues.push(QueueKind::Reconcile);
    }
    let mut depths = Vec::new();
    let mut queued = 0u32;
    for q in queues {
        let d = wire::queue_depth(&stack.broker.url, &stack.broker.queue(q))
            .await
            .unwrap_or(u32::MAX);
        queued = queued.saturating_add(d);
        depths.push(format!("{} {d}", q.suffix()));
    }
    let pass = open == 0 && unpublished == 0 && queued == 0;
    Ok(Check::new(
        "drained",
        pass,
        format!(
            "open jobs {open}, unpublished outbox rows {unpublished}, queued: {}",
            depths.join(", ")
        ),
    ))
}

/// Polls until the presets are at desired and the system is drained, or `timeout`.
pub async fn converge(stack: &Stack, timeout: Duration) -> Check {
    let started = Instant::now();
    loop {
        let at = presets_at_desired(&stack.db).await;
        let dr = drained(stack, false).await;
        let (at, dr) = match (at, dr) {
            (Ok(a), Ok(d)) => (a, d),
            (Err(e), _) | (_, Err(e)) => {
                let failed = Check::new("converged", false, format!("error: {e:#}"));
                if started.elapsed() > timeout {
                    return failed;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if at.pass && dr.pass {
            return Check::new(
                "converged",
                true,
                format!(
                    "in {:.1}s after the faults",
                    started.elapsed().as_secs_f64()
                ),
            );
        }
        if started.elapsed() > timeout {
            return Check::new(
                "converged",
                false,
                format!(
                    "not within {}s: {}; {}",
                    timeout.as_secs(),
                    at.detail,
                    dr.detail
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every provisioner job row was published (one message id per job, however often delivered) and
/// executed once by the provisioner.
pub async fn jobs_exactly_once(stack: &Stack) -> anyhow::Result<Check> {
    let c = client(&stack.db).await?;
    let rows = c
        // Orphan deletes (of canceled, never-provisioned creates) are completed in the database
        // by design: no provisioner job is published for them.
        .query(
            "SELECT id, job_status FROM provisioner_jobs WHERE NOT coalesce((input->>'orphan')::boolean, false)",
            &[],
        )
        .await?;
    let mut by_job: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
    let seen = stack.jobs_tap.seen();
    let mut undecodable = 0;
    for s in &seen {
        match RawEvent::parse(&s.body).and_then(|r| r.decode::<ProvisionerJob>()) {
            Ok(e) => {
                by_job.entry(e.data.job_id).or_default().insert(e.id);
            }
            Err(_) => undecodable += 1,
        }
    }
    let mut unpublished = 0;
    let mut canceled = 0;
    for row in &rows {
        let id: Uuid = row.get(0);
        let status: &str = row.get(1);
        if status == "canceled" {
            canceled += 1;
        }
        if !by_job.contains_key(&id) {
            unpublished += 1;
        }
    }
    let multi = by_job.values().filter(|ids| ids.len() > 1).count();
    let unknown = by_job
        .keys()
        .filter(|id| !rows.iter().any(|r| r.get::<_, Uuid>(0) == **id))
        .count();
    let executed = stack.provisioner_executed().await.unwrap_or(-1.0) as i64;
    let replayed = stack.provisioner_replayed().await.unwrap_or(-1.0) as i64;
    let published = by_job.len() as i64;
    // A job canceled before the provisioner reached it may be skipped; none may run twice.
    let executed_ok = executed <= published && executed + canceled >= published;
    let pass = unpublished == 0 && multi == 0 && unknown == 0 && undecodable == 0 && executed_ok;
    Ok(Check::new(
        "jobs published and executed once",
        pass,
        format!(
            "{} job rows; {published} published ({} deliveries, {multi} with >1 message id, {unpublished} never published, {unknown} without a row, {undecodable} undecodable); provisioner executed {executed}, replayed {replayed} redeliveries",
            rows.len(),
            seen.len()
        ),
    ))
}

/// No worker holds a delivery in in-place retries any more (waited for up to `bound`): every
/// message the broker handed out has been settled, so the database shows all that was applied.
pub async fn retries_settled(stack: &Stack, bound: Duration) -> Check {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < bound {
        last = stack.workers_in_retry().await;
        if last == Some(0.0) {
            return Check::new(
                "in-place retries settled",
                true,
                format!(
                    "no delivery in retry after {:.1}s",
                    started.elapsed().as_secs_f64()
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Check::new(
        "in-place retries settled",
        false,
        format!("still {last:?} deliveries in retry after {bound:?}"),
    )
}

/// Every provisioner event that reached the workers' exchange is reflected in the database:
/// completions set the job status, log lines are stored exactly once, agents end in the state of
/// their latest lifecycle event (none at all for a job that ended canceled or failed: its agent
/// events are refused as stale), started jobs have `started_at`.
pub async fn events_applied(stack: &Stack) -> anyhow::Result<Check> {
    let seen = stack.events_tap.seen();
    let mut events: HashMap<Uuid, (chrono::DateTime<chrono::Utc>, ProvisionerEvent)> =
        HashMap::new();
    // The poison scenario's own messages (unknown job ids) are not provisioner events.
    for s in seen
        .iter()
        .filter(|s| !s.message_id.as_deref().unwrap_or("").starts_with("poison-"))
    {
        if let Ok(raw) = RawEvent::parse(&s.body) {
            let time = raw.time;
            if let Ok((id, e)) = ProvisionerEvent::decode(raw) {
                events.insert(id, (time, e));
            }
        }
    }
    let c = client(&stack.db).await?;
    let jobs: HashMap<Uuid, (String, bool)> = c
        .query(
            "SELECT id, job_status, started_at IS NOT NULL FROM provisioner_jobs",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let logs: HashMap<Uuid, i64> = c
        .query(
            "SELECT job_id, count(*) FROM provisioner_job_logs GROUP BY job_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let agents: HashMap<(Uuid, String), (String, bool)> = c
        .query(
            "SELECT job_id, name, lifecycle_state, deleted FROM workspace_agents",
            &[],
        )
        .await?
        .iter()
        .map(|r| ((r.get(0), r.get(1)), (r.get(2), r.get(3))))
        .collect();

    let (mut completed_bad, mut started_bad, mut agent_bad) = (0, 0, 0);
    let mut expected_lines: HashMap<Uuid, i64> = HashMap::new();
    let mut last_state: BTreeMap<(Uuid, String), (chrono::DateTime<chrono::Utc>, String)> =
        BTreeMap::new();
    let mut examples = Vec::new();
    for (time, event) in events.values() {
        match event {
            ProvisionerEvent::JobCompleted(e) => {
                let want = serde_json::to_value(e.status).unwrap_or_default();
                let want = want.as_str().unwrap_or_default().to_owned();
                match jobs.get(&e.job_id) {
                    Some((status, _)) if *status == want || status == "canceled" => {}
                    other => {
                        completed_bad += 1;
                        if examples.len() < 2 {
                            examples.push(format!(
                                "job {} completed {want} but is {:?}",
                                e.job_id,
                                other.map(|o| &o.0)
                            ));
                        }
                    }
                }
            }
            ProvisionerEvent::JobStarted(e) => {
                // A job canceled before it started ignores a late start, by design.
                if !jobs
                    .get(&e.job_id)
                    .is_some_and(|j| j.1 || j.0 == "canceled")
                {
                    started_bad += 1;
                }
            }
            ProvisionerEvent::JobLog(e) => {
                *expected_lines.entry(e.job_id).or_default() += e.logs.len() as i64;
            }
            ProvisionerEvent::AgentLifecycle(e) => {
                let state = serde_json::to_value(e.lifecycle_state).unwrap_or_default();
                let state = state.as_str().unwrap_or_default().to_owned();
                let key = (e.job_id, e.agent_name.clone());
                if last_state.get(&key).is_none_or(|(t, _)| t < time) {
                    last_state.insert(key, (*time, state));
                }
            }
            ProvisionerEvent::PlanResult(_) => {}
        }
    }
    for (key, (_, want)) in &last_state {
        // A job that ended without a build (canceled while the provisioner ran it anyway, or
        // failed) gets no agents: its late agent events are refused as stale (prebuilds_core::admit).
        let ended_without_build = jobs
            .get(&key.0)
            .is_some_and(|(status, _)| status == "canceled" || status == "failed");
        match agents.get(key) {
            Some((state, deleted)) if state == want || *deleted => {}
            None if ended_without_build => {}
            other => {
                agent_bad += 1;
                if examples.len() < 4 {
                    examples.push(format!(
                        "agent {}/{} last event {want} but is {:?}",
                        key.0,
                        key.1,
                        other.map(|o| &o.0)
                    ));
                }
            }
        }
    }
    let logs_bad = expected_lines
        .iter()
        .filter(|(job, n)| logs.get(job).copied().unwrap_or(0) != **n)
        .count();
    let pass = completed_bad == 0 && started_bad == 0 && agent_bad == 0 && logs_bad == 0;
    let mut detail = format!(
        "{} distinct events ({} deliveries): completions wrong {completed_bad}, starts missing {started_bad}, agents wrong {agent_bad}/{}, jobs with log lines not stored exactly once {logs_bad}/{}",
        events.len(),
        seen.len(),
        last_state.len(),
        expected_lines.len()
    );
    if !examples.is_empty() {
        detail.push_str(&format!("; e.g. {}", examples.join("; ")));
    }
    Ok(Check::new("provisioner events applied", pass, detail))
}

/// No workspace owned by a user has a delete build or was deleted (a claim and a delete never
/// both win).
pub async fn claimed_never_deleted(db: &TestDb) -> anyhow::Result<Check> {
    let c = client(db).await?;
    let row = c
        .query_one(
            "SELECT count(*) FILTER (WHERE w.deleted OR w.deleting_at IS NOT NULL
                                      OR EXISTS (SELECT 1 FROM workspace_builds b
                                                 WHERE b.workspace_id = w.id AND b.transition = 'delete')),
                    count(*)
             FROM workspaces w WHERE w.owner_id <> $1",
            &[&PREBUILDS_USER_ID],
        )
        .await?;
    let (bad, owned): (i64, i64) = (row.get(0), row.get(1));
    Ok(Check::new(
        "no workspace claimed and deleted",
        bad == 0,
        format!("{owned} user-owned workspaces, {bad} with a delete"),
    ))
}

/// Each claim request id maps to one workspace and each workspace to one claim; every claimed
/// workspace belongs to its claimant; replays return the first outcome.
pub async fn no_double_claim(db: &TestDb, stats: &ClaimStats) -> anyhow::Result<Check> {
    let c = client(db).await?;
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT workspace_id) FROM claim_requests WHERE outcome = 'claimed'",
            &[],
        )
        .await?;
    let (db_claims, db_distinct): (i64, i64) = (row.get(0), row.get(1));
    let orphans: i64 = c
        .query_one(
            "SELECT count(*) FROM workspaces w WHERE w.owner_id <> $1 AND NOT EXISTS
               (SELECT 1 FROM claim_requests c WHERE c.workspace_id = w.id AND c.user_id = w.owner_id AND c.outcome = 'claimed')",
            &[&PREBUILDS_USER_ID],
        )
        .await?
        .get(0);
    let owners: HashMap<Uuid, Uuid> = c
        .query("SELECT id, owner_id FROM workspaces", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut by_workspace: HashMap<Uuid, HashSet<Uuid>> = HashMap::new();
    let mut wrong_owner = 0;
    for r in &stats.records {
        if let Some(ws) = r.reply.workspace_id {
            by_workspace.entry(ws).or_default().insert(r.request_id);
            if owners.get(&ws) != Some(&r.user) {
                wrong_owner += 1;
            }
        }
    }
    let client_double = by_workspace.values().filter(|ids| ids.len() > 1).count();
    let outcomes = stats.records.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.reply.outcome.as_str()).or_insert(0) += 1;
        m
    });
    let pass = db_claims == db_distinct
        && orphans == 0
        && client_double == 0
        && wrong_owner == 0
        && stats.replay_mismatches == 0;
    Ok(Check::new(
        "no double claim",
        pass,
        format!(
            "{} requests answered ({outcomes:?}), {} retried under the same id, {} abandoned; {} replays, {} changed; DB: {db_claims} claims on {db_distinct} workspaces, {orphans} owned without a claim; client: {client_double} workspaces claimed twice, {wrong_owner} not owned by the claimant",
            stats.records.len(),
            stats.retries,
            stats.gave_up,
            stats.replays,
            stats.replay_mismatches
        ),
    ))
}

/// The dead-letter queue holds exactly the expected poison messages, each with its reason header.
pub async fn dead_letters(stack: &Stack, expected: &HashSet<String>) -> anyhow::Result<Check> {
    let queue = stack.broker.topology.dead_queue();
    // Poison is dead-lettered asynchronously: wait (bounded) until it is all there.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let depth = wire::queue_depth(&stack.broker.url, &queue)
            .await
            .unwrap_or(0) as usize;
        if depth >= expected.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let dead = wire::drain(&stack.broker.url, &queue, Duration::from_secs(2)).await?;
    let mut found = HashSet::new();
    let (mut without_reason, mut unexpected) = (0, 0);
    let mut reasons: BTreeMap<String, String> = BTreeMap::new();
    let mut strangers = Vec::new();
    for d in &dead {
        let id = d.message_id.clone().unwrap_or_default();
        let reason = d.header(DEAD_REASON_HEADER);
        if expected.contains(&id) {
            found.insert(id.clone());
            match reason {
                Some(r) if !r.is_empty() => {
                    let kind = id.rsplit('-').next().unwrap_or_default().to_owned();
                    reasons
                        .entry(kind)
                        .or_insert_with(|| r.chars().take(80).collect());
                }
                _ => without_reason += 1,
            }
        } else {
            unexpected += 1;
            if strangers.len() < 2 {
                strangers.push(format!(
                    "{} on {} ({})",
                    id,
                    d.routing_key,
                    reason.unwrap_or("no reason header: broker delivery limit?")
                ));
            }
        }
    }
    let missing = expected.len() - found.len();
    let pass = missing == 0 && without_reason == 0 && unexpected == 0;
    let mut detail = format!(
        "{} dead-lettered: {}/{} poison found, {without_reason} without reason, {unexpected} valid messages dead-lettered",
        dead.len(),
        found.len(),
        expected.len()
    );
    if !strangers.is_empty() {
        detail.push_str(&format!("; e.g. {}", strangers.join("; ")));
    }
    Ok(Check::new("dead letters", pass, detail))
}

pub fn no_crash(stack: &Stack) -> Check {
    let crashed = stack.crashed();
    Check::new(
        "no process crashed",
        crashed.is_empty(),
        format!(
            "{} workers + scheduler + provisioner alive check: {} crashed{}; {} killed on purpose",
            stack.workers.len(),
            crashed.len(),
            if crashed.is_empty() {
                String::new()
            } else {
                format!(" ({})", crashed.join(", "))
            },
            stack.killed
        ),
    )
}

pub fn worker_memory(stack: &Stack) -> Check {
    let peak = stack.worker_peak_rss_mib();
    let bound = stack.profile.worker_memory_bound_mib;
    Check::new(
        "worker memory bounded",
        peak > 0.0 && peak < bound,
        format!("peak VmHWM {peak:.1} MiB (bound {bound:.0} MiB)"),
    )
}
