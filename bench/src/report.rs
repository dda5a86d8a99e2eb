//! The benchmark report: a table on standard output and `BENCHMARKS.md` (figures, goals, ratios to
//! the floors measured in the same run, the machine, the date and the exact command).

use std::fmt::Write;

use crate::{
    scenarios::{Claims, Events, Fill, Floors, Lanes, Reconcile, Sizes, TimeToReady, READY_BUILD},
    stats::ms,
    Args,
};

pub struct Report {
    command: String,
    sizes: Sizes,
    rows: Vec<[String; 4]>,
}

impl Report {
    pub fn new(args: &Args, sizes: Sizes) -> Report {
        let mut command =
            format!("cargo run --release -p bench -- {:?}", args.scenario).to_lowercase();
        if args.quick {
            command.push_str(" --quick");
        }
        if args.smoke {
            command.push_str(" --smoke");
        }
        Report {
            command,
            sizes,
            rows: Vec::new(),
        }
    }

    fn row(
        &mut self,
        what: impl Into<String>,
        figure: impl Into<String>,
        goal: impl Into<String>,
        note: impl Into<String>,
    ) {
        self.rows
            .push([what.into(), figure.into(), goal.into(), note.into()]);
    }

    pub fn floors(&mut self, f: &Floors) {
        for (concurrency, latency) in &f.rpc_echo {
            self.row(
                format!("floor: RabbitMQ RPC echo round trip, {concurrency} clients"),
                format!("p50 {} / p99 {}", ms(latency.p50), ms(latency.p99)),
                "—",
                "direct reply-to, quorum queue, same broker",
            );
        }
        for (concurrency, latency) in &f.claim_tx {
            self.row(
                format!("floor: claim-shaped transaction, {concurrency} connections"),
                format!("p50 {} / p99 {}", ms(latency.p50), ms(latency.p99)),
                "—",
                "BEGIN; UPDATE … SKIP LOCKED; COMMIT",
            );
        }
        self.row(
            "floor: persistent publish with confirms",
            format!("{:.0} msg/s", f.publish_per_sec),
            "—",
            "quorum queue, 256 in flight",
        );
        self.row(
            "floor: consume with acks",
            format!("{:.0} msg/s", f.consume_per_sec),
            "—",
            "prefetch 256",
        );
    }

    pub fn claims(&mut self, c: &Claims) {
        for level in &c.levels {
            let (concurrency, latency) = (level.concurrency, &level.latency);
            let ratio =
                |floor: std::time::Duration| latency.p50.as_secs_f64() / floor.as_secs_f64();
            let goal = if concurrency == 64 {
                "p50 ≤ 2× floor, p99 ≤ 25 ms"
            } else {
                "p50 ≤ 2× floor"
            };
            let same_load = if concurrency > 1 {
                format!(
                    "; {:.2}× the floor at {concurrency} clients ({})",
                    ratio(level.same_load_floor),
                    ms(level.same_load_floor)
                )
            } else {
                String::new()
            };
            self.row(
                format!("claim latency, {concurrency} clients"),
                format!(
                    "p50 {} / p95 {} / p99 {}",
                    ms(latency.p50),
                    ms(latency.p95),
                    ms(latency.p99)
                ),
                goal,
                format!(
                    "p50 = {:.2}× the 1-client floor ({}){same_load}; floors measured {}; {} \
                     claims, {} misses",
                    ratio(level.single_client_floor),
                    ms(level.single_client_floor),
                    match level.rounds {
                        1 => "just before the level".to_owned(),
                        n => format!("before each of the level's {n} rounds"),
                    },
                    latency.count,
                    level.misses
                ),
            );
        }
        for (concurrency, latency, misses) in &c.http {
            let rpc = c
                .levels
                .iter()
                .find(|l| l.concurrency == *concurrency)
                .map(|l| {
                    format!(
                        "; the RPC claim at {concurrency} clients: p50 {}",
                        ms(l.latency.p50)
                    )
                })
                .unwrap_or_default();
            self.row(
                format!("HTTP claim latency, {concurrency} clients"),
                format!(
                    "p50 {} / p95 {} / p99 {}",
                    ms(latency.p50),
                    ms(latency.p95),
                    ms(latency.p99)
                ),
                "—",
                format!(
                    "POST /api/v1/claims through prebuilds-api, a new connection per request{rpc}; \
                     {} claims, {misses} misses",
                    latency.count
                ),
            );
        }
        self.row(
            "replenish: claim request → replacement job delivered",
            format!("p50 {} / p99 {}", ms(c.replenish.p50), ms(c.replenish.p99)),
            "p99 ≤ 500 ms",
            format!(
                "{} samples; the tick-based design waits up to 60 s",
                c.replenish.count
            ),
        );
    }

