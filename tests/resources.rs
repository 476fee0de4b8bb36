//! Shared resources through the binary, against a fake Zep on loopback: the retry storm of
//! the seed incident is bounded by the breaker, not by the number of messages; a killed
//! `ZepActor` keeps its breaker open; the egress proxy reaches Zep with the key injected.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::any;
use common::Node;
use serde_json::{Value, json};
use tokio::time::Instant;

/// What the fake saw of one call: path, body, `Authorization`.
type Seen = (String, String, Option<String>);

/// A fake Zep: counts calls, answers 503 while `down`, records what it was sent.
#[derive(Clone, Default)]
struct FakeZep {
    down: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeZep {
    async fn start(&self) -> String {
        let zep = self.clone();
        let router = Router::new().fallback(any(
            move |uri: axum::http::Uri, headers: HeaderMap, body: String| {
                let zep = zep.clone();
                async move {
                    zep.calls.fetch_add(1, Ordering::SeqCst);
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    zep.seen
                        .lock()
                        .unwrap()
                        .push((uri.path().to_string(), body, auth));
                    if zep.down.load(Ordering::SeqCst) {
                        (StatusCode::SERVICE_UNAVAILABLE, "zep is down".to_string())
                    } else {
                        (
                            StatusCode::OK,
                            json!({ "context": "user likes boats" }).to_string(),
                        )
                    }
                }
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}/api/v2")
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn config(port: u16, zep: &str) -> String {
    format!(
        r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:{port}"

[chaos]
enabled = true

[queues.chat]
concurrency = 10

[resources.zep]
kind = "zep"
base_url = "{zep}"
api_key_env = "TEST_ZEP_KEY"
timeout = "2s"
breaker = {{ failure_threshold = 5, open_for = "300ms", open_for_max = "600ms", probes = 1, probe_timeout = "1s" }}

# Each task searches the user's memory through the node's egress proxy (a POST that is not
# a write: while the breaker is open it gets 503, never a buffered 202).
[tasks.recall_memory]
queue = "chat"
uses = ["zep"]
handler = {{ kind = "http", url = "http://127.0.0.1:{port}/egress/zep/graph/search", timeout = "3s" }}
max_retries = 20
backoff = "50ms"
backoff_max = "200ms"
"#
    )
}

async fn breaker_state(node: &Node) -> Value {
    node.actor("root/resources/zep").await.expect("zep listed")["snapshot"]["breaker"]["state"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_zep_costs_threshold_plus_probes_not_a_call_per_task() {
    let zep = FakeZep::default();
    zep.down.store(true, Ordering::SeqCst);
    let base = zep.start().await;
    let port = free_port();
    let node = Node::start(&config(port, &base), &[("TEST_ZEP_KEY", "zk-secret-1")]);

    let batch: Vec<Value> = (0..500)
        .map(|n| json!({ "task": "recall_memory", "args": [n] }))
        .collect();
    let sent: Vec<Value> = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&batch)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(sent.len(), 500);

    // Zep stays down for 3 s while 500 tasks want it.
    let at = Instant::now();
    while at.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let during = zep.calls.load(Ordering::SeqCst);
    eprintln!("calls that reached the dead Zep for 500 tasks in 3 s: {during}");
    assert!(
        during <= 50,
        "{during} calls reached a dead Zep for 500 tasks (≤ 0.1 per task allowed)"
    );
    assert_eq!(breaker_state(&node).await, "open", "{}", node.log());
    // The same, in /metrics: open, entered once or more, calls refused, tasks deferred.
    let open = r#"rt_breaker_state{resource="zep",state="open"}"#;
    assert_eq!(node.metric(open).await, Some(1.0));
    let opened = r#"rt_breaker_transitions_total{resource="zep",to="open"}"#;
    assert!(node.metric(opened).await.unwrap() >= 1.0);
    let deferred = r#"rt_tasks_deferred_total{task="recall_memory",queue="chat"}"#;
    assert!(node.metric(deferred).await.unwrap() >= 1.0);

    // Killing the ZepActor (chaos route) does not close the breaker.
    assert_eq!(
        node.post("/chaos/kill/resources/zep", None).await.status(),
        202
    );
    let at = Instant::now();
    loop {
        let zep_actor = node.actor("root/resources/zep").await.unwrap();
        if zep_actor["restarts"] == 1
            && zep_actor["status"] == "running"
            && zep_actor["snapshot"].is_object()
        {
            assert_ne!(
                zep_actor["snapshot"]["breaker"]["state"], "closed",
                "a restart closed the breaker"
            );
            break;
        }
        assert!(at.elapsed() < Duration::from_secs(5), "zep actor not back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let health = node.get_json("/health").await;
    assert!(
        health["problems"]
            .to_string()
            .contains("root/resources/zep is degraded"),
        "{health}"
    );

    // Zep recovers: every task completes, none lost.
    zep.down.store(false, Ordering::SeqCst);
    let at = Instant::now();
    for task in &sent {
        let id = task["id"].as_str().unwrap();
        loop {
            let response = node.get(&format!("/tasks/{id}")).await;
            if response.status() == 200 {
                let record: Value = response.json().await.unwrap();
                if record["state"] == "succeeded" {
                    assert_eq!(record["result"]["context"], "user likes boats");
                    break;
                }
                assert_ne!(record["state"], "dead", "{record}");
            }
            assert!(
                at.elapsed() < Duration::from_secs(60),
                "task {id} never completed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(breaker_state(&node).await, "closed");
    let closed = r#"rt_breaker_transitions_total{resource="zep",to="closed"}"#;
    assert!(node.metric(closed).await.unwrap() >= 1.0);
    let restarts = r#"rt_actor_restarts_total{path="root/resources/zep",kind="zep"}"#;
    assert_eq!(node.metric(restarts).await, Some(1.0));
    let succeeded = r#"rt_tasks_succeeded_total{task="recall_memory",queue="chat"}"#;
    assert_eq!(node.metric(succeeded).await, Some(500.0));
    // Every call that reached Zep carried the node's key, never the caller's headers.
    let seen = zep.seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .all(|(path, _, auth)| path == "/api/v2/graph/search"
                && auth.as_deref() == Some("Api-Key zk-secret-1"))
    );
    assert!(
        !node.log().contains("zk-secret-1"),
        "the key leaked into the log"
    );
    let actors = node.get("/actors").await.text().await.unwrap();
    assert!(
        !actors.contains("zk-secret-1"),
        "the key leaked into /actors"
    );
}
