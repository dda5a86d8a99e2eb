//! Pools that follow demand, end to end on the real services and binaries: a pool at 0 with an
//! expression on misses grows after misses and shrinks back when the windows pass (windows
//! shortened with `PREBUILDS_DEMAND_TIME_UNIT`, so nothing waits for minutes); a claim naming only
//! the template gets the default preset; bad expressions and two defaults are refused at push
//! with file, field and reason, and nothing is written.

use std::{path::PathBuf, process::Output, time::Duration};

use prebuilds_tests::{
    process::binary,
    stack::{self, pool_counts, wait_for},
    TestBroker, TestDb,
};
use serde_json::Value;
use uuid::Uuid;

struct Env {
    db: TestDb,
    broker: TestBroker,
    dir: PathBuf,
}

impl Env {
    async fn new() -> Env {
        let dir = std::env::temp_dir().join(format!("autoscaling-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Env {
            db: TestDb::new().await,
            broker: TestBroker::new().await,
            dir,
        }
    }

    async fn ctl(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(binary("prebuildsctl"))
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("AMQP_URL", &self.broker.url)
            .env("PREBUILDS_AMQP_PREFIX", self.broker.prefix())
            .env("PREBUILDS_DEMAND_TIME_UNIT", UNIT)
            .env("RUST_LOG", "warn")
            .env_remove("PREBUILDS_MAX_INSTANCES_PER_PRESET")
            .output()
            .await
            .expect("run prebuildsctl")
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args).await;
        assert!(
            out.status.success(),
            "prebuildsctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, text).expect("write template file");
        path.to_str().expect("utf-8 path").to_owned()
    }

    /// `claim --json` (exit 1 on a miss, still printing the result).
    async fn claim(&self, args: &[&str]) -> Value {
        let mut all = vec!["claim", "--user", "alice", "--json"];
        all.extend_from_slice(args);
        let out = self.ctl(&all).await;
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "claim output is JSON ({e}): {} / {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        match v {
            Value::Array(mut rows) if rows.len() == 1 => rows.remove(0),
            other => other,
        }
    }

    async fn status_row(&self, preset: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["status", "--json"]).await).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|r| r["preset"] == preset)
            .cloned()
            .unwrap_or_else(|| panic!("no status row for {preset}: {v}"))
    }
}

/// One "minute" of the demand windows in this test: `misses_5m` covers the last 5 s.
const UNIT: &str = "1s";

const TEMPLATE: &str = r#"
organization: acme
template: auto
version: v1
activate: true
parameters:
  - {name: size, default: s}
presets:
  - name: on-demand
    default: true
    parameters: {size: m}
    prebuilds:
      instances: 0
      autoscaling:
        min: 0
        max: 5
        expression: "if(misses_5m > 0, 2, 0)"
  - name: small
    parameters: {size: s}
"#;

#[tokio::test]
async fn a_pool_at_zero_grows_after_misses_and_shrinks_back_when_the_windows_pass() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    env.ok(&[
        "user",
        "create",
        "--username",
        "alice",
        "--organization",
        "acme",
    ])
    .await;
    let file = env.file("auto.yaml", TEMPLATE);
    env.ok(&["template", "push", &file]).await;
    let c = env.db.pool.get().await.unwrap();
    let preset: Uuid = c
        .query_one(
            "SELECT id FROM template_version_presets WHERE name = 'on-demand'",
            &[],
        )
        .await
        .unwrap()
        .get(0);

    // The scheduler's tick: 1 s, its least.
    let timing = [
        ("PREBUILDS_DEMAND_TIME_UNIT", UNIT),
        ("PREBUILDS_RECONCILE_INTERVAL", "1s"),
    ];
    let (_worker, _) = stack::start("prebuilds-worker", &env.db, &env.broker, &timing);
    let (_provisioner, _) = stack::start(
        "prebuilds-provisioner",
        &env.db,
        &env.broker,
        &[
            ("PREBUILDS_SIM_DURATION_MIN", "20ms"),
            ("PREBUILDS_SIM_DURATION_MAX", "50ms"),
        ],
    );

    // At rest: desired 0 from the expression, nothing built.
    let row = env.status_row("on-demand").await;
    assert_eq!(row["desired"], 0, "{row}");
    assert_eq!(row["desired_source"], "expression", "{row}");

    // A claim naming only the template gets the default preset: its pool is empty, a miss.
    let miss = env.claim(&["--template", "auto", "--name", "w1"]).await;
    assert_eq!(miss["outcome"], "no_eligible_prebuild", "{miss}");
    assert_eq!(miss["reason"], "pool_empty", "{miss}");
    assert_eq!(miss["preset_id"], preset.to_string(), "{miss}");

    // `status --explain` shows the inputs that produced the count.
    let explained: Value = serde_json::from_str(
        &env.ok(&["status", "--explain", "on-demand", "--json"])
            .await,
    )
    .unwrap();
    assert_eq!(
        explained["expression"], "if(misses_5m > 0, 2, 0)",
        "{explained}"
    );
    assert_eq!(explained["autoscaling_max"], 5, "{explained}");
    assert_eq!(explained["scheduled_target"], 0, "{explained}");
    assert!(
        explained["variables"]["misses_5m"].as_f64().unwrap() >= 1.0,
        "{explained}"
    );
    assert_eq!(explained["variables"]["claims_5m"], 0.0, "{explained}");

    // The miss grows the pool to the expression's 2.
    wait_for(
        Duration::from_secs(30),
        "2 eligible after the miss",
        || async { pool_counts(&env.db, preset).await.eligible == 2 },
    )
    .await;
    // The pool's own creates are now the lead time's evidence (the p90 of their durations).
    let explained: Value = serde_json::from_str(
        &env.ok(&["status", "--explain", "on-demand", "--json"])
            .await,
    )
    .unwrap();
    assert_eq!(
        explained["forecast_lead_time_measured"], true,
        "{explained}"
    );
    let lead = explained["forecast_lead_time_secs"].as_f64().unwrap();
    assert!(
        lead > 0.0 && lead < 30.0,
        "sim creates take 20-50 ms plus queueing: {explained}"
    );

    let claimed = env.claim(&["--template", "auto", "--name", "w2"]).await;
    assert_eq!(claimed["outcome"], "claimed", "{claimed}");
    assert_eq!(claimed["preset_id"], preset.to_string(), "{claimed}");

    // Once the miss has left the 5-unit window, the pool shrinks back to 0. Until now no
    // scheduler ran: the growth came from the reconcile the miss itself requested. Its tick is
    // what re-reads the windows as they pass.
    let (_scheduler, _) = stack::start("prebuilds-scheduler", &env.db, &env.broker, &timing);
    wait_for(Duration::from_secs(60), "the pool back at 0", || async {
        let counts = pool_counts(&env.db, preset).await;
        counts.running == 0 && counts.in_progress == 0
    })
    .await;
    let row = env.status_row("on-demand").await;
    assert_eq!(row["desired"], 0, "{row}");
    assert_eq!(row["misses_5m"], 0, "{row}");
}

