//! Command-line and environment configuration shared by the binaries (docs/configuration.md). Each binary
//! flattens the groups it needs into its own `clap` parser; values are validated at start-up and
//! URLs carrying passwords are never printed (not by `--help`, not by `Debug`, not in logs).

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use clap::{Args, ValueEnum};

use crate::{
    amqp::{Broker, TlsFiles, Topology, TopologyMode},
    redact::redact,
};

/// Parses `30s`, `1m`, `1h30m`, `250ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (write durations like 30s, 1m, 1h)"))
}

fn parse_prefix(s: &str) -> Result<String, String> {
    let valid = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(s.to_owned())
    } else {
        Err("use 1-64 characters of a-z, 0-9, '-', '_' or '.'".to_owned())
    }
}

/// The database used when neither `DATABASE_URL` nor `DATABASE_URL_FILE` is set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/prebuilds";
/// The broker used when neither `AMQP_URL` nor `AMQP_URL_FILE` is set.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Where the system of record and the broker are, as given on the command line or in the
/// environment. [`ConnectionArgs::resolve`] turns it into a [`Connection`]: secrets read from their
/// files, TLS files checked, URLs validated.
#[derive(Clone, Args)]
pub struct ConnectionArgs {
    /// PostgreSQL connection string: a URL (postgres://user:password@host:5432/db?sslmode=verify-full&sslrootcert=/ca.pem)
    /// or libpq key/value pairs. sslmode: disable, prefer (default), require, verify-ca, verify-full.
    /// Default: postgres://postgres@127.0.0.1:5432/prebuilds
    #[arg(
        long = "database-url",
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    database_url: Option<String>,

    /// File holding the PostgreSQL connection string (a Docker or Kubernetes secret); trailing
    /// newline ignored. Not together with DATABASE_URL.
    #[arg(long, global = true, env = "DATABASE_URL_FILE", value_name = "PATH")]
    database_url_file: Option<PathBuf>,

    /// RabbitMQ URL(s), comma-separated for the nodes of a cluster: amqp://user:password@host:5672/vhost,
    /// or amqps://… for TLS (never downgraded to plaintext).
    /// Default: amqp://guest:guest@127.0.0.1:5672/%2f
    #[arg(
        long = "amqp-url",
        global = true,
        env = "AMQP_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    amqp_url: Option<String>,

    /// File holding the RabbitMQ URL(s) (a Docker or Kubernetes secret); trailing newline ignored.
    /// Not together with AMQP_URL.
    #[arg(long, global = true, env = "AMQP_URL_FILE", value_name = "PATH")]
    amqp_url_file: Option<PathBuf>,

    /// Extra CA certificates (PEM) trusted for amqps:// on top of the system roots.
    #[arg(
        long,
        global = true,
        env = "PREBUILDS_AMQP_CA_FILE",
        value_name = "PATH"
    )]
    amqp_ca_file: Option<PathBuf>,

    /// Client certificate chain (PEM) for brokers that require mutual TLS.
    #[arg(
        long,
        global = true,
        env = "PREBUILDS_AMQP_CLIENT_CERT_FILE",
        value_name = "PATH"
    )]
    amqp_client_cert_file: Option<PathBuf>,

    /// Private key (PEM) of the client certificate.
    #[arg(
        long,
        global = true,
        env = "PREBUILDS_AMQP_CLIENT_KEY_FILE",
        value_name = "PATH"
    )]
    amqp_client_key_file: Option<PathBuf>,

    /// Prefix of every exchange and queue name.
    #[arg(long, global = true, env = "PREBUILDS_AMQP_PREFIX", default_value = "prebuilds", value_parser = parse_prefix)]
    pub amqp_prefix: String,

    /// Declare the whole RabbitMQ topology on every connect (needs the configure permission). With
    /// false, only check with passive declares that the exchanges and queues this process uses
    /// exist (run `prebuildsctl migrate` first): the broker user then needs no configure right.
    #[arg(
        long,
        global = true,
        env = "PREBUILDS_DECLARE_TOPOLOGY",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new(),
        value_name = "BOOL"
    )]
    pub declare_topology: bool,

    /// Replicas of each quorum queue when it is created (`x-quorum-initial-group-size`): the
    /// cluster size (3 for a three-node cluster), so a queue survives the loss of any one node.
    /// Unset: the broker's default. Give every process and `prebuildsctl migrate` the same value.
    #[arg(long, global = true, env = "PREBUILDS_QUORUM_INITIAL_GROUP_SIZE", value_parser = clap::value_parser!(u16).range(1..))]
    pub quorum_initial_group_size: Option<u16>,

    /// Maximum PostgreSQL connections of this process.
    #[arg(
        long,
        global = true,
        env = "PREBUILDS_DB_POOL_SIZE",
        default_value_t = 24
    )]
    pub db_pool_size: usize,
}

