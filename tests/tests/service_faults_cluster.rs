//! Broker cluster faults on a three-node RabbitMQ cluster of the test's own
//! (`PrivateRabbit::cluster`: own node names, ports and data directories — the machine's broker
//! on 5672 is never touched). The name starts with `service_faults`, so `scripts/test` runs it in
//! its serial step.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use prebuilds_runtime::amqp::{rpc::RpcClient, Broker, Publisher, Topology};
use prebuilds_schemas::{ClaimReply, ClaimRequest, CloudEvent};
use prebuilds_tests::{private_rabbit::PrivateRabbit, probe, stack, Service, TestBroker, TestDb};
use uuid::Uuid;

/// The node (index into `nodes`) serving the connection whose client-provided name is `name`,
/// asked of node `ask` (a live one): the server-side port of a connection is its node's AMQP
/// port.
fn node_of(nodes: &[PrivateRabbit], ask: usize, name: &str) -> Option<usize> {
    let listed = nodes[ask].ctl(&[
        "list_connections",
        "client_properties",
        "port",
        "--no-table-headers",
        "-q",
    ]);
    let listed = String::from_utf8_lossy(&listed.stdout).into_owned();
    let port: u16 = listed
        .lines()
        .find(|l| l.contains(&format!("\"{name}\"")))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())?;
    nodes.iter().position(|n| n.amqp_port == Some(port))
}

