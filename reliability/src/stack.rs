//! One scenario's world: a fresh database and AMQP prefix (the test harness's [`TestDb`] and
//! [`TestBroker`]), a bulk fixture of presets and claimants, and the real binaries — workers, one
//! scheduler (short reconcile interval, so convergence after a fault never waits long) and the
//! sim provisioner — plus taps on the provisioner job and event routing keys.

use std::time::Duration;

use prebuilds_runtime::amqp::{Broker, QueueKind};
use prebuilds_tests::{
    private_postgres::PrivatePostgres,
    private_rabbit::{NodeOptions, PrivateRabbit},
    probe, stack, Service, TestBroker, TestDb,
};
use rand::Rng;
use uuid::Uuid;

use crate::{
    wire::{Relay, Tap},
    Profile,
};

/// A running binary with its metrics port and the highest VmHWM sampled.
#[derive(Debug)]
pub struct Proc {
    pub service: Service,
    pub port: u16,
}

impl Proc {
    pub fn pid(&self) -> Option<u32> {
        self.service.pid()
    }

    /// Alive = the process exists and is not a zombie (a crashed child stays unreaped).
    pub fn alive(&self) -> bool {
        self.pid().is_some_and(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().next().map(|st| st != "Z"))
                })
                .unwrap_or(false)
        })
    }

    /// Peak resident set (VmHWM) in MiB.
    pub fn peak_rss_mib(&self) -> f64 {
        self.pid()
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|kb| kb.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(0.0)
    }
}

/// Waits until `/readyz` answers 200 (bounded).
pub async fn ready(port: u16, timeout: Duration) -> bool {
    probe::ready_within(port, timeout).await
}

/// Sum of every series of metric `name` on `port` (None when /metrics does not answer).
pub async fn metric_sum(port: u16, name: &str) -> Option<f64> {
    probe::scrape_sum(port, name, &[]).await
}

/// How a stack is wired.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wiring {
    /// Put the provisioner behind a relay that delivers every job and event twice, shuffled.
    pub duplicate_and_reorder: bool,
    /// Run on a private PostgreSQL server and RabbitMQ node of the stack's own (for scenarios
    /// that stop them), not on the machine's.
    pub private_services: bool,
    /// With `private_services`: a three-node RabbitMQ cluster instead of one node; every queue
    /// on all three nodes, worker `i` connected to node `i % 3` first.
    pub broker_cluster: bool,
    /// With `private_services`: a streaming standby of the private PostgreSQL server, every
    /// process on the multi-host URL (`target_session_attrs=read-write`).
    pub postgres_standby: bool,
    /// The workers' `PREBUILDS_RETRY_WINDOW` (their default, 60 s, when `None`).
    pub retry_window: Option<&'static str>,
}

impl Wiring {
    /// Plain wiring on private servers, for the scenarios that restart them.
    pub fn private() -> Wiring {
        Wiring {
            private_services: true,
            ..Wiring::default()
        }
    }
}

/// The stack's private servers, when it has them (`Wiring::private_services`).
#[derive(Debug, Default)]
pub struct PrivateServices {
    postgres: Option<PrivatePostgres>,
    rabbit: Option<PrivateRabbit>,
    /// `Wiring::broker_cluster`: the cluster's nodes (then `rabbit` is `None`).
    pub cluster: Vec<PrivateRabbit>,
    /// `Wiring::postgres_standby`: the standby of `postgres`.
    pub standby: Option<PrivatePostgres>,
}

impl PrivateServices {
    pub fn postgres(&self) -> anyhow::Result<&PrivatePostgres> {
        self.postgres
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this stack runs on the machine's PostgreSQL"))
    }

    pub fn standby(&self) -> anyhow::Result<&PrivatePostgres> {
        self.standby
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this stack has no PostgreSQL standby"))
    }

    pub fn rabbit(&self) -> anyhow::Result<&PrivateRabbit> {
        self.rabbit
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("this stack runs on the machine's RabbitMQ"))
    }
}

#[derive(Debug)]
pub struct Stack {
    pub profile: Profile,
    pub db: TestDb,
    pub broker: TestBroker,
    pub presets: Vec<Uuid>,
    pub users: Vec<Uuid>,
    pub workers: Vec<Proc>,
    pub scheduler: Proc,
    pub provisioner: Proc,
    /// Every provisioner job message the workers published, of both lanes.
    pub jobs_tap: Tap,
    /// Every `provisioner.event.*` message that reached the workers' exchange.
    pub events_tap: Tap,
    /// Workers killed on purpose, and the highest VmHWM any worker reached before it was killed.
    pub killed: usize,
    pub killed_peak_rss_mib: f64,
    relays: Vec<Relay>,
    provisioner_broker: Option<TestBroker>,
    wiring: Wiring,
    /// Last: dropped after every process of the stack.
    pub services: PrivateServices,
}

