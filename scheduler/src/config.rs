//! Command line and environment of `prebuilds-scheduler` (docs/configuration.md): the shared connection,
//! service and reconciler groups plus the scheduler's own knobs. Everything is validated once at
//! start-up ([`Config::validate`]); nothing is patched at run time.

use std::time::Duration;

use clap::Parser;
use prebuilds_runtime::config::{
    parse_duration, ConnectionArgs, JobTimeoutArgs, ReconcileArgs, ServiceArgs,
};

/// `prebuilds-scheduler` configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "prebuilds-scheduler",
    version,
    about = "Leader-elected scheduler of the prebuilds service.",
    long_about = "Leader-elected scheduler of the prebuilds service.\n\n\
                  Any number of replicas may run; one holds a PostgreSQL advisory lock and leads, the \
                  others wait and take over within a few lock-retry intervals when it dies or loses its \
                  database connection. The leader publishes one `reconcile.preset` job (reason `tick`) \
                  for every preset that needs attention every reconcile interval (nothing while \
                  reconciliation is globally paused), publishes `settings_changed` jobs for every such \
                  preset when it sees the global pause lifted, and exports the pool-state gauges \
                  (coderd_prebuilt_workspaces_*) from a snapshot refreshed every metrics interval. \
                  The leader also reaps provisioner jobs: a running job silent for the hung \
                  timeout, or a pending one not started within the pending timeout, is failed. \
                  And it trims processed message ids, claim requests, job logs of ended jobs and \
                  settled notifications to their retention windows, in bounded batches.",
    after_help = "Durations are written like 500ms, 2s, 1m. Scrape /metrics of the leader for the \
                  pool-state series (a standby exports only prebuilds_scheduler_is_leader and its own \
                  counters); /readyz is true while PostgreSQL and RabbitMQ are reachable.\n\n\
                  Example:\n  \
                  DATABASE_URL=postgres://prebuilds@db/prebuilds AMQP_URL=amqp://mq \\\n  \
                  PREBUILDS_METRICS_ADDR=0.0.0.0:9464 prebuilds-scheduler"
)]
pub struct Config {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub service: ServiceArgs,

    #[command(flatten)]
    pub reconcile: ReconcileArgs,

    #[command(flatten)]
    pub job_timeouts: JobTimeoutArgs,

    /// How often a standby tries to take the leader lock, and how often the leader checks that
    /// its lock connection is still alive. A standby takes over within about twice this after the
    /// leader dies.
    #[arg(long, env = "PREBUILDS_LOCK_RETRY_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub lock_retry_interval: Duration,

    /// How often the leader reads the global pause setting to notice a resume (which triggers a
    /// `settings_changed` reconcile of every preset).
    #[arg(long, env = "PREBUILDS_SETTINGS_POLL_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub settings_poll_interval: Duration,

    /// Reconcile jobs in flight (published, awaiting their broker confirm) during a pass.
    #[arg(long, env = "PREBUILDS_PUBLISH_CONCURRENCY", default_value_t = 256)]
    pub publish_concurrency: usize,

    #[command(flatten)]
    pub retention: RetentionArgs,

    /// Key of the session-level advisory lock that elects the leader. Only replicas sharing a
    /// database and this key compete.
    #[arg(long, env = "PREBUILDS_LEADER_LOCK_KEY", default_value_t = crate::leader::DEFAULT_LOCK_KEY)]
    pub leader_lock_key: i64,
}

