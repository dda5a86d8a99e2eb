//! Wiring of the process: metrics registry, readiness, the `/metrics` `/healthz` `/readyz`
//! server, the confirming publisher, the backend, and one consumer supervisor per lane served
//! (`--lanes`): `<prefix>.provisioner-jobs-user` with `--user-concurrency` slots and
//! `<prefix>.provisioner-jobs` with `--concurrency`.
//!
//! Shutdown (SIGTERM/SIGINT): readiness goes false and the supervisor stops taking deliveries,
//! lets in-flight jobs finish within `--shutdown-timeout` and settles them. Builds still running
//! 6 s before that bound (but not before half of it has passed) are interrupted — terraform gets
//! SIGINT, then SIGKILL after 5 s — and their jobs go back to the queue, to run again later with
//! the same event ids.

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use prebuilds_runtime::{
    amqp::{
        consumer::{self, ConsumerContext},
        ConsumerSpec, Entity, PublishError, Publisher, QueueKind,
    },
    db, http,
    metrics::ServiceMetrics,
    shutdown, Health,
};
use prebuilds_schemas::Lane;
use tokio_util::sync::CancellationToken;

use crate::{
    admission::JobStates,
    backend::Backend,
    config::{BackendKind, Cli},
    handler::JobHandler,
    metrics::ProvisionerMetrics,
    sim::SimBackend,
    terraform::TerraformBackend,
};

/// Period of the database probe behind `/readyz` (terraform backend).
const DB_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Runs until SIGTERM/SIGINT and the drain that follows.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    run_until(cli, shutdown::on_signals()).await
}

