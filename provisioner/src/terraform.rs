//! The terraform backend: runs the real `terraform` CLI on the template version's source.
//!
//! Each workspace has its own working directory `<--terraform-workdir>/<workspace_id>`, holding
//! `main.tf` (the template version's `source`, read from PostgreSQL) and terraform's plugin cache.
//! The state lives in the configured store (`terraform_state`): by default terraform's `pg`
//! backend in PostgreSQL, one terraform workspace per prebuilds workspace (so any replica resumes
//! any job, under terraform's lock), or `terraform.tfstate` in the working directory. Builds of one
//! workspace run one at a time in this process; across replicas, terraform's state lock (waited for
//! up to `--terraform-timeout`) keeps them apart.
//!
//! Whether a delivered job may run at all (canceled while queued, reaped, a duplicate) is decided
//! before the backend is called, from the job's row (`admission`).
//!
//! Start and stop builds:
//! 1. write `main.tf` (and, for the pg store, `prebuilds_backend.tf`); `terraform init
//!    -input=false`; pg store: `terraform workspace select -or-create <workspace_id>`;
//! 2. `terraform plan -input=false -out=plan.tfplan`, variables passed as `TF_VAR_*` (terraform
//!    ignores the ones the source does not declare): the job's parameters, then `owner_name`,
//!    `owner_id`, `workspace_name`, `workspace_id`, `template_id`, `template_version_id`,
//!    `transition`, `build_number`, `stage`, `is_prebuild`, `is_prebuild_claim` (these win over a
//!    parameter of the same name);
//! 3. `terraform show -json plan.tfplan` → [`prebuilds_schemas::plan::replacements_from_plan`] → `plan_result` (start builds);
//! 4. `terraform apply -input=false plan.tfplan`;
//! 5. start builds: `terraform output -json` → the agents ([`agents_from_outputs`]: the names in an
//!    output `agents`, default one agent `main`).
//!
//! Delete builds carry no parameters: the variables are those of the workspace's previous build
//! (its `workspace_builds.parameters`, read from PostgreSQL) with the delete's own built-ins on top.
//! `terraform destroy -auto-approve -input=false` runs when the store holds a state for the
//! workspace; then the state (pg: `terraform workspace delete`) and the working directory are
//! removed. Terraform's output streams as `job_log` lines (stdout at info — `# forces replacement`
//! lines of claim builds at warn — and stderr at error); a non-zero exit fails the job with the last
//! stderr lines as its error. Every invocation is bounded by `--terraform-timeout` and interrupted
//! (SIGINT, then SIGKILL after a grace period) at the timeout or when shutdown runs out of patience.
//!
//! Environment: terraform (and whatever a template runs through it: `local-exec`, `external`
//! programs, providers) never inherits the provisioner's environment, which holds our own
//! credentials (`DATABASE_URL`, `AMQP_URL`, their `_FILE` forms, `PREBUILDS_*`). Every invocation
//! starts from a cleared environment plus the allow-list of [`terraform_environment`]: `PATH`,
//! `HOME`, every `TF_*` variable and the names listed in `--terraform-pass-env`; then our own
//! settings (`TF_IN_AUTOMATION`, `TF_INPUT`, `CHECKPOINT_DISABLE`, maybe `TF_CLI_CONFIG_FILE`, the
//! pg store's `PG_*`) and the build's `TF_VAR_*` on top.
//!
//! Idempotence: a build executed again after it applied (a crash before the ack, or on another
//! replica after this one died) re-plans against the saved state and changes only what is missing,
//! so its second `plan_result` lists no replacements; the worker keeps the first one it received.
//! A resource that was being created at the instant its replica died is not in the state and is
//! created again: terraform cannot know about it.

