//! Driving `prebuilds-api` in tests: a minimal HTTP/1.1 client on raw sockets (no client library:
//! what goes over the wire is exactly what the test wrote), tokens made with the real
//! `prebuildsctl token create`, the API started as the least-privilege database role of
//! `deploy/postgres/roles.sql`, and waiting until it listens.

use std::{path::PathBuf, time::Duration};

use serde_json::Value;

use crate::{process::binary, stack, Service, TestBroker, TestDb};

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
    /// Asserts an RFC 9457 problem with `status` and returns its body.
    pub fn problem(&self, status: u16) -> Value {
        assert_eq!(self.status, status, "status of {}", self.body);
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "content type of a {status}"
        );
        let body = self.json();
        assert_eq!(body["status"], status, "problem status member");
        for member in ["type", "title", "detail", "code"] {
            assert!(body[member].is_string(), "problem without {member}: {body}");
        }
        body
    }
}

/// Sends one request (`Connection: close`) and reads the whole answer.
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the API");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(body) = body {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    if let Some(body) = body {
        stream.write_all(body.as_bytes()).await.expect("write body");
    }
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete answer");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<Vec<_>>();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// `method path` with `Authorization: Bearer <token>` (when given) and a JSON body (when given).
pub async fn call(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth));
    }
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    request(port, method, path, &headers, body).await
}

/// `prebuildsctl args…` against the test's database, as its superuser (the operator's place).
pub fn ctl(db: &TestDb, broker: &TestBroker, args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary("prebuildsctl"))
        .args(args)
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", &broker.url)
        .env("PREBUILDS_AMQP_PREFIX", broker.prefix())
        .output()
        .expect("run prebuildsctl")
}

/// Makes a token with `prebuildsctl token create` and returns its secret (the last stdout line).
pub fn token(db: &TestDb, broker: &TestBroker, name: &str, role: &str) -> String {
    let out = ctl(
        db,
        broker,
        &["token", "create", "--name", name, "--role", role],
    );
    assert!(
        out.status.success(),
        "token create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .expect("a secret line")
        .trim()
        .to_owned()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// The roles of `deploy/postgres/roles.sql` under a prefix of the test's own, on the test's
/// (already migrated) database; dropped on drop. Gives the URL of the API's role.
#[derive(Debug)]
pub struct ApiRole {
    prefix: String,
    pub url: String,
    db_url: String,
}

const ROLES: [&str; 8] = [
    "operator",
    "worker",
    "scheduler",
    "provisioner",
    "claims",
    "notifier",
    "api",
    "terraform_state",
];

impl ApiRole {
    pub fn grant(db: &TestDb) -> ApiRole {
        let prefix = format!("t{}_", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        let out = std::process::Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v"])
            .arg(format!("role_prefix={prefix}"))
            .arg("-v")
            .arg(format!("terraform_state_schema={prefix}tfstate"))
            .args(["-d", &db.url, "-f"])
            .arg(repo().join("deploy/postgres/roles.sql"))
            .output()
            .expect("run psql (the PostgreSQL client must be installed)");
        assert!(
            out.status.success(),
            "roles.sql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // roles.sql hands the database to its operator role; give it back, so the test's database
        // and these roles can be dropped in either order.
        let out = std::process::Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &db.url, "-c"])
            .arg(format!(
                "ALTER DATABASE \"{}\" OWNER TO CURRENT_USER",
                db.name
            ))
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = db.url.replacen(
            "postgres://postgres@",
            &format!("postgres://{prefix}api@"),
            1,
        );
        ApiRole {
            prefix,
            url,
            db_url: db.url.clone(),
        }
    }
}

impl Drop for ApiRole {
    fn drop(&mut self) {
        let admin = format!("{}/postgres", crate::db::server_url());
        // Their grants and the state schema in the test's database first (fails harmlessly when
        // the database is gone already).
        let names: Vec<String> = ROLES
            .iter()
            .map(|r| format!("\"{}{r}\"", self.prefix))
            .collect();
        let _ = std::process::Command::new("psql")
            .args(["-X", "-q", "-d", &self.db_url, "-c"])
            .arg(format!("DROP OWNED BY {}", names.join(", ")))
            .output();
        for role in ROLES {
            let _ = std::process::Command::new("psql")
                .args(["-X", "-q", "-d", &admin, "-c"])
                .arg(format!("DROP ROLE IF EXISTS \"{}{role}\"", self.prefix))
                .output();
        }
    }
}

/// Starts `prebuilds-api` on a free port with `database_url`; waits until it answers. Returns the
/// service and its API port.
pub async fn start(
    database_url: &str,
    db: &TestDb,
    broker: &TestBroker,
    extra: &[(&str, &str)],
) -> (Service, u16) {
    let port = stack::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut env: Vec<(&str, &str)> = vec![
        ("DATABASE_URL", database_url),
        ("PREBUILDS_API_ADDR", &addr),
        ("PREBUILDS_DECLARE_TOPOLOGY", "false"),
    ];
    env.extend_from_slice(extra);
    let (service, _) = stack::start("prebuilds-api", db, broker, &env);
    stack::wait_for(Duration::from_secs(30), "the API to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    (service, port)
}
