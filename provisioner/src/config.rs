//! Command line and environment of `prebuilds-provisioner` (docs/configuration.md): the shared connection and
//! service groups, the pool size, the backend choice and each backend's knobs. Every flag has an
//! environment variable; relations clap cannot express (rates within 0..=1, min ≤ max, the names
//! of `--terraform-pass-env`) are checked by [`Cli::validate`] before anything starts, with
//! messages that say what to change.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, ValueEnum};
use prebuilds_runtime::config::{
    parse_duration, secret_value, ConnectionArgs, JobTimeoutArgs, Secret, ServiceArgs,
};
use prebuilds_schemas::Lane;
use uuid::Uuid;

use crate::{
    sim::SimConfig,
    terraform::{check_pass_env, TerraformConfig},
    terraform_state::{check_schema, default_schema, StateConfig, StateKind},
};

const ABOUT: &str = "Executes prebuilds provisioner jobs and publishes provisioner events.";

const LONG_ABOUT: &str = "\
Executes prebuilds provisioner jobs and publishes provisioner events.

Consumes `<prefix>.provisioner-jobs-user` (builds a user waits for, with its own --user-concurrency)
and `<prefix>.provisioner-jobs` (prebuild fill and drain), both prebuilds.provisioner.job.v1; --lanes
picks one or both. For each job it publishes to
the `<prefix>` topic exchange, with publisher confirms and in this order: job_started, job_log
batches, plan_result (start builds), job_completed and, for a successful start build, the agents'
lifecycle `starting` then `ready`. A job is acknowledged only after all its events are confirmed.
Event ids are derived from (job id, event kind, sequence number), so a redelivered job republishes
the same ids and consumers deduplicate them.

Backends:
  sim        simulated builds: random duration, failure and resource-replacement rates, derived
             from --sim-seed and the job id (the same job always gets the same outcome)
  terraform  runs the real `terraform` CLI (init, plan, show -json, apply / destroy) on the template
             version's `source`, in one working directory per workspace, with the state in
             PostgreSQL (--terraform-state pg, the default: any replica resumes any job) or in the
             working directory (--terraform-state local)";

/// Which executor runs the builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Simulated builds (no infrastructure); for local runs, tests and benchmarks.
    Sim,
    /// The real `terraform` CLI on the template version's source.
    Terraform,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Sim => "sim",
            BackendKind::Terraform => "terraform",
        }
    }
}

#[derive(Debug, Parser)]
#[command(name = "prebuilds-provisioner", version, about = ABOUT, long_about = LONG_ABOUT)]
pub struct Cli {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub service: ServiceArgs,

    /// Prebuild-lane jobs (fill and drain) executed at once by this process (the AMQP prefetch of
    /// `<prefix>.provisioner-jobs`).
    #[arg(long, env = "PREBUILDS_PROVISIONER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: u16,

    /// User-lane jobs (builds a user waits for: claim builds, builds of users' workspaces)
    /// executed at once, on top of --concurrency: the prefetch of
    /// `<prefix>.provisioner-jobs-user`. A user's build never waits for a prebuild slot.
    #[arg(
        long,
        env = "PREBUILDS_PROVISIONER_USER_CONCURRENCY",
        default_value_t = 4
    )]
    pub user_concurrency: u16,

    /// Lanes this process serves, comma-separated: `user` (<prefix>.provisioner-jobs-user),
    /// `prebuild` (<prefix>.provisioner-jobs). Run dedicated pools with `--lanes user` and
    /// `--lanes prebuild` (Coder's `is_prebuild` provisioner tag).
    #[arg(
        long,
        env = "PREBUILDS_PROVISIONER_LANES",
        value_delimiter = ',',
        default_value = "user,prebuild",
        value_parser = parse_lane
    )]
    pub lanes: Vec<Lane>,

    #[command(flatten)]
    pub job_timeouts: JobTimeoutArgs,

    /// Longest a job's build may run in all (every terraform command of it together): it is then
    /// interrupted (terraform gets SIGINT, then SIGKILL) and the job fails with `timeout: …`.
    #[arg(long, env = "PREBUILDS_JOB_MAX_DURATION", default_value = "2h", value_parser = parse_duration)]
    pub job_max_duration: Duration,

    /// Build executor.
    #[arg(long, env = "PREBUILDS_PROVISIONER_BACKEND", value_enum, default_value_t = BackendKind::Sim)]
    pub backend: BackendKind,

    /// Completed jobs remembered in memory: a redelivered job among them republishes its recorded
    /// events instead of running again.
    #[arg(
        long,
        env = "PREBUILDS_PROVISIONER_REMEMBERED_JOBS",
        default_value_t = 1000
    )]
    pub remembered_jobs: usize,

    #[command(flatten, next_help_heading = "Simulated backend (--backend sim)")]
    pub sim: SimArgs,

    #[command(flatten, next_help_heading = "Terraform backend (--backend terraform)")]
    pub terraform: TerraformArgs,
}

