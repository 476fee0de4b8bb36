//! Multi-node operation on one private Redis, through three real `runtime` processes: beat runs
//! on exactly one leader (once per due time, through SIGKILLs of the leader); work spreads over
//! the nodes; a killed node's tasks come back within one lease; a node that stops cleanly hands
//! back what it reserved so nothing waits for a lease; `GET /nodes` and `runtime nodes`.

use crate::common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use crate::common::{Node, eventually};
use actors::test_util::{RedisCluster, RedisServer};
use serde_json::{Value, json};
use tokio::time::Instant;

/// A node's config: its name, the broker lease (recovery), the beat lease, and extra TOML.
fn config(name: &str, broker_lease: &str, beat_lease: &str, extra: &str) -> String {
    format!(
        r#"
[runtime]
node_name = "{name}"
shutdown_grace = "10s"

[http]
bind = "127.0.0.1:0"

[broker]
lease = "{broker_lease}"

[beat]
lease = "{beat_lease}"

[tasks.rt_noop]
queue = "default"
handler = {{ kind = "native" }}

[tasks.rt_sleep]
queue = "default"
handler = {{ kind = "native" }}
{extra}
"#
    )
}

/// One Redis server, or a Redis Cluster: the same tests run on both.
enum Redis {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    fn server() -> Self {
        Self::Server(RedisServer::start())
    }

    async fn cluster() -> Self {
        Self::Cluster(
            tokio::task::spawn_blocking(RedisCluster::start)
                .await
                .unwrap(),
        )
    }

    fn url(&self) -> String {
        match self {
            Self::Server(server) => server.url(),
            Self::Cluster(cluster) => cluster.url(),
        }
    }

    /// Every key matching `pattern` (on a cluster: of every node, once).
    fn scan(&self, pattern: &str) -> Vec<String> {
        let ports = match self {
            Self::Server(server) => vec![server.port()],
            Self::Cluster(cluster) => cluster.ports(),
        };
        let keys: std::collections::BTreeSet<String> = ports
            .into_iter()
            .flat_map(|port| redis_cli(port, &["--scan", "--pattern", pattern]))
            .collect();
        keys.into_iter().collect()
    }
}

fn start(redis: &Redis, config: &str) -> Node {
    Node::start(config, &[("RT_BROKER_URL", &redis.url())])
}

async fn post(node: &Node, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json().await.unwrap()
}

/// The scheduler's role on `node` (`leader`/`follower`), empty if unknown.
async fn role(node: &Node) -> String {
    match node.actor("root/scheduler").await {
        Some(actor) => actor["snapshot"]["role"].as_str().unwrap_or("").to_string(),
        None => String::new(),
    }
}

/// `redis-cli` against a private server: one line per reply element.
fn redis_cli(port: u16, args: &[&str]) -> Vec<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Events already written (`?follow=false`), as JSON, of `kinds`.
async fn events(node: &Node, kinds: &str) -> Vec<Value> {
    let text = node
        .get(&format!("/events?after=0&follow=false&types={kinds}"))
        .await
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

const BEAT_LEASE_SECS: u64 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_fires_once_per_due_time_while_the_leader_is_killed_twice() {
    beat_with_two_leaders_killed(Redis::server()).await;
}

/// The same on a Redis Cluster (the leader's lease and the runs in one slot, each fire's
/// idempotency key in its queue's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beat_fires_once_per_due_time_on_a_redis_cluster() {
    beat_with_two_leaders_killed(Redis::cluster().await).await;
}

