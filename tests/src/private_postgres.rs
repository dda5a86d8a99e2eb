//! Private PostgreSQL servers for tests that stop or restart the database: each has its own data
//! directory (`initdb`, trust authentication on loopback), its own spare port and its own socket
//! directory, and runs as the `postgres` user with the distribution's binaries. The machine's
//! server (5432) is never touched. The server is stopped, and its directory removed, when the value
//! is dropped — also when the test fails.

use std::{
    path::PathBuf,
    process::{Command, Output},
};

use crate::stack::free_port;

/// The newest installed server's binaries (`/usr/lib/postgresql/<version>/bin`).
fn bin_dir() -> PathBuf {
    let root = PathBuf::from("/usr/lib/postgresql");
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(&root)
        .expect("PostgreSQL server binaries under /usr/lib/postgresql (package postgresql)")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.pop().expect("an installed PostgreSQL version").1
}

/// A running private server.
#[derive(Debug)]
pub struct PrivatePostgres {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

/// A fresh directory for one server under the temporary directory, owned by `postgres` (the
/// server refuses a data directory its user does not own).
fn server_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "prebuilds-postgres-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).expect("server directory");
    let owned = Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&dir)
        .status()
        .expect("chown");
    assert!(owned.success(), "chown the server directory to postgres");
    dir
}

impl PrivatePostgres {
    /// Initialises a data directory and starts the server on a spare port.
    pub fn start() -> PrivatePostgres {
        let dir = server_dir();
        let server = PrivatePostgres {
            port: free_port(),
            dir,
            bin: bin_dir(),
        };
        let init = server.run(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "--auth=trust",
                "--username=postgres",
                "--no-sync",
            ],
        );
        assert!(init.status.success(), "initdb: {}", text(&init));
        server.boot();
        server
    }

    /// `postgres://postgres@127.0.0.1:<port>` (no database: the test harness's server URL).
    pub fn server_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Runs one of the server's binaries as `postgres`.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(program))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {program}: {e}"))
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data().display().to_string();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    /// Starts the server (again, after [`PrivatePostgres::stop`]) and waits until it accepts
    /// connections.
    pub fn boot(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("server.log").display().to_string();
        let started = self.pg_ctl(&["-o", &options, "-l", &log, "-w", "-t", "60", "start"]);
        assert!(
            started.status.success(),
            "private PostgreSQL on port {} did not start: {}\n{}",
            self.port,
            text(&started),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server (fast shutdown: sessions are disconnected, as in a restart or failover).
    pub fn stop(&self) {
        let _ = self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]);
    }

    /// Whether it accepts connections.
    pub fn running(&self) -> bool {
        self.run(
            "pg_isready",
            &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-t", "2"],
        )
        .status
        .success()
    }
}

impl PrivatePostgres {
    /// A streaming standby of `primary`: its own data directory made by `pg_basebackup -R` (which
    /// writes `standby.signal` and the `primary_conninfo` naming the primary's port), its own
    /// spare port; started, and replaying, when this returns. [`PrivatePostgres::promote`] makes
    /// it a primary.
    pub fn standby_of(primary: &PrivatePostgres) -> PrivatePostgres {
        let dir = server_dir();
        let standby = PrivatePostgres {
            port: free_port(),
            dir,
            bin: primary.bin.clone(),
        };
        let copied = standby.run(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
                "-D",
                &standby.data().display().to_string(),
                "-R",
                "-X",
                "stream",
                // A spread checkpoint would make this wait minutes for the primary's next one.
                "--checkpoint=fast",
                "--no-sync",
            ],
        );
        assert!(copied.status.success(), "pg_basebackup: {}", text(&copied));
        standby.boot();
        standby
    }

    /// Promotes a standby to a primary and waits until it accepts writes.
    pub fn promote(&self) {
        let promoted = self.pg_ctl(&["-w", "-t", "60", "promote"]);
        assert!(
            promoted.status.success(),
            "pg_ctl promote: {}",
            text(&promoted)
        );
    }

    /// Stops the server the way a crash does (`pg_ctl stop -m immediate`: every process exits at
    /// once, sessions are cut without a goodbye, nothing is checkpointed).
    pub fn crash(&self) {
        let _ = self.pg_ctl(&["-m", "immediate", "-w", "-t", "60", "stop"]);
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