    pub fn reconcile(&mut self, r: &Reconcile) {
        for (workers, seconds, rss) in &r.passes {
            let goal = if *workers == 2 { "≤ 10 s" } else { "—" };
            self.row(
                format!(
                    "reconcile pass, {} presets at steady state, {workers} worker(s)",
                    r.presets
                ),
                format!(
                    "{seconds:.2} s ({:.0} presets/s)",
                    r.presets as f64 / seconds
                ),
                goal,
                format!("worker peak RSS {rss:.1} MiB"),
            );
        }
        let tick = r
            .scheduler_tick_seconds
            .map(|s| format!("; tick {}", ms(std::time::Duration::from_secs_f64(s))))
            .unwrap_or_default();
        self.row(
            format!("scheduler with {} presets", r.presets),
            format!("peak RSS {:.1} MiB", r.scheduler_rss_mib),
            "bounded",
            format!("leader ticking every 2 s, metrics every 2 s{tick}"),
        );
    }

    pub fn fill(&mut self, f: &Fill) {
        self.row(
            format!(
                "cold fill: {} presets × {} instances",
                f.presets,
                f.prebuilds / f.presets.max(1)
            ),
            format!("{:.2} s until {} eligible", f.seconds, f.prebuilds),
            "≤ 60 s",
            "2 workers, sim provisioner at zero latency",
        );
    }

    pub fn events(&mut self, e: &Events, f: &Floors) {
        self.row(
            "provisioner events applied by one worker",
            format!("{:.0} events/s", e.per_sec),
            "≥ 2,000/s",
            format!(
                "{} job_log events; {:.0}% of the broker's consume floor",
                e.events,
                100.0 * e.per_sec / f.consume_per_sec
            ),
        );
    }

    pub fn lanes(&mut self, l: &Lanes) {
        self.row(
            format!("claim build wait behind {} queued creates", l.backlog),
            format!(
                "p50 {} / p99 {} ({} claim builds)",
                ms(l.wait.p50),
                ms(l.wait.p99),
                l.wait.count
            ),
            "p99 ≤ 100 ms",
            format!(
                "publish → job_started, one claim build at a time; sim builds of 1–2 s, 8 prebuild + 4 user slots; {} creates still queued at the end (FIFO: the whole backlog first)",
                l.still_queued
            ),
        );
    }

    pub fn time_to_ready(&mut self, r: &TimeToReady) {
        let (min, max, agent) = READY_BUILD;
        self.row(
            "claim → workspace ready".to_owned(),
            format!(
                "idle p50 {} / p99 {}; behind {} creates p50 {} / p99 {} ({} claims each)",
                ms(r.idle.p50),
                ms(r.idle.p99),
                r.backlog,
                ms(r.behind_backlog.p50),
                ms(r.behind_backlog.p99),
                r.idle.count
            ),
            "behind a backlog = idle",
            format!(
                "claim RPC → claim build succeeded and agent ready; sim builds {min}–{max} + {agent} to ready, 8 prebuild + 4 user slots; {} creates still open at the end",
                r.backlog_left
            ),
        );
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let widths: Vec<usize> = (0..4)
            .map(|i| {
                self.rows
                    .iter()
                    .map(|r| r[i].chars().count())
                    .max()
                    .unwrap_or(0)
                    .max(8)
            })
            .collect();
        for (i, header) in ["scenario", "figure", "goal", "notes"].iter().enumerate() {
            let _ = write!(out, "{:<w$}  ", header, w = widths[i]);
        }
        out.push('\n');
        for r in &self.rows {
            for (i, cell) in r.iter().enumerate() {
                let _ = write!(out, "{:<w$}  ", cell, w = widths[i]);
            }
            out.push('\n');
        }
        out
    }

    /// The report as Markdown. `commentary` (the analysis written between the markers in the
    /// previous report, see [`kept_commentary`]) goes between the table and the reproduce line,
    /// inside the markers, which are written even when it is empty.
    pub fn markdown(&self, commentary: &str) -> String {
        let mut out = String::from("# Benchmarks\n\n");
        let _ = writeln!(
            out,
            "Measured {} with `{}`{}.\n",
            chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
            self.command,
            if self.sizes.quick {
                " (quick sizes: not comparable with the goals)"
            } else {
                ""
            }
        );
        let _ = writeln!(out, "Machine: {}.\n", machine());
        out.push_str("Floors are measured in the same run on the same PostgreSQL and RabbitMQ; ratios to them are what\ntravel between machines.\n\n");
        out.push_str("| scenario | figure | goal | notes |\n|---|---|---|---|\n");
        for r in &self.rows {
            let _ = writeln!(out, "| {} | {} | {} | {} |", r[0], r[1], r[2], r[3]);
        }
        let _ = write!(out, "\n{COMMENTARY_BEGIN}\n{commentary}{COMMENTARY_END}\n");
        out.push_str("\nReproduce: `cargo build --release --bins && cargo run --release -p bench -- all`\n(needs the local PostgreSQL and RabbitMQ: `scripts/services-up`). One scenario alone:\n`cargo run --release -p bench -- lanes` or `-- time-to-ready` (prints the table, writes nothing).\n");
        out
    }
}

