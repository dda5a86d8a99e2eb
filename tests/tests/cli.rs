//! `prebuildsctl` end to end: the real binary against a database and an AMQP prefix of the test's
//! own (docs/template-file.md, docs/cli.md). Every write command is checked in the database and, where it requests
//! reconciles, in `<prefix>.reconcile`; every bad input exits with the documented code and leaves
//! the database unchanged.

use std::{collections::HashMap, path::PathBuf, process::Output, time::Duration};

use chrono::{TimeDelta, Utc};
use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties,
};
use prebuilds_runtime::amqp::{publisher::Outgoing, Publisher, QueueKind};
use prebuilds_schemas::{
    ClaimError, ClaimErrorCode, ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent, MissReason,
    Parameter, PresetParameters, RawEvent, ReconcilePreset, ReconcileReason,
};
use prebuilds_tests::{
    fixtures::{self, PrebuildSpec},
    process::binary,
    stack::{self, FakeOutcome, FakeProvisioner},
    TestBroker, TestDb,
};
use serde_json::Value;
use tokio::sync::mpsc;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------------
// Harness

struct Env {
    db: TestDb,
    broker: TestBroker,
    dir: PathBuf,
}

impl Env {
    async fn new() -> Env {
        let dir =
            std::env::temp_dir().join(format!("prebuildsctl-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Env {
            db: TestDb::new().await,
            broker: TestBroker::new().await,
            dir,
        }
    }

    /// Runs `prebuildsctl args…` against this test's database and prefix.
    async fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_with(args, &[]).await
    }

    /// As [`Env::ctl`], with extra environment variables.
    async fn ctl_with(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        tokio::process::Command::new(binary("prebuildsctl"))
            .args(args)
            .env("DATABASE_URL", &self.db.url)
            .env("AMQP_URL", &self.broker.url)
            .env("PREBUILDS_AMQP_PREFIX", self.broker.prefix())
            .env("RUST_LOG", "warn")
            .env_remove("PREBUILDS_BACKOFF_INTERVAL")
            .env_remove("PREBUILDS_BACKOFF_LOOKBACK")
            .env_remove("PREBUILDS_FAILURE_HARD_LIMIT")
            .env_remove("PREBUILDS_MAX_INSTANCES_PER_PRESET")
            .env_remove("PREBUILDS_MAX_PRESETS_PER_TEMPLATE")
            .env_remove("PREBUILDS_CLI_LOCK_TIMEOUT")
            .envs(vars.iter().copied())
            .output()
            .await
            .expect("run prebuildsctl")
    }

    /// Runs and asserts exit code 0.
    async fn ok(&self, args: &[&str]) -> Output {
        let out = self.ctl(args).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "prebuildsctl {args:?} failed\nstdout: {}\nstderr: {}",
            stdout(&out),
            stderr(&out)
        );
        out
    }

    async fn json(&self, args: &[&str]) -> Vec<Value> {
        let out = self.ok(args).await;
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?} printed no JSON array ({e}): {}", stdout(&out)))
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).expect("write file");
        path.display().to_string()
    }

    /// Reconcile jobs in `<prefix>.reconcile` (consumed).
    async fn reconcile_events(&self) -> Vec<CloudEvent<ReconcilePreset>> {
        let queue = self.broker.queue(QueueKind::Reconcile);
        self.broker
            .drain(&queue, Duration::from_millis(1500))
            .await
            .into_iter()
            .map(|d| {
                RawEvent::parse(&d.data)
                    .and_then(|r| r.decode::<ReconcilePreset>())
                    .expect("a valid reconcile job")
            })
            .collect()
    }

    /// Reconcile jobs the CLI wrote (consumed): (preset id, reason).
    async fn reconcile_jobs(&self) -> Vec<(Uuid, ReconcileReason)> {
        self.reconcile_events()
            .await
            .into_iter()
            .map(|event| {
                assert_eq!(event.source, "prebuildsctl");
                (event.data.preset_id, event.data.reason)
            })
            .collect()
    }

    async fn count(&self, sql: &str) -> i64 {
        let c = self.db.connect().await;
        c.query_one(sql, &[]).await.expect(sql).get(0)
    }

    async fn row_counts(&self) -> HashMap<&'static str, i64> {
        let mut counts = HashMap::new();
        for table in [
            "templates",
            "template_versions",
            "template_version_parameters",
            "template_version_presets",
            "template_version_preset_parameters",
            "template_version_preset_prebuild_schedules",
            "outbox",
        ] {
            counts.insert(
                table,
                self.count(&format!("SELECT count(*) FROM {table}")).await,
            );
        }
        counts
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sorted(mut v: Vec<Uuid>) -> Vec<Uuid> {
    v.sort();
    v
}

const MAIN_TF: &str = "resource \"terraform_data\" \"workspace\" {}\n";

fn template_yaml(version: &str, activate: bool) -> String {
    format!(
        r#"organization: acme
template: python-dev
version: {version}
activate: {activate}
source: ./main.tf
parameters:
  - {{name: cpus, required: true}}
  - {{name: region, default: eu}}
presets:
  - name: large
    parameters: {{cpus: "8", region: eu}}
    prebuilds:
      instances: 3
      expiration_policy: {{ttl: 86400}}
      scheduling:
        timezone: Europe/Berlin
        schedule:
          - {{cron: "* 8-18 * * 1-5", instances: 5}}
          - {{cron: "* 9-12 * * 6", instances: 1}}
  - name: small
    parameters: {{cpus: 2}}
    prebuilds:
      instances: 1
"#
    )
}

