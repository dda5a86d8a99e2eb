//! The results as a terminal table and as `RELIABILITY.md`: scenario → load → faults → invariants
//! checked → result, with the measured numbers of every check.

use crate::{Outcome, Profile, Scenario};

fn result_cell(o: &Outcome) -> String {
    let verdict = if o.passed() { "**pass**" } else { "**FAIL**" };
    let checks = o
        .checks
        .iter()
        .map(|c| {
            format!(
                "{} {}: {}",
                if c.pass { "✓" } else { "✗" },
                c.name,
                c.detail
            )
        })
        .collect::<Vec<_>>()
        .join("<br>");
    format!("{verdict} ({:.0}s)<br>{checks}", o.seconds)
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|")
}

/// One scenario's table row.
fn row(o: &Outcome) -> String {
    let names = o
        .checks
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "| {} | {} | {} | {} | {} |\n",
        o.scenario.name(),
        escape(&o.load),
        escape(&o.faults),
        names,
        escape(&result_cell(o))
    )
}

/// The Markdown report.
pub fn markdown(outcomes: &[Outcome], profile: &Profile, command: &str) -> String {
    document(
        &outcomes.iter().map(row).collect::<Vec<_>>(),
        profile,
        command,
    )
}

/// The report with the rows of `outcomes`, and, for every other scenario, its row as `existing`
/// (an earlier report) has it — so running a few scenarios (`--only`) updates their rows and
/// keeps the rest. Rows follow [`Scenario::ALL`].
pub fn merged(existing: &str, outcomes: &[Outcome], profile: &Profile, command: &str) -> String {
    let old: std::collections::HashMap<&str, &str> = existing
        .lines()
        .filter_map(|line| {
            let name = line.strip_prefix("| ")?.split(" | ").next()?;
            Scenario::ALL
                .iter()
                .any(|s| s.name() == name)
                .then_some((name, line))
        })
        .collect();
    let rows: Vec<String> = Scenario::ALL
        .iter()
        .filter_map(|s| match outcomes.iter().find(|o| o.scenario == *s) {
            Some(o) => Some(row(o)),
            None => old.get(s.name()).map(|line| format!("{line}\n")),
        })
        .collect();
    document(&rows, profile, command)
}

fn document(rows: &[String], profile: &Profile, command: &str) -> String {
    let mut out = String::new();
    out.push_str("# Reliability\n\n");
    out.push_str(&format!(
        "Fault injection and bad input against the real PostgreSQL and RabbitMQ on loopback, with the \
         release binaries (issue 11). Profile `{}`; regenerate with `{command}`. Every scenario starts \
         its own database and AMQP prefix, workers, a scheduler (2 s reconcile interval) and the sim \
         provisioner; taps bound beside the work queues record every provisioner job and event on the \
         wire. After the faults stop, the system must converge within {} s and then every invariant \
         is checked. The bad-input half of the issue is `tests/tests/reliability_input.rs`.\n\n",
        profile.name,
        profile.converge_timeout.as_secs()
    ));
    out.push_str(
        "| scenario | load | faults | invariants checked | result |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(r);
    }
    out.push_str(
        "\nInvariants: *presets at desired* — every preset's running = eligible = its effective \
         desired count (0 when inactive) and nothing in progress; *drained* — no open job, outbox \
         fully relayed, work queues empty; *jobs published and executed once* — every job row has \
         exactly one message id on the wire and the provisioner executed it once (its \
         `prebuilds_provisioner_jobs_total`); *in-place retries settled* — no worker holds a \
         delivery in retry (`prebuilds_messages_in_retry` is 0), so what follows reads a settled \
         database; *provisioner events applied* — every distinct event is in the database \
         (status, started_at, agent state, log lines exactly once; a job that ended canceled or \
         failed has no agents: their late events are refused as stale); *no \
         workspace claimed and deleted*; *no double claim* — one workspace per claim request and \
         one claim per workspace, in the database and in the replies, replays return the first \
         outcome; *dead letters* — exactly the poison messages, each with `x-prebuilds-dead-reason`; \
         *no process crashed*; *worker memory bounded* — VmHWM of every worker, killed ones \
         included.\n",
    );
    out
}

/// A compact terminal table: one line per scenario, failures spelled out below it.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut out = format!("{:<20} {:<6} {:>6}  checks\n", "scenario", "result", "secs");
    for o in outcomes {
        let passed = o.checks.iter().filter(|c| c.pass).count();
        out.push_str(&format!(
            "{:<20} {:<6} {:>6.0}  {passed}/{} passed\n",
            o.scenario.name(),
            if o.passed() { "pass" } else { "FAIL" },
            o.seconds,
            o.checks.len()
        ));
        for c in &o.checks {
            out.push_str(&format!(
                "    {} {:<34} {}\n",
                if c.pass { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Check;

    fn outcome(scenario: Scenario, detail: &str) -> Outcome {
        Outcome {
            scenario,
            load: "load".into(),
            faults: "faults".into(),
            checks: vec![Check::new("converged", true, detail)],
            seconds: 1.0,
        }
    }

    /// `--only` replaces the rows it ran and keeps every other row of the earlier report, in
    /// scenario order.
    #[test]
    fn a_partial_run_keeps_the_other_rows() {
        let profile = Profile::short();
        let before = markdown(
            &[
                outcome(Scenario::WorkerKill, "old kill"),
                outcome(Scenario::Poison, "old poison"),
            ],
            &profile,
            "cmd",
        );
        let after = merged(
            &before,
            &[
                outcome(Scenario::PostgresFailover, "new failover"),
                outcome(Scenario::Poison, "new poison"),
            ],
            &profile,
            "cmd",
        );
        let rows: Vec<&str> = after
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| scenario"))
            .collect();
        assert_eq!(rows.len(), 3, "{after}");
        assert!(rows[0].starts_with("| worker-kill |") && rows[0].contains("old kill"));
        assert!(rows[1].starts_with("| poison |") && rows[1].contains("new poison"));
        assert!(rows[2].starts_with("| postgres-failover |"));
        assert!(!after.contains("old poison"));
    }
}
