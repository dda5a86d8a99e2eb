//! `prebuilds-api`'s configuration: flags with matching environment variables, validated at
//! start-up (a bad value is a usage error, exit code 2).

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use prebuilds_runtime::config::{parse_duration, ConnectionArgs, RuleArgs, ServiceArgs};

#[derive(Debug, Parser)]
#[command(
    name = "prebuilds-api",
    version,
    about = "The HTTP API of prebuilds: claims, pools, templates, jobs, pause and invalidate, \
             behind bearer tokens (`prebuildsctl token create`).",
    after_help = "Stateless: run as many replicas as you like behind a load balancer. \
                  GET /openapi.json describes every endpoint.\n\n\
                  Example:\n  PREBUILDS_API_ADDR=0.0.0.0:8080 prebuilds-api"
)]
pub struct ApiArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,

    #[command(flatten)]
    pub service: ServiceArgs,

    /// Address the API listens on (port 0 picks a free port).
    #[arg(long, env = "PREBUILDS_API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,

    /// Longest a request may take, reading its body included; then it is answered 503.
    #[arg(long, env = "PREBUILDS_API_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Largest request body accepted (bytes); a larger one is answered 413.
    #[arg(long, env = "PREBUILDS_API_MAX_BODY_BYTES", default_value_t = 65_536)]
    pub max_body_bytes: usize,

    /// How long a claim waits for the worker's reply before answering 504 (retry with the same
    /// Idempotency-Key to get the outcome).
    #[arg(long, env = "PREBUILDS_API_CLAIM_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub claim_timeout: Duration,

    /// How long a change waits for a lock another writer holds before answering 503.
    #[arg(long, env = "PREBUILDS_API_LOCK_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub lock_timeout: Duration,

    /// The reconciler's tunables that the preset rows are computed with (same as the workers').
    #[command(flatten)]
    pub rules: RuleArgs,
}

impl ApiArgs {
    /// Checks what clap cannot: the bounds must fit into each other.
    pub fn validate(&self) -> Result<(), String> {
        if self.request_timeout.is_zero() || self.claim_timeout.is_zero() {
            return Err("PREBUILDS_API_REQUEST_TIMEOUT and PREBUILDS_API_CLAIM_TIMEOUT must be greater than 0".into());
        }
        if self.claim_timeout >= self.request_timeout {
            return Err(format!(
                "PREBUILDS_API_CLAIM_TIMEOUT ({:?}) must be shorter than PREBUILDS_API_REQUEST_TIMEOUT ({:?}), \
                 or a claim would be cut off before its reply could come",
                self.claim_timeout, self.request_timeout
            ));
        }
        if self.max_body_bytes == 0 {
            return Err("PREBUILDS_API_MAX_BODY_BYTES must be greater than 0".into());
        }
        Ok(())
    }
}
