//! No panic from untrusted numbers: every duration or time that arrives — in a `POST /tasks`
//! body, in an entry written straight into a queue, in an upstream's `Retry-After`, in a
//! failing task's `retry_after_ms` — is checked against its cap (`actors::caps`) and answered
//! with a JSON `400` naming the field and the cap, a dead letter naming it, or the cap applied;
//! never a panic, an empty reply, or a task run "at once" that was asked to wait.
//!
//! - [`numbers_out_of_range_in_a_request_are_400s_naming_the_field_and_the_cap`]: the router
//!   in process;
//! - [`numbers_out_of_range_in_entries_and_headers_never_panic_a_node`]: raw `XADD`s and
//!   hostile upstream answers under the real binary with a private redis-server;
//! - the property tests (`proptest`): generated task bodies at the router, generated entries
//!   and requests at a node, with good tasks between them. `RT_FUZZ_CASES` sets how many cases
//!   each runs (a short profile by default, e.g. `RT_FUZZ_CASES=100000` for a long run).

use crate::common;

use std::time::{Duration, SystemTime};

use crate::common::Node;
use actors::resource::Resources;
use actors::test_util::{RedisServer, fuzz_cases};
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use runtime::http::{AppState, app};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------------
// The router
// ---------------------------------------------------------------------------------------------

const ROUTER_CONFIG: &str = r#"
[queues.chat]
concurrency = 4
[tasks.process_chat_message]
queue = "chat"
handler = { kind = "native" }
time_limit = "30s"
"#;

/// A node's HTTP state over `memory://`, with a running tree.
async fn router_state() -> AppState {
    common::router_state(ROUTER_CONFIG, Resources::default()).await
}