impl fmt::Debug for ConnectionArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionArgs")
            .field("database_url", &self.database_url.as_deref().map(redact))
            .field("database_url_file", &self.database_url_file)
            .field("amqp_url", &self.amqp_url.as_deref().map(redact))
            .field("amqp_url_file", &self.amqp_url_file)
            .field("amqp_ca_file", &self.amqp_ca_file)
            .field("amqp_client_cert_file", &self.amqp_client_cert_file)
            .field("amqp_client_key_file", &self.amqp_client_key_file)
            .field("amqp_prefix", &self.amqp_prefix)
            .field("declare_topology", &self.declare_topology)
            .field("db_pool_size", &self.db_pool_size)
            .finish()
    }
}

/// A setting that cannot be used as given (a usage error: exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConnectionArgs {
    /// Arguments for `database_url` and `amqp_url` as if given on the command line (tests, tools).
    pub fn new(
        database_url: impl Into<String>,
        amqp_url: impl Into<String>,
        amqp_prefix: impl Into<String>,
    ) -> Self {
        ConnectionArgs {
            database_url: Some(database_url.into()),
            database_url_file: None,
            amqp_url: Some(amqp_url.into()),
            amqp_url_file: None,
            amqp_ca_file: None,
            amqp_client_cert_file: None,
            amqp_client_key_file: None,
            amqp_prefix: amqp_prefix.into(),
            declare_topology: true,
            quorum_initial_group_size: None,
            db_pool_size: 24,
        }
    }

    /// Whether DATABASE_URL (or its _FILE twin) was given, rather than left at the default.
    pub fn database_url_given(&self) -> bool {
        self.database_url.is_some() || self.database_url_file.is_some()
    }

    /// Reads secrets from their files, checks the TLS files and validates both URLs.
    pub fn resolve(&self) -> Result<Connection, ConfigError> {
        let database_url = secret_value(
            (
                "DATABASE_URL",
                "--database-url",
                self.database_url.as_deref(),
            ),
            (
                "DATABASE_URL_FILE",
                "--database-url-file",
                self.database_url_file.as_deref(),
            ),
        )?
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned());
        crate::db::DatabaseUrl::parse(&database_url).map_err(ConfigError)?;
        let amqp_url = secret_value(
            ("AMQP_URL", "--amqp-url", self.amqp_url.as_deref()),
            (
                "AMQP_URL_FILE",
                "--amqp-url-file",
                self.amqp_url_file.as_deref(),
            ),
        )?
        .unwrap_or_else(|| DEFAULT_AMQP_URL.to_owned());
        let broker = Broker::new(
            &amqp_url,
            &TlsFiles {
                ca_file: self.amqp_ca_file.clone(),
                client_cert_file: self.amqp_client_cert_file.clone(),
                client_key_file: self.amqp_client_key_file.clone(),
            },
        )
        .map_err(|e| ConfigError(e.0))?;
        Ok(Connection {
            database_url: Secret(database_url),
            broker,
            amqp_prefix: self.amqp_prefix.clone(),
            declare_topology: self.declare_topology,
            quorum_initial_group_size: self.quorum_initial_group_size,
            db_pool_size: self.db_pool_size,
        })
    }
}

/// The value of a setting that may come directly or from a file; both at once is an error naming
/// both. `(variable, flag, value)` each.
pub fn secret_value(
    direct: (&str, &str, Option<&str>),
    file: (&str, &str, Option<&Path>),
) -> Result<Option<String>, ConfigError> {
    match (direct.2, file.2) {
        (Some(_), Some(_)) => Err(ConfigError(format!(
            "{} (or {}) and {} (or {}) are both set; set only one of them",
            direct.0, direct.1, file.0, file.1
        ))),
        (Some(value), None) => Ok(Some(value.to_owned())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError(format!("cannot read {} {}: {e}", file.0, path.display()))
            })?;
            let value = text.strip_suffix('\n').unwrap_or(&text);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.trim().is_empty() {
                return Err(ConfigError(format!(
                    "{} {} is empty",
                    file.0,
                    path.display()
                )));
            }
            Ok(Some(value.to_owned()))
        }
        (None, None) => Ok(None),
    }
}

