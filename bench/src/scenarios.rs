//! The benchmark scenarios. Each builds its own database and AMQP prefix with the test harness,
//! starts the real release binaries, measures, and cleans up.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{stream, StreamExt};
use lapin::{
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
    },
    types::FieldTable,
    BasicProperties,
};
use prebuilds_runtime::amqp::{publisher::Outgoing, rpc::RpcClient, Publisher, QueueKind};
use prebuilds_schemas::{
    BuildStage, ClaimOutcome, ClaimReply, ClaimRequest, CloudEvent, JobLog, LogLevel, LogLine,
    ProvisionerJob, RawEvent,
};
use prebuilds_tests::{
    probe::{http_get, metric_sum, wait_ready as ready},
    stack, Service, TestBroker, TestDb,
};
use uuid::Uuid;

use prebuilds_tests::bulk as fixtures;

use crate::stats::Latency;

/// Problem sizes; `--quick` shrinks them for a smoke run.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub quick: bool,
    pub floor_iterations: usize,
    pub rate_messages: usize,
    pub eligible: usize,
    pub claims_per_level: [(usize, usize); 3],
    pub replenish_samples: usize,
    pub reconcile_presets: usize,
    pub fill_presets: usize,
    pub fill_instances: usize,
    pub events: usize,
    /// Prebuild creates queued ahead of the claim builds of the lanes scenario.
    pub backlog: usize,
    pub claim_builds: usize,
    /// Claims of the time-to-ready scenario, in each of its two phases.
    pub ready_claims: usize,
    /// Prebuild creates the time-to-ready scenario queues behind its second phase's claims.
    pub ready_backlog: usize,
}

impl Sizes {
    /// Tiny sizes for the test suite's smoke run: every scenario runs, figures mean nothing.
    pub fn smoke() -> Sizes {
        Sizes {
            quick: true,
            floor_iterations: 20,
            rate_messages: 200,
            eligible: 100,
            claims_per_level: [(1, 20), (4, 8), (8, 16)],
            replenish_samples: 3,
            reconcile_presets: 50,
            fill_presets: 10,
            fill_instances: 2,
            events: 200,
            backlog: 30,
            claim_builds: 3,
            ready_claims: 2,
            ready_backlog: 20,
        }
    }

    /// Concurrencies at which the floors are measured: those of the claim levels.
    pub fn floor_levels(&self) -> Vec<usize> {
        self.claims_per_level.iter().map(|(c, _)| *c).collect()
    }

    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                quick,
                floor_iterations: 200,
                rate_messages: 2_000,
                eligible: 600,
                claims_per_level: [(1, 50), (16, 160), (64, 320)],
                replenish_samples: 10,
                reconcile_presets: 1_000,
                fill_presets: 100,
                fill_instances: 3,
                events: 2_000,
                backlog: 300,
                claim_builds: 10,
                ready_claims: 5,
                ready_backlog: 100,
            }
        } else {
            Sizes {
                quick,
                floor_iterations: 1_000,
                rate_messages: 20_000,
                eligible: 1_000,
                claims_per_level: [(1, 150), (16, 320), (64, 384)],
                replenish_samples: 50,
                reconcile_presets: 10_000,
                fill_presets: 1_000,
                fill_instances: 3,
                events: 20_000,
                backlog: 3_000,
                claim_builds: 30,
                ready_claims: 15,
                ready_backlog: 400,
            }
        }
    }
}

fn quiet() -> Vec<(&'static str, &'static str)> {
    vec![("RUST_LOG", "warn"), ("PREBUILDS_DB_POOL_SIZE", "24")]
}

/// Sum of a counter across processes' `/metrics` (all label sets of `name`).
async fn counter_sum(ports: &[u16], name: &str) -> f64 {
    let mut total = 0.0;
    for port in ports {
        if let Some((_, body)) = http_get(*port, "/metrics").await {
            total += metric_sum(&body, name);
        }
    }
    total
}

/// Peak resident set size of a process (VmHWM), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

async fn publish_reconciles(publisher: &Publisher, presets: &[Uuid]) {
    stream::iter(presets.iter().copied())
        .map(|preset_id| stack::request_reconcile(publisher, preset_id))
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
}

// ---------------------------------------------------------------------------------------------
// 1. Floors

/// The machine's own limits, measured at each claim concurrency so a claim level can be compared
/// with what the broker and the database alone do under the same load.
#[derive(Debug, Clone)]
pub struct Floors {
    /// (concurrent requesters, latency of one RPC echo round trip)
    pub rpc_echo: Vec<(usize, Latency)>,
    /// (concurrent connections, latency of one claim-shaped transaction)
    pub claim_tx: Vec<(usize, Latency)>,
    pub publish_per_sec: f64,
    pub consume_per_sec: f64,
}

