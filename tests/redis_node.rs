//! End to end through the binary on a private redis-server: mixed tasks across three queues
//! each complete or dead-letter exactly as configured; Redis dies and comes back mid-run.

mod common;

use std::time::Duration;

use actors::test_util::RedisServer;
use common::Node;
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
    let at = Instant::now();
    loop {
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
        if busy == 0 {
            return;
        }
        assert!(at.elapsed() < limit, "still busy: {queues}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_mixed_tasks_complete_or_dead_letter_as_configured() {
    let redis = RedisServer::start();
    let node = Node::start(CONFIG, &[("RT_BROKER_URL", &redis.url())]);
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
    let at = Instant::now();
    loop {
        let health = node.get("/health").await;
        if health.status() == 503 {
            let body: Value = health.json().await.unwrap();
            let problems = body["problems"].to_string();
            assert!(problems.contains("degraded"), "{problems}");
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "health never said degraded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    let at = Instant::now();
    while node.get("/health").await.status() != 200 {
        assert!(
            at.elapsed() < Duration::from_secs(15),
            "never healthy again: {}",
            node.get_json("/health").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    use actors::broker::{Broker, BrokerSettings, redis::RedisBroker};
    let redis = RedisServer::start();
    let mut node = Node::start(CONFIG, &[("RT_BROKER_URL", &redis.url())]);
    let sent = post(
        &node,
        json!([{ "task": "rt_sleep", "kwargs": { "ms": 800 } }]),
    )
    .await;
    let id = sent[0]["id"].as_str().unwrap().to_string();
    // Wait until it runs, then ask the node to stop.
    let at = Instant::now();
    while node.get_json("/queues").await["queues"]["default"]["in_flight"] != 1 {
        assert!(at.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

/// A key of the wrong type where a task's record goes (`SET rt:result:<id> x`): the outcome
/// is not written at all — the log names the key and Redis' error, the entry stays in flight
/// (not acked, so it really does come back) — and once the key is fixed the task comes back
/// through lease recovery and its record is written. Also: a chosen id posted again while the
/// task is pending is a duplicate. (Before: the entry was acked without a record, the task was
/// gone while the log said it would come back.)
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
    let _: () = redis::cmd("SET")
        .arg(&record_key)
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let task = json!({ "task": "rt_echo", "id": id, "args": ["hi"] });
    assert_eq!(
        post(&node, task.clone()).await,
        json!({ "id": id, "duplicate": false })
    );
    let at = Instant::now();
    while !node.log().contains("comes back through lease recovery") {
        assert!(at.elapsed() < Duration::from_secs(15), "{}", node.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = node.log();
    assert!(
        log.contains(&format!(
            "WRONGTYPE {record_key} holds a string, not a hash"
        )),
        "{log}"
    );
    let chat = node.get_json("/queues").await["queues"]["chat"].clone();
    assert_eq!(chat["in_flight"], 1, "the entry was not acked: {chat}");
    assert_eq!(
        post(&node, task).await["duplicate"],
        true,
        "its entry exists"
    );

    let _: () = redis::cmd("DEL")
        .arg(&record_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let path = format!("/tasks/{}", id.replace(':', "%3A"));
    let at = Instant::now();
    let record = loop {
        let response = node.get(&path).await;
        if response.status() == 200 {
            break response.json::<Value>().await.unwrap();
        }
        assert!(
            at.elapsed() < Duration::from_secs(20),
            "never recorded: {}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(record["id"], id);
    settled(&node, Duration::from_secs(5)).await;
}
