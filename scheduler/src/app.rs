//! Wiring and life cycle of the scheduler process.
//!
//! 1. Serve `/metrics`, `/healthz`, `/readyz` on one `Registry` (the scheduler's counters and the
//!    pool-state collector); probe PostgreSQL and RabbitMQ in the background for `/readyz`.
//! 2. Campaign for the leader lock ([`leader::campaign`]); while standing by, do nothing else.
//! 3. Once leading, start a **term**: a child cancellation token shared by the tick loop
//!    ([`ticker`]), the settings watcher ([`settings_watch`]), the metrics refresher
//!    ([`pool_metrics::Refresher`]) and the job reaper ([`crate::reaper`]). Every lock-retry
//!    interval check the lock connection; if it is dead or the check fails, cancel the term at once — in-flight publishes are dropped, the pool
//!    metrics are forgotten — and campaign again.
//! 4. On SIGTERM/SIGINT: readiness goes false, the term is cancelled, its tasks stop, the lock is
//!    released (its connection closed), the publisher and the HTTP server close. The caller bounds
//!    all of this by `--shutdown-timeout`.

use std::{sync::Arc, time::Duration};

use prebuilds_runtime::{
    amqp::{Entity, Publisher, QueueKind},
    db, http, Health,
};
use prometheus::Registry;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::Config,
    jobs::JobPublisher,
    leader::{self, LeaderLock},
    metrics::SchedulerMetrics,
    pass::Passes,
    pool_metrics::{PoolCollector, PoolState, Refresher},
    reaper::{Reaper, ReaperConfig},
    retention::Retention,
    settings_watch, ticker,
};

/// How long the tasks of an ending term may take to stop before the lock is released anyway.
const TERM_STOP_BOUND: Duration = Duration::from_secs(5);

/// Runs the scheduler until `shutdown` is cancelled and everything has stopped.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let registry = Registry::new();
    let metrics = SchedulerMetrics::register(&registry)?;
    let pool_state = PoolState::default();
    registry.register(Box::new(PoolCollector::new(pool_state.clone())?))?;

    let health = Health::default();
    let http_shutdown = CancellationToken::new();
    let (addr, http_task) = http::serve(
        config.service.metrics_addr,
        registry.clone(),
        health.clone(),
        http_shutdown.clone(),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} (PREBUILDS_METRICS_ADDR): {e}",
            config.service.metrics_addr
        )
    })?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");

    let connection = config.connection.resolve()?;
    let pool = db::pool(connection.database_url.expose(), connection.db_pool_size)?;
    // The scheduler starts without its database (it waits as a standby); when the database
    // answers now, a schema older than this build needs is refused at once.
    if let Ok(Ok(())) = tokio::time::timeout(PROBE_TIMEOUT, db::ping(&pool)).await {
        db::require_schema(&pool).await?;
    }
    // The scheduler publishes reconcile jobs only.
    let publisher = Arc::new(
        Publisher::new(
            &connection.broker,
            "prebuilds-scheduler",
            connection.topology(),
        )
        .uses(&[Entity::Exchange, Entity::Queue(QueueKind::Reconcile)]),
    );
    let probes = tokio::spawn(probe_dependencies(
        pool.clone(),
        publisher.clone(),
        health.clone(),
        shutdown.clone(),
    ));

    let passes = Passes {
        pool: pool.clone(),
        jobs: JobPublisher::new(
            publisher.clone(),
            event_source(),
            config.publish_concurrency,
            metrics.clone(),
        ),
        metrics: metrics.clone(),
        pool_state: pool_state.clone(),
    };
    let refresher = Refresher {
        pool: pool.clone(),
        state: pool_state.clone(),
        metrics: metrics.clone(),
        interval: config.reconcile.metrics_interval,
        demand_time_unit: config.reconcile.rules.demand_time_unit,
    };
    let reaper = Reaper {
        pool: pool.clone(),
        config: ReaperConfig::for_timeouts(
            config.job_timeouts.job_hung_timeout,
            config.job_timeouts.job_pending_timeout,
        ),
        metrics: metrics.clone(),
        source: event_source(),
    };
    let retention = Retention {
        pool: pool.clone(),
        config: config.retention.retention_config(),
        metrics: metrics.clone(),
    };
    let leadership = Leadership {
        config: &config,
        database_url: connection.database_url.clone(),
        passes,
        refresher,
        reaper,
        retention,
        metrics,
        pool_state,
    };
    leadership.run(&shutdown).await;

    health.set_draining();
    let _ = probes.await;
    publisher.close().await;
    pool.close();
    http_shutdown.cancel();
    let _ = http_task.await;
    tracing::info!("scheduler stopped");
    Ok(())
}