/// Runs until `shutdown` is cancelled and in-flight jobs are settled (or the bound passed).
pub async fn run_until(cli: Cli, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        connection = ?cli.connection,
        backend = cli.backend.as_str(),
        concurrency = cli.concurrency,
        user_concurrency = cli.user_concurrency,
        lanes = ?cli.lanes,
        "starting prebuilds-provisioner"
    );
    let connection = cli.connection.resolve()?;
    let registry = prometheus::Registry::new();
    let service_metrics =
        ServiceMetrics::register(&registry).context("registering service metrics")?;
    let metrics =
        ProvisionerMetrics::register(&registry).context("registering provisioner metrics")?;
    let health = Health::default();
    let topology = connection.topology();
    // Provisioner events, and dead letters of the jobs consumer.
    let publisher = Arc::new(
        Publisher::new(
            &connection.broker,
            "prebuilds-provisioner-publisher",
            topology.clone(),
        )
        .uses(&[
            Entity::Exchange,
            Entity::Queue(QueueKind::ProvisionerEvents),
            Entity::DeadLetterExchange,
            Entity::DeadQueue,
        ]),
    );

    // The terraform backend needs the database (template sources); the simulation uses it only
    // for admission when DATABASE_URL is given (handler step 4).
    let pool = match cli.backend {
        BackendKind::Terraform => true,
        BackendKind::Sim => cli.connection.database_url_given(),
    }
    .then(|| db::pool(connection.database_url.expose(), connection.db_pool_size))
    .transpose()
    .context("DATABASE_URL")?;
    match &pool {
        Some(pool) => {
            // Like the scheduler, it may start before its database; when the database answers
            // now, a schema older than this build needs is refused at once.
            if let Ok(Ok(())) = tokio::time::timeout(DB_PROBE_INTERVAL, db::ping(pool)).await {
                db::require_schema(pool).await?;
            }
            tokio::spawn(prebuilds_runtime::health::watch_database(
                pool.clone(),
                health.clone(),
                shutdown.clone(),
                "the provisioner reads job states and template sources from it",
            ));
        }
        None => {
            tracing::info!("no DATABASE_URL: every delivered job runs (no admission check)");
            health.set_database(true);
        }
    }
    let backend = match cli.backend {
        BackendKind::Terraform => {
            let pool = pool
                .clone()
                .expect("the terraform backend always opens the pool");
            let config = cli.terraform_config().map_err(anyhow::Error::msg)?;
            let terraform = TerraformBackend::new(config.clone(), pool)?;
            let version = terraform.preflight().await?;
            tracing::info!(%version, workdir = %config.workdir.display(), timeout = ?config.timeout, state = %terraform.state_description(), "terraform backend");
            Backend::Terraform(terraform)
        }
        BackendKind::Sim => {
            let config = cli.sim_config();
            tracing::info!(?config, "simulated backend");
            Backend::Sim(SimBackend::new(config))
        }
    };

    // Serves until the very end, so `/readyz` answers 503 while builds drain.
    let http_stop = CancellationToken::new();
    let (addr, http_task) = http::serve(
        cli.service.metrics_addr,
        registry,
        health.clone(),
        http_stop.clone(),
    )
    .await
    .with_context(|| format!("binding --metrics-addr {}", cli.service.metrics_addr))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");

    match publisher.ensure_connected().await {
        Ok(()) => {}
        Err(e @ PublishError::Topology(_)) => {
            tracing::warn!(error = %e, "the RabbitMQ topology is not usable yet; retrying in the background")
        }
        Err(e) => {
            tracing::warn!(error = %e, "RabbitMQ is not reachable yet; retrying in the background")
        }
    }

    let stop = CancellationToken::new();
    // Leave an interrupted terraform its grace period (and the job its settlement) within the bound.
    let bound = cli.service.shutdown_timeout;
    let patience = (bound / 2).max(bound.saturating_sub(Duration::from_secs(6)));
    // Consumers drain within the whole bound (an interrupted build must still be settled); what
    // follows them gets what is left of it.
    let budget = Arc::new(std::sync::Mutex::new(
        None::<prebuilds_runtime::shutdown::Budget>,
    ));
    {
        let budget_started = budget.clone();
        let (shutdown, stop, health) = (shutdown.clone(), stop.clone(), health.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            *budget_started.lock().expect("not poisoned") =
                Some(prebuilds_runtime::shutdown::Budget::start(bound));
            health.set_draining();
            tokio::time::sleep(patience).await;
            if !stop.is_cancelled() {
                tracing::warn!(after = ?patience, "interrupting builds still running at shutdown; their jobs will be redelivered");
                stop.cancel();
            }
        });
    }

    let source = format!("prebuilds-provisioner/{}", cli.backend.as_str());
    let handler = Arc::new(JobHandler::new(
        backend,
        publisher.clone(),
        source,
        cli.remembered_jobs,
        stop.clone(),
        metrics,
        pool.clone().map(JobStates::new),
        cli.job_timeouts.heartbeat_interval(),
        cli.job_max_duration,
    ));
    let context = ConsumerContext {
        broker: connection.broker.clone(),
        topology,
        publisher: publisher.clone(),
        metrics: service_metrics,
        health,
        database: pool.clone(),
    };
    // One consumer (own connection, own prefetch) per lane: a user's build waits for a user-lane
    // slot only, however long the prebuild backlog is.
    let consumers = cli.lanes.iter().map(|&lane| {
        let spec = ConsumerSpec {
            queue: QueueKind::provisioner_jobs(lane),
            prefetch: match lane {
                Lane::User => cli.user_concurrency,
                Lane::Prebuild => cli.concurrency,
            },
            connection_name: format!("prebuilds-provisioner/{}", lane.as_str()),
            drain_timeout: cli.service.shutdown_timeout,
            transient_window: cli.service.retry_window,
        };
        consumer::run(spec, context.clone(), handler.clone(), shutdown.clone())
    });
    futures::future::join_all(consumers).await;

    stop.cancel();
    let left = budget
        .lock()
        .expect("not poisoned")
        .map_or(Duration::from_secs(1), |b| b.remaining());
    let _ = prebuilds_runtime::shutdown::within(left, publisher.close()).await;
    http_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), http_task).await;
    tracing::info!("prebuilds-provisioner stopped");
    Ok(())
}
