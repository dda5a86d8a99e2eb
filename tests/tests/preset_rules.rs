//! The rules that live both in SQL and in the core, pinned to each other over real PostgreSQL:
//! every combination of the inputs is written as rows, then the SQL's answer and the core's answer
//! (from the snapshot the workers read) are compared.
//!
//! - "the preset is active": the view `preset_activity` against `PresetInfo::is_active`;
//! - "the preset needs a reconcile": a preset outside the view `presets_needing_attention` is one
//!   the core plans nothing for;
//! - "this prebuild is claimable": the prebuilds `claim_attempt.sql` claims against the core's
//!   `eligible` count.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};
use prebuilds_core::ReconcileConfig;
use prebuilds_tests::{
    fixtures::{self, PrebuildSpec, PresetFixture},
    TestDb,
};
use uuid::Uuid;

const CLAIM_ATTEMPT: &str = include_str!("../../worker/src/sql/claim_attempt.sql");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    /// The preset's version is the template's active one.
    Active,
    /// Another version of the template is active.
    Superseded,
    /// The template has no active version.
    NoneActive,
}

/// The latest build of a fixture prebuild, or none.
const PREBUILDS: [Option<(&str, &str)>; 4] = [
    None,
    Some(("start", "succeeded")),
    Some(("start", "failed")),
    Some(("start", "pending")),
];

async fn db_now(c: &deadpool_postgres::Object) -> DateTime<Utc> {
    c.query_one("SELECT now()", &[]).await.unwrap().get(0)
}

/// Writes the template state of `version`, `deleted`, `deprecated` onto a fresh fixture.
async fn shape(
    c: &deadpool_postgres::Object,
    fx: &PresetFixture,
    version: Version,
    deleted: bool,
    deprecated: bool,
) {
    match version {
        Version::Active => {}
        Version::Superseded => {
            fixtures::new_active_version(c, fx, None).await;
        }
        Version::NoneActive => {
            c.execute(
                "UPDATE templates SET active_version_id = NULL WHERE id = $1",
                &[&fx.template_id],
            )
            .await
            .unwrap();
        }
    }
    c.execute(
        "UPDATE templates SET deleted = $2, deprecated = $3 WHERE id = $1",
        &[
            &fx.template_id,
            &deleted,
            &(if deprecated { "use v2" } else { "" }),
        ],
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn the_sql_rules_for_active_and_needing_attention_agree_with_the_core() {
    let db = TestDb::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let now = db_now(&c).await;
    let mut presets = Vec::new();
    let mut n = 0;
    for version in [Version::Active, Version::Superseded, Version::NoneActive] {
        for deleted in [false, true] {
            for deprecated in [false, true] {
                for desired in [None, Some(0), Some(2)] {
                    for prebuild in PREBUILDS {
                        n += 1;
                        let fx = fixtures::template_with_preset(&c, org, &format!("t{n}"), desired)
                            .await;
                        if let Some((transition, job_status)) = prebuild {
                            let spec = PrebuildSpec {
                                transition,
                                job_status,
                                created_at: now - TimeDelta::minutes(10),
                                ready: true,
                            };
                            fixtures::prebuild(&c, &fx, &spec).await;
                        }
                        shape(&c, &fx, version, deleted, deprecated).await;
                        presets.push(fx.preset_id);
                    }
                }
            }
        }
    }

    let active: HashMap<Uuid, bool> = c
        .query("SELECT preset_id, active FROM preset_activity", &[])
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let attention: HashSet<Uuid> = prebuilds_store::attention::presets_needing_attention(&c)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let views = prebuilds_store::load_snapshots(&c, &presets).await.unwrap();
    assert_eq!(views.len(), presets.len());
    let config = ReconcileConfig::default();
    let (mut inactive, mut skipped) = (0, 0);
    for view in &views {
        let id = view.preset_id();
        let preset = &view.snapshot.preset;
        assert_eq!(
            active[&id],
            preset.is_active(),
            "preset_activity.active and PresetInfo::is_active disagree for {preset:?}"
        );
        inactive += usize::from(!preset.is_active());
        if !attention.contains(&id) {
            skipped += 1;
            let plan = prebuilds_core::plan(&view.snapshot, now, &config);
            assert!(
                plan.actions.is_empty(),
                "preset {id} is not in presets_needing_attention, but the core would act on it: \
                 {:?}\n{:?}",
                plan.actions,
                view.snapshot
            );
        }
    }
    // Both sides of each rule were exercised.
    assert!(inactive > 0 && inactive < views.len(), "{inactive}");
    assert!(skipped > 0 && skipped < views.len(), "{skipped}");
}

#[tokio::test]
async fn claim_attempt_claims_exactly_the_prebuilds_the_core_counts_eligible() {
    let db = TestDb::new().await;
    let mut c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let user = fixtures::user(&c, "alice", false).await;
    let now = db_now(&c).await;
    let mut cases = Vec::new();
    let mut n = 0;
    // Preset settings: TTL (none / one hour) x invalidated (never / 30 minutes ago) x deprecated.
    for ttl in [None, Some(3600)] {
        for invalidated in [None, Some(now - TimeDelta::minutes(30))] {
            for deprecated in [false, true] {
                n += 1;
                let fx = fixtures::template_with_preset(&c, org, &format!("t{n}"), Some(5)).await;
                c.execute(
                    "UPDATE template_version_presets
                     SET invalidate_after_secs = $2, last_invalidated_at = $3 WHERE id = $1",
                    &[&fx.preset_id, &ttl, &invalidated],
                )
                .await
                .unwrap();
                // Prebuilds: age (fresh / older than the invalidation / older than the TTL) x
                // ready x the latest build.
                for age in [10, 45, 120] {
                    for ready in [true, false] {
                        for (transition, job_status) in [
                            ("start", "succeeded"),
                            ("start", "failed"),
                            ("start", "running"),
                            ("stop", "succeeded"),
                            ("delete", "pending"),
                        ] {
                            let spec = PrebuildSpec {
                                transition,
                                job_status,
                                created_at: now - TimeDelta::minutes(age),
                                ready,
                            };
                            fixtures::prebuild(&c, &fx, &spec).await;
                        }
                    }
                }
                shape(&c, &fx, Version::Active, false, deprecated).await;
                cases.push(fx.preset_id);
            }
        }
    }

    let views = prebuilds_store::load_snapshots(&c, &cases).await.unwrap();
    let mut total = 0;
    for view in &views {
        let id = view.preset_id();
        let eligible = prebuilds_core::state(&view.snapshot, now).eligible;
        // Claim until the statement finds nothing, in a transaction rolled back afterwards.
        let tx = c.transaction().await.unwrap();
        let mut claimed = 0u32;
        loop {
            let name = format!("ws-{claimed}");
            let row = tx
                .query_one(
                    CLAIM_ATTEMPT,
                    &[
                        &user,
                        &id,
                        &name,
                        &Uuid::new_v4(),
                        &Uuid::nil(),
                        &None::<Uuid>,
                    ],
                )
                .await
                .unwrap();
            if row.get::<_, Option<Uuid>>("claimed_workspace_id").is_none() {
                break;
            }
            claimed += 1;
        }
        tx.rollback().await.unwrap();
        assert_eq!(
            claimed, eligible,
            "claim_attempt.sql claimed {claimed} prebuilds of preset {id}, the core counts \
             {eligible} eligible:\n{:?}",
            view.snapshot
        );
        total += eligible;
    }
    assert!(total > 0, "no case had an eligible prebuild");
}