/// `POST /tasks` with `body` → status, content type and body.
async fn post_tasks(state: &AppState, body: Vec<u8>) -> (StatusCode, Option<String>, String) {
    let request = Request::builder()
        .method("POST")
        .uri("/tasks")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap();
    let response =
        tokio::time::timeout(Duration::from_secs(10), app(state.clone()).oneshot(request))
            .await
            .expect("POST /tasks hung")
            .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Ready + delayed entries of `queue` (`GET /queues`).
async fn queued(state: &AppState, queue: &str) -> (u64, u64) {
    let request = Request::builder()
        .uri("/queues")
        .body(Body::empty())
        .unwrap();
    let response = app(state.clone()).oneshot(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let queues: Value = serde_json::from_slice(&body).unwrap();
    let depth = &queues["queues"][queue];
    (
        depth["ready"].as_u64().unwrap(),
        depth["delayed"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn numbers_out_of_range_in_a_request_are_400s_naming_the_field_and_the_cap() {
    let state = router_state().await;
    let task = |extra: &str| format!(r#"{{"task": "process_chat_message"{extra}}}"#);
    let over_a_year = "seconds is over the limit of 31536000 seconds (365 days)";
    let cases: Vec<(String, String)> = vec![
        (
            task(r#", "countdown": 3e11"#),
            format!("countdown: 300000000000 {over_a_year}"),
        ),
        (
            task(r#", "countdown": 1e15"#),
            format!("countdown: 1000000000000000 {over_a_year}"),
        ),
        (
            task(r#", "countdown": 1e300"#),
            format!("countdown: 1e300 {over_a_year}"),
        ),
        (
            task(r#", "countdown": 18446744073709551615"#),
            format!("countdown: 1.8446744073709552e19 {over_a_year}"),
        ),
        (
            task(r#", "countdown": 9223372036854775808"#),
            format!("countdown: 9.223372036854776e18 {over_a_year}"),
        ),
        (
            task(r#", "countdown": 31536001"#),
            format!("countdown: 31536001 {over_a_year}"),
        ),
        (
            task(r#", "countdown": -0.5"#),
            "countdown: must be ≥ 0 seconds, got -0.5".into(),
        ),
        (
            task(r#", "eta": "9999-12-31T23:59:59Z""#),
            "eta: `9999-12-31T23:59:59Z` is more than 365 days ahead (the furthest a task is \
             scheduled)"
                .into(),
        ),
        (
            task(r#", "eta": "10000-01-01T00:00:00Z""#),
            "eta: `10000-01-01T00:00:00Z` is not an RFC 3339 time".into(),
        ),
        (
            task(r#", "expires": "tomorrow""#),
            "expires: `tomorrow` is not an RFC 3339 time".into(),
        ),
        (
            task(r#", "time_limit_ms": 0"#),
            "time_limit_ms: must be longer than zero".into(),
        ),
        (
            task(r#", "soft_time_limit_ms": 0"#),
            "soft_time_limit_ms: must be longer than zero".into(),
        ),
        (
            task(r#", "time_limit_ms": 18446744073709551615"#),
            "time_limit_ms: 1.8446744073709552e19 ms is over the limit of 604800000 ms (7 days)"
                .into(),
        ),
        (
            task(r#", "soft_time_limit_ms": 604800001, "time_limit_ms": 1000"#),
            "soft_time_limit_ms: 604800001 ms is over the limit of 604800000 ms (7 days)".into(),
        ),
        (
            task(r#", "time_limit_ms": 5000, "soft_time_limit_ms": 5000"#),
            "soft_time_limit_ms: 5000 is not below time_limit_ms 5000: the soft limit would \
             never fire"
                .into(),
        ),
        (
            task(r#", "soft_time_limit_ms": 30000"#),
            "soft_time_limit_ms: 30000 is not below the task's time_limit of 30s: the soft \
             limit would never fire"
                .into(),
        ),
        (
            format!(r#"[{}, {}]"#, task(""), task(r#", "countdown": 1e300"#)),
            format!("[1].countdown: 1e300 {over_a_year}"),
        ),
    ];
    for (body, expected) in &cases {
        let (status, content_type, answer) = post_tasks(&state, body.clone().into_bytes()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        assert_eq!(content_type.as_deref(), Some("application/json"), "{body}");
        let error: Value = serde_json::from_str(&answer).unwrap();
        let error = error["error"].as_str().unwrap();
        assert!(
            error.starts_with(expected.as_str()),
            "{body}:\n  got      {error}\n  expected {expected}"
        );
    }
    assert_eq!(queued(&state, "chat").await, (0, 0), "nothing was enqueued");

    // In range: a countdown of 364 days and an eta just as far are delayed; an expiry in the
    // year 9999 (the last second RFC 3339 can write) is as good as never; a past eta runs now.
    let soon = humantime::format_rfc3339(SystemTime::now() + Duration::from_secs(364 * 86_400));
    for body in [
        task(r#", "countdown": 31449600"#),
        task(&format!(r#", "eta": "{soon}""#)),
        task(r#", "expires": "9999-12-31T23:59:59Z""#),
        task(r#", "eta": "1960-01-01T00:00:00Z""#),
        task(r#", "time_limit_ms": 604800000, "soft_time_limit_ms": 1000"#),
    ] {
        let (status, _, answer) = post_tasks(&state, body.clone().into_bytes()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body} → {answer}");
    }
    assert_eq!(queued(&state, "chat").await, (3, 2));
}

// ---------------------------------------------------------------------------------------------
// A node: entries written straight into the queue, hostile upstream answers
// ---------------------------------------------------------------------------------------------

/// The node's config; `{app}` is the fake app's base URL.
fn node_config(app: &str) -> String {
    format!(
        r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[queues.chat]
concurrency = 8

[tasks.rt_echo]
queue = "chat"
handler = {{ kind = "native" }}
time_limit = "30s"

[tasks.rt_fail]
queue = "chat"
handler = {{ kind = "native" }}
max_retries = 3
backoff = "10ms"
backoff_max = "10ms"
jitter = 0.0

[tasks.call_app]
queue = "chat"
handler = {{ kind = "http", url = "{app}/busy" }}
max_retries = 3
backoff = "10ms"
backoff_max = "10ms"
jitter = 0.0
"#
    )
}

/// A fake app whose `/busy` answers `503` with the `Retry-After` the request's `x-retry-after`
/// names (the task's envelope carries it in `kwargs.retry_after`).
async fn fake_app() -> String {
    use axum::routing::post;
    let router = axum::Router::new().route(
        "/busy",
        post(|body: String| async move {
            let envelope: Value = serde_json::from_str(&body).unwrap_or_default();
            let retry_after = envelope["kwargs"]["retry_after"]
                .as_str()
                .unwrap_or("1")
                .to_string();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, retry_after)],
                "down for maintenance",
            )
        }),
    );
    format!("http://{}", common::fakes::serve(router).await)
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// `XADD rt:{chat}:stream * e <entry>`.
async fn xadd(conn: &mut redis::aio::MultiplexedConnection, entry: &str) {
    let _: String = redis::cmd("XADD")
        .arg("rt:{chat}:stream")
        .arg("*")
        .arg("e")
        .arg(entry)
        .query_async(conn)
        .await
        .unwrap();
}

/// Posts one task body to the node → its id.
async fn post(node: &Node, body: &Value) -> String {
    let answer: Value = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{body} → {answer}"))
        .to_string()
}

/// The delayed-set members of `chat` whose envelope has `id`, with their scores (due, ms).
async fn delayed(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> Vec<(Value, f64)> {
    let members: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg("rt:{chat}:delayed")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await
        .unwrap();
    members
        .into_iter()
        .filter_map(|(json, score)| {
            let envelope: Value = serde_json::from_str(&json).ok()?;
            (envelope["id"] == id).then_some((envelope, score))
        })
        .collect()
}

fn epoch_ms_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64
}

/// Sum of `restarts` over the whole `/actors` tree.
fn restarts(nodes: &Value) -> u64 {
    nodes.as_array().map_or(0, |nodes| {
        nodes
            .iter()
            .map(|n| n["restarts"].as_u64().unwrap_or(0) + restarts(&n["children"]))
            .sum()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_out_of_range_in_entries_and_headers_never_panic_a_node() {
    let redis = RedisServer::start();
    let app = fake_app().await;
    let node = Node::start(&node_config(&app), &[("RT_BROKER_URL", &redis.url())]);
    let mut conn = redis_conn(&redis).await;
    let day_ms = 86_400_000.0;
    let in_an_hour =
        humantime::format_rfc3339(SystemTime::now() + Duration::from_secs(3600)).to_string();

    // (entry written straight into the stream, the reason it must be dead-lettered with)
    let dead: Vec<(Value, String)> = vec![
        (
            json!({ "id": "tl-max", "task": "rt_echo", "queue": "chat",
                    "time_limit_ms": u64::MAX }),
            "time_limit_ms: 1.8446744073709552e19 ms is over the limit of 604800000 ms (7 days)"
                .into(),
        ),
        (
            json!({ "id": "tl-zero", "task": "rt_echo", "queue": "chat", "time_limit_ms": 0 }),
            "time_limit_ms: must be longer than zero".into(),
        ),
        (
            json!({ "id": "soft-zero", "task": "rt_echo", "queue": "chat",
                    "soft_time_limit_ms": 0 }),
            "soft_time_limit_ms: must be longer than zero".into(),
        ),
        (
            json!({ "id": "soft-above", "task": "rt_echo", "queue": "chat",
                    "time_limit_ms": 1000, "soft_time_limit_ms": 2000 }),
            "soft_time_limit_ms: 2000 is not below time_limit_ms 1000: the soft limit would \
             never fire"
                .into(),
        ),
        (
            json!({ "id": "eta-9999", "task": "rt_echo", "queue": "chat",
                    "eta": "9999-12-31T23:59:59Z" }),
            "eta: `9999-12-31T23:59:59Z` is more than 365 days ahead (the furthest a task is \
             scheduled)"
                .into(),
        ),
        (
            json!({ "id": "eta-junk", "task": "rt_echo", "queue": "chat", "eta": "soon" }),
            "eta: `soon` is not an RFC 3339 time".into(),
        ),
        (
            json!({ "id": "expires-junk", "task": "rt_echo", "queue": "chat",
                    "expires": "1e300" }),
            "expires: `1e300` is not an RFC 3339 time".into(),
        ),
        (
            json!({ "id": "attempt-max", "task": "rt_fail", "queue": "chat",
                    "attempt": u32::MAX }),
            "retries exhausted after 4294967295 attempts: rt_fail".into(),
        ),
    ];
    let mut good = Vec::new();
    for (n, (entry, _)) in dead.iter().enumerate() {
        good.push(post(&node, &json!({ "task": "rt_echo", "args": [n, "before"] })).await);
        xadd(&mut conn, &entry.to_string()).await;
        good.push(post(&node, &json!({ "task": "rt_echo", "args": [n, "after"] })).await);
    }
    // Asked to wait: an entry with an eta in an hour is deferred to it, not run; a task whose
    // handler says "retry after u64::MAX ms" and one whose app says `Retry-After:
    // 18446744073709551615` wait for the caps (365 days, 1 day), not a moment.
    xadd(
        &mut conn,
        &json!({ "id": "eta-hour", "task": "rt_echo", "queue": "chat", "eta": in_an_hour })
            .to_string(),
    )
    .await;
    let failing = post(
        &node,
        &json!({ "task": "rt_fail", "kwargs": { "retry_after_ms": u64::MAX } }),
    )
    .await;
    let busy = post(
        &node,
        &json!({ "task": "call_app", "kwargs": { "retry_after": "18446744073709551615" } }),
    )
    .await;
    let busy_float = post(
        &node,
        &json!({ "task": "call_app", "kwargs": { "retry_after": "1e300" } }),
    )
    .await;
    good.push(post(&node, &json!({ "task": "rt_echo", "args": ["last"] })).await);

    for id in &good {
        node.until_state(id, &["succeeded"], Duration::from_secs(30))
            .await;
    }
    for (entry, reason) in &dead {
        let id = entry["id"].as_str().unwrap();
        let record = node
            .until_state(id, &["dead", "succeeded"], Duration::from_secs(30))
            .await;
        assert_eq!(record["state"], "dead", "{entry}: {record}");
        let error = record["error"].as_str().unwrap();
        assert!(
            error.starts_with(reason.as_str()),
            "{entry}:\n  got      {error}\n  expected {reason}"
        );
    }
    for (id, at_least_ms) in [
        (failing.as_str(), 364.0 * day_ms),
        (busy.as_str(), 0.99 * day_ms),
        (busy_float.as_str(), 0.99 * day_ms),
    ] {
        let record = node
            .until_state(
                id,
                &["retrying", "dead", "succeeded"],
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(record["state"], "retrying", "{id}: {record}");
        assert_eq!(record["attempts"], 1, "{id}: it ran once: {record}");
        let due = delayed(&mut conn, id).await;
        assert_eq!(due.len(), 1, "{id} waits in the delayed set: {due:?}");
        let ahead = due[0].1 - epoch_ms_now();
        assert!(
            ahead > at_least_ms && ahead <= 365.0 * day_ms + 1000.0,
            "{id} is due in {ahead} ms"
        );
    }
    let log = node.log();
    assert!(
        log.lines().any(|line| line.contains("WARN")
            && line.contains("retry-after")
            && line.contains("the cap applies")),
        "no WARN line for the capped Retry-After; log:\n{log}"
    );
    // The entry with an eta in an hour has not run: it waits in the delayed set, scheduled.
    let record = node.get_json("/tasks/eta-hour").await;
    assert_eq!(
        (record["state"].as_str(), record["attempts"].as_u64()),
        (Some("scheduled"), Some(0)),
        "{record}"
    );
    let due = delayed(&mut conn, "eta-hour").await;
    assert_eq!(due.len(), 1, "eta-hour is deferred to its eta: {due:?}");
    assert!(due[0].1 - epoch_ms_now() > 3_500_000.0, "{due:?}");

    // `runtime enqueue --countdown` refuses what JSON cannot carry (`inf` would arrive as no
    // countdown at all: at once) and what the node would refuse.
    for (countdown, expected) in [
        (
            "inf",
            "inf seconds is over the limit of 31536000 seconds (365 days)",
        ),
        (
            "1e300",
            "1e300 seconds is over the limit of 31536000 seconds (365 days)",
        ),
        ("NaN", "must be ≥ 0 seconds, got NaN"),
        ("soon", "`soon` is not a number of seconds"),
    ] {
        let out = std::process::Command::new(common::binary())
            .args([
                "enqueue",
                "rt_echo",
                "--countdown",
                countdown,
                "--url",
                &node.url,
            ])
            .env_remove("RT_ADMIN_TOKEN")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--countdown {countdown} was sent");
        assert!(
            stderr.contains("--countdown") && stderr.contains(expected),
            "--countdown {countdown}: {stderr}"
        );
    }

    // The node is whole: no panic, no actor restarted.
    assert_eq!(node.get("/health").await.status(), 200, "{}", node.log());
    assert_eq!(restarts(&node.get_json("/actors").await), 0);
    assert!(!node.log().contains("panicked"), "{}", node.log());
}

// ---------------------------------------------------------------------------------------------
// Property tests: generated bodies, entries and Celery messages
// ---------------------------------------------------------------------------------------------

/// A JSON number token of any magnitude, or something a careless producer writes in its place
/// (`NaN`, `1e400`, `0x10` make the text invalid JSON — that is part of the test).
fn number_token() -> impl Strategy<Value = String> {
    let special = prop::sample::select(vec![
        "0",
        "-0",
        "1",
        "-1",
        "0.5",
        "1e-300",
        "3e11",
        "1e15",
        "1e300",
        "1.7976931348623157e308",
        "1e400",
        "-1e400",
        "18446744073709551615",
        "18446744073709551616",
        "9223372036854775807",
        "9223372036854775808",
        "-9223372036854775808",
        "4294967295",
        "4294967296",
        "31536000",
        "31536001",
        "604800000",
        "604800001",
        "NaN",
        "Infinity",
        "0x10",
        "1_000",
        "\"60\"",
        "\"1e300\"",
    ])
    .prop_map(str::to_string);
    prop_oneof![
        3 => special,
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_filter("JSON has no NaN or infinity", |n| n.is_finite())
            .prop_map(|n| format!("{n:e}")),
        1 => (0u64..100_000).prop_map(|n| n.to_string()),
        1 => (-400i32..400).prop_map(|e| format!("1e{e}")),
    ]
}

/// A JSON string token holding something like a time: RFC 3339 with any field out of range,
/// the edges of what RFC 3339 can write, and junk.
fn time_token() -> impl Strategy<Value = String> {
    let shaped = (
        0u32..=10_001,
        0u32..=13,
        0u32..=32,
        0u32..=25,
        0u32..=61,
        0u32..=61,
        prop::sample::select(vec![
            "Z", "+00:00", "-23:59", "+23:59", "+24:00", "", "z", "+01",
        ]),
    )
        .prop_map(|(y, mo, d, h, mi, s, zone)| {
            format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{zone}")
        });
    let edges = prop::sample::select(vec![
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59.999999999-23:59",
        "9999-12-30T22:00:00Z",
        "0000-01-01T00:00:00Z",
        "1969-12-31T23:59:59.999Z",
        "1970-01-01T00:00:00Z",
        "2026-02-29T00:00:00Z",
        "2024-02-29T00:00:00Z",
        "soon",
        "",
        "now",
        "1e300",
        "2026-11-23 15:00:00+01:00",
    ])
    .prop_map(str::to_string);
    prop_oneof![shaped, edges, "\\PC{0,30}"].prop_map(|text| serde_json::to_string(&text).unwrap())
}

/// Any JSON value as text: nested junk, long and unicode strings, wrong types.
fn junk_token() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        number_token(),
        "\\PC{0,40}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        (1usize..5000).prop_map(|n| serde_json::to_string(&"é".repeat(n)).unwrap()),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec(("[a-z_]{1,12}", inner), 0..6).prop_map(|fields| {
                let fields: Vec<String> = fields
                    .into_iter()
                    .map(|(k, v)| format!("{}:{v}", serde_json::to_string(&k).unwrap()))
                    .collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
}

/// The fields a task request or entry may carry about time, with hostile values.
fn timed_fields() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let field = prop_oneof![
        (Just("countdown"), number_token()),
        (Just("eta"), time_token()),
        (Just("expires"), time_token()),
        (Just("time_limit_ms"), number_token()),
        (Just("soft_time_limit_ms"), number_token()),
        (Just("attempt"), number_token()),
        (Just("args"), junk_token()),
        (Just("kwargs"), junk_token()),
        (
            Just("kwargs"),
            number_token().prop_map(|n| format!(r#"{{"retry_after_ms": {n}}}"#))
        ),
        (Just("queue"), junk_token()),
        (Just("link"), junk_token()),
        (Just("trace_id"), junk_token()),
        (Just("idempotency_key"), junk_token()),
    ];
    prop::collection::vec(field, 0..5)
}

/// An object's text from its fields (a field may repeat: the last one wins, or serde says so).
fn object(fields: &[(&str, String)]) -> String {
    let fields: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
    format!("{{{}}}", fields.join(","))
}

/// A generated `POST /tasks` body: one task object or a batch with good tasks around it.
fn task_body() -> impl Strategy<Value = String> {
    let task = prop_oneof![
        4 => Just("\"process_chat_message\"".to_string()),
        1 => junk_token(),
    ];
    (task, timed_fields(), 0u8..4).prop_map(|(task, mut fields, shape)| {
        fields.retain(|(name, _)| *name != "attempt");
        fields.insert(0, ("task", task));
        let generated = object(&fields);
        let good = r#"{"task": "process_chat_message", "args": ["good"]}"#;
        match shape {
            0 => format!("[{good}, {generated}, {good}]"),
            1 => format!("[{generated}]"),
            _ => generated,
        }
    })
}

/// The ids of the tasks a `202` answer says were enqueued (duplicates left out).
fn enqueued(answer: &Value) -> usize {
    let answers = match answer {
        Value::Array(items) => items.clone(),
        one => vec![one.clone()],
    };
    answers.iter().filter(|a| a["duplicate"] == false).count()
}

#[test]
fn generated_task_bodies_get_a_json_4xx_or_a_202_never_a_panic() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let state = runtime.block_on(router_state());
    let good = br#"{"task": "process_chat_message", "args": ["between"]}"#.to_vec();
    let expected = std::cell::Cell::new(0);
    let refused = std::cell::Cell::new(0);
    let config = ProptestConfig {
        cases: fuzz_cases(400),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = TestRunner::new(config);
    let outcome = runner.run(&task_body(), |body| {
        runtime.block_on(async {
            let (status, _, answer) = post_tasks(&state, good.clone()).await;
            prop_assert_eq!(status, StatusCode::ACCEPTED, "a good task: {}", answer);
            expected.set(expected.get() + 1);
            let (status, content_type, answer) =
                post_tasks(&state, body.clone().into_bytes()).await;
            prop_assert!(
                status == StatusCode::ACCEPTED || status.is_client_error(),
                "{} → {} {}",
                body,
                status,
                answer
            );
            prop_assert_eq!(
                content_type.as_deref(),
                Some("application/json"),
                "{}",
                body
            );
            let answer: Value = serde_json::from_str(&answer).unwrap();
            if status == StatusCode::ACCEPTED {
                expected.set(expected.get() + enqueued(&answer));
            } else {
                let error = answer["error"].as_str().unwrap_or_default();
                prop_assert!(!error.is_empty(), "{} → {}", body, answer);
                refused.set(refused.get() + 1);
            }
            Ok(())
        })
    });
    if let Err(err) = outcome {
        panic!("{err}");
    }
    let cases = runner.config().cases;
    eprintln!(
        "{cases} generated bodies: {} refused with a JSON 4xx, the others accepted",
        refused.get()
    );
    assert!(
        refused.get() > 0 && refused.get() < cases,
        "the generator reaches both sides"
    );
    // Every accepted task is in the queue, not one more.
    let (ready, delayed) = runtime.block_on(queued(&state, "chat"));
    assert_eq!((ready + delayed) as usize, expected.get());
}

/// One generated entry for the stream, and what it promises about time.
#[derive(Clone, Debug)]
struct GeneratedEntry {
    /// The text of `e`.
    text: String,
    /// Its id, when it carries a usable one.
    id: Option<String>,
    /// It must not run before this many seconds from when it was written (a valid eta), or
    /// must not run a second time within them (a `retry_after_ms`).
    waits_secs: Option<u64>,
}

/// A kombu message (protocol v2) with hostile `eta`, `expires`, `timelimit` and `retries`.
fn celery_message() -> impl Strategy<Value = String> {
    use base64::Engine;
    let header = prop_oneof![
        (Just("eta"), time_token()),
        (Just("expires"), time_token()),
        (Just("retries"), number_token()),
        (
            Just("timelimit"),
            (number_token(), number_token()).prop_map(|(h, s)| format!("[{h},{s}]"))
        ),
        (Just("timelimit"), junk_token()),
    ];
    prop::collection::vec(header, 0..4).prop_map(|headers| {
        let mut fields = vec![("id", "\"c\"".to_string()), ("task", "\"t\"".to_string())];
        fields.extend(headers);
        let body = base64::engine::general_purpose::STANDARD.encode(r#"[[1], {}, {}]"#);
        format!(
            r#"{{"body": "{body}", "content-type": "application/json", "headers": {}, "properties": {{"body_encoding": "base64"}}}}"#,
            object(&fields)
        )
    })
}

/// A generated stream entry: an envelope with hostile times and numbers, a Celery message
/// with hostile headers, an envelope that promises to wait, or junk.
fn stream_entry(n: usize) -> impl Strategy<Value = GeneratedEntry> {
    let id = format!("gen-{n}");
    let task = prop::sample::select(vec!["\"rt_echo\"", "\"rt_fail\"", "\"nope\"", "5"]);
    let hostile = {
        let id = id.clone();
        (task, timed_fields()).prop_map(move |(task, mut fields)| {
            fields.retain(|(name, _)| *name != "queue");
            let mut all = vec![
                ("id", format!("\"{id}\"")),
                ("task", task.to_string()),
                ("queue", "\"chat\"".to_string()),
            ];
            all.extend(fields);
            GeneratedEntry {
                text: object(&all),
                id: Some(id.clone()),
                waits_secs: None,
            }
        })
    };
    let celery = {
        let id = id.clone();
        celery_message().prop_map(move |raw| GeneratedEntry {
            text: json!({ "id": id, "task": "rt_echo", "queue": "chat", "celery_raw": raw })
                .to_string(),
            id: Some(id.clone()),
            waits_secs: None,
        })
    };
    // Promises: an eta 1 minute to 364 days ahead; a failure asking for a retry at least a
    // minute later (up to u64::MAX ms).
    let later = {
        let id = id.clone();
        (60u64..364 * 86_400).prop_map(move |ahead| {
            let eta = humantime::format_rfc3339(SystemTime::now() + Duration::from_secs(ahead));
            GeneratedEntry {
                text:
                    json!({ "id": id, "task": "rt_echo", "queue": "chat", "eta": eta.to_string() })
                        .to_string(),
                id: Some(id.clone()),
                waits_secs: Some(ahead),
            }
        })
    };
    let retry_later = {
        let id = id.clone();
        prop_oneof![(60_000u64..u64::MAX).boxed(), Just(u64::MAX).boxed()].prop_map(move |ms| {
            GeneratedEntry {
                text: json!({ "id": id, "task": "rt_fail", "queue": "chat",
                              "kwargs": { "retry_after_ms": ms } })
                .to_string(),
                id: Some(id.clone()),
                waits_secs: Some(60),
            }
        })
    };
    let junk = junk_token().prop_map(|text| GeneratedEntry {
        text,
        id: None,
        waits_secs: None,
    });
    prop_oneof![4 => hostile, 2 => celery, 1 => later, 1 => retry_later, 1 => junk]
}

/// The ids of the envelopes in the delayed set of `chat`.
async fn delayed_ids(
    conn: &mut redis::aio::MultiplexedConnection,
) -> std::collections::HashSet<String> {
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg("rt:{chat}:delayed")
        .arg(0)
        .arg(-1)
        .query_async(conn)
        .await
        .unwrap();
    members
        .iter()
        .filter_map(|json| serde_json::from_str::<Value>(json).ok())
        .filter_map(|envelope| envelope["id"].as_str().map(str::to_string))
        .collect()
}

/// Ids mentioned in the dead letters of `chat` (a malformed entry keeps its raw text).
async fn dead_letter_texts(conn: &mut redis::aio::MultiplexedConnection) -> String {
    let letters: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg("rt:{chat}:dead")
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    letters
        .ids
        .iter()
        .filter_map(|letter| letter.get::<String>("e"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_entries_and_requests_at_a_node_never_panic_it_and_good_tasks_succeed() {
    let redis = RedisServer::start();
    let app = fake_app().await;
    let node = Node::start(&node_config(&app), &[("RT_BROKER_URL", &redis.url())]);
    let mut conn = redis_conn(&redis).await;
    let cases = fuzz_cases(120) as usize;
    let mut runner = TestRunner::new(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let mut good = Vec::new();
    let mut entries = Vec::new();
    let client = reqwest::Client::new();
    for n in 0..cases {
        let entry = stream_entry(n).new_tree(&mut runner).unwrap().current();
        let written = SystemTime::now();
        xadd(&mut conn, &entry.text).await;
        entries.push((entry, written));
        // A generated request through the binary every other entry: a JSON 4xx or a 202.
        if n % 2 == 0 {
            let body = task_body().new_tree(&mut runner).unwrap().current();
            let body = body.replace("process_chat_message", "rt_echo");
            let response = client
                .post(format!("{}/tasks", node.url))
                .header(header::CONTENT_TYPE.as_str(), "application/json")
                .body(body.clone())
                .send()
                .await
                .unwrap_or_else(|e| panic!("{body}: no answer ({e}); log:\n{}", node.log()));
            let status = response.status().as_u16();
            let answer = response.text().await.unwrap();
            assert!(
                status == 202 || (400..500).contains(&status),
                "{body} → {status} {answer}"
            );
            let answer: Value = serde_json::from_str(&answer)
                .unwrap_or_else(|_| panic!("{body} → {status}, not JSON: {answer}"));
            if status >= 400 {
                assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
            }
        }
        good.push(post(&node, &json!({ "task": "rt_echo", "args": [n, "good"] })).await);
    }

    for id in &good {
        node.until_state(id, &["succeeded"], Duration::from_secs(30))
            .await;
    }
    // Every entry with an id is accounted for: recorded, waiting in the delayed set, or a dead
    // letter; those that promised to wait did not run (again) before their time.
    let at = Instant::now();
    let mut unsettled: Vec<&(GeneratedEntry, SystemTime)> =
        entries.iter().filter(|(e, _)| e.id.is_some()).collect();
    let mut outcomes: std::collections::BTreeMap<String, usize> = Default::default();
    while !unsettled.is_empty() {
        let dead = dead_letter_texts(&mut conn).await;
        let delayed_ids = delayed_ids(&mut conn).await;
        let mut left = Vec::new();
        for pending in unsettled {
            let (entry, written) = pending;
            let id = entry.id.as_deref().unwrap();
            let response = node.get(&format!("/tasks/{id}")).await;
            let record: Option<Value> = if response.status() == 200 {
                Some(response.json().await.unwrap())
            } else {
                None
            };
            let waiting = delayed_ids.contains(id);
            if let Some(secs) = entry.waits_secs {
                let early = written.elapsed().unwrap_or_default() < Duration::from_secs(secs);
                // Deferred to its eta without running (scheduled), or retrying after its one
                // run, or running that one run (its start marker written before the outcome).
                if early && let Some(record) = &record {
                    let not_run = record["state"] == "scheduled" && record["attempts"] == 0;
                    let ran_once = ["retrying", "running"]
                        .contains(&record["state"].as_str().unwrap_or(""))
                        && record["attempts"] == 1;
                    assert!(
                        not_run || ran_once,
                        "{}: ran before its time: {record}",
                        entry.text
                    );
                }
            }
            let state = record.as_ref().map(|r| r["state"].as_str().unwrap_or(""));
            let outcome = match state {
                Some("succeeded") => Some("succeeded".to_string()),
                Some("dead") => {
                    let error = record.as_ref().unwrap()["error"].as_str().unwrap_or("");
                    let field = error.split(':').next().unwrap_or("").to_string();
                    Some(format!(
                        "dead ({})",
                        field.chars().take(40).collect::<String>()
                    ))
                }
                // Not ended yet: in the delayed set (an eta, a retry), or on its way.
                Some("retrying" | "scheduled" | "queued" | "running") | None if waiting => {
                    Some("waiting".to_string())
                }
                Some("retrying" | "scheduled" | "queued" | "running") | None
                    if dead.contains(&format!("\"{id}\"")) =>
                {
                    Some("dead letter without a record".to_string())
                }
                Some("retrying" | "scheduled" | "queued" | "running") | None => None,
                Some(other) => panic!("{id}: state {other}"),
            };
            match outcome {
                Some(outcome) => *outcomes.entry(outcome).or_default() += 1,
                None => left.push(pending),
            }
        }
        unsettled = left;
        if !unsettled.is_empty() {
            assert!(
                at.elapsed() < Duration::from_secs(60) + Duration::from_millis(20) * cases as u32,
                "never settled: {:#?}\nlog:\n{}",
                unsettled,
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eprintln!(
        "{cases} generated entries and {} requests: every good task succeeded; entries: \
         {outcomes:#?}",
        cases.div_ceil(2)
    );

    assert_eq!(node.get("/health").await.status(), 200, "{}", node.log());
    assert_eq!(
        restarts(&node.get_json("/actors").await),
        0,
        "{}",
        node.log()
    );
    assert!(!node.log().contains("panicked"), "{}", node.log());
}
