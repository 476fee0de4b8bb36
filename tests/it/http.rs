//! The router as a function (`tower::ServiceExt::oneshot`) over a real supervision tree:
//! health reasons, bearer-token checks on mutating routes, JSON errors, the live page at `/`.

use std::sync::Arc;
use std::time::Duration;

use actors::broker::{AnyBroker, BrokerSettings, Records, TaskQueue};
use actors::resource::Resources;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use runtime::http::events::EventStreams;
use runtime::http::{AppState, app};
use tower::ServiceExt;

use crate::common;

const CONFIG: &str = r#"
[queues.chat]
concurrency = 4
[queues.default]
[tasks.process_chat_message]
queue = "chat"
handler = { kind = "native" }
[tasks.notify_chat_failure]
handler = { kind = "native" }
"#;

/// The state of a node with `CONFIG`, a memory broker and the given token/chaos.
async fn state(backoff: Duration, admin_token: Option<&str>, chaos: bool) -> AppState {
    let broker = common::memory_broker(BrokerSettings::default()).await;
    let mut state = common::app_state(CONFIG, broker, Resources::default(), backoff).await;
    state.admin_token = admin_token.map(Arc::from);
    state.chaos = chaos;
    state
}

async fn send(
    state: &AppState,
    method: &str,
    uri: &str,
    token: Option<&str>,
) -> (StatusCode, String) {
    send_body(state, method, uri, token, "").await
}