use std::{
    collections::{BTreeMap, VecDeque},
    ffi::OsString,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use anyhow::Context;
use deadpool_postgres::Pool;
use prebuilds_schemas::{BuildStage, LogLevel, ProvisionerJob, Transition};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use prebuilds_runtime::keyed_locks::KeyedLocks;

use crate::{
    backend::{query_by_id, BuildResult, RunError},
    events::Emitter,
    terraform_state::{StateConfig, StateStore, BACKEND_BLOCK, BACKEND_FILE},
};

const TEMPLATE_SOURCE_SQL: &str = include_str!("sql/template_source.sql");
const PREVIOUS_PARAMETERS_SQL: &str = include_str!("sql/previous_parameters.sql");

/// How often streamed terraform output is published while a command runs.
const LOG_FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// How long an interrupted terraform may take to stop gracefully before it is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// Stderr lines kept for the error text of a failed command.
const ERROR_TAIL_LINES: usize = 12;

#[derive(Debug, Clone)]
pub struct TerraformConfig {
    pub binary: PathBuf,
    pub workdir: PathBuf,
    pub timeout: Duration,
    /// Variables of the provisioner's environment passed to terraform besides `PATH`, `HOME` and
    /// `TF_*` (`--terraform-pass-env`); validated at start-up ([`check_pass_env`]).
    pub pass_env: Vec<String>,
    /// Where the state is kept (`--terraform-state`).
    pub state: StateConfig,
}

/// Whether `name` is one of the provisioner's own credentials or settings, which no template may
/// read: the connection URLs (and the files holding them) and everything `PREBUILDS_*`.
pub fn is_own_setting(name: &str) -> bool {
    matches!(
        name,
        "DATABASE_URL" | "AMQP_URL" | "DATABASE_URL_FILE" | "AMQP_URL_FILE"
    ) || name.starts_with("PREBUILDS_")
}

/// Checks the names of `--terraform-pass-env`: each a portable variable name
/// (`[A-Za-z_][A-Za-z0-9_]*`) and none of our own settings ([`is_own_setting`]). The error says
/// which name is wrong and why.
pub fn check_pass_env(names: &[String]) -> Result<(), String> {
    for name in names {
        let mut chars = name.chars();
        let portable = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !portable {
            return Err(format!(
                "--terraform-pass-env (PREBUILDS_TERRAFORM_PASS_ENV) lists {name:?}, which is not \
                 a variable name: use comma-separated names of letters, digits and `_`, not \
                 starting with a digit (e.g. AWS_PROFILE,GOOGLE_APPLICATION_CREDENTIALS)"
            ));
        }
        if is_own_setting(name) {
            return Err(format!(
                "--terraform-pass-env (PREBUILDS_TERRAFORM_PASS_ENV) lists {name}, one of the \
                 provisioner's own credentials or settings (DATABASE_URL, AMQP_URL, their _FILE \
                 forms, PREBUILDS_*): templates must never see them; remove it from the list"
            ));
        }
    }
    Ok(())
}

/// The part of the provisioner's environment (`parent`) that terraform inherits: `PATH`, `HOME`,
/// every `TF_*` variable (how operators configure terraform: `TF_LOG`, `TF_PLUGIN_CACHE_DIR`,
/// `TF_CLI_CONFIG_FILE`, ...) and the names in `pass`, in `parent`'s order. Our own settings never
/// pass, even when listed in `pass` (start-up refuses that already; this keeps the rule whole in
/// one place). Names that are not UTF-8 cannot be any of these and are dropped.
pub fn terraform_environment(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    pass: &[String],
) -> Vec<(OsString, OsString)> {
    parent
        .into_iter()
        .filter(|(name, _)| {
            name.to_str().is_some_and(|name| {
                !is_own_setting(name)
                    && (name == "PATH"
                        || name == "HOME"
                        || name.starts_with("TF_")
                        || pass.iter().any(|p| p == name))
            })
        })
        .collect()
}

/// Agent names from `terraform output -json`: the output `agents` (a list of names, of objects with
/// a `name`, or one name); one agent `main` when the template has no such output.
pub fn agents_from_outputs(outputs: &serde_json::Value) -> Vec<String> {
    let Some(value) = outputs.get("agents").and_then(|o| o.get("value")) else {
        return vec!["main".to_owned()];
    };
    let name_of = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("name").and_then(|n| n.as_str()).map(str::to_owned),
        _ => None,
    };
    match value {
        serde_json::Value::Array(items) => items.iter().filter_map(name_of).collect(),
        single => name_of(single).into_iter().collect(),
    }
}

/// The variables of a build, by name (see the module documentation).
pub fn variables(job: &ProvisionerJob) -> BTreeMap<String, String> {
    variables_with(&job.parameters, job)
}