fn parse_lane(s: &str) -> Result<Lane, String> {
    s.trim().parse()
}

/// A duration flag that also accepts a bare `0`.
fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Shortest simulated build (durations are uniform in [min, max]; `0` is allowed).
    #[arg(long, env = "PREBUILDS_SIM_DURATION_MIN", default_value = "200ms", value_parser = parse_duration_or_zero)]
    pub sim_duration_min: Duration,

    /// Longest simulated build.
    #[arg(long, env = "PREBUILDS_SIM_DURATION_MAX", default_value = "2s", value_parser = parse_duration_or_zero)]
    pub sim_duration_max: Duration,

    /// Probability (0.0..=1.0) that a start build fails.
    #[arg(long, env = "PREBUILDS_SIM_FAILURE_RATE", default_value_t = 0.0)]
    pub sim_failure_rate: f64,

    /// Probability (0.0..=1.0) that a claim build (stage `claim`) reports one or two replaced
    /// resources in its plan_result.
    #[arg(long, env = "PREBUILDS_SIM_REPLACEMENT_RATE", default_value_t = 0.0)]
    pub sim_replacement_rate: f64,

    /// Delay between an agent's `starting` and `ready` lifecycle events.
    #[arg(long, env = "PREBUILDS_SIM_AGENT_READY_DELAY", default_value = "500ms", value_parser = parse_duration_or_zero)]
    pub sim_agent_ready_delay: Duration,

    /// Seed of the simulation; a job's outcome is a function of the seed and its job id.
    #[arg(long, env = "PREBUILDS_SIM_SEED", default_value_t = 0)]
    pub sim_seed: u64,

    /// Presets whose start builds always fail (comma-separated preset ids), e.g. to drive backoff
    /// and hard limits in tests.
    #[arg(long, env = "PREBUILDS_SIM_FAIL_PRESETS", value_delimiter = ',')]
    pub sim_fail_presets: Vec<Uuid>,
}

#[derive(Debug, Clone, Args)]
pub struct TerraformArgs {
    /// The `terraform` executable (a name looked up in PATH, or a path).
    #[arg(long, env = "PREBUILDS_TERRAFORM_BINARY", default_value = "terraform")]
    pub terraform_binary: PathBuf,

    /// Directory holding one working directory (with its Terraform state) per workspace
    /// [default: <system temp dir>/prebuilds-terraform].
    #[arg(long, env = "PREBUILDS_TERRAFORM_WORKDIR")]
    pub terraform_workdir: Option<PathBuf>,

    /// Bound of every single terraform invocation (init, plan, apply, destroy, ...).
    #[arg(long, env = "PREBUILDS_TERRAFORM_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub terraform_timeout: Duration,

    /// Variables of this process's environment that terraform (and what templates run through
    /// it) may read, comma-separated, e.g. `AWS_PROFILE,GOOGLE_APPLICATION_CREDENTIALS` or
    /// `HTTPS_PROXY`. Terraform otherwise starts with an empty environment plus `PATH`, `HOME`
    /// and every `TF_*` variable. Our own credentials (DATABASE_URL, AMQP_URL, their _FILE forms,
    /// PREBUILDS_*) are refused.
    #[arg(
        long,
        env = "PREBUILDS_TERRAFORM_PASS_ENV",
        value_delimiter = ',',
        value_name = "NAMES"
    )]
    pub terraform_pass_env: Vec<String>,

    /// Where Terraform state is kept: `pg` (terraform's pg backend in PostgreSQL, shared by every
    /// replica, so any replica can resume any job and two never apply one workspace at once) or
    /// `local` (terraform.tfstate in this replica's working directory: one replica only).
    #[arg(long, env = "PREBUILDS_TERRAFORM_STATE", value_enum, default_value_t = StateKind::Pg)]
    pub terraform_state: StateKind,

    /// PostgreSQL connection string of the state store (`--terraform-state pg`), handed to
    /// terraform and so readable by templates: use a role that may only use the state schema
    /// (deploy/postgres/roles.sql: <prefix>terraform_state), never the provisioner's DATABASE_URL.
    #[arg(
        long,
        env = "PREBUILDS_TERRAFORM_STATE_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        value_parser = parse_secret
    )]
    pub terraform_state_database_url: Option<Secret>,

    /// File holding the state store's connection string (a Docker or Kubernetes secret); not
    /// together with PREBUILDS_TERRAFORM_STATE_DATABASE_URL.
    #[arg(
        long,
        env = "PREBUILDS_TERRAFORM_STATE_DATABASE_URL_FILE",
        value_name = "PATH"
    )]
    pub terraform_state_database_url_file: Option<PathBuf>,

    /// Schema of the state table (one per deployment sharing a database)
    /// [default: <AMQP prefix>_terraform_state].
    #[arg(long, env = "PREBUILDS_TERRAFORM_STATE_SCHEMA", value_name = "SCHEMA")]
    pub terraform_state_schema: Option<String>,
}

fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::from(s.to_owned()))
}

impl Cli {
    /// Start-up validation of what the parser cannot check.
    pub fn validate(&self) -> Result<(), String> {
        self.connection.resolve().map_err(|e| e.0)?;
        if self.lanes.contains(&Lane::Prebuild) && self.concurrency == 0 {
            return Err(
                "--concurrency (PREBUILDS_PROVISIONER_CONCURRENCY) must be at least 1".into(),
            );
        }
        if self.lanes.is_empty() {
            return Err(
                "--lanes (PREBUILDS_PROVISIONER_LANES) names no lane: use user, prebuild or both"
                    .into(),
            );
        }
        if self.lanes.contains(&Lane::User) && self.user_concurrency == 0 {
            return Err(
                "--user-concurrency (PREBUILDS_PROVISIONER_USER_CONCURRENCY) must be at least 1 \
                 while this process serves the user lane"
                    .into(),
            );
        }
        self.job_timeouts.validate()?;
        if self.job_max_duration < Duration::from_secs(1) {
            return Err(
                "--job-max-duration (PREBUILDS_JOB_MAX_DURATION) must be at least 1s".into(),
            );
        }
        if self.remembered_jobs == 0 {
            return Err(
                "--remembered-jobs (PREBUILDS_PROVISIONER_REMEMBERED_JOBS) must be at least 1"
                    .into(),
            );
        }
        check_rate(
            "--sim-failure-rate (PREBUILDS_SIM_FAILURE_RATE)",
            self.sim.sim_failure_rate,
        )?;
        check_rate(
            "--sim-replacement-rate (PREBUILDS_SIM_REPLACEMENT_RATE)",
            self.sim.sim_replacement_rate,
        )?;
        if self.sim.sim_duration_min > self.sim.sim_duration_max {
            return Err(format!(
                "--sim-duration-min ({:?}) must not exceed --sim-duration-max ({:?}); raise the \
                 maximum or lower the minimum",
                self.sim.sim_duration_min, self.sim.sim_duration_max
            ));
        }
        if self.terraform.terraform_timeout.is_zero() {
            return Err(
                "--terraform-timeout (PREBUILDS_TERRAFORM_TIMEOUT) must be greater than 0".into(),
            );
        }
        check_pass_env(self.terraform_pass_env())?;
        if self.backend == BackendKind::Terraform {
            self.terraform_state()?;
        }
        Ok(())
    }

