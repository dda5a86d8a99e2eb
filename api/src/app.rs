//! Wiring of one API process: the PostgreSQL pool, the claim RPC client (reconnected after a lost
//! connection), the HTTP server with its limits (body size, request time) and error format, the
//! metrics/health server, and graceful shutdown. The process keeps no state of its own: tokens,
//! pools and settings are read from the database on every request, so replicas are
//! interchangeable.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    extract::{DefaultBodyLimit, Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use deadpool_postgres::{Object, Pool};
use prebuilds_core::ReconcileConfig;
use prebuilds_runtime::{
    amqp::{
        rpc::{RpcClient, RpcError},
        Entity, QueueKind,
    },
    config::Connection,
    db, Health,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{config::ApiArgs, problem::Problem, routes};

/// What every request handler shares.
#[derive(Debug)]
pub struct AppState {
    pub pool: Pool,
    pub connection: Connection,
    /// The preset rows' rules (same tunables as the workers').
    pub rules: ReconcileConfig,
    /// One minute of the demand windows (`PREBUILDS_DEMAND_TIME_UNIT`).
    pub demand_time_unit: std::time::Duration,
    pub claim_timeout: Duration,
    pub lock_timeout: Duration,
    pub health: Health,
    rpc: Mutex<Option<Arc<RpcClient>>>,
    pub metrics: ApiMetrics,
}

impl AppState {
    /// A pooled database connection, or a 503 saying the database is unreachable.
    pub async fn client(&self) -> Result<Object, Problem> {
        self.pool.get().await.map_err(|e| {
            tracing::warn!(error = %db::describe_pool(&e), "no database connection");
            Problem::unavailable("the database is unreachable right now; try again shortly")
        })
    }

    /// A database error as an answer: logged in full, answered without internals — a 503 (try
    /// again) unless the API's role lacks a grant, which no retry fixes ([`missing_grant`]).
    pub fn database_problem(&self, e: tokio_postgres::Error) -> Problem {
        if let Some(problem) = missing_grant(&e) {
            return problem;
        }
        tracing::warn!(error = %db::describe_postgres(&e), "database error");
        Problem::unavailable("the database failed to answer; try again shortly")
    }

    /// The claim RPC client, connected on first use and again after its connection was lost.
    pub async fn rpc(&self) -> Result<Arc<RpcClient>, Problem> {
        let mut slot = self.rpc.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = connect_rpc(&self.connection).await.map_err(|e| {
            self.health.set_broker(false);
            tracing::warn!(error = %format!("{e:#}"), "cannot reach RabbitMQ for claims");
            Problem::unavailable("the broker is unreachable right now; retry the claim with the same Idempotency-Key")
        })?;
        self.health.set_broker(true);
        let client = Arc::new(client);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Forgets `client` after a broker error, so the next claim reconnects.
    pub async fn rpc_failed(&self, client: &Arc<RpcClient>, e: &RpcError) {
        let mut slot = self.rpc.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            tracing::warn!(error = %e, "claim RPC connection failed; reconnecting on the next claim");
            *slot = None;
            self.health.set_broker(false);
        }
    }
}

/// A 500 naming the fix when `e` is PostgreSQL refusing a statement for want of a privilege
/// (42501): the deployment's grants are behind the schema; logged with the statement's error.
pub fn missing_grant(e: &tokio_postgres::Error) -> Option<Problem> {
    if e.code() != Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE) {
        return None;
    }
    tracing::error!(error = %db::describe_postgres(e), "the API's database role lacks a privilege");
    Some(Problem::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "missing_grant",
        "the API's database role lacks a privilege this request needs; run \
         deploy/postgres/roles.sql again after `prebuildsctl migrate` (the API's log names the table)",
    ))
}

/// Connects the RPC client, after making sure (declaring, or with
/// `PREBUILDS_DECLARE_TOPOLOGY=false` checking) that the exchange and the claims queue exist, so a
/// claim is routable even before the first worker started.
async fn connect_rpc(connection: &Connection) -> anyhow::Result<RpcClient> {
    let topology = connection.topology();
    let amqp = prebuilds_runtime::amqp::connect(&connection.broker, "prebuilds-api topology")
        .await
        .with_context(|| {
            format!(
                "cannot connect to RabbitMQ at {}",
                connection.broker.redacted()
            )
        })?;
    let prepared = topology
        .prepare(&amqp, &[Entity::Exchange, Entity::Queue(QueueKind::Claims)])
        .await;
    let _ = amqp.close(200, "done".into()).await;
    prepared?;
    Ok(RpcClient::connect(&connection.broker, "prebuilds-api claims", topology).await?)
}

