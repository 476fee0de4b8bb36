//! The chaos suite: real `runtime` processes on one private Redis (AOF on) while things die.
//!
//! `tasks_survive_actor_kills_node_sigkills_and_a_redis_restart` runs two nodes sharing the
//! Redis; a producer posts tasks over three queues (native `rt_sleep`, `rt_noop`, `rt_fail`
//! and an `exec` shell script that writes a side-effect ledger, a subset of them with
//! idempotency keys and submitted twice) while the test kills a random actor of a random live
//! node every 100 ms (`POST /chaos/kill`) and, every other time, a random running task of that
//! node too (`POST /chaos/kill/root/queues/Q/TASK_ID`), SIGKILLs node B mid-run and restarts
//! it, and restarts Redis mid-run. It then checks: every task completed or dead-lettered as configured
//! (0 lost, from `GET /tasks/{id}`), duplicate executions only around a disruption (a kill of
//! the task's consumer, its supervisor or a broker actor, a kill of a task on its queue, a node
//! SIGKILL, the Redis restart), at least one task killed,
//! 0 duplicate side effects for the idempotent tasks, 0 zombie children of the nodes, no
//! leftover task process, no panic in any log, and the tree whole again ≤ 1 s after each
//! actor kill. It prints a summary (run with `--nocapture` to see it).
//!
//! Profiles: the default (CI) one — 1,500 tasks, 1 node SIGKILL + restart, 1 Redis restart —
//! runs in well under a minute; `RT_CHAOS_LONG=1` runs the issue's numbers — 10,000 tasks,
//! 3 node SIGKILLs each followed by a restart, 1 Redis restart.
//!
//! The other tests drive `runtime chaos kill` (by path, by kind, repeated; chaos disabled;
//! node unreachable; a pool agent; running `exec` tasks killed one by one with `--kind task`
//! and by their path, then retried, with no process left behind).

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use crate::common::{Node, Scratch};
use actors::test_util::{RedisCluster, RedisServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runtime::client::chaos::{Actor, flatten};
use serde_json::{Value, json};
use tokio::time::Instant;

/// The numbers of one run.
#[derive(Debug, Clone)]
struct Profile {
    name: &'static str,
    tasks: usize,
    /// Tasks per `POST /tasks` batch, one batch per `batch_every`.
    batch: usize,
    batch_every: Duration,
    /// Fractions of the production time at which node B is SIGKILLed (and restarted).
    node_kills: Vec<f64>,
    /// Fraction of the production time at which Redis is restarted.
    redis_restart: f64,
    /// Time between two actor kills.
    kill_every: Duration,
    /// Time for the queues to drain once production and chaos stop.
    settle: Duration,
}

impl Profile {
    fn chosen() -> Self {
        if std::env::var("RT_CHAOS_LONG").is_ok_and(|v| v == "1") {
            Profile {
                name: "long",
                tasks: 10_000,
                batch: 250,
                batch_every: Duration::from_secs(1),
                node_kills: vec![0.15, 0.40, 0.70],
                redis_restart: 0.55,
                kill_every: Duration::from_millis(100),
                settle: Duration::from_secs(300),
            }
        } else {
            Profile {
                name: "ci",
                tasks: 1_500,
                batch: 100,
                batch_every: Duration::from_secs(1),
                node_kills: vec![0.30],
                redis_restart: 0.60,
                kill_every: Duration::from_millis(100),
                settle: Duration::from_secs(60),
            }
        }
    }

    fn production(&self) -> Duration {
        self.batch_every * (self.tasks.div_ceil(self.batch) as u32)
    }
}

/// Where the nodes' broker is, and what "a Redis restart" means there.
enum Broker {
    /// One server with its AOF on; the ledger lives on it too.
    Server(RedisServer),
    /// A Redis Cluster (3 masters + 3 replicas, replicated acknowledgement on); the ledger
    /// lives on a server of its own (its writes are not waited for: a failover could lose a
    /// side effect the test then could not tell from a missing one).
    Cluster {
        cluster: RedisCluster,
        ledger: RedisServer,
    },
}

impl Broker {
    fn url(&self) -> String {
        match self {
            Self::Server(server) => server.url(),
            Self::Cluster { cluster, .. } => cluster.url(),
        }
    }

    fn ledger_port(&self) -> u16 {
        match self {
            Self::Server(server) => server.port(),
            Self::Cluster { ledger, .. } => ledger.port(),
        }
    }

    /// `[broker]` lines of the nodes' config beyond the common ones.
    fn config(&self) -> &'static str {
        match self {
            Self::Server(_) => "",
            Self::Cluster { .. } => "ack_replicas = 1\nack_replicas_timeout = \"2s\"\n",
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Server(_) => "one Redis (AOF)",
            Self::Cluster { .. } => "a Redis Cluster (3 masters + 3 replicas, ack_replicas 1)",
        }
    }

    /// The Redis disruption (blocking): one server is SIGKILLed and restarted on its AOF; on
    /// a cluster the `chat` queue's master is SIGKILLed, its replica takes over, and the old
    /// master comes back as a replica.
    fn disrupt(&mut self) {
        match self {
            Self::Server(server) => {
                server.stop();
                std::thread::sleep(Duration::from_millis(300));
                server.restart();
            }
            Self::Cluster { cluster, .. } => {
                let victim = cluster.fail_over("rt:{chat}:stream", Duration::from_secs(20));
                cluster.restart(victim);
                assert!(
                    cluster.wait_synced(Duration::from_secs(20)),
                    "the old master did not rejoin:\n{}",
                    cluster.describe()
                );
            }
        }
    }
}

