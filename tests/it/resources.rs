//! Shared resources through the binary, against a fake Zep on loopback: the retry storm of
//! the seed incident is bounded by the breaker, not by the number of messages; a killed
//! `ZepActor` keeps its breaker open; the egress proxy reaches Zep with the key injected; a Zep
//! answering 401 (the seed's real root cause) is misconfigured — it shows, its users fail at
//! once, it costs one probe per period — until a probe is accepted; and chat goes on without
//! memory while Zep is down or misconfigured (`degrades`), its writes replayed later.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::common::fakes::{self, Upstream, free_port};
use crate::common::{Node, eventually};
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};
use tokio::time::Instant;

/// What the fake saw of one call: path, body, `Authorization`.
type Seen = (String, String, Option<String>);

/// A fake Zep: answers 503 while `down` and 401 while `refuse`, else a memory; counts and
/// records the calls it gets.
#[derive(Clone, Default)]
struct FakeZep {
    down: Arc<AtomicBool>,
    refuse: Arc<AtomicBool>,
    upstream: Upstream,
}

impl FakeZep {
    async fn start(&self) -> String {
        let zep = self.clone();
        let url = self
            .upstream
            .start(move |_| {
                let zep = zep.clone();
                async move {
                    if zep.down.load(Ordering::SeqCst) {
                        (StatusCode::SERVICE_UNAVAILABLE, "zep is down".to_string())
                    } else if zep.refuse.load(Ordering::SeqCst) {
                        (
                            StatusCode::UNAUTHORIZED,
                            r#"{"message":"unauthorized"}"#.into(),
                        )
                    } else {
                        (
                            StatusCode::OK,
                            json!({ "context": "user likes boats" }).to_string(),
                        )
                    }
                    .into_response()
                }
            })
            .await;
        format!("{url}/api/v2")
    }

    fn calls(&self) -> usize {
        self.upstream.calls()
    }

    fn seen(&self) -> Vec<Seen> {
        self.upstream
            .seen()
            .into_iter()
            .map(|r| {
                let auth = r.header("authorization").map(str::to_string);
                (r.uri.path().to_string(), r.body, auth)
            })
            .collect()
    }
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
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = zep.calls();
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
    let zep_actor = eventually("the zep actor back", Duration::from_secs(5), async || {
        let zep_actor = node.actor("root/resources/zep").await.unwrap();
        let back = zep_actor["restarts"] == 1
            && zep_actor["status"] == "running"
            && zep_actor["snapshot"].is_object();
        if back { Ok(zep_actor) } else { Err(zep_actor) }
    })
    .await;
    assert_ne!(
        zep_actor["snapshot"]["breaker"]["state"], "closed",
        "a restart closed the breaker"
    );
    let health = node.get_json("/health").await;
    assert!(
        health["problems"]
            .to_string()
            .contains("root/resources/zep is degraded"),
        "{health}"
    );

