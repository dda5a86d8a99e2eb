//! Pool-state metrics (docs/metrics.md, Coder's names, types and labels), rendered by a custom
//! [`Collector`] from a cached snapshot: scrapes never touch the database.
//!
//! [`Refresher`] rebuilds the cache every `metrics_interval` while this replica leads (the first
//! refresh right when it becomes leader), in one read-only REPEATABLE READ transaction:
//! 1. every preset with prebuilds configured on a non-deleted template (`sql/metrics_presets.sql`),
//!    loaded with [`prebuilds_store::load_snapshots`] and evaluated with [`prebuilds_core::state`] at
//!    the transaction's `now()`;
//! 2. the lifetime created / failed / claimed counters (`sql/metrics_counters.sql`);
//! 3. the global pause setting.
//!
//! | metric | type | series |
//! |---|---|---|
//! | `coderd_prebuilt_workspaces_created_total` | counter | per (template, preset, org) name with a prebuild ever created |
//! | `coderd_prebuilt_workspaces_failed_total` | counter | same label sets |
//! | `coderd_prebuilt_workspaces_claimed_total` | counter | same label sets |
//! | `coderd_prebuilt_workspaces_desired` | gauge | presets on active versions |
//! | `coderd_prebuilt_workspaces_running` | gauge | presets on active versions (expired included) |
//! | `coderd_prebuilt_workspaces_eligible` | gauge | presets on active versions |
//! | `coderd_prebuilt_workspaces_preset_hard_limited` | gauge | 1 per hard-limited active preset; absent otherwise |
//! | `coderd_prebuilt_workspaces_preset_validation_failed` | gauge | 1 per validation-failed active preset; absent otherwise |
//! | `prebuilds_preset_next_probe_timestamp_seconds` | gauge | per hard-limited active preset: unix time of its next probe create (absent otherwise) |
//! | `prebuilds_preset_desired_source` | gauge | 1 per active preset, with a fourth label `source` (what set its desired count) |
//! | `prebuilds_autoscaling_demand_per_minute`, `_lead_time_seconds`, `_forecast` | gauge | per autoscaled active preset: the built-in forecast's inputs and target |
//! | `coderd_prebuilt_workspaces_reconciliation_paused` | gauge | one, no labels |
//! | `coderd_prebuilt_workspaces_metrics_last_updated` | gauge | one, no labels (unix seconds) |
//!
//! Series are keyed by their label set (`template_name`, `preset_name`, `organization_name`):
//! presets sharing names (two versions of a template, or a preset re-created) are summed (counts)
//! or OR-ed (status flags), so a scrape can never contain one label set twice. Presets of deleted
//! templates are not in the cache at all, so their series disappear at the next refresh.
//!
//! **Leader only.** A standby renders none of these series — not even `reconciliation_paused`
//! or `metrics_last_updated`: it reads nothing from the database, so any value would be stale, and
//! a dashboard summing over replicas would double count. Scrape every replica and select the one
//! with `prebuilds_scheduler_is_leader == 1`, or simply sum (standbys contribute nothing). When a
//! replica stops leading, its cache is dropped at once.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use prebuilds_core::PrebuildStatus;
use prebuilds_runtime::db::DbError;
use prebuilds_store::PresetView;
use prometheus::{
    core::{Collector, Desc},
    proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::SchedulerMetrics;

/// Label names in the order they are rendered.
const LABELS: [&str; 3] = ["template_name", "preset_name", "organization_name"];

/// Longest a refresh may take before it is abandoned (the previous cache stays).
const REFRESH_TIMEOUT: Duration = Duration::from_secs(30);

/// The label set of a per-preset series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeriesKey {
    pub template_name: String,
    pub preset_name: String,
    pub organization_name: String,
}

/// One row of `sql/metrics_counters.sql`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterRow {
    pub key: SeriesKey,
    pub created: i64,
    pub failed: i64,
    pub claimed: i64,
}

