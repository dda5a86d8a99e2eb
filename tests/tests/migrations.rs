//! `prebuildsctl migrate` is idempotent and safe when two run at once, and declares the broker
//! topology after the schema unless told `--skip-broker`; services refuse a schema older than
//! they need.

use prebuilds_runtime::amqp::{self, Entity, TopologyError};
use prebuilds_tests::{db::server_url, process::binary, TestBroker, TestDb};

async fn empty_database() -> (String, String) {
    let name = format!("prebuilds_mig_{}", uuid::Uuid::new_v4().simple());
    // Not created: `migrate` creates it.
    (name.clone(), format!("{}/{}", server_url(), name))
}

async fn drop_database(name: &str) {
    let admin = prebuilds_runtime::db::connect_dedicated(&format!("{}/postgres", server_url()))
        .await
        .unwrap();
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await
        .unwrap();
}

fn migrate(url: &str) -> std::process::Output {
    // The database only: the broker part has its own test, on a prefix of its own.
    std::process::Command::new(binary("prebuildsctl"))
        .args(["migrate", "--skip-broker", "--json"])
        .env("DATABASE_URL", url)
        .output()
        .expect("run prebuildsctl migrate")
}

#[tokio::test]
async fn migrate_twice_is_a_no_op_and_concurrent_runs_both_succeed() {
    let (name, url) = empty_database().await;

    // Two at once against a database that does not exist yet.
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking({
            let url = url.clone();
            move || migrate(&url)
        }),
        tokio::task::spawn_blocking({
            let url = url.clone();
            move || migrate(&url)
        })
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        a.status.success(),
        "first: {}",
        String::from_utf8_lossy(&a.stderr)
    );
    assert!(
        b.status.success(),
        "second: {}",
        String::from_utf8_lossy(&b.stderr)
    );
    let applied = |o: &std::process::Output| -> usize {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["applied"].as_array().unwrap().len()
    };
    let expected = prebuilds_schemas::migrations::embedded_names().len();
    assert_eq!(
        applied(&a) + applied(&b),
        expected,
        "each migration applied exactly once"
    );

    // A third run changes nothing.
    let c = migrate(&url);
    assert!(c.status.success());
    assert_eq!(applied(&c), 0);

    // The seed rows exist exactly once.
    let client = prebuilds_runtime::db::connect_dedicated(&url)
        .await
        .unwrap();
    let users: i64 = client
        .query_one(
            "SELECT count(*) FROM users WHERE id = $1",
            &[&prebuilds_schemas::PREBUILDS_USER_ID],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(users, 1);
    let templates: i64 = client
        .query_one(
            "SELECT count(*) FROM notification_templates WHERE id = $1",
            &[&prebuilds_schemas::RESOURCE_REPLACED_TEMPLATE_ID],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(templates, 1);
    drop(client);
    drop_database(&name).await;
}

#[tokio::test]
async fn migrate_reports_an_unreachable_database_clearly() {
    let out = std::process::Command::new(binary("prebuildsctl"))
        .args(["migrate"])
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nope")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error:"), "{stderr}");
}

#[tokio::test]
async fn migrate_declares_the_broker_topology_and_skip_broker_leaves_it_alone() {
    let db = TestDb::new().await;
    let broker = TestBroker::undeclared().await;
    let run = |args: &[&str]| {
        std::process::Command::new(binary("prebuildsctl"))
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", &broker.url)
            .env("PREBUILDS_AMQP_PREFIX", broker.prefix())
            .output()
            .expect("run prebuildsctl migrate")
    };
    let json = |out: std::process::Output| -> serde_json::Value {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let conn = amqp::connect(&broker.url, "migrate-test").await.unwrap();
    let topology = &broker.topology;

    let skipped = json(run(&["migrate", "--skip-broker", "--json"]));
    assert_eq!(skipped["broker"], serde_json::Value::Null, "{skipped}");
    assert!(
        matches!(
            topology.check(&conn, &Entity::ALL).await,
            Err(TopologyError::Missing { .. })
        ),
        "--skip-broker declared nothing"
    );

    let declared = json(run(&["migrate", "--json"]));
    let names = |key: &str| -> Vec<String> {
        declared["broker"][key]
            .as_array()
            .unwrap_or_else(|| panic!("broker.{key} in {declared}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let expected: Vec<String> = Entity::ALL.iter().map(|e| topology.name(*e)).collect();
    let (exchanges, queues) = expected.split_at(2);
    assert_eq!(names("exchanges"), exchanges);
    assert_eq!(names("queues"), queues);
    let bound: Vec<&str> = declared["broker"]["bindings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["queue"].as_str().unwrap())
        .collect();
    for queue in queues {
        assert!(
            bound.contains(&queue.as_str()),
            "{queue} is bound: {declared}"
        );
    }
    topology
        .check(&conn, &Entity::ALL)
        .await
        .expect("everything declared");

    // Again: the same, and people get a line saying so.
    let again = run(&["migrate"]);
    assert!(again.status.success());
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        stdout.contains("database is up to date")
            && stdout.contains(&format!("declared RabbitMQ topology '{}'", broker.prefix())),
        "{stdout}"
    );
}

/// Runs `binary` with `env` until it exits (killed after `timeout`); returns (exited, stderr).
fn run_until_exit(
    binary_name: &str,
    env: &[(&str, &str)],
    timeout: std::time::Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(binary(binary_name))
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the service");
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    (status, stderr)
}

/// A database left by the previous release (the newest migration not applied yet): every service
/// with a database refuses to start and says what to run; after `prebuildsctl migrate` the same
/// worker starts.
#[tokio::test]
async fn services_refuse_a_schema_older_than_they_need_and_say_to_migrate() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let newest = prebuilds_schemas::migrations::required_version();
    db.connect()
        .await
        // One release behind, as far as the history says: the newest migration unrecorded, so
        // `migrate` runs it again (our migrations are written to be re-runnable: IF NOT EXISTS).
        .batch_execute(&format!(
            "DELETE FROM refinery_schema_history WHERE version >= {newest}"
        ))
        .await
        .expect("roll the schema back one release");
    let port = prebuilds_tests::stack::free_port().to_string();
    let metrics_addr = format!("127.0.0.1:{port}");
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("AMQP_URL", broker.url.as_str()),
        ("PREBUILDS_AMQP_PREFIX", broker.prefix()),
        ("PREBUILDS_METRICS_ADDR", metrics_addr.as_str()),
        ("PREBUILDS_DB_POOL_SIZE", "2"),
    ];
    for service in [
        "prebuilds-worker",
        "prebuilds-scheduler",
        "prebuilds-provisioner",
    ] {
        let (status, stderr) = tokio::task::spawn_blocking({
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            move || {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                run_until_exit(service, &env, std::time::Duration::from_secs(30))
            }
        })
        .await
        .unwrap();
        let status = status.unwrap_or_else(|| panic!("{service} started anyway:\n{stderr}"));
        assert!(!status.success(), "{service} exited 0:\n{stderr}");
        assert!(
            stderr.contains(&format!("older than version {newest}"))
                && stderr.contains("run `prebuildsctl migrate`"),
            "{service} does not say to migrate:\n{stderr}"
        );
    }

    let migrated = migrate(&db.url);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let mut worker = prebuilds_tests::Service::start("prebuilds-worker", &[], &env);
    prebuilds_tests::eventually(
        std::time::Duration::from_secs(30),
        "the worker ready after migrate",
        || async {
            matches!(
                prebuilds_tests::stack::http_get(port.parse().unwrap(), "/readyz").await,
                Some((200, _))
            )
            .then_some(())
        },
    )
    .await;
    worker.kill().await;
}
