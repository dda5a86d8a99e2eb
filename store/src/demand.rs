//! The demand inputs of autoscaled presets (`prebuilds_core::Demand`): claims and misses per
//! window from the claim history ([`crate::claims`]) and the p90 of recent create durations.
//! Read only for presets that have an `autoscaling` block, so plain pools cost nothing extra.

use std::time::Duration;

use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use prebuilds_core::Demand;
use uuid::Uuid;

use crate::claims::claim_history;
use crate::PresetView;

/// Fills `snapshot.demand` of every autoscaled view at `now`, with windows of `unit` minutes
/// (`PREBUILDS_DEMAND_TIME_UNIT`, one minute in production).
pub async fn attach_demand<'a, C: GenericClient>(
    client: &C,
    views: impl IntoIterator<Item = &'a mut PresetView>,
    now: DateTime<Utc>,
    unit: Duration,
) -> Result<(), tokio_postgres::Error> {
    let mut views: Vec<&mut PresetView> = views
        .into_iter()
        .filter(|v| v.snapshot.autoscaling.is_some())
        .collect();
    if views.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = views.iter().map(|v| v.preset_id()).collect();
    let (mut history, p90) = futures::try_join!(
        claim_history(client, &ids, now, unit),
        create_p90(client, &ids),
    )?;
    let unit_ms = i64::try_from(unit.as_millis()).unwrap_or(i64::MAX);
    for view in views.iter_mut() {
        let id = view.preset_id();
        let h = history.remove(&id).unwrap_or_default();
        view.snapshot.demand = Demand {
            claims: h.claims(),
            misses: h.misses(),
            create_p90_ms: p90.iter().find(|(p, _)| *p == id).map(|(_, ms)| *ms),
            window_unit_ms: unit_ms,
        };
    }
    Ok(())
}

async fn create_p90<C: GenericClient>(
    client: &C,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, i64)>, tokio_postgres::Error> {
    let ids = ids.to_vec();
    let rows = client
        .query(include_str!("sql/create_p90.sql"), &[&ids])
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get("preset_id"), r.get::<_, f64>("p90_ms").round() as i64))
        .collect())
}