/// Per-preset values of one refresh, aggregated by label set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolSnapshot {
    pub refreshed_at: Option<DateTime<Utc>>,
    pub created: BTreeMap<SeriesKey, f64>,
    pub failed: BTreeMap<SeriesKey, f64>,
    pub claimed: BTreeMap<SeriesKey, f64>,
    pub desired: BTreeMap<SeriesKey, f64>,
    pub running: BTreeMap<SeriesKey, f64>,
    pub eligible: BTreeMap<SeriesKey, f64>,
    pub hard_limited: BTreeMap<SeriesKey, f64>,
    pub validation_failed: BTreeMap<SeriesKey, f64>,
    pub next_probe: BTreeMap<SeriesKey, f64>,
    /// 1 per (label set, desired source); a label set whose presets disagree has several.
    pub desired_source: BTreeMap<(SeriesKey, &'static str), f64>,
    /// Autoscaled presets: the built-in forecast's demand rate (claims + misses per minute)...
    pub demand_rate: BTreeMap<SeriesKey, f64>,
    /// ...its lead time (the p90 create duration, or the default)...
    pub lead_time: BTreeMap<SeriesKey, f64>,
    /// ...and its target before the schedule floor and the clamp.
    pub forecast: BTreeMap<SeriesKey, f64>,
}

impl PoolSnapshot {
    /// Builds the cache from snapshots (evaluated at `now`) and counter rows.
    pub fn build(views: &[PresetView], counters: &[CounterRow], now: DateTime<Utc>) -> Self {
        let mut s = PoolSnapshot {
            refreshed_at: Some(now),
            ..PoolSnapshot::default()
        };
        for row in counters {
            *s.created.entry(row.key.clone()).or_default() += row.created as f64;
            *s.failed.entry(row.key.clone()).or_default() += row.failed as f64;
            *s.claimed.entry(row.key.clone()).or_default() += row.claimed as f64;
        }
        for view in views {
            let preset = &view.snapshot.preset;
            // Gauges describe the pools that are being maintained: presets on the active version
            // of a live template (deprecated templates included: their desired count reads 0).
            if preset.template_deleted || !preset.version_is_active {
                continue;
            }
            let key = SeriesKey {
                template_name: view.template_name.clone(),
                preset_name: view.preset_name.clone(),
                organization_name: view.organization_name.clone(),
            };
            let state = prebuilds_core::state(&view.snapshot, now);
            let source = prebuilds_core::desired_count(&view.snapshot, now).source;
            s.desired_source.insert((key.clone(), source.as_str()), 1.0);
            if view.snapshot.autoscaling.is_some() {
                let f = prebuilds_core::forecast(&view.snapshot.demand);
                *s.demand_rate.entry(key.clone()).or_default() += f.rate_per_sec * 60.0;
                let lead = s.lead_time.entry(key.clone()).or_default();
                *lead = lead.max(f.lead_time.as_seconds_f64());
                *s.forecast.entry(key.clone()).or_default() += f64::from(f.target);
            }
            *s.desired.entry(key.clone()).or_default() += f64::from(state.desired);
            *s.running.entry(key.clone()).or_default() += f64::from(state.actual);
            *s.eligible.entry(key.clone()).or_default() += f64::from(state.eligible);
            match preset.prebuild_status {
                PrebuildStatus::HardLimited => {
                    if let Some(record) = view.snapshot.hard_limit {
                        // Presets sharing a label set: the earliest probe.
                        let at = record.next_probe_at.timestamp() as f64;
                        let entry = s.next_probe.entry(key.clone()).or_insert(at);
                        *entry = entry.min(at);
                    }
                    s.hard_limited.insert(key, 1.0);
                }
                PrebuildStatus::ValidationFailed => {
                    s.validation_failed.insert(key, 1.0);
                }
                PrebuildStatus::Healthy => {}
            }
        }
        s
    }
}

#[derive(Debug, Default)]
struct Exported {
    leader: bool,
    paused: Option<bool>,
    snapshot: Option<PoolSnapshot>,
}