/// A string that is never printed: `Debug` and `Display` show it redacted.
#[derive(Clone)]
pub struct Secret(String);

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl Secret {
    /// The value itself, for the one place that needs it (opening a connection).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.0))
    }
}

/// Where the system of record and the broker are, validated ([`ConnectionArgs::resolve`]).
#[derive(Debug, Clone)]
pub struct Connection {
    /// The PostgreSQL connection string; prints redacted.
    pub database_url: Secret,
    /// The broker nodes and TLS settings every AMQP connection uses.
    pub broker: Broker,
    pub amqp_prefix: String,
    /// Declare the topology on connect (`true`) or only check what is used (`false`).
    pub declare_topology: bool,
    /// Replicas of each quorum queue at creation, when set.
    pub quorum_initial_group_size: Option<u16>,
    pub db_pool_size: usize,
}

impl Connection {
    /// The topology under the configured prefix, in the configured mode.
    pub fn topology(&self) -> Topology {
        Topology::new(self.amqp_prefix.clone())
            .with_mode(if self.declare_topology {
                TopologyMode::Declare
            } else {
                TopologyMode::Check
            })
            .with_quorum_initial_group_size(self.quorum_initial_group_size)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Logging, metrics endpoint and shutdown of a long-running service.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// Address of the `/metrics`, `/healthz` and `/readyz` endpoints (port 0 picks a free port).
    #[arg(long, env = "PREBUILDS_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,

    /// Log format (`json` lines carry the `trace_id` and `span_id` of their span). Spans are
    /// exported over OTLP/HTTP (JSON) only when OTEL_EXPORTER_OTLP_ENDPOINT or
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set and not empty; OTEL_SERVICE_NAME (default: the
    /// binary's name), OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG and OTEL_BSP_SCHEDULE_DELAY are
    /// read too (README "Tracing").
    #[arg(long, env = "PREBUILDS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The whole shutdown budget: from SIGTERM to exit, however many steps the drain has (in-flight
    /// work gets most of it; `/readyz` answers 503 meanwhile). Below Kubernetes' default 30 s
    /// grace period.
    #[arg(long, env = "PREBUILDS_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// How long a consumed message is retried in place after a transient failure before it is
    /// requeued (a requeue spends one of the queue's 5 deliveries). While the database does not
    /// answer, a message whose window ran out is held instead, however long the outage lasts.
    #[arg(long, env = "PREBUILDS_RETRY_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub retry_window: Duration,
}

/// How long a provisioner job may stay silent (docs/reconciliation.md "Provisioner jobs that never finish"). The scheduler's leader
/// reaps by them; a provisioner sends progress at least every quarter of the hung timeout while a
/// job runs, so a live build is never mistaken for a hung one. Give every process the same values.
#[derive(Debug, Clone, Args)]
pub struct JobTimeoutArgs {
    /// A `running` job with no provisioner event for this long is failed (`hung: …`).
    #[arg(long, env = "PREBUILDS_JOB_HUNG_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub job_hung_timeout: Duration,

    /// A `pending` job no provisioner started within this long is failed (`pending: …`).
    #[arg(long, env = "PREBUILDS_JOB_PENDING_TIMEOUT", default_value = "30m", value_parser = parse_duration)]
    pub job_pending_timeout: Duration,
}

impl JobTimeoutArgs {
    pub fn validate(&self) -> Result<(), String> {
        for (flag, value) in [
            ("PREBUILDS_JOB_HUNG_TIMEOUT", self.job_hung_timeout),
            ("PREBUILDS_JOB_PENDING_TIMEOUT", self.job_pending_timeout),
        ] {
            if value < Duration::from_secs(2) {
                return Err(format!(
                    "{flag} is {}; use at least 2s (provisioners report progress every quarter of the hung timeout)",
                    humantime::format_duration(value)
                ));
            }
        }
        Ok(())
    }

    /// How often a running job reports progress: a quarter of the hung timeout.
    pub fn heartbeat_interval(&self) -> Duration {
        self.job_hung_timeout / 4
    }
}

/// The reconciler's rules (docs/reconciliation.md, docs/configuration.md).
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// Period of the scheduler's reconcile pass over every preset.
    #[arg(long, env = "PREBUILDS_RECONCILE_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    #[command(flatten)]
    pub rules: RuleArgs,

    /// Refresh period of the pool-state gauges.
    #[arg(long, env = "PREBUILDS_METRICS_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub metrics_interval: Duration,

    /// Global cap on in-flight prebuild create jobs (0 = unlimited). Deletes, cancels and claim
    /// builds are never held back.
    #[arg(long, env = "PREBUILDS_MAX_INFLIGHT_JOBS", default_value_t = 0)]
    pub max_inflight_jobs: u32,

    /// Per-preset cap on in-flight prebuild create jobs (0 = unlimited).
    #[arg(long, env = "PREBUILDS_MAX_INFLIGHT_PER_PRESET", default_value_t = 0)]
    pub max_inflight_per_preset: u32,

    /// Most prebuild creates one reconcile transaction makes (0 = unlimited). A preset that wants
    /// more is re-queued at once and fills over several short passes instead of one long
    /// transaction holding its lock.
    #[arg(long, env = "PREBUILDS_MAX_CREATES_PER_PASS", default_value_t = 50)]
    pub max_creates_per_pass: u32,

    /// Delete failed prebuilds older than this, beyond the newest PREBUILDS_FAILED_KEEP per preset
    /// (unset = never: failed prebuilds are kept for investigation).
    #[arg(long, env = "PREBUILDS_FAILED_RETENTION", value_parser = parse_duration)]
    pub failed_retention: Option<Duration>,

    /// Newest failed prebuilds per preset always kept as evidence.
    #[arg(long, env = "PREBUILDS_FAILED_KEEP", default_value_t = 3)]
    pub failed_keep: u32,
}

impl ReconcileArgs {
    /// Start-up validation of relations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.reconcile_interval.is_zero() {
            return Err("PREBUILDS_RECONCILE_INTERVAL must be greater than 0".into());
        }
        if self.metrics_interval.is_zero() {
            return Err("PREBUILDS_METRICS_INTERVAL must be greater than 0".into());
        }
        self.rules.validate()
    }
}