fn worker_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("RUST_LOG", "error"),
        // PostgreSQL here allows 100 connections: workers, scheduler, provisioner and the checks
        // must fit, killed workers' replacements included.
        ("PREBUILDS_WORKER_CONCURRENCY", "8"),
        ("PREBUILDS_CLAIM_CONCURRENCY", "8"),
        ("PREBUILDS_DB_POOL_SIZE", "16"),
        ("PREBUILDS_SHUTDOWN_TIMEOUT", "5s"),
    ]
}

impl Stack {
    /// Builds the world (`presets` presets desiring `instances`, no prebuilds yet) and starts every
    /// process; the pools begin to fill at once.
    pub async fn start(profile: Profile, wiring: Wiring) -> anyhow::Result<Stack> {
        let mut services = PrivateServices::default();
        let (db, broker) = if wiring.private_services {
            let postgres = services.postgres.insert(PrivatePostgres::start());
            let mut db = TestDb::on(&postgres.server_url()).await;
            if wiring.postgres_standby {
                let standby = PrivatePostgres::standby_of(postgres);
                let multi = format!(
                    "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/{}?target_session_attrs=read-write",
                    postgres.port, standby.port, db.name
                );
                services.standby = Some(standby);
                db.pool = prebuilds_runtime::db::pool(&multi, 8)?;
                db.url = multi;
            }
            let broker = if wiring.broker_cluster {
                services.cluster = PrivateRabbit::cluster(3).await;
                let urls = services
                    .cluster
                    .iter()
                    .map(|n| n.plain_url())
                    .collect::<Vec<_>>()
                    .join(",");
                TestBroker::on_with(Broker::from(urls.as_str()), urls, |t| {
                    t.with_quorum_initial_group_size(Some(3))
                })
                .await
            } else {
                let rabbit = services.rabbit.insert(
                    PrivateRabbit::start(NodeOptions {
                        plain: true,
                        tls: None,
                    })
                    .await,
                );
                let url = rabbit.plain_url();
                TestBroker::on(Broker::from(url.as_str()), url).await
            };
            (db, broker)
        } else {
            (TestDb::new().await, TestBroker::new().await)
        };
        let pg = db.connect().await;
        let presets = world(&pg, profile.presets, profile.instances).await?;
        let users = claimants(&pg, profile.claim_clients.max(1) * 4).await?;

        let exchange = broker.topology.exchange();
        let jobs_tap = Tap::start(
            &broker.url,
            format!("{}.tap-jobs", broker.prefix()),
            exchange.clone(),
            // `#`: both lanes (`provisioner.job.<t>` and `provisioner.job.user.<t>`).
            "provisioner.job.#",
        )
        .await?;
        let events_tap = Tap::start(
            &broker.url,
            format!("{}.tap-events", broker.prefix()),
            exchange.clone(),
            "provisioner.event.*",
        )
        .await?;

        let mut relays = Vec::new();
        let provisioner_broker = if wiring.duplicate_and_reorder {
            // The provisioner lives on a prefix of its own; two relays join the prefixes, each
            // delivering every message twice in shuffled batches.
            let other = TestBroker::on(broker.broker.clone(), broker.url.clone()).await;
            for lane in prebuilds_schemas::Lane::ALL {
                relays.push(Relay::start(
                    &broker.url,
                    broker.queue(QueueKind::provisioner_jobs(lane)),
                    other.topology.exchange(),
                    2,
                    32,
                ));
            }
            relays.push(Relay::start(
                &broker.url,
                other.queue(QueueKind::ProvisionerEvents),
                exchange.clone(),
                2,
                32,
            ));
            Some(other)
        } else {
            None
        };

        let group = if wiring.broker_cluster {
            vec![("PREBUILDS_QUORUM_INITIAL_GROUP_SIZE", "3")]
        } else {
            Vec::new()
        };
        let mut sim = vec![
            ("RUST_LOG", "error"),
            ("PREBUILDS_SIM_DURATION_MIN", profile.sim_duration_min),
            ("PREBUILDS_SIM_DURATION_MAX", profile.sim_duration_max),
            ("PREBUILDS_SIM_FAILURE_RATE", "0"),
            (
                "PREBUILDS_SIM_AGENT_READY_DELAY",
                profile.sim_agent_ready_delay,
            ),
            ("PREBUILDS_PROVISIONER_CONCURRENCY", "64"),
            ("PREBUILDS_PROVISIONER_REMEMBERED_JOBS", "100000"),
            ("PREBUILDS_DB_POOL_SIZE", "4"),
        ];
        sim.extend(group.iter().copied());
        let (service, port) = stack::start(
            "prebuilds-provisioner",
            &db,
            provisioner_broker.as_ref().unwrap_or(&broker),
            &sim,
        );
        let provisioner = Proc { service, port };
        let (service, port) = stack::start(
            "prebuilds-scheduler",
            &db,
            &broker,
            &[
                ("RUST_LOG", "error"),
                ("PREBUILDS_RECONCILE_INTERVAL", "2s"),
                ("PREBUILDS_METRICS_INTERVAL", "5s"),
                ("PREBUILDS_DB_POOL_SIZE", "4"),
            ]
            .into_iter()
            .chain(group.iter().copied())
            .collect::<Vec<_>>(),
        );
        let scheduler = Proc { service, port };
        let mut stack = Stack {
            profile,
            db,
            broker,
            presets,
            users,
            workers: Vec::new(),
            scheduler,
            provisioner,
            jobs_tap,
            events_tap,
            killed: 0,
            killed_peak_rss_mib: 0.0,
            relays,
            provisioner_broker,
            wiring,
            services,
        };
        for _ in 0..profile.workers {
            stack.start_worker();
        }
        for port in stack
            .workers
            .iter()
            .map(|w| w.port)
            .chain([stack.scheduler.port, stack.provisioner.port])
            .collect::<Vec<_>>()
        {
            anyhow::ensure!(
                ready(port, Duration::from_secs(30)).await,
                "a service on port {port} never became ready"
            );
        }
        Ok(stack)
    }

