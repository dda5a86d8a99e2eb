//! Wiring of one notifier process: the PostgreSQL pool, a publisher for dead letters, the
//! supervised consumer of `<prefix>.notifications` (the runtime's: reconnects, prefetch, settling,
//! dead-lettering with the reason), the metrics/health server, and graceful shutdown.

use std::sync::Arc;

use anyhow::Context;
use prebuilds_runtime::{
    amqp::{
        consumer::{self, ConsumerContext},
        ConsumerSpec, Entity, PublishError, Publisher, QueueKind,
    },
    db,
    metrics::ServiceMetrics,
    Health,
};
use tokio_util::sync::CancellationToken;

use crate::{
    config::{Delivery, NotifierArgs},
    deliver::{DeliverContext, NotificationHandler},
    metrics::NotifierMetrics,
};

/// Runs the notifier until `shutdown` is cancelled, then drains within the configured bound.
pub async fn run(
    args: NotifierArgs,
    delivery: Delivery,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let registry = prometheus::Registry::new();
    let service_metrics = ServiceMetrics::register(&registry)?;
    let metrics = NotifierMetrics::register(&registry)?;
    let health = Health::default();
    let source = format!("prebuilds-notifier/{}", std::process::id());

    let connection = args.connection.resolve()?;
    let pool = db::pool(connection.database_url.expose(), connection.db_pool_size)?;
    prebuilds_runtime::retry::with_retries(|| db::ping(&pool))
        .await
        .context("PostgreSQL is unreachable (check DATABASE_URL and that the server is running)")?;
    db::require_schema(&pool).await?;
    health.set_database(true);

    let topology = connection.topology();
    // Only dead letters are published: to the dead-letter exchange, which routes to the dead queue.
    let publisher = Arc::new(
        Publisher::new(
            &connection.broker,
            format!("{source}/publisher"),
            topology.clone(),
        )
        .uses(&[Entity::DeadLetterExchange, Entity::DeadQueue]),
    );
    prebuilds_runtime::retry::with_retries(|| publisher.ensure_connected())
        .await
        .map_err(broker_unusable)?;

    // Serves until the very end, so `/readyz` answers 503 while the notifier drains.
    let http_stop = CancellationToken::new();
    let (metrics_addr, http) = prebuilds_runtime::http::serve(
        args.service.metrics_addr,
        registry.clone(),
        health.clone(),
        http_stop.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on {}", args.service.metrics_addr))?;
    tracing::info!(
        %metrics_addr,
        prefix = %topology.prefix(),
        webhook = ?delivery.webhook,
        smtp = ?delivery.smtp,
        "notifier starting"
    );

    let consumers_stop = shutdown.child_token();
    let watcher = tokio::spawn(prebuilds_runtime::health::watch_database(
        pool.clone(),
        health.clone(),
        shutdown.clone(),
        "the notifier reads notifications and records deliveries there",
    ));
    let handler = Arc::new(NotificationHandler::new(DeliverContext {
        pool: pool.clone(),
        delivery,
        metrics,
        shutdown: consumers_stop.clone(),
    }));
    let consumer = tokio::spawn(consumer::run(
        ConsumerSpec {
            queue: QueueKind::Notifications,
            prefetch: args.concurrency,
            connection_name: format!("{source}/notifications"),
            drain_timeout: prebuilds_runtime::shutdown::drain_share(args.service.shutdown_timeout),
            transient_window: args.service.retry_window,
        },
        ConsumerContext {
            broker: connection.broker.clone(),
            topology,
            publisher: publisher.clone(),
            metrics: service_metrics,
            health: health.clone(),
            database: Some(pool.clone()),
        },
        handler,
        consumers_stop,
    ));

    shutdown.cancelled().await;
    health.set_draining();
    tracing::info!("draining");
    // The consumer bounds its own drain by the shutdown timeout.
    let budget = prebuilds_runtime::shutdown::Budget::start(args.service.shutdown_timeout);
    let _ = consumer.await;
    let _ = watcher.await;
    let _ = prebuilds_runtime::shutdown::within(budget.remaining(), publisher.close()).await;
    http_stop.cancel();
    let _ = http.await;
    tracing::info!("notifier stopped");
    Ok(())
}

/// The start-up error for a broker the notifier cannot use.
fn broker_unusable(e: PublishError) -> anyhow::Error {
    match e {
        PublishError::Topology(_) => anyhow::Error::new(e),
        _ => anyhow::Error::new(e)
            .context("RabbitMQ is unreachable (check AMQP_URL and that the broker is running)"),
    }
}