/// The variables of a build whose parameters are `parameters` (a delete build: those of the
/// workspace's previous build), the built-ins of `job` on top.
pub fn variables_with(
    parameters: &[prebuilds_schemas::Parameter],
    job: &ProvisionerJob,
) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for p in parameters {
        if valid_variable_name(&p.name) {
            vars.insert(p.name.clone(), p.value.clone());
        }
    }
    let builtins = [
        ("owner_name", job.owner_name.clone()),
        ("owner_id", job.owner_id.to_string()),
        ("workspace_name", job.workspace_name.clone()),
        ("workspace_id", job.workspace_id.to_string()),
        ("template_id", job.template_id.to_string()),
        ("template_version_id", job.template_version_id.to_string()),
        ("transition", job.transition.as_str().to_owned()),
        ("build_number", job.build_number.to_string()),
        ("stage", job.stage.as_str().to_owned()),
        (
            "is_prebuild",
            (job.owner_id == prebuilds_schemas::PREBUILDS_USER_ID).to_string(),
        ),
        (
            "is_prebuild_claim",
            (job.stage == BuildStage::Claim).to_string(),
        ),
    ];
    for (name, value) in builtins {
        vars.insert(name.to_owned(), value);
    }
    vars
}

/// Terraform identifiers: a letter or `_`, then letters, digits, `_` or `-`.
fn valid_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Turns terraform's boxed diagnostics (`╷`, `│ Error: …`, `╵`) into plain lines.
fn clean_diagnostic(line: &str) -> Option<String> {
    let trimmed = line.trim_start_matches(['╷', '╵', '│']).trim().to_owned();
    (!trimmed.is_empty()).then_some(trimmed)
}

/// Why a terraform command produced no result.
enum ExecError {
    /// The build failed (non-zero exit, timeout, cannot spawn): reported as the job's error.
    Failed(String),
    /// Shutdown interrupted it.
    Aborted,
}

/// What a command's stdout is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stdout {
    /// Streamed to the job log; `# forces replacement` lines at warn when `warn_replacements`.
    Log { warn_replacements: bool },
    /// Returned to the caller (machine-readable output), not logged.
    Capture,
}

impl Stdout {
    /// Streamed to the job log, every line at info.
    const LOG: Stdout = Stdout::Log {
        warn_replacements: false,
    };
}

/// What every terraform command of one build shares: the workspace's working directory, the
/// build's variables, the job's emitter (the output streams to its log) and the shutdown signal.
/// Bundled so each step of [`TerraformBackend::apply`] and [`TerraformBackend::destroy`] names
/// only what differs: the arguments, the log stage and what stdout is for.
struct BuildContext<'a> {
    dir: &'a Path,
    vars: &'a BTreeMap<String, String>,
    emitter: &'a mut Emitter,
    stop: &'a CancellationToken,
}

/// Where the source of a template version stands.
enum Source {
    Found(String),
    Null,
    UnknownVersion,
}

/// The variables terraform inherits. Its `Debug` shows the names only: the values of passed
/// variables (cloud credentials, say) must not end up in a debug log.
struct InheritedEnv(Vec<(OsString, OsString)>);

impl std::fmt::Debug for InheritedEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(n, _)| n))
            .finish()
    }
}

#[derive(Debug)]
pub struct TerraformBackend {
    config: TerraformConfig,
    pool: Pool,
    state: StateStore,
    workspaces: KeyedLocks,
    /// What terraform inherits of the provisioner's environment ([`terraform_environment`]),
    /// taken once at start: the process environment does not change afterwards.
    inherited_env: InheritedEnv,
    /// `TF_CLI_CONFIG_FILE` to pass when the configured CLI configuration file does not exist
    /// (terraform would warn about it on every command).
    cli_config_override: Option<PathBuf>,
}

