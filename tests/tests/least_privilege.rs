//! README "Least privilege" holds on the real services. RabbitMQ users come from
//! `deploy/rabbitmq/users.sh` and PostgreSQL roles from `deploy/postgres/roles.sql`, run the way an
//! operator runs them, for a prefix, a database and user/role names of this test's own. The
//! operator runs `prebuildsctl migrate` (schema and topology); then a worker, a scheduler, the
//! sim provisioner and the notifier, each with its own broker user and database role and
//! `PREBUILDS_DECLARE_TOPOLOGY=false`, fill a pool, the claim client claims from it with
//! `prebuildsctl claim`, and the claim's drift notification reaches the template admin by webhook
//! and e-mail. Users and roles are deleted afterwards (roles are cluster-wide).
//!
//! Also: a service that only checks the topology, started against a prefix nobody migrated, names
//! the missing queue or exchange and says to run `prebuildsctl migrate`, and carries on once it has.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Output, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use prebuilds_runtime::amqp::{Entity, QueueKind};
use prebuilds_tests::{
    broker::amqp_url,
    db::server_url,
    fixtures,
    notify::{SmtpSink, WebhookReceiver},
    process::binary,
    stack::{self, pool_counts, wait_for},
    TestBroker, TestDb,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

/// The roles of the matrix, as `users.sh` and `roles.sql` name them (after their prefix).
const ROLES: [&str; 6] = [
    "operator",
    "worker",
    "scheduler",
    "provisioner",
    "claims",
    "notifier",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `url` (scheme://[user[:password]@]host…) with another user and password.
fn with_user(url: &str, user: &str, password: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    match password {
        Some(password) => format!("{scheme}://{user}:{password}@{host}"),
        None => format!("{scheme}://{user}@{host}"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One RabbitMQ user per role, made by `deploy/rabbitmq/users.sh`; deleted on drop.
struct BrokerUsers {
    user_prefix: String,
    passwords: HashMap<&'static str, String>,
}

impl BrokerUsers {
    fn create(amqp_prefix: &str, user_prefix: &str) -> BrokerUsers {
        let passwords: HashMap<&'static str, String> = ROLES
            .iter()
            .map(|role| (*role, Uuid::new_v4().simple().to_string()))
            .collect();
        let mut command = std::process::Command::new(repo().join("deploy/rabbitmq/users.sh"));
        command
            .env("PREBUILDS_AMQP_PREFIX", amqp_prefix)
            .env("USER_PREFIX", user_prefix)
            .env("RABBITMQ_VHOST", "/");
        for (role, password) in &passwords {
            command.env(format!("{}_PASSWORD", role.to_uppercase()), password);
        }
        // Made before running, so whatever the script managed to create is deleted again.
        let users = BrokerUsers {
            user_prefix: user_prefix.to_owned(),
            passwords,
        };
        let out = command.output().expect("run deploy/rabbitmq/users.sh");
        assert!(
            out.status.success(),
            "users.sh failed\nstdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        eprintln!("users.sh:\n{}", text(&out.stdout));
        users
    }

    fn name(&self, role: &str) -> String {
        format!("{}{role}", self.user_prefix)
    }

    /// `AMQP_URL` of `role`.
    fn url(&self, role: &str) -> String {
        with_user(&amqp_url(), &self.name(role), Some(&self.passwords[role]))
    }
}

impl Drop for BrokerUsers {
    fn drop(&mut self) {
        for role in ROLES {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["delete_user", &self.name(role)])
                .output();
        }
    }
}

/// A database of its own, migrated by nobody yet, and the roles of `deploy/postgres/roles.sql`
/// working in it. Dropped in that order: the database first (a role that owns a database, or holds
/// privileges in one, cannot be dropped), then the roles.
struct DbRoles {
    db: Option<TestDb>,
    role_prefix: String,
}

impl DbRoles {
    async fn new(role_prefix: &str) -> DbRoles {
        DbRoles {
            db: Some(TestDb::empty().await),
            role_prefix: role_prefix.to_owned(),
        }
    }

    fn db(&self) -> &TestDb {
        self.db
            .as_ref()
            .expect("the database lives as long as the roles")
    }

    fn name(&self, role: &str) -> String {
        format!("{}{role}", self.role_prefix)
    }

    /// `DATABASE_URL` of `role` (the harness' server allows these roles without a password, like
    /// the `postgres` user it connects as).
    fn url(&self, role: &str) -> String {
        format!(
            "{}/{}",
            with_user(&server_url(), &self.name(role), None),
            self.db().name
        )
    }

    /// Runs roles.sql on the test's database as the server's superuser.
    fn run_roles_sql(&self) -> String {
        let out = std::process::Command::new("psql")
            .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", &self.db().url])
            .arg("-v")
            .arg(format!("role_prefix={}", self.role_prefix))
            .arg("-f")
            .arg(repo().join("deploy/postgres/roles.sql"))
            .output()
            .expect("run psql (the PostgreSQL client must be installed)");
        assert!(
            out.status.success(),
            "roles.sql failed\nstdout: {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        );
        format!("{}{}", text(&out.stdout), text(&out.stderr))
    }
}

impl Drop for DbRoles {
    fn drop(&mut self) {
        let Some(db) = self.db.take() else { return };
        let admin = format!("{}/postgres", server_url());
        drop(db);
        // The database-only role of roles.sql (no broker user) goes too.
        for role in ROLES.iter().chain(&["terraform_state", "api"]) {
            let _ = std::process::Command::new("psql")
                .args(["-X", "-q", "-d", &admin, "-c"])
                .arg(format!("DROP ROLE IF EXISTS \"{}\"", self.name(role)))
                .output();
        }
    }
}

/// `prebuildsctl args…` as one role: its database role and broker user.
async fn ctl(
    roles: &DbRoles,
    users: &BrokerUsers,
    role: &str,
    prefix: &str,
    declare_topology: bool,
    args: &[&str],
) -> Output {
    tokio::process::Command::new(binary("prebuildsctl"))
        .args(args)
        .env("DATABASE_URL", roles.url(role))
        .env("AMQP_URL", users.url(role))
        .env("PREBUILDS_AMQP_PREFIX", prefix)
        .env(
            "PREBUILDS_DECLARE_TOPOLOGY",
            if declare_topology { "true" } else { "false" },
        )
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run prebuildsctl")
}

fn succeeded(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what} failed\nstdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {}", text(&out.stdout)))
}

/// A counter summed over its label sets, from a service's `/metrics`.
async fn counter(port: u16, name: &str) -> f64 {
    let Some((_, metrics)) = stack::http_get(port, "/metrics").await else {
        return 0.0;
    };
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn messages_in(broker: &TestBroker, queue: &str) -> u32 {
    broker
        .channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the queue exists")
        .message_count()
}

const MAIN_TF: &str = "resource \"terraform_data\" \"workspace\" {}\n";

const TEMPLATE: &str = r#"organization: acme
template: python-dev
version: v1
activate: true
source: ./main.tf
parameters:
  - {name: cpus, required: true}
presets:
  - name: small
    parameters: {cpus: "2"}
    prebuilds:
      instances: 2
"#;

#[tokio::test]
async fn the_documented_permissions_run_the_whole_system() {
    let broker = TestBroker::undeclared().await;
    let prefix = broker.prefix().to_owned();
    let tag = &Uuid::new_v4().simple().to_string()[..10];
    let roles = DbRoles::new(&format!("lp{tag}_")).await;
    let users = BrokerUsers::create(&prefix, &format!("lp{tag}-"));

    // 1. Roles before the schema exists, migrate as the operator, then the table grants.
    let first = roles.run_roles_sql();
    assert!(first.contains("not migrated yet"), "{first}");
    let migrated = succeeded(
        &ctl(
            &roles,
            &users,
            "operator",
            &prefix,
            false,
            &["migrate", "--json"],
        )
        .await,
        "migrate as the operator",
    );
    assert_eq!(
        migrated["applied"].as_array().map(Vec::len),
        Some(prebuilds_schemas::migrations::embedded_names().len()),
        "{migrated}"
    );
    assert_eq!(
        migrated["broker"]["queues"].as_array().map(Vec::len),
        // Every work queue (both provisioner lanes) and the dead-letter queue, counted from the one
        // topology definition.
        Some(QueueKind::ALL.len() + 1),
        "{migrated}"
    );
    roles.run_roles_sql();
    let owner: String = roles
        .db()
        .connect()
        .await
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'outbox'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, roles.name("operator"), "migrate created the tables");
    // The terraform state role (templates can read its URL) owns the state schema and reaches no
    // table of the system of record.
    let state_role = roles.name("terraform_state");
    let as_state_role = prebuilds_runtime::db::connect_dedicated(&roles.url("terraform_state"))
        .await
        .expect("the terraform state role connects");
    let schema_owner: String = as_state_role
        .query_one(
            "SELECT nspowner::regrole::text FROM pg_namespace WHERE nspname = 'prebuilds_terraform_state'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(schema_owner, state_role);
    for table in ["provisioner_jobs", "users", "outbox", "template_versions"] {
        let err = as_state_role
            .query(&format!("SELECT 1 FROM public.{table} LIMIT 1"), &[])
            .await
            .expect_err("the state role reads no table of the system of record");
        assert!(
            err.as_db_error()
                .is_some_and(|e| e.message().contains("permission denied")),
            "{table}: {err}"
        );
    }

    // 2. The operator sets up an organization, users and a template (relaying its reconcile jobs).
    let dir = std::env::temp_dir().join(format!("prebuilds-lp-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("main.tf"), MAIN_TF).unwrap();
    std::fs::write(dir.join("template.yaml"), TEMPLATE).unwrap();
    let template_file = dir.join("template.yaml").display().to_string();
    for args in [
        &["org", "create", "acme", "--json"][..],
        &[
            "user",
            "create",
            "--username",
            "alice",
            "--organization",
            "acme",
            "--json",
        ],
        // A template admin receives the resource-replaced notification of the claim below.
        &[
            "user",
            "create",
            "--username",
            "admin",
            "--email",
            "admin@example.com",
            "--role",
            "template-admin",
            "--json",
        ],
    ] {
        succeeded(
            &ctl(&roles, &users, "operator", &prefix, false, args).await,
            &args.join(" "),
        );
    }
    let pushed = succeeded(
        &ctl(
            &roles,
            &users,
            "operator",
            &prefix,
            false,
            &["template", "push", &template_file, "--json"],
        )
        .await,
        "template push",
    );
    let preset_id: Uuid = pushed[0]["presets"][0]["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("a preset id in {pushed}"));
    let _ = std::fs::remove_dir_all(&dir);

    // 3. The services, each as itself, checking the topology only.
    let service = |role: &str| -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), roles.url(role)),
            ("AMQP_URL".into(), users.url(role)),
            ("PREBUILDS_DECLARE_TOPOLOGY".into(), "false".into()),
        ]
    };
    let start = |binary: &str, role: &str, extra: &[(&str, &str)]| {
        let mut env = service(role);
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        stack::start(binary, roles.db(), &broker, &env)
    };
    // A global in-flight cap of one exercises the capacity lock and wait list.
    let (_worker, _) = start(
        "prebuilds-worker",
        "worker",
        &[("PREBUILDS_MAX_INFLIGHT_JOBS", "1")],
    );
    let (_scheduler, scheduler_port) = start(
        "prebuilds-scheduler",
        "scheduler",
        &[("PREBUILDS_RECONCILE_INTERVAL", "1s")],
    );
    let (_provisioner, _) = start(
        "prebuilds-provisioner",
        "provisioner",
        &[
            ("PREBUILDS_SIM_DURATION_MIN", "50ms"),
            ("PREBUILDS_SIM_DURATION_MAX", "200ms"),
            ("PREBUILDS_SIM_AGENT_READY_DELAY", "50ms"),
            // Every claim build reports replaced resources: a notification for the admin.
            ("PREBUILDS_SIM_REPLACEMENT_RATE", "1"),
        ],
    );

    let receiver = WebhookReceiver::start(vec![]).await;
    let sink = SmtpSink::start().await;
    let (_notifier, _) = start(
        "prebuilds-notifier",
        "notifier",
        &[
            ("PREBUILDS_NOTIFY_WEBHOOK_URL", &receiver.url),
            ("PREBUILDS_SMTP_URL", &sink.url),
            ("PREBUILDS_NOTIFY_FROM", "prebuilds@example.com"),
        ],
    );

    wait_for(Duration::from_secs(60), "a pool of 2 eligible", || async {
        pool_counts(roles.db(), preset_id).await.eligible == 2
    })
    .await;
    wait_for(
        Duration::from_secs(20),
        "the scheduler's reconcile jobs",
        || async {
            counter(
                scheduler_port,
                "prebuilds_scheduler_reconcile_jobs_published_total",
            )
            .await
                > 0.0
        },
    )
    .await;

    // 4. The claim client claims through the worker.
    let claimed = succeeded(
        &ctl(
            &roles,
            &users,
            "claims",
            &prefix,
            false,
            &[
                "claim",
                "--user",
                "alice",
                "--preset",
                &preset_id.to_string(),
                "--name",
                "alice-ws",
                "--json",
            ],
        )
        .await,
        "claim as the claim client",
    );
    assert_eq!(claimed[0]["outcome"], "claimed", "{claimed}");

    // 5. The pool is replenished, the claim build's notification delivered, the outbox empty.
    wait_for(Duration::from_secs(60), "the pool replenished", || async {
        let counts = pool_counts(roles.db(), preset_id).await;
        counts.eligible == 2 && counts.created == 3
    })
    .await;
    wait_for(
        Duration::from_secs(30),
        "the notification delivered and the outbox empty",
        || async {
            let c = roles.db().pool.get().await.unwrap();
            fixtures::unpublished_outbox(&c).await.unwrap() == 0
                && receiver.delivered().len() == 1
                && sink.mails().len() == 1
        },
    )
    .await;
    assert_eq!(
        messages_in(&broker, &broker.topology.dead_queue()).await,
        0,
        "nothing was dead-lettered"
    );

    // 6. The permissions are narrow, not merely sufficient: the claim client may not declare
    // the topology, the scheduler's role may not write.
    let refused = ctl(
        &roles,
        &users,
        "claims",
        &prefix,
        true,
        &[
            "claim",
            "--user",
            "alice",
            "--preset",
            &preset_id.to_string(),
            "--name",
            "other",
        ],
    )
    .await;
    let stderr = text(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("ACCESS_REFUSED") && stderr.contains("PREBUILDS_DECLARE_TOPOLOGY=false"),
        "{stderr}"
    );
    let (scheduler_db, connection) =
        tokio_postgres::connect(&roles.url("scheduler"), tokio_postgres::NoTls)
            .await
            .expect("the scheduler's role logs in");
    tokio::spawn(connection);
    let denied = scheduler_db
        .execute("DELETE FROM outbox", &[])
        .await
        .expect_err("the scheduler's role may not write");
    assert_eq!(
        denied.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{denied}"
    );

    // 7. …except what retention needs: the leader's pass, a year ahead (every row is past its
    // window), runs under the scheduler's role and empties the growing tables of this run.
    let retention = prebuilds_scheduler::retention::Retention {
        pool: prebuilds_runtime::db::pool(&roles.url("scheduler"), 2).unwrap(),
        config: prebuilds_scheduler::retention::RetentionConfig {
            processed_messages: Some(std::time::Duration::from_secs(3600)),
            claim_requests: Some(std::time::Duration::from_secs(3600)),
            job_logs: Some(std::time::Duration::from_secs(3600)),
            notifications: Some(std::time::Duration::from_secs(3600)),
            interval: std::time::Duration::from_secs(600),
        },
        metrics: prebuilds_scheduler::metrics::SchedulerMetrics::register(
            &prometheus::Registry::new(),
        )
        .unwrap(),
    };
    let deleted = retention
        .pass(chrono::Utc::now() + chrono::TimeDelta::days(365))
        .await
        .expect("the scheduler's role may run retention");
    assert!(
        deleted.iter().any(|(_, n)| *n > 0),
        "this run's rows are gone: {deleted:?}"
    );
}

/// A child process whose standard error the test reads; killed on drop.
struct Logged {
    child: tokio::process::Child,
    log: Arc<Mutex<String>>,
    port: u16,
}

impl Logged {
    fn start(binary_name: &str, env: &[(&str, &str)]) -> Logged {
        let port = stack::free_port();
        let mut child = tokio::process::Command::new(binary(binary_name))
            .env("PREBUILDS_METRICS_ADDR", format!("127.0.0.1:{port}"))
            .env("PREBUILDS_DB_POOL_SIZE", "4")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn service");
        let log = Arc::new(Mutex::new(String::new()));
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[{port}] {line}");
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Logged { child, log, port }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn a_service_that_only_checks_names_what_is_missing_and_carries_on_after_migrate() {
    let db = TestDb::new().await;
    let broker = TestBroker::undeclared().await;
    let prefix = broker.prefix().to_owned();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("AMQP_URL", broker.url.as_str()),
        ("PREBUILDS_AMQP_PREFIX", prefix.as_str()),
        ("PREBUILDS_DECLARE_TOPOLOGY", "false"),
    ];

    // The provisioner's consumer keeps checking, naming its queue.
    let provisioner = Logged::start("prebuilds-provisioner", &env);
    let jobs = broker
        .topology
        .name(Entity::Queue(QueueKind::ProvisionerJobs));
    wait_for(
        Duration::from_secs(20),
        "the provisioner naming its missing queue",
        || async {
            let log = provisioner.log();
            log.contains(&format!("queue '{jobs}' does not exist"))
                && log.contains("prebuildsctl migrate")
        },
    )
    .await;
    assert_eq!(
        stack::http_get(provisioner.port, "/readyz")
            .await
            .map(|(status, _)| status),
        Some(503),
        "not ready without its queue"
    );

    // The worker gives up at start-up as it does when the broker is down, naming the first
    // missing part of what it publishes to: the exchange.
    let mut worker = Logged::start("prebuilds-worker", &env);
    let status = tokio::time::timeout(Duration::from_secs(60), worker.child.wait())
        .await
        .expect("the worker gives up within its start-up retries")
        .unwrap();
    assert_eq!(status.code(), Some(1));
    let log = worker.log();
    assert!(
        log.contains(&format!("exchange '{prefix}' does not exist"))
            && log.contains("prebuildsctl migrate"),
        "{log}"
    );

    // An operator migrates: the provisioner finds its queue and becomes ready.
    let out = tokio::process::Command::new(binary("prebuildsctl"))
        .args(["migrate", "--json"])
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    let migrated = succeeded(&out, "migrate");
    assert_eq!(
        migrated["broker"]["exchanges"],
        serde_json::json!([prefix, format!("{prefix}.dlx")]),
        "{migrated}"
    );
    wait_for(
        Duration::from_secs(20),
        "the provisioner ready once migrated",
        || async {
            stack::http_get(provisioner.port, "/readyz")
                .await
                .is_some_and(|(status, _)| status == 200)
        },
    )
    .await;
}
