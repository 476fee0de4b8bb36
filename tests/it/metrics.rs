//! End to end: `GET /metrics` of the `runtime` binary on a private redis-server, after a mixed
//! workload — the counters match the workload exactly and the histograms' counts match the
//! attempts; no task id reaches a label.

use std::time::Duration;

use crate::common;
use crate::common::Node;
use crate::common::scrape::Scrape;
use actors::test_util::RedisServer;
use serde_json::{Value, json};

const CONFIG: &str = r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[broker]
url = "REDIS"
lease = "3s"

[queues.chat]
concurrency = 4
[queues.default]
concurrency = 8

[tasks.rt_noop]
queue = "default"
handler = { kind = "native" }

[tasks.rt_echo]
queue = "chat"
handler = { kind = "native" }
link = ["rt_noop"]

[tasks.rt_fail]
queue = "chat"
handler = { kind = "native" }
max_retries = 2
backoff = "10ms"
backoff_max = "20ms"

[chaos]
enabled = true
"#;

async fn scrape(node: &Node) -> Scrape {
    Scrape::of(node).await
}

/// Posts `body` to `/tasks`; the ids it answered.
async fn post(node: &Node, body: Value) -> Vec<String> {
    let response = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    let answers = match answer {
        Value::Array(items) => items,
        one => vec![one],
    };
    answers
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn counters_match_a_mixed_workload_exactly() {
    let redis = RedisServer::start();
    let node = Node::start(&CONFIG.replace("REDIS", &redis.url()), &[]);
    let mut ids = Vec::new();

    // 100 no-ops in one batch; 3 that expired before they could run; one idempotency key
    // used twice (enqueued once).
    let batch: Vec<Value> = (0..100).map(|_| json!({ "task": "rt_noop" })).collect();
    ids.extend(post(&node, Value::Array(batch)).await);
    for _ in 0..3 {
        let expired = json!({ "task": "rt_noop", "expires": "2020-01-01T00:00:00Z" });
        ids.extend(post(&node, expired).await);
    }
    for _ in 0..2 {
        let keyed = json!({ "task": "rt_noop", "idempotency_key": "once" });
        ids.extend(post(&node, keyed).await);
    }
    // 10 echoes, each enqueuing an rt_noop callback when it succeeds.
    for n in 0..10 {
        ids.extend(post(&node, json!({ "task": "rt_echo", "args": [n] })).await);
    }
    // 5 failures retried twice, then dead-lettered (3 attempts each).
    for _ in 0..5 {
        let failing = json!({ "task": "rt_fail", "kwargs": { "message": "boom" } });
        ids.extend(post(&node, failing).await);
    }
    // One actor restart.
    assert_eq!(
        node.post("/chaos/kill/root/heartbeat", None).await.status(),
        202
    );

    let metrics = common::eventually("the workload done", Duration::from_secs(30), async || {
        let m = scrape(&node).await;
        let done = m.task("rt_tasks_succeeded_total", "rt_noop", "default") >= 111.0
            && m.sum("rt_tasks_dead_lettered_total", &[("task", "rt_fail")]) >= 5.0
            && m.get(
                "rt_actor_restarts_total",
                &[("path", "root/heartbeat"), ("kind", "heartbeat")],
            )
            .is_some();
        if done {
            Ok(m)
        } else {
            Err(format!("{}\nlog:\n{}", m.text, node.log()))
        }
    })
    .await;
    // Settled: nothing moves any more, so the numbers below are final.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = scrape(&node).await;
    for name in [
        "rt_tasks_enqueued_total",
        "rt_tasks_started_total",
        "rt_tasks_succeeded_total",
        "rt_tasks_failed_total",
        "rt_tasks_retried_total",
        "rt_tasks_dead_lettered_total",
    ] {
        assert_eq!(metrics.sum(name, &[]), again.sum(name, &[]), "{name} moved");
    }
    let m = again;
    let t = |name: &str, task: &str, queue: &str| m.task(name, task, queue);

    // rt_noop: 100 + 3 expired + 1 keyed + 10 callbacks enqueued; 111 ran and succeeded.
    assert_eq!(t("rt_tasks_enqueued_total", "rt_noop", "default"), 114.0);
    assert_eq!(t("rt_tasks_started_total", "rt_noop", "default"), 111.0);
    assert_eq!(t("rt_tasks_succeeded_total", "rt_noop", "default"), 111.0);
    assert_eq!(t("rt_tasks_failed_total", "rt_noop", "default"), 0.0);
    assert_eq!(m.sum("rt_tasks_retried_total", &[("task", "rt_noop")]), 0.0);
    let noop_dead = |reason| {
        m.get(
            "rt_tasks_dead_lettered_total",
            &[
                ("task", "rt_noop"),
                ("queue", "default"),
                ("reason", reason),
            ],
        )
    };
    assert_eq!(noop_dead("rejected"), Some(3.0));
    assert_eq!(noop_dead("failed"), Some(0.0));
    assert_eq!(noop_dead("poison"), Some(0.0));

    // rt_echo: 10 in, 10 succeeded.
    assert_eq!(t("rt_tasks_enqueued_total", "rt_echo", "chat"), 10.0);
    assert_eq!(t("rt_tasks_started_total", "rt_echo", "chat"), 10.0);
    assert_eq!(t("rt_tasks_succeeded_total", "rt_echo", "chat"), 10.0);

    // rt_fail: 5 in, 3 attempts each, 2 retries each, then dead.
    assert_eq!(t("rt_tasks_enqueued_total", "rt_fail", "chat"), 5.0);
    assert_eq!(t("rt_tasks_started_total", "rt_fail", "chat"), 15.0);
    assert_eq!(t("rt_tasks_failed_total", "rt_fail", "chat"), 15.0);
    // Retried for what rt_fail returns: a native function's retry.
    let retried = |class| {
        m.get(
            "rt_tasks_retried_total",
            &[("task", "rt_fail"), ("queue", "chat"), ("class", class)],
        )
    };
    assert_eq!(retried("native"), Some(10.0));
    assert_eq!(retried("http_5xx"), Some(0.0));
    assert_eq!(t("rt_tasks_succeeded_total", "rt_fail", "chat"), 0.0);
    assert_eq!(
        m.get(
            "rt_tasks_dead_lettered_total",
            &[("task", "rt_fail"), ("queue", "chat"), ("reason", "failed")]
        ),
        Some(5.0)
    );

    // Totals over every label.
    assert_eq!(m.sum("rt_tasks_succeeded_total", &[]), 121.0);
    assert_eq!(m.sum("rt_tasks_retried_total", &[]), 10.0);
    assert_eq!(m.sum("rt_tasks_dead_lettered_total", &[]), 8.0);

    // Histograms: one duration per attempt that ran, one wait per first attempt.
    let duration = |task: &str, queue: &str| t("rt_task_duration_seconds_count", task, queue);
    let wait = |task: &str, queue: &str| t("rt_task_wait_seconds_count", task, queue);
    assert_eq!(duration("rt_noop", "default"), 111.0);
    assert_eq!(duration("rt_echo", "chat"), 10.0);
    assert_eq!(duration("rt_fail", "chat"), 15.0);
    assert_eq!(wait("rt_noop", "default"), 111.0);
    assert_eq!(wait("rt_echo", "chat"), 10.0);
    assert_eq!(wait("rt_fail", "chat"), 5.0);
    let inf = m.get(
        "rt_task_duration_seconds_bucket",
        &[("task", "rt_noop"), ("queue", "default"), ("le", "+Inf")],
    );
    assert_eq!(inf, Some(111.0));

    // Consumers are idle again; their bulkheads as configured.
    for (queue, concurrency) in [("chat", 4.0), ("default", 8.0)] {
        assert_eq!(
            m.get("rt_consumer_in_flight", &[("queue", queue)]),
            Some(0.0)
        );
        assert_eq!(
            m.get("rt_consumer_concurrency", &[("queue", queue)]),
            Some(concurrency)
        );
    }

    // Depths read at scrape time: the dead letters are there, nothing else is left.
    let depth =
        |queue: &str, state: &str| m.get("rt_queue_depth", &[("queue", queue), ("state", state)]);
    assert_eq!(depth("default", "dead"), Some(3.0));
    assert_eq!(depth("chat", "dead"), Some(5.0));
    for queue in ["chat", "default"] {
        for state in ["ready", "delayed", "in_flight"] {
            assert_eq!(depth(queue, state), Some(0.0), "{queue} {state}");
        }
    }

    // The restart, the broker.
    assert_eq!(
        m.get(
            "rt_actor_restarts_total",
            &[("path", "root/heartbeat"), ("kind", "heartbeat")]
        ),
        Some(1.0)
    );
    assert_eq!(m.get("rt_broker_connected", &[]), Some(1.0));
    let rtt = m
        .get("rt_broker_round_trip_seconds", &[])
        .expect("round trip");
    assert!(rtt > 0.0 && rtt < 1.0, "{rtt}");

    // No task id in any label (or anywhere else).
    assert_eq!(ids.len(), 120);
    for id in &ids {
        assert!(
            !m.text.contains(id.as_str()),
            "task id {id} in the exposition"
        );
    }
}

#[tokio::test]
async fn metrics_can_be_switched_off() {
    let config = "[http]\nbind = \"127.0.0.1:0\"\n[queues.default]\n[metrics]\nenabled = false\n";
    let node = Node::start(config, &[]);
    let response = node.get("/metrics").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("disabled"),
        "{body}"
    );
}