/// Whether every queue under `prefix` has all of its `members` members online, asked of `ask`.
fn all_members_online(node: &PrivateRabbit, prefix: &str, members: usize) -> bool {
    let out = node.ctl(&["list_queues", "name", "online", "--no-table-headers", "-q"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let ours: Vec<&str> = text.lines().filter(|l| l.starts_with(prefix)).collect();
    out.status.success()
        && !ours.is_empty()
        && ours.iter().all(|l| l.matches('@').count() == members)
}

/// One claimant's request and what it got.
#[derive(Debug, Clone)]
struct Claimed {
    user: Uuid,
    reply: ClaimReply,
}

/// Claims one after the other (one per claimant, a random preset each) until `stop`, each asked
/// again with the same request id until answered: a reply lost with a node is asked for again,
/// and the worker answers the request's first outcome.
async fn claim_loop(
    url: String,
    topology: Topology,
    users: Vec<Uuid>,
    presets: Vec<Uuid>,
    stop: Arc<AtomicBool>,
) -> Vec<Claimed> {
    let mut rpc = None;
    let mut done = Vec::new();
    for (i, user) in users.into_iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let request = CloudEvent::new(
            "cluster-client",
            chrono::Utc::now(),
            ClaimRequest {
                user_id: user,
                workspace_name: format!("ws{i}"),
                preset_id: Some(presets[(i * 7) % presets.len()]),
                template_id: None,
                parameters: vec![],
            },
        );
        let mut reply = None;
        for _ in 0..30 {
            if rpc.is_none() {
                rpc = RpcClient::connect(url.as_str(), "cluster-claims", topology.clone())
                    .await
                    .ok();
            }
            let Some(client) = rpc.as_ref() else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            match client
                .call::<_, ClaimReply>(&request, Duration::from_secs(5))
                .await
            {
                Ok(r) => {
                    reply = Some(r.data);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "claim not answered; asking again");
                    rpc = None;
                }
            }
        }
        let reply = reply.unwrap_or_else(|| panic!("claim {i} was never answered"));
        done.push(Claimed { user, reply });
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done
}

/// A three-node cluster; two workers, each connected to another node (their `AMQP_URL`s list the
/// nodes in another order), the sim provisioner on the third. While a fill of many presets runs
/// and claims go on, the node the first worker uses is SIGKILLed; once it is back and every queue
/// has its three members again, the node the second worker uses is SIGKILLed. Afterwards: every
/// claim was answered, each claimed workspace is the claimant's own and no workspace was claimed
/// twice, every preset is at its desired count with nothing in progress, no preset made more
/// prebuilds than its desired count plus one replacement per claim, the provisioner executed each
/// job once, and nothing was dead-lettered.
#[tokio::test]
async fn killing_the_node_each_worker_uses_in_a_three_node_cluster_loses_and_duplicates_nothing() {
    const PRESETS: usize = 200;
    const CLAIMANTS: usize = 400;
    let nodes = PrivateRabbit::cluster(3).await;
    let urls: Vec<String> = nodes.iter().map(|n| n.plain_url()).collect();
    // Node i first, then the others.
    let from = |i: usize| -> String {
        (0..urls.len())
            .map(|k| urls[(i + k) % urls.len()].clone())
            .collect::<Vec<_>>()
            .join(",")
    };
    let db = TestDb::new().await;
    let broker = TestBroker::on_with(Broker::from(from(2)), from(2), |t| {
        t.with_quorum_initial_group_size(Some(3))
    })
    .await;
    let prefix = broker.prefix().to_owned();
    let (presets, users) = {
        let c = db.connect().await;
        let presets = prebuilds_tests::bulk::world(&c, PRESETS, 1, 0)
            .await
            .expect("presets");
        let users = prebuilds_tests::bulk::users(&c, CLAIMANTS)
            .await
            .expect("claimants");
        (presets, users)
    };
    let env = |amqp: &str| -> Vec<(String, String)> {
        [
            ("AMQP_URL", amqp),
            ("PREBUILDS_SIM_DURATION_MIN", "0"),
            ("PREBUILDS_SIM_DURATION_MAX", "300ms"),
            ("PREBUILDS_SIM_AGENT_READY_DELAY", "0"),
            ("PREBUILDS_PROVISIONER_CONCURRENCY", "32"),
            ("PREBUILDS_PROVISIONER_REMEMBERED_JOBS", "100000"),
            ("PREBUILDS_QUORUM_INITIAL_GROUP_SIZE", "3"),
            ("PREBUILDS_SHUTDOWN_TIMEOUT", "5s"),
            ("RUST_LOG", "warn"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let start = |binary: &str, amqp: String| -> (Service, u16) {
        let env = env(&amqp);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        stack::start(binary, &db, &broker, &env)
    };
    let workers = [
        start("prebuilds-worker", from(0)),
        start("prebuilds-worker", from(1)),
    ];
    let (provisioner, provisioner_port) = start("prebuilds-provisioner", from(2));
    for port in workers.iter().map(|w| w.1).chain([provisioner_port]) {
        assert!(
            probe::ready_within(port, Duration::from_secs(60)).await,
            "service on {port} ready"
        );
    }
    // Where each worker consumes reconcile jobs from (asked of node 2, which never dies).
    let homes: Vec<usize> = workers
        .iter()
        .map(|(w, _)| {
            let name = format!(
                "prebuilds-worker/{}/reconcile",
                w.pid().expect("worker pid")
            );
            node_of(&nodes, 2, &name).unwrap_or_else(|| panic!("connection {name}"))
        })
        .collect();
    assert_eq!(homes, [0, 1], "each worker on a node of its own");

    let publisher = Publisher::new(from(2), "test", broker.topology.clone());
    for preset in &presets {
        stack::request_reconcile(&publisher, *preset).await;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let claims = tokio::spawn(claim_loop(
        urls[2].clone(),
        broker.topology.clone(),
        users.clone(),
        presets.clone(),
        stop.clone(),
    ));
    let made = || async {
        let c = db.pool.get().await.expect("db");
        c.query_one(
            "SELECT count(*) FROM workspaces w JOIN workspace_builds b ON b.workspace_id = w.id
             WHERE w.owner_id = $1 AND NOT w.deleted AND b.build_number = 1",
            &[&prebuilds_schemas::PREBUILDS_USER_ID],
        )
        .await
        .expect("count")
        .get::<_, i64>(0)
    };
    // Mid-fill: a quarter of the pools made.
    stack::wait_for(
        Duration::from_secs(120),
        "a quarter of the fill",
        || async { made().await >= (PRESETS / 4) as i64 },
    )
    .await;
    // Each worker's node in turn: killed, the worker back on another node before its node
    // returns; the first node is rebooted, and every queue whole again, before the second kill.
    for (turn, which) in ["first", "second"].into_iter().enumerate() {
        let home = homes[turn];
        nodes[home].kill();
        tracing::info!(node = %nodes[home].node, "killed the {which} worker's node");
        let name = format!(
            "prebuilds-worker/{}/reconcile",
            workers[turn].0.pid().expect("pid")
        );
        stack::wait_for(
            Duration::from_secs(60),
            &format!("the {which} worker consuming again"),
            || async { node_of(&nodes, 2, &name).is_some_and(|n| n != home) },
        )
        .await;
        if turn == 0 {
            nodes[home].boot().await;
            stack::wait_for(
                Duration::from_secs(120),
                "every queue with three members online",
                || async { all_members_online(&nodes[2], &prefix, 3) },
            )
            .await;
        }
    }
    // Claims go on a little past the second kill, then stop.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let claimed = claims.await.expect("claim loop");
    assert!(!claimed.is_empty(), "claims ran");

    // Nothing lost: every preset at its desired count, nothing in progress.
    let full = || stack::all_settled_at_one(&db, &presets);
    stack::wait_for(Duration::from_secs(240), "converged after the kills", full).await;

    // Nothing duplicated: each claim got its own workspace, owned by its claimant, and each
    // preset made one prebuild plus one replacement per claim it served.
    let mut per_preset: HashMap<Uuid, i64> = HashMap::new();
    let mut workspaces = HashSet::new();
    let c = db.pool.get().await.expect("db");
    for Claimed { user, reply } in &claimed {
        match reply.outcome.as_str() {
            "claimed" => {
                let ws = reply.workspace_id.expect("claimed workspace");
                assert!(workspaces.insert(ws), "workspace {ws} claimed twice");
                let row = c
                    .query_one(
                        "SELECT w.owner_id, b.template_version_preset_id FROM workspaces w
                         JOIN workspace_builds b ON b.workspace_id = w.id AND b.build_number = 1
                         WHERE w.id = $1",
                        &[&ws],
                    )
                    .await
                    .expect("claimed workspace row");
                assert_eq!(row.get::<_, Uuid>(0), *user, "owned by its claimant");
                *per_preset.entry(row.get(1)).or_default() += 1;
            }
            "no_eligible_prebuild" => {}
            other => panic!("claim answered {other}: {reply:?}"),
        }
    }
    let owned: i64 = c
        .query_one(
            "SELECT count(*) FROM workspaces WHERE owner_id = ANY($1)",
            &[&users],
        )
        .await
        .expect("owned")
        .get(0);
    assert_eq!(owned as usize, workspaces.len(), "one workspace per claim");
    for preset in &presets {
        let counts = stack::pool_counts(&db, *preset).await;
        let served = per_preset.get(preset).copied().unwrap_or(0);
        assert_eq!(counts.created, 1 + served, "preset {preset}: {counts:?}");
    }
    let jobs: i64 = c
        .query_one("SELECT count(*) FROM provisioner_jobs", &[])
        .await
        .expect("jobs")
        .get(0);
    let executed = probe::scrape_sum(provisioner_port, "prebuilds_provisioner_jobs_total", &[])
        .await
        .expect("provisioner metrics");
    assert_eq!(executed as i64, jobs, "every job executed once");
    let reader = TestBroker::on(Broker::from(urls[2].as_str()), urls[2].clone()).await;
    let dead = reader
        .drain(&broker.topology.dead_queue(), Duration::from_secs(2))
        .await;
    assert!(dead.is_empty(), "{} dead-lettered", dead.len());
    eprintln!(
        "cluster kill: {PRESETS} presets, {} claims ({} claimed), {jobs} jobs",
        claimed.len(),
        workspaces.len()
    );
    drop(provisioner);
}

/// The root cause of the pools that never refilled after a node kill, reproduced directly: a
/// publisher on a surviving node whose channel first publishes to a quorum queue while that
/// queue's leader node is down (killed a moment ago, not replaced yet) is refused (nacked) —
/// RabbitMQ 3.x fixes the queue's members, leader first, in the channel at its first publish, and
/// such a channel keeps refusing every later publish to the queue. The publisher must open a
/// fresh channel after a nack: then its publishes go through once a new leader is elected.
#[tokio::test]
async fn a_publisher_refused_by_a_quorum_queue_whose_leader_died_recovers_on_a_fresh_channel() {
    use prebuilds_runtime::amqp::{PublishError, QueueKind};
    use prebuilds_schemas::{ReconcilePreset, ReconcileReason};

    let nodes = PrivateRabbit::cluster(3).await;
    // Declared through node 0: node 0 hosts every queue's first leader.
    let declarer = TestBroker::on_with(
        Broker::from(nodes[0].plain_url()),
        nodes[0].plain_url(),
        |t| t.with_quorum_initial_group_size(Some(3)),
    )
    .await;
    let queue = declarer.queue(QueueKind::Reconcile);
    let leader = |ask: &PrivateRabbit| {
        let out = ask.ctl(&["list_queues", "name", "leader", "--no-table-headers", "-q"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with(&format!("{queue}\t")))
            .and_then(|l| l.split('\t').nth(1))
            .map(str::to_owned)
    };
    assert_eq!(leader(&nodes[1]).as_deref(), Some(nodes[0].node.as_str()));
    // Connected to node 1 only, and nothing published on it yet.
    let publisher = Publisher::new(nodes[1].plain_url(), "test", declarer.topology.clone());
    publisher
        .ensure_connected()
        .await
        .expect("connect to node 1");

    nodes[0].kill();
    let started = std::time::Instant::now();
    let mut refused = 0;
    let mut published = 0;
    while published < 20 {
        let job = CloudEvent::new(
            "test",
            chrono::Utc::now(),
            ReconcilePreset {
                preset_id: Uuid::new_v4(),
                reason: ReconcileReason::Manual,
                requested_at: chrono::Utc::now(),
            },
        );
        match publisher.publish_event(&job).await {
            Ok(()) => published += 1,
            Err(PublishError::Nacked(_)) => refused += 1,
            Err(e) => tracing::warn!(error = %e, "publish failed"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still refused after {:?}: {refused} nacks, {published} published; leader now {:?}",
            started.elapsed(),
            leader(&nodes[1])
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "after the leader's node died: {refused} publishes refused, then 20 published in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// A node of `AMQP_URL` that is dead (nothing listens: refused) or black-holed (it accepts TCP
/// and then never answers, like a wedged broker) costs at most the per-node connect timeout: the
/// connection is made on the next node of the list.
#[tokio::test]
async fn a_dead_or_black_holed_node_in_the_list_costs_at_most_the_connect_timeout() {
    use prebuilds_runtime::amqp::broker::NODE_CONNECT_TIMEOUT;

    // Accepts connections and never says a word.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let hole = black_hole.local_addr().expect("addr").port();
    let held = tokio::spawn(async move {
        let mut accepted = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            accepted.push(socket);
        }
    });
    let dead = stack::free_port();
    let live = prebuilds_tests::broker::amqp_url();
    let urls = format!(
        "amqp://guest:guest@127.0.0.1:{dead}/%2f,amqp://guest:guest@127.0.0.1:{hole}/%2f,{live}"
    );
    let started = std::time::Instant::now();
    let connection = tokio::time::timeout(
        Duration::from_secs(60),
        Broker::from(urls.as_str()).connect("black-hole-test"),
    )
    .await
    .expect("the connect attempt ends")
    .expect("connected to the live node");
    let took = started.elapsed();
    assert!(connection.status().connected());
    assert!(
        took < NODE_CONNECT_TIMEOUT + Duration::from_secs(3),
        "connecting past a dead and a black-holed node took {took:?}"
    );
    assert!(
        took >= NODE_CONNECT_TIMEOUT,
        "the black-holed node was tried: {took:?}"
    );
    let _ = connection.close(200, "bye".into()).await;
    held.abort();
}