/// The cache shared by the refresher, the publishing passes (pause flag) and the collector.
/// Cheap to clone; the lock is never held across an `.await`.
#[derive(Debug, Clone, Default)]
pub struct PoolState(Arc<RwLock<Exported>>);

impl PoolState {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Exported> {
        // A panic while holding this lock leaves plain data behind; keep serving it.
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Exported> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts exporting (this replica leads) or stops and forgets everything (it stands by).
    pub fn set_leader(&self, leader: bool) {
        let mut e = self.write();
        *e = Exported {
            leader,
            ..Exported::default()
        };
    }

    /// Records the latest observed global pause (ignored unless leading).
    pub fn set_paused(&self, paused: bool) {
        let mut e = self.write();
        if e.leader {
            e.paused = Some(paused);
        }
    }

    /// Replaces the cached snapshot (ignored unless leading).
    pub fn set_snapshot(&self, snapshot: PoolSnapshot, paused: bool) {
        let mut e = self.write();
        if e.leader {
            e.snapshot = Some(snapshot);
            e.paused = Some(paused);
        }
    }

    pub fn snapshot(&self) -> Option<PoolSnapshot> {
        self.read().snapshot.clone()
    }
}

/// What each rendered family is.
#[derive(Debug, Clone, Copy)]
enum Family {
    Created,
    Failed,
    Claimed,
    Desired,
    Running,
    Eligible,
    HardLimited,
    ValidationFailed,
    NextProbe,
    DesiredSource,
    DemandRate,
    LeadTime,
    Forecast,
    Paused,
    LastUpdated,
}

impl Family {
    const ALL: [Family; 15] = [
        Family::Created,
        Family::Failed,
        Family::Claimed,
        Family::Desired,
        Family::Running,
        Family::Eligible,
        Family::HardLimited,
        Family::ValidationFailed,
        Family::NextProbe,
        Family::DesiredSource,
        Family::DemandRate,
        Family::LeadTime,
        Family::Forecast,
        Family::Paused,
        Family::LastUpdated,
    ];

    fn name(self) -> &'static str {
        match self {
            Family::Created => "coderd_prebuilt_workspaces_created_total",
            Family::Failed => "coderd_prebuilt_workspaces_failed_total",
            Family::Claimed => "coderd_prebuilt_workspaces_claimed_total",
            Family::Desired => "coderd_prebuilt_workspaces_desired",
            Family::Running => "coderd_prebuilt_workspaces_running",
            Family::Eligible => "coderd_prebuilt_workspaces_eligible",
            Family::HardLimited => "coderd_prebuilt_workspaces_preset_hard_limited",
            Family::ValidationFailed => "coderd_prebuilt_workspaces_preset_validation_failed",
            Family::NextProbe => "prebuilds_preset_next_probe_timestamp_seconds",
            Family::DesiredSource => "prebuilds_preset_desired_source",
            Family::DemandRate => "prebuilds_autoscaling_demand_per_minute",
            Family::LeadTime => "prebuilds_autoscaling_lead_time_seconds",
            Family::Forecast => "prebuilds_autoscaling_forecast",
            Family::Paused => "coderd_prebuilt_workspaces_reconciliation_paused",
            Family::LastUpdated => "coderd_prebuilt_workspaces_metrics_last_updated",
        }
    }