    // Zep recovers: every task completes, none lost.
    zep.down.store(false, Ordering::SeqCst);
    let ids: Vec<String> = sent
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    for record in records(&node, &ids, "succeeded", Duration::from_secs(60)).await {
        assert_eq!(record["result"]["context"], "user likes boats");
    }
    assert_eq!(breaker_state(&node).await, "closed");
    let closed = r#"rt_breaker_transitions_total{resource="zep",to="closed"}"#;
    assert!(node.metric(closed).await.unwrap() >= 1.0);
    let restarts = r#"rt_actor_restarts_total{path="root/resources/zep",kind="zep"}"#;
    assert_eq!(node.metric(restarts).await, Some(1.0));
    let succeeded = r#"rt_tasks_succeeded_total{task="recall_memory",queue="chat"}"#;
    assert_eq!(node.metric(succeeded).await, Some(500.0));
    // Every call that reached Zep carried the node's key, never the caller's headers.
    let seen = zep.seen();
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

/// The Django app of the seed, faked: `POST /process_chat_message` (the envelope) reads the
/// thread's memory and writes the user's message through the node's egress proxy, as the
/// chat task does, and answers what it got.
async fn start_chat_app(node_port: u16) -> String {
    let egress = format!("http://127.0.0.1:{node_port}/egress/zep");
    let router = Router::new().route(
        "/process_chat_message",
        axum::routing::post(move |axum::Json(envelope): axum::Json<Value>| {
            let egress = egress.clone();
            async move {
                let http = reqwest::Client::new();
                let read = http
                    .get(format!("{egress}/threads/t1/context"))
                    .send()
                    .await
                    .unwrap();
                let read_status = read.status().as_u16();
                let read_degraded = read
                    .headers()
                    .get("x-runtime-degraded")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let memory: Value = read.json().await.unwrap_or(Value::Null);
                let text = envelope["args"][0].to_string();
                let write = http
                    .post(format!("{egress}/threads/t1/messages"))
                    .json(&json!({ "messages": [{ "role": "user", "content": text }] }))
                    .send()
                    .await
                    .unwrap();
                axum::Json(json!({
                    "memory": memory,
                    "read_status": read_status,
                    "read_degraded": read_degraded,
                    "write_status": write.status().as_u16(),
                }))
            }
        }),
    );
    format!("http://{}", fakes::serve(router).await)
}

/// A chat system on the fake Zep: `recall_memory` cannot do without Zep (`uses`),
/// `process_chat_message` can (`degrades`); `recall_memory`'s failures are recorded by its
/// `link_error` callback.
fn chat_config(port: u16, zep: &str, app: &str, breaker: &str) -> String {
    format!(
        r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:{port}"

[chaos]
enabled = true

[queues.chat]
concurrency = 8

[queues.default]
concurrency = 4

[resources.zep]
kind = "zep"
base_url = "{zep}"
api_key_env = "TEST_ZEP_KEY"
timeout = "2s"
auth_probe_every = "400ms"
breaker = {breaker}

[tasks.recall_memory]
queue = "chat"
uses = ["zep"]
handler = {{ kind = "http", url = "http://127.0.0.1:{port}/egress/zep/graph/search", timeout = "3s" }}
max_retries = 20
backoff = "50ms"
backoff_max = "200ms"
link_error = ["rt_echo"]

[tasks.process_chat_message]
queue = "chat"
degrades = ["zep"]
handler = {{ kind = "http", url = "{app}/process_chat_message", timeout = "5s" }}
max_retries = 3
backoff = "50ms"

# Records a failure (the built-in native echo).
[tasks.rt_echo]
queue = "default"
handler = {{ kind = "native" }}
"#
    )
}

/// The node's Zep key.
const KEY_ENV: (&str, &str) = ("TEST_ZEP_KEY", "zk-secret-2");

async fn enqueue(node: &Node, task: &str, n: usize) -> Vec<String> {
    let batch: Vec<Value> = (0..n)
        .map(|i| json!({ "task": task, "args": [format!("{task}-{i}")] }))
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
    sent.iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits for the record of every task in `ids` to reach `state`; returns the records.
async fn records(node: &Node, ids: &[String], state: &str, limit: Duration) -> Vec<Value> {
    let at = Instant::now();
    let mut out = Vec::new();
    for id in ids {
        let left = limit.saturating_sub(at.elapsed());
        let record = node
            .until_state(id, &[state, "succeeded", "dead"], left)
            .await;
        assert_eq!(
            record["state"], state,
            "task {id} is {record}, expected {state}"
        );
        out.push(record);
    }
    out
}

async fn event_kinds(node: &Node) -> Vec<Value> {
    let text = node
        .get("/events?after=0&follow=false&types=resource_")
        .await
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zep_refusing_the_key_is_misconfigured_fails_its_users_and_recovers_after_a_probe() {
    let zep = FakeZep::default();
    zep.refuse.store(true, Ordering::SeqCst);
    let base = zep.start().await;
    let port = free_port();
    let app = start_chat_app(port).await;
    let breaker = r#"{ failure_threshold = 5, open_for = "300ms", open_for_max = "600ms" }"#;
    let node = Node::start(&chat_config(port, &base, &app, breaker), &[KEY_ENV]);
    let misconfigured = r#"rt_resource_misconfigured{resource="zep"}"#;
    assert_eq!(
        node.metric(misconfigured).await,
        Some(0.0),
        "present from the start"
    );
    assert_eq!(node.get("/health").await.status(), 200);

    // The first call meets the 401 and marks Zep misconfigured.
    let first = enqueue(&node, "recall_memory", 1).await;
    records(&node, &first, "dead", Duration::from_secs(10)).await;
    let problems = async || {
        let health = node.get("/health").await;
        (health.status(), health.json::<Value>().await.unwrap())
    };
    eventually(
        "/health to name the misconfiguration",
        Duration::from_secs(5),
        async || problems().await.0 == 503,
    )
    .await;
    let marked_at = Instant::now();
    let calls_at_mark = zep.calls();
    let (_, health) = problems().await;
    let said = health["problems"].to_string();
    assert!(
        said.contains(
            "root/resources/zep is degraded: zep is misconfigured: zep answered 401 \
                       Unauthorized to POST /graph/search: check TEST_ZEP_KEY and base_url"
        ),
        "{health}"
    );
    assert_eq!(node.metric(misconfigured).await, Some(1.0));

    // Tasks that use Zep fail at once with the reason (no call each, no retry); link_error
    // runs. Chat, which can do without Zep, goes on degraded.
    let recalls = enqueue(&node, "recall_memory", 200).await;
    let chats = enqueue(&node, "process_chat_message", 20).await;
    for record in records(&node, &recalls, "dead", Duration::from_secs(20)).await {
        assert_eq!(
            record["error"],
            "permanent: resource zep misconfigured: zep answered 401 Unauthorized to POST \
             /graph/search: check TEST_ZEP_KEY and base_url",
        );
        assert_eq!(
            record["attempts"], 0,
            "failed before it could run: {record}"
        );
    }
    for record in records(&node, &chats, "succeeded", Duration::from_secs(20)).await {
        let result = &record["result"];
        assert_eq!(result["memory"], json!({ "context": "", "degraded": true }));
        assert_eq!(result["read_degraded"], "zep misconfigured");
        assert_eq!(result["write_status"], 202, "{result}");
    }
    let failures = r#"rt_tasks_succeeded_total{task="rt_echo",queue="default"}"#;
    eventually(
        "every link_error callback",
        Duration::from_secs(10),
        async || node.metric(failures).await == Some(201.0),
    )
    .await;
    let rejected =
        r#"rt_tasks_dead_lettered_total{task="recall_memory",queue="chat",reason="rejected"}"#;
    assert_eq!(node.metric(rejected).await, Some(200.0));
    // What reached Zep since: its probes, one per period (400 ms), not a call per task.
    let calls = zep.calls() - calls_at_mark;
    let periods = marked_at.elapsed().as_millis() / 400;
    eprintln!("calls to a Zep refusing the key for 220 tasks: {calls} in {periods} probe periods");
    assert!(
        calls as u128 <= periods + 1,
        "{calls} calls in {periods} periods"
    );
    // The snapshot is published every second.
    eventually(
        "the snapshot to show it",
        Duration::from_secs(3),
        async || {
            node.actor("root/resources/zep").await.unwrap()["snapshot"]["auth"]["misconfigured"]
                == true
        },
    )
    .await;
    let snapshot = node.actor("root/resources/zep").await.unwrap()["snapshot"].clone();
    assert_eq!(snapshot["auth"]["status"], 401);
    assert_eq!(
        snapshot["breaker"]["state"], "closed",
        "a 401 is not an outage"
    );

    // A restarted ZepActor does not forget it.
    assert_eq!(
        node.post("/chaos/kill/resources/zep", None).await.status(),
        202
    );
    eventually("the zep actor back", Duration::from_secs(5), async || {
        node.actor("root/resources/zep").await.is_some_and(|a| {
            a["restarts"] == 1 && a["status"] == "running" && a["snapshot"].is_object()
        })
    })
    .await;
    let actor = node.actor("root/resources/zep").await.unwrap();
    assert_eq!(actor["snapshot"]["auth"]["misconfigured"], true);
    eventually(
        "the new incarnation to say so",
        Duration::from_secs(3),
        async || {
            problems().await.1["problems"]
                .to_string()
                .contains("zep is misconfigured")
        },
    )
    .await;
    assert_eq!(node.metric(misconfigured).await, Some(1.0));

    // The key is fixed (the fake accepts it): the next probe brings Zep back.
    zep.refuse.store(false, Ordering::SeqCst);
    eventually("/health ok again", Duration::from_secs(5), async || {
        problems().await.0 == 200
    })
    .await;
    assert_eq!(node.metric(misconfigured).await, Some(0.0));
    let again = enqueue(&node, "recall_memory", 20).await;
    for record in records(&node, &again, "succeeded", Duration::from_secs(10)).await {
        assert_eq!(record["result"]["context"], "user likes boats");
    }
    // The chat's buffered memory writes reach Zep.
    eventually(
        "the buffered writes replayed",
        Duration::from_secs(10),
        async || {
            zep.seen()
                .iter()
                .filter(|(path, _, _)| path == "/api/v2/threads/t1/messages")
                .count()
                == 20
        },
    )
    .await;
    let seen = zep.seen();
    assert!(
        seen.iter()
            .any(|(path, _, _)| path == "/api/v2/users-ordered"),
        "the probe is the default one"
    );
    assert!(
        seen.iter()
            .all(|(_, _, auth)| auth.as_deref() == Some("Api-Key zk-secret-2"))
    );
    let events = event_kinds(&node).await;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["resource_misconfigured", "resource_restored"]);
    assert_eq!(events[0]["detail"]["resource"], "zep");
    assert_eq!(events[0]["detail"]["status"], 401);
    assert!(!node.log().contains("zk-secret-2"), "the key leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_goes_on_without_memory_while_zep_is_down_and_its_writes_are_replayed() {
    let zep = FakeZep::default();
    zep.down.store(true, Ordering::SeqCst);
    let base = zep.start().await;
    let port = free_port();
    let app = start_chat_app(port).await;
    let breaker = r#"{ failure_threshold = 1, open_for = "5s", open_for_max = "10s", probes = 1, probe_timeout = "1s" }"#;
    let node = Node::start(&chat_config(port, &base, &app, breaker), &[KEY_ENV]);

    // The first chat turn meets the dead Zep: its read opens the breaker and degrades.
    let first = enqueue(&node, "process_chat_message", 1).await;
    let record = &records(&node, &first, "succeeded", Duration::from_secs(10)).await[0];
    assert_eq!(
        record["result"]["memory"],
        json!({ "context": "", "degraded": true })
    );
    eventually(
        "the breaker open in the snapshot",
        Duration::from_secs(3),
        async || breaker_state(&node).await == "open",
    )
    .await;
    let calls_when_open = zep.calls();

    // While it is open: chat runs at once, reads degraded, writes buffered; the task that
    // cannot do without Zep waits, without an attempt.
    let opened = Instant::now();
    let recalls = enqueue(&node, "recall_memory", 5).await;
    let chats = enqueue(&node, "process_chat_message", 20).await;
    for record in records(&node, &chats, "succeeded", Duration::from_secs(10)).await {
        let result = &record["result"];
        assert_eq!(result["memory"], json!({ "context": "", "degraded": true }));
        assert_eq!(result["read_status"], 200);
        assert_eq!(result["read_degraded"], "zep unavailable");
        assert_eq!(result["write_status"], 202);
        assert_eq!(record["attempts"], 1);
    }
    assert!(
        opened.elapsed() < Duration::from_secs(3),
        "chat did not wait for the breaker"
    );
    let deferred = r#"rt_tasks_deferred_total{task="recall_memory",queue="chat"}"#;
    eventually(
        "recall_memory deferred",
        Duration::from_secs(5),
        async || node.metric(deferred).await.is_some_and(|n| n >= 5.0),
    )
    .await;
    for id in &recalls {
        let record = node.get_json(&format!("/tasks/{id}")).await;
        assert!(
            ["scheduled", "queued"].contains(&record["state"].as_str().unwrap_or(""))
                && record["attempts"] == 0,
            "recall_memory ran while Zep was down: {record}"
        );
    }
    let chat_deferred = r#"rt_tasks_deferred_total{task="process_chat_message",queue="chat"}"#;
    assert_eq!(node.metric(chat_deferred).await, Some(0.0));
    assert_eq!(
        zep.calls(),
        calls_when_open,
        "no chat turn called the dead Zep"
    );

    // Zep is back: the waiting tasks run, and every memory write reaches Zep.
    zep.down.store(false, Ordering::SeqCst);
    for record in records(&node, &recalls, "succeeded", Duration::from_secs(20)).await {
        assert_eq!(record["result"]["context"], "user likes boats");
    }
    eventually(
        "the buffered writes replayed",
        Duration::from_secs(10),
        async || {
            zep.seen()
                .iter()
                .filter(|(path, _, _)| path == "/api/v2/threads/t1/messages")
                .count()
                == 21
        },
    )
    .await;
    let seen = zep.seen();
    let mut written: Vec<String> = seen
        .iter()
        .filter(|(path, _, _)| path == "/api/v2/threads/t1/messages")
        .map(|(_, body, _)| {
            let body: Value = serde_json::from_str(body).unwrap();
            body["messages"][0]["content"].as_str().unwrap().to_string()
        })
        .collect();
    written.sort();
    let mut expected: Vec<String> = (0..20)
        .map(|i| format!("\"process_chat_message-{i}\""))
        .chain(["\"process_chat_message-0\"".to_string()])
        .collect();
    expected.sort();
    assert_eq!(written, expected, "every chat turn's memory write, once");
}