/// The rules that decide a preset's state — backoff after failures and the hard limit — as one
/// group: the workers act on them and `prebuildsctl status` reports what they decide, so both
/// read the same variables with the same defaults from here.
#[derive(Debug, Clone, Args)]
pub struct RuleArgs {
    /// Backoff per failed prebuild build.
    #[arg(long, env = "PREBUILDS_BACKOFF_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub backoff_interval: Duration,

    /// Window in which failed builds count toward backoff.
    #[arg(long, env = "PREBUILDS_BACKOFF_LOOKBACK", default_value = "1h", value_parser = parse_duration)]
    pub backoff_lookback: Duration,

    /// Consecutive failed builds that hard-limit a preset (0 disables).
    #[arg(long, env = "PREBUILDS_FAILURE_HARD_LIMIT", default_value_t = 3)]
    pub failure_hard_limit: u32,

    /// Wait before a hard-limited preset gets one probe create (half-open circuit breaker).
    #[arg(long, env = "PREBUILDS_HARD_LIMIT_COOLDOWN", default_value = "30m", value_parser = parse_duration)]
    pub hard_limit_cooldown: Duration,

    /// The cooldown doubles after each failed probe, up to this.
    #[arg(long, env = "PREBUILDS_HARD_LIMIT_COOLDOWN_MAX", default_value = "4h", value_parser = parse_duration)]
    pub hard_limit_cooldown_max: Duration,

    /// Length of one "minute" of the autoscaling demand windows (`claims_5m` counts the last 5
    /// of them). Leave it at 1m; tests shorten it to watch windows pass in seconds.
    #[arg(long, env = "PREBUILDS_DEMAND_TIME_UNIT", default_value = "1m", value_parser = parse_duration)]
    pub demand_time_unit: Duration,
}