    /// Coder's help texts.
    fn help(self) -> &'static str {
        match self {
            Family::Created => "Total number of prebuilt workspaces that have been created to meet the desired instance count of each template preset.",
            Family::Failed => "Total number of prebuilt workspaces that failed to build.",
            Family::Claimed => "Total number of prebuilt workspaces which were claimed by users. Claiming refers to creating a workspace with a preset selected for which eligible prebuilt workspaces are available and one is reassigned to a user.",
            Family::Desired => "Target number of prebuilt workspaces that should be available for each template preset.",
            Family::Running => "Current number of prebuilt workspaces that are in a running state. These workspaces have started successfully but may not yet be claimable by users (see coderd_prebuilt_workspaces_eligible).",
            Family::Eligible => "Current number of prebuilt workspaces that are eligible to be claimed by users. These are workspaces that have completed their build process with their agent reporting 'ready' status.",
            Family::HardLimited => "Indicates whether a given preset has reached the hard failure limit (1 = hard-limited). Metric is omitted otherwise.",
            Family::ValidationFailed => "Indicates whether a given preset failed validation when creating prebuilt workspaces (1 = validation failed). Metric is omitted otherwise.",
            Family::DesiredSource => "1 for the source of each preset's desired count (label source: base, schedule, autoscaling, expression, expression_fallback, inactive, not_configured, invalid_schedules).",
            Family::DemandRate => "Autoscaled presets: recent demand (claims plus misses per minute, the highest rate over the 5 to 120 minute windows) the built-in policy forecasts from.",
            Family::LeadTime => "Autoscaled presets: provisioning lead time the built-in policy uses (p90 of recent create durations, or the 2-minute default).",
            Family::Forecast => "Autoscaled presets: the built-in policy's target (expected claims during one lead time plus headroom), before the schedule floor and the [min, max] clamp.",
            Family::NextProbe => "Unix time at which a hard-limited preset gets its next probe create (automatic recovery). Metric is omitted for presets that are not hard-limited.",
            Family::Paused => "Indicates whether prebuilds reconciliation is currently paused (1 = paused, 0 = not paused).",
            Family::LastUpdated => "The unix timestamp when the metrics related to prebuilt workspaces were last updated; these metrics are cached.",
        }
    }

    fn is_counter(self) -> bool {
        matches!(self, Family::Created | Family::Failed | Family::Claimed)
    }

    fn is_labelled(self) -> bool {
        !matches!(self, Family::Paused | Family::LastUpdated)
    }

    fn series(self, s: &PoolSnapshot) -> &BTreeMap<SeriesKey, f64> {
        match self {
            Family::Created => &s.created,
            Family::Failed => &s.failed,
            Family::Claimed => &s.claimed,
            Family::Desired => &s.desired,
            Family::Running => &s.running,
            Family::Eligible => &s.eligible,
            Family::HardLimited => &s.hard_limited,
            Family::ValidationFailed => &s.validation_failed,
            Family::NextProbe => &s.next_probe,
            Family::DemandRate => &s.demand_rate,
            Family::LeadTime => &s.lead_time,
            Family::Forecast => &s.forecast,
            Family::Paused | Family::LastUpdated | Family::DesiredSource => {
                unreachable!("unlabelled families and the source family have no plain series map")
            }
        }
    }
}

/// The custom collector: renders the cached [`PoolSnapshot`] of a leader, nothing on a standby.
#[derive(Debug)]
pub struct PoolCollector {
    state: PoolState,
    descs: Vec<Desc>,
}