impl Config {
    /// Start-up validation of what clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        self.connection.resolve().map_err(|e| e.0)?;
        self.reconcile.validate()?;
        self.job_timeouts.validate()?;
        if self.connection.db_pool_size == 0 {
            return Err("PREBUILDS_DB_POOL_SIZE must be at least 1".into());
        }
        if self.lock_retry_interval < Duration::from_millis(100) {
            return Err("PREBUILDS_LOCK_RETRY_INTERVAL must be at least 100ms".into());
        }
        if self.settings_poll_interval < Duration::from_millis(100) {
            return Err("PREBUILDS_SETTINGS_POLL_INTERVAL must be at least 100ms".into());
        }
        if self.reconcile.reconcile_interval < Duration::from_secs(1) {
            // Tick indexes are whole multiples of the interval in milliseconds; sub-second ticks
            // would only flood the reconcile queue.
            return Err("PREBUILDS_RECONCILE_INTERVAL must be at least 1s".into());
        }
        if !(1..=10_000).contains(&self.publish_concurrency) {
            return Err("PREBUILDS_PUBLISH_CONCURRENCY must be between 1 and 10000".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut argv = vec!["prebuilds-scheduler"];
        argv.extend_from_slice(args);
        Config::try_parse_from(argv).expect("parses")
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]);
        assert_eq!(c.lock_retry_interval, Duration::from_secs(2));
        assert_eq!(c.settings_poll_interval, Duration::from_secs(2));
        assert_eq!(c.reconcile.reconcile_interval, Duration::from_secs(60));
        assert_eq!(c.reconcile.metrics_interval, Duration::from_secs(15));
        c.validate().expect("defaults validate");
    }

    #[test]
    fn rejects_nonsense() {
        assert!(parse(&["--lock-retry-interval", "10ms"])
            .validate()
            .is_err());
        assert!(parse(&["--publish-concurrency", "0"]).validate().is_err());
        assert!(parse(&["--reconcile-interval", "0s"]).validate().is_err());
        assert!(parse(&["--reconcile-interval", "500ms"])
            .validate()
            .is_err());
    }
}

/// How long the tables that grow with traffic keep their rows (`off`: forever); see
/// [`crate::retention`] for what each window guards and what slips past it.
#[derive(Debug, Clone, clap::Args)]
pub struct RetentionArgs {
    /// Ids of applied messages: the idempotency window of every consumer.
    #[arg(long, env = "PREBUILDS_RETENTION_PROCESSED_MESSAGES", default_value = "7d", value_parser = parse_window)]
    pub retention_processed_messages: Window,

    /// Claim requests: a claim retried with the same request id within this gets its first answer.
    #[arg(long, env = "PREBUILDS_RETENTION_CLAIM_REQUESTS", default_value = "30d", value_parser = parse_window)]
    pub retention_claim_requests: Window,

    /// Log lines of provisioner jobs that have ended (an open job keeps all of its lines).
    #[arg(long, env = "PREBUILDS_RETENTION_JOB_LOGS", default_value = "30d", value_parser = parse_window)]
    pub retention_job_logs: Window,

    /// Notifications whose deliveries have all settled, with their delivery records.
    #[arg(long, env = "PREBUILDS_RETENTION_NOTIFICATIONS", default_value = "30d", value_parser = parse_window)]
    pub retention_notifications: Window,

    /// Time between retention passes.
    #[arg(long, env = "PREBUILDS_RETENTION_INTERVAL", default_value = "10m", value_parser = parse_duration)]
    pub retention_interval: Duration,
}

/// A retention window: a duration, or `off` (kept forever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window(pub Option<Duration>);

fn parse_window(s: &str) -> Result<Window, String> {
    if s.trim().eq_ignore_ascii_case("off") {
        return Ok(Window(None));
    }
    let window = parse_duration(s)?;
    // A window shorter than an hour would forget message ids while their redeliveries may still
    // be on their way (and claim replies while clients still retry).
    if window < Duration::from_secs(3600) {
        return Err(format!(
            "{} is shorter than 1h: use a longer window, or off",
            humantime::format_duration(window)
        ));
    }
    Ok(Window(Some(window)))
}

impl RetentionArgs {
    pub fn retention_config(&self) -> crate::retention::RetentionConfig {
        crate::retention::RetentionConfig {
            processed_messages: self.retention_processed_messages.0,
            claim_requests: self.retention_claim_requests.0,
            job_logs: self.retention_job_logs.0,
            notifications: self.retention_notifications.0,
            interval: self.retention_interval,
        }
    }
}