/// Each of `concurrency` tasks runs `op` back to back until `total` runs are done; returns every
/// run's latency.
async fn closed_loop<F, Fut>(
    concurrency: usize,
    total: usize,
    op: F,
) -> anyhow::Result<Vec<Duration>>
where
    F: Fn(usize, usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let per_task = total.div_ceil(concurrency);
    let op = &op;
    let tasks = (0..concurrency).map(|task| async move {
        let mut samples = Vec::with_capacity(per_task);
        for n in 0..per_task {
            let t = Instant::now();
            op(task, n).await?;
            samples.push(t.elapsed());
        }
        anyhow::Ok(samples)
    });
    let mut samples = Vec::new();
    for result in futures::future::join_all(tasks).await {
        samples.extend(result?);
    }
    Ok(samples)
}

/// The RPC echo responder and the claim-shaped transaction's table, kept up so the two floors can
/// be measured again between the rounds of another scenario: on a shared machine, a floor
/// measured a minute earlier can be 30% off.
pub struct FloorRig {
    db: TestDb,
    broker: TestBroker,
    echo_queue: String,
    echo_task: tokio::task::JoinHandle<()>,
    /// A few connections shared by the requesters, as in the claims scenario.
    clients: Vec<RpcClient>,
    echo_requests: std::sync::atomic::AtomicUsize,
}