const COMMENTARY_BEGIN: &str = "<!-- commentary: kept by `bench all`; edit freely -->";
const COMMENTARY_END: &str = "<!-- end of commentary -->";

/// The hand-written analysis between the commentary markers of an earlier report, so that a new
/// run replaces the figures but not what was written about them (re-read it against the new
/// figures). Empty when there is no earlier report or it has no markers; an error when only the
/// first marker is there, rather than lose what follows it.
pub fn kept_commentary(previous: &str) -> anyhow::Result<String> {
    let Some(begin) = previous.find(COMMENTARY_BEGIN) else {
        return Ok(String::new());
    };
    let start = begin + COMMENTARY_BEGIN.len();
    let Some(length) = previous[start..].find(COMMENTARY_END) else {
        anyhow::bail!(
            "the earlier report has {COMMENTARY_BEGIN:?} but not {COMMENTARY_END:?}: \
             restore the end marker (or remove both) and run again"
        );
    };
    Ok(previous[start..start + length]
        .trim_start_matches('\n')
        .to_owned())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default();
    let version = |cmd: &str, args: &[&str]| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    format!(
        "{cpus} × {model}, {mem} RAM; {}; RabbitMQ {}",
        version("psql", &["--version"]),
        version("rabbitmqctl", &["version"])
    )
}

/// The `demand` scenario's table (Markdown), with the comparison the goal asks for: the smallest
/// fixed pool reaching 95 % hits against each demand policy.
pub fn demand(outcomes: &[crate::demand::Outcome]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| policy | claims | hit rate | idle prebuild-hours | provisioning hours |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let smallest = outcomes
        .iter()
        .filter(|o| o.label.starts_with("fixed") && o.hit_rate() >= 0.95)
        .min_by(|a, b| a.idle_hours.total_cmp(&b.idle_hours));
    for o in outcomes {
        let shown = !o.label.starts_with("fixed")
            || smallest.is_some_and(|s| s.label == o.label)
            || [1, 2, 4, 6, 8, 10, 12, 16, 20]
                .iter()
                .any(|n| o.label == format!("fixed pool of {n}"));
        if shown {
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} % | {:.1} | {:.1} |",
                o.label,
                o.claims,
                o.hit_rate() * 100.0,
                o.idle_hours,
                o.provisioning_hours
            );
        }
    }
    match smallest {
        Some(s) => {
            let _ = writeln!(
                out,
                "\nsmallest fixed pool with >= 95 % hits: {} ({:.1} idle prebuild-hours)",
                s.label, s.idle_hours
            );
            for o in outcomes.iter().filter(|o| !o.label.starts_with("fixed")) {
                let verdict = if o.hit_rate() >= 0.95 && o.idle_hours < s.idle_hours {
                    "meets the goal"
                } else {
                    "misses the goal"
                };
                let _ = writeln!(
                    out,
                    "{}: {:.1} % hits, {:.1} idle prebuild-hours ({:.0} % of the fixed pool's): {verdict}",
                    o.label,
                    o.hit_rate() * 100.0,
                    o.idle_hours,
                    o.idle_hours / s.idle_hours * 100.0
                );
            }
        }
        None => out.push_str("\nno fixed pool up to the largest tried reaches 95 % hits\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commentary_is_kept_from_between_the_markers() {
        let report = format!("table\n{COMMENTARY_BEGIN}\nWhy.\n{COMMENTARY_END}\nfooter\n");
        assert_eq!(kept_commentary(&report).unwrap(), "Why.\n");
        assert_eq!(kept_commentary("no markers here").unwrap(), "");
        assert_eq!(kept_commentary("").unwrap(), "");
    }

    #[test]
    fn a_report_with_only_the_first_marker_is_refused_rather_than_overwritten() {
        let report = format!("table\n{COMMENTARY_BEGIN}\nWhy, and then the end marker got lost");
        assert!(kept_commentary(&report).is_err());
    }
}
