//! Private RabbitMQ nodes for tests that need a broker of their own: a TLS listener, a node to
//! stop or kill, a cluster. Each node has its own name, ports and data directory and runs as the
//! `rabbitmq` user with the distribution's server; the machine's own broker (5672) is never
//! touched. A node is stopped, and its directory removed, when the value is dropped — also when
//! the test fails.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use crate::stack::free_port;

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";

/// A TLS listener's files.
#[derive(Debug, Clone)]
pub struct TlsListener {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Refuse clients without a certificate signed by `ca` (mutual TLS).
    pub require_client_cert: bool,
}

/// What a node listens on.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// A plaintext AMQP listener.
    pub plain: bool,
    pub tls: Option<TlsListener>,
}

/// A running private node.
#[derive(Debug)]
pub struct PrivateRabbit {
    pub node: String,
    /// The plaintext AMQP port, when it has one.
    pub amqp_port: Option<u16>,
    /// The TLS AMQP port, when it has one.
    pub tls_port: Option<u16>,
    dir: PathBuf,
    /// Erlang distribution and node ports, kept so a restarted node comes back the same.
    dist_port: u16,
    node_port: u16,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl PrivateRabbit {
    /// Starts a node and waits until it has booted.
    pub async fn start(options: NodeOptions) -> PrivateRabbit {
        let id = format!(
            "pt{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("prebuilds-rabbit-{id}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("mnesia")).expect("node directory");
        std::fs::create_dir_all(dir.join("log")).expect("node log directory");
        let amqp_port = options.plain.then(free_port);
        let tls_port = options.tls.as_ref().map(|_| free_port());
        let mut conf = String::new();
        match amqp_port {
            Some(port) => conf.push_str(&format!("listeners.tcp.default = 127.0.0.1:{port}\n")),
            None => conf.push_str("listeners.tcp = none\n"),
        }
        if let (Some(tls), Some(port)) = (&options.tls, tls_port) {
            // The broker runs as `rabbitmq`: give it copies it can read.
            let copy = |from: &Path, name: &str| {
                let to = dir.join(name);
                std::fs::copy(from, &to).expect("copy TLS file");
                to
            };
            conf.push_str(&format!(
                "listeners.ssl.default = 127.0.0.1:{port}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = {}\n\
                 ssl_options.fail_if_no_peer_cert = {}\n",
                copy(&tls.ca, "ca.pem").display(),
                copy(&tls.cert, "server.pem").display(),
                copy(&tls.key, "server.key").display(),
                if tls.require_client_cert {
                    "verify_peer"
                } else {
                    "verify_none"
                },
                tls.require_client_cert,
            ));
        }
        std::fs::write(dir.join("rabbitmq.conf"), conf).expect("write rabbitmq.conf");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("write enabled_plugins");
        std::fs::write(dir.join("env.conf"), "").expect("write env.conf");
        let status = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(status.success(), "chown the node directory to rabbitmq");
        let node = PrivateRabbit {
            node: format!("{id}@localhost"),
            amqp_port,
            tls_port,
            dir,
            dist_port: free_port(),
            node_port: free_port(),
        };
        node.boot().await;
        node
    }

    /// Starts the node's server (again, after [`PrivateRabbit::stop`]: same name, ports and data)
    /// and waits until it has booted.
    pub async fn boot(&self) {
        let node = self;
        let output = node
            .command(SERVER)
            .env("RABBITMQ_NODE_PORT", node.node_port.to_string())
            .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", node.dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", node.dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", node.dir.join("rabbitmq.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                node.dir.join("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", node.dir.join("pid"))
            .arg("-detached")
            .output()
            .expect("start rabbitmq-server");
        assert!(
            output.status.success(),
            "rabbitmq-server -detached failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // `await_startup` needs the node registered with epmd already: until it is, it fails at
        // once, so ask again until the node answers (or a minute has passed).
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let ctl = node.ctl_command(&["await_startup", "--timeout", "30"]);
            let waited = tokio::task::spawn_blocking(move || {
                let mut ctl = ctl;
                ctl.output()
            })
            .await
            .expect("await_startup task")
            .expect("run rabbitmqctl await_startup");
            if waited.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "private node {} did not start: {}{}\n{}",
                node.node,
                String::from_utf8_lossy(&waited.stdout),
                String::from_utf8_lossy(&waited.stderr),
                node.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// `amqp://guest:guest@localhost:<plain port>/%2f`.
    pub fn plain_url(&self) -> String {
        format!(
            "amqp://guest:guest@localhost:{}/%2f",
            self.amqp_port.expect("node has a plaintext listener")
        )
    }

    /// `amqps://guest:guest@<host>:<TLS port>/%2f`.
    pub fn tls_url(&self, host: &str) -> String {
        format!(
            "amqps://guest:guest@{host}:{}/%2f",
            self.tls_port.expect("node has a TLS listener")
        )
    }

    /// Runs `rabbitmqctl -n <node> args…`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_command(args).output().expect("run rabbitmqctl")
    }

    fn ctl_command(&self, args: &[&str]) -> Command {
        let mut command = self.command(CTL);
        command.args(["-n", &self.node]).args(args);
        command
    }

    /// A command run as `rabbitmq` with this node's environment file (not the machine's).
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "rabbitmq", "--", "env"])
            .arg("HOME=/var/lib/rabbitmq")
            .arg(format!(
                "RABBITMQ_CONF_ENV_FILE={}",
                self.dir.join("env.conf").display()
            ))
            .arg(format!("RABBITMQ_NODENAME={}", self.node))
            .arg("ERL_EPMD_ADDRESS=127.0.0.1");
        command.arg(program);
        command
    }

    fn log_tail(&self) -> String {
        let Ok(entries) = std::fs::read_dir(self.dir.join("log")) else {
            return String::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .map(|text| {
                let lines: Vec<&str> = text.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Stops the node (and waits for it to be gone); [`PrivateRabbit::boot`] starts it again.
    pub fn stop(&self) {
        let _ = self.ctl(&["stop"]);
        // `stop` returns once the node has shut down; the pid file lets us make sure.
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let pid = pid.trim().to_owned();
            for _ in 0..100 {
                let alive = Command::new("kill")
                    .args(["-0", &pid])
                    .status()
                    .is_ok_and(|s| s.success());
                if !alive {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

impl PrivateRabbit {
    /// Starts `size` plaintext nodes and joins the others to the first. Every node runs as
    /// `rabbitmq` with that user's Erlang cookie, so they share it.
    pub async fn cluster(size: usize) -> Vec<PrivateRabbit> {
        let mut nodes = Vec::new();
        for _ in 0..size {
            nodes.push(
                PrivateRabbit::start(NodeOptions {
                    plain: true,
                    tls: None,
                })
                .await,
            );
        }
        let first = nodes[0].node.clone();
        for node in &nodes[1..] {
            for args in [
                vec!["stop_app"],
                vec!["join_cluster", first.as_str()],
                vec!["start_app"],
                vec!["await_startup", "--timeout", "60"],
            ] {
                let out = node.ctl(&args);
                assert!(
                    out.status.success(),
                    "{} {args:?}: {}{}",
                    node.node,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        nodes
    }

    /// SIGKILLs the node's server at once (a crashed machine, not a clean stop).
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
