//! Transport security and secrets on the real services: RabbitMQ over TLS (a private node with a
//! TLS listener and a CA made by the test; the machine's broker is only used as a plaintext peer),
//! PostgreSQL's `sslmode`s against the machine's server (`ssl = on`, the distribution's
//! self-signed certificate for `localhost`), secrets read from `_FILE` variables, and no
//! credential in anything a process prints.

use std::{path::PathBuf, time::Duration};

use prebuilds_runtime::{
    amqp::{self, Broker, TlsFiles},
    db,
};
use prebuilds_tests::{
    certs::TestCa,
    fixtures,
    private_rabbit::{NodeOptions, PrivateRabbit, TlsListener},
    process::binary,
    stack::{self, pool_counts, wait_for},
    Service, TestBroker, TestDb,
};
use uuid::Uuid;

fn scratch_dir(what: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("prebuilds-{what}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A private node with only a TLS listener, its certificate for `localhost` signed by a test CA.
async fn tls_node(dir: &std::path::Path, require_client_cert: bool) -> (TestCa, PrivateRabbit) {
    let ca = TestCa::new(dir, "test-ca");
    let server = ca.server("server", &["localhost"]);
    let node = PrivateRabbit::start(NodeOptions {
        plain: false,
        tls: Some(TlsListener {
            ca: ca.cert.clone(),
            cert: server.cert,
            key: server.key,
            require_client_cert,
        }),
    })
    .await;
    (ca, node)
}

fn ca_only(ca: &TestCa) -> TlsFiles {
    TlsFiles {
        ca_file: Some(ca.cert.clone()),
        ..TlsFiles::default()
    }
}

/// The machine's server certificate (self-signed, valid for `localhost`).
async fn server_certificate(db: &TestDb) -> PathBuf {
    let c = db.pool.get().await.unwrap();
    let path: String = c.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
    PathBuf::from(path)
}

async fn backend_uses_ssl(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn worker_scheduler_and_provisioner_fill_a_pool_over_amqps_and_postgres_tls() {
    let dir = scratch_dir("amqps-fill");
    let (ca, node) = tls_node(&dir, false).await;
    let url = node.tls_url("localhost");
    let broker = TestBroker::on(Broker::new(&url, &ca_only(&ca)).unwrap(), url.clone()).await;
    let db = TestDb::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "python", Some(2)).await;
    let user = fixtures::user(&c, "alice", false).await;

    // Every backend of the services is tagged, so pg_stat_ssl can be read for exactly them.
    let app = format!("tls{}", Uuid::new_v4().simple());
    let database_url = format!("{}?sslmode=require&application_name={app}", db.url);
    let ca_file = ca.cert.display().to_string();
    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("PREBUILDS_AMQP_CA_FILE", ca_file.as_str()),
        ("PREBUILDS_RECONCILE_INTERVAL", "1s"),
        ("PREBUILDS_SIM_DURATION_MIN", "10ms"),
        ("PREBUILDS_SIM_DURATION_MAX", "50ms"),
        ("PREBUILDS_SIM_AGENT_READY_DELAY", "10ms"),
    ];
    let (_scheduler, _) = stack::start("prebuilds-scheduler", &db, &broker, &env);
    let (_worker, _) = stack::start("prebuilds-worker", &db, &broker, &env);
    let (_provisioner, _) = stack::start("prebuilds-provisioner", &db, &broker, &env);
    wait_for(
        Duration::from_secs(60),
        "a pool of 2 over amqps",
        || async { pool_counts(&db, fx.preset_id).await.eligible == 2 },
    )
    .await;

    // The claim RPC of the CLI goes through the same connector.
    let out = tokio::process::Command::new(binary("prebuildsctl"))
        .args(["claim", "--user", "alice", "--preset"])
        .arg(fx.preset_id.to_string())
        .args(["--name", "alice-ws", "--json"])
        .env("DATABASE_URL", &database_url)
        .env("AMQP_URL", &url)
        .env("PREBUILDS_AMQP_CA_FILE", &ca_file)
        .env("PREBUILDS_AMQP_PREFIX", broker.prefix())
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("claimed"),
        "claim over amqps: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owner: Uuid = c
        .query_one(
            "SELECT owner_id FROM workspaces WHERE name = 'alice-ws'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, user);

    let (backends, all_ssl): (i64, Option<bool>) = {
        let row = c
            .query_one(
                "SELECT count(*), bool_and(s.ssl)
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name = $1",
                &[&app],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(backends >= 3, "the services hold connections ({backends})");
    assert_eq!(
        all_ssl,
        Some(true),
        "every backend of the services uses TLS"
    );
    drop(broker);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn amqps_verifies_the_broker_and_offers_the_client_certificate() {
    let dir = scratch_dir("amqps-mtls");
    let (ca, node) = tls_node(&dir, true).await;
    let url = node.tls_url("localhost");

    // The test CA is not among the system roots: without PREBUILDS_AMQP_CA_FILE the broker is
    // not trusted.
    let err = amqp::connect(
        &Broker::new(&url, &TlsFiles::default()).unwrap(),
        "untrusted",
    )
    .await
    .expect_err("an untrusted broker is refused");
    assert!(err.to_string().contains("TLS"), "{err}");

    // Trusted, but the node requires a client certificate.
    let err = amqp::connect(&Broker::new(&url, &ca_only(&ca)).unwrap(), "no-client-cert")
        .await
        .expect_err("a client without a certificate is refused");
    assert!(!err.to_string().contains("guest:guest"), "{err}");

    let client = ca.client("client", "prebuilds-worker");
    let files = TlsFiles {
        ca_file: Some(ca.cert.clone()),
        client_cert_file: Some(client.cert.clone()),
        client_key_file: Some(client.key.clone()),
    };
    let connection = amqp::connect(&Broker::new(&url, &files).unwrap(), "mtls")
        .await
        .expect("mutual TLS connects");
    assert!(connection.status().connected());
    let _ = connection.close(200, "bye".into()).await;

    // A certificate that does not name the host connected to is refused.
    let by_ip = node.tls_url("127.0.0.1");
    assert!(
        amqp::connect(&Broker::new(&by_ip, &files).unwrap(), "by-ip")
            .await
            .is_err()
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn amqps_against_a_plaintext_port_never_connects() {
    // The machine's broker speaks plaintext AMQP on 5672.
    let url = "amqps://guest:guest@127.0.0.1:5672/%2f";
    let err = amqp::connect(
        &Broker::new(url, &TlsFiles::default()).unwrap(),
        "downgrade",
    )
    .await
    .expect_err("amqps to a plaintext port must fail");
    let message = err.to_string();
    assert!(
        message.contains("never falls back to plaintext"),
        "{message}"
    );
    assert!(!message.contains("guest:guest"), "{message}");

    // The same through a binary: a clear error, exit 1, the password nowhere.
    let out = tokio::process::Command::new(binary("prebuildsctl"))
        .args(["dead-letters", "list"])
        .env(
            "AMQP_URL",
            "amqps://guest:pw-marker-downgrade@127.0.0.1:5672/%2f",
        )
        .env("PREBUILDS_AMQP_PREFIX", "nonexistent")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("TLS"), "{stderr}");
    assert!(!stderr.contains("pw-marker"), "{stderr}");
}

#[tokio::test]
async fn postgres_sslmodes_behave_like_libpq() {
    let db = TestDb::new().await;
    let server_cert = server_certificate(&db).await;
    let with = |host: &str, params: &str| {
        let base = db.url.replacen("127.0.0.1", host, 1);
        format!("{base}?{params}")
    };

    let plain = db::connect_dedicated(&with("127.0.0.1", "sslmode=disable"))
        .await
        .unwrap();
    assert!(!backend_uses_ssl(&plain).await);
    for mode in ["prefer", "require"] {
        let client = db::connect_dedicated(&with("127.0.0.1", &format!("sslmode={mode}")))
            .await
            .unwrap();
        assert!(backend_uses_ssl(&client).await, "sslmode={mode} uses TLS");
    }
    // No sslmode at all: libpq's default, prefer.
    assert!(backend_uses_ssl(&db.connect().await).await);

    // verify-ca: the chain is checked, the name is not (127.0.0.1 is not in the certificate).
    let verify_ca = with(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", server_cert.display()),
    );
    let client = db::connect_dedicated(&verify_ca).await.unwrap();
    assert!(backend_uses_ssl(&client).await);
    let pool = db::pool(&verify_ca, 1).unwrap();
    db::ping(&pool)
        .await
        .expect("the pool connects with verify-ca");

    // verify-full: the certificate names `localhost`, not 127.0.0.1.
    let err = db::connect_dedicated(&with(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={}", server_cert.display()),
    ))
    .await
    .expect_err("verify-full against a name the certificate lacks is refused")
    .to_string();
    assert!(err.contains("not valid for name"), "{err}");
    assert!(err.contains("127.0.0.1"), "{err}");
    let client = db::connect_dedicated(&with(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}", server_cert.display()),
    ))
    .await
    .expect("verify-full against the certificate's own name");
    assert!(backend_uses_ssl(&client).await);

    // A root that did not sign the server's certificate fails verify-ca.
    let dir = scratch_dir("pg-wrong-ca");
    let other = TestCa::new(&dir, "other-ca");
    let err = db::connect_dedicated(&with(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={}", other.cert.display()),
    ))
    .await
    .expect_err("an unknown issuer is refused")
    .to_string();
    assert!(err.contains("TLS"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn secrets_are_read_from_files_and_a_variable_beside_its_file_twin_is_refused() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let dir = scratch_dir("secret-files");
    let db_file = dir.join("database_url");
    let amqp_file = dir.join("amqp_url");
    std::fs::write(&db_file, format!("{}\n", db.url)).unwrap();
    std::fs::write(&amqp_file, format!("{}\n", broker.url)).unwrap();
    let ctl = |env: &[(&str, &str)]| {
        let mut command = tokio::process::Command::new(binary("prebuildsctl"));
        command
            .args(["status", "--json"])
            .env_remove("DATABASE_URL")
            .env_remove("AMQP_URL")
            .env("PREBUILDS_AMQP_PREFIX", broker.prefix());
        for (k, v) in env {
            command.env(k, v);
        }
        command.output()
    };
    let db_path = db_file.display().to_string();
    let amqp_path = amqp_file.display().to_string();
    let out = ctl(&[
        ("DATABASE_URL_FILE", &db_path),
        ("AMQP_URL_FILE", &amqp_path),
    ])
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    for (variable, file_variable, value, path) in [
        (
            "DATABASE_URL",
            "DATABASE_URL_FILE",
            db.url.as_str(),
            &db_path,
        ),
        ("AMQP_URL", "AMQP_URL_FILE", broker.url.as_str(), &amqp_path),
    ] {
        let out = ctl(&[(variable, value), (file_variable, path)])
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(variable) && stderr.contains(file_variable),
            "{stderr}"
        );
    }

    // The services refuse it too, before connecting anywhere.
    for service in [
        "prebuilds-worker",
        "prebuilds-scheduler",
        "prebuilds-provisioner",
    ] {
        let out = tokio::process::Command::new(binary(service))
            .env("DATABASE_URL", &db.url)
            .env("DATABASE_URL_FILE", &db_path)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{service}: {stderr}");
        assert!(stderr.contains("DATABASE_URL_FILE"), "{service}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A broker user of the test's own with a distinctive password, removed on drop.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn create(password: &str) -> BrokerUser {
        let name = format!("prebuilds-secret-test-{}", Uuid::new_v4().simple());
        let ctl = |args: &[&str]| {
            let out = std::process::Command::new("rabbitmqctl")
                .args(args)
                .output()
                .expect("rabbitmqctl");
            assert!(out.status.success(), "rabbitmqctl {args:?}");
        };
        ctl(&["add_user", &name, password]);
        ctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        BrokerUser { name }
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// Environment variables set on top of a command's defaults.
type Overrides<'a> = Vec<(&'a str, &'a str)>;

#[tokio::test]
async fn no_credential_appears_in_anything_the_binaries_print() {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let c = db.pool.get().await.unwrap();
    let org = fixtures::organization(&c, "acme").await;
    let fx = fixtures::template_with_preset(&c, org, "python", Some(1)).await;
    let amqp_secret = format!("pw-marker-amqp-{}", Uuid::new_v4().simple());
    let db_secret = format!("pw-marker-db-{}", Uuid::new_v4().simple());
    let user = BrokerUser::create(&amqp_secret);
    // Trust authentication ignores the password, so it can be anything — and must show nowhere.
    let database_url = db
        .url
        .replacen("postgres@", &format!("postgres:{db_secret}@"), 1);
    let amqp_url = format!("amqp://{}:{amqp_secret}@127.0.0.1:5672/%2f", user.name);
    let log = scratch_dir("no-credentials").join("everything.log");

    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("AMQP_URL", amqp_url.as_str()),
        (
            "RUST_LOG",
            "debug,lapin=info,amq_protocol=info,tokio_postgres=info",
        ),
        ("PREBUILDS_SIM_DURATION_MIN", "10ms"),
        ("PREBUILDS_SIM_DURATION_MAX", "20ms"),
        ("PREBUILDS_SIM_AGENT_READY_DELAY", "10ms"),
        ("PREBUILDS_RECONCILE_INTERVAL", "1s"),
    ];
    let mut services = Vec::new();
    let mut metrics_ports = Vec::new();
    for (binary_name, format) in [
        ("prebuilds-scheduler", "json"),
        ("prebuilds-worker", "text"),
        ("prebuilds-provisioner", "json"),
    ] {
        let port = stack::free_port();
        let addr = format!("127.0.0.1:{port}");
        let mut all = vec![
            ("PREBUILDS_AMQP_PREFIX", broker.prefix()),
            ("PREBUILDS_METRICS_ADDR", addr.as_str()),
            ("PREBUILDS_LOG_FORMAT", format),
            ("PREBUILDS_DB_POOL_SIZE", "4"),
        ];
        all.extend_from_slice(&env);
        services.push(Service::start_logged(binary_name, &[], &all, &log));
        metrics_ports.push(port);
    }
    wait_for(Duration::from_secs(60), "a pool of 1", || async {
        pool_counts(&db, fx.preset_id).await.eligible == 1
    })
    .await;
    let mut printed = std::fs::read_to_string(&log).unwrap_or_default();
    for port in metrics_ports {
        let (_, metrics) = stack::http_get(port, "/metrics").await.expect("metrics");
        printed.push_str(&metrics);
    }

    // Commands that print connection details: successes, failures and help.
    let wrong_port_db = database_url.replacen("5432", "1", 1);
    let wrong_port_amqp = amqp_url.replacen("5672", "1", 1);
    let wrong_password_amqp = amqp_url.replacen(&amqp_secret, &format!("{amqp_secret}x"), 1);
    let runs: Vec<(Vec<&str>, Overrides)> = vec![
        (vec!["status"], vec![]),
        (vec!["--help"], vec![]),
        (vec!["claim", "--help"], vec![]),
        (
            vec!["status"],
            vec![("DATABASE_URL", wrong_port_db.as_str())],
        ),
        (
            vec!["migrate"],
            vec![("DATABASE_URL", wrong_port_db.as_str())],
        ),
        (
            vec!["dead-letters", "list"],
            vec![("AMQP_URL", wrong_port_amqp.as_str())],
        ),
        (
            vec!["dead-letters", "list"],
            vec![("AMQP_URL", wrong_password_amqp.as_str())],
        ),
        (
            vec!["status"],
            vec![(
                "DATABASE_URL",
                "host=127.0.0.1 port=1 user=postgres password=pw-marker-kv dbname=x",
            )],
        ),
        (
            vec!["status"],
            vec![(
                "DATABASE_URL",
                "postgres://u:pw-marker-bad@127.0.0.1:notaport/x",
            )],
        ),
        (
            vec!["status"],
            vec![("AMQP_URL", "ftp://u:pw-marker-scheme@h")],
        ),
    ];
    for (args, overrides) in runs {
        let mut command = tokio::process::Command::new(binary("prebuildsctl"));
        command
            .args(&args)
            .env("DATABASE_URL", &database_url)
            .env("AMQP_URL", &amqp_url)
            .env("PREBUILDS_AMQP_PREFIX", broker.prefix())
            .env("RUST_LOG", "debug");
        for (k, v) in overrides {
            command.env(k, v);
        }
        let out = command.output().await.unwrap();
        printed.push_str(&String::from_utf8_lossy(&out.stdout));
        printed.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    // A worker that cannot log in prints its failure — without the password it tried.
    let bad_login = [
        ("DATABASE_URL", database_url.as_str()),
        ("AMQP_URL", wrong_password_amqp.as_str()),
        ("PREBUILDS_AMQP_PREFIX", broker.prefix()),
        ("PREBUILDS_METRICS_ADDR", "127.0.0.1:0"),
        ("RUST_LOG", "debug"),
    ];
    let bad_log = log.with_file_name("bad-login.log");
    let mut bad = Service::start_logged("prebuilds-worker", &[], &bad_login, &bad_log);
    wait_for(
        Duration::from_secs(30),
        "the refused login logged",
        || async {
            std::fs::read_to_string(&bad_log).is_ok_and(|s| {
                s.contains("ACCESS_REFUSED") || s.contains("RabbitMQ is unreachable")
            })
        },
    )
    .await;
    bad.kill().await;
    printed.push_str(&std::fs::read_to_string(&bad_log).unwrap_or_default());
    for mut service in services {
        service.terminate(Duration::from_secs(20)).await;
    }
    printed.push_str(&std::fs::read_to_string(&log).unwrap_or_default());

    assert!(
        printed.contains("consuming"),
        "the services' logs were captured"
    );
    for secret in [amqp_secret.as_str(), db_secret.as_str(), "pw-marker"] {
        let leaks: Vec<&str> = printed.lines().filter(|l| l.contains(secret)).collect();
        assert!(
            leaks.is_empty(),
            "{secret} printed in:\n{}",
            leaks.join("\n")
        );
    }
    let _ = std::fs::remove_dir_all(log.parent().unwrap());
    drop(user);
}