#[tokio::test]
async fn a_claim_without_parameters_and_no_default_preset_matches_as_before() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    env.ok(&[
        "user",
        "create",
        "--username",
        "alice",
        "--organization",
        "acme",
    ])
    .await;
    let file = env.file(
        "plain.yaml",
        "organization: acme\ntemplate: plain\nversion: v1\nactivate: true\n\
         parameters: [{name: cpus, required: true}]\n\
         presets:\n  - {name: a, parameters: {cpus: \"2\"}, prebuilds: {instances: 0}}\n  \
         - {name: b, parameters: {cpus: \"8\"}}\n",
    );
    env.ok(&["template", "push", &file]).await;
    let (_worker, _) = stack::start("prebuilds-worker", &env.db, &env.broker, &[]);
    let miss = env.claim(&["--template", "plain", "--name", "w1"]).await;
    assert_eq!(miss["outcome"], "no_eligible_prebuild", "{miss}");
    assert_eq!(miss["reason"], "no_matching_preset", "{miss}");
}

#[tokio::test]
async fn bad_expressions_and_two_defaults_are_refused_at_push() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    let file = env.file(
        "bad.yaml",
        r#"
organization: acme
template: bad
version: v1
presets:
  - name: a
    default: true
    prebuilds:
      instances: 1
      autoscaling: {min: 0, max: 4, expression: "max(scheduled_target, misses_5m +)"}
  - name: b
    default: true
    prebuilds:
      instances: 1
      autoscaling: {min: 3, max: 2}
"#,
    );
    let out = env.ctl(&["template", "push", &file]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for want in [
        format!(
            "error: {file}: presets[0].prebuilds.autoscaling.expression: \
             'max(scheduled_target, misses_5m +)' is not a valid sizing expression: at column 34: \
             expected a number, a variable, a function or '(', found ')'"
        ),
        format!(
            "error: {file}: presets[1].default: preset 'b' is marked default, but presets[0] \
             ('a') already is"
        ),
        format!("error: {file}: presets[1].prebuilds.autoscaling.min: min 3 is above max 2"),
        "nothing was written".to_owned(),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }
    let c = env.db.pool.get().await.unwrap();
    let templates: i64 = c
        .query_one("SELECT count(*) FROM templates", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(templates, 0, "a refused push writes nothing");

    // The database refuses a second default too, whatever writes the rows.
    let good = env.file(
        "good.yaml",
        "organization: acme\ntemplate: good\nversion: v1\npresets:\n  - {name: a, default: true}\n  - {name: b}\n",
    );
    env.ok(&["template", "push", &good]).await;
    let second = c
        .execute(
            "UPDATE template_version_presets SET is_default = true WHERE name = 'b'",
            &[],
        )
        .await;
    assert!(second.is_err(), "the one-default index holds");
}

#[tokio::test]
async fn a_run_time_failure_falls_back_to_the_scheduled_target_and_says_so() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    let file = env.file(
        "fallback.yaml",
        r#"
organization: acme
template: fb
version: v1
activate: true
presets:
  - name: p
    prebuilds:
      instances: 3
      autoscaling: {min: 1, max: 10, expression: "claims_5m / misses_5m"}
"#,
    );
    env.ok(&["template", "push", &file]).await;
    let row = env.status_row("p").await;
    assert_eq!(row["desired_source"], "expression_fallback", "{row}");
    assert_eq!(row["desired"], 3, "{row}");
    let explained: Value =
        serde_json::from_str(&env.ok(&["status", "--explain", "p", "--json"]).await).unwrap();
    assert_eq!(
        explained["expression_error"],
        "expression failed: division by zero in (claims_5m / misses_5m)",
        "{explained}"
    );
    let text = env.ok(&["status"]).await;
    assert!(text.contains("3 (expression failed)"), "{text}");
}