/// A node's config; `script` is the ledger task's shell script, `broker` more `[broker]` lines.
fn config(script: &str, broker: &str) -> String {
    format!(
        r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[broker]
lease = "2s"
max_deliveries = 200
{broker}
[supervision]
max_restarts = 10000
within = "10s"
backoff = "1ms"
backoff_max = "10ms"

[chaos]
enabled = true

[queues.chat]
concurrency = 4
[queues.default]
concurrency = 4
[queues.background]
concurrency = 3

[tasks.rt_sleep]
queue = "chat"
handler = {{ kind = "native" }}
max_retries = 100
backoff = "10ms"
backoff_max = "100ms"

[tasks.rt_noop]
queue = "default"
handler = {{ kind = "native" }}
max_retries = 100
backoff = "10ms"
backoff_max = "100ms"

[tasks.rt_fail]
queue = "default"
handler = {{ kind = "native" }}
max_retries = 100
backoff = "10ms"
backoff_max = "100ms"

[tasks.ledger]
queue = "background"
handler = {{ kind = "exec", command = "/bin/sh", args = ["{script}"] }}
max_retries = 100
backoff = "10ms"
backoff_max = "100ms"
"#
    )
}

/// The ledger task: reads the envelope, appends `MARK START_MS` to `runs` (every execution),
/// and for an `idem-` mark performs its side effect once per key: one Lua script on the
/// private Redis takes the key (`SET chaos:idem:MARK NX`) and, only if it got it, appends the
/// mark to the `chaos:effects` list — guard and effect in one atomic step, stored with the
/// AOF, so neither a re-run nor the Redis restart can repeat or lose it. Redis unreachable →
/// exit 75 (retryable).
fn ledger_script(dir: &std::path::Path, redis_port: u16) -> String {
    let d = dir.display();
    format!(
        r#"read -r envelope
mark=$(printf '%s\n' "$envelope" | grep -o '"mark":"[^"]*"' | cut -d'"' -f4)
echo "$mark $(date +%s%3N)" >> {d}/runs
case "$mark" in
  idem-*)
    out=$(redis-cli -p {redis_port} EVAL "if redis.call('SET', KEYS[1], '1', 'NX') then return redis.call('RPUSH', 'chaos:effects', ARGV[1]) end return 0" 1 "chaos:idem:$mark" "$mark") || exit 75
    case "$out" in ''|*[!0-9]*) exit 75 ;; esac ;;
esac
echo '{{"ok": true}}'
"#
    )
}

/// What a submitted task is and what it must end as.
#[derive(Debug, Clone)]
struct Submitted {
    id: String,
    task: &'static str,
    queue: &'static str,
    /// The ledger mark of an exec task.
    mark: Option<String>,
    expect_dead: bool,
}