impl TerraformBackend {
    pub fn new(config: TerraformConfig, pool: Pool) -> anyhow::Result<Self> {
        let state = StateStore::open(&config.state)?;
        let configured = std::env::var_os("TF_CLI_CONFIG_FILE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".terraformrc")));
        let cli_config_override = match configured {
            Some(path) if path.exists() => None,
            _ => Some(PathBuf::from("/dev/null")),
        };
        let inherited_env =
            InheritedEnv(terraform_environment(std::env::vars_os(), &config.pass_env));
        // A listed name that is not set is most likely a typo: say so once, at start.
        for name in &config.pass_env {
            if !inherited_env.0.iter().any(|(n, _)| n == name.as_str()) {
                tracing::warn!(variable = %name, "--terraform-pass-env lists a variable that is not set in the provisioner's environment");
            }
        }
        Ok(TerraformBackend {
            config,
            pool,
            state,
            workspaces: KeyedLocks::default(),
            inherited_env,
            cli_config_override,
        })
    }

    /// Where the state is kept, for the start-up log line.
    pub fn state_description(&self) -> String {
        match &self.state {
            StateStore::Local => "local (terraform.tfstate in each working directory)".to_owned(),
            StateStore::Pg(pg) => format!("pg (schema {})", pg.schema()),
        }
    }

    /// Checks the binary runs and the working directory is writable; returns the version line.
    pub async fn preflight(&self) -> anyhow::Result<String> {
        std::fs::create_dir_all(&self.config.workdir).with_context(|| {
            format!(
                "cannot create the terraform working directory {} (set --terraform-workdir)",
                self.config.workdir.display()
            )
        })?;
        let mut command = Command::new(&self.config.binary);
        command.arg("version").kill_on_drop(true);
        self.base_env(&mut command);
        let output = tokio::time::timeout(Duration::from_secs(30), command.output())
            .await
            .context("`terraform version` did not answer within 30s")?
            .with_context(|| {
                format!(
                    "cannot run {:?}: install terraform or point --terraform-binary at it",
                    self.config.binary
                )
            })?;
        anyhow::ensure!(
            output.status.success(),
            "`{} version` failed: {}",
            self.config.binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        if let StateStore::Pg(pg) = &self.state {
            pg.prepare().await?;
        }
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned())
    }

    /// The environment every terraform command starts with (see the module documentation): a
    /// cleared one, so nothing of ours leaks to templates by default, plus the allow-listed
    /// variables, then our own settings on top.
    fn base_env(&self, command: &mut Command) {
        command
            .env_clear()
            .envs(self.inherited_env.0.iter().map(|(n, v)| (n, v)))
            .env("TF_IN_AUTOMATION", "1")
            .env("TF_INPUT", "0")
            .env("CHECKPOINT_DISABLE", "1");
        if let Some(path) = &self.cli_config_override {
            command.env("TF_CLI_CONFIG_FILE", path);
        }
        if let StateStore::Pg(pg) = &self.state {
            command.envs(pg.environment());
        }
    }

    /// `-lock-timeout` for the commands that take the state lock: a build of this workspace on
    /// another replica (a job redelivered while its first replica's terraform still runs) is waited
    /// for, within the bound of one command, rather than failed at once.
    fn lock_timeout(&self) -> String {
        format!("-lock-timeout={}s", self.config.timeout.as_secs().max(1))
    }

    /// Whether the store holds a state for the workspace whose working directory is `dir`.
    async fn has_state(&self, workspace_id: Uuid, dir: &Path) -> Result<bool, Outcome> {
        match &self.state {
            StateStore::Local => Ok(dir.join("terraform.tfstate").exists()),
            StateStore::Pg(pg) => Ok(pg.exists(workspace_id).await?),
        }
    }

    /// The parameters of the workspace's latest build before this delete (delete builds carry
    /// none, yet terraform needs the variables to destroy); none when there is no such build.
    async fn previous_parameters(
        &self,
        job: &ProvisionerJob,
    ) -> Result<Vec<prebuilds_schemas::Parameter>, Outcome> {
        let row = query_by_id(
            &self.pool,
            PREVIOUS_PARAMETERS_SQL,
            job.workspace_id,
            "reading the previous build's parameters",
        )
        .await?;
        let Some(row) = row else {
            return Ok(Vec::new());
        };
        let text: String = row.get(0);
        serde_json::from_str(&text).map_err(|e| {
            Outcome::Failed(format!(
                "the previous build of workspace {} has parameters that are not a list of \
                 {{name, value}}: {e}",
                job.workspace_id
            ))
        })
    }

    fn workspace_dir(&self, workspace_id: Uuid) -> PathBuf {
        self.config.workdir.join(workspace_id.to_string())
    }

    async fn template_source(&self, version_id: Uuid) -> Result<Source, RunError> {
        let row = query_by_id(
            &self.pool,
            TEMPLATE_SOURCE_SQL,
            version_id,
            "reading the template source",
        )
        .await?;
        Ok(match row {
            None => Source::UnknownVersion,
            Some(row) => match row.get::<_, Option<String>>(0) {
                Some(text) => Source::Found(text),
                None => Source::Null,
            },
        })
    }

    pub async fn run(
        &self,
        job: &ProvisionerJob,
        emitter: &mut Emitter,
        stop: &CancellationToken,
    ) -> Result<BuildResult, RunError> {
        let _workspace = self.workspaces.lock(job.workspace_id).await;
        let result = match job.transition {
            Transition::Start | Transition::Stop => self.apply(job, emitter, stop).await,
            Transition::Delete => self.destroy(job, emitter, stop).await,
        };
        match result {
            Ok(agents) => Ok(BuildResult::Succeeded { agents }),
            Err(Outcome::Failed(error)) => {
                emitter.flush_logs().await;
                Ok(BuildResult::Failed { error })
            }
            Err(Outcome::Run(e)) => Err(e),
        }
    }

    async fn write_source(&self, job: &ProvisionerJob, dir: &Path) -> Result<(), Outcome> {
        let source = match self.template_source(job.template_version_id).await? {
            Source::Found(text) => text,
            Source::Null => {
                return Err(Outcome::Failed(format!(
                    "template version {} has no Terraform source (push it with `source:`)",
                    job.template_version_id
                )))
            }
            Source::UnknownVersion => {
                return Err(Outcome::Failed(format!(
                    "template version {} does not exist",
                    job.template_version_id
                )))
            }
        };
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| Outcome::Failed(format!("cannot create {}: {e}", dir.display())))?;
        tokio::fs::write(dir.join("main.tf"), source)
            .await
            .map_err(|e| Outcome::Failed(format!("cannot write main.tf: {e}")))?;
        self.write_backend(dir).await
    }