/// Request counters and latencies by route template (never by id: bounded labels).
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
}

impl ApiMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "prebuilds_api_requests_total",
                "HTTP API requests, by method, route template and status code.",
            ),
            &["method", "route", "status"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "prebuilds_api_request_seconds",
                "HTTP API request duration, by method and route template.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["method", "route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        Ok(ApiMetrics { requests, seconds })
    }
}

/// Middleware: counts and times every request, and cuts it off at the request time limit.
async fn observe(
    State(state): State<Arc<AppState>>,
    timeout: Duration,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    // One server span per request, continuing the caller's trace when it sent a valid
    // `traceparent`; a claim's RPC and everything after it joins this trace.
    let span = tracing::info_span!(
        parent: None,
        "http.request",
        otel.name = tracing::field::Empty,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        url.path = %request.uri().path(),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(remote) = prebuilds_runtime::tracing_context::extract_http(request.headers()) {
        prebuilds_runtime::tracing_context::set_parent(&span, &remote);
    }
    let run = tracing::Instrument::instrument(next.run(request), span.clone());
    let response = match tokio::time::timeout(timeout, run).await {
        Ok(response) => response,
        Err(_) => Problem::unavailable(format!(
            "the request took longer than {timeout:?} (PREBUILDS_API_REQUEST_TIMEOUT) and was abandoned"
        ))
        .into_response(),
    };
    let route = response
        .extensions()
        .get::<routes::RouteLabel>()
        .map_or("unmatched", |r| r.0);
    span.record("otel.name", format!("{method} {route}"));
    span.record("http.route", route);
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    state
        .metrics
        .seconds
        .with_label_values(&[method.as_str(), route])
        .observe(started.elapsed().as_secs_f64());
    state
        .metrics
        .requests
        .with_label_values(&[method.as_str(), route, response.status().as_str()])
        .inc();
    response
}

/// The HTTP application with every layer (what the tests and `run` serve).
pub fn router(
    state: Arc<AppState>,
    request_timeout: Duration,
    max_body_bytes: usize,
) -> axum::Router {
    routes::router()
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            move |s: State<Arc<AppState>>, r: Request, n: Next| observe(s, request_timeout, r, n),
        ))
        .layer(middleware::map_response(crate::problem::normalize))
        .with_state(state)
}

/// Runs the API until `shutdown` is cancelled; in-flight requests finish within the shutdown
/// bound.
pub async fn run(args: ApiArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let registry = Registry::new();
    let metrics = ApiMetrics::register(&registry)?;
    let health = Health::default();
    let connection = args.connection.resolve()?;
    args.rules
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let rules = args.rules.apply(ReconcileConfig::default());
    let demand_time_unit = args.rules.demand_time_unit;
    let pool = db::pool(connection.database_url.expose(), connection.db_pool_size)?;
    prebuilds_runtime::retry::with_retries(|| db::ping(&pool))
        .await
        .context("PostgreSQL is unreachable (check DATABASE_URL and that the server is running)")?;
    health.set_database(true);

    let state = Arc::new(AppState {
        pool,
        connection,
        rules,
        demand_time_unit,
        claim_timeout: args.claim_timeout,
        lock_timeout: args.lock_timeout,
        health: health.clone(),
        rpc: Mutex::new(None),
        metrics,
    });
    // Connect the claim client now: a broker that is missing or lacks the topology is reported at
    // start-up rather than at the first claim.
    state
        .rpc()
        .await
        .map_err(|p| anyhow::anyhow!("{}", p.detail))
        .context("starting the claim RPC client")?;

    let (metrics_addr, probes) = prebuilds_runtime::http::serve(
        args.service.metrics_addr,
        registry,
        health.clone(),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on {}", args.service.metrics_addr))?;
    let listener = tokio::net::TcpListener::bind(args.addr)
        .await
        .with_context(|| format!("cannot listen on {} (PREBUILDS_API_ADDR)", args.addr))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, %metrics_addr, prefix = %state.connection.amqp_prefix, "api listening");

    let app = router(state, args.request_timeout, args.max_body_bytes);
    let draining = shutdown.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        draining.cancelled().await;
    });
    let served = tokio::spawn(async move { server.await });
    shutdown.cancelled().await;
    health.set_draining();
    if !prebuilds_runtime::shutdown::within(args.service.shutdown_timeout, served).await {
        tracing::warn!("requests still running after the shutdown timeout; exiting anyway");
    }
    let _ = probes.await;
    tracing::info!("api stopped");
    Ok(())
}
