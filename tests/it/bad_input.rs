//! The bad-input suite: whatever arrives — a malformed stream entry written straight into
//! Redis, a malformed HTTP request to any route, a mutated config — gets a clear error and
//! nothing else: no panic, no crash, no actor restart, and the good work beside it unaffected.
//!
//! - [`malformed_stream_entries_are_dead_lettered_while_good_tasks_succeed`]: raw `XADD`s into
//!   a private redis-server under a running binary, plus a few raw HTTP requests to it;
//! - [`every_route_answers_bad_requests_with_a_json_error_never_a_5xx`]: a property-style
//!   sweep, route × method × bad body/path/content type, over the in-process router;
//! - [`mutated_configs_compile_or_name_a_key_path_and_never_panic`]: a few hundred seeded
//!   mutations of `config/actors.toml` and `config/examples/*.toml` through the compiler.

use crate::common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use crate::common::{Node, raw_http};
use actors::resource::Resources;
use actors::test_util::RedisServer;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runtime::config::{Environment, compile_str};
use runtime::http::{AppState, app};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::ServiceExt;

// ---------------------------------------------------------------------------------------------
// Malformed stream entries
// ---------------------------------------------------------------------------------------------

const NODE_CONFIG: &str = r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[queues.chat]
concurrency = 4

[tasks.rt_echo]
queue = "chat"
handler = { kind = "native" }
"#;

/// `XADD rt:{chat}:stream * <fields…>` from a plain connection, as another program would.
async fn xadd(conn: &mut redis::aio::MultiplexedConnection, fields: &[(&str, &[u8])]) {
    let mut cmd = redis::cmd("XADD");
    cmd.arg("rt:{chat}:stream").arg("*");
    for (name, value) in fields {
        cmd.arg(*name).arg(*value);
    }
    let _: String = cmd.query_async(conn).await.unwrap();
}