async fn send_body(
    state: &AppState,
    method: &str,
    uri: &str,
    token: Option<&str>,
    body: &str,
) -> (StatusCode, String) {
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let response = app(state.clone())
        .oneshot(request.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn health_is_503_with_the_reason_while_a_permanent_actor_is_down() {
    let state = state(Duration::from_secs(30), None, true).await;
    assert_eq!(send(&state, "GET", "/health", None).await.0, StatusCode::OK);
    let (status, _) = send(&state, "POST", "/chaos/kill/root/heartbeat", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, body) = send(&state, "GET", "/health", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["status"], "unhealthy");
    assert_eq!(
        body["problems"][0],
        "root/heartbeat is restarting: stopped: killed"
    );
}

#[tokio::test]
async fn a_chaos_kill_below_an_actor_that_is_not_a_consumer_is_not_a_task_kill() {
    // Only a consumer's path followed by a task id names a running task; below any other
    // actor (or nothing) it is an unknown actor.
    let state = state(Duration::from_millis(5), None, true).await;
    for (path, missing) in [
        (
            "/chaos/kill/root/heartbeat/some-task",
            "root/heartbeat/some-task",
        ),
        (
            "/chaos/kill/queues/chat/some-task",
            "root/queues/chat/some-task",
        ),
    ] {
        let (status, body) = send(&state, "POST", path, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert_eq!(
            json(&body)["error"],
            format!("no running actor at {missing}")
        );
    }
    let heartbeat = state.tree.get("root/heartbeat").unwrap();
    assert_eq!(heartbeat.restarts, 0, "nothing was killed");
}

#[tokio::test]
async fn mutating_routes_need_the_bearer_token_when_one_is_configured() {
    let state = state(Duration::from_millis(5), Some("s3cret-token"), true).await;
    let (status, body) = send(&state, "POST", "/chaos/kill/heartbeat", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body, r#"{"error":"missing or wrong bearer token"}"#);
    let (status, _) = send(
        &state,
        "POST",
        "/chaos/kill/heartbeat",
        Some("s3cret-tokeN"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = send(
        &state,
        "POST",
        "/chaos/kill/heartbeat",
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body, r#"{"killed":"root/heartbeat"}"#);
    // Reading needs no token.
    assert_eq!(send(&state, "GET", "/actors", None).await.0, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_json_errors() {
    let state = state(Duration::from_millis(5), None, false).await;
    let (status, body) = send(&state, "GET", "/nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, r#"{"error":"no such route"}"#);
    let (status, _) = send(&state, "POST", "/chaos/kill/heartbeat", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = send(&state, "DELETE", "/actors", None).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn tasks_are_enqueued_singly_or_in_batches_and_routed_by_the_config() {
    let state = state(Duration::from_millis(5), None, false).await;
    let (status, body) = send_body(
        &state,
        "POST",
        "/tasks",
        None,
        r#"{"task":"process_chat_message","args":["hello"],"kwargs":{"thread":"t-1"}}"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let single = json(&body);
    assert_eq!(single["duplicate"], false);
    assert_eq!(single["id"].as_str().unwrap().len(), 36);

    let (status, body) = send_body(
        &state,
        "POST",
        "/tasks",
        None,
        r#"[{"task":"notify_chat_failure"},
            {"task":"process_chat_message","countdown":60},
            {"task":"notify_chat_failure","idempotency_key":"k1"},
            {"task":"notify_chat_failure","idempotency_key":"k1"}]"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let batch = json(&body);
    assert_eq!(batch.as_array().unwrap().len(), 4);
    assert_eq!(batch[3]["duplicate"], true);
    assert_eq!(batch[3]["id"], batch[2]["id"]);

    let (status, body) = send(&state, "GET", "/queues", None).await;
    assert_eq!(status, StatusCode::OK);
    let queues = json(&body)["queues"].clone();
    assert_eq!(queues["chat"]["ready"], 1);
    assert_eq!(queues["chat"]["delayed"], 1);
    assert_eq!(queues["chat"]["concurrency"], 4);
    assert_eq!(queues["default"]["ready"], 2);

    let (status, body) = send(
        &state,
        "GET",
        &format!("/tasks/{}", single["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "a record from its enqueue: {body}");
    let record = json(&body);
    assert_eq!(
        (record["state"].as_str(), record["attempts"].as_u64()),
        (Some("queued"), Some(0)),
        "{body}"
    );
    let (status, body) = send(&state, "GET", "/tasks/no-such-task", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("no task no-such-task: unknown"), "{body}");
}

#[tokio::test]
async fn envelopes_over_max_entry_bytes_and_bodies_over_the_limit_are_json_413s() {
    let mut state = state(Duration::from_millis(5), None, false).await;
    let settings = BrokerSettings {
        max_entry_bytes: 1024,
        ..BrokerSettings::default()
    };
    state.broker = Arc::new(common::memory_broker(settings).await);
    let big = "x".repeat(1024);
    let expect_413 = |status: StatusCode, body: &str, prefix: &str| {
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        let error = json(body)["error"].as_str().unwrap().to_string();
        assert!(error.starts_with(prefix), "{error}");
        error
    };

    // One task: its size and the limit.
    let (status, body) = send_body(
        &state,
        "POST",
        "/tasks",
        None,
        &serde_json::json!({ "task": "process_chat_message", "args": [big] }).to_string(),
    )
    .await;
    let error = expect_413(
        status,
        &body,
        "task `process_chat_message`: the envelope is ",
    );
    let size: usize = error
        .trim_start_matches("task `process_chat_message`: the envelope is ")
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(size > big.len(), "the whole envelope is counted: {error}");
    assert!(
        error.ends_with(" bytes, over the broker's max_entry_bytes of 1024"),
        "{error}"
    );

    // In a batch, its place; nothing of the batch is enqueued.
    let (status, body) = send_body(
        &state,
        "POST",
        "/tasks",
        None,
        &serde_json::json!([
            { "task": "notify_chat_failure" },
            { "task": "notify_chat_failure", "kwargs": { "text": big } },
        ])
        .to_string(),
    )
    .await;
    expect_413(
        status,
        &body,
        "[1]: task `notify_chat_failure`: the envelope is ",
    );
    let (_, body) = send(&state, "GET", "/queues", None).await;
    assert_eq!(json(&body)["queues"]["default"]["ready"], 0, "{body}");

    // A body over the request limit (2 MiB here: 4 × 1024 is less) is not read to its end.
    let huge = serde_json::json!({ "task": "notify_chat_failure", "args": ["y".repeat(2 << 20)] })
        .to_string();
    let request = Request::builder()
        .method("POST")
        .uri("/tasks")
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, huge.len())
        .body(Body::from(huge.clone()))
        .unwrap();
    let response = app(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let error = expect_413(status, std::str::from_utf8(&body).unwrap(), "body (");
    assert_eq!(
        error,
        format!(
            "body ({} bytes): over the limit of 2097152 bytes for one request (4 × the \
             broker's max_entry_bytes of 1024, at least 2097152)",
            huge.len()
        )
    );

    // A task under the cap still goes in.
    let (status, body) = send_body(
        &state,
        "POST",
        "/tasks",
        None,
        r#"{"task":"notify_chat_failure","args":["small"]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
}

#[tokio::test]
async fn bad_task_requests_are_400_naming_the_field_and_enqueue_nothing() {
    let state = state(Duration::from_millis(5), None, false).await;
    let cases = [
        (
            "not json",
            "body: not JSON: expected ident at line 1 column 2",
        ),
        ("42", "body: expected a task object or an array of them"),
        ("[]", "body: expected 1 to 10000 tasks, got 0"),
        (r#"{"args":[]}"#, "body: missing field `task`"),
        (
            r#"{"task":"nope"}"#,
            "task: no such task `nope` (defined: process_chat_message, notify_chat_failure)",
        ),
        (
            r#"[{"task":"notify_chat_failure"},{"task":"process_chat_message","args":"x"}]"#,
            "[1].args: invalid type: string \"x\", expected a sequence",
        ),
        (
            r#"{"task":"notify_chat_failure","queue":"gpu"}"#,
            "queue: no such queue `gpu`",
        ),
        (
            r#"{"task":"notify_chat_failure","eta":"soon"}"#,
            "eta: `soon` is not an RFC 3339 time",
        ),
        (
            r#"{"task":"notify_chat_failure","countdown":-1}"#,
            "countdown: must be ≥ 0 seconds, got -1",
        ),
        (
            r#"{"task":"notify_chat_failure","countdown":1,"eta":"2026-01-01T00:00:00Z"}"#,
            "countdown: give eta or countdown, not both",
        ),
        (
            r#"{"task":"notify_chat_failure","link":[{"task":"x"}]}"#,
            "link[0].task: no such task `x`",
        ),
        (
            r#"{"task":"notify_chat_failure","colour":"red"}"#,
            "colour: unknown field `colour`, expected one of `task`",
        ),
    ];
    for (body, expected) in cases {
        let (status, answer) = send_body(&state, "POST", "/tasks", None, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        let error = json(&answer)["error"].as_str().unwrap().to_string();
        assert!(
            error.starts_with(expected),
            "{body}:\n  got      {error}\n  expected {expected}"
        );
    }
    let (_, body) = send(&state, "GET", "/queues", None).await;
    let queues = json(&body)["queues"].clone();
    assert_eq!(queues["default"]["ready"], 0);
    assert_eq!(queues["chat"]["ready"], 0);
}

/// `id` as one percent-encoded URL path segment (everything but unreserved characters).
fn segment(id: &str) -> String {
    id.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// A chosen id (the seed's deterministic `telegram:process:<hash>`) is accepted once: posting
/// it again answers `duplicate: true` with the same id and enqueues nothing. Bad ids are 400s
/// naming `[n].id`; ids with `/`, `%`, spaces or Unicode are read back percent-encoded.
#[tokio::test]
async fn chosen_ids_are_checked_unique_and_read_back_percent_encoded() {
    let state = state(Duration::from_millis(5), None, false).await;
    let post = |body: String| {
        let state = state.clone();
        async move { send_body(&state, "POST", "/tasks", None, &body).await }
    };
    let task = |id: &str| serde_json::json!({ "task": "notify_chat_failure", "id": id });
    let id = "telegram:process:a1b2c3d4";
    let (status, body) = post(task(id).to_string()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({ "id": id, "duplicate": false })
    );
    let (status, body) = post(task(id).to_string()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        json(&body),
        serde_json::json!({ "id": id, "duplicate": true })
    );
    let (_, body) = post(serde_json::json!([task("other-1"), task(id)]).to_string()).await;
    assert_eq!(
        json(&body),
        serde_json::json!([{ "id": "other-1", "duplicate": false }, { "id": id, "duplicate": true }])
    );

    let long = "x".repeat(300);
    let refused = [
        (
            task("a\u{0}b"),
            "id: holds a control character (U+0000 at byte 1)",
        ),
        (
            task("tab\there"),
            "id: holds a control character (U+0009 at byte 3)",
        ),
        (task(&long), "id: is 300 bytes, over the limit of 256"),
        (
            task(""),
            "id: must not be empty (leave `id` out to get a generated one)",
        ),
        (
            task(".."),
            "id: `..` cannot be read back at GET /tasks/{id}",
        ),
        (
            serde_json::json!([task("fine-1"), task("fine-2"), task("bell\u{7}")]),
            "[2].id: holds a control character (U+0007 at byte 4)",
        ),
    ];
    for (body, expected) in refused {
        let (status, answer) = post(body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {answer}");
        let error = json(&answer)["error"].as_str().unwrap().to_string();
        assert!(error.starts_with(expected), "{body}: {error}");
    }
    let (_, body) = send(&state, "GET", "/queues", None).await;
    assert_eq!(json(&body)["queues"]["default"]["ready"], 2, "{body}");

    let odd = [
        "a/b",
        "100%",
        "with spaces",
        "привіт ✓",
        "?q=1#frag",
        "a%2Fb",
    ];
    let batch: Vec<_> = odd.iter().map(|id| task(id)).collect();
    let (status, body) = post(serde_json::Value::Array(batch).to_string()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let got = state
        .broker
        .reserve("default", "c", 100, Duration::ZERO)
        .await
        .unwrap();
    for delivery in &got {
        let result = serde_json::json!({ "for": delivery.envelope.id });
        state.broker.ack(delivery, result).await.unwrap();
    }
    for id in odd {
        let (status, body) = send(&state, "GET", &format!("/tasks/{}", segment(id)), None).await;
        assert_eq!(status, StatusCode::OK, "{id}: {body}");
        let record = json(&body);
        assert_eq!(
            (record["id"].as_str(), &record["result"]["for"]),
            (Some(id), &serde_json::json!(id))
        );
    }
}

/// `GET /queues` with one queue's stream key holding a string (Redis answers WRONGTYPE for
/// it): the other queues are answered, the bad one carries its error; `/metrics` keeps the
/// good queue's depths. With no queue readable it is a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_queue_does_not_hide_the_others() {
    let redis = actors::test_util::RedisServer::start();
    let broker = AnyBroker::connect(&redis.url(), BrokerSettings::default())
        .await
        .unwrap();
    let mut state =
        common::app_state(CONFIG, broker, Resources::default(), Duration::from_secs(1)).await;
    state.metrics = Arc::new(actors::metrics::Metrics::new(
        [("process_chat_message", "chat")],
        ["chat", "default"],
    ));
    let (status, body) = send_body(
        &state,
        "POST",
        "/tasks",
        None,
        r#"{"task":"process_chat_message"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("rt:{default}:stream")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();

    let (status, body) = send(&state, "GET", "/queues", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let queues = json(&body)["queues"].clone();
    assert_eq!(queues["chat"]["ready"], 1, "{body}");
    let error = queues["default"]["error"].as_str().unwrap();
    assert!(error.contains("WRONGTYPE"), "{body}");
    assert_eq!(queues["default"]["concurrency"], 1, "{body}");
    let (status, metrics) = send(&state, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        metrics.contains(r#"rt_queue_depth{queue="chat",state="ready"} 1"#),
        "{metrics}"
    );
    assert!(!metrics.contains(r#"queue="default",state="#), "{metrics}");
    assert!(metrics.contains("rt_broker_connected 1"), "{metrics}");

    let _: () = redis::cmd("SET")
        .arg("rt:{chat}:stream")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, body) = send(&state, "GET", "/queues", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        json(&body)["error"].as_str().unwrap().contains("WRONGTYPE"),
        "{body}"
    );
}

#[tokio::test]
async fn dead_letters_are_listed_requeued_and_queues_purged() {
    let state = state(Duration::from_millis(5), Some("tok"), false).await;
    let (_, body) = send_body(
        &state,
        "POST",
        "/tasks",
        Some("tok"),
        r#"[{"task":"notify_chat_failure"},{"task":"notify_chat_failure"}]"#,
    )
    .await;
    let ids = json(&body);
    let got = state
        .broker
        .reserve("default", "node", 1, Duration::ZERO)
        .await
        .unwrap();
    state
        .broker
        .dead_letter(&got[0], "permanent: 400 from the app")
        .await
        .unwrap();

    let (status, body) = send(&state, "GET", "/dlq/default?limit=10", None).await;
    assert_eq!(status, StatusCode::OK);
    let letters = json(&body)["dead_letters"].clone();
    assert_eq!(letters[0]["reason"], "permanent: 400 from the app");
    assert_eq!(letters[0]["envelope"]["id"], ids[0]["id"]);
    let (status, body) = send(
        &state,
        "GET",
        &format!("/tasks/{}", ids[0]["id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["state"], "dead");

    assert_eq!(
        send(&state, "GET", "/dlq/nope", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&state, "GET", "/dlq/default?limit=0", None).await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        send(&state, "POST", "/dlq/default/requeue", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = send(&state, "POST", "/dlq/default/requeue", Some("tok")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(json(&body)["requeued"], 1);

    let (status, body) = send(&state, "POST", "/queues/default/purge", Some("tok")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["purged"]["ready"], 2);
    let (_, body) = send(&state, "GET", "/queues", None).await;
    assert_eq!(json(&body)["queues"]["default"]["ready"], 0);
}

/// A resource that answers with what it was asked, to see what the proxy forwards.
#[derive(Debug)]
struct Echo;

impl actors::resource::SharedResource for Echo {
    fn kind(&self) -> &'static str {
        "echo"
    }
    fn forward(
        &self,
        request: actors::resource::EgressRequest,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = actors::resource::EgressResponse> + Send + '_>,
    > {
        Box::pin(async move {
            let headers: serde_json::Map<String, serde_json::Value> = request
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
                .collect();
            let mut answer = actors::resource::EgressResponse::json(
                StatusCode::OK,
                &serde_json::json!({
                    "method": request.method.as_str(),
                    "path": request.path_and_query,
                    "headers": headers,
                    "body": String::from_utf8_lossy(&request.body),
                }),
            );
            answer
                .headers
                .insert("set-cookie", "sid=1".parse().unwrap());
            answer
                .headers
                .insert("x-ratelimit-remaining-requests", "59".parse().unwrap());
            answer
        })
    }
    fn admission(&self) -> actors::gate::Admission {
        actors::gate::Admission::Open
    }
    fn snapshot(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

async fn egress_state(admin_token: Option<&str>) -> AppState {
    let mut state = state(Duration::from_millis(5), admin_token, false).await;
    let mut resources = Resources::default();
    resources.insert("zep", Arc::new(Echo));
    state.resources = Arc::new(resources);
    state
}

async fn raw(state: &AppState, request: Request<Body>) -> (StatusCode, HeaderMapOut, String) {
    let response = app(state.clone()).oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

type HeaderMapOut = axum::http::HeaderMap;

#[tokio::test]
async fn egress_forwards_to_the_resource_without_the_callers_credentials() {
    let state = egress_state(None).await;
    let request = Request::builder()
        .method("POST")
        .uri("/egress/zep/api/v2/threads/t-42/messages?limit=5")
        .header("authorization", "Bearer stolen-from-the-caller")
        .header("cookie", "session=abc")
        .header("connection", "x-secret-hop")
        .header("x-secret-hop", "1")
        .header("keep-alive", "timeout=5")
        .header("content-type", "application/json")
        .header("x-request-id", "r-1")
        .body(Body::from(
            r#"{"messages":[{"role":"user","content":"hi"}]}"#,
        ))
        .unwrap();
    let (status, headers, body) = raw(&state, request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = json(&body);
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/api/v2/threads/t-42/messages?limit=5");
    assert_eq!(
        seen["body"],
        r#"{"messages":[{"role":"user","content":"hi"}]}"#
    );
    let forwarded = seen["headers"].as_object().unwrap();
    for gone in [
        "authorization",
        "cookie",
        "connection",
        "x-secret-hop",
        "keep-alive",
        "host",
    ] {
        assert!(
            !forwarded.contains_key(gone),
            "{gone} was forwarded: {forwarded:?}"
        );
    }
    assert_eq!(forwarded["x-request-id"], "r-1");
    assert_eq!(forwarded["content-type"], "application/json");
    assert!(
        headers.get("set-cookie").is_none(),
        "upstream cookies are not passed back"
    );
    assert_eq!(headers["x-ratelimit-remaining-requests"], "59");
}

#[tokio::test]
async fn egress_is_not_an_open_proxy() {
    let state = egress_state(None).await;
    for uri in [
        "/egress/zep/api/../admin",
        "/egress/zep/..",
        "/egress/zep/./x",
        "/egress/zep//evil.example/x",
        "/egress/zep/http://evil.example/",
        "/egress/zep/a%2Fb",
        "/egress/zep/a%2fb",
        "/egress/zep/%2e%2e/x",
        "/egress/zep/a%5Cb",
        "/egress/zep/a\\b",
    ] {
        let Ok(request) = Request::builder().uri(uri).body(Body::empty()) else {
            continue; // not even a valid request target
        };
        let (status, _, body) = raw(&state, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri} → {body}");
        assert!(
            json(&body)["error"].as_str().unwrap().starts_with("path: "),
            "{uri} → {body}"
        );
    }
    let (status, _, body) = raw(
        &state,
        Request::builder()
            .uri("/egress/openai/v1/models")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(json(&body)["error"], "no such resource `openai`");
    let big = vec![b'x'; 4 * 1024 * 1024 + 1];
    let request = Request::builder()
        .method("POST")
        .uri("/egress/zep/api")
        .body(Body::from(big))
        .unwrap();
    let (status, _, _) = raw(&state, request).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn egress_needs_the_runtime_token_when_one_is_configured() {
    let state = egress_state(Some("tok")).await;
    let plain = Request::builder()
        .uri("/egress/zep/api")
        .body(Body::empty())
        .unwrap();
    assert_eq!(raw(&state, plain).await.0, StatusCode::UNAUTHORIZED);
    let bearer = Request::builder()
        .uri("/egress/zep/api")
        .header("authorization", "Bearer tok")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        raw(&state, bearer).await.0,
        StatusCode::UNAUTHORIZED,
        "Authorization belongs to the upstream"
    );
    let good = Request::builder()
        .uri("/egress/zep/api")
        .header("x-runtime-token", "tok")
        .body(Body::empty())
        .unwrap();
    let (status, _, body) = raw(&state, good).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        !json(&body)["headers"]
            .as_object()
            .unwrap()
            .contains_key("x-runtime-token")
    );
}

#[tokio::test]
async fn event_streams_are_bounded_and_a_closed_one_frees_its_slot() {
    let mut state = state(Duration::from_millis(5), None, false).await;
    state.event_streams = Arc::new(EventStreams::new(1));
    let open = |state: &AppState| {
        let request = Request::builder()
            .uri("/events")
            .body(Body::empty())
            .unwrap();
        app(state.clone()).oneshot(request)
    };
    let first = open(&state).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(state.event_streams.open(), 1);

    let refused = open(&state).await.unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()[header::RETRY_AFTER], "5");
    let body = refused.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("too many event streams: 1 are open"),
        "{body}"
    );

    // The client goes away: its body is dropped and the slot is free again.
    drop(first);
    assert_eq!(state.event_streams.open(), 0);
    let again = open(&state).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_live_page_is_served_at_the_root_without_a_token_and_loads_nothing_from_elsewhere() {
    let state = state(Duration::from_millis(5), Some("s3cret-token"), false).await;
    let mut files = Vec::new();
    for (uri, content_type) in [
        ("/", "text/html; charset=utf-8"),
        ("/page.css", "text/css; charset=utf-8"),
        ("/page.js", "text/javascript; charset=utf-8"),
    ] {
        let response = app(state.clone())
            .oneshot(Request::builder().uri(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{uri}");
        let headers = response.headers().clone();
        assert_eq!(headers[header::CONTENT_TYPE], content_type, "{uri}");
        assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        let policy = headers[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
        for rule in [
            "default-src 'none'",
            "script-src 'self';",
            "style-src 'self';",
            "connect-src 'self'",
            "form-action 'none'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
        ] {
            assert!(policy.contains(rule), "{rule} missing from {policy}");
        }
        assert!(
            !policy.contains("unsafe-inline"),
            "no inline script or style is allowed: {policy}"
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        files.push((uri, String::from_utf8(body.to_vec()).unwrap()));
    }
    let page = &files[0].1;
    assert!(page.starts_with("<!doctype html>"));
    assert!(page.contains(r#"role="tree""#) && page.contains(r#"role="log""#));
    assert!(
        page.contains(r#"<script src="/page.js" defer></script>"#)
            && page.contains(r#"<link rel="stylesheet" href="/page.css">"#)
    );
    assert!(
        !page.contains("<style") && !page.contains(" style=") && !page.contains("<script>"),
        "nothing inline: the policy would refuse it"
    );
    // Rendering is text-only, and nothing comes from another origin (no CDN, no fonts). The
    // one URL written is the SVG namespace of the charts' elements (a name, never loaded).
    for (uri, text) in &files {
        let text = text.replace("\"http://www.w3.org/2000/svg\"", "SVG_NAMESPACE");
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "http://",
            "https://",
            "@import",
            "url(",
        ] {
            assert!(!text.contains(banned), "{uri} uses {banned}");
        }
    }
}

/// `GET /tasks/{id}` answers every state of a task's life (`queued`, `scheduled` with its eta,
/// `running`, `retrying`, `succeeded`, `dead`) and 404 only for an unknown id;
/// `POST /tasks/{id}/revoke` (token; body optional `{"terminate": true}`) answers what the task
/// was: 202 for a queued, scheduled or running one and an unknown id (kept), 200 when revoked
/// already, 409 once it ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_states_and_revocations_over_http() {
    let state = state(Duration::from_secs(30), Some("t0k3n"), false).await;
    let token = Some("t0k3n");
    let enqueue = |body: serde_json::Value| {
        let state = state.clone();
        async move {
            let (status, answer) =
                send_body(&state, "POST", "/tasks", token, &body.to_string()).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
            json(&answer)["id"].as_str().unwrap().to_string()
        }
    };
    let record = |id: String| {
        let state = state.clone();
        async move {
            let (status, body) = send(&state, "GET", &format!("/tasks/{id}"), None).await;
            assert_eq!(status, StatusCode::OK, "{id}: {body}");
            json(&body)
        }
    };
    let queued = enqueue(serde_json::json!({ "task": "process_chat_message" })).await;
    let later =
        enqueue(serde_json::json!({ "task": "process_chat_message", "countdown": 3600 })).await;
    let running = enqueue(serde_json::json!({ "task": "notify_chat_failure", "id": "r-1" })).await;
    let failing = enqueue(serde_json::json!({ "task": "notify_chat_failure", "id": "f-1" })).await;
    let done = enqueue(serde_json::json!({ "task": "notify_chat_failure", "id": "d-1" })).await;
    assert_eq!(record(queued.clone()).await["state"], "queued");
    let scheduled = record(later.clone()).await;
    assert_eq!(scheduled["state"], "scheduled");
    assert!(scheduled["eta"].as_str().is_some(), "{scheduled}");
    let got = state
        .broker
        .reserve("default", "node-1", 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    let of = |id: &str| got.iter().find(|d| d.envelope.id == id).unwrap();
    state.broker.started(of(&running), "node-1");
    let retry_at = std::time::SystemTime::now() + Duration::from_secs(60);
    state
        .broker
        .retry(of(&failing), retry_at, "boom")
        .await
        .unwrap();
    state
        .broker
        .ack(of(&done), serde_json::json!({ "ok": true }))
        .await
        .unwrap();
    let r = record(running.clone()).await;
    assert_eq!(
        (&r["state"], &r["attempts"], &r["attempt"], &r["node"]),
        (
            &serde_json::json!("running"),
            &serde_json::json!(1),
            &serde_json::json!(0),
            &serde_json::json!("node-1")
        ),
        "{r}"
    );
    let r = record(failing.clone()).await;
    assert_eq!(
        (&r["state"], &r["error"]),
        (&serde_json::json!("retrying"), &serde_json::json!("boom"))
    );
    assert!(r["eta"].as_str().is_some(), "{r}");
    let r = record(done.clone()).await;
    assert_eq!(
        (&r["state"], &r["result"]),
        (
            &serde_json::json!("succeeded"),
            &serde_json::json!({ "ok": true })
        )
    );
    let (status, body) = send(&state, "GET", "/tasks/nobody", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // Revoke: the token is needed.
    let revoke = |id: String, body: &'static str, token: Option<&'static str>| {
        let state = state.clone();
        async move {
            let (status, answer) =
                send_body(&state, "POST", &format!("/tasks/{id}/revoke"), token, body).await;
            (status, json(&answer))
        }
    };
    let (status, _) = revoke(queued.clone(), "", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, answer) = revoke(queued.clone(), "", token).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({ "id": queued, "was": "queued", "terminate": false })
    );
    let (status, answer) = revoke(later.clone(), "{}", token).await;
    assert_eq!(
        (status, &answer["was"]),
        (StatusCode::ACCEPTED, &serde_json::json!("scheduled"))
    );
    let (status, answer) = revoke(failing.clone(), "", token).await;
    assert_eq!(
        (status, &answer["was"]),
        (StatusCode::ACCEPTED, &serde_json::json!("retrying"))
    );
    let (status, answer) = revoke(running.clone(), r#"{"terminate": true}"#, token).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({ "id": running, "was": "running", "terminate": true })
    );
    let (status, answer) = revoke("later-1".into(), "", token).await;
    assert_eq!(
        (status, &answer["was"]),
        (StatusCode::ACCEPTED, &serde_json::json!("unknown"))
    );
    let (status, answer) = revoke(queued.clone(), "", token).await;
    assert_eq!(
        (status, &answer["was"]),
        (StatusCode::OK, &serde_json::json!("revoked"))
    );
    let (status, answer) = revoke(done.clone(), "", token).await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    assert_eq!(
        answer["error"],
        "task d-1 has ended (succeeded): nothing to revoke"
    );
    let (status, answer) = revoke(done.clone(), r#"{"terminate": "yes"}"#, token).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("body: invalid type"),
        "{answer}"
    );
    // A revoked task that had not started says dead/revoked at once.
    for id in [queued, later, failing] {
        let r = record(id).await;
        assert_eq!(
            (&r["state"], &r["error"]),
            (&serde_json::json!("dead"), &serde_json::json!("revoked")),
            "{r}"
        );
    }
}

/// Enqueues `body` through the router; the ids, in order.
async fn enqueued(state: &AppState, body: &str) -> Vec<String> {
    let (status, answer) = send_body(state, "POST", "/tasks", Some("tok"), body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let answer = json(&answer);
    let items = answer.as_array().cloned().unwrap_or_else(|| vec![answer]);
    items
        .iter()
        .map(|a| a["id"].as_str().unwrap().to_string())
        .collect()
}

/// `GET` through the router → status and JSON.
async fn get(state: &AppState, uri: &str) -> (StatusCode, serde_json::Value) {
    let (status, body) = send(state, "GET", uri, None).await;
    (status, json(&body))
}

/// The ids of a search answer's tasks, in order.
fn found(answer: &serde_json::Value) -> Vec<&str> {
    answer["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn tasks_are_found_by_id_name_queue_state_and_trace_over_the_recent_events() {
    let state = state(Duration::from_millis(5), Some("tok"), false).await;
    // Two chat messages (the second with a callback) and a failure notice.
    let ids = enqueued(
        &state,
        r#"[{"task":"process_chat_message","id":"chat-1"},
            {"task":"process_chat_message","id":"chat-2","link":[{"task":"notify_chat_failure"}]},
            {"task":"notify_chat_failure","id":"notice-1","countdown":3600}]"#,
    )
    .await;
    assert_eq!(ids, ["chat-1", "chat-2", "notice-1"]);
    // chat-1 succeeds; chat-2 runs and fails once (its next attempt is scheduled).
    let got = state
        .broker
        .reserve("chat", "node", 2, Duration::ZERO)
        .await
        .unwrap();
    let (one, two) = (&got[0], &got[1]);
    state
        .broker
        .ack(one, serde_json::json!({"reply": "hi"}))
        .await
        .unwrap();
    let started = actors::broker::Event::about(
        "started",
        &two.envelope,
        serde_json::json!({"attempt": 0, "consumer": "node"}),
    );
    state.broker.publish(started).await.unwrap();
    state
        .broker
        .retry(
            two,
            std::time::SystemTime::now() + Duration::from_secs(60),
            "zep timed out",
        )
        .await
        .unwrap();

    // Everything, newest activity first.
    let (status, all) = get(&state, "/tasks").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(found(&all), ["chat-2", "chat-1", "notice-1"]);
    assert_eq!(
        (all["complete"].clone(), all["events"].clone()),
        (true.into(), "on".into())
    );
    let by_id = |answer: &serde_json::Value, id: &str| {
        answer["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id)
            .cloned()
            .unwrap()
    };
    let chat2 = by_id(&all, "chat-2");
    assert_eq!(chat2["state"], "retrying");
    assert_eq!(chat2["attempts"], 1);
    assert_eq!(chat2["error"], "zep timed out");
    assert_eq!(chat2["recorded"], true);
    let trace = chat2["trace_id"].as_str().unwrap().to_string();
    assert!(
        trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()),
        "a new trace, from its sent event: {trace}"
    );
    let chat1 = by_id(&all, "chat-1");
    assert_eq!(
        (chat1["state"].as_str(), chat1["queue"].as_str()),
        (Some("succeeded"), Some("chat"))
    );
    assert_eq!(
        by_id(&all, "notice-1")["state"],
        "scheduled",
        "its eta is ahead"
    );
    assert_eq!(
        by_id(&all, "notice-1")["recorded"],
        true,
        "recorded at its enqueue"
    );

    // Each filter, and several at once.
    for (query, expected) in [
        ("id=chat-", vec!["chat-2", "chat-1"]),
        ("id=chat-1", vec!["chat-1"]),
        ("task=CHAT_MESS", vec!["chat-2", "chat-1"]),
        ("task=failure", vec!["notice-1"]),
        ("queue=default", vec!["notice-1"]),
        ("state=succeeded", vec!["chat-1"]),
        ("state=retrying&queue=chat", vec!["chat-2"]),
        ("state=dead", vec![]),
        ("queue=chat&limit=1", vec!["chat-2"]),
        (
            "id=&task=&queue=&state=",
            vec!["chat-2", "chat-1", "notice-1"],
        ),
    ] {
        let (status, answer) = get(&state, &format!("/tasks?{query}")).await;
        assert_eq!(status, StatusCode::OK, "{query}: {answer}");
        assert_eq!(found(&answer), expected, "{query}");
    }
    let (_, answer) = get(&state, &format!("/tasks?trace={trace}")).await;
    assert_eq!(found(&answer), ["chat-2"]);

    // A scan that stops short says so.
    let (_, answer) = get(&state, "/tasks?scan=2").await;
    assert_eq!(answer["scanned"], 2);
    assert_eq!(answer["complete"], false);

    // Bad filters are 400s naming the field.
    for (query, field) in [
        ("state=pending", "state: expected one of queued, scheduled"),
        ("limit=0", "limit: expected 1 to 200, got 0"),
        ("limit=201", "limit: expected 1 to 200"),
        ("scan=20001", "scan: expected 1 to 20000"),
        ("colour=red", "unknown field `colour`"),
    ] {
        let (status, answer) = get(&state, &format!("/tasks?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains(field),
            "{query}: {answer}"
        );
    }
    let long = "x".repeat(300);
    let (status, answer) = get(&state, &format!("/tasks?task={long}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(answer["error"], "task: 300 bytes, over the limit of 256");
}

#[tokio::test]
async fn with_events_off_a_search_finds_a_task_by_its_exact_id_only() {
    let settings = BrokerSettings {
        events_maxlen: 0,
        ..BrokerSettings::default()
    };
    let broker = common::memory_broker(settings).await;
    let mut state = common::app_state(
        CONFIG,
        broker,
        Resources::default(),
        Duration::from_millis(5),
    )
    .await;
    state.admin_token = Some(Arc::from("tok"));
    enqueued(&state, r#"{"task":"notify_chat_failure","id":"n-1"}"#).await;
    let got = state
        .broker
        .reserve("default", "node", 1, Duration::ZERO)
        .await
        .unwrap();
    state
        .broker
        .dead_letter(&got[0], "permanent: 400")
        .await
        .unwrap();
    let (_, answer) = get(&state, "/tasks").await;
    assert_eq!(answer["events"], "off");
    assert!(found(&answer).is_empty());
    let (_, answer) = get(&state, "/tasks?id=n-1").await;
    assert_eq!(found(&answer), ["n-1"]);
    assert_eq!(answer["tasks"][0]["state"], "dead");
    assert_eq!(answer["tasks"][0]["error"], "permanent: 400");
}

#[tokio::test]
async fn a_task_timeline_lists_its_events_state_trace_and_dead_letter() {
    let state = state(Duration::from_millis(5), Some("tok"), false).await;
    enqueued(
        &state,
        r#"[{"task":"notify_chat_failure","id":"a/b","trace_id":"trace-7","parent_id":"p-1"},
            {"task":"notify_chat_failure","id":"other"}]"#,
    )
    .await;
    let got = state
        .broker
        .reserve("default", "node", 2, Duration::ZERO)
        .await
        .unwrap();
    for delivery in &got {
        state
            .broker
            .dead_letter(delivery, "permanent: <b>400</b>")
            .await
            .unwrap();
    }
    let (status, timeline) = get(&state, "/tasks/a%2Fb/timeline").await;
    assert_eq!(status, StatusCode::OK, "{timeline}");
    let kinds: Vec<&str> = timeline["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sent", "dead"]);
    assert_eq!(timeline["state"], "dead");
    assert_eq!(timeline["attempts"], 1);
    assert_eq!(timeline["task"], "notify_chat_failure");
    assert_eq!(timeline["queue"], "default");
    assert_eq!(timeline["trace_id"], "trace-7");
    assert_eq!(timeline["parent_id"], "p-1");
    assert_eq!(timeline["complete"], true, "it reached the task's `sent`");
    assert_eq!(timeline["dead_letter"]["envelope"]["id"], "a/b");
    assert_eq!(timeline["dead_letter"]["reason"], "permanent: <b>400</b>");

    // Requeued and running again: no dead letter, the state follows the newest event.
    let entry = timeline["dead_letter"]["entry"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = send(
        &state,
        "POST",
        &format!("/dlq/default/{entry}/requeue"),
        Some("tok"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let again = state
        .broker
        .reserve("default", "node", 1, Duration::ZERO)
        .await
        .unwrap();
    state.broker.started(&again[0], "node");
    let (_, timeline) = get(&state, "/tasks/a%2Fb/timeline").await;
    assert_eq!(timeline["state"], "running", "its record, started again");
    assert_eq!(timeline["dead_letter"], serde_json::Value::Null);

    // Nothing known: an empty timeline, no state.
    let (status, timeline) = get(&state, "/tasks/nobody/timeline").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(timeline["events"], serde_json::json!([]));
    assert_eq!(timeline["state"], serde_json::Value::Null);
    let (status, _) = get(&state, "/tasks/x/timeline?scan=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn dead_letters_are_paged_requeued_and_deleted_one_by_one_and_purged() {
    let state = state(Duration::from_millis(5), Some("tok"), false).await;
    enqueued(
        &state,
        r#"[{"task":"notify_chat_failure","id":"d-0"},{"task":"notify_chat_failure","id":"d-1"},
            {"task":"notify_chat_failure","id":"d-2"},{"task":"notify_chat_failure","id":"d-3"}]"#,
    )
    .await;
    let got = state
        .broker
        .reserve("default", "node", 4, Duration::ZERO)
        .await
        .unwrap();
    for delivery in &got {
        state
            .broker
            .dead_letter(delivery, "permanent")
            .await
            .unwrap();
    }
    let letter_ids = |answer: &serde_json::Value| -> Vec<String> {
        answer["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["envelope"]["id"].as_str().unwrap().to_string())
            .collect()
    };
    // Pages of three: `next` leads on, and is null on the last page.
    let (status, first) = get(&state, "/dlq/default?limit=3").await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(letter_ids(&first), ["d-0", "d-1", "d-2"]);
    let next = first["next"].as_str().unwrap().to_string();
    assert_eq!(next, first["dead_letters"][2]["entry"].as_str().unwrap());
    let (_, rest) = get(&state, &format!("/dlq/default?limit=3&after={next}")).await;
    assert_eq!(letter_ids(&rest), ["d-3"]);
    assert_eq!(rest["next"], serde_json::Value::Null);
    let entry = |n: usize| {
        first["dead_letters"][n]["entry"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // One letter back to the queue; again: gone. Without the token: 401, nothing moves.
    let requeue = format!("/dlq/default/{}/requeue", entry(1));
    assert_eq!(
        send(&state, "POST", &requeue, None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(
            &state,
            "DELETE",
            &format!("/dlq/default/{}", entry(0)),
            None
        )
        .await
        .0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        send(&state, "POST", "/dlq/default/purge", None).await.0,
        StatusCode::UNAUTHORIZED
    );
    let (status, body) = send(&state, "POST", &requeue, Some("tok")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["requeued"], "d-1");
    let (status, body) = send(&state, "POST", &requeue, Some("tok")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        json(&body)["error"]
            .as_str()
            .unwrap()
            .contains("no dead letter")
    );
    let again = state
        .broker
        .reserve("default", "node", 5, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].envelope.id.as_str(), again[0].envelope.attempt),
        ("d-1", 0)
    );

    // One deleted; twice: 404.
    let delete = format!("/dlq/default/{}", entry(0));
    let (status, body) = send(&state, "DELETE", &delete, Some("tok")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["deleted"], true);
    assert_eq!(
        send(&state, "DELETE", &delete, Some("tok")).await.0,
        StatusCode::NOT_FOUND
    );
    let (_, left) = get(&state, "/dlq/default").await;
    assert_eq!(letter_ids(&left), ["d-2", "d-3"]);

    // Entry ids are checked; unknown queues are 404s.
    for bad in ["-", "%2B", "1", "x-1", "1-0-0"] {
        for (method, uri) in [
            ("POST", format!("/dlq/default/{bad}/requeue")),
            ("DELETE", format!("/dlq/default/{bad}")),
            ("GET", format!("/dlq/default?after={bad}")),
        ] {
            let (status, body) = send(&state, method, &uri, Some("tok")).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {uri}: {body}");
            let error = json(&body)["error"].as_str().unwrap().to_string();
            assert!(
                error.starts_with("entry: ") || error.starts_with("after: "),
                "{error}"
            );
        }
    }
    assert_eq!(
        send(&state, "POST", "/dlq/nope/purge", Some("tok")).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&state, "DELETE", "/dlq/nope/1-0", Some("tok")).await.0,
        StatusCode::NOT_FOUND
    );

    // The rest, at once.
    let (status, body) = send(&state, "POST", "/dlq/default/purge", Some("tok")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(json(&body)["purged"], 2);
    let (_, queues) = get(&state, "/queues").await;
    assert_eq!(queues["queues"]["default"]["dead"], 0);
    // Records stay.
    let (status, record) = get(&state, "/tasks/d-3").await;
    assert_eq!(
        (status, record["state"].as_str()),
        (StatusCode::OK, Some("dead"))
    );
}

#[tokio::test]
async fn the_history_route_answers_the_nodes_samples() {
    use actors::history::{Timings, Totals};
    let state = state(Duration::from_millis(5), None, false).await;
    let (status, empty) = get(&state, "/stats/history").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(empty["samples"], serde_json::json!([]));
    assert_eq!(
        (empty["every_ms"].as_u64(), empty["keep"].as_u64()),
        (Some(5000), Some(180))
    );
    let runs = Timings::default();
    runs.observe(Duration::from_millis(120));
    let totals = Totals {
        succeeded: 3,
        runs: runs.totals(),
        ..Totals::default()
    };
    state.history.record(
        std::time::SystemTime::now(),
        vec![("chat".into(), totals, None)],
    );
    let (_, history) = get(&state, "/stats/history").await;
    let sample = &history["samples"][0];
    assert_eq!(sample["queues"]["chat"]["succeeded"], 3);
    assert_eq!(sample["queues"]["chat"]["run"]["mean_ms"], 120.0);
    assert_eq!(sample["all"]["succeeded"], 3);
    assert_eq!(sample["queues"]["chat"]["depth"], serde_json::Value::Null);
}