fn preset_ids(pushed: &Value) -> HashMap<String, Uuid> {
    pushed["presets"]
        .as_array()
        .expect("presets")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["id"].as_str().unwrap().parse().unwrap(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Templates

#[tokio::test]
async fn template_push_writes_the_version_in_one_transaction_and_requests_reconciles() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    env.write("main.tf", MAIN_TF);
    let file = env.write("v1.yaml", &template_yaml("v1", true));

    let pushed = env.json(&["template", "push", &file, "--json"]).await;
    let pushed = &pushed[0];
    assert_eq!(pushed["template"], "python-dev");
    assert_eq!(pushed["template_created"], true);
    assert_eq!(pushed["activated"], true);
    let v1 = preset_ids(pushed);
    let version_id: Uuid = pushed["version_id"].as_str().unwrap().parse().unwrap();

    // Rows.
    let c = env.db.pool.get().await.expect("pool");
    let t = c
        .query_one(
            "SELECT t.active_version_id, v.source, v.name
             FROM templates t JOIN template_versions v ON v.template_id = t.id
             WHERE t.name = 'python-dev'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(t.get::<_, Option<Uuid>>(0), Some(version_id));
    assert_eq!(
        t.get::<_, Option<String>>(1).as_deref(),
        Some(MAIN_TF),
        "the source file's contents are stored"
    );
    let params = c
        .query(
            "SELECT name, required, default_value FROM template_version_parameters
             WHERE template_version_id = $1 ORDER BY name",
            &[&version_id],
        )
        .await
        .unwrap();
    let params: Vec<(String, bool, Option<String>)> = params
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        params,
        vec![
            ("cpus".into(), true, None),
            ("region".into(), false, Some("eu".into()))
        ]
    );
    let large = c
        .query_one(
            "SELECT desired_instances, invalidate_after_secs, scheduling_timezone, prebuild_status
             FROM template_version_presets WHERE id = $1",
            &[&v1["large"]],
        )
        .await
        .unwrap();
    assert_eq!(large.get::<_, Option<i32>>(0), Some(3));
    assert_eq!(large.get::<_, Option<i32>>(1), Some(86400));
    assert_eq!(large.get::<_, String>(2), "Europe/Berlin");
    assert_eq!(large.get::<_, String>(3), "healthy");
    let small = c
        .query_one(
            "SELECT desired_instances, invalidate_after_secs, scheduling_timezone
             FROM template_version_presets WHERE id = $1",
            &[&v1["small"]],
        )
        .await
        .unwrap();
    assert_eq!(small.get::<_, Option<i32>>(0), Some(1));
    assert_eq!(small.get::<_, Option<i32>>(1), None);
    assert_eq!(small.get::<_, String>(2), "");
    let values: Vec<(String, String)> = c
        .query(
            "SELECT name, value FROM template_version_preset_parameters
             WHERE template_version_preset_id = $1 ORDER BY name",
            &[&v1["large"]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        values,
        vec![("cpus".into(), "8".into()), ("region".into(), "eu".into())]
    );
    let small_cpus: String = c
        .query_one(
            "SELECT value FROM template_version_preset_parameters
             WHERE template_version_preset_id = $1 AND name = 'cpus'",
            &[&v1["small"]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(small_cpus, "2", "unquoted YAML numbers are stored as text");
    let schedules: Vec<(i32, String, i32)> = c
        .query(
            "SELECT position, cron_expression, desired_instances
             FROM template_version_preset_prebuild_schedules WHERE preset_id = $1 ORDER BY position",
            &[&v1["large"]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        schedules,
        vec![
            (0, "* 8-18 * * 1-5".into(), 5),
            (1, "* 9-12 * * 6".into(), 1)
        ]
    );

    // Reconcile jobs for the new (active) presets, published before the command exited.
    let jobs = env.reconcile_jobs().await;
    assert_eq!(
        sorted(jobs.iter().map(|j| j.0).collect()),
        sorted(v1.values().copied().collect())
    );
    assert!(jobs.iter().all(|j| j.1 == ReconcileReason::TemplateChanged));
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        0,
        "the CLI relayed its outbox rows"
    );

    // v2 with activate: the new presets and the superseded ones are reconciled.
    let file2 = env.write("v2.yaml", &template_yaml("v2", true));
    let pushed2 = env.json(&["template", "push", &file2, "--json"]).await;
    assert_eq!(pushed2[0]["template_created"], false);
    let v2 = preset_ids(&pushed2[0]);
    let jobs = env.reconcile_jobs().await;
    let mut want: Vec<Uuid> = v1.values().chain(v2.values()).copied().collect();
    want.sort();
    assert_eq!(sorted(jobs.iter().map(|j| j.0).collect()), want);

    // The same version again: refused, nothing written.
    let before = env.row_counts().await;
    let again = env.ctl(&["template", "push", &file2]).await;
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("already has a version 'v2'"),
        "{}",
        stderr(&again)
    );
    assert_eq!(env.row_counts().await, before);

    // Activate v1 again: both versions' presets are reconciled.
    let out = env.ok(&["template", "activate", "python-dev", "v1"]).await;
    assert!(
        stdout(&out).contains("activated version v1"),
        "{}",
        stdout(&out)
    );
    let jobs = env.reconcile_jobs().await;
    assert_eq!(sorted(jobs.iter().map(|j| j.0).collect()), want);
    let active: Uuid = c
        .query_one(
            "SELECT active_version_id FROM templates WHERE name = 'python-dev'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(active, version_id);

    // Unknown version: says which exist.
    let out = env.ctl(&["template", "activate", "python-dev", "v9"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("versions: v1, v2"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn template_push_reports_every_bad_input_with_file_and_field_and_writes_nothing() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    let head = "organization: acme\ntemplate: t\nversion: v1\nactivate: true\n";
    let with_preset = |prebuilds: &str| {
        format!(
            "{head}parameters: [{{name: cpus}}]\npresets:\n  - name: p\n    prebuilds:\n{prebuilds}"
        )
    };
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "cron-minute",
            with_preset("      instances: 1\n      scheduling:\n        timezone: UTC\n        schedule:\n          - {cron: \"* 8 * * *\", instances: 1}\n          - {cron: \"30 9 * * *\", instances: 2}\n"),
            vec!["presets[0].prebuilds.scheduling.schedule[1].cron: cron expression '30 9 * * *': minute field is '30' but must be '*'"],
        ),
        (
            "cron-field",
            with_preset("      instances: 1\n      scheduling:\n        timezone: UTC\n        schedule:\n          - {cron: \"* 25 * * *\", instances: 1}\n"),
            vec!["presets[0].prebuilds.scheduling.schedule[0].cron: cron expression '* 25 * * *': hour field '25' is invalid"],
        ),
        (
            "overlap",
            with_preset("      instances: 1\n      scheduling:\n        timezone: UTC\n        schedule:\n          - {cron: \"* 8-18 * * 1-5\", instances: 1}\n          - {cron: \"* 18-20 * * 5\", instances: 2}\n"),
            vec!["presets[0].prebuilds.scheduling.schedule[1].cron: schedules '* 8-18 * * 1-5' and '* 18-20 * * 5' overlap"],
        ),
        (
            // Coder's rule compares day fields as sets: day 31 meets April's days, so Coder
            // refuses the pair although no April 31st exists; so do we.
            "overlap-as-coder",
            with_preset("      instances: 1\n      scheduling:\n        timezone: UTC\n        schedule:\n          - {cron: \"* * 31 * *\", instances: 1}\n          - {cron: \"* * * 4 *\", instances: 2}\n"),
            vec!["presets[0].prebuilds.scheduling.schedule[1].cron: schedules '* * 31 * *' and '* * * 4 *' overlap: their hours, months and days intersect"],
        ),
        (
            "weekday-7",
            with_preset("      instances: 1\n      scheduling:\n        timezone: UTC\n        schedule:\n          - {cron: \"* 9 * * 7\", instances: 1}\n"),
            vec!["presets[0].prebuilds.scheduling.schedule[0].cron: cron expression '* 9 * * 7': day-of-week field '7' is invalid: 7 is out of range 0-6"],
        ),
        (
            "timezone",
            with_preset("      instances: 1\n      scheduling:\n        timezone: Mars/Olympus\n        schedule:\n          - {cron: \"* 8 * * *\", instances: 1}\n"),
            vec!["presets[0].prebuilds.scheduling.timezone: unknown scheduling timezone 'Mars/Olympus'"],
        ),
        (
            "negative-instances",
            with_preset("      instances: -1\n"),
            vec!["presets[0].prebuilds.instances: instances must be 0 or more, not -1"],
        ),
        (
            "negative-ttl",
            with_preset("      instances: 1\n      expiration_policy: {ttl: -60}\n"),
            vec!["presets[0].prebuilds.expiration_policy.ttl: must be 0 (never expire) or a number of seconds, not -60"],
        ),
        (
            "duplicate-presets",
            format!("{head}presets:\n  - {{name: p, prebuilds: {{instances: 1}}}}\n  - {{name: p}}\n"),
            vec!["presets[1].name: duplicate preset name 'p' (first defined at presets[0])"],
        ),
        (
            "unknown-parameter",
            format!("{head}parameters: [{{name: cpus}}]\npresets:\n  - name: p\n    parameters: {{gpu: \"1\"}}\n"),
            vec!["presets[0].parameters.gpu: unknown parameter 'gpu'"],
        ),
        (
            "unreadable-source",
            format!("{head}source: ./missing.tf\n"),
            vec!["source: cannot read './missing.tf'"],
        ),
        (
            "unknown-field",
            with_preset("      instance: 1\n"),
            vec!["presets[0].prebuilds: unknown field `instance`"],
        ),
        (
            "several-at-once",
            format!("{head}presets:\n  - name: p\n    prebuilds: {{instances: -2, expiration_policy: {{ttl: -1}}}}\n  - {{name: p}}\n"),
            vec![
                "presets[0].prebuilds.instances:",
                "presets[0].prebuilds.expiration_policy.ttl:",
                "presets[1].name: duplicate preset name",
                "3 problem(s) found; nothing was written",
            ],
        ),
        (
            "unknown-organization",
            "organization: nope\ntemplate: t\nversion: v1\n".to_owned(),
            vec!["organization: organization 'nope' does not exist; create it with `prebuildsctl org create nope`"],
        ),
    ];
    let before = env.row_counts().await;
    for (name, yaml, wants) in cases {
        let file = env.write(&format!("{name}.yaml"), &yaml);
        let out = env.ctl(&["template", "push", &file]).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(&file), "{name}: the file is named: {err}");
        for want in wants {
            assert!(err.contains(want), "{name}: want {want:?} in:\n{err}");
        }
        assert_eq!(env.row_counts().await, before, "{name}: nothing written");
    }
    assert_eq!(env.reconcile_jobs().await, vec![]);

    // A required parameter no preset sets is a warning, not an error.
    let file = env.write(
        "warn.yaml",
        &format!("{head}parameters: [{{name: cpus, required: true}}]\npresets:\n  - {{name: p, prebuilds: {{instances: 1}}}}\n"),
    );
    let out = env.ok(&["template", "push", &file]).await;
    assert!(
        stderr(&out).contains("warning: ")
            && stderr(&out).contains(
                "presets[0].parameters: preset 'p' does not set required parameter 'cpus'"
            ),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        env.count("SELECT count(*) FROM template_version_presets")
            .await,
        1
    );
}

#[tokio::test]
async fn template_push_refuses_files_over_the_input_bounds_and_says_how_to_raise_them() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    let file_with = |presets: usize, instances: u32, scheduled: u32| {
        let mut yaml = format!(
            "organization: acme\ntemplate: big\nversion: v{presets}-{instances}-{scheduled}\n\
             presets:\n  - name: p0\n    prebuilds:\n      instances: {instances}\n      \
             scheduling:\n        timezone: UTC\n        schedule:\n          \
             - {{cron: \"* 8-18 * * 1-5\", instances: {scheduled}}}\n"
        );
        for i in 1..presets {
            yaml.push_str(&format!(
                "  - {{name: p{i}, prebuilds: {{instances: 1}}}}\n"
            ));
        }
        env.write(
            &format!("big-{presets}-{instances}-{scheduled}.yaml"),
            &yaml,
        )
    };
    let before = env.row_counts().await;
    /// (file, extra environment, what stderr must say).
    type Refused<'a> = (String, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let refused: Vec<Refused> = vec![
        (
            file_with(1, 101, 0),
            vec![],
            vec![
                "presets[0].prebuilds.instances: preset 'p0' asks for 101 prebuilds, more than the \
                 limit of 100 per preset; lower it, or raise the limit with \
                 PREBUILDS_MAX_INSTANCES_PER_PRESET (--max-instances-per-preset)",
                "1 problem(s) found; nothing was written",
            ],
        ),
        (
            file_with(1, 2, 101),
            vec![],
            vec![
                "presets[0].prebuilds.scheduling.schedule[0].instances: preset 'p0' asks for 101 \
                 prebuilds at '* 8-18 * * 1-5', more than the limit of 100 per preset",
            ],
        ),
        (
            file_with(101, 1, 0),
            vec![],
            vec![
                "presets: template 'big' has 101 presets, more than the limit of 100 per \
                 template; split it, or raise the limit with PREBUILDS_MAX_PRESETS_PER_TEMPLATE \
                 (--max-presets-per-template)",
            ],
        ),
        (
            file_with(4, 1, 0),
            vec![("PREBUILDS_MAX_PRESETS_PER_TEMPLATE", "3")],
            vec!["presets: template 'big' has 4 presets, more than the limit of 3 per template"],
        ),
    ];
    for (file, vars, wants) in &refused {
        let out = env.ctl_with(&["template", "push", file], vars).await;
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{file}: {err}");
        for want in wants {
            assert!(err.contains(want), "{file}: want {want:?} in:\n{err}");
        }
        assert_eq!(env.row_counts().await, before, "{file}: nothing written");
    }
    // Raised through the variables (or the flag), the same files are pushed.
    let raised = [("PREBUILDS_MAX_INSTANCES_PER_PRESET", "200")];
    let out = env
        .ctl_with(&["template", "push", &refused[0].0], &raised)
        .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    env.ok(&[
        "template",
        "push",
        &refused[2].0,
        "--max-presets-per-template",
        "101",
    ])
    .await;
    assert_eq!(
        env.count("SELECT count(*) FROM template_version_presets")
            .await,
        1 + 101
    );
    // A limit of 0 would refuse everything: a usage error.
    let out = env
        .ctl_with(
            &["template", "push", &refused[0].0],
            &[("PREBUILDS_MAX_INSTANCES_PER_PRESET", "0")],
        )
        .await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[tokio::test]
async fn writes_give_up_on_a_held_lock_and_say_what_they_waited_for() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    env.write("main.tf", MAIN_TF);
    let v1 = env.write("v1.yaml", &template_yaml("v1", true));
    let pushed = env.json(&["template", "push", &v1, "--json"]).await;
    let large = preset_ids(&pushed[0])["large"];
    env.reconcile_jobs().await;

    // A worker's reconcile pass of v1's `large` holds its lock; activating v2 must take it (the
    // old version's pool drains), gives up after the timeout and writes nothing.
    let mut holder = env.db.pool.get().await.unwrap();
    let holding = holder.transaction().await.unwrap();
    prebuilds_store::lock::lock_preset(&holding, large)
        .await
        .unwrap();
    let before = env.row_counts().await;
    let v2 = env.write("v2.yaml", &template_yaml("v2", true));
    let started = std::time::Instant::now();
    let out = env
        .ctl_with(
            &["template", "push", &v2],
            &[("PREBUILDS_CLI_LOCK_TIMEOUT", "1s")],
        )
        .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "timed out after 1s waiting for the reconcile lock of preset {large}; another writer \
             (a worker's reconcile pass or another push) holds it; nothing was written — try \
             again (PREBUILDS_CLI_LOCK_TIMEOUT or --lock-timeout sets how long to wait)"
        )),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "it did not hang"
    );
    assert_eq!(env.row_counts().await, before, "nothing written");
    holding.rollback().await.unwrap();
    env.ok(&["template", "push", &v2]).await;

    // Another writer holds the template row: the command names the template.
    let holding = holder.transaction().await.unwrap();
    holding
        .execute(
            "SELECT 1 FROM templates WHERE name = 'python-dev' FOR UPDATE",
            &[],
        )
        .await
        .unwrap();
    let out = env
        .ctl(&[
            "template",
            "invalidate",
            "python-dev",
            "--lock-timeout",
            "300ms",
        ])
        .await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(
            "timed out after 300ms waiting for a lock on template 'python-dev'; another writer"
        ),
        "{err}"
    );
    holding.rollback().await.unwrap();
    env.ok(&["template", "invalidate", "python-dev"]).await;
}