/// The task number `n` of the run, as the body of `POST /tasks` and what is expected of it.
fn task(n: usize) -> (Value, Submitted) {
    let id = format!("chaos-{n:05}");
    let (body, task, queue, mark, expect_dead) = match n % 10 {
        0..=2 => (
            json!({ "task": "rt_sleep", "id": id, "kwargs": { "ms": 10 + n % 50 } }),
            "rt_sleep",
            "chat",
            None,
            false,
        ),
        3 | 4 => (
            json!({ "task": "rt_noop", "id": id }),
            "rt_noop",
            "default",
            None,
            false,
        ),
        5 => (
            json!({ "task": "rt_fail", "id": id, "kwargs": { "permanent": true, "message": "chaos permanent" } }),
            "rt_fail",
            "default",
            None,
            true,
        ),
        6..=8 => {
            let queue = if n % 2 == 0 { "default" } else { "background" };
            let mark = format!("t-{n}");
            (
                json!({ "task": "ledger", "id": id, "queue": queue, "kwargs": { "mark": mark } }),
                "ledger",
                queue,
                Some(mark),
                false,
            )
        }
        _ => {
            let mark = format!("idem-{n}");
            (
                json!({ "task": "ledger", "id": id, "idempotency_key": mark, "kwargs": { "mark": mark } }),
                "ledger",
                "background",
                Some(mark),
                false,
            )
        }
    };
    (
        body,
        Submitted {
            id,
            task,
            queue,
            mark,
            expect_dead,
        },
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Something that can make a task run twice: from `start` to `end` (unix ms), on `queue`
/// (`None`: every queue).
#[derive(Debug, Clone)]
struct Disruption {
    /// `node SIGKILL`, `Redis restart`, `consumer kill`, `supervisor kill`, `broker kill`,
    /// `task kill` (one running task of the queue), or `other kill` (cannot re-run a task).
    what: String,
    start: u64,
    end: u64,
    queue: Option<String>,
}

/// One actor kill and how long the tree took to be whole again.
#[derive(Debug, Clone)]
struct Kill {
    kind: String,
    took: Duration,
}

async fn actors(http: &reqwest::Client, url: &str) -> Vec<Actor> {
    let tree: Value = http
        .get(format!("{url}/actors"))
        .send()
        .await
        .expect("GET /actors")
        .json()
        .await
        .expect("/actors JSON");
    flatten(&tree)
}

/// Kills a random actor (never the root) of the node at `url`; returns what and how long the
/// tree took to be whole again (every actor running, the victim started again).
async fn kill_one(http: &reqwest::Client, url: &str, rng: &mut StdRng) -> (String, Kill) {
    let tree = actors(http, url).await;
    let candidates: Vec<_> = tree
        .iter()
        .filter(|a| a.0 != "root" && a.3 == "running")
        .collect();
    assert!(!candidates.is_empty(), "no running actor: {tree:?}");
    let (path, kind, _, _, started_at) = candidates[rng.random_range(0..candidates.len())].clone();
    let response = http
        .post(format!("{url}/chaos/kill/{path}"))
        .send()
        .await
        .expect("POST /chaos/kill");
    assert_eq!(response.status(), 202, "kill {path}");
    let at = Instant::now();
    loop {
        let tree = actors(http, url).await;
        let whole = tree.iter().all(|a| a.3 == "running")
            && tree.iter().any(|a| a.0 == path && a.4 != started_at);
        if whole {
            return (
                path,
                Kill {
                    kind,
                    took: at.elapsed(),
                },
            );
        }
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "the tree is not whole 10 s after killing {path}: {tree:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Kills a random running task of the node at `url` through the chaos route
/// (`root/queues/Q/TASK_ID`), as `runtime chaos kill --kind task` does: the tasks the
/// consumers' snapshots list, in a random order, until one still runs (a snapshot is up to a
/// second old and these tasks are short). Returns its queue, or `None` if none was running.
async fn kill_a_task(http: &reqwest::Client, url: &str, rng: &mut StdRng) -> Option<String> {
    let tree: Value = http
        .get(format!("{url}/actors"))
        .send()
        .await
        .expect("GET /actors")
        .json()
        .await
        .expect("/actors JSON");
    fn walk(nodes: &Value, out: &mut Vec<(String, String)>) {
        for node in nodes.as_array().into_iter().flatten() {
            if node["kind"] == "consumer" {
                for task in node["snapshot"]["running"].as_array().into_iter().flatten() {
                    let path = node["path"].as_str().unwrap_or("").to_string();
                    out.push((path, task["id"].as_str().unwrap_or("").to_string()));
                }
            }
            walk(&node["children"], out);
        }
    }
    let mut running = Vec::new();
    walk(&tree, &mut running);
    for _ in 0..running.len().min(8) {
        let (consumer, id) = running.swap_remove(rng.random_range(0..running.len()));
        let response = http
            .post(format!("{url}/chaos/kill/{consumer}/{id}"))
            .send()
            .await
            .expect("POST /chaos/kill");
        match response.status().as_u16() {
            202 => return consumer.strip_prefix("root/queues/").map(str::to_string),
            // Finished since the snapshot, or its consumer is being restarted.
            404 => continue,
            other => panic!("killing task {id} of {consumer}: {other}"),
        }
    }
    None
}

async fn wait_healthy(http: &reqwest::Client, url: &str, limit: Duration) {
    common::eventually(
        &format!("{url}/health to answer 200"),
        limit,
        async || match http.get(format!("{url}/health")).send().await {
            Ok(r) if r.status() == 200 => Ok(()),
            Ok(r) => Err(r.status().to_string()),
            Err(e) => Err(e.to_string()),
        },
    )
    .await;
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[at]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_actor_kills_node_sigkills_and_a_redis_restart() {
    chaos(Broker::Server(RedisServer::start_with_aof())).await;
}

/// The same on a Redis Cluster, where "the Redis restart" is a master's failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_survive_actor_kills_node_sigkills_and_a_master_failover_on_a_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    chaos(Broker::Cluster {
        cluster,
        ledger: RedisServer::start_with_aof(),
    })
    .await;
}

async fn chaos(mut redis: Broker) {
    let profile = Profile::chosen();
    let began = Instant::now();
    let ledger = Scratch::new();
    let script = ledger.write(
        "ledger.sh",
        &ledger_script(ledger.path(), redis.ledger_port()),
    );
    let config = config(&script.display().to_string(), redis.config());
    let redis_url = redis.url();
    let start = |config: &str| Node::start(config, &[("RT_BROKER_URL", &redis_url)]);
    let node_a = start(&config);
    let mut node_b = Some(start(&config));
    let mut retired: Vec<Node> = Vec::new();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    // The producer: one batch per `batch_every` to node A (never killed); it holds `gate`
    // while it posts, and the chaos holds it while Redis is down (no post is cut in half). The
    // idempotent tasks of each batch are submitted again with the next one.
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let produced = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (http, url, profile) = (http.clone(), node_a.url.clone(), profile.clone());
        let (gate, produced) = (Arc::clone(&gate), Arc::clone(&produced));
        tokio::spawn(async move {
            let mut submitted = Vec::new();
            let mut resent: Vec<(String, String)> = Vec::new();
            let mut again: Vec<Value> = Vec::new();
            let mut tick = Instant::now();
            let mut n = 0;
            while n < profile.tasks || !again.is_empty() {
                let mut bodies = std::mem::take(&mut again);
                let first = bodies.clone();
                for k in n..(n + profile.batch).min(profile.tasks) {
                    let (body, sub) = task(k);
                    if body.get("idempotency_key").is_some() {
                        again.push(body.clone());
                    }
                    bodies.push(body);
                    submitted.push(sub);
                }
                n = (n + profile.batch).min(profile.tasks);
                loop {
                    let posting = gate.lock().await;
                    let response = http
                        .post(format!("{url}/tasks"))
                        .json(&Value::Array(bodies.clone()))
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status() == 202 => {
                            let answer: Value = r.json().await.unwrap();
                            for (body, sent) in first.iter().zip(answer.as_array().unwrap()) {
                                resent.push((
                                    body["id"].as_str().unwrap().to_string(),
                                    sent.to_string(),
                                ));
                            }
                            break;
                        }
                        other => {
                            drop(posting);
                            eprintln!("producer: batch refused ({other:?}); retrying");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
                produced.store(n, Ordering::SeqCst);
                tick += profile.batch_every;
                tokio::time::sleep_until(tick).await;
            }
            (submitted, resent)
        })
    };

    // The chaos: an actor kill every `kill_every`; node B SIGKILLed and restarted; Redis
    // restarted.
    let production = profile.production();
    let mut rng = StdRng::seed_from_u64(42);
    let mut kills: Vec<Kill> = Vec::new();
    // Every other tick also kills a running task (`None`: none was running then).
    let mut task_kills: Vec<Option<String>> = Vec::new();
    let mut disruptions: Vec<Disruption> = Vec::new();
    let mut node_kills_done = 0;
    let mut node_restarts = 0;
    let mut redis_restarts = 0;
    let chaos_began = Instant::now();
    let mut tick = Instant::now();
    while !producer.is_finished() {
        let elapsed = chaos_began.elapsed().as_secs_f64() / production.as_secs_f64();
        if node_kills_done < profile.node_kills.len()
            && elapsed >= profile.node_kills[node_kills_done]
        {
            let mut dead = node_b.take().unwrap();
            let at = now_ms();
            dead.signal("KILL");
            dead.wait_exit(Duration::from_secs(5))
                .expect("node B exits on SIGKILL");
            node_kills_done += 1;
            eprintln!(
                "chaos: SIGKILLed node B (pid {}) at {:?}",
                dead.pid(),
                chaos_began.elapsed()
            );
            retired.push(dead);
            let restarted = tokio::task::block_in_place(|| start(&config));
            node_restarts += 1;
            disruptions.push(Disruption {
                what: "node SIGKILL".into(),
                start: at,
                // Its entries come back after one lease (2 s) and the sweep.
                end: now_ms() + 5_000,
                queue: None,
            });
            node_b = Some(restarted);
        }
        if redis_restarts == 0 && elapsed >= profile.redis_restart {
            let held = gate.lock().await;
            let at = now_ms();
            tokio::task::block_in_place(|| redis.disrupt());
            redis_restarts += 1;
            for url in [&node_a.url, &node_b.as_ref().unwrap().url] {
                wait_healthy(&http, url, Duration::from_secs(20)).await;
            }
            eprintln!(
                "chaos: Redis restarted at {:?}, healthy after {} ms",
                chaos_began.elapsed(),
                now_ms() - at
            );
            disruptions.push(Disruption {
                what: "Redis restart".into(),
                start: at,
                end: now_ms() + 5_000,
                queue: None,
            });
            drop(held);
            tick = Instant::now();
        }
        let on_b = rng.random_bool(0.5);
        let url = if on_b {
            node_b.as_ref().unwrap().url.clone()
        } else {
            node_a.url.clone()
        };
        let at = now_ms();
        let (path, kill) = kill_one(&http, &url, &mut rng).await;
        let queue = match path.strip_prefix("root/queues/") {
            Some(q) => Some(q.to_string()),
            None if path == "root/queues" || kill.kind == "broker" => None,
            None => Some(String::from("-")), // cannot re-run a task
        };
        disruptions.push(Disruption {
            what: format!(
                "{} kill",
                if kill.kind == "consumer" || kill.kind == "broker" || kill.kind == "supervisor" {
                    kill.kind.as_str()
                } else {
                    "other"
                }
            ),
            start: at,
            end: now_ms(),
            queue,
        });
        kills.push(kill);
        if kills.len() % 2 == 0 {
            let at = now_ms();
            let queue = kill_a_task(&http, &url, &mut rng).await;
            if let Some(queue) = &queue {
                disruptions.push(Disruption {
                    what: "task kill".into(),
                    start: at,
                    end: now_ms(),
                    queue: Some(queue.clone()),
                });
            }
            task_kills.push(queue);
        }
        tick += profile.kill_every;
        if tick < Instant::now() {
            tick = Instant::now();
        }
        tokio::time::sleep_until(tick).await;
    }
    let chaos_time = chaos_began.elapsed();
    let (submitted, resent) = producer.await.unwrap();
    assert_eq!(produced.load(Ordering::SeqCst), profile.tasks);
    let node_b = node_b.unwrap();

    // Settle: nothing ready, delayed or in flight.
    let at = Instant::now();
    loop {
        let queues: Value = http
            .get(format!("{}/queues", node_a.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let busy: u64 = ["chat", "default", "background"]
            .iter()
            .map(|q| {
                let d = &queues["queues"][q];
                d["ready"].as_u64().unwrap()
                    + d["delayed"].as_u64().unwrap()
                    + d["in_flight"].as_u64().unwrap()
            })
            .sum();
        if busy == 0 {
            break;
        }
        if at.elapsed() > profile.settle {
            eprintln!("not settled within {:?}: {queues}", profile.settle);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settle_time = at.elapsed();

    // Every task's record.
    let mut lost = Vec::new();
    let mut unexpected = Vec::new();
    let (mut succeeded, mut dead, mut retried_attempts) = (0, 0, 0u64);
    for sub in &submitted {
        let response = http
            .get(format!("{}/tasks/{}", node_a.url, sub.id))
            .send()
            .await
            .unwrap();
        if response.status() == 404 {
            if lost.is_empty() {
                eprintln!("first lost: {} {:?}", sub.id, response.text().await);
            }
            lost.push(sub.id.clone());
            continue;
        }
        let record: Value = response.json().await.unwrap();
        retried_attempts += record["attempts"].as_u64().unwrap_or(1).saturating_sub(1);
        match (record["state"].as_str(), sub.expect_dead) {
            (Some("succeeded"), false) => succeeded += 1,
            (Some("dead"), true) => dead += 1,
            // Not ended (yet): counted with the lost.
            (Some("retrying" | "queued" | "scheduled" | "running"), _) => lost.push(sub.id.clone()),
            _ => unexpected.push(format!("{} ({}): {record}", sub.id, sub.task)),
        }
    }

    // The ledger: executions per mark, side effects per idempotency key.
    let runs_text = std::fs::read_to_string(ledger.path().join("runs")).unwrap_or_default();
    let mut runs: HashMap<String, Vec<u64>> = HashMap::new();
    for line in runs_text.lines() {
        let mut parts = line.split_whitespace();
        if let (Some(mark), Some(at)) = (parts.next(), parts.next().and_then(|t| t.parse().ok())) {
            runs.entry(mark.to_string()).or_default().push(at);
        }
    }
    let effects_out = Command::new("redis-cli")
        .args([
            "-p",
            &redis.ledger_port().to_string(),
            "LRANGE",
            "chaos:effects",
            "0",
            "-1",
        ])
        .output()
        .expect("run redis-cli");
    let effects_text = String::from_utf8_lossy(&effects_out.stdout).into_owned();
    let mut effects: HashMap<&str, usize> = HashMap::new();
    for mark in effects_text.lines().filter(|l| !l.is_empty()) {
        *effects.entry(mark).or_default() += 1;
    }
    let mut duplicates = 0;
    let mut explained_by: BTreeMap<String, usize> = BTreeMap::new();
    let mut unexplained = Vec::new();
    let mut never_ran = Vec::new();
    let (mut idempotent, mut duplicate_effects, mut missing_effects) = (0, 0, 0);
    for sub in &submitted {
        let Some(mark) = &sub.mark else { continue };
        let mut times = runs.get(mark).cloned().unwrap_or_default();
        times.sort_unstable();
        if times.is_empty() {
            never_ran.push(mark.clone());
        }
        for pair in times.windows(2) {
            duplicates += 1;
            let (first, later) = (pair[0].saturating_sub(100), pair[1] + 100);
            let around: Vec<&Disruption> = disruptions
                .iter()
                .filter(|d| {
                    d.start <= later
                        && d.end >= first
                        && d.queue.as_deref().is_none_or(|q| q == sub.queue)
                })
                .collect();
            // Named by the gravest one around it.
            let grave = [
                "node SIGKILL",
                "Redis restart",
                "supervisor kill",
                "consumer kill",
                "broker kill",
                "task kill",
            ]
            .into_iter()
            .find(|what| around.iter().any(|d| d.what == *what));
            match grave {
                Some(what) => *explained_by.entry(what.to_string()).or_default() += 1,
                None => unexplained.push(format!("{mark} ran at {times:?}")),
            }
        }
        if mark.starts_with("idem-") {
            idempotent += 1;
            match effects.get(mark.as_str()).copied().unwrap_or(0) {
                0 => missing_effects += 1,
                1 => {}
                n => duplicate_effects += n - 1,
            }
        }
    }
    // The second submission of each idempotent task was a duplicate of the first.
    let mut second_not_duplicate = Vec::new();
    for (id, answer) in &resent {
        let answer: Value = serde_json::from_str(answer).unwrap();
        if answer["duplicate"] != true || answer["id"] != id.as_str() {
            second_not_duplicate.push(format!("{id}: {answer}"));
        }
    }

    // Processes: no zombie children of the live nodes, no task process left running.
    let zombie_pids = common::zombies(&[node_a.pid(), node_b.pid(), std::process::id()]).await;
    let script_path = script.display().to_string();
    let leftover: Vec<_> = common::processes()
        .into_iter()
        .filter(|p| p.3.contains(&script_path) && p.2 != 'Z')
        .collect();
    let panic_lines: Vec<String> = std::iter::once(&node_a)
        .chain(std::iter::once(&node_b))
        .chain(retired.iter())
        .flat_map(|n| {
            let log = n.log();
            let lines: Vec<&str> = log.lines().collect();
            lines
                .iter()
                .enumerate()
                // The panic hook's line (`thread '…' panicked at file:line`): a real panic.
                .filter(|(_, l)| l.contains("panicked at"))
                .map(|(i, _)| lines[i.saturating_sub(3)..(i + 4).min(lines.len())].join("\n"))
                .collect::<Vec<_>>()
        })
        .collect();
    let panics = panic_lines.len();
    // A task actor that failed (an `Err` out of its handler, e.g. recording an outcome while
    // Redis is down, or a panic): its consumer logs `task actor crashed; recording a retry
    // why=panicked: …` and retries the task — reported, not a failure of the run.
    let task_actor_failures: usize = std::iter::once(&node_a)
        .chain(std::iter::once(&node_b))
        .chain(retired.iter())
        .map(|n| {
            n.log()
                .lines()
                .filter(|l| l.contains("task actor crashed") && l.contains("panicked:"))
                .count()
        })
        .sum();

    let mut took: Vec<Duration> = kills.iter().map(|k| k.took).collect();
    took.sort_unstable();
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for kill in &kills {
        *by_kind.entry(kill.kind.as_str()).or_default() += 1;
    }
    let exec = submitted.iter().filter(|s| s.mark.is_some()).count();
    eprintln!(
        "\n== chaos summary (profile {}) ==\n\
         tasks: {} over 3 queues ({} native, {} exec of which {} idempotent and submitted twice), 2 nodes on {}\n\
         chaos: {:.1} s, actor kills {} ({:?}), task kills {} (tried {}, nothing running {}), node SIGKILLs {}, node restarts {}, Redis restarts {}\n\
         outcome: succeeded {}, dead-lettered as configured {}, lost {}, unexpected outcome {}, extra attempts recorded {}\n\
         duplicates: executions {} (around {:?}; unexplained by a disruption {}), side effects of idempotent tasks {} (missing {}), second submissions not deduplicated {}\n\
         processes: zombies {}, leftover task processes {}, panics {}, task actors failed (retried) {}\n\
         tree whole after an actor kill: max {} ms, p99 {} ms, p50 {} ms\n\
         time: settle {:.1} s, total {:.1} s\n",
        profile.name,
        submitted.len(),
        submitted.len() - exec,
        exec,
        idempotent,
        redis.label(),
        chaos_time.as_secs_f64(),
        kills.len(),
        by_kind,
        task_kills.iter().flatten().count(),
        task_kills.len(),
        task_kills.iter().filter(|k| k.is_none()).count(),
        node_kills_done,
        node_restarts,
        redis_restarts,
        succeeded,
        dead,
        lost.len(),
        unexpected.len(),
        retried_attempts,
        duplicates,
        explained_by,
        unexplained.len(),
        duplicate_effects,
        missing_effects,
        second_not_duplicate.len(),
        zombie_pids.len(),
        leftover.len(),
        panics,
        task_actor_failures,
        took.last().copied().unwrap_or_default().as_millis(),
        percentile(&took, 0.99).as_millis(),
        percentile(&took, 0.5).as_millis(),
        settle_time.as_secs_f64(),
        began.elapsed().as_secs_f64(),
    );

    assert_eq!(submitted.len(), profile.tasks);
    assert!(
        task_kills.iter().flatten().count() > 0,
        "no task was running at any of the {} task kills",
        task_kills.len()
    );
    assert!(lost.is_empty(), "lost tasks: {lost:?}");
    assert!(
        unexpected.is_empty(),
        "unexpected outcomes: {unexpected:#?}"
    );
    assert!(
        never_ran.is_empty(),
        "ledger tasks that never ran: {never_ran:?}"
    );
    assert!(
        unexplained.is_empty(),
        "duplicates without a disruption: {unexplained:#?}"
    );
    assert_eq!(
        duplicate_effects, 0,
        "an idempotent side effect happened twice"
    );
    assert_eq!(
        missing_effects, 0,
        "an idempotent side effect never happened"
    );
    assert!(second_not_duplicate.is_empty(), "{second_not_duplicate:#?}");
    assert!(zombie_pids.is_empty(), "zombies: {zombie_pids:?}");
    assert!(
        leftover.is_empty(),
        "task processes left running: {leftover:?}"
    );
    assert_eq!(
        panics,
        0,
        "a node panicked:\n{}",
        panic_lines.join("\n---\n")
    );
    assert_eq!(node_kills_done, profile.node_kills.len());
    assert_eq!(redis_restarts, 1);
    assert!(kills.len() >= 50, "only {} actor kills", kills.len());
    assert!(
        took.last().copied().unwrap_or_default() <= Duration::from_secs(1),
        "the tree took {:?} to be whole again after a kill",
        took.last()
    );
}

/// A node on `memory://` with the chaos route on or off.
fn cli_node(chaos: bool) -> Node {
    let config = format!(
        r#"
[http]
bind = "127.0.0.1:0"

[supervision]
backoff = "1ms"
backoff_max = "10ms"

[chaos]
enabled = {chaos}

[queues.chat]
concurrency = 2
[queues.default]
concurrency = 2
"#
    );
    Node::start(&config, &[])
}

/// Runs `runtime chaos ARGS` against `url`: (exit code, stdout, stderr).
fn chaos_cli(url: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(common::binary())
        .arg("chaos")
        .args(args)
        .args(["--url", url])
        .env_remove("RT_ADMIN_TOKEN")
        .output()
        .expect("run runtime chaos");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_chaos_kill_by_path_by_kind_and_repeated_reports_the_whole_tree() {
    let node = cli_node(true);
    let url = node.url.clone();

    let (code, out, err) =
        tokio::task::spawn_blocking(move || chaos_cli(&url, &["kill", "queues/chat"]))
            .await
            .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("killed root/queues/chat (consumer); tree whole again after "),
        "{out}"
    );
    assert_eq!(node.actor("root/queues/chat").await.unwrap()["restarts"], 1);

    let url = node.url.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        chaos_cli(&url, &["kill", "--kind", "consumer", "--seed", "7"])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("seed 7\n"), "{out}");
    assert!(out.contains("(consumer); tree whole again after "), "{out}");

    let url = node.url.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        chaos_cli(
            &url,
            &[
                "kill", "--kind", "consumer", "--every", "100ms", "--for", "1s", "--seed", "42",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    let killed = out
        .lines()
        .filter(|l| l.contains(" killed root/queues/"))
        .count();
    assert!((4..=11).contains(&killed), "{killed} kills: {out}");
    assert!(out.contains(" kills in "), "{out}");
    assert!(out.contains("(seed 42)"), "{out}");
    // Ten kills in a second exceed `queues`' default restart intensity (5 in 10 s): it gives
    // up and is restarted with fresh consumers — the tree must still be whole.
    for path in ["root/queues/chat", "root/queues/default"] {
        assert_eq!(node.actor(path).await.unwrap()["status"], "running");
    }

    // No task runs on this node: one kill is an error, a series skips and says so.
    let url = node.url.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || chaos_cli(&url, &["kill", "--kind", "task"]))
            .await
            .unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("no task is running on the node at"), "{err}");
    let url = node.url.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        chaos_cli(
            &url,
            &[
                "kill", "--kind", "task", "--every", "100ms", "--for", "300ms",
            ],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    let skipped = out
        .lines()
        .filter(|l| l.ends_with(" no task running; skipped this kill"))
        .count();
    assert!((2..=4).contains(&skipped), "{out}");
    assert!(
        out.contains("0 kills in ") && out.contains(&format!("{skipped} skipped")),
        "{out}"
    );

    let url = node.url.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || chaos_cli(&url, &["kill", "--kind", "nonesuch"]))
            .await
            .unwrap();
    assert_eq!(code, Some(1));
    assert!(err.contains("no running actor of kind `nonesuch`"), "{err}");
    assert!(
        err.contains("consumer"),
        "the kinds there are listed: {err}"
    );

    let url = node.url.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || chaos_cli(&url, &["kill", "queues/nonesuch"]))
            .await
            .unwrap();
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no running actor at root/queues/nonesuch"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_chaos_says_when_chaos_is_disabled_or_the_node_is_unreachable() {
    let node = cli_node(false);
    let url = node.url.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || chaos_cli(&url, &["kill", "heartbeat"]))
            .await
            .unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("chaos is disabled on the node at"), "{err}");
    assert!(err.contains("[chaos] enabled = true"), "{err}");
    assert_eq!(node.actor("root/heartbeat").await.unwrap()["restarts"], 0);

    let (code, _, err) = tokio::task::spawn_blocking(|| {
        chaos_cli("http://127.0.0.1:9", &["kill", "--kind", "consumer"])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains("cannot reach the node at http://127.0.0.1:9"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_chaos_kill_kind_agent_sigkills_a_pool_agent_and_kind_pool_its_actor() {
    let python = String::from_utf8(
        Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 runs")
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let script =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/fake_voice_agent.py");
    let config = format!(
        r#"
[http]
bind = "127.0.0.1:0"

[chaos]
enabled = true

[queues.voice]
concurrency = 1

[pools.voice]
command = "{python}"
args = ["{script}", "--startup-delay", "0.1", "--session", "0.3"]
env = {{ PYTHONUNBUFFERED = "1" }}
min_idle = 2
max = 3
startup_timeout = "10s"
ready_pattern = "Pipeline ready"
stop_timeout = "1s"
"#,
        script = script.display(),
    );
    let mut node = Node::start(&config, &[]);
    let idle_pids = || async {
        let pools = node.get_json("/pools").await;
        pools["pools"]["voice"]["agents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "idle")
            .filter_map(|a| a["pid"].as_u64())
            .collect::<Vec<u64>>()
    };
    common::eventually("two warm agents", Duration::from_secs(15), async || {
        let pids = idle_pids().await;
        if pids.len() >= 2 {
            Ok(())
        } else {
            Err(format!("{pids:?}"))
        }
    })
    .await;
    let before = idle_pids().await;

    let url = node.url.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        chaos_cli(&url, &["kill", "--kind", "agent", "--seed", "3"])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("killed agent voice-"), "{out}");
    assert!(out.contains("of pool voice (pid "), "{out}");
    assert!(out.contains("tree whole again after "), "{out}");
    let killed: u64 = out
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .expect("the pid in the output");
    assert!(before.contains(&killed), "{killed} not in {before:?}");
    // The pool replaces it.
    common::eventually(
        "the killed agent replaced",
        Duration::from_secs(15),
        async || {
            let pids = idle_pids().await;
            if pids.len() >= 2 && !pids.contains(&killed) {
                Ok(())
            } else {
                Err(format!("{pids:?}"))
            }
        },
    )
    .await;

    let url = node.url.clone();
    let (code, out, err) =
        tokio::task::spawn_blocking(move || chaos_cli(&url, &["kill", "--kind", "pool"]))
            .await
            .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("killed root/pools/voice (pool); tree whole again after "),
        "{out}"
    );
    // A clean stop, so the pool stops its agents (a SIGKILLed node would leave them).
    node.signal("TERM");
    assert!(node.wait_exit(Duration::from_secs(10)).is_some());
}

/// A node on a private Redis running slow `exec` tasks (`sleep 30` on their first attempt,
/// an immediate result after): `runtime chaos kill --kind task` and the path form
/// `root/queues/slow/<task id>` kill them one at a time; each is retried and succeeds, its
/// `sleep` (the command itself, `exec`ed by the shell) is gone and nothing is left a zombie.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_chaos_kill_kind_task_kills_a_running_exec_task_which_is_retried() {
    let redis = RedisServer::start();
    let scratch = Scratch::new();
    let pids = scratch.path().join("pids");
    // `ID PID` per first attempt; then the shell becomes `sleep 30`.
    let script = scratch.write(
        "slow.sh",
        &format!(
            r#"read -r envelope
id=$(printf '%s' "$envelope" | sed 's/.*"id":"\([^"]*\)".*/\1/')
case "$envelope" in
  *'"attempt":0'*) echo "$id $$" >> {pids}; exec sleep 30 ;;
esac
echo '"ok"'
"#,
            pids = pids.display()
        ),
    );
    let config = format!(
        r#"
[http]
bind = "127.0.0.1:0"

[chaos]
enabled = true

[queues.slow]
concurrency = 2

[tasks.slow_exec]
queue = "slow"
handler = {{ kind = "exec", command = "/bin/sh", args = ["{script}"] }}
max_retries = 3
backoff = "10ms"
backoff_max = "100ms"
"#,
        script = script.display()
    );
    let node = Node::start(&config, &[("RT_BROKER_URL", &redis.url())]);
    let http = reqwest::Client::new();
    let ids = ["slow-1", "slow-2"];
    let batch: Vec<Value> = ids
        .iter()
        .map(|id| json!({ "task": "slow_exec", "id": id }))
        .collect();
    let response = http
        .post(format!("{}/tasks", node.url))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);

    // Both run: their commands wrote their pids, the consumer's snapshot lists them.
    let started = common::eventually("both running", Duration::from_secs(10), async || {
        let listed = node.actor("root/queues/slow").await.unwrap()["snapshot"]["running"]
            .as_array()
            .map_or(0, Vec::len);
        let text = std::fs::read_to_string(&pids).unwrap_or_default();
        let started: HashMap<String, u32> = text
            .lines()
            .filter_map(|l| {
                let (id, pid) = l.split_once(' ')?;
                Some((id.to_string(), pid.parse().ok()?))
            })
            .collect();
        if listed == 2 && started.len() == 2 {
            Ok(started)
        } else {
            Err(format!(
                "{listed} listed, pids {text:?}; log:\n{}",
                node.log()
            ))
        }
    })
    .await;
    for pid in started.values() {
        assert_eq!(proc_state(*pid), Some('S'), "pid {pid} sleeps");
    }

    // A random one, by kind.
    let url = node.url.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        chaos_cli(&url, &["kill", "--kind", "task", "--seed", "5"])
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    let first = ids
        .into_iter()
        .find(|id| out.contains(&format!("killed task {id} (slow_exec, attempt 0) of root/queues/slow; tree whole again after ")))
        .unwrap_or_else(|| panic!("no task named in: {out}"));
    let other = ids.into_iter().find(|id| *id != first).unwrap();
    assert_gone(started[first]).await;
    assert_eq!(
        proc_state(started[other]),
        Some('S'),
        "the other one still runs"
    );

    // The other one, by its path.
    let url = node.url.clone();
    let path = format!("root/queues/slow/{other}");
    let (code, out, err) = tokio::task::spawn_blocking(move || chaos_cli(&url, &["kill", &path]))
        .await
        .unwrap();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains(&format!(
            "killed task {other} (slow_exec, attempt 0) of root/queues/slow; tree whole again after "
        )),
        "{out}"
    );
    assert_gone(started[other]).await;

    // Both retried (attempt 1 runs the quick branch) and succeeded.
    for id in ids {
        let record = node
            .until_state(id, &["succeeded"], Duration::from_secs(10))
            .await;
        assert_eq!(record["attempts"], 2, "{record}");
        assert_eq!(record["result"], "ok", "{record}");
    }
    // Nothing in flight, the consumer never restarted, no zombie child of the node.
    common::eventually("nothing in flight", Duration::from_secs(5), async || {
        let queues = node.get_json("/queues").await;
        if queues["queues"]["slow"]["in_flight"] == 0 {
            Ok(())
        } else {
            Err(queues)
        }
    })
    .await;
    let consumer = node.actor("root/queues/slow").await.unwrap();
    assert_eq!(consumer["restarts"], 0);
    assert_eq!(consumer["status"], "running");
    assert_eq!(common::zombies(&[node.pid()]).await, Vec::<u32>::new());
    let log = node.log();
    assert_eq!(log.matches("chaos: killed task actor").count(), 2, "{log}");
    assert!(!log.contains("panicked at"), "{log}");

    // A task that does not run (any more) is refused by path.
    let url = node.url.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || chaos_cli(&url, &["kill", "root/queues/slow/slow-1"]))
            .await
            .unwrap();
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("no running task `slow-1` in root/queues/slow"),
        "{err}"
    );
}

/// The state letter of `/proc/PID/stat`; `None` once the pid is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

/// Waits up to 2 s for `pid` to be gone (killed and reaped: not even a zombie).
async fn assert_gone(pid: u32) {
    common::eventually(
        &format!("process {pid} gone"),
        Duration::from_secs(2),
        async || match proc_state(pid) {
            None => Ok(()),
            Some(state) => Err(format!("state {state}")),
        },
    )
    .await;
}