impl FloorRig {
    pub async fn start(sizes: &Sizes) -> anyhow::Result<FloorRig> {
        let db = TestDb::new().await;
        let broker = TestBroker::new().await;

        // RPC echo through the same broker: a responder on a quorum queue, direct reply-to back.
        let echo_queue = format!("{}.bench-echo", broker.prefix());
        broker
            .channel
            .queue_declare(
                echo_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                broker.topology.work_queue_arguments(),
            )
            .await?;
        let responder_conn = prebuilds_runtime::amqp::connect(&broker.url, "bench-echo").await?;
        let responder = responder_conn.create_channel().await?;
        responder.basic_qos(64, BasicQosOptions::default()).await?;
        let mut requests = responder
            .basic_consume(
                echo_queue.as_str().into(),
                "echo".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let echo_task = tokio::spawn(async move {
            // Owns the connection for as long as it answers.
            let _connection = responder_conn;
            while let Some(Ok(d)) = requests.next().await {
                let props = BasicProperties::default()
                    .with_correlation_id(d.properties.correlation_id().clone().unwrap_or_default());
                let reply_to = d.properties.reply_to().clone().unwrap_or_default();
                let _ = responder
                    .basic_publish(
                        "".into(),
                        reply_to.as_str().into(),
                        BasicPublishOptions::default(),
                        &d.data,
                        props,
                    )
                    .await;
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        });
        let mut clients = Vec::new();
        for i in 0..4 {
            clients.push(
                RpcClient::connect(
                    &broker.url,
                    &format!("bench-echo-client-{i}"),
                    broker.topology.clone(),
                )
                .await?,
            );
        }

        // The claim-shaped transaction's pool: a partial index of the unclaimed rows, as the real
        // claim scans its pool index, so the cost stays flat as rows are claimed. Enough rows
        // for the floors plus every round measured between other scenarios.
        let pg = db.connect().await;
        let levels = sizes.floor_levels();
        pg.batch_execute(&format!(
            "CREATE TABLE bench_floor (id int PRIMARY KEY, owner int NOT NULL DEFAULT 0);
             CREATE INDEX bench_floor_unclaimed ON bench_floor (id) WHERE owner = 0;
             INSERT INTO bench_floor (id) SELECT generate_series(1, {});
             ANALYZE bench_floor;",
            (sizes.floor_iterations * 4 + 64 * CLAIM_ROUNDS) * levels.len() * 2
        ))
        .await?;
        Ok(FloorRig {
            db,
            broker,
            echo_queue,
            echo_task,
            clients,
            echo_requests: Default::default(),
        })
    }

    /// `total` RPC echo round trips by `concurrency` requesters.
    pub async fn rpc_echo(
        &self,
        concurrency: usize,
        total: usize,
    ) -> anyhow::Result<Vec<Duration>> {
        let body = vec![b'x'; 300];
        closed_loop(concurrency, total, |task, _| {
            let client = &self.clients[task % self.clients.len()];
            let n = self
                .echo_requests
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (body, echo_queue) = (&body, &self.echo_queue);
            async move {
                client
                    .request(
                        "",
                        echo_queue,
                        body,
                        &format!("echo-{n}"),
                        "bench.echo",
                        Duration::from_secs(5),
                    )
                    .await?;
                Ok(())
            }
        })
        .await
    }

    /// `total` claim-shaped transactions (BEGIN; UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP
    /// LOCKED); COMMIT) on `concurrency` connections, all claiming from the same table. The
    /// connections are opened for the measurement only: held through the claims scenario, 64 of
    /// them beside two workers' pools would crowd the server's connection limit.
    pub async fn claim_tx(
        &self,
        concurrency: usize,
        total: usize,
    ) -> anyhow::Result<Vec<Duration>> {
        let mut connections = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            connections.push(self.db.connect().await);
        }
        closed_loop(concurrency, total, |task, _| {
            let pg = &connections[task];
            async move {
                pg.batch_execute("BEGIN").await?;
                pg.query_one(
                    "UPDATE bench_floor SET owner = 1 WHERE id = (SELECT id FROM bench_floor WHERE owner = 0 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id",
                    &[],
                )
                .await?;
                pg.batch_execute("COMMIT").await?;
                Ok(())
            }
        })
        .await
    }

    /// Both floors at `concurrency`, `total` runs each.
    async fn round(&self, concurrency: usize, total: usize) -> anyhow::Result<FloorSamples> {
        Ok(FloorSamples {
            rpc_echo: self.rpc_echo(concurrency, total).await?,
            claim_tx: self.claim_tx(concurrency, total).await?,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.echo_task.abort();
        self.broker
            .channel
            .queue_delete(
                self.echo_queue.as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await?;
        drop(self.db);
        Ok(())
    }
}

/// Samples of both floors, gathered over one or more rounds.
#[derive(Debug, Default)]
struct FloorSamples {
    rpc_echo: Vec<Duration>,
    claim_tx: Vec<Duration>,
}

impl FloorSamples {
    fn extend(&mut self, more: FloorSamples) {
        self.rpc_echo.extend(more.rpc_echo);
        self.claim_tx.extend(more.claim_tx);
    }

    /// RPC echo p50 + claim transaction p50.
    fn p50(self) -> Duration {
        Latency::of(self.rpc_echo).p50 + Latency::of(self.claim_tx).p50
    }
}

pub async fn floors(sizes: &Sizes, rig: &FloorRig) -> anyhow::Result<Floors> {
    let mut rpc_echo = Vec::new();
    let mut claim_tx = Vec::new();
    for concurrency in sizes.floor_levels() {
        let echo = rig.rpc_echo(concurrency, sizes.floor_iterations).await?;
        rpc_echo.push((concurrency, Latency::of(echo)));
    }
    for concurrency in sizes.floor_levels() {
        let tx = rig.claim_tx(concurrency, sizes.floor_iterations).await?;
        claim_tx.push((concurrency, Latency::of(tx)));
    }

    // Persistent messages with confirms into a quorum queue, then consumed with acks.
    let broker = &rig.broker;
    let queue_args = broker.topology.work_queue_arguments();
    let rate_queue = format!("{}.bench-rate", broker.prefix());
    broker
        .channel
        .queue_declare(
            rate_queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            queue_args,
        )
        .await?;
    let publisher = Publisher::new(&broker.url, "bench-rate", broker.topology.clone());
    publisher.ensure_connected().await?;
    let payload = vec![b'y'; 500];
    let t = Instant::now();
    stream::iter(0..sizes.rate_messages)
        .map(|_| publisher.publish(Outgoing::new("", &rate_queue, &payload)))
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let publish_per_sec = sizes.rate_messages as f64 / t.elapsed().as_secs_f64();
    let consumer_conn =
        prebuilds_runtime::amqp::connect(&broker.url, "bench-rate-consumer").await?;
    let ch = consumer_conn.create_channel().await?;
    ch.basic_qos(256, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            rate_queue.as_str().into(),
            "rate".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let t = Instant::now();
    for _ in 0..sizes.rate_messages {
        let d = consumer.next().await.expect("message")?;
        d.ack(BasicAckOptions::default()).await?;
    }
    let consume_per_sec = sizes.rate_messages as f64 / t.elapsed().as_secs_f64();
    broker
        .channel
        .queue_delete(rate_queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    Ok(Floors {
        rpc_echo,
        claim_tx,
        publish_per_sec,
        consume_per_sec,
    })
}

// ---------------------------------------------------------------------------------------------
// 2 + 3. Claim latency at several concurrencies, and replenish latency

/// Each claim level runs in up to this many rounds, with both floors measured before each round
/// (at one client and at the level's concurrency), so claims and floors share the machine's mood.
pub const CLAIM_ROUNDS: usize = 5;

/// Claims each client sends back to back in a round, at least: fewer would turn a round into a
/// burst of simultaneous first requests rather than sustained load (a level with few claims per
/// client gets fewer rounds instead).
const MIN_CLAIMS_PER_CLIENT: usize = 4;

#[derive(Debug, Clone)]
pub struct Claims {
    pub levels: Vec<ClaimLevel>,
    /// The same claims through `prebuilds-api` (`POST /api/v1/claims`, a new connection per
    /// request, as a script with curl would): (concurrency, latency, misses).
    pub http: Vec<(usize, Latency, usize)>,
    pub replenish: Latency,
}

/// One claim concurrency, with the floors measured between its rounds.
#[derive(Debug, Clone)]
pub struct ClaimLevel {
    pub concurrency: usize,
    pub latency: Latency,
    pub misses: usize,
    /// RPC echo p50 + claim transaction p50, one client.
    pub single_client_floor: Duration,
    /// The same at this level's concurrency.
    pub same_load_floor: Duration,
    /// Rounds the level ran in, each preceded by its floors.
    pub rounds: usize,
}

pub async fn claims(sizes: &Sizes, rig: &FloorRig) -> anyhow::Result<Claims> {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let pg = db.connect().await;
    // The HTTP levels claim on top of the RPC levels: room for both.
    let http_levels = &sizes.claims_per_level[..2];
    let eligible = sizes.eligible + http_levels.iter().map(|(_, n)| n).sum::<usize>();
    let presets = fixtures::world(&pg, 1, eligible, eligible).await?;
    let preset_id = presets[0];
    let users = fixtures::users(&pg, 64).await?;
    let (_w1, p1) = stack::start("prebuilds-worker", &db, &broker, &quiet());
    let (_w2, p2) = stack::start("prebuilds-worker", &db, &broker, &quiet());
    ready(p1).await;
    ready(p2).await;
    // A few connections, many channels' worth of concurrency (the broker has ~830 sockets).
    let mut clients = Vec::new();
    for i in 0..4 {
        clients.push(Arc::new(
            RpcClient::connect(
                &broker.url,
                &format!("bench-claims-{i}"),
                broker.topology.clone(),
            )
            .await?,
        ));
    }
    let claim = |client: Arc<RpcClient>, user: Uuid, name: String| async move {
        let request = CloudEvent::new(
            "bench",
            chrono::Utc::now(),
            ClaimRequest {
                user_id: user,
                workspace_name: name,
                preset_id: Some(preset_id),
                template_id: None,
                parameters: vec![],
            },
        );
        let t = Instant::now();
        let reply: CloudEvent<ClaimReply> = client
            .call(&request, Duration::from_secs(30))
            .await
            .expect("claim reply");
        (t.elapsed(), reply.data.outcome)
    };
    // Warm up connections and caches.
    for i in 0..5 {
        claim(clients[0].clone(), users[0], format!("warm-{i}")).await;
    }
    let mut levels = Vec::new();
    for (concurrency, total) in sizes.claims_per_level {
        let rounds = (total / (concurrency * MIN_CLAIMS_PER_CLIENT)).clamp(1, CLAIM_ROUNDS);
        let per_client = (total / rounds / concurrency).max(1);
        let floor_runs = (sizes.floor_iterations / rounds).max(1);
        let (mut single, mut same_load) = (FloorSamples::default(), FloorSamples::default());
        let mut results: Vec<(Duration, ClaimOutcome)> = Vec::new();
        for round in 0..rounds {
            single.extend(rig.round(1, floor_runs).await?);
            if concurrency > 1 {
                same_load.extend(rig.round(concurrency, floor_runs).await?);
            }
            let tasks = (0..concurrency).map(|c| {
                let client = clients[c % clients.len()].clone();
                let user = users[c];
                async move {
                    let mut out = Vec::new();
                    for n in 0..per_client {
                        let name = format!("c{concurrency}-{round}-{c}-{n}");
                        out.push(claim(client.clone(), user, name).await);
                    }
                    out
                }
            });
            results.extend(futures::future::join_all(tasks).await.into_iter().flatten());
        }
        let misses = results
            .iter()
            .filter(|(_, o)| *o != ClaimOutcome::Claimed)
            .count();
        let single_client_floor = single.p50();
        levels.push(ClaimLevel {
            concurrency,
            latency: Latency::of(results.into_iter().map(|(d, _)| d).collect()),
            misses,
            single_client_floor,
            rounds,
            same_load_floor: if concurrency > 1 {
                same_load.p50()
            } else {
                single_client_floor
            },
        });
    }

    // The HTTP API in front of the same RPC: what a token-holding script sees.
    let token = prebuilds_tests::api::token(&db, &broker, "bench", "claimer");
    let (_api, api_port) = prebuilds_tests::api::start(
        &db.url,
        &db,
        &broker,
        &[("RUST_LOG", "warn"), ("PREBUILDS_DECLARE_TOPOLOGY", "true")],
    )
    .await;
    let http_claim = |user: Uuid, name: String| {
        let token = token.clone();
        async move {
            let body = serde_json::json!({"user_id": user, "workspace_name": name, "preset_id": preset_id})
                .to_string();
            let t = Instant::now();
            let answer = prebuilds_tests::api::call(
                api_port,
                "POST",
                "/api/v1/claims",
                Some(&token),
                Some(&body),
            )
            .await;
            let elapsed = t.elapsed();
            assert_eq!(answer.status, 200, "HTTP claim: {}", answer.body);
            (elapsed, answer.json()["outcome"] == "claimed")
        }
    };
    for i in 0..5 {
        http_claim(users[0], format!("http-warm-{i}")).await;
    }
    let mut http = Vec::new();
    for (concurrency, total) in http_levels.iter().copied() {
        let per_client = (total / concurrency).max(1);
        let tasks = (0..concurrency).map(|c| {
            let user = users[c];
            let http_claim = &http_claim;
            async move {
                let mut out = Vec::new();
                for n in 0..per_client {
                    out.push(http_claim(user, format!("http-c{concurrency}-{c}-{n}")).await);
                }
                out
            }
        });
        let results: Vec<(Duration, bool)> = futures::future::join_all(tasks)
            .await
            .into_iter()
            .flatten()
            .collect();
        let misses = results.iter().filter(|(_, claimed)| !claimed).count();
        http.push((
            concurrency,
            Latency::of(results.into_iter().map(|(d, _)| d).collect()),
            misses,
        ));
    }

    // Replenish: claim → the replacement's provisioner job delivered to a provisioner.
    broker
        .channel
        .queue_purge(
            broker.queue(QueueKind::ProvisionerJobs).as_str().into(),
            QueuePurgeOptions::default(),
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let conn = prebuilds_runtime::amqp::connect(&broker.url, "bench-provisioner").await?;
    let ch = conn.create_channel().await?;
    let mut jobs = ch
        .basic_consume(
            broker.queue(QueueKind::ProvisionerJobs).as_str().into(),
            "bench-prov".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut samples = Vec::new();
    for n in 0..sizes.replenish_samples {
        // Drop anything still queued from earlier claims.
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(100), jobs.next()).await
        {
            d.ack(BasicAckOptions::default()).await?;
        }
        let t = Instant::now();
        let (_, outcome) = claim(clients[0].clone(), users[1], format!("replenish-{n}")).await;
        anyhow::ensure!(
            outcome == ClaimOutcome::Claimed,
            "ran out of prebuilds during the replenish phase"
        );
        loop {
            let d = tokio::time::timeout(Duration::from_secs(10), jobs.next())
                .await?
                .expect("job")?;
            d.ack(BasicAckOptions::default()).await?;
            let job: CloudEvent<ProvisionerJob> = RawEvent::parse(&d.data)?.decode()?;
            if job.data.stage == BuildStage::Create {
                samples.push(t.elapsed());
                break;
            }
        }
    }
    Ok(Claims {
        levels,
        http,
        replenish: Latency::of(samples),
    })
}

// ---------------------------------------------------------------------------------------------
// 4 + 6. Reconcile throughput at steady state, and memory

#[derive(Debug, Clone)]
pub struct Reconcile {
    pub presets: usize,
    /// (workers, seconds for a full pass, peak RSS of the first worker in MiB)
    pub passes: Vec<(usize, f64, f64)>,
    pub scheduler_rss_mib: f64,
    pub scheduler_tick_seconds: Option<f64>,
}

pub async fn reconcile(sizes: &Sizes) -> anyhow::Result<Reconcile> {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let pg = db.connect().await;
    let presets = fixtures::world(&pg, sizes.reconcile_presets, 1, 1).await?;
    let publisher = Publisher::new(&broker.url, "bench-reconcile", broker.topology.clone());
    publisher.ensure_connected().await?;
    let mut passes = Vec::new();
    for workers in [1usize, 2] {
        let mut services: Vec<(Service, u16)> = (0..workers)
            .map(|_| stack::start("prebuilds-worker", &db, &broker, &quiet()))
            .collect();
        for (_, port) in &services {
            ready(*port).await;
        }
        let ports: Vec<u16> = services.iter().map(|(_, p)| *p).collect();
        let t = Instant::now();
        publish_reconciles(&publisher, &presets).await;
        loop {
            let done = counter_sum(&ports, "prebuilds_reconcile_jobs_total").await;
            if done as usize >= presets.len() {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(600),
                "reconcile pass did not finish ({done} done)"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seconds = t.elapsed().as_secs_f64();
        let rss = services[0].0.pid().map(peak_rss_mib).unwrap_or(f64::NAN);
        for (s, _) in &mut services {
            s.terminate(Duration::from_secs(30)).await;
        }
        passes.push((workers, seconds, rss));
    }
    // The scheduler over the same presets: let it take leadership, tick and refresh metrics a few times.
    let (scheduler, port) = stack::start(
        "prebuilds-scheduler",
        &db,
        &broker,
        &[
            ("RUST_LOG", "warn"),
            ("PREBUILDS_RECONCILE_INTERVAL", "2s"),
            ("PREBUILDS_METRICS_INTERVAL", "2s"),
        ],
    );
    ready(port).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let scheduler_rss_mib = scheduler.pid().map(peak_rss_mib).unwrap_or(f64::NAN);
    let scheduler_tick_seconds = http_get(port, "/metrics").await.and_then(|(_, body)| {
        let sum = metric_sum(&body, "prebuilds_scheduler_pass_duration_seconds_sum");
        let count = metric_sum(&body, "prebuilds_scheduler_pass_duration_seconds_count");
        (count > 0.0).then(|| sum / count)
    });
    drop(scheduler);
    Ok(Reconcile {
        presets: presets.len(),
        passes,
        scheduler_rss_mib,
        scheduler_tick_seconds,
    })
}

// ---------------------------------------------------------------------------------------------
// 4b. Cold fill with the simulated provisioner at zero latency

#[derive(Debug, Clone, Copy)]
pub struct Fill {
    pub presets: usize,
    pub prebuilds: usize,
    pub seconds: f64,
}

pub async fn cold_fill(sizes: &Sizes) -> anyhow::Result<Fill> {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let pg = db.connect().await;
    let presets = fixtures::world(&pg, sizes.fill_presets, sizes.fill_instances, 0).await?;
    let target = (sizes.fill_presets * sizes.fill_instances) as i64;
    let (_w1, p1) = stack::start("prebuilds-worker", &db, &broker, &quiet());
    let (_w2, p2) = stack::start("prebuilds-worker", &db, &broker, &quiet());
    let (_prov, p3) = stack::start(
        "prebuilds-provisioner",
        &db,
        &broker,
        &[
            ("RUST_LOG", "warn"),
            ("PREBUILDS_SIM_DURATION_MIN", "0s"),
            ("PREBUILDS_SIM_DURATION_MAX", "0s"),
            ("PREBUILDS_SIM_FAILURE_RATE", "0"),
            ("PREBUILDS_SIM_AGENT_READY_DELAY", "0s"),
        ],
    );
    for p in [p1, p2, p3] {
        ready(p).await;
    }
    let publisher = Publisher::new(&broker.url, "bench-fill", broker.topology.clone());
    let t = Instant::now();
    publish_reconciles(&publisher, &presets).await;
    loop {
        let eligible: i64 = pg
            // Correlated lookups only: the tables grow from empty during the fill, and a join
            // planned on empty-table statistics turned this probe quadratic (0.4 s a poll, CPU
            // taken from the system under test).
            .query_one(
                "SELECT count(*) FROM workspaces w
                 WHERE NOT w.deleted
                   AND (SELECT j.job_status = 'succeeded'
                               AND EXISTS (SELECT 1 FROM workspace_agents a
                                           WHERE a.job_id = j.id AND a.lifecycle_state = 'ready')
                        FROM workspace_builds b JOIN provisioner_jobs j ON j.id = b.job_id
                        WHERE b.workspace_id = w.id
                        ORDER BY b.build_number DESC LIMIT 1)",
                &[],
            )
            .await?
            .get(0);
        if eligible >= target {
            break;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(600),
            "cold fill did not finish ({eligible}/{target})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(Fill {
        presets: sizes.fill_presets,
        prebuilds: target as usize,
        seconds: t.elapsed().as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------------------
// 5. Provisioner events applied per second by one worker

#[derive(Debug, Clone, Copy)]
pub struct Events {
    pub events: usize,
    pub per_sec: f64,
}

pub async fn events(sizes: &Sizes) -> anyhow::Result<Events> {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let pg = db.connect().await;
    let presets = (sizes.events / 200).max(1);
    fixtures::world(&pg, presets, 100, 100).await?;
    let jobs: Vec<Uuid> = pg
        .query("SELECT id FROM provisioner_jobs", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let publisher = Publisher::new(&broker.url, "bench-events", broker.topology.clone());
    publisher.ensure_connected().await?;
    // Queue every event first, so the worker is measured, not the publisher.
    stream::iter(0..sizes.events)
        .map(|i| {
            let job_id = jobs[i % jobs.len()];
            let publisher = &publisher;
            async move {
                let event = CloudEvent::new(
                    "bench",
                    chrono::Utc::now(),
                    JobLog {
                        job_id,
                        logs: vec![LogLine {
                            created_at: chrono::Utc::now(),
                            level: LogLevel::Info,
                            stage: "apply".into(),
                            output: format!("line {i}"),
                        }],
                    },
                );
                publisher
                    .publish_event(&event)
                    .await
                    .expect("publish event");
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    let (_worker, port) = stack::start(
        "prebuilds-worker",
        &db,
        &broker,
        &[
            ("RUST_LOG", "warn"),
            ("PREBUILDS_WORKER_CONCURRENCY", "32"),
            ("PREBUILDS_DB_POOL_SIZE", "40"),
        ],
    );
    ready(port).await;
    let mut first: Option<(Instant, f64)> = None;
    let started = Instant::now();
    loop {
        let done = counter_sum(&[port], "prebuilds_provisioner_events_total").await;
        if first.is_none() && done > 0.0 {
            first = Some((Instant::now(), done));
        }
        if done as usize >= sizes.events {
            let (t0, n0) = first.expect("some events were applied");
            let per_sec = (done - n0) / t0.elapsed().as_secs_f64().max(1e-3);
            return Ok(Events {
                events: sizes.events,
                per_sec,
            });
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "events not applied ({done})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Claim builds behind a prebuild backlog (provisioner lanes)

#[derive(Debug, Clone)]
pub struct Lanes {
    pub backlog: usize,
    /// Claim build published → its `job_started` seen (the build was delivered and begun).
    pub wait: Latency,
    /// Prebuild creates still queued when the last claim build started.
    pub still_queued: u32,
}

/// `sizes.backlog` prebuild creates are queued for a provisioner with realistic build times (1–2 s,
/// 8 prebuild slots, 4 user slots); then claim builds are published one after another (each once
/// the previous one completed) and the time to each one's `job_started` is measured. FIFO would
/// make each wait for the whole backlog.
pub async fn lanes(sizes: &Sizes) -> anyhow::Result<Lanes> {
    let broker = TestBroker::new().await;
    let publisher = Publisher::new(&broker.url, "bench-lanes", broker.topology.clone());
    // Every job_started, as it is published.
    let conn = prebuilds_runtime::amqp::connect(&broker.url, "bench-lanes-tap").await?;
    let ch = conn.create_channel().await?;
    let tap = format!("{}.bench-started", broker.prefix());
    ch.queue_declare(
        tap.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    for kind in ["job_started", "job_completed"] {
        ch.queue_bind(
            tap.as_str().into(),
            broker.topology.exchange().as_str().into(),
            format!("provisioner.event.{kind}").as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let mut started = ch
        .basic_consume(
            tap.as_str().into(),
            "bench-lanes".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let create = |stage: BuildStage| {
        let mut job = <ProvisionerJob as prebuilds_schemas::Payload>::example();
        job.job_id = Uuid::new_v4();
        job.workspace_id = Uuid::new_v4();
        job.stage = stage;
        if stage == BuildStage::Claim {
            job.owner_id = Uuid::new_v4();
        }
        job
    };
    for _ in 0..sizes.backlog {
        let event = CloudEvent::new("bench", chrono::Utc::now(), create(BuildStage::Create));
        publisher.publish_event(&event).await?;
    }
    let port = stack::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _provisioner = Service::start(
        "prebuilds-provisioner",
        &[],
        &[
            ("AMQP_URL", broker.url.as_str()),
            ("PREBUILDS_AMQP_PREFIX", broker.prefix()),
            ("PREBUILDS_METRICS_ADDR", &addr),
            ("RUST_LOG", "warn"),
            ("PREBUILDS_SIM_DURATION_MIN", "1s"),
            ("PREBUILDS_SIM_DURATION_MAX", "2s"),
            ("PREBUILDS_SIM_AGENT_READY_DELAY", "0s"),
            ("PREBUILDS_PROVISIONER_CONCURRENCY", "8"),
            ("PREBUILDS_PROVISIONER_USER_CONCURRENCY", "4"),
        ],
    );
    ready(port).await;
    let mut waits = Vec::new();
    for _ in 0..sizes.claim_builds {
        let claim = create(BuildStage::Claim);
        let event = CloudEvent::new("bench", chrono::Utc::now(), claim.clone());
        let t = Instant::now();
        publisher.publish_event(&event).await?;
        // The wait until it starts; then, before the next claim, until it is done: each claim
        // build finds a free user-lane slot, so the figure is the backlog's effect alone.
        let claim_id = claim.job_id.to_string();
        loop {
            let delivery = tokio::time::timeout(Duration::from_secs(60), started.next())
                .await
                .map_err(|_| anyhow::anyhow!("the claim build did not finish within 60 s"))?
                .ok_or_else(|| anyhow::anyhow!("the event tap closed"))??;
            let raw = RawEvent::parse(&delivery.data)?;
            if raw.data["job_id"].as_str() != Some(claim_id.as_str()) {
                continue;
            }
            if raw.event_type.ends_with("job_started.v1") {
                waits.push(t.elapsed());
            } else {
                break;
            }
        }
    }
    let queued = ch
        .queue_declare(
            broker.queue(QueueKind::ProvisionerJobs).as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    Ok(Lanes {
        backlog: sizes.backlog,
        wait: Latency::of(waits),
        still_queued: queued,
    })
}

// ---------------------------------------------------------------------------------------------
// 7. Time to ready: a claim until the user's workspace is built and its agent ready

#[derive(Debug, Clone)]
pub struct TimeToReady {
    /// Claim sent → the claimed workspace's claim build succeeded and its agent is ready; with
    /// an idle provisioner.
    pub idle: Latency,
    /// The same, with `backlog` prebuild creates queued for the provisioner.
    pub behind_backlog: Latency,
    pub backlog: usize,
    /// Prebuild creates still queued or running when the last claim was ready.
    pub backlog_left: i64,
}

/// Sim builds of realistic length ([`READY_BUILD`]: 2–4 s, then 1 s until the agent is ready),
/// two workers, one provisioner (8 prebuild + 4 user slots). A preset with ready prebuilds is
/// claimed from one claim at a time; each claim is timed until its claim build completed and the
/// agent reported ready (the workspace is usable). First with nothing else to build, then with
/// `ready_backlog` creates of other presets queued: with the user lane the two should match
/// (the claim build never waits for a prebuild slot).
pub async fn time_to_ready(sizes: &Sizes) -> anyhow::Result<TimeToReady> {
    let db = TestDb::new().await;
    let broker = TestBroker::new().await;
    let pg = db.connect().await;
    let claims = sizes.ready_claims * 2;
    let claimed = fixtures::world(&pg, 1, claims, claims).await?[0];
    // The backlog: presets wanting prebuilds, reconciled only in the second phase.
    let per_preset = 100;
    let backlog_presets = fixtures::world(
        &pg,
        sizes.ready_backlog.div_ceil(per_preset),
        per_preset.min(sizes.ready_backlog),
        0,
    )
    .await?;
    let users = fixtures::users(&pg, 1).await?;
    let mut worker_env = quiet();
    // One reconcile pass may queue the whole backlog (the default caps creates at 50 a pass).
    worker_env.push(("PREBUILDS_MAX_CREATES_PER_PASS", "1000"));
    let (_w1, p1) = stack::start("prebuilds-worker", &db, &broker, &worker_env);
    let (_w2, p2) = stack::start("prebuilds-worker", &db, &broker, &worker_env);
    let (_prov, p3) = stack::start(
        "prebuilds-provisioner",
        &db,
        &broker,
        &[
            ("RUST_LOG", "warn"),
            ("PREBUILDS_SIM_DURATION_MIN", READY_BUILD.0),
            ("PREBUILDS_SIM_DURATION_MAX", READY_BUILD.1),
            ("PREBUILDS_SIM_AGENT_READY_DELAY", READY_BUILD.2),
            ("PREBUILDS_PROVISIONER_CONCURRENCY", "8"),
            ("PREBUILDS_PROVISIONER_USER_CONCURRENCY", "4"),
        ],
    );
    for p in [p1, p2, p3] {
        ready(p).await;
    }
    let client = RpcClient::connect(&broker.url, "bench-ready", broker.topology.clone()).await?;
    let claim = |name: String| claim_until_ready(&client, &pg, users[0], claimed, name);
    let mut idle = Vec::new();
    for n in 0..sizes.ready_claims {
        idle.push(claim(format!("ready-idle-{n}")).await?);
    }
    let publisher = Publisher::new(&broker.url, "bench-ready", broker.topology.clone());
    publish_reconciles(&publisher, &backlog_presets).await;
    // Wait until the backlog is really there: creates queued or running.
    let t = Instant::now();
    while open_creates(&pg, &backlog_presets).await? < (sizes.ready_backlog as i64) * 9 / 10 {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(60),
            "time to ready: the backlog was not queued within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut behind = Vec::new();
    for n in 0..sizes.ready_claims {
        behind.push(claim(format!("ready-backlog-{n}")).await?);
    }
    Ok(TimeToReady {
        idle: Latency::of(idle),
        behind_backlog: Latency::of(behind),
        backlog: sizes.ready_backlog,
        backlog_left: open_creates(&pg, &backlog_presets).await?,
    })
}

/// One claim of `preset` for `user`, timed until the claimed workspace's claim build succeeded
/// and its agent is ready.
async fn claim_until_ready(
    client: &RpcClient,
    pg: &tokio_postgres::Client,
    user: Uuid,
    preset: Uuid,
    name: String,
) -> anyhow::Result<Duration> {
    let request = CloudEvent::new(
        "bench",
        chrono::Utc::now(),
        ClaimRequest {
            user_id: user,
            workspace_name: name,
            preset_id: Some(preset),
            template_id: None,
            parameters: vec![],
        },
    );
    let t = Instant::now();
    let reply: CloudEvent<ClaimReply> = client.call(&request, Duration::from_secs(30)).await?;
    anyhow::ensure!(
        reply.data.outcome == ClaimOutcome::Claimed,
        "time to ready: the claim was not served: {:?}",
        reply.data
    );
    let workspace = reply
        .data
        .workspace_id
        .ok_or_else(|| anyhow::anyhow!("a claimed reply without a workspace"))?;
    loop {
        let ready: bool = pg
            .query_one(
                "SELECT coalesce((SELECT j.job_status = 'succeeded' AND b.stage = 'claim'
                                         AND EXISTS (SELECT 1 FROM workspace_agents a
                                                     WHERE a.job_id = j.id
                                                       AND a.lifecycle_state = 'ready')
                                  FROM workspace_builds b
                                  JOIN provisioner_jobs j ON j.id = b.job_id
                                  WHERE b.workspace_id = $1
                                  ORDER BY b.build_number DESC LIMIT 1), false)",
                &[&workspace],
            )
            .await?
            .get(0);
        if ready {
            return Ok(t.elapsed());
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(120),
            "time to ready: workspace {workspace} not ready after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates of `presets` queued or running.
async fn open_creates(pg: &tokio_postgres::Client, presets: &[Uuid]) -> anyhow::Result<i64> {
    Ok(pg
        .query_one(
            "SELECT count(*) FROM workspace_builds b JOIN provisioner_jobs j ON j.id = b.job_id
             WHERE b.template_version_preset_id = ANY($1)
               AND j.job_status IN ('pending', 'running')",
            &[&presets],
        )
        .await?
        .get(0))
}

/// Sim build length of the time-to-ready scenario: (min, max, agent ready delay).
pub const READY_BUILD: (&str, &str, &str) = ("2s", "4s", "1s");