    /// Selects the state store in `dir`: the pg backend's block, or none for local state (removed
    /// if an earlier run with the pg store left it).
    async fn write_backend(&self, dir: &Path) -> Result<(), Outcome> {
        let path = dir.join(BACKEND_FILE);
        match &self.state {
            StateStore::Pg(_) => tokio::fs::write(&path, BACKEND_BLOCK)
                .await
                .map_err(|e| Outcome::Failed(format!("cannot write {BACKEND_FILE}: {e}"))),
            StateStore::Local => match tokio::fs::remove_file(&path).await {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Outcome::Failed(
                    format!("cannot remove {BACKEND_FILE}: {e}"),
                )),
                _ => Ok(()),
            },
        }
    }

    /// Pg store: makes the workspace's own terraform workspace (its state row) the current one.
    async fn select_workspace(
        &self,
        build: &mut BuildContext<'_>,
        workspace_id: Uuid,
        create: bool,
    ) -> Result<(), Outcome> {
        if let StateStore::Pg(_) = &self.state {
            let name = workspace_id.to_string();
            let or_create = format!("-or-create={create}");
            let args = ["workspace", "select", or_create.as_str(), name.as_str()];
            self.exec(build, &args, "init", Stdout::LOG).await?;
        }
        Ok(())
    }

    /// Start and stop builds; returns the agents (start builds).
    async fn apply(
        &self,
        job: &ProvisionerJob,
        emitter: &mut Emitter,
        stop: &CancellationToken,
    ) -> Result<Vec<String>, Outcome> {
        let dir = self.workspace_dir(job.workspace_id);
        self.write_source(job, &dir).await?;
        let vars = variables(job);
        let mut build = self.init(&dir, &vars, emitter, stop).await?;
        self.select_workspace(&mut build, job.workspace_id, true)
            .await?;
        let plan_log = Stdout::Log {
            warn_replacements: job.stage == BuildStage::Claim,
        };
        let lock_timeout = self.lock_timeout();
        let plan_args = ["plan", "-input=false", &lock_timeout, "-out=plan.tfplan"];
        self.exec(&mut build, &plan_args, "plan", plan_log).await?;
        if job.transition == Transition::Start {
            let plan = self
                .exec_json(&mut build, "show", &["plan.tfplan"], "plan")
                .await?;
            build
                .emitter
                .plan_result(prebuilds_schemas::plan::replacements_from_plan(&plan))
                .await;
        }
        let apply_args = ["apply", "-input=false", &lock_timeout, "plan.tfplan"];
        self.exec(&mut build, &apply_args, "apply", Stdout::LOG)
            .await?;
        let _ = tokio::fs::remove_file(dir.join("plan.tfplan")).await;
        if job.transition != Transition::Start {
            return Ok(Vec::new());
        }
        let outputs = self.exec_json(&mut build, "output", &[], "apply").await?;
        Ok(agents_from_outputs(&outputs))
    }

    async fn destroy(
        &self,
        job: &ProvisionerJob,
        emitter: &mut Emitter,
        stop: &CancellationToken,
    ) -> Result<Vec<String>, Outcome> {
        let dir = self.workspace_dir(job.workspace_id);
        if !self.has_state(job.workspace_id, &dir).await? {
            emitter
                .log(
                    LogLevel::Info,
                    "destroy",
                    "No Terraform state for this workspace: nothing to destroy.",
                )
                .await;
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Ok(Vec::new());
        }
        match self.write_source(job, &dir).await {
            Ok(()) => {}
            Err(Outcome::Failed(why)) if dir.join("main.tf").exists() => {
                emitter
                    .log(
                        LogLevel::Warn,
                        "destroy",
                        format!("{why}; destroying with the source of the previous build"),
                    )
                    .await;
                self.write_backend(&dir).await?;
            }
            Err(other) => return Err(other),
        }
        let parameters = self.previous_parameters(job).await?;
        let vars = variables_with(&parameters, job);
        let mut build = self.init(&dir, &vars, emitter, stop).await?;
        self.select_workspace(&mut build, job.workspace_id, false)
            .await?;
        let lock_timeout = self.lock_timeout();
        let destroy_args = ["destroy", "-auto-approve", "-input=false", &lock_timeout];
        self.exec(&mut build, &destroy_args, "destroy", Stdout::LOG)
            .await?;
        if let StateStore::Pg(_) = &self.state {
            // The state is empty now: drop its row so the table holds live workspaces only. A
            // workspace cannot delete itself while selected.
            let name = job.workspace_id.to_string();
            self.exec(
                &mut build,
                &["workspace", "select", "default"],
                "destroy",
                Stdout::LOG,
            )
            .await?;
            // `-force`: a successful destroy left nothing to track, whatever outputs remain.
            let delete_args = [
                "workspace",
                "delete",
                "-force",
                &lock_timeout,
                name.as_str(),
            ];
            self.exec(&mut build, &delete_args, "destroy", Stdout::LOG)
                .await?;
        }
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            tracing::warn!(job_id = %job.job_id, dir = %dir.display(), error = %e, "cannot remove the destroyed workspace's working directory");
        }
        Ok(Vec::new())
    }

    /// Runs `terraform init -input=false` in `dir`, the first command of every build (start, stop
    /// and delete alike, once `main.tf` is written), and returns the context the build's later
    /// commands run in.
    async fn init<'a>(
        &self,
        dir: &'a Path,
        vars: &'a BTreeMap<String, String>,
        emitter: &'a mut Emitter,
        stop: &'a CancellationToken,
    ) -> Result<BuildContext<'a>, Outcome> {
        let mut build = BuildContext {
            dir,
            vars,
            emitter,
            stop,
        };
        self.exec(&mut build, &["init", "-input=false"], "init", Stdout::LOG)
            .await?;
        Ok(build)
    }

    /// Runs `terraform <command> -json <extra_args>` and parses what it prints: the
    /// machine-readable steps (`show -json` of the plan, `output -json` after an apply).
    async fn exec_json(
        &self,
        build: &mut BuildContext<'_>,
        command: &str,
        extra_args: &[&str],
        stage: &str,
    ) -> Result<serde_json::Value, Outcome> {
        let args: Vec<&str> = [command, "-json"]
            .into_iter()
            .chain(extra_args.iter().copied())
            .collect();
        let json = self.exec(build, &args, stage, Stdout::Capture).await?;
        serde_json::from_str(&json).map_err(|e| {
            Outcome::Failed(format!(
                "`terraform {command} -json` printed invalid JSON: {e}"
            ))
        })
    }

    /// Runs one terraform command in the build's working directory, streaming its output to the
    /// job log (see [`Stdout`]); `stage` labels the log lines.
    async fn exec(
        &self,
        build: &mut BuildContext<'_>,
        args: &[&str],
        stage: &str,
        stdout_mode: Stdout,
    ) -> Result<String, Outcome> {
        let command_name = args.first().copied().unwrap_or("terraform");
        // Options follow the (sub)command they belong to: `workspace select -no-color …`.
        let words = if command_name == "workspace" { 2 } else { 1 }.min(args.len());
        let mut command = Command::new(&self.config.binary);
        command
            .args(&args[..words])
            .arg("-no-color")
            .args(&args[words..])
            .current_dir(build.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        self.base_env(&mut command);
        for (name, value) in build.vars {
            command.env(format!("TF_VAR_{name}"), value);
        }
        let started = std::time::Instant::now();
        let mut child = command.spawn().map_err(|e| {
            Outcome::Failed(format!("cannot run {}: {e}", self.config.binary.display()))
        })?;
        let result = self
            .stream(
                &mut child,
                command_name,
                stage,
                stdout_mode,
                build.emitter,
                build.stop,
            )
            .await;
        build.emitter.flush_logs().await;
        tracing::debug!(job_id = %build.emitter.job_id(), command = command_name, elapsed = ?started.elapsed(), ok = result.is_ok(), "terraform command finished");
        match result {
            Ok(stdout) => Ok(stdout),
            Err(ExecError::Failed(e)) => Err(Outcome::Failed(e)),
            Err(ExecError::Aborted) => Err(Outcome::Run(RunError::Aborted)),
        }
    }

    async fn stream(
        &self,
        child: &mut Child,
        command_name: &str,
        stage: &str,
        stdout_mode: Stdout,
        emitter: &mut Emitter,
        stop: &CancellationToken,
    ) -> Result<String, ExecError> {
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            return Err(ExecError::Failed(
                "terraform's output pipes were not set up".to_owned(),
            ));
        };
        let mut out = BufReader::new(stdout).lines();
        let mut err = BufReader::new(stderr).lines();
        let (mut out_open, mut err_open) = (true, true);
        let mut captured = String::new();
        let mut error_tail: VecDeque<String> = VecDeque::new();
        // Both phases below (reading the output, then waiting for the exit status) are cut short
        // the same way: at the timeout, or when shutdown stops waiting for builds. One future
        // serves both, so the deadline set here bounds the command as a whole.
        let deadline = tokio::time::sleep(self.config.timeout);
        let cut_short = async {
            tokio::select! {
                _ = deadline => ExecError::Failed(format!(
                    "terraform {command_name} timed out after {:?} (--terraform-timeout)",
                    self.config.timeout
                )),
                _ = stop.cancelled() => ExecError::Aborted,
            }
        };
        tokio::pin!(cut_short);
        let mut flush = tokio::time::interval(LOG_FLUSH_INTERVAL);
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while out_open || err_open {
            tokio::select! {
                line = out.next_line(), if out_open => match line {
                    // Blank lines only space out terraform's human output: not worth a log row.
                    Ok(Some(line)) if line.trim().is_empty() && stdout_mode != Stdout::Capture => {}
                    Ok(Some(line)) => match stdout_mode {
                        Stdout::Capture => {
                            captured.push_str(&line);
                            captured.push('\n');
                        }
                        Stdout::Log { warn_replacements } => {
                            let level = if warn_replacements && line.contains("# forces replacement") {
                                LogLevel::Warn
                            } else {
                                LogLevel::Info
                            };
                            emitter.log(level, stage, line).await;
                        }
                    },
                    _ => out_open = false,
                },
                line = err.next_line(), if err_open => match line {
                    Ok(Some(line)) if line.trim().is_empty() => {}
                    Ok(Some(line)) => {
                        if let Some(clean) = clean_diagnostic(&line) {
                            error_tail.push_back(clean);
                            if error_tail.len() > ERROR_TAIL_LINES {
                                error_tail.pop_front();
                            }
                        }
                        emitter.log(LogLevel::Error, stage, line).await;
                    }
                    _ => err_open = false,
                },
                _ = flush.tick() => emitter.flush_logs().await,
                why = &mut cut_short => {
                    interrupt(child).await;
                    return Err(why);
                }
            }
        }
        let status = tokio::select! {
            status = child.wait() => status,
            why = &mut cut_short => {
                interrupt(child).await;
                return Err(why);
            }
        };
        match status {
            Ok(status) if status.success() => Ok(captured),
            Ok(status) => {
                let detail = if error_tail.is_empty() {
                    "no error output".to_owned()
                } else {
                    Vec::from(error_tail).join("\n")
                };
                Err(ExecError::Failed(format!(
                    "terraform {command_name} failed ({status}): {detail}"
                )))
            }
            Err(e) => Err(ExecError::Failed(format!(
                "waiting for terraform {command_name}: {e}"
            ))),
        }
    }
}

