//! End to end through the binary on a private redis-server: mixed tasks across three queues
//! each complete or dead-letter exactly as configured; Redis dies and comes back mid-run.

use crate::common;

use std::time::Duration;

use crate::common::Node;
use actors::test_util::{RedisCluster, RedisServer};
use serde_json::{Value, json};
use tokio::time::Instant;

const CONFIG: &str = r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[broker]
lease = "3s"

[queues.chat]
concurrency = 4
[queues.default]
concurrency = 4
[queues.background]
concurrency = 2

[tasks.rt_echo]
queue = "chat"
handler = { kind = "native" }

[tasks.rt_fail]
queue = "default"
handler = { kind = "native" }
max_retries = 1
backoff = "10ms"
backoff_max = "20ms"

[tasks.rt_sleep]
queue = "default"
handler = { kind = "native" }

[tasks.resize_image]
queue = "background"
handler = { kind = "exec", command = "/bin/sh", args = ["-c", "read envelope; echo '{\"ok\": true}'"] }
"#;

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

async fn settled(node: &Node, limit: Duration) {
    common::eventually("every queue empty", limit, async || {
        let queues = node.get_json("/queues").await["queues"].clone();
        let busy: u64 = ["chat", "default", "background"]
            .iter()
            .map(|q| {
                let d = &queues[q];
                d["ready"].as_u64().unwrap()
                    + d["delayed"].as_u64().unwrap()
                    + d["in_flight"].as_u64().unwrap()
            })
            .sum();
        if busy == 0 { Ok(()) } else { Err(queues) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_tasks_complete_or_dead_letter_as_configured() {
    let redis = RedisServer::start();
    a_thousand_mixed_tasks(&redis.url(), CONFIG).await;
}

/// The same on a Redis Cluster (3 masters + 3 replicas), the chat queue in 3 partitions: the
/// queues' keys sit in different slots, each task's record in its stream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_tasks_on_a_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    // The chat queue in 3 partitions (3 streams, 3 slots).
    let config = CONFIG.replace("[queues.chat]\n", "[queues.chat]\npartitions = 3\n");
    assert_ne!(config, CONFIG);
    a_thousand_mixed_tasks(&cluster.url(), &config).await;
    // The work was spread: more than one master holds keys.
    let holding = cluster
        .ports()
        .into_iter()
        .filter(|port| {
            let out = std::process::Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "dbsize"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                > 0
        })
        .count();
    assert!(holding >= 2, "keys on {holding} nodes");
}

async fn a_thousand_mixed_tasks(url: &str, config: &str) {
    let node = Node::start(config, &[("RT_BROKER_URL", url)]);
    let mut batch = Vec::new();
    for n in 0..1000 {
        batch.push(match n % 10 {
            0..=5 => json!({ "task": "rt_echo", "args": [n] }),
            6 => json!({ "task": "rt_fail", "kwargs": { "permanent": true, "message": "400 bad request" } }),
            7 => json!({ "task": "rt_fail", "kwargs": { "message": "zep_call_error" } }),
            _ => json!({ "task": "resize_image", "args": [n] }),
        });
    }
    let ids: Vec<String> = post(&node, Value::Array(batch))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    settled(&node, Duration::from_secs(60)).await;

    let mut states = std::collections::BTreeMap::<String, usize>::new();
    for (n, id) in ids.iter().enumerate() {
        let record = node.get_json(&format!("/tasks/{id}")).await;
        let expected = match n % 10 {
            0..=5 => ("succeeded", 1),
            6 => ("dead", 1),
            7 => ("dead", 2),
            _ => ("succeeded", 1),
        };
        assert_eq!(
            (
                record["state"].as_str().unwrap(),
                record["attempts"].as_u64().unwrap()
            ),
            (expected.0, expected.1),
            "task {n}: {record}"
        );
        if n % 10 <= 5 {
            assert_eq!(record["result"]["args"][0], n);
        }
        if n % 10 >= 8 {
            assert_eq!(record["result"], json!({"ok": true}));
        }
        *states
            .entry(record["state"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(states["succeeded"], 800);
    assert_eq!(states["dead"], 200);
    let queues = node.get_json("/queues").await["queues"].clone();
    assert_eq!(queues["default"]["dead"], 200);
    let dlq = node.get_json("/dlq/default?limit=1").await;
    let reason = dlq["dead_letters"][0]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason == "permanent: 400 bad request"
            || reason == "retries exhausted after 2 attempts: zep_call_error",
        "{reason}"
    );

    // The dashboard's routes on Redis: a search over the events stream, a dead task's
    // timeline with its dead letter, dead letters paged, requeued, deleted and purged by
    // their stream entry ids.
    let found = node
        .get_json("/tasks?state=dead&queue=default&limit=5")
        .await;
    let tasks = found["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 5, "{found}");
    assert!(
        tasks
            .iter()
            .all(|t| t["state"] == "dead" && t["task"] == "rt_fail")
    );
    let dead_id = tasks[0]["id"].as_str().unwrap();
    let timeline = node.get_json(&format!("/tasks/{dead_id}/timeline")).await;
    assert_eq!(timeline["state"], "dead");
    assert_eq!(timeline["dead_letter"]["envelope"]["id"], dead_id);
    let kinds: Vec<&str> = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"sent"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"dead"), "{kinds:?}");
    let first = node.get_json("/dlq/default?limit=150").await;
    let next = first["next"].as_str().unwrap().to_string();
    let rest = node
        .get_json(&format!("/dlq/default?limit=150&after={next}"))
        .await;
    assert_eq!(rest["dead_letters"].as_array().unwrap().len(), 50);
    assert_eq!(rest["next"], Value::Null);
    let entry = |n: usize| {
        first["dead_letters"][n]["entry"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let requeued = node
        .post(&format!("/dlq/default/{}/requeue", entry(0)), None)
        .await;
    assert_eq!(requeued.status(), 200);
    let requeued: Value = requeued.json().await.unwrap();
    assert_eq!(
        requeued["requeued"],
        first["dead_letters"][0]["envelope"]["id"]
    );
    let deleted = reqwest::Client::new()
        .delete(format!("{}/dlq/default/{}", node.url, entry(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    settled(&node, Duration::from_secs(30)).await;
    // The requeued task failed again: 200 − 1 deleted.
    let purged: Value = node
        .post("/dlq/default/purge", None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], 199, "{purged}");
    assert_eq!(
        node.get_json("/queues").await["queues"]["default"]["dead"],
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dies_and_comes_back_health_says_so_and_nothing_is_lost() {
    let mut redis = RedisServer::start_with_aof();
    let node = Node::start(CONFIG, &[("RT_BROKER_URL", &redis.url())]);
    assert_eq!(node.get("/health").await.status(), 200);
    let before: Vec<Value> = post(&node, json!([{ "task": "rt_echo", "args": [1] }]))
        .await
        .as_array()
        .unwrap()
        .clone();
    settled(&node, Duration::from_secs(10)).await;

    redis.stop();
    let problems = common::eventually(
        "/health to say degraded",
        Duration::from_secs(10),
        async || {
            let health = node.get("/health").await;
            let status = health.status();
            if status == 503 {
                let body: Value = health.json().await.unwrap();
                Ok(body["problems"].to_string())
            } else {
                Err(status)
            }
        },
    )
    .await;
    assert!(problems.contains("degraded"), "{problems}");
    let refused = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&json!({ "task": "rt_echo" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        refused.status(),
        503,
        "an enqueue while Redis is down is refused, not lost silently"
    );

    redis.restart();
    common::eventually("healthy again", Duration::from_secs(15), async || {
        let health = node.get("/health").await;
        if health.status() == 200 {
            Ok(())
        } else {
            Err(health.text().await.unwrap_or_default())
        }
    })
    .await;
    let after: Vec<Value> = post(&node, json!([{ "task": "rt_echo", "args": [2] }]))
        .await
        .as_array()
        .unwrap()
        .clone();
    settled(&node, Duration::from_secs(10)).await;
    for (id, arg) in [(&before[0]["id"], 1), (&after[0]["id"], 2)] {
        let record = node
            .get_json(&format!("/tasks/{}", id.as_str().unwrap()))
            .await;
        assert_eq!(record["state"], "succeeded", "{record}");
        assert_eq!(record["result"]["args"][0], arg);
    }
}

#[test]
fn an_unreachable_redis_is_a_clear_startup_error() {
    let out = std::process::Command::new(common::binary())
        .args(["--config", "/dev/stdin"])
        .env("RT_BROKER_URL", "redis://:hunter2@127.0.0.1:9/0")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"[http]\nbind = \"127.0.0.1:0\"\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("cannot start without the broker"), "{log}");
    assert!(log.contains("127.0.0.1:9"), "{log}");
    assert!(!log.contains("hunter2"), "the password leaked: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_tasks_finish_before_the_node_exits() {
    use actors::broker::{BrokerSettings, Records, redis::RedisBroker};
    let redis = RedisServer::start();
    let mut node = Node::start(CONFIG, &[("RT_BROKER_URL", &redis.url())]);
    let sent = post(
        &node,
        json!([{ "task": "rt_sleep", "kwargs": { "ms": 800 } }]),
    )
    .await;
    let id = sent[0]["id"].as_str().unwrap().to_string();
    // Wait until it runs, then ask the node to stop.
    common::eventually("the task running", Duration::from_secs(5), async || {
        let default = node.get_json("/queues").await["queues"]["default"].clone();
        if default["in_flight"] == 1 {
            Ok(())
        } else {
            Err(default)
        }
    })
    .await;
    node.signal("TERM");
    let status = node
        .wait_exit(Duration::from_secs(6))
        .expect("exits within the grace");
    assert_eq!(status.code(), Some(0), "{}", node.log());
    assert!(
        node.log().contains("draining: no more fetching"),
        "{}",
        node.log()
    );
    let broker = RedisBroker::connect(&redis.url(), BrokerSettings::default())
        .await
        .unwrap();
    let record = broker
        .record(&id)
        .await
        .unwrap()
        .expect("the running task finished and was recorded");
    assert_eq!(record.result, Some(json!({ "slept_ms": 800 })));
}

/// A key of the wrong type where a task's record goes (`SET rt:result:<id> x`, after the task
/// was enqueued): the outcome is not written at all — the log names the key and Redis' error,
/// the entry stays in flight (not acked, so it really does come back) — and once the key is
/// fixed the task comes back through lease recovery and its record is written. Also: the same
/// id posted again meanwhile is refused naming the key (the record is the id's guard; nothing
/// is enqueued). (Before: the entry was acked without a record, the task was gone while the log
/// said it would come back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_that_cannot_be_written_comes_back_instead_of_being_lost() {
    let redis = RedisServer::start();
    let node = Node::start(CONFIG, &[("RT_BROKER_URL", &redis.url())]);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let id = "telegram:process:wrongtype-1";
    let record_key = format!("rt:result:{id}");
    let task = json!({ "task": "rt_echo", "id": id, "args": ["hi"], "countdown": 1 });
    assert_eq!(
        post(&node, task.clone()).await,
        json!({ "id": id, "duplicate": false })
    );
    let _: () = redis::cmd("SET")
        .arg(&record_key)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    common::eventually(
        "`comes back through lease recovery`",
        Duration::from_secs(15),
        async || {
            let log = node.log();
            if log.contains("comes back through lease recovery") {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;
    let log = node.log();
    assert!(
        log.contains(&format!(
            "WRONGTYPE {record_key} holds a string, not a hash"
        )),
        "{log}"
    );
    let chat = node.get_json("/queues").await["queues"]["chat"].clone();
    assert_eq!(chat["in_flight"], 1, "the entry was not acked: {chat}");
    let again = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&task)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 503);
    let error = again.json::<Value>().await.unwrap()["error"].to_string();
    assert!(
        error.contains("WRONGTYPE")
            && error.contains(&format!(
                "{record_key} holds a string, not a hash (nothing of this batch was enqueued)"
            )),
        "{error}"
    );

    let _: () = redis::cmd("DEL")
        .arg(&record_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let record = node
        .until_ended(&id.replace(':', "%3A"), Duration::from_secs(20))
        .await;
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["id"], id);
    settled(&node, Duration::from_secs(5)).await;
}

/// A node of the revocation test: queue `work` of concurrency 1 (so each node runs one long
/// task at a time), and queue `late` only when `late` (the node started later).
fn revoke_config(name: &str, late: bool) -> String {
    let late = if late {
        "[queues.late]\n[tasks.rt_echo]\nqueue = \"late\"\nhandler = { kind = \"native\" }\n"
    } else {
        ""
    };
    format!(
        r#"
[runtime]
node_name = "{name}"
terminate_grace = "300ms"
shutdown_grace = "2s"
[http]
bind = "127.0.0.1:0"
[queues.work]
concurrency = 1
[tasks.rt_sleep]
queue = "work"
handler = {{ kind = "native" }}
max_retries = 3
{late}"#
    )
}

/// Revocations across nodes on one Redis: two nodes each run one long task; each task is
/// revoked with terminate through the *other* node's HTTP API and stopped where it runs — one
/// that honours the soft signal at once, one that ignores it after the grace — recorded
/// dead/revoked and not retried. A queued task and a delayed one revoked meanwhile never run:
/// the node that frees a slot meets them and dead-letters them as revoked. A node started
/// after a revocation (of an id not enqueued yet) still honours it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_the_node_running_the_task_and_nodes_started_later() {
    let redis = RedisServer::start();
    revocations_across_nodes(redis.url()).await;
}

/// The same on a Redis Cluster: the revocations live in a slot of their own, each record in
/// its queue's, and the nodes hear every revocation through a subscription to a seed node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_the_node_running_the_task_on_a_redis_cluster() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    revocations_across_nodes(cluster.url()).await;
}

async fn revocations_across_nodes(url: String) {
    let env = [("RT_BROKER_URL", url)];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let nodes = [
        Node::start(&revoke_config("node-a", false), &env),
        Node::start(&revoke_config("node-b", false), &env),
    ];
    let polite = post(
        &nodes[0],
        json!({ "task": "rt_sleep", "id": "polite", "kwargs": { "ms": 60_000 } }),
    )
    .await;
    let stubborn = post(
        &nodes[0],
        json!({ "task": "rt_sleep", "id": "stubborn", "kwargs": { "ms": 60_000, "ignore_soft": true } }),
    )
    .await;
    assert_eq!(
        (polite["duplicate"].clone(), stubborn["duplicate"].clone()),
        (json!(false), json!(false))
    );
    // Each node runs one of them (concurrency 1 each).
    let mut ran_on = std::collections::HashMap::new();
    common::eventually("both running", Duration::from_secs(10), async || {
        for id in ["polite", "stubborn"] {
            let record = nodes[0].get_json(&format!("/tasks/{id}")).await;
            if record["state"] == "running" {
                ran_on.insert(id, record["node"].as_str().unwrap().to_string());
            }
        }
        if ran_on.len() == 2 {
            Ok(())
        } else {
            Err(format!("{ran_on:?}"))
        }
    })
    .await;
    assert_ne!(ran_on["polite"], ran_on["stubborn"], "one on each node");
    // Waiting behind them: one queued, one delayed an hour.
    post(
        &nodes[1],
        json!({ "task": "rt_sleep", "id": "queued", "kwargs": { "ms": 1 } }),
    )
    .await;
    post(
        &nodes[1],
        json!({ "task": "rt_sleep", "id": "delayed", "countdown": 3600 }),
    )
    .await;
    let revoke = async |node: &Node, id: &str, body: Value| -> (u16, Value) {
        let response = reqwest::Client::new()
            .post(format!("{}/tasks/{id}/revoke", node.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json().await.unwrap())
    };
    for id in ["queued", "delayed"] {
        let (status, answer) = revoke(&nodes[0], id, json!({})).await;
        assert_eq!(status, 202, "{answer}");
    }
    // Through the node that does not run it.
    let other = |id: &str| {
        if ran_on[id] == "node-a" {
            &nodes[1]
        } else {
            &nodes[0]
        }
    };
    let asked = Instant::now();
    let (status, answer) = revoke(other("polite"), "polite", json!({ "terminate": true })).await;
    assert_eq!(
        (status, answer["was"].clone()),
        (202, json!("running")),
        "{answer}\n{}\n{}",
        nodes[0].log(),
        nodes[1].log()
    );
    let record = nodes[0].until_ended("polite", Duration::from_secs(5)).await;
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "soft signal honoured at once"
    );
    assert_eq!(
        (record["state"].clone(), record["error"].clone()),
        (json!("dead"), json!("revoked"))
    );
    let asked = Instant::now();
    let (status, _) = revoke(other("stubborn"), "stubborn", json!({ "terminate": true })).await;
    assert_eq!(status, 202);
    let record = nodes[1]
        .until_ended("stubborn", Duration::from_secs(5))
        .await;
    assert!(
        asked.elapsed() >= Duration::from_millis(250),
        "stopped after the grace"
    );
    assert_eq!(
        (record["state"].clone(), record["error"].clone()),
        (json!("dead"), json!("revoked"))
    );
    for id in ["queued", "delayed"] {
        let record = nodes[0].until_ended(id, Duration::from_secs(5)).await;
        assert_eq!(record["error"], "revoked", "{record}");
        assert_eq!(
            record["started_at"],
            Value::Null,
            "{id} never started: {record}"
        );
    }
    // All four in the dead letters as revoked; nothing retried, nothing left.
    let depth = common::eventually("four dead letters", Duration::from_secs(10), async || {
        let depth = nodes[0].get_json("/queues").await["queues"]["work"].clone();
        if depth["dead"] == 4 {
            Ok(depth)
        } else {
            Err(depth)
        }
    })
    .await;
    assert_eq!(
        (
            depth["ready"].clone(),
            depth["delayed"].clone(),
            depth["in_flight"].clone()
        ),
        (json!(0), json!(0), json!(0)),
        "{depth}"
    );
    let letters = nodes[0].get_json("/dlq/work").await;
    let reasons: Vec<&str> = letters["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["revoked"; 4], "{letters}");

    // Revoked before it exists, then a node starts, then the task comes: it does not run.
    let (status, answer) = revoke(&nodes[0], "future-1", json!({})).await;
    assert_eq!((status, answer["was"].clone()), (202, json!("unknown")));
    let late = Node::start(&revoke_config("node-c", true), &env);
    post(&late, json!({ "task": "rt_echo", "id": "future-1" })).await;
    let record = late.until_ended("future-1", Duration::from_secs(5)).await;
    assert_eq!(
        (record["state"].clone(), record["error"].clone()),
        (json!("dead"), json!("revoked"))
    );
}