#[tokio::test]
async fn template_invalidate_deprecate_and_delete_change_the_template_and_reconcile_its_presets() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    env.write("main.tf", MAIN_TF);
    let file = env.write("v1.yaml", &template_yaml("v1", true));
    let pushed = env.json(&["template", "push", &file, "--json"]).await;
    let presets: Vec<Uuid> = sorted(preset_ids(&pushed[0]).into_values().collect());
    env.reconcile_jobs().await;

    env.ok(&["template", "invalidate", "python-dev"]).await;
    assert_eq!(
        env.count(
            "SELECT count(*) FROM template_version_presets WHERE last_invalidated_at IS NOT NULL"
        )
        .await,
        2
    );
    let jobs = env.reconcile_jobs().await;
    assert_eq!(sorted(jobs.iter().map(|j| j.0).collect()), presets);
    assert!(jobs.iter().all(|j| j.1 == ReconcileReason::Manual));

    env.ok(&["template", "deprecate", "python-dev"]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM templates WHERE deprecated = 'deprecated'")
            .await,
        1
    );
    let jobs = env.reconcile_jobs().await;
    assert_eq!(sorted(jobs.iter().map(|j| j.0).collect()), presets);
    // Deprecated presets are inactive: desired 0.
    let status = env.json(&["status", "--json"]).await;
    assert_eq!(status.len(), 2, "{status:#?}");
    assert!(status
        .iter()
        .all(|r| r["active"] == false && r["desired"] == 0));

    env.ok(&["template", "deprecate", "python-dev", "--message", "use v2"])
        .await;
    assert_eq!(
        env.count("SELECT count(*) FROM templates WHERE deprecated = 'use v2'")
            .await,
        1
    );
    env.ok(&["template", "deprecate", "python-dev", "--undo"])
        .await;
    assert_eq!(
        env.count("SELECT count(*) FROM templates WHERE deprecated = ''")
            .await,
        1
    );
    env.reconcile_jobs().await;

    env.ok(&["template", "delete", "python-dev"]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM templates WHERE deleted")
            .await,
        1
    );
    let jobs = env.reconcile_jobs().await;
    assert_eq!(sorted(jobs.iter().map(|j| j.0).collect()), presets);
    let out = env.ctl(&["template", "invalidate", "python-dev"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("template 'python-dev' not found"),
        "{}",
        stderr(&out)
    );

    // A name in two organizations must be qualified.
    let c = env.db.pool.get().await.expect("pool");
    let a = fixtures::organization(&c, "org-a").await;
    let b = fixtures::organization(&c, "org-b").await;
    fixtures::template_with_preset(&c, a, "shared", Some(1)).await;
    fixtures::template_with_preset(&c, b, "shared", Some(1)).await;
    let out = env.ctl(&["template", "invalidate", "shared"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("exists in several organizations (org-a, org-b); pass --organization"),
        "{}",
        stderr(&out)
    );
    env.ok(&[
        "template",
        "invalidate",
        "shared",
        "--organization",
        "org-b",
    ])
    .await;
    let invalidated = |org: &'static str| {
        let env = &env;
        async move {
            env.count(&format!(
                "SELECT count(*) FROM template_version_presets p
                 JOIN template_versions v ON v.id = p.template_version_id
                 JOIN templates t ON t.id = v.template_id
                 JOIN organizations o ON o.id = t.organization_id
                 WHERE p.last_invalidated_at IS NOT NULL AND t.name = 'shared' AND o.name = '{org}'"
            ))
            .await
        }
    };
    assert_eq!(invalidated("org-b").await, 1);
    assert_eq!(invalidated("org-a").await, 0);
}