impl RuleArgs {
    /// Relations clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.demand_time_unit < Duration::from_millis(1) {
            return Err("PREBUILDS_DEMAND_TIME_UNIT must be at least 1ms".into());
        }
        if self.backoff_lookback < self.backoff_interval {
            return Err(format!(
                "PREBUILDS_BACKOFF_LOOKBACK ({:?}) must be at least PREBUILDS_BACKOFF_INTERVAL ({:?})",
                self.backoff_lookback, self.backoff_interval
            ));
        }
        if self.hard_limit_cooldown.is_zero() {
            return Err("PREBUILDS_HARD_LIMIT_COOLDOWN must be greater than 0".into());
        }
        if self.hard_limit_cooldown_max < self.hard_limit_cooldown {
            return Err(format!(
                "PREBUILDS_HARD_LIMIT_COOLDOWN_MAX ({:?}) must be at least PREBUILDS_HARD_LIMIT_COOLDOWN ({:?})",
                self.hard_limit_cooldown_max, self.hard_limit_cooldown
            ));
        }
        Ok(())
    }

    /// `config` with these rules in it (durations too large for the core saturate).
    pub fn apply(
        &self,
        config: prebuilds_core::ReconcileConfig,
    ) -> prebuilds_core::ReconcileConfig {
        prebuilds_core::ReconcileConfig {
            backoff_interval: time_delta(self.backoff_interval),
            backoff_lookback: time_delta(self.backoff_lookback),
            failure_hard_limit: self.failure_hard_limit,
            hard_limit_cooldown: time_delta(self.hard_limit_cooldown),
            hard_limit_cooldown_max: time_delta(self.hard_limit_cooldown_max),
            ..config
        }
    }
}

/// A configured duration as the core's time delta (saturating: no configuration is that long).
pub fn time_delta(d: Duration) -> chrono::TimeDelta {
    chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(database_url: Option<&str>, database_url_file: Option<&Path>) -> ConnectionArgs {
        ConnectionArgs {
            database_url: database_url.map(str::to_owned),
            database_url_file: database_url_file.map(Path::to_path_buf),
            ..ConnectionArgs::new("x", DEFAULT_AMQP_URL, "p")
        }
    }

    #[test]
    fn secrets_come_from_files_without_their_trailing_newline() {
        let dir = std::env::temp_dir().join(format!("prebuilds-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("db");
        std::fs::write(&file, "postgres://u:pw@h/db\n").unwrap();
        let resolved = args(None, Some(&file)).resolve().unwrap();
        assert_eq!(resolved.database_url.expose(), "postgres://u:pw@h/db");
        assert_eq!(
            format!("{resolved:?}").matches("pw").count(),
            0,
            "{resolved:?}"
        );

        let both = args(Some("postgres://h/db"), Some(&file))
            .resolve()
            .unwrap_err();
        assert!(
            both.0.contains("DATABASE_URL") && both.0.contains("DATABASE_URL_FILE"),
            "{both}"
        );

        let missing = args(None, Some(&dir.join("absent"))).resolve().unwrap_err();
        assert!(missing.0.contains("DATABASE_URL_FILE"), "{missing}");

        std::fs::write(&file, "\n").unwrap();
        assert!(args(None, Some(&file))
            .resolve()
            .unwrap_err()
            .0
            .contains("empty"));
        let _ = std::fs::remove_dir_all(&dir);

        let defaulted = args(None, None).resolve().unwrap();
        assert_eq!(defaulted.database_url.expose(), DEFAULT_DATABASE_URL);
    }

    #[test]
    fn the_topology_is_declared_unless_told_otherwise() {
        use clap::Parser;
        #[derive(Debug, Parser)]
        struct Cli {
            #[command(flatten)]
            connection: ConnectionArgs,
        }
        let mode = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
            cli.connection.resolve().unwrap().topology().mode()
        };
        // Flags only: the environment of a test process is shared.
        assert_eq!(
            mode(&["--amqp-url", DEFAULT_AMQP_URL]),
            TopologyMode::Declare
        );
        for off in ["false", "no", "0", "off"] {
            assert_eq!(
                mode(&[
                    "--amqp-url",
                    DEFAULT_AMQP_URL,
                    &format!("--declare-topology={off}")
                ]),
                TopologyMode::Check,
                "{off}"
            );
        }
        assert!(Cli::try_parse_from(["x", "--declare-topology=maybe"]).is_err());
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact("postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
        assert_eq!(redact("not a url"), "not a url");
        assert_eq!(
            redact("postgres://u:p%40ss@h/db?x=@"),
            "postgres://u:***@h/db?x=@"
        );
    }

    #[test]
    fn durations_parse_like_the_spec_writes_them() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("soon").unwrap_err().contains("30s"));
    }

    #[test]
    fn prefixes_are_restricted_to_safe_names() {
        assert!(parse_prefix("prebuilds").is_ok());
        assert!(parse_prefix("t-1.a_b").is_ok());
        assert!(parse_prefix("").is_err());
        assert!(parse_prefix("UPPER").is_err());
        assert!(parse_prefix("a b").is_err());
    }
}