/// How a step of a build ended early.
enum Outcome {
    /// The build failed: report it.
    Failed(String),
    /// No outcome: retry the job later.
    Run(RunError),
}

impl From<RunError> for Outcome {
    fn from(e: RunError) -> Self {
        Outcome::Run(e)
    }
}

/// Asks terraform to stop gracefully (SIGINT: it finishes the resource operations in progress and
/// saves its state), then kills it after [`INTERRUPT_GRACE`].
async fn interrupt(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill")
            .args(["-INT", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await;
        if tokio::time::timeout(INTERRUPT_GRACE, child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

#[cfg(test)]
mod tests {
    use prebuilds_schemas::{Parameter, Payload};
    use serde_json::json;

    use super::*;

    #[test]
    fn agents_come_from_the_agents_output_or_default_to_main() {
        assert_eq!(agents_from_outputs(&json!({})), vec!["main"]);
        assert_eq!(
            agents_from_outputs(&json!({"agents": {"value": ["main", "gpu"], "sensitive": false}})),
            vec!["main", "gpu"]
        );
        assert_eq!(
            agents_from_outputs(&json!({"agents": {"value": [{"name": "dev"}]}})),
            vec!["dev"]
        );
        assert_eq!(
            agents_from_outputs(&json!({"agents": {"value": "solo"}})),
            vec!["solo"]
        );
        assert!(agents_from_outputs(&json!({"agents": {"value": []}})).is_empty());
    }

    #[test]
    fn builtin_variables_win_over_parameters_and_odd_names_are_skipped() {
        let mut job = ProvisionerJob::example();
        job.stage = BuildStage::Claim;
        job.owner_name = "alice".into();
        job.parameters = vec![
            Parameter {
                name: "image".into(),
                value: "debian".into(),
            },
            Parameter {
                name: "owner_name".into(),
                value: "mallory".into(),
            },
            Parameter {
                name: "bad=name".into(),
                value: "x".into(),
            },
        ];
        let vars = variables(&job);
        assert_eq!(vars["image"], "debian");
        assert_eq!(vars["owner_name"], "alice");
        assert_eq!(vars["transition"], "start");
        assert_eq!(vars["stage"], "claim");
        assert_eq!(vars["is_prebuild"], "true");
        assert_eq!(vars["is_prebuild_claim"], "true");
        assert!(!vars.contains_key("bad=name"));
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(n, v)| (OsString::from(n), OsString::from(v)))
            .collect()
    }

    #[test]
    fn terraform_inherits_path_home_tf_variables_and_listed_names_only() {
        let parent = env(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/home/p"),
            ("TF_LOG", "debug"),
            ("TF_PLUGIN_CACHE_DIR", "/cache"),
            ("DATABASE_URL", "postgres://u:secret@db/prebuilds"),
            ("AMQP_URL", "amqp://u:secret@mq"),
            ("DATABASE_URL_FILE", "/run/secrets/db"),
            ("AMQP_URL_FILE", "/run/secrets/amqp"),
            ("PREBUILDS_AMQP_PREFIX", "prebuilds"),
            ("AWS_PROFILE", "dev"),
            ("GOOGLE_APPLICATION_CREDENTIALS", "/gcp.json"),
            ("USER", "prebuilds"),
            // Prefix matches are exact and case-sensitive.
            ("TFX", "no"),
            ("tf_log", "no"),
            ("PATHX", "no"),
        ]);
        let pass = vec!["AWS_PROFILE".to_owned(), "NOT_SET".to_owned()];
        assert_eq!(
            terraform_environment(parent, &pass),
            env(&[
                ("PATH", "/usr/bin"),
                ("HOME", "/home/p"),
                ("TF_LOG", "debug"),
                ("TF_PLUGIN_CACHE_DIR", "/cache"),
                ("AWS_PROFILE", "dev"),
            ])
        );
    }

    #[test]
    fn our_own_settings_never_pass_even_when_listed() {
        let parent = env(&[
            ("DATABASE_URL", "postgres://u:secret@db/prebuilds"),
            ("AMQP_URL_FILE", "/run/secrets/amqp"),
            ("PREBUILDS_SIM_SEED", "1"),
        ]);
        let pass: Vec<String> = ["DATABASE_URL", "AMQP_URL_FILE", "PREBUILDS_SIM_SEED"]
            .map(str::to_owned)
            .to_vec();
        assert!(terraform_environment(parent, &pass).is_empty());
    }

    #[test]
    fn pass_env_names_are_checked() {
        let names = |list: &[&str]| list.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        check_pass_env(&names(&["AWS_PROFILE", "_X1", "a"])).unwrap();
        check_pass_env(&[]).unwrap();
        for bad in ["", "1AWS", "AWS-PROFILE", "A B", "A=B", "É"] {
            let err = check_pass_env(&names(&[bad])).unwrap_err();
            assert!(err.contains("not a variable name"), "{bad:?}: {err}");
        }
        for ours in [
            "DATABASE_URL",
            "AMQP_URL",
            "DATABASE_URL_FILE",
            "AMQP_URL_FILE",
            "PREBUILDS_AMQP_PREFIX",
        ] {
            let err = check_pass_env(&names(&["AWS_PROFILE", ours])).unwrap_err();
            assert!(
                err.contains(ours) && err.contains("own credentials"),
                "{ours}: {err}"
            );
        }
    }

    #[test]
    fn diagnostics_lose_their_box_drawing() {
        assert_eq!(
            clean_diagnostic("│ Error: No value for required variable").as_deref(),
            Some("Error: No value for required variable")
        );
        assert_eq!(clean_diagnostic("╷"), None);
        assert_eq!(clean_diagnostic("│ "), None);
    }
}