#[tokio::test]
async fn template_push_with_the_broker_down_commits_and_leaves_the_jobs_in_the_outbox() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    env.write("main.tf", MAIN_TF);
    let file = env.write("v1.yaml", &template_yaml("v1", true));
    let out = tokio::process::Command::new(binary("prebuildsctl"))
        .args(["template", "push", &file])
        .env("DATABASE_URL", &env.db.url)
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env("PREBUILDS_AMQP_PREFIX", env.broker.prefix())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("stay queued in the outbox"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        env.count("SELECT count(*) FROM template_version_presets")
            .await,
        2
    );
    assert_eq!(
        env.count("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .await,
        2,
        "the jobs wait for the workers' relay"
    );
}

#[tokio::test]
async fn status_watch_refreshes_until_interrupted() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let env = Env::new().await;
    let c = env.db.pool.get().await.expect("pool");
    let org = fixtures::organization(&c, "acme").await;
    fixtures::template_with_preset(&c, org, "python-dev", Some(1)).await;
    let mut child = tokio::process::Command::new(binary("prebuildsctl"))
        .args(["status", "--watch", "--json", "--interval", "200ms"])
        .env("DATABASE_URL", &env.db.url)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for _ in 0..3 {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
            .await
            .expect("a refresh within 5s")
            .unwrap()
            .expect("a line");
        let rows: Vec<Value> = serde_json::from_str(&line).expect("one JSON array per refresh");
        assert_eq!(rows.len(), 1);
    }
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits on Ctrl-C")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------------------------------------
// Status, pause/resume

