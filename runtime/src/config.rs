//! Command-line and environment configuration shared by the binaries (SPEC.md §6). Each binary
//! flattens the groups it needs into its own `clap` parser; values are validated at start-up and
//! URLs carrying passwords are never printed (not by `--help`, not by `Debug`, not in logs).

use std::{fmt, net::SocketAddr, time::Duration};

use clap::{Args, ValueEnum};

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

/// Where the system of record and the broker are.
#[derive(Clone, Args)]
pub struct ConnectionArgs {
    /// PostgreSQL connection URL.
    #[arg(
        long,
        global = true,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/prebuilds"
    )]
    pub database_url: String,

    /// RabbitMQ connection URL.
    #[arg(
        long,
        global = true,
        env = "AMQP_URL",
        hide_env_values = true,
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,

    /// Prefix of every exchange and queue name.
    #[arg(long, global = true, env = "PREBUILDS_AMQP_PREFIX", default_value = "prebuilds", value_parser = parse_prefix)]
    pub amqp_prefix: String,

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
            .field("database_url", &redact_url(&self.database_url))
            .field("amqp_url", &redact_url(&self.amqp_url))
            .field("amqp_prefix", &self.amqp_prefix)
            .field("db_pool_size", &self.db_pool_size)
            .finish()
    }
}

/// Replaces the password of `scheme://user:password@host…` with `***`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &authority[..at];
    let Some(colon) = userinfo.find(':') else {
        return url.to_owned();
    };
    format!(
        "{}://{}:***{}",
        &url[..scheme_end],
        &userinfo[..colon],
        &rest[at..]
    )
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

    /// Log format.
    #[arg(long, env = "PREBUILDS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How long SIGTERM waits for in-flight work before exiting anyway.
    #[arg(long, env = "PREBUILDS_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

/// The reconciler's rules (SPEC.md §2, §6).
#[derive(Debug, Clone, Args)]
pub struct ReconcileArgs {
    /// Period of the scheduler's reconcile pass over every preset.
    #[arg(long, env = "PREBUILDS_RECONCILE_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub reconcile_interval: Duration,

    /// Backoff per failed prebuild build.
    #[arg(long, env = "PREBUILDS_BACKOFF_INTERVAL", default_value = "1m", value_parser = parse_duration)]
    pub backoff_interval: Duration,

    /// Window in which failed builds count toward backoff.
    #[arg(long, env = "PREBUILDS_BACKOFF_LOOKBACK", default_value = "1h", value_parser = parse_duration)]
    pub backoff_lookback: Duration,

    /// Consecutive failed builds that hard-limit a preset (0 disables).
    #[arg(long, env = "PREBUILDS_FAILURE_HARD_LIMIT", default_value_t = 3)]
    pub failure_hard_limit: u32,

    /// Refresh period of the pool-state gauges.
    #[arg(long, env = "PREBUILDS_METRICS_INTERVAL", default_value = "15s", value_parser = parse_duration)]
    pub metrics_interval: Duration,

    /// Wait before a hard-limited preset gets one probe create (half-open circuit breaker).
    #[arg(long, env = "PREBUILDS_HARD_LIMIT_COOLDOWN", default_value = "30m", value_parser = parse_duration)]
    pub hard_limit_cooldown: Duration,

    /// The cooldown doubles after each failed probe, up to this.
    #[arg(long, env = "PREBUILDS_HARD_LIMIT_COOLDOWN_MAX", default_value = "4h", value_parser = parse_duration)]
    pub hard_limit_cooldown_max: Duration,

    /// Global cap on in-flight prebuild create jobs (0 = unlimited). Deletes, cancels and claim
    /// builds are never held back.
    #[arg(long, env = "PREBUILDS_MAX_INFLIGHT_JOBS", default_value_t = 0)]
    pub max_inflight_jobs: u32,

    /// Per-preset cap on in-flight prebuild create jobs (0 = unlimited).
    #[arg(long, env = "PREBUILDS_MAX_INFLIGHT_PER_PRESET", default_value_t = 0)]
    pub max_inflight_per_preset: u32,

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1/db"),
            "postgres://postgres@127.0.0.1/db"
        );
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("postgres://u:p%40ss@h/db?x=@"),
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