/// The fields of one raw stream entry.
type Fields = Vec<(&'static str, Vec<u8>)>;

/// Sum of `restarts` over the whole `/actors` tree.
fn restarts(nodes: &Value) -> u64 {
    nodes
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|n| n["restarts"].as_u64().unwrap_or(0) + restarts(&n["children"]))
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stream_entries_are_dead_lettered_while_good_tasks_succeed() {
    let redis = RedisServer::start();
    let node = Node::start(NODE_CONFIG, &[("RT_BROKER_URL", &redis.url())]);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();

    let huge_garbage = vec![b'x'; 2 * 1024 * 1024];
    let huge_text = "y".repeat(2 * 1024 * 1024);
    let huge_envelope =
        json!({ "id": "huge-1", "task": "rt_echo", "queue": "chat", "args": [huge_text] })
            .to_string();
    // (what is written, the start of the reason it must be dead-lettered with)
    let bad: Vec<(Fields, &str)> = vec![
        (
            vec![("e", b"this is not json".to_vec())],
            "malformed entry: ",
        ),
        (
            vec![("e", br#"{"id": 5, "task": ["rt_echo"], "queue": {}}"#.to_vec())],
            "malformed entry: ",
        ),
        (
            vec![(
                "e",
                br#"{"id": "wt-1", "task": "rt_echo", "queue": "chat", "args": "not a list", "retries": "x"}"#
                    .to_vec(),
            )],
            "malformed entry: ",
        ),
        (vec![("e", huge_garbage)], "malformed entry: "),
        (
            vec![("e", b"\xff\xfe\x00{\"id\":\"u-1\"}\xc3\x28".to_vec())],
            "malformed entry: ",
        ),
        (
            vec![(
                "e",
                b"{\"id\": \"u-2\", \"task\": \"rt_echo\", \"queue\": \"chat\", \"args\": [\"\xff\xfe\"]}"
                    .to_vec(),
            )],
            "malformed entry: `e` is not valid UTF-8",
        ),
        (
            vec![(
                "e",
                br#"{"id": "nt-1", "task": "no_such_task", "queue": "chat"}"#.to_vec(),
            )],
            "no such task `no_such_task`",
        ),
        (
            vec![("x", b"1".to_vec()), ("d", b"not a number".to_vec())],
            "malformed entry: no field `e`",
        ),
        (
            vec![("e", br#"{"task": "rt_echo", "queue": "chat"}"#.to_vec())],
            "malformed entry: ",
        ),
        (vec![("e", b"".to_vec())], "malformed entry: "),
        (vec![("e", b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[".to_vec())], "malformed entry: "),
    ];

    // Good tasks through the API, bad entries written straight into the stream between them.
    let mut good = Vec::new();
    for (n, (fields, _)) in bad.iter().enumerate() {
        let sent: Value = reqwest::Client::new()
            .post(format!("{}/tasks", node.url))
            .json(&json!([
                { "task": "rt_echo", "args": [n, "before"] },
                { "task": "rt_echo", "args": [n, "after"] },
            ]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        good.extend(
            sent.as_array()
                .unwrap()
                .iter()
                .map(|e| e["id"].as_str().unwrap().to_string()),
        );
        let fields: Vec<(&str, &[u8])> = fields.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        xadd(&mut conn, &fields).await;
    }
    // A valid envelope with a 2 MB argument is not malformed, but it is over the broker's
    // `max_entry_bytes` (1 MiB by default): it is dead-lettered unrun with its size and the
    // limit, and the good tasks sent right after it still run.
    xadd(&mut conn, &[("e", huge_envelope.as_bytes())]).await;
    let after_huge: Value = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&json!([
            { "task": "rt_echo", "args": ["after huge"] },
            { "task": "rt_echo", "args": ["after huge", 2] },
        ]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    good.extend(
        after_huge
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string()),
    );
    // Through the API the same envelope is refused at once: a JSON 413 naming size and limit.
    let refused = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&json!({ "task": "rt_echo", "id": "huge-2", "args": [huge_text] }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 413);
    assert_eq!(
        refused.headers()[reqwest::header::CONTENT_TYPE],
        "application/json"
    );
    let refused: Value = refused.json().await.unwrap();
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.starts_with("task `rt_echo`: the envelope is ")
            && error.ends_with(" bytes, over the broker's max_entry_bytes of 1048576"),
        "{error}"
    );
    let sent: Value = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&json!({ "task": "rt_echo", "args": ["after the 413"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    good.push(sent["id"].as_str().unwrap().to_string());

    let at = Instant::now();
    for id in &good {
        let left = Duration::from_secs(30).saturating_sub(at.elapsed());
        let record = node.until_ended(id, left).await;
        assert_eq!(record["state"], "succeeded", "good task {id}: {record}");
    }
    // The 2 MB envelope is dead, never started, with its size and the limit as the reason.
    let huge_reason = format!(
        "entry too large: {} bytes, over the broker's max_entry_bytes of 1048576",
        huge_envelope.len()
    );
    let left = Duration::from_secs(30).saturating_sub(at.elapsed());
    let record = node.until_ended("huge-1", left).await;
    assert_eq!(record["state"], "dead", "{record}");
    assert_eq!(record["error"], huge_reason.as_str(), "{record}");
    let huge_letter = node.get_json("/dlq/chat").await["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["envelope"]["id"] == "huge-1")
        .cloned()
        .expect("huge-1 is a dead letter");
    assert_eq!(huge_letter["reason"], huge_reason.as_str());
    let log = node.log();
    assert!(
        log.lines().any(|line| line.contains("WARN")
            && line.contains("dead-lettered without running")
            && line.contains(&huge_reason)),
        "no warn line with the reason; log:\n{log}"
    );
    // Its events (read straight from Redis): sent by nobody, never started, dead.
    let kinds: Vec<String> = common::stream_events(&mut conn, "rt:events")
        .await
        .into_iter()
        .filter(|(_, id)| id.as_deref() == Some("huge-1"))
        .map(|(kind, _)| kind)
        .collect();
    assert_eq!(kinds, ["dead"], "the events of huge-1");
    // The refused one was never enqueued.
    assert_eq!(node.get("/tasks/huge-2").await.status(), 404);

    // Every bad entry is dead-lettered, in order, with its reason.
    let left = Duration::from_secs(30).saturating_sub(at.elapsed());
    let letters = common::eventually("every bad entry dead-lettered", left, async || {
        let dlq = node.get_json("/dlq/chat").await;
        let letters = dlq["dead_letters"].as_array().cloned().unwrap_or_default();
        let letters: Vec<Value> = letters
            .into_iter()
            .filter(|l| l["envelope"]["id"] != "huge-1")
            .collect();
        if letters.len() >= bad.len() {
            Ok(letters)
        } else {
            Err(dlq)
        }
    })
    .await;
    assert_eq!(letters.len(), bad.len(), "{letters:?}");
    for (letter, (_, reason)) in letters.iter().zip(&bad) {
        let got = letter["reason"].as_str().unwrap();
        assert!(
            got.starts_with(reason),
            "reason `{got}`, wanted `{reason}…`"
        );
        assert!(got.len() < 1024, "the reason is short: {} bytes", got.len());
    }

    // The node is up, whole, and no actor restarted because of any of it.
    let health = node.get("/health").await;
    assert_eq!(health.status(), 200, "{}", node.log());
    let tree = node.get_json("/actors").await;
    assert_eq!(restarts(&tree), 0, "{tree}");
    assert!(!node.log().contains("panicked"), "{}", node.log());

    // A handful of malformed requests through the real binary (raw bytes: no client
    // normalises them): each is a JSON 4xx, and the node stays up.
    let bad_requests: [&[u8]; 7] = [
        b"GET /tasks/%ff%fe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /dlq/%ZZ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{\"ta\"",
        b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\n\xff\xfe\xfd",
        b"DELETE /actors HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /queues?limit=-1&limit=x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /pools/%00/claim HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    ];
    for request in bad_requests {
        let (status, body) = raw_http(&node.url, request).await;
        let shown = String::from_utf8_lossy(request);
        assert!(
            (400..500).contains(&status) || status == 200,
            "{shown} → {status} {body}"
        );
        if status >= 400 {
            let error: Value = serde_json::from_str(&body)
                .unwrap_or_else(|_| panic!("{shown} → {status}, not JSON: {body:?}"));
            assert!(error["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
    }
    assert_eq!(node.get("/health").await.status(), 200);
    assert!(!node.log().contains("panicked"), "{}", node.log());
}

// ---------------------------------------------------------------------------------------------
// Malformed HTTP requests, every route
// ---------------------------------------------------------------------------------------------

const ROUTER_CONFIG: &str = r#"
[queues.chat]
concurrency = 4
[queues.default]
[tasks.process_chat_message]
queue = "chat"
handler = { kind = "native" }
[tasks.notify_chat_failure]
handler = { kind = "native" }
"#;

/// A resource that answers 200 to anything, so egress calls that pass the checks succeed.
#[derive(Debug)]
struct Answer;

impl actors::resource::SharedResource for Answer {
    fn kind(&self) -> &'static str {
        "answer"
    }
    fn forward(
        &self,
        _request: actors::resource::EgressRequest,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = actors::resource::EgressResponse> + Send + '_>,
    > {
        Box::pin(async move {
            actors::resource::EgressResponse::json(StatusCode::OK, &json!({ "ok": true }))
        })
    }
    fn admission(&self) -> actors::gate::Admission {
        actors::gate::Admission::Open
    }
    fn snapshot(&self) -> Value {
        Value::Null
    }
}

async fn router_state() -> AppState {
    let mut resources = Resources::default();
    resources.insert("zep", Arc::new(Answer));
    let mut state = common::router_state(ROUTER_CONFIG, resources).await;
    state.chaos = true;
    state
}

/// Every route of the router, with a path that reaches its handler.
const ROUTES: [&str; 18] = [
    "/",
    "/health",
    "/actors",
    "/tasks",
    "/tasks/some-id",
    "/queues",
    "/dlq/chat",
    "/dlq/chat/requeue",
    "/queues/chat/purge",
    "/egress/zep",
    "/egress/zep/api/v2/x",
    "/pools",
    "/pools/agents/claim",
    "/pools/agents/reset",
    "/events",
    "/metrics",
    "/nodes",
    "/chaos/kill/no/such/actor",
];

/// Paths that are broken in themselves.
const BAD_PATHS: [&str; 27] = [
    "/tasks/%ff%fe",
    "/tasks/%",
    "/tasks/%zz",
    "/tasks/%00",
    "/dlq/%ff",
    "/dlq/%C0%AF/requeue",
    "/queues/%ff/purge",
    "/pools/%ff/claim",
    "/egress/%ff/x",
    "/egress/zep/%ff",
    "/chaos/kill/%ff",
    "/actors?format=%ff",
    "/queues?limit=%ff",
    "/dlq/chat?limit=99999999999999999999999",
    "/dlq/chat?limit=0",
    "/dlq/no-such-queue",
    "/dlq/chat/requeue?limit=-1",
    "/queues/no-such-queue/purge",
    "/actors?format=xml",
    "/actors?nope=1",
    "/events?after=not-an-id",
    "/events?last=-5",
    "/events?last=99999999999999999999999",
    "/events?follow=maybe",
    "/events?types=%ff",
    "/events?nope=1",
    "/tasks/..%2F..%2Fetc%2Fpasswd",
];

fn nested(depth: usize) -> Vec<u8> {
    let mut body = "[".repeat(depth);
    body.push_str(&"]".repeat(depth));
    body.into_bytes()
}

/// Bodies no handler should have to take.
fn bad_bodies() -> Vec<(&'static str, Vec<u8>)> {
    let mut huge = b"[".to_vec();
    while huge.len() < 5 * 1024 * 1024 {
        huge.extend_from_slice(br#"{"task":"process_chat_message","args":[1]},"#);
    }
    huge.pop();
    huge.push(b']');
    vec![
        ("empty", Vec::new()),
        ("not json", b"task=process_chat_message".to_vec()),
        ("truncated", br#"{"task": "process_chat_m"#.to_vec()),
        ("null", b"null".to_vec()),
        ("a number", b"42".to_vec()),
        ("a string", br#""process_chat_message""#.to_vec()),
        (
            "wrong types",
            br#"{"task": 5, "args": {}, "kwargs": [], "eta": true}"#.to_vec(),
        ),
        ("empty batch", b"[]".to_vec()),
        ("batch of junk", br#"[1, "x", null, {"task": []}]"#.to_vec()),
        (
            "unknown fields",
            br#"{"task": "process_chat_message", "evil": 1}"#.to_vec(),
        ),
        ("invalid utf-8", b"{\"task\": \"\xff\xfe\"}".to_vec()),
        ("deeply nested", nested(100_000)),
        ("nested in a field", {
            let mut b = br#"{"task": "process_chat_message", "args": "#.to_vec();
            b.extend(nested(10_000));
            b.push(b'}');
            b
        }),
        ("huge", huge),
    ]
}

const CONTENT_TYPES: [Option<&str>; 5] = [
    Some("application/json"),
    None,
    Some("text/plain"),
    Some("application/x-www-form-urlencoded"),
    Some("multipart/form-data; boundary=--nope"),
];

const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// Sends one request; the body of `/events` (a stream that never ends) is not read.
async fn call(
    state: &AppState,
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Option<(StatusCode, String, Option<String>)> {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let request = request.body(Body::from(body)).ok()?;
    let response =
        tokio::time::timeout(Duration::from_secs(10), app(state.clone()).oneshot(request))
            .await
            .unwrap_or_else(|_| panic!("{method} {uri} hung"))
            .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if content_type.as_deref() == Some("text/event-stream") {
        return Some((status, String::new(), content_type));
    }
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .unwrap_or_else(|_| panic!("{method} {uri}: body hung"))
        .unwrap()
        .to_bytes();
    Some((
        status,
        String::from_utf8_lossy(&body).into_owned(),
        content_type,
    ))
}

/// A 4xx must say what is wrong, as JSON `{"error": "..."}`; 5xx is never acceptable here
/// (the memory broker cannot be unavailable and `/health` is ok).
fn judge(what: &str, answer: (StatusCode, String, Option<String>)) {
    let (status, body, content_type) = answer;
    assert!(!status.is_server_error(), "{what} → {status} {body}");
    if status.is_client_error() {
        assert_eq!(
            content_type.as_deref(),
            Some("application/json"),
            "{what} → {status} {body:?}"
        );
        let error: Value = serde_json::from_str(&body)
            .unwrap_or_else(|_| panic!("{what} → {status}, not JSON: {body:?}"));
        assert!(
            error["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what} → {status} {body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_bad_requests_with_a_json_error_never_a_5xx() {
    let state = router_state().await;
    let bodies = bad_bodies();
    let mut checked = 0;
    for route in ROUTES {
        for method in METHODS {
            for (n, (name, body)) in bodies.iter().enumerate() {
                // Every body once with JSON, and each content type over the bodies in turn.
                for content_type in [CONTENT_TYPES[0], CONTENT_TYPES[n % CONTENT_TYPES.len()]] {
                    let what = format!("{method} {route} [{name}, {content_type:?}]");
                    if let Some(answer) =
                        call(&state, method, route, content_type, body.clone()).await
                    {
                        judge(&what, answer);
                        checked += 1;
                    }
                }
            }
        }
    }
    for path in BAD_PATHS {
        for method in METHODS {
            for (name, body) in bodies.iter().take(4) {
                let what = format!("{method} {path} [{name}]");
                if let Some(answer) =
                    call(&state, method, path, Some("application/json"), body.clone()).await
                {
                    judge(&what, answer);
                    checked += 1;
                }
            }
        }
    }
    eprintln!("{checked} malformed requests answered without a 5xx");
    // The router's own refusals, as the README states them.
    let huge = bodies.last().unwrap().1.clone();
    let (status, body, _) = call(&state, "POST", "/tasks", Some("application/json"), huge)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let request = Request::builder()
        .method("DELETE")
        .uri("/actors")
        .body(Body::empty())
        .unwrap();
    let response = app(state.clone()).oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert!(response.headers().contains_key(header::ALLOW));
    let (status, body, _) = call(&state, "GET", "/tasks/%ff", None, Vec::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("UTF-8"), "{body}");
    // Nothing got in: the queues are as empty as they started.
    let (_, body, _) = call(&state, "GET", "/queues", None, Vec::new())
        .await
        .unwrap();
    let queues: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(queues["queues"]["chat"]["ready"], 0, "{queues}");
    let (status, _, _) = call(&state, "GET", "/health", None, Vec::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
}

// ---------------------------------------------------------------------------------------------
// Mutated configs
// ---------------------------------------------------------------------------------------------

/// Every key path of `table` (tables and leaves), as segments.
fn key_paths(table: &toml::Table, prefix: &[String], out: &mut Vec<Vec<String>>) {
    for (key, value) in table {
        let mut path = prefix.to_vec();
        path.push(key.clone());
        out.push(path.clone());
        if let toml::Value::Table(inner) = value {
            key_paths(inner, &path, out);
        }
    }
}

fn parent_mut<'a>(table: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let mut at = table;
    for key in &path[..path.len() - 1] {
        at = at.get_mut(key)?.as_table_mut()?;
    }
    Some(at)
}

/// One mutation of `doc`, described.
fn mutate(doc: &mut toml::Table, rng: &mut StdRng) -> String {
    let mut paths = Vec::new();
    key_paths(doc, &[], &mut paths);
    let path = paths[rng.random_range(0..paths.len())].clone();
    let shown = path.join(".");
    let parent = parent_mut(doc, &path).expect("path exists");
    let key = path.last().unwrap().clone();
    let replacement: toml::Value = match rng.random_range(0..14) {
        0 => {
            parent.remove(&key);
            return format!("drop {shown}");
        }
        1 => {
            parent.insert("no_such_key".into(), toml::Value::Integer(1));
            return format!("unknown key beside {shown}");
        }
        2 => toml::Value::String("not the right type".into()),
        3 => toml::Value::Integer(-1),
        4 => toml::Value::Integer(0),
        5 => toml::Value::Integer(i64::MAX),
        6 => toml::Value::Float(f64::NAN),
        7 => toml::Value::Boolean(true),
        8 => toml::Value::Array(vec![
            toml::Value::Integer(1),
            toml::Value::String("x".into()),
        ]),
        9 => toml::Value::Table(toml::Table::new()),
        10 => toml::Value::String(
            [
                "-5s",
                "10 parsecs",
                "0s",
                "",
                "1e999s",
                "99999999999999999999d",
                "5",
            ][rng.random_range(0..7)]
            .into(),
        ),
        11 => toml::Value::String(
            ["([", "*", "(?P<x", "\\", "a{99999999}"][rng.random_range(0..5)].into(),
        ),
        12 => toml::Value::String(
            ["", " ", "a b", "../x", "\u{0}", "héllo", "{chat}"][rng.random_range(0..7)].into(),
        ),
        _ => toml::Value::String("127.0.0.1:99999".into()),
    };
    let described = format!("{shown} = {replacement}");
    parent.insert(key, replacement);
    described
}

/// Renames a random table entry to the name of a sibling's (a duplicate name in the text).
fn duplicate_name(text: &str, rng: &mut StdRng) -> Option<String> {
    let headers: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with('[') && !l.starts_with("[["))
        .collect();
    if headers.len() < 2 {
        return None;
    }
    let a = headers[rng.random_range(0..headers.len())];
    let b = headers[rng.random_range(0..headers.len())];
    Some(text.replacen(a, b, 1))
}

#[test]
fn mutated_configs_compile_or_name_a_key_path_and_never_panic() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/config/actors.toml")];
    for entry in std::fs::read_dir(format!("{root}/config/examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            files.push(path.display().to_string());
        }
    }
    files.sort();
    let mut rng = StdRng::seed_from_u64(0x0bad_1297);
    // Every secret variable set; the broker URL and the listen address left to the config.
    let lookup = |name: &str| {
        (name != "RT_BROKER_URL" && name != "RT_HTTP_BIND").then(|| format!("value-of-{name}"))
    };
    let (mut compiled, mut refused, mut total) = (0, 0, 0);
    for file in &files {
        let original = std::fs::read_to_string(file).unwrap();
        let doc: toml::Table = toml::from_str(&original).unwrap();
        // Unmutated, written back out as the mutations are, it compiles.
        let back = toml::to_string(&doc).unwrap();
        if let Err(err) = compile_str(&back, Environment::Lookup(&lookup)) {
            panic!("{file} does not compile unmutated: {err}");
        }
        for n in 0..80 {
            let (what, text) = if n % 10 == 9 {
                match duplicate_name(&original, &mut rng) {
                    Some(text) => ("duplicate table name".to_string(), text),
                    None => continue,
                }
            } else {
                let mut mutated = doc.clone();
                let mut what = mutate(&mut mutated, &mut rng);
                if n % 3 == 0 {
                    what = format!("{what}; {}", mutate(&mut mutated, &mut rng));
                }
                (what, toml::to_string(&mutated).unwrap())
            };
            let env = if n % 2 == 0 {
                Environment::Ignored
            } else {
                Environment::Lookup(&lookup)
            };
            let outcome = catch_unwind(AssertUnwindSafe(|| compile_str(&text, env)));
            let outcome = outcome
                .unwrap_or_else(|_| panic!("{file}: `{what}` made the compiler panic:\n{text}"));
            total += 1;
            match outcome {
                Ok(_) => compiled += 1,
                Err(err) => {
                    refused += 1;
                    assert!(!err.diagnostics.errors.is_empty(), "{file}: `{what}`");
                    for error in &err.diagnostics.errors {
                        let path = error.path.trim();
                        assert!(
                            !path.is_empty() && !error.message.trim().is_empty(),
                            "{file}: `{what}` → an error without a key path: {error}"
                        );
                        assert!(
                            path.starts_with("line ")
                                || path
                                    .split(['.', '['])
                                    .next()
                                    .is_some_and(|top| !top.is_empty() && doc.contains_key(top)
                                        || [
                                            "runtime",
                                            "broker",
                                            "http",
                                            "supervision",
                                            "queues",
                                            "tasks",
                                            "resources",
                                            "pools",
                                            "schedules",
                                            "beat",
                                            "celery",
                                            "chaos",
                                            "metrics",
                                            "no_such_key"
                                        ]
                                        .contains(&top)),
                            "{file}: `{what}` → an error whose path is not a key path: {error}"
                        );
                    }
                }
            }
        }
    }
    eprintln!("{total} mutated configs: {compiled} compiled, {refused} refused with key paths");
    assert!(total >= 300, "{total}");
    assert!(
        refused > total / 2,
        "most mutations are errors: {refused}/{total}"
    );
}