#[tokio::test]
async fn status_json_reports_the_pool_as_the_reconciler_sees_it() {
    let env = Env::new().await;
    let c = env.db.pool.get().await.expect("pool");
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "python-dev", Some(2)).await;
    let now = Utc::now();
    // One running and ready prebuild (build #1 succeeded, agent ready).
    fixtures::prebuild(&c, &fx, &PrebuildSpec::running(now - TimeDelta::minutes(5))).await;
    // One running, not ready yet.
    fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec {
            ready: false,
            ..PrebuildSpec::running(now - TimeDelta::minutes(4))
        },
    )
    .await;
    // One being created.
    fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec {
            transition: "start",
            job_status: "pending",
            created_at: now - TimeDelta::minutes(1),
            ready: false,
        },
    )
    .await;
    // A second template whose preset has an always-on schedule.
    let scheduled = fixtures::template_with_preset(&c, org, "go-dev", Some(1)).await;
    c.execute(
        "UPDATE template_version_presets SET scheduling_timezone = 'UTC' WHERE id = $1",
        &[&scheduled.preset_id],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO template_version_preset_prebuild_schedules (id, preset_id, position, cron_expression, desired_instances)
         VALUES ($1, $2, 0, '* * * * *', 4)",
        &[&Uuid::new_v4(), &scheduled.preset_id],
    )
    .await
    .unwrap();
    // A preset without prebuilds and without live prebuilds is not listed.
    fixtures::template_with_preset(&c, org, "no-prebuilds", None).await;

    let rows = env.json(&["status", "--json"]).await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let row = rows
        .iter()
        .find(|r| r["template"] == "python-dev")
        .expect("python-dev row");
    for key in [
        "organization",
        "template",
        "template_version",
        "active",
        "preset",
        "preset_id",
        "desired",
        "running",
        "eligible",
        "starting",
        "stopping",
        "deleting",
        "expired",
        "status",
        "backoff_until",
        "paused",
    ] {
        assert!(row.get(key).is_some(), "key {key} missing: {row}");
    }
    assert_eq!(row["organization"], "acme");
    assert_eq!(row["template_version"], "v1");
    assert_eq!(row["active"], true);
    assert_eq!(row["preset"], "default");
    assert_eq!(row["preset_id"], fx.preset_id.to_string());
    assert_eq!(row["desired"], 2);
    assert_eq!(row["desired_source"], "base");
    assert_eq!(row["running"], 2);
    assert_eq!(row["eligible"], 1);
    assert_eq!(row["starting"], 1);
    assert_eq!(row["stopping"], 0);
    assert_eq!(row["deleting"], 0);
    assert_eq!(row["expired"], 0);
    assert_eq!(row["status"], "healthy");
    assert_eq!(row["backoff_until"], Value::Null);
    assert_eq!(row["paused"], false);

    let go = rows.iter().find(|r| r["template"] == "go-dev").unwrap();
    assert_eq!(go["desired"], 4);
    assert_eq!(go["desired_source"], "schedule");
    assert_eq!(go["running"], 0);

    // --template filters; the table is for people.
    let only = env
        .json(&["status", "--template", "go-dev", "--json"])
        .await;
    assert_eq!(only.len(), 1);
    let table = stdout(&env.ok(&["status"]).await);
    assert!(table.starts_with("ORGANIZATION"), "{table}");
    assert!(table.contains("4 (schedule)"), "{table}");
    let out = env.ctl(&["status", "--template", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("template 'nope' not found"));

    // A failed create puts the preset in backoff.
    let failed_at = Utc::now() - TimeDelta::seconds(10);
    fixtures::prebuild(
        &c,
        &fx,
        &PrebuildSpec {
            transition: "start",
            job_status: "failed",
            created_at: failed_at,
            ready: false,
        },
    )
    .await;
    let rows = env
        .json(&["status", "--template", "python-dev", "--json"])
        .await;
    let until = rows[0]["backoff_until"]
        .as_str()
        .expect("backoff_until set");
    let until: chrono::DateTime<Utc> = until.parse().expect("RFC 3339");
    assert!(until > Utc::now());
    let table = stdout(&env.ok(&["status", "--template", "python-dev"]).await);
    assert!(table.contains("backoff until"), "{table}");

    // `prebuilds list` shows the live prebuilds.
    let prebuilds = env.json(&["prebuilds", "list", "--json"]).await;
    assert_eq!(prebuilds.len(), 4);
    assert_eq!(
        prebuilds.iter().filter(|p| p["ready"] == true).count(),
        1,
        "{prebuilds:#?}"
    );
    assert!(prebuilds
        .iter()
        .all(|p| p["preset_id"] == fx.preset_id.to_string()));
}

#[tokio::test]
async fn pause_and_resume_flip_each_scope_and_resume_requests_settings_changed_reconciles() {
    let env = Env::new().await;
    let c = env.db.pool.get().await.expect("pool");
    let org = fixtures::organization(&c, "acme").await;
    let a = fixtures::template_with_preset(&c, org, "a", Some(1)).await;
    let b = fixtures::template_with_preset(&c, org, "b", Some(2)).await;

    // Global.
    env.ok(&["pause"]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM prebuilds_settings WHERE reconciliation_paused")
            .await,
        1
    );
    assert_eq!(
        env.reconcile_jobs().await,
        vec![],
        "a pause requests nothing"
    );
    let rows = env.json(&["status", "--json"]).await;
    assert!(rows
        .iter()
        .all(|r| r["paused"] == true && r["paused_by"] == "global"));
    let again = env.ok(&["pause"]).await;
    assert!(
        stdout(&again).contains("already paused"),
        "{}",
        stdout(&again)
    );
    env.ok(&["resume"]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM prebuilds_settings WHERE reconciliation_paused")
            .await,
        0
    );
    let jobs = env.reconcile_jobs().await;
    assert_eq!(
        sorted(jobs.iter().map(|j| j.0).collect()),
        sorted(vec![a.preset_id, b.preset_id])
    );
    assert!(jobs.iter().all(|j| j.1 == ReconcileReason::SettingsChanged));

    // Template.
    env.ok(&["pause", "--template", "a"]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM templates WHERE paused")
            .await,
        1
    );
    let rows = env.json(&["status", "--json"]).await;
    let paused: Vec<&Value> = rows.iter().filter(|r| r["paused"] == true).collect();
    assert_eq!(paused.len(), 1);
    assert_eq!(paused[0]["template"], "a");
    env.ok(&["resume", "--template", "a"]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM templates WHERE paused")
            .await,
        0
    );
    assert_eq!(
        env.reconcile_jobs().await,
        vec![(a.preset_id, ReconcileReason::SettingsChanged)]
    );

    // Preset.
    let id = b.preset_id.to_string();
    env.ok(&["pause", "--preset", &id]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM template_version_presets WHERE paused")
            .await,
        1
    );
    env.ok(&["resume", "--preset", &id]).await;
    assert_eq!(
        env.count("SELECT count(*) FROM template_version_presets WHERE paused")
            .await,
        0
    );
    assert_eq!(
        env.reconcile_jobs().await,
        vec![(b.preset_id, ReconcileReason::SettingsChanged)]
    );

    // Bad scopes.
    let out = env
        .ctl(&["pause", "--preset", &Uuid::new_v4().to_string()])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"));
    let out = env
        .ctl(&["pause", "--template", "a", "--preset", &id])
        .await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "--template and --preset conflict"
    );
}

// ---------------------------------------------------------------------------------------------
// Claims

/// Answers claim requests like a worker would: `claimed` for preset requests, `no_eligible_prebuild`
/// with `no_matching_preset` (and two presets) for template requests, `pool_empty` for the name
/// `empty`, `rejected` for the name `taken`. Every request is reported.
async fn claim_responder(broker: &TestBroker) -> mpsc::UnboundedReceiver<CloudEvent<ClaimRequest>> {
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let connection = prebuilds_runtime::amqp::connect(&broker.url, "test-claim-responder")
        .await
        .expect("connect");
    let channel = connection.create_channel().await.expect("channel");
    let mut consumer = channel
        .basic_consume(
            broker.queue(QueueKind::Claims).as_str().into(),
            "test-claim-responder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume claims");
    tokio::spawn(async move {
        let _connection = connection;
        while let Some(Ok(delivery)) = consumer.next().await {
            let request = RawEvent::parse(&delivery.data)
                .and_then(|r| r.decode::<ClaimRequest>())
                .expect("a valid claim request");
            let reply_to = delivery.properties.reply_to().clone().expect("reply_to");
            let correlation = delivery
                .properties
                .correlation_id()
                .clone()
                .expect("correlation_id");
            let reply = if request.data.workspace_name == "taken" {
                ClaimReply {
                    outcome: ClaimOutcome::Rejected,
                    workspace_id: None,
                    build_id: None,
                    job_id: None,
                    preset_id: request.data.preset_id,
                    error: Some(ClaimError {
                        code: ClaimErrorCode::NameConflict,
                        message: "the user already has a workspace named taken".into(),
                    }),
                    reason: None,
                    presets: vec![],
                }
            } else if request.data.workspace_name == "empty" {
                ClaimReply {
                    outcome: ClaimOutcome::NoEligiblePrebuild,
                    workspace_id: None,
                    build_id: None,
                    job_id: None,
                    preset_id: request.data.preset_id,
                    error: None,
                    reason: Some(MissReason::PoolEmpty),
                    presets: vec![],
                }
            } else if request.data.preset_id.is_some() {
                ClaimReply {
                    outcome: ClaimOutcome::Claimed,
                    workspace_id: Some(Uuid::from_u128(1)),
                    build_id: Some(Uuid::from_u128(2)),
                    job_id: Some(Uuid::from_u128(3)),
                    preset_id: request.data.preset_id,
                    error: None,
                    reason: None,
                    presets: vec![],
                }
            } else {
                ClaimReply {
                    outcome: ClaimOutcome::NoEligiblePrebuild,
                    workspace_id: None,
                    build_id: None,
                    job_id: None,
                    preset_id: None,
                    error: None,
                    reason: Some(MissReason::NoMatchingPreset),
                    presets: vec![
                        PresetParameters {
                            preset_id: Uuid::from_u128(7),
                            name: "large".into(),
                            parameters: vec![
                                Parameter {
                                    name: "cpus".into(),
                                    value: "8".into(),
                                },
                                Parameter {
                                    name: "region".into(),
                                    value: "eu".into(),
                                },
                            ],
                        },
                        PresetParameters {
                            preset_id: Uuid::from_u128(8),
                            name: "any".into(),
                            parameters: vec![],
                        },
                    ],
                }
            };
            let event = CloudEvent::new("test-responder", Utc::now(), reply);
            channel
                .basic_publish(
                    "".into(),
                    reply_to.as_str().into(),
                    BasicPublishOptions::default(),
                    &serde_json::to_vec(&event).unwrap(),
                    BasicProperties::default().with_correlation_id(correlation),
                )
                .await
                .expect("publish reply");
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            let _ = seen_tx.send(request);
        }
    });
    seen_rx
}

