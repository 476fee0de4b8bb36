//! `GET /events` end to end: an SSE client (reqwest, streaming) against the `runtime` binary —
//! a task's lifecycle in order, `?types=` filters, resuming with `Last-Event-ID`, supervision
//! events from a chaos kill, and a reader that stops when its client goes away.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::common::{Node, eventually};

const CONFIG: &str = r#"
[http]
bind = "127.0.0.1:0"

[supervision]
backoff = "5ms"
backoff_max = "50ms"

[chaos]
enabled = true

[queues.default]
concurrency = 2

[tasks.rt_noop]
handler = { kind = "native" }
"#;

/// One SSE message as sent on the wire.
#[derive(Debug, Clone)]
struct Message {
    id: String,
    event: String,
    data: Value,
}

/// A streaming SSE client over one `GET /events` response.
struct Sse {
    response: reqwest::Response,
    buffer: String,
    comments: usize,
}

impl Sse {
    async fn open(node: &Node, query: &str, last_event_id: Option<&str>) -> Sse {
        let mut request = reqwest::Client::new().get(format!("{}/events{query}", node.url));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("GET /events");
        assert_eq!(response.status(), 200, "GET /events{query}");
        assert_eq!(
            response.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Sse {
            response,
            buffer: String::new(),
            comments: 0,
        }
    }

    /// The next message (skipping comments), waiting up to 10 s.
    async fn next(&mut self) -> Message {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (String::new(), String::new(), None);
                for line in block.lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                    } else if let Some(v) = line.strip_prefix("id: ") {
                        id = v.to_string();
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_string();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        assert!(data.is_none(), "one data line per message: {block}");
                        data = Some(serde_json::from_str(v).expect("data is JSON"));
                    }
                }
                if let Some(data) = data {
                    return Message { id, event, data };
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("no SSE message within 10 s")
                .expect("stream error")
                .expect("stream ended");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Messages up to and including the first one `stop` accepts.
    async fn until(&mut self, stop: impl Fn(&Message) -> bool) -> Vec<Message> {
        let mut seen = Vec::new();
        loop {
            let message = self.next().await;
            let done = stop(&message);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
}

async fn enqueue(node: &Node, task: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&json!({ "task": task }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn kinds_of(messages: &[Message], task_id: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|m| m.data["task_id"] == task_id)
        .map(|m| m.event.clone())
        .collect()
}

fn succeeded(id: &str) -> impl Fn(&Message) -> bool + '_ {
    move |m| m.event == "succeeded" && m.data["task_id"] == id
}

#[tokio::test]
async fn a_task_s_lifecycle_streams_in_order_filters_apply_and_resume_gets_exactly_the_missed_events()
 {
    lifecycle(Node::start(CONFIG, &[])).await;
}

/// The same on a Redis Cluster, where each stream's tasks have an events stream of their own
/// (in its slot) and `GET /events` merges them: ids name their stream (`…@default`), a live
/// reader stays a moment behind (`events_settle`), and resuming by id still gets exactly what
/// was missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_of_a_redis_cluster_are_merged_and_resumable() {
    let cluster = tokio::task::spawn_blocking(actors::test_util::RedisCluster::start)
        .await
        .unwrap();
    lifecycle(Node::start(CONFIG, &[("RT_BROKER_URL", &cluster.url())])).await;
}

async fn lifecycle(node: Node) {
    // New events only: nothing from before the stream opened.
    let mut live = Sse::open(&node, "", None).await;
    let first = enqueue(&node, "rt_noop").await;
    let seen = live.until(succeeded(&first)).await;
    assert_eq!(kinds_of(&seen, &first), ["sent", "started", "succeeded"]);
    for m in &seen {
        assert_eq!(m.data["id"], m.id.as_str(), "the SSE id is the stream id");
        assert_eq!(
            m.data["kind"],
            m.event.as_str(),
            "the SSE event is the kind"
        );
    }
    let sent = &seen[0];
    assert_eq!(sent.event, "sent");
    assert_eq!(sent.data["task"], "rt_noop");
    assert_eq!(sent.data["queue"], "default");
    let started = seen.iter().find(|m| m.event == "started").unwrap();
    assert_eq!(started.data["detail"]["attempt"], 0);

    // ?types= keeps only those kinds; ?after=0 starts at the oldest event kept.
    let mut filtered = Sse::open(&node, "?after=0&types=started,succeeded", None).await;
    let seen = filtered.until(succeeded(&first)).await;
    assert_eq!(kinds_of(&seen, &first), ["started", "succeeded"]);
    assert!(seen.iter().all(|m| m.event != "sent"), "{seen:?}");
    // A prefix entry.
    let mut prefixed = Sse::open(&node, "?after=0&types=succ*", None).await;
    assert_eq!(prefixed.next().await.event, "succeeded");

    // The client goes away after `succeeded` of the first task; two more run meanwhile.
    let last_seen = seen.last().unwrap().id.clone();
    drop(live);
    let second = enqueue(&node, "rt_noop").await;
    node.until_state(&second, &["succeeded"], Duration::from_secs(10))
        .await;
    let third = enqueue(&node, "rt_noop").await;
    node.until_state(&third, &["succeeded"], Duration::from_secs(10))
        .await;

    // Reconnecting with Last-Event-ID (the header wins over ?after=0) gets exactly what it
    // missed, in order, and nothing it had.
    let mut resumed = Sse::open(&node, "?after=0", Some(&last_seen)).await;
    let mut missed = Vec::new();
    for _ in 0..6 {
        missed.push(resumed.next().await);
    }
    let got: Vec<(String, String)> = missed
        .iter()
        .map(|m| {
            (
                m.event.clone(),
                m.data["task_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want: Vec<(String, String)> = [&second, &third]
        .iter()
        .flat_map(|id| {
            ["sent", "started", "succeeded"]
                .iter()
                .map(move |k| (k.to_string(), id.to_string()))
        })
        .collect();
    assert_eq!(got, want);
    let seq = |id: &str| -> u64 { id.split('-').next().unwrap().parse().unwrap() };
    assert!(seq(&missed[0].id) > seq(&last_seen));

    // Bad input is refused before any stream starts.
    let bad = node.get("/events?types=no%20spaces").await;
    assert_eq!(bad.status(), 400);
    let bad = node.get("/events?after=%24").await;
    assert_eq!(bad.status(), 400);
    assert!(
        bad.text()
            .await
            .unwrap()
            .contains("after: expected an event id")
    );
}

#[tokio::test]
async fn recent_events_without_follow_end_the_response() {
    let node = Node::start(CONFIG, &[]);
    let id = enqueue(&node, "rt_noop").await;
    node.until_state(&id, &["succeeded"], Duration::from_secs(10))
        .await;
    let text = node
        .get("/events?last=2&follow=false")
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events, ["started", "succeeded"], "{text}");
    let text = node
        .get("/events?last=5&types=sent&follow=false")
        .await
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(events, ["sent"], "{text}");
}

#[tokio::test]
async fn a_chaos_kill_yields_actor_exited_then_actor_restarted() {
    let node = Node::start(CONFIG, &[]);
    let mut actors = Sse::open(&node, "?types=actor_", None).await;
    assert_eq!(node.post("/chaos/kill/heartbeat", None).await.status(), 202);
    let seen = actors.until(|m| m.event == "actor_restarted").await;
    let kinds: Vec<&str> = seen.iter().map(|m| m.event.as_str()).collect();
    assert_eq!(kinds, ["actor_exited", "actor_restarted"]);
    let exited = &seen[0].data;
    assert_eq!(exited["detail"]["path"], "root/heartbeat");
    assert_eq!(exited["detail"]["reason"], "stopped: killed");
    assert_eq!(exited["detail"]["restarting"], true);
    assert_eq!(exited["task_id"], Value::Null);
    let restarted = &seen[1].data;
    assert_eq!(restarted["detail"]["path"], "root/heartbeat");
    assert_eq!(restarted["detail"]["kind"], "heartbeat");
    assert_eq!(restarted["detail"]["restarts"], 1);
}

#[tokio::test]
async fn the_reader_stops_when_its_client_disconnects() {
    let node = Node::start(CONFIG, &[("RUST_LOG", "info,runtime::http::events=debug")]);
    let stream = Sse::open(&node, "", None).await;
    let opened = |log: &str| log.matches("event stream opened").count();
    let closed = |log: &str| log.matches("event stream closed").count();
    eventually(
        "the debug line `event stream opened`",
        Duration::from_secs(5),
        async || opened(&node.log()) > 0,
    )
    .await;
    // It keeps running while the client is there.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(closed(&node.log()), 0, "{}", node.log());
    drop(stream);
    eventually(
        "the reader to stop after its client left",
        Duration::from_secs(5),
        async || closed(&node.log()) > 0,
    )
    .await;
}

#[tokio::test]
async fn events_can_be_switched_off_without_touching_the_tasks() {
    let node = Node::start(&format!("{CONFIG}\n[events]\nenabled = false\n"), &[]);
    let id = enqueue(&node, "rt_noop").await;
    node.until_state(&id, &["succeeded"], Duration::from_secs(10))
        .await;
    assert_eq!(node.post("/chaos/kill/heartbeat", None).await.status(), 202);
    let response = node.get("/events?last=10&follow=false").await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["error"], "events are disabled ([events] enabled = false)",
        "{body}"
    );
    // The restart happened all the same; only its event is not written.
    eventually(
        "the heartbeat restarted",
        Duration::from_secs(5),
        async || {
            let restarts = node.actor("root/heartbeat").await.unwrap()["restarts"].clone();
            if restarts == 1 { Ok(()) } else { Err(restarts) }
        },
    )
    .await;
}
