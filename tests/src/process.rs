//! Starting the workspace's real binaries as child processes for end-to-end tests.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::process::{Child, Command};

/// Path of a binary built in this workspace's target directory (`cargo build --bins` first; the
/// README's test command does).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps/<test-binary>, tools (the benchmark) from
    // target/<profile>/<tool>: either way the binaries sit in target/<profile>.
    let mut profile_dir = exe.parent().expect("an executable lives in a directory");
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir = profile_dir.parent().expect("deps has a parent");
    }
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// A running child process, killed (SIGKILL) on drop unless stopped before.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    child: Option<Child>,
}

/// The command every [`Service`] constructor starts from: `binary` with `args` and extra
/// environment, no stdin, killed when dropped.
fn service_command(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(binary(binary_name));
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        command.env(k, v);
    }
    command
}

impl Service {
    fn spawn(binary_name: &str, mut command: Command) -> Service {
        Service {
            name: binary_name.to_owned(),
            child: Some(command.spawn().expect("spawn service")),
        }
    }

    /// Starts `binary` with `args` and extra environment; output goes to the test's stderr.
    pub fn start(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut command = service_command(binary_name, args, env);
        command.stdout(Stdio::inherit()).stderr(Stdio::inherit());
        Service::spawn(binary_name, command)
    }

    /// Like [`Service::start`], with stdout and stderr appended to `log` (for tests that read
    /// everything a process printed).
    pub fn start_logged(
        binary_name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> Service {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open service log");
        let mut command = service_command(binary_name, args, env);
        command
            .stdout(file.try_clone().expect("clone log handle"))
            .stderr(file);
        Service::spawn(binary_name, command)
    }

    /// Like [`Service::start`], as the leader of a process group of its own, so that
    /// [`Service::kill_group`] takes everything it started with it (a container or pod dying).
    pub fn start_group(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> Service {
        let mut command = service_command(binary_name, args, env);
        command
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .process_group(0);
        Service::spawn(binary_name, command)
    }

    /// SIGKILL to the whole process group of a service started with [`Service::start_group`]:
    /// the process and every child it runs die at once, as when their container is killed.
    pub async fn kill_group(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .status();
            }
            let _ = child.wait().await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let pid = self.pid()?;
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let child = self.child.as_mut()?;
        let status = tokio::time::timeout(timeout, child.wait()).await.ok()?.ok();
        self.child = None;
        status
    }

    /// SIGKILL now.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}