struct Leadership<'a> {
    config: &'a Config,
    database_url: prebuilds_runtime::config::Secret,
    passes: Passes,
    refresher: Refresher,
    reaper: Reaper,
    retention: Retention,
    metrics: SchedulerMetrics,
    pool_state: PoolState,
}

impl Leadership<'_> {
    /// Campaign → lead → campaign … until shutdown.
    async fn run(&self, shutdown: &CancellationToken) {
        loop {
            self.metrics.is_leader.set(0);
            let Some(lock) = leader::campaign(
                self.database_url.expose(),
                self.config.leader_lock_key,
                self.config.lock_retry_interval,
                shutdown,
            )
            .await
            else {
                return;
            };
            self.lead(lock, shutdown).await;
            if shutdown.is_cancelled() {
                return;
            }
        }
    }

    /// One leader term; returns once it ended and the lock is released.
    async fn lead(&self, lock: LeaderLock, shutdown: &CancellationToken) {
        tracing::info!("became leader");
        let term = shutdown.child_token();
        self.metrics.is_leader.set(1);
        self.metrics.leader_terms.inc();
        self.pool_state.set_leader(true);

        let tasks = TaskTracker::new();
        tasks.spawn(ticker::run(
            self.passes.clone(),
            self.config.reconcile.reconcile_interval,
            term.clone(),
        ));
        tasks.spawn(settings_watch::run(
            self.passes.clone(),
            self.config.settings_poll_interval,
            term.clone(),
        ));
        tasks.spawn(self.refresher.clone().run(term.clone()));
        tasks.spawn(self.reaper.clone().run(term.clone()));
        tasks.spawn(self.retention.clone().run(term.clone()));
        tasks.spawn(db::refresh_plans_as_tables_grow(
            self.passes.pool.clone(),
            prebuilds_store::GROWING_TABLES,
            std::time::Duration::from_secs(10),
            term.clone(),
        ));
        tasks.close();

        let lost = loop {
            tokio::select! {
                _ = term.cancelled() => break None,
                _ = tokio::time::sleep(self.config.lock_retry_interval) => {
                    if let Err(e) = lock.check().await {
                        break Some(e);
                    }
                }
            }
        };
        // Stop publishing first, then tell the world.
        term.cancel();
        self.pool_state.set_leader(false);
        self.metrics.is_leader.set(0);
        match lost {
            Some(e) => {
                tracing::error!(error = %e, "lost leadership: stopped publishing; campaigning again")
            }
            None => tracing::info!("stepping down"),
        }
        if tokio::time::timeout(TERM_STOP_BOUND, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(bound = ?TERM_STOP_BOUND, "leader tasks did not stop in time");
        }
        lock.release().await;
    }
}

/// How long one probe of a dependency may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps `/readyz` current: PostgreSQL answers (the shared database probe) and the publisher has
/// a live channel.
async fn probe_dependencies(
    pool: deadpool_postgres::Pool,
    publisher: Arc<Publisher>,
    health: Health,
    shutdown: CancellationToken,
) {
    let database = prebuilds_runtime::health::watch_database(
        pool,
        health.clone(),
        shutdown.clone(),
        "the scheduler reads presets and settings there",
    );
    let broker = async {
        loop {
            let broker = tokio::time::timeout(PROBE_TIMEOUT, publisher.ensure_connected()).await;
            match &broker {
                Ok(Err(e @ prebuilds_runtime::amqp::PublishError::Topology(_))) => {
                    tracing::warn!(error = %e, "the RabbitMQ topology is not usable")
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "RabbitMQ is not reachable"),
                _ => {}
            }
            health.set_broker(matches!(broker, Ok(Ok(()))));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    };
    tokio::join!(database, broker);
}

/// CloudEvents `source` of this replica's jobs: `prebuilds-scheduler/<host>/<pid>`.
fn event_source() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("prebuilds-scheduler/{host}/{}", std::process::id())
}