    /// The terraform backend's state store, checked: `pg` needs its own connection string (not
    /// the provisioner's DATABASE_URL, which templates must never see) and a valid schema name.
    pub fn terraform_state(&self) -> Result<StateConfig, String> {
        let args = &self.terraform;
        let url = secret_value(
            (
                "PREBUILDS_TERRAFORM_STATE_DATABASE_URL",
                "--terraform-state-database-url",
                args.terraform_state_database_url
                    .as_ref()
                    .map(Secret::expose),
            ),
            (
                "PREBUILDS_TERRAFORM_STATE_DATABASE_URL_FILE",
                "--terraform-state-database-url-file",
                args.terraform_state_database_url_file.as_deref(),
            ),
        )
        .map_err(|e| e.0)?
        .map(Secret::from);
        if args.terraform_state == StateKind::Local {
            return Ok(StateConfig::Local);
        }
        let Some(url) = url else {
            return Err(
                "--backend terraform keeps Terraform state in PostgreSQL by default \
                 (--terraform-state pg): set PREBUILDS_TERRAFORM_STATE_DATABASE_URL (or its \
                 _FILE twin) to a role that may only use the state schema (README, \"Terraform \
                 state\"), or set PREBUILDS_TERRAFORM_STATE=local for a single replica with a \
                 persistent --terraform-workdir"
                    .into(),
            );
        };
        let connection = self.connection.resolve().map_err(|e| e.0)?;
        if url.expose().trim() == connection.database_url.expose().trim() {
            return Err(
                "PREBUILDS_TERRAFORM_STATE_DATABASE_URL is the provisioner's own \
                 DATABASE_URL: terraform and every template it runs can read the state \
                 connection string, so give it a role of its own that may only use the state \
                 schema (deploy/postgres/roles.sql creates <prefix>terraform_state)"
                    .into(),
            );
        }
        prebuilds_runtime::db::DatabaseUrl::parse(url.expose()).map_err(|e| {
            format!("PREBUILDS_TERRAFORM_STATE_DATABASE_URL ({url}) is not usable: {e}")
        })?;
        let schema = args
            .terraform_state_schema
            .clone()
            .unwrap_or_else(|| default_schema(&connection.amqp_prefix));
        check_schema(&schema)?;
        Ok(StateConfig::Pg { url, schema })
    }

    pub fn sim_config(&self) -> SimConfig {
        SimConfig {
            duration_min: self.sim.sim_duration_min,
            duration_max: self.sim.sim_duration_max,
            failure_rate: self.sim.sim_failure_rate,
            replacement_rate: self.sim.sim_replacement_rate,
            agent_ready_delay: self.sim.sim_agent_ready_delay,
            seed: self.sim.sim_seed,
            fail_presets: self.sim.sim_fail_presets.clone(),
        }
    }

    /// The names of `--terraform-pass-env`; an empty value (`PREBUILDS_TERRAFORM_PASS_ENV=`, as
    /// deployment files often leave an unused variable) lists none rather than one empty name.
    fn terraform_pass_env(&self) -> &[String] {
        match self.terraform.terraform_pass_env.as_slice() {
            [only] if only.is_empty() => &[],
            names => names,
        }
    }

    pub fn terraform_config(&self) -> Result<TerraformConfig, String> {
        Ok(TerraformConfig {
            binary: self.terraform.terraform_binary.clone(),
            workdir: self
                .terraform
                .terraform_workdir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("prebuilds-terraform")),
            timeout: self.terraform.terraform_timeout,
            pass_env: self.terraform_pass_env().to_vec(),
            state: self.terraform_state()?,
        })
    }
}

