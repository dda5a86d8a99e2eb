//! Wiring of one worker process: the PostgreSQL pool, a publisher (outbox relay, replies, dead
//! letters), the outbox relay, one supervised consumer per queue (reconcile, provisioner events,
//! claims), the metrics/health server, and graceful shutdown.

use std::sync::Arc;

use anyhow::Context;
use prebuilds_runtime::{
    amqp::{
        consumer::{self, ConsumerContext},
        ConsumerSpec, Entity, PublishError, Publisher, Publishers, QueueKind,
    },
    db,
    metrics::ServiceMetrics,
    outbox::{Relay, RelayConfig},
    Health,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    claims::{ClaimsContext, ClaimsHandler},
    config::WorkerArgs,
    events::{EventsContext, EventsHandler},
    metrics::WorkerMetrics,
    reconcile::{ReconcileContext, ReconcileHandler},
};

/// How often the sizes behind cached plans are checked (one cheap query).
const PLAN_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs the worker until `shutdown` is cancelled, then drains within the configured bound.
pub async fn run(args: WorkerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let service_metrics = ServiceMetrics::register(&registry)?;
    let worker_metrics = WorkerMetrics::register(&registry)?;
    let health = Health::default();
    let source = crate::event_source();

    if let Some(warning) = args.pool_size_warning() {
        tracing::warn!("{warning}");
    }
    let connection = args.connection.resolve()?;
    let pool = db::pool(connection.database_url.expose(), connection.db_pool_size)?;
    prebuilds_runtime::retry::with_retries(|| db::ping(&pool))
        .await
        .context("PostgreSQL is unreachable (check DATABASE_URL and that the server is running)")?;
    db::require_schema(&pool).await?;
    health.set_database(true);

    let topology = connection.topology();
    // The outbox relay publishes reconcile jobs, provisioner jobs and notifications; the consumers
    // dead-letter through this publisher too.
    let publisher = Arc::new(
        Publisher::new(
            &connection.broker,
            format!("{source}/publisher"),
            topology.clone(),
        )
        .uses(&[
            Entity::Exchange,
            Entity::Queue(QueueKind::Reconcile),
            Entity::Queue(QueueKind::ProvisionerJobs),
            Entity::Queue(QueueKind::ProvisionerJobsUser),
            Entity::Queue(QueueKind::Notifications),
            Entity::DeadLetterExchange,
            Entity::DeadQueue,
        ]),
    );
    prebuilds_runtime::retry::with_retries(|| publisher.ensure_connected())
        .await
        .map_err(broker_unusable)?;

    // Serves until the very end, so `/readyz` answers 503 while the worker drains.
    let http_stop = CancellationToken::new();
    let (metrics_addr, http) = prebuilds_runtime::http::serve(
        args.service.metrics_addr,
        registry.clone(),
        health.clone(),
        http_stop.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on {}", args.service.metrics_addr))?;
    tracing::info!(%metrics_addr, prefix = %topology.prefix(), "worker starting");

    let relay = Relay::new(pool.clone(), publisher.clone(), RelayConfig::default())
        .with_metrics(service_metrics.clone());
    let waker = relay.waker();

    // Consumers stop first; the relay stops after them so everything they committed is flushed.
    let consumers_stop = shutdown.child_token();
    let relay_stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(relay.run(relay_stop.clone()));
    tasks.spawn(prebuilds_runtime::health::watch_database(
        pool.clone(),
        health.clone(),
        shutdown.clone(),
        "the worker reconciles, claims and records job events there",
    ));
    tasks.spawn(db::refresh_plans_as_tables_grow(
        pool.clone(),
        prebuilds_store::GROWING_TABLES,
        PLAN_CHECK_INTERVAL,
        shutdown.clone(),
    ));

    let consumer_context = ConsumerContext {
        broker: connection.broker.clone(),
        topology: topology.clone(),
        publisher: publisher.clone(),
        metrics: service_metrics.clone(),
        health: health.clone(),
        database: Some(pool.clone()),
    };
    let spec = |queue: QueueKind| ConsumerSpec {
        queue,
        prefetch: match queue {
            QueueKind::Claims => args.claim_concurrency,
            QueueKind::Reconcile => args.reconcile_prefetch(),
            QueueKind::ProvisionerEvents => args.events_prefetch(),
            _ => args.worker_concurrency,
        },
        connection_name: format!("{source}/{}", queue.suffix()),
        drain_timeout: prebuilds_runtime::shutdown::drain_share(args.service.shutdown_timeout),
        transient_window: args.service.retry_window,
    };
    let reconcile = Arc::new(ReconcileHandler::new(
        ReconcileContext {
            pool: pool.clone(),
            config: args.core_config(),
            metrics: worker_metrics.clone(),
            outbox_waker: waker.clone(),
            source: source.clone(),
            demand_time_unit: args.reconcile.rules.demand_time_unit,
        },
        args.worker_concurrency.into(),
        args.reconcile_batch_size.into(),
        args.reconcile_spacing,
    ));
    let events = Arc::new(
        EventsHandler::new(
            EventsContext {
                pool: pool.clone(),
                metrics: worker_metrics.clone(),
                outbox_waker: waker.clone(),
                source: source.clone(),
                // A per-preset cap is freed by the preset's own completions, which re-queue it anyway.
                wakes_held_back: args.reconcile.max_inflight_jobs > 0,
            },
            args.worker_concurrency.into(),
        )
        .with_publishers(Publishers::parse(
            &args.provisioner_publishers,
            "PREBUILDS_PROVISIONER_PUBLISHERS",
        )),
    );
    // Replies get their own unconfirmed connection: they must not wait behind the confirms of
    // persistent outbox messages.
    // Replies go to the default exchange (direct reply-to), which always exists: nothing to check.
    let replies = Arc::new(
        Publisher::unconfirmed(
            &connection.broker,
            format!("{source}/replies"),
            topology.clone(),
        )
        .uses(&[]),
    );
    let claims = Arc::new(ClaimsHandler {
        context: ClaimsContext {
            pool: pool.clone(),
            publisher: replies.clone(),
            metrics: worker_metrics.clone(),
            outbox_waker: waker.clone(),
            source: source.clone(),
        },
        publishers: Publishers::parse(&args.claim_publishers, "PREBUILDS_CLAIM_PUBLISHERS"),
    });
    let consumers = TaskTracker::new();
    consumers.spawn(consumer::run(
        spec(QueueKind::Reconcile),
        consumer_context.clone(),
        reconcile,
        consumers_stop.clone(),
    ));
    consumers.spawn(consumer::run(
        spec(QueueKind::ProvisionerEvents),
        consumer_context.clone(),
        events,
        consumers_stop.clone(),
    ));
    consumers.spawn(consumer::run(
        spec(QueueKind::Claims),
        consumer_context,
        claims,
        consumers_stop.clone(),
    ));
    consumers.close();

    shutdown.cancelled().await;
    let budget = prebuilds_runtime::shutdown::Budget::start(args.service.shutdown_timeout);
    health.set_draining();
    tracing::info!(budget = ?args.service.shutdown_timeout, "draining");
    // Each consumer bounds its own drain by its share of the budget.
    consumers.wait().await;
    relay_stop.cancel();
    tasks.close();
    if !prebuilds_runtime::shutdown::within(budget.remaining(), tasks.wait()).await {
        tracing::warn!("the shutdown budget ran out before the outbox relay stopped; unpublished rows are published by the next worker");
    }
    let _ = prebuilds_runtime::shutdown::within(budget.remaining(), async {
        publisher.close().await;
        replies.close().await;
    })
    .await;
    http_stop.cancel();
    let _ = http.await;
    tracing::info!("worker stopped");
    Ok(())
}

/// The start-up error for a broker the worker cannot use: a missing exchange or queue says so
/// itself (and what to run); anything else is a connection problem.
fn broker_unusable(e: PublishError) -> anyhow::Error {
    match e {
        PublishError::Topology(_) => anyhow::Error::new(e),
        _ => anyhow::Error::new(e)
            .context("RabbitMQ is unreachable (check AMQP_URL and that the broker is running)"),
    }
}
