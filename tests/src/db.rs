//! Per-test databases cloned from a migrated template (or empty, for tests that migrate).

use deadpool_postgres::Pool;
use prebuilds_runtime::db;
use tokio_postgres::NoTls;

/// Base URL of the server (no database path).
pub fn server_url() -> String {
    std::env::var("PREBUILDS_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn database_url(server: &str, name: &str) -> String {
    format!("{}/{}", server.trim_end_matches('/'), name)
}

/// A database of its own for one test.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: Pool,
    /// The server it lives on (no database path).
    server: String,
}

/// Advisory-lock key serialising template creation across concurrently running test processes.
const TEMPLATE_LOCK: i64 = prebuilds_schemas::locks::Fixed::TestTemplate.key();

fn template_name() -> String {
    // One template per migration set: adding or changing a migration makes a new template.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/migrations");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("schemas/migrations is readable")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in files {
        let bytes = std::fs::read(&file).expect("migration is readable");
        for b in file
            .file_name()
            .into_iter()
            .flat_map(|n| n.as_encoded_bytes().to_vec())
            .chain(bytes)
        {
            hash = (hash ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    format!("prebuilds_test_tmpl_{hash:016x}")
}

async fn admin(server: &str) -> tokio_postgres::Client {
    db::connect_dedicated(&database_url(server, "postgres"))
        .await
        .expect("connect to PostgreSQL as postgres (is it running? see .ci/run)")
}

async fn ensure_template(server: &str, admin: &tokio_postgres::Client) -> String {
    let template = template_name();
    admin
        .execute("SELECT pg_advisory_lock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("template lock");
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .expect("query pg_database")
        .is_some();
    if !exists {
        admin
            .batch_execute(&format!("CREATE DATABASE {template}"))
            .await
            .expect("create template database");
        let mut client = db::connect_dedicated(&database_url(server, &template))
            .await
            .expect("connect to template database");
        prebuilds_schemas::migrations::run(&mut client)
            .await
            .expect("migrate template database");
        drop(client);
        // Nobody may be connected to a template while it is cloned.
        admin
            .execute(
                "UPDATE pg_database SET datistemplate = true WHERE datname = $1",
                &[&template],
            )
            .await
            .expect("mark template");
    }
    admin
        .execute("SELECT pg_advisory_unlock($1)", &[&TEMPLATE_LOCK])
        .await
        .expect("template unlock");
    template
}

impl TestDb {
    /// A fresh, migrated database on the machine's server (`PREBUILDS_TEST_PG`).
    pub async fn new() -> TestDb {
        TestDb::on(&server_url()).await
    }

    /// A fresh, migrated database on `server` (a private server, say).
    pub async fn on(server: &str) -> TestDb {
        let admin = admin(server).await;
        let template = ensure_template(server, &admin).await;
        let name = format!("prebuilds_test_{}", uuid::Uuid::new_v4().simple());
        // CREATE DATABASE … TEMPLATE fails if another session is connected to the template;
        // retry briefly (another test process may be cloning it at this instant).
        let mut attempts = 0;
        loop {
            match admin
                .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .await
            {
                Ok(()) => break,
                Err(e) if attempts < 50 => {
                    attempts += 1;
                    tracing::debug!(error = %e, "template busy, retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("create test database: {e}"),
            }
        }
        let url = database_url(server, &name);
        let pool = db::pool(&url, 8).expect("pool");
        TestDb {
            name,
            url,
            pool,
            server: server.to_owned(),
        }
    }

    /// A fresh database with no schema at all, for tests that migrate it themselves (as a role of
    /// their own); dropped like any other.
    pub async fn empty() -> TestDb {
        let server = server_url();
        let admin = admin(&server).await;
        let name = format!("prebuilds_test_{}", uuid::Uuid::new_v4().simple());
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create empty test database");
        let url = database_url(&server, &name);
        let pool = db::pool(&url, 8).expect("pool");
        TestDb {
            name,
            url,
            pool,
            server,
        }
    }

    /// A dedicated connection to this database.
    pub async fn connect(&self) -> tokio_postgres::Client {
        db::connect_dedicated(&self.url).await.expect("connect")
    }

    /// A connection string for the terraform state store in this database
    /// (`PREBUILDS_TERRAFORM_STATE_DATABASE_URL`): a role of its own, as a deployment would give
    /// it, never the provisioner's DATABASE_URL. The role (shared by all tests; created once) may
    /// create schemas in this database only, so the provisioner prepares the state schema itself.
    pub async fn terraform_state_url(&self) -> String {
        let admin = admin(&self.server).await;
        let create = format!(
            "DO $$ BEGIN CREATE ROLE {TERRAFORM_STATE_ROLE} LOGIN;
             EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
        );
        admin
            .batch_execute(&create)
            .await
            .expect("create the terraform state role");
        admin
            .batch_execute(&format!(
                "GRANT CONNECT, CREATE ON DATABASE {} TO {TERRAFORM_STATE_ROLE}",
                self.name
            ))
            .await
            .expect("grant the terraform state role its database");
        let host = self
            .server
            .split_once("://")
            .map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, host)| host))
            .expect("server URL has a scheme");
        // Loopback, and terraform's PostgreSQL driver has no `prefer`: plaintext.
        format!(
            "postgres://{TERRAFORM_STATE_ROLE}@{}/{}?sslmode=disable",
            host.trim_end_matches('/'),
            self.name
        )
    }
}

/// The role of [`TestDb::terraform_state_url`].
pub const TERRAFORM_STATE_ROLE: &str = "prebuilds_test_terraform_state";

impl Drop for TestDb {
    fn drop(&mut self) {
        self.pool.close();
        let name = self.name.clone();
        // For post-mortems (EXPLAIN on the state a test or benchmark left behind).
        if std::env::var_os("PREBUILDS_TEST_KEEP_DB").is_some() {
            eprintln!("PREBUILDS_TEST_KEEP_DB: kept database {name}");
            return;
        }
        let url = database_url(&self.server, "postgres");
        // Drop runs outside async context guarantees: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, conn)) = tokio_postgres::connect(&url, NoTls).await {
                    tokio::spawn(conn);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        })
        .join();
    }
}
