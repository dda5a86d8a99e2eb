//! Stopping and starting the real services. Every fault is a guard value: dropping it (however the
//! scenario ended, panics included) brings the service back and waits until it answers.

use std::{process::Command, time::Duration};

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Whether the RabbitMQ application answers.
pub fn rabbit_running() -> bool {
    Command::new("rabbitmq-diagnostics")
        .args(["-q", "check_running"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether PostgreSQL accepts connections on loopback.
pub fn postgres_running() -> bool {
    Command::new("pg_isready")
        .args(["-h", "127.0.0.1", "-t", "2"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// How RabbitMQ is taken down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RabbitStop {
    /// `rabbitmqctl stop_app`: the Erlang node stays up, the broker application stops.
    App,
    /// `rabbitmqctl stop`: the whole node stops; it is started again with `rabbitmq-server -detached`.
    Node,
}

/// RabbitMQ is down while this value lives.
#[derive(Debug)]
pub struct RabbitDown {
    how: RabbitStop,
}

impl RabbitDown {
    pub fn new(how: RabbitStop) -> anyhow::Result<RabbitDown> {
        match how {
            RabbitStop::App => run("rabbitmqctl", &["stop_app"])?,
            RabbitStop::Node => run("rabbitmqctl", &["stop"])?,
        }
        Ok(RabbitDown { how })
    }
}

/// Starts RabbitMQ if it is not running and waits for it (bounded).
pub fn ensure_rabbit() {
    if rabbit_running() {
        return;
    }
    // stop_app leaves the node up: start_app is enough. If the node is gone, start it.
    if run("rabbitmqctl", &["start_app"]).is_err() {
        let _ = Command::new("rabbitmq-server").arg("-detached").status();
    }
    let _ = Command::new("rabbitmqctl")
        .args(["await_startup", "--timeout", "120"])
        .output();
    for _ in 0..120 {
        if rabbit_running() {
            return;
        }
        // A node started before `await_startup` could reach it: ask again.
        let _ = run("rabbitmqctl", &["start_app"]);
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "reliability: RabbitMQ did not come back; start it by hand (rabbitmq-server -detached)"
    );
}

impl Drop for RabbitDown {
    fn drop(&mut self) {
        if self.how == RabbitStop::Node {
            let _ = Command::new("rabbitmq-server").arg("-detached").status();
            // The node needs a moment before rabbitmqctl can reach it.
            std::thread::sleep(Duration::from_secs(2));
        }
        ensure_rabbit();
    }
}

fn pg_cluster_version() -> String {
    std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .unwrap_or_else(|| "15".into())
}

fn pg_ctl(action: &str) -> anyhow::Result<()> {
    run(
        "pg_ctlcluster",
        &[
            "--skip-systemctl-redirect",
            &pg_cluster_version(),
            "main",
            action,
        ],
    )
}

/// PostgreSQL is down while this value lives.
#[derive(Debug)]
pub struct PostgresDown(());

impl PostgresDown {
    pub fn new() -> anyhow::Result<PostgresDown> {
        pg_ctl("stop")?;
        Ok(PostgresDown(()))
    }
}

/// Starts PostgreSQL if it is not accepting connections and waits for it (bounded).
pub fn ensure_postgres() {
    for _ in 0..60 {
        if postgres_running() {
            return;
        }
        let _ = pg_ctl("start");
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!(
        "reliability: PostgreSQL did not come back; start it by hand (pg_ctlcluster … main start)"
    );
}

impl Drop for PostgresDown {
    fn drop(&mut self) {
        ensure_postgres();
    }
}

/// Brings both services back if anything left them down; returns whether both run.
pub fn restore_all() -> bool {
    ensure_postgres();
    ensure_rabbit();
    postgres_running() && rabbit_running()
}