#[tokio::test]
async fn claim_sends_the_request_and_prints_the_reply() {
    let env = Env::new().await;
    let c = env.db.pool.get().await.expect("pool");
    let org = fixtures::organization(&c, "acme").await;
    let alice = fixtures::user(&c, "alice", false).await;
    let fx = fixtures::template_with_preset(&c, org, "python-dev", Some(1)).await;
    let mut seen = claim_responder(&env.broker).await;

    // By preset: claimed, exit 0.
    let preset = fx.preset_id.to_string();
    let rows = env
        .json(&[
            "claim",
            "--user",
            "alice",
            "--preset",
            &preset,
            "--name",
            "alice-dev",
            "--param",
            "dotfiles=https://x",
            "--json",
        ])
        .await;
    let r = &rows[0];
    assert_eq!(r["outcome"], "claimed");
    assert_eq!(r["workspace_id"], Uuid::from_u128(1).to_string());
    assert_eq!(r["build_id"], Uuid::from_u128(2).to_string());
    assert_eq!(r["job_id"], Uuid::from_u128(3).to_string());
    assert_eq!(r["preset_id"], preset);
    assert!(r["latency_ms"].as_f64().unwrap() >= 0.0);
    let request = seen.recv().await.unwrap();
    assert_eq!(
        request.id.to_string(),
        r["request_id"].as_str().unwrap(),
        "id = idempotency key"
    );
    assert_eq!(request.data.user_id, alice);
    assert_eq!(request.data.workspace_name, "alice-dev");
    assert_eq!(request.data.preset_id, Some(fx.preset_id));
    assert_eq!(request.data.parameters[0].name, "dotfiles");

    // By template and parameters: the template id is resolved; no preset matches → exit 1, with
    // the reason and the presets' parameter sets.
    let out = env
        .ctl(&[
            "claim",
            "--user",
            "alice",
            "--template",
            "python-dev",
            "--param",
            "cpus=8",
            "--name",
            "alice-dev2",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("no_eligible_prebuild")
            && stdout(&out).contains("no_matching_preset"),
        "{}",
        stdout(&out)
    );
    let err = stderr(&out);
    for want in [
        "no eligible prebuild (no_matching_preset): no preset of template 'python-dev' matches \
         cpus=8 (parameters left out take their defaults); the presets of its active version are:",
        &format!("\n  large ({}): cpus=8 region=eu\n", Uuid::from_u128(7)),
        &format!(
            "\n  any ({}): (no parameters: matches any request)\n",
            Uuid::from_u128(8)
        ),
        "pass --param values equal to one of them, or --preset ID",
    ] {
        assert!(err.contains(want), "want {want:?} in:\n{err}");
    }
    let request = seen.recv().await.unwrap();
    assert_eq!(request.data.template_id, Some(fx.template_id));
    assert_eq!(request.data.preset_id, None);
    assert_eq!(
        (
            request.data.parameters[0].name.as_str(),
            request.data.parameters[0].value.as_str()
        ),
        ("cpus", "8")
    );
    // --json prints the reason and the presets.
    let out = env
        .ctl(&[
            "claim",
            "--user",
            "alice",
            "--template",
            "python-dev",
            "--name",
            "alice-dev3",
            "--json",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["outcome"], "no_eligible_prebuild");
    assert_eq!(rows[0]["reason"], "no_matching_preset");
    assert_eq!(rows[0]["presets"][0]["name"], "large");
    assert_eq!(rows[0]["presets"][0]["parameters"][0]["name"], "cpus");
    assert!(
        stderr(&out).contains("matches no --param values"),
        "{}",
        stderr(&out)
    );
    seen.recv().await.unwrap();

    // The pool of the preset is empty: pool_empty, naming it.
    let out = env
        .ctl(&[
            "claim", "--user", "alice", "--preset", &preset, "--name", "empty", "--json",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["reason"], "pool_empty");
    assert_eq!(rows[0]["presets"], serde_json::json!([]));
    assert!(
        stderr(&out).contains(&format!(
            "no eligible prebuild (pool_empty): preset {preset} has no ready, unexpired prebuild"
        )),
        "{}",
        stderr(&out)
    );
    seen.recv().await.unwrap();

    // Rejected → exit 1 with the code.
    let out = env
        .ctl(&[
            "claim", "--user", "alice", "--preset", &preset, "--name", "taken",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("rejected (name_conflict"),
        "{}",
        stderr(&out)
    );

    // Unknown user: exit 1 before anything is sent.
    let out = env
        .ctl(&["claim", "--user", "bob", "--preset", &preset, "--name", "x"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("user 'bob' does not exist"),
        "{}",
        stderr(&out)
    );
    // An invalid workspace name is a usage error.
    let out = env
        .ctl(&[
            "claim", "--user", "alice", "--preset", &preset, "--name", "-bad-",
        ])
        .await;
    assert_eq!(out.status.code(), Some(2));
}

/// The claim example of `prebuildsctl --help` against the demo template (`examples/`), with a
/// real worker and a provisioner that succeeds: `cpus=8` alone matches `large` (region takes its
/// default); misses say why.
#[tokio::test]
async fn the_help_claim_example_claims_from_the_demo_template() {
    let env = Env::new().await;
    env.ok(&["org", "create", "demo"]).await;
    env.ok(&[
        "user",
        "create",
        "--username",
        "alice",
        "--organization",
        "demo",
    ])
    .await;
    let demo = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/demo-template.yaml"
    );
    let pushed = env.json(&["template", "push", demo, "--json"]).await;
    let presets = preset_ids(&pushed[0]);
    let _provisioner = FakeProvisioner::start(&env.broker, |_| FakeOutcome::Succeed).await;
    let (_worker, _) = stack::start(
        "prebuilds-worker",
        &env.db,
        &env.broker,
        &[("RUST_LOG", "warn")],
    );
    stack::wait_for(
        Duration::from_secs(30),
        "a ready large prebuild",
        || async { stack::pool_counts(&env.db, presets["large"]).await.eligible >= 1 },
    )
    .await;

    // Exactly the example of `prebuildsctl --help`.
    let help = stdout(&env.ok(&["--help"]).await);
    let example = help
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("prebuildsctl claim "))
        .expect("a claim example");
    let args: Vec<&str> = example.split_whitespace().skip(1).collect();
    assert_eq!(
        args,
        [
            "claim",
            "--user",
            "alice",
            "--template",
            "python-dev",
            "--param",
            "cpus=8",
            "--name",
            "dev"
        ]
    );
    let mut json_args = args.clone();
    json_args.push("--json");
    let rows = env.json(&json_args).await;
    assert_eq!(rows[0]["outcome"], "claimed", "{rows:?}");
    assert_eq!(rows[0]["preset_id"], presets["large"].to_string());
    assert_eq!(rows[0]["reason"], Value::Null);

    // No preset has cpus=4: the error lists both presets' parameters.
    let out = env
        .ctl(&[
            "claim",
            "--user",
            "alice",
            "--template",
            "python-dev",
            "--param",
            "cpus=4",
            "--name",
            "dev2",
            "--json",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["reason"], "no_matching_preset");
    let err = stderr(&out);
    for want in [
        format!("large ({}): cpus=8 region=eu", presets["large"]),
        format!("small ({}): cpus=2 region=eu", presets["small"]),
    ] {
        assert!(err.contains(&want), "want {want:?} in:\n{err}");
    }

    // With reconciliation paused the large pool is not refilled: claiming it dry says pool_empty.
    env.ok(&["pause"]).await;
    let mut reasons = Vec::new();
    for i in 0..4 {
        let name = format!("drain-{i}");
        let out = env
            .ctl(&[
                "claim",
                "--user",
                "alice",
                "--template",
                "python-dev",
                "--param",
                "cpus=8",
                "--name",
                &name,
                "--json",
            ])
            .await;
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        reasons.push(rows[0]["reason"].clone());
        if rows[0]["outcome"] != "claimed" {
            assert_eq!(rows[0]["preset_id"], presets["large"].to_string());
            break;
        }
    }
    assert_eq!(
        reasons.last(),
        Some(&Value::from("pool_empty")),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn claim_without_a_worker_times_out_with_exit_1() {
    let env = Env::new().await;
    let c = env.db.pool.get().await.expect("pool");
    let org = fixtures::organization(&c, "acme").await;
    fixtures::user(&c, "alice", false).await;
    let fx = fixtures::template_with_preset(&c, org, "python-dev", Some(1)).await;
    let out = env
        .ctl(&[
            "claim",
            "--user",
            "alice",
            "--preset",
            &fx.preset_id.to_string(),
            "--name",
            "dev",
            "--timeout",
            "1s",
            "--json",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows[0]["outcome"], "timeout");
    assert!(
        stderr(&out).contains("are the workers running"),
        "{}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Jobs

#[tokio::test]
async fn jobs_cancel_cancels_pending_jobs_and_requests_cancellation_of_running_ones() {
    let env = Env::new().await;
    let c = env.db.pool.get().await.expect("pool");
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "python-dev", Some(2)).await;
    let now = Utc::now();
    let spec = |status: &'static str| PrebuildSpec {
        transition: "start",
        job_status: status,
        created_at: now,
        ready: false,
    };
    let job_of = |workspace: Uuid| fixtures::latest_job(&c, workspace);
    let pending = job_of(fixtures::prebuild(&c, &fx, &spec("pending")).await).await;
    let running = job_of(fixtures::prebuild(&c, &fx, &spec("running")).await).await;
    let done = job_of(fixtures::prebuild(&c, &fx, &spec("succeeded")).await).await;

    let listed = env
        .json(&["jobs", "list", "--status", "pending", "--json"])
        .await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], pending.to_string());
    assert_eq!(listed[0]["initiator"], "prebuilds");
    assert_eq!(listed[0]["transition"], "start");

    // An unknown id: nothing is changed.
    let out = env
        .ctl(&[
            "jobs",
            "cancel",
            &pending.to_string(),
            &Uuid::new_v4().to_string(),
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("nothing was canceled"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        env.count("SELECT count(*) FROM provisioner_jobs WHERE job_status = 'pending'")
            .await,
        1
    );

    let rows = env
        .json(&[
            "jobs",
            "cancel",
            &pending.to_string(),
            &running.to_string(),
            "--json",
        ])
        .await;
    assert_eq!(rows.len(), 2);
    let row = c
        .query_one(
            "SELECT job_status, canceled_at IS NOT NULL, completed_at IS NOT NULL
             FROM provisioner_jobs WHERE id = $1",
            &[&pending],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2)
        ),
        ("canceled".to_owned(), true, true)
    );
    let row = c
        .query_one(
            "SELECT job_status, canceled_at IS NOT NULL, completed_at IS NULL
             FROM provisioner_jobs WHERE id = $1",
            &[&running],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, bool>(1),
            row.get::<_, bool>(2)
        ),
        ("canceling".to_owned(), true, true)
    );
    // The preset's pool is reconciled.
    assert_eq!(
        env.reconcile_jobs().await,
        vec![(fx.preset_id, ReconcileReason::Manual)]
    );

    // A finished job is reported and left alone: exit 1. Cancelling again is harmless.
    let out = env
        .ctl(&["jobs", "cancel", &done.to_string(), &pending.to_string()])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("already finished (succeeded)"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("already canceled"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        env.count("SELECT count(*) FROM provisioner_jobs WHERE job_status = 'succeeded'")
            .await,
        1
    );
    let out = env.ctl(&["jobs", "cancel", "not-a-uuid"]).await;
    assert_eq!(out.status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------------
// Dead letters

async fn dead_count(env: &Env) -> u32 {
    env.broker
        .channel
        .queue_declare(
            env.broker.topology.dead_queue().as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("dead queue")
        .message_count()
}

#[tokio::test]
async fn dead_letters_list_leaves_them_and_replay_republishes_to_the_original_routing_key() {
    let env = Env::new().await;
    let publisher = Publisher::new(
        env.broker.url.clone(),
        "test-dead-letters",
        env.broker.topology.clone(),
    );
    let dlx = env.broker.topology.dead_letter_exchange();
    let mut ids = Vec::new();
    for i in 0..2 {
        let event = CloudEvent::new(
            "test",
            Utc::now(),
            ReconcilePreset {
                preset_id: Uuid::from_u128(i + 10),
                reason: ReconcileReason::Manual,
                requested_at: Utc::now(),
            },
        );
        let body = serde_json::to_vec(&event).unwrap();
        let mut message = Outgoing::new(&dlx, "reconcile.preset", &body)
            .header("x-prebuilds-dead-reason", format!("test reason {i}"))
            .header(
                "x-prebuilds-source-queue",
                env.broker.queue(QueueKind::Reconcile),
            );
        message.message_id = Some(event.id.to_string());
        message.event_type = Some(event.event_type.clone());
        publisher
            .publish(message)
            .await
            .expect("publish dead letter");
        ids.push(event.id.to_string());
    }
    publisher.close().await;
    assert_eq!(dead_count(&env).await, 2);

    let rows = env.json(&["dead-letters", "list", "--json"]).await;
    assert_eq!(rows.len(), 2);
    let mut listed: Vec<String> = rows
        .iter()
        .map(|r| r["message_id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(listed, want);
    assert!(rows.iter().all(|r| r["routing_key"] == "reconcile.preset"
        && r["reason"].as_str().unwrap().starts_with("test reason")
        && r["type"] == "prebuilds.reconcile.preset.v1"
        && r["size"].as_u64().unwrap() > 0));
    prebuilds_tests::eventually(
        Duration::from_secs(5),
        "listed messages back in the queue",
        || async { (dead_count(&env).await == 2).then_some(()) },
    )
    .await;

    // Replay one by id, then the rest.
    env.ok(&["dead-letters", "replay", "--id", &ids[1]]).await;
    let replayed = env.reconcile_events().await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].id.to_string(), ids[1], "replayed as it was");
    assert_eq!(replayed[0].data.preset_id, Uuid::from_u128(11));
    prebuilds_tests::eventually(Duration::from_secs(5), "one dead letter left", || async {
        (dead_count(&env).await == 1).then_some(())
    })
    .await;
    env.ok(&["dead-letters", "replay"]).await;
    let replayed = env.reconcile_events().await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].data.preset_id, Uuid::from_u128(10));
    prebuilds_tests::eventually(Duration::from_secs(5), "no dead letters left", || async {
        (dead_count(&env).await == 0).then_some(())
    })
    .await;
    let table = stdout(&env.ok(&["dead-letters", "list"]).await);
    assert!(table.contains("no dead-lettered messages"), "{table}");
}

#[tokio::test]
async fn dead_letters_list_shows_the_brokers_reason_for_rejected_messages() {
    let env = Env::new().await;
    let queue = env.broker.queue(QueueKind::Notifications);
    let publisher = Publisher::new(
        env.broker.url.clone(),
        "test-dead-letters",
        env.broker.topology.clone(),
    );
    let exchange = env.broker.topology.exchange();
    let mut message = Outgoing::new(&exchange, "notification.test", b"{not json");
    message.message_id = Some("poison-1".into());
    publisher.publish(message).await.expect("publish");
    publisher.close().await;
    // A consumer rejects it without requeue: the broker dead-letters it with x-death.
    let got = env
        .broker
        .channel
        .basic_get(
            queue.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("a message");
    got.delivery
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    prebuilds_tests::eventually(
        Duration::from_secs(5),
        "the message is dead-lettered",
        || async { (dead_count(&env).await == 1).then_some(()) },
    )
    .await;
    let rows = env.json(&["dead-letters", "list", "--json"]).await;
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["message_id"], "poison-1");
    assert_eq!(rows[0]["routing_key"], "notification.test");
    assert_eq!(rows[0]["reason"], "broker: rejected");
    assert_eq!(rows[0]["source_queue"], queue.as_str());
    assert_eq!(rows[0]["size"], 9);
}

// ---------------------------------------------------------------------------------------------
// Orgs, users, usage and connection errors

#[tokio::test]
async fn org_and_user_create_write_rows_and_refuse_duplicates() {
    let env = Env::new().await;
    env.ok(&["org", "create", "acme"]).await;
    let out = env.ctl(&["org", "create", "acme"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("already exists"));

    let rows = env
        .json(&[
            "user",
            "create",
            "--username",
            "alice",
            "--email",
            "alice@example.com",
            "--role",
            "template-admin",
            "--organization",
            "acme",
            "--json",
        ])
        .await;
    assert_eq!(rows[0]["username"], "alice");
    let c = env.db.pool.get().await.expect("pool");
    let row = c
        .query_one(
            "SELECT u.email, u.rbac_roles, count(m.*)
             FROM users u LEFT JOIN organization_members m ON m.user_id = u.id
             WHERE u.username = 'alice' GROUP BY u.id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "alice@example.com");
    assert_eq!(
        row.get::<_, Vec<String>>(1),
        vec!["template-admin".to_owned()]
    );
    assert_eq!(row.get::<_, i64>(2), 1);

    // An unknown organization rolls the whole user back.
    let out = env
        .ctl(&[
            "user",
            "create",
            "--username",
            "bob",
            "--organization",
            "nope",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("organization 'nope' does not exist"));
    assert_eq!(
        env.count("SELECT count(*) FROM users WHERE username = 'bob'")
            .await,
        0
    );
    let out = env
        .ctl(&["user", "create", "--username", "bob", "--role", "wizard"])
        .await;
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn usage_errors_exit_with_2_and_help_with_0() {
    let run = |args: &[&str]| {
        std::process::Command::new(binary("prebuildsctl"))
            .args(args)
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/unused")
            .output()
            .expect("run prebuildsctl")
    };
    for args in [
        &["frobnicate"][..],
        &[][..],
        &["template"][..],
        &["template", "push"][..],
        &["claim", "--user", "a", "--name", "n"][..],
        &["claim", "--user", "a", "--name", "n", "--preset", "x"][..],
        &[
            "claim",
            "--user",
            "a",
            "--name",
            "n",
            "--preset",
            "00000000-0000-0000-0000-000000000001",
            "--template",
            "t",
        ][..],
        &["status", "--interval", "soon"][..],
        &["jobs", "list", "--status", "sleeping"][..],
    ] {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?}: usage goes to stderr");
    }
    for args in [
        &["--help"][..],
        &["template", "push", "--help"][..],
        &["claim", "--help"][..],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Example"),
            "{args:?}"
        );
    }
    // The input bounds and the lock timeout, with their variables and defaults.
    let help = String::from_utf8_lossy(&run(&["template", "push", "--help"]).stdout).into_owned();
    for (flag, var, default) in [
        (
            "--max-instances-per-preset",
            "PREBUILDS_MAX_INSTANCES_PER_PRESET",
            "100",
        ),
        (
            "--max-presets-per-template",
            "PREBUILDS_MAX_PRESETS_PER_TEMPLATE",
            "100",
        ),
        ("--lock-timeout", "PREBUILDS_CLI_LOCK_TIMEOUT", "10s"),
    ] {
        let line = help
            .lines()
            .position(|l| l.contains(flag))
            .unwrap_or_else(|| panic!("{flag} missing from:\n{help}"));
        // clap puts "[env: …]" and "[default: …]" right after the flag's description.
        let tail: String = help
            .lines()
            .skip(line)
            .take(6)
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            tail.contains(&format!("[env: {var}="))
                && tail.contains(&format!("[default: {default}]")),
            "{flag}: {tail}"
        );
    }
}

#[test]
fn connection_errors_say_what_to_check() {
    let out = std::process::Command::new(binary("prebuildsctl"))
        .args(["status"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nope")
        .output()
        .expect("run prebuildsctl");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to PostgreSQL") && err.contains("DATABASE_URL"),
        "{err}"
    );
}

/// A connection the server refuses is reported with the server's own message and SQLSTATE, not
/// tokio-postgres' bare "db error" (issue 19).
#[test]
fn a_refused_connection_shows_the_servers_message() {
    let missing = format!("no_such_db_{}", Uuid::new_v4().simple());
    let out = std::process::Command::new(binary("prebuildsctl"))
        .args(["status"])
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:5432/{missing}"),
        )
        .output()
        .expect("run prebuildsctl");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = stderr(&out);
    assert!(
        err.contains(&format!("database \"{missing}\" does not exist")) && err.contains("3D000"),
        "{err}"
    );
    assert!(!err.contains("db error"), "{err}");
}
