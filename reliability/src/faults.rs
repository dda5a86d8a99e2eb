//! Faults on the stack's own private PostgreSQL server and RabbitMQ node (`Wiring::private_services`):
//! the machine's services are never stopped. What is checked about the machine's services is only
//! that they kept running ([`machine_services_running`]).

use std::{process::Command, time::Duration};

use prebuilds_tests::{private_postgres::PrivatePostgres, private_rabbit::PrivateRabbit};

/// Whether the machine's RabbitMQ answers (the default node).
pub fn rabbit_running() -> bool {
    Command::new("rabbitmq-diagnostics")
        .args(["-q", "check_running"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether the machine's PostgreSQL accepts connections on 127.0.0.1:5432.
pub fn postgres_running() -> bool {
    Command::new("pg_isready")
        .args(["-h", "127.0.0.1", "-p", "5432", "-t", "2"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Both of the machine's services still run (no scenario may touch them).
pub fn machine_services_running() -> bool {
    postgres_running() && rabbit_running()
}

fn ctl(node: &PrivateRabbit, args: &[&str]) -> anyhow::Result<()> {
    let out = node.ctl(args);
    anyhow::ensure!(
        out.status.success(),
        "rabbitmqctl {args:?} on {}: {}",
        node.node,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// `rabbitmqctl stop_app` for `down`, then `start_app`: the Erlang node stays up, the broker
/// application stops. Returns how long the broker was down.
pub async fn restart_rabbit_app(node: &PrivateRabbit, down: Duration) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    ctl(node, &["stop_app"])?;
    tokio::time::sleep(down).await;
    ctl(node, &["start_app"])?;
    ctl(node, &["await_startup", "--timeout", "120"])?;
    Ok(t.elapsed())
}

/// The whole node stops for `down` and boots again with its data. Returns how long it was down.
pub async fn restart_rabbit_node(node: &PrivateRabbit, down: Duration) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    node.stop();
    tokio::time::sleep(down).await;
    node.boot().await;
    Ok(t.elapsed())
}

/// The server stops (fast shutdown) for `down` and starts again. Returns how long it was down.
pub async fn restart_postgres(
    server: &PrivatePostgres,
    down: Duration,
) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    server.stop();
    anyhow::ensure!(!server.running(), "the private PostgreSQL did not stop");
    tokio::time::sleep(down).await;
    server.boot();
    Ok(t.elapsed())
}

/// SIGKILLs a cluster node (its Erlang VM, as a crashed machine), leaves it down for `down`, then
/// boots it again with its data. Returns how long it was down.
pub async fn kill_rabbit_node(node: &PrivateRabbit, down: Duration) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    node.kill();
    tokio::time::sleep(down).await;
    node.boot().await;
    Ok(t.elapsed())
}

/// Waits (bounded) until every quorum queue under `prefix` has `members` members online, asked
/// of `node`: the cluster has healed and the next node may be killed without losing a majority.
pub async fn cluster_healed(
    node: &PrivateRabbit,
    prefix: &str,
    members: usize,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    loop {
        let out = node.ctl(&["list_queues", "name", "online", "--no-table-headers", "-q"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let ours: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
        if out.status.success()
            && !ours.is_empty()
            && ours.iter().all(|l| l.matches('@').count() == members)
        {
            return Ok(t.elapsed());
        }
        anyhow::ensure!(
            t.elapsed() < timeout,
            "the cluster did not heal within {timeout:?}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The primary crashes (`pg_ctl stop -m immediate`) and the standby is promoted at once, as a
/// failover manager would. Returns how long after the crash the standby accepted writes.
pub async fn fail_over_postgres(
    primary: &PrivatePostgres,
    standby: &PrivatePostgres,
) -> anyhow::Result<Duration> {
    let t = std::time::Instant::now();
    primary.crash();
    anyhow::ensure!(!primary.running(), "the private primary did not stop");
    standby.promote();
    Ok(t.elapsed())
}