    pub fn start_worker(&mut self) {
        let mut env = worker_env();
        if let Some(window) = self.wiring.retry_window {
            env.push(("PREBUILDS_RETRY_WINDOW", window));
        }
        // In a cluster, worker i connects to node i % 3 first (the list rotated).
        let rotated = (!self.services.cluster.is_empty()).then(|| {
            let urls: Vec<String> = self
                .services
                .cluster
                .iter()
                .map(|n| n.plain_url())
                .collect();
            let first = self.workers.len() % urls.len();
            (0..urls.len())
                .map(|k| urls[(first + k) % urls.len()].clone())
                .collect::<Vec<_>>()
                .join(",")
        });
        if let Some(urls) = &rotated {
            env.push(("AMQP_URL", urls));
            env.push(("PREBUILDS_QUORUM_INITIAL_GROUP_SIZE", "3"));
        }
        let (service, port) = stack::start("prebuilds-worker", &self.db, &self.broker, &env);
        self.workers.push(Proc { service, port });
    }

    /// SIGKILLs a random worker and starts a replacement.
    pub async fn kill_random_worker(&mut self) {
        if self.workers.is_empty() {
            return;
        }
        let i = rand::rng().random_range(0..self.workers.len());
        let mut victim = self.workers.swap_remove(i);
        self.killed_peak_rss_mib = self.killed_peak_rss_mib.max(victim.peak_rss_mib());
        victim.service.kill().await;
        self.killed += 1;
        self.start_worker();
    }

    /// Processes that should be running but are not (crashed), by name.
    pub fn crashed(&self) -> Vec<String> {
        self.workers
            .iter()
            .chain([&self.scheduler, &self.provisioner])
            .filter(|p| !p.alive())
            .map(|p| format!("{} (pid {:?})", p.service.name, p.pid()))
            .collect()
    }

    /// Highest VmHWM of any worker, live or killed.
    pub fn worker_peak_rss_mib(&self) -> f64 {
        self.workers
            .iter()
            .map(Proc::peak_rss_mib)
            .fold(self.killed_peak_rss_mib, f64::max)
    }

    /// Deliveries the live workers hold in in-place retries right now
    /// (`prebuilds_messages_in_retry`, every queue); None when a worker's `/metrics` does not
    /// answer. Queue depths count ready messages only: a delivery in retry is neither queued nor
    /// applied, so "drained" needs this at 0 too.
    pub async fn workers_in_retry(&self) -> Option<f64> {
        let mut total = 0.0;
        for worker in &self.workers {
            total += metric_sum(worker.port, "prebuilds_messages_in_retry").await?;
        }
        Some(total)
    }

    /// Jobs the provisioner executed (not replayed from memory), from its `/metrics`.
    pub async fn provisioner_executed(&self) -> Option<f64> {
        metric_sum(self.provisioner.port, "prebuilds_provisioner_jobs_total").await
    }

    pub async fn provisioner_replayed(&self) -> Option<f64> {
        metric_sum(
            self.provisioner.port,
            "prebuilds_provisioner_jobs_replayed_total",
        )
        .await
    }

    /// Stops the relays, taps and processes (SIGTERM, then SIGKILL on drop) and deletes the
    /// suite's own queues; the harness values drop the database and prefixes.
    pub async fn shutdown(mut self) {
        for relay in self.relays.drain(..) {
            relay.stop().await;
        }
        for w in &mut self.workers {
            w.service.terminate(Duration::from_secs(10)).await;
        }
        self.scheduler
            .service
            .terminate(Duration::from_secs(10))
            .await;
        self.provisioner
            .service
            .terminate(Duration::from_secs(10))
            .await;
        self.jobs_tap.stop().await;
        self.events_tap.stop().await;
        drop(self.provisioner_broker.take());
    }
}

/// Inserts `presets` templates, each with one active version and one preset desiring `instances`
/// (no prebuilds yet). Returns the preset ids.
pub async fn world(
    client: &tokio_postgres::Client,
    presets: usize,
    instances: i32,
) -> anyhow::Result<Vec<Uuid>> {
    prebuilds_tests::bulk::world(client, presets, instances.max(0) as usize, 0).await
}

/// Users who claim.
pub async fn claimants(client: &tokio_postgres::Client, n: usize) -> anyhow::Result<Vec<Uuid>> {
    prebuilds_tests::bulk::users(client, n).await
}