async fn beat_with_two_leaders_killed(redis: Redis) {
    let schedule = r#"
[queues.default]
concurrency = 4

[schedules.tick]
task = "rt_noop"
every = "1s"
missed = "run_once"
"#;
    let mut nodes: Vec<Option<Node>> = ["b1", "b2", "b3"]
        .iter()
        .map(|n| Some(start(&redis, &config(n, "3s", "3s", schedule))))
        .collect();
    let began = Instant::now();
    let mut kills = Vec::new();
    for kill_at in [Duration::from_secs(15), Duration::from_secs(35)] {
        tokio::time::sleep_until(began + kill_at).await;
        let mut leader = None;
        for (i, node) in nodes.iter().enumerate() {
            if kills.iter().any(|(k, _)| *k == i) {
                continue;
            }
            if let Some(node) = node
                && role(node).await == "leader"
            {
                leader = Some(i);
            }
        }
        let i = leader.expect("one node leads");
        let node = nodes[i].as_ref().unwrap();
        node.signal("KILL");
        kills.push((i, Instant::now()));
        eprintln!("killed the leader b{} at {:?}", i + 1, began.elapsed());
        // Keep its log (for the count below) but not the process.
        let mut dead = nodes[i].take().unwrap();
        dead.wait_exit(Duration::from_secs(5));
        nodes[i] = Some(dead);
    }
    tokio::time::sleep_until(began + Duration::from_secs(60)).await;

    // Every due time fired is an idempotency key; every enqueue a `sent` event.
    let mut dues: Vec<u64> = redis
        .scan("rt:*idem:beat:tick:*")
        .iter()
        .map(|k| k.rsplit(':').next().unwrap().parse().unwrap())
        .collect();
    dues.sort_unstable();
    let survivor = nodes
        .iter()
        .enumerate()
        .find(|(i, _)| kills.iter().all(|(k, _)| k != i))
        .map(|(_, n)| n.as_ref().unwrap())
        .unwrap();
    let sent = events(survivor, "sent").await;
    let sent_ticks = sent.iter().filter(|e| e["task"] == "rt_noop").count();
    assert_eq!(
        sent_ticks,
        dues.len(),
        "one enqueue per due time, no double fire"
    );
    // The fires the nodes logged: each due time once, across all nodes.
    let mut logged = BTreeMap::<u64, usize>::new();
    for node in nodes.iter().flatten() {
        for line in node.log().lines().filter(|l| l.contains("beat: fired")) {
            let due: u64 = line
                .split("due_ms=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .expect("due_ms in the fire line");
            *logged.entry(due).or_default() += 1;
        }
    }
    assert!(
        logged.values().all(|n| *n == 1),
        "a due time fired twice: {logged:?}"
    );

    assert!(dues.iter().all(|d| d % 1000 == 0), "aligned to the second");
    let gaps: Vec<u64> = dues.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = gaps.iter().max().copied().unwrap_or(0);
    eprintln!(
        "{} runs over {:?}; longest gap {longest} ms; gaps over 1 s: {:?}",
        dues.len(),
        began.elapsed(),
        gaps.iter().filter(|g| **g > 1000).collect::<Vec<_>>()
    );
    assert!(
        longest <= (BEAT_LEASE_SECS + 1) * 1000,
        "a gap of {longest} ms is longer than one lease + 1 s"
    );
    // ~60 s of one run per second, minus what the two takeovers skipped.
    assert!(dues.len() >= 50, "{} runs", dues.len());
    // Each kill led to a takeover, logged.
    let takeovers: usize = nodes
        .iter()
        .flatten()
        .map(|n| n.log().matches("beat: leadership taken").count())
        .sum();
    assert!(takeovers >= 3, "{takeovers} takeovers");
}

/// `runtime nodes` against `node`.
fn nodes_cli(node: &Node, json: bool) -> String {
    let mut cmd = Command::new(common::binary());
    cmd.arg("nodes").arg("--url").arg(&node.url);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.output().expect("run runtime nodes");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

async fn succeeded_on(node: &Node) -> u64 {
    node.actor("root/queues/default").await.unwrap()["snapshot"]["outcomes"]["succeeded"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_spreads_over_three_nodes_and_a_killed_nodes_tasks_finish_within_one_lease() {
    work_spreads_over_three_nodes(Redis::server()).await;
}

/// The same on a Redis Cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_spreads_over_three_nodes_on_a_redis_cluster() {
    work_spreads_over_three_nodes(Redis::cluster().await).await;
}

async fn work_spreads_over_three_nodes(redis: Redis) {
    let queue = "[queues.default]\nconcurrency = 4\nprefetch = 0\n";
    let nodes: Vec<Node> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| start(&redis, &config(n, "2s", "3s", queue)))
        .collect();
    // Every node is listed, by the others too.
    eventually(
        "three nodes in /nodes",
        Duration::from_secs(5),
        async || {
            nodes[0].get_json("/nodes").await["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 3)
        },
    )
    .await;
    let listed = nodes[2].get_json("/nodes").await;
    let names: Vec<&str> = listed["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["w1", "w2", "w3"]);
    assert_eq!(listed["nodes"][0]["queues"], json!(["default"]));
    let table = nodes_cli(&nodes[1], false);
    assert!(table.starts_with("NODE"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(table.contains("w3"), "{table}");
    let as_json: Value = serde_json::from_str(&nodes_cli(&nodes[1], true)).unwrap();
    assert_eq!(as_json["nodes"].as_array().unwrap().len(), 3);

    // 3,000 short tasks: each node processes a share.
    let batch: Vec<Value> = (0..3000)
        .map(|_| json!({ "task": "rt_sleep", "kwargs": { "ms": 5 } }))
        .collect();
    post(&nodes[0], Value::Array(batch)).await;
    let started = Instant::now();
    let mut counts = Vec::new();
    eventually("3,000 tasks done", Duration::from_secs(120), async || {
        counts.clear();
        for node in &nodes {
            counts.push(succeeded_on(node).await);
        }
        counts.iter().sum::<u64>() >= 3000
    })
    .await;
    eprintln!(
        "3,000 tasks in {:?}, per node {counts:?}",
        started.elapsed()
    );
    assert_eq!(counts.iter().sum::<u64>(), 3000);
    assert!(
        counts.iter().all(|c| *c >= 300),
        "every node takes a share: {counts:?}"
    );

    // Long tasks on every node; SIGKILL one while it runs some.
    let batch: Vec<Value> = (0..24)
        .map(|_| json!({ "task": "rt_sleep", "kwargs": { "ms": 1500 } }))
        .collect();
    let ids: Vec<String> = post(&nodes[0], Value::Array(batch))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let victim = &nodes[2];
    let mut running: Vec<String> = Vec::new();
    eventually(
        "the victim runs tasks",
        Duration::from_secs(10),
        async || {
            let snapshot = victim.actor("root/queues/default").await.unwrap()["snapshot"].clone();
            running = snapshot["running"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string())
                .collect();
            !running.is_empty()
        },
    )
    .await;
    victim.signal("KILL");
    let killed = Instant::now();
    let lease = Duration::from_secs(2);
    for id in &running {
        nodes[0].until_ended(id, Duration::from_secs(20)).await;
    }
    let took = killed.elapsed();
    eprintln!(
        "{} tasks of the killed node done elsewhere {took:?} after the kill",
        running.len()
    );
    // Back within one lease (+ a sweep period), then 1.5 s to run.
    assert!(
        took <= lease + lease / 4 + Duration::from_millis(1500) + Duration::from_secs(1),
        "{took:?}"
    );
    for id in &ids {
        nodes[0].until_ended(id, Duration::from_secs(30)).await;
    }
    // The dead node drops out of /nodes when its record expires.
    eventually(
        "the dead node is gone from /nodes",
        Duration::from_secs(10),
        async || {
            nodes[0].get_json("/nodes").await["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 2)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_cleanly_hands_back_what_it_reserved() {
    let redis = Redis::server();
    // A long lease: anything left to lease recovery would wait 60 s.
    let queue = "[queues.default]\nconcurrency = 2\nprefetch = 6\n";
    let mut nodes: Vec<Node> = ["s1", "s2", "s3"]
        .iter()
        .map(|n| start(&redis, &config(n, "60s", "3s", queue)))
        .collect();
    let batch: Vec<Value> = (0..60)
        .map(|_| json!({ "task": "rt_sleep", "kwargs": { "ms": 1000 } }))
        .collect();
    let ids: Vec<String> = post(&nodes[0], Value::Array(batch))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    // The leaving node holds waiting entries (reserved, not started).
    let leaving = &nodes[2];
    eventually(
        "the leaving node holds waiting entries",
        Duration::from_secs(10),
        async || {
            leaving.actor("root/queues/default").await.unwrap()["snapshot"]["waiting"]
                .as_u64()
                .unwrap()
                > 0
        },
    )
    .await;
    leaving.signal("TERM");
    let stopped = Instant::now();
    let status = nodes[2].wait_exit(Duration::from_secs(15)).expect("exits");
    assert!(status.success(), "{status:?}");
    let log = nodes[2].log();
    let handed: u64 = log
        .lines()
        .filter(|l| l.contains("handed back the entries reserved here but not started"))
        .filter_map(|l| l.split("handed_back=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(handed > 0, "{log}");
    // Everything finishes on the other two at their pace (60 × 1 s over 4 slots ≈ 15 s), far
    // sooner than the 60 s lease.
    for id in &ids {
        nodes[0].until_ended(id, Duration::from_secs(40)).await;
    }
    let took = stopped.elapsed();
    eprintln!("handed back {handed}; all 60 done {took:?} after the SIGTERM");
    assert!(took < Duration::from_secs(30), "{took:?}");
    // Nothing is left in flight, and every task ran once.
    let depth = nodes[0].get_json("/queues").await["queues"]["default"].clone();
    assert_eq!(depth["in_flight"], 0, "{depth}");
    for id in &ids {
        let record = nodes[0].get_json(&format!("/tasks/{id}")).await;
        assert_eq!(record["state"], "succeeded");
        assert_eq!(record["attempts"], 1, "{record}");
    }
    // The stopped node left /nodes at once.
    let listed = nodes[0].get_json("/nodes").await;
    assert_eq!(listed["nodes"].as_array().unwrap().len(), 2, "{listed}");
    nodes.truncate(2);
}