impl PoolCollector {
    pub fn new(state: PoolState) -> Result<Self, prometheus::Error> {
        let descs = Family::ALL
            .iter()
            .map(|f| {
                let mut labels: Vec<String> = if f.is_labelled() {
                    LABELS.iter().map(|l| (*l).to_owned()).collect()
                } else {
                    Vec::new()
                };
                if matches!(f, Family::DesiredSource) {
                    labels.push("source".to_owned());
                }
                Desc::new(f.name().into(), f.help().into(), labels, HashMap::new())
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(PoolCollector { state, descs })
    }
}

fn family(f: Family, metrics: Vec<Metric>) -> MetricFamily {
    let mut mf = MetricFamily::default();
    mf.set_name(f.name().to_owned());
    mf.set_help(f.help().to_owned());
    mf.set_field_type(if f.is_counter() {
        MetricType::COUNTER
    } else {
        MetricType::GAUGE
    });
    mf.set_metric(metrics);
    mf
}

fn sample(f: Family, labels: Vec<LabelPair>, value: f64) -> Metric {
    let mut m = Metric::default();
    m.set_label(labels);
    if f.is_counter() {
        let mut c = Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

fn label_pairs(key: &SeriesKey) -> Vec<LabelPair> {
    let values = [&key.template_name, &key.preset_name, &key.organization_name];
    LABELS
        .iter()
        .zip(values)
        .map(|(name, value)| {
            let mut lp = LabelPair::default();
            lp.set_name((*name).to_owned());
            lp.set_value(value.clone());
            lp
        })
        .collect()
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let exported = self.state.read();
        if !exported.leader {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(Family::ALL.len());
        if let Some(paused) = exported.paused {
            let f = Family::Paused;
            out.push(family(
                f,
                vec![sample(f, Vec::new(), if paused { 1.0 } else { 0.0 })],
            ));
        }
        let Some(snapshot) = exported.snapshot.as_ref() else {
            return out;
        };
        let last = snapshot
            .refreshed_at
            .map_or(0.0, |t| t.timestamp_millis() as f64 / 1000.0);
        out.push(family(
            Family::LastUpdated,
            vec![sample(Family::LastUpdated, Vec::new(), last)],
        ));
        let f = Family::DesiredSource;
        let metrics = snapshot
            .desired_source
            .iter()
            .map(|((key, source), value)| {
                let mut labels = label_pairs(key);
                let mut lp = LabelPair::default();
                lp.set_name("source".to_owned());
                lp.set_value((*source).to_owned());
                labels.push(lp);
                sample(f, labels, *value)
            })
            .collect();
        out.push(family(f, metrics));
        for f in Family::ALL
            .into_iter()
            .filter(|f| f.is_labelled() && !matches!(f, Family::DesiredSource))
        {
            let metrics = f
                .series(snapshot)
                .iter()
                .map(|(key, value)| sample(f, label_pairs(key), *value))
                .collect();
            out.push(family(f, metrics));
        }
        out
    }
}

/// Rebuilds the cache every `interval` while the leader term lasts.
#[derive(Debug, Clone)]
pub struct Refresher {
    pub pool: Pool,
    pub state: PoolState,
    pub metrics: SchedulerMetrics,
    pub interval: Duration,
    /// One "minute" of the autoscaling demand windows (`PREBUILDS_DEMAND_TIME_UNIT`).
    pub demand_time_unit: Duration,
}

impl Refresher {
    /// Refreshes at once, then every `interval`, until `term` is cancelled.
    pub async fn run(self, term: CancellationToken) {
        loop {
            let started = Instant::now();
            let refresh = tokio::time::timeout(REFRESH_TIMEOUT, self.refresh_once());
            let result = tokio::select! {
                _ = term.cancelled() => return,
                r = refresh => r,
            };
            self.metrics
                .refresh_duration
                .set(started.elapsed().as_secs_f64());
            match result {
                Ok(Ok(presets)) => tracing::debug!(
                    presets,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "pool-state metrics refreshed"
                ),
                Ok(Err(e)) => {
                    self.metrics.refresh_failures.inc();
                    tracing::warn!(error = %e, "refreshing pool-state metrics failed; keeping the previous values");
                }
                Err(_) => {
                    self.metrics.refresh_failures.inc();
                    tracing::warn!(timeout = ?REFRESH_TIMEOUT, "refreshing pool-state metrics timed out; keeping the previous values");
                }
            }
            tokio::select! {
                _ = term.cancelled() => return,
                _ = tokio::time::sleep(self.interval) => {}
            }
        }
    }

    /// One refresh; returns how many presets it evaluated.
    pub async fn refresh_once(&self) -> Result<usize, DbError> {
        let (snapshot, paused, presets) =
            prebuilds_runtime::retry::with_retries(|| self.read()).await?;
        self.state.set_snapshot(snapshot, paused);
        Ok(presets)
    }

    async fn read(&self) -> Result<(PoolSnapshot, bool, usize), DbError> {
        let mut client = self.pool.get().await?;
        let tx = client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let now: DateTime<Utc> = tx.query_one("SELECT now()", &[]).await?.get(0);
        let ids: Vec<Uuid> = tx
            .query(include_str!("sql/metrics_presets.sql"), &[])
            .await?
            .into_iter()
            .map(|r| r.get(0))
            .collect();
        let mut views = prebuilds_store::load_snapshots(&tx, &ids).await?;
        prebuilds_store::demand::attach_demand(&tx, views.iter_mut(), now, self.demand_time_unit)
            .await?;
        let counters: Vec<CounterRow> = tx
            .query(include_str!("sql/metrics_counters.sql"), &[])
            .await?
            .into_iter()
            .map(|r| CounterRow {
                key: SeriesKey {
                    template_name: r.get("template_name"),
                    preset_name: r.get("preset_name"),
                    organization_name: r.get("organization_name"),
                },
                created: r.get("created_count"),
                failed: r.get("failed_count"),
                claimed: r.get("claimed_count"),
            })
            .collect();
        let paused = prebuilds_store::settings::reconciliation_paused(&tx).await?;
        tx.commit().await?;
        Ok((
            PoolSnapshot::build(&views, &counters, now),
            paused,
            views.len(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;
    use prebuilds_core::{InProgress, PresetInfo, PresetSnapshot, RunningPrebuild};
    use prometheus::{Encoder, Registry, TextEncoder};

    fn view(
        template: &str,
        preset: &str,
        active: bool,
        desired: i32,
        running: &[bool],
    ) -> PresetView {
        let now = Utc::now();
        PresetView {
            snapshot: PresetSnapshot {
                preset: PresetInfo {
                    id: Uuid::new_v4(),
                    name: preset.into(),
                    version_is_active: active,
                    template_deleted: false,
                    template_deprecated: false,
                    desired_instances: Some(desired),
                    invalidate_after_secs: None,
                    last_invalidated_at: None,
                    scheduling_timezone: String::new(),
                    prebuild_status: PrebuildStatus::Healthy,
                    paused: false,
                },
                schedules: vec![],
                running: running
                    .iter()
                    .map(|ready| RunningPrebuild {
                        workspace_id: Uuid::new_v4(),
                        created_at: now - TimeDelta::minutes(5),
                        ready: *ready,
                    })
                    .collect(),
                in_progress: InProgress::default(),
                pending_non_active: 0,
                start_builds: vec![],
                hard_limit: None,
                failures_reset_at: None,
                failed: Vec::new(),
                autoscaling: None,
                demand: Default::default(),
            },
            preset_name: preset.into(),
            template_id: Uuid::new_v4(),
            template_name: template.into(),
            template_version_id: Uuid::new_v4(),
            template_version_name: "v1".into(),
            organization_id: Uuid::new_v4(),
            organization_name: "acme".into(),
            global_paused: false,
            template_paused: false,
            preset_paused: false,
        }
    }

    fn key(template: &str, preset: &str) -> SeriesKey {
        SeriesKey {
            template_name: template.into(),
            preset_name: preset.into(),
            organization_name: "acme".into(),
        }
    }

    fn render(state: &PoolState) -> String {
        let registry = Registry::new();
        registry
            .register(Box::new(PoolCollector::new(state.clone()).unwrap()))
            .unwrap();
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn gauges_cover_active_presets_and_sum_shared_label_sets() {
        let mut hard = view("t", "hl", true, 2, &[]);
        hard.snapshot.preset.prebuild_status = PrebuildStatus::HardLimited;
        let views = vec![
            view("t", "small", true, 3, &[true, false]),
            // Same names on another (active) template of the same name can only exist in another
            // org or as a deleted template; sharing a label set must still give one series.
            view("t", "small", true, 1, &[true]),
            // Inactive versions are not maintained pools: no gauges.
            view("t", "old", false, 5, &[true]),
            hard,
        ];
        let s = PoolSnapshot::build(&views, &[], Utc::now());
        assert_eq!(s.desired[&key("t", "small")], 4.0);
        assert_eq!(s.running[&key("t", "small")], 3.0);
        assert_eq!(s.eligible[&key("t", "small")], 2.0);
        assert!(!s.desired.contains_key(&key("t", "old")));
        assert_eq!(s.hard_limited[&key("t", "hl")], 1.0);
        assert!(!s.hard_limited.contains_key(&key("t", "small")));
        assert!(s.validation_failed.is_empty());
    }

    #[test]
    fn a_standby_renders_nothing_and_a_leader_renders_the_cache() {
        let state = PoolState::default();
        let counters = vec![CounterRow {
            key: key("t", "small"),
            created: 4,
            failed: 1,
            claimed: 2,
        }];
        let snapshot = PoolSnapshot::build(
            &[view("t", "small", true, 3, &[true])],
            &counters,
            Utc::now(),
        );
        // Not leading: writes are ignored and nothing renders.
        state.set_snapshot(snapshot.clone(), false);
        assert_eq!(render(&state), "");

        state.set_leader(true);
        state.set_snapshot(snapshot, true);
        let text = render(&state);
        assert!(text.contains("# TYPE coderd_prebuilt_workspaces_created_total counter"));
        assert!(text.contains("# TYPE coderd_prebuilt_workspaces_desired gauge"));
        assert!(text.contains(
            "coderd_prebuilt_workspaces_created_total{template_name=\"t\",preset_name=\"small\",organization_name=\"acme\"} 4"
        ));
        assert!(text.contains(
            "coderd_prebuilt_workspaces_claimed_total{template_name=\"t\",preset_name=\"small\",organization_name=\"acme\"} 2"
        ));
        assert!(text.contains("coderd_prebuilt_workspaces_reconciliation_paused 1"));
        assert!(text.contains("coderd_prebuilt_workspaces_metrics_last_updated "));
        // No hard-limited preset: the family is absent.
        assert!(!text.contains("coderd_prebuilt_workspaces_preset_hard_limited"));

        // Stepping down forgets the cache at once.
        state.set_leader(false);
        assert_eq!(render(&state), "");
    }

    #[test]
    fn the_desired_source_and_the_forecast_inputs_are_exported() {
        let mut auto = view("t", "auto", true, 1, &[]);
        auto.snapshot.autoscaling = Some(prebuilds_core::Autoscaling {
            min: 0,
            max: 10,
            expression: None,
        });
        auto.snapshot.demand.claims = [10, 10, 10, 10, 10];
        auto.snapshot.demand.create_p90_ms = Some(60_000);
        let views = vec![view("t", "plain", true, 2, &[]), auto];
        let s = PoolSnapshot::build(&views, &[], Utc::now());
        assert_eq!(s.desired_source[&(key("t", "plain"), "base")], 1.0);
        assert_eq!(s.desired_source[&(key("t", "auto"), "autoscaling")], 1.0);
        // 10 claims in 5 minutes: 2 per minute; one minute of lead: λ = 2, ⌈2 + 2√2⌉ = 5.
        assert_eq!(s.demand_rate[&key("t", "auto")], 2.0);
        assert_eq!(s.lead_time[&key("t", "auto")], 60.0);
        assert_eq!(s.forecast[&key("t", "auto")], 5.0);
        assert!(
            !s.forecast.contains_key(&key("t", "plain")),
            "only autoscaled presets"
        );

        let state = PoolState::default();
        state.set_leader(true);
        state.set_snapshot(s, false);
        let text = render(&state);
        assert!(text.contains(
            "prebuilds_preset_desired_source{template_name=\"t\",preset_name=\"auto\",organization_name=\"acme\",source=\"autoscaling\"} 1"
        ), "{text}");
        assert!(text.contains(
            "prebuilds_autoscaling_forecast{template_name=\"t\",preset_name=\"auto\",organization_name=\"acme\"} 5"
        ), "{text}");
    }
}