fn check_rate(flag: &str, value: f64) -> Result<(), String> {
    if value.is_finite() && (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{flag} is {value}; use a probability between 0.0 and 1.0"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        let mut argv = vec!["prebuilds-provisioner"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("parses")
    }

    #[test]
    fn defaults_are_valid() {
        let cli = parse(&[]);
        cli.validate().unwrap();
        assert_eq!(cli.backend, BackendKind::Sim);
        assert_eq!(cli.terraform.terraform_timeout, Duration::from_secs(600));
    }

    #[test]
    fn zero_durations_are_accepted() {
        let cli = parse(&[
            "--sim-duration-min",
            "0",
            "--sim-duration-max",
            "0s",
            "--sim-agent-ready-delay",
            "0ms",
        ]);
        cli.validate().unwrap();
        assert_eq!(cli.sim_config().duration_max, Duration::ZERO);
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused_with_the_flag_name() {
        let err = parse(&["--sim-failure-rate", "1.5"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--sim-failure-rate"), "{err}");
        let err = parse(&["--sim-replacement-rate=-0.1"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--sim-replacement-rate"), "{err}");
        let err = parse(&["--sim-failure-rate", "NaN"])
            .validate()
            .unwrap_err();
        assert!(err.contains("between 0.0 and 1.0"), "{err}");
    }

    #[test]
    fn min_above_max_is_refused() {
        let err = parse(&["--sim-duration-min", "3s", "--sim-duration-max", "1s"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--sim-duration-min"), "{err}");
    }

    #[test]
    fn terraform_pass_env_is_a_checked_comma_separated_list() {
        let cli = parse(&[
            "--terraform-state=local",
            "--terraform-pass-env",
            "AWS_PROFILE,GOOGLE_APPLICATION_CREDENTIALS",
        ]);
        cli.validate().unwrap();
        assert_eq!(
            cli.terraform_config().unwrap().pass_env,
            ["AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS"]
        );
        let local = ["--terraform-state=local"];
        assert!(parse(&local)
            .terraform_config()
            .unwrap()
            .pass_env
            .is_empty());
        let empty = parse(&["--terraform-state=local", "--terraform-pass-env="]);
        empty.validate().unwrap();
        assert!(empty.terraform_config().unwrap().pass_env.is_empty());
        let err = parse(&["--terraform-pass-env", "AWS_PROFILE,AMQP_URL"])
            .validate()
            .unwrap_err();
        assert!(
            err.contains("--terraform-pass-env") && err.contains("AMQP_URL"),
            "{err}"
        );
        let err = parse(&["--terraform-pass-env", "PREBUILDS_AMQP_PREFIX"])
            .validate()
            .unwrap_err();
        assert!(err.contains("PREBUILDS_AMQP_PREFIX"), "{err}");
        let err = parse(&["--terraform-pass-env", "AWS_PROFILE,,X"])
            .validate()
            .unwrap_err();
        assert!(err.contains("not a variable name"), "{err}");
    }

    #[test]
    fn pg_state_needs_its_own_connection_string_and_a_valid_schema() {
        let terraform = ["--backend", "terraform"];
        let err = parse(&terraform).validate().unwrap_err();
        assert!(
            err.contains("PREBUILDS_TERRAFORM_STATE_DATABASE_URL")
                && err.contains("PREBUILDS_TERRAFORM_STATE=local"),
            "{err}"
        );
        // The sim backend keeps no Terraform state: nothing to configure.
        parse(&[]).validate().unwrap();
        parse(&["--backend", "terraform", "--terraform-state", "local"])
            .validate()
            .unwrap();

        let state_url = "postgres://tfstate:s3cret@db/prebuilds";
        let cli = parse(&[
            "--backend",
            "terraform",
            "--database-url",
            "postgres://provisioner:other@db/prebuilds",
            "--amqp-prefix",
            "team-a.prod",
            "--terraform-state-database-url",
            state_url,
        ]);
        cli.validate().unwrap();
        let StateConfig::Pg { url, schema } = cli.terraform_state().unwrap() else {
            panic!("pg is the default");
        };
        assert_eq!(url.expose(), state_url);
        assert_eq!(schema, "team_a_prod_terraform_state");
        assert!(!format!("{cli:?}").contains("s3cret"), "{cli:?}");

        // Templates can read the state URL: it may not be the provisioner's own.
        let own = "postgres://provisioner:pw@db/prebuilds";
        let err = parse(&[
            "--backend",
            "terraform",
            "--database-url",
            own,
            "--terraform-state-database-url",
            own,
        ])
        .validate()
        .unwrap_err();
        assert!(err.contains("own DATABASE_URL"), "{err}");
        assert!(!err.contains("pw@"), "{err}");

        let err = parse(&[
            "--backend",
            "terraform",
            "--terraform-state-database-url",
            state_url,
            "--terraform-state-schema",
            "Bad-Name",
        ])
        .validate()
        .unwrap_err();
        assert!(err.contains("--terraform-state-schema"), "{err}");
    }

    #[test]
    fn lanes_default_to_both_and_parse_from_a_list() {
        assert_eq!(parse(&[]).lanes, [Lane::User, Lane::Prebuild]);
        let user_only = parse(&["--lanes", "user"]);
        user_only.validate().unwrap();
        assert_eq!(user_only.lanes, [Lane::User]);
        let argv = ["prebuilds-provisioner", "--lanes", "user,builds"];
        let err = Cli::try_parse_from(argv).unwrap_err().to_string();
        assert!(err.contains("unknown lane \"builds\""), "{err}");
        let err = parse(&["--lanes", "user", "--user-concurrency", "0"])
            .validate()
            .unwrap_err();
        assert!(err.contains("--user-concurrency"), "{err}");
        // A dedicated user-lane pool needs no prebuild slots.
        parse(&["--lanes", "user", "--concurrency", "0"])
            .validate()
            .unwrap();
    }

    #[test]
    fn fail_presets_are_comma_separated() {
        let a = Uuid::new_v4();
        let b = Uuid::new_v4();
        let cli = parse(&["--sim-fail-presets", &format!("{a},{b}")]);
        assert_eq!(cli.sim.sim_fail_presets, vec![a, b]);
    }
}
