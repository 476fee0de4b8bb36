//! Zep client and actor against a loopback fake Zep (axum) that can be up, down (503) or
//! hanging, and records what it accepted in order. Real time with short periods: the calls
//! cross a real socket, which paused tokio time would race.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap as AxumHeaders, Method as AxumMethod, StatusCode as Code, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::*;
use crate::broker::memory::MemoryBroker;
use crate::broker::{Admin, AnyBroker, BrokerSettings, QueueDepth};
use crate::resource::auth::AuthProbe;
use crate::resource::breaker::{BreakerSettings, BreakerState};
use crate::resource::{EgressRequest, EgressResponse};

const UP: u8 = 0;
const DOWN: u8 = 1;
const HANG: u8 = 2;
/// Answers 401 to everything (a wrong key or base URL).
const REFUSE: u8 = 3;
const KEY: &str = "zk-test-7f3a9c";
/// The pause between probes of a misconfigured Zep in these tests.
const PROBE_EVERY: Duration = Duration::from_millis(150);

/// A fake Zep Cloud under `/api/v2`.
#[derive(Default)]
struct Fake {
    mode: AtomicU8,
    /// Every request received, whatever the mode.
    calls: AtomicU64,
    /// Accepted writes in arrival order: (`METHOD path`, body).
    accepted: Mutex<Vec<(String, Value)>>,
    users: Mutex<HashSet<String>>,
    threads: Mutex<HashSet<String>>,
    auth: Mutex<Vec<Option<String>>>,
    /// `METHOD path?query` of every request received, whatever the mode.
    requests: Mutex<Vec<String>>,
}

impl Fake {
    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
    fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
    fn accepted(&self) -> Vec<(String, Value)> {
        self.accepted.lock().unwrap().clone()
    }
    /// Accepted message contents per thread, in arrival order.
    fn messages(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (op, body) in self.accepted() {
            let Some(thread) = op
                .strip_prefix("POST /threads/")
                .and_then(|p| p.strip_suffix("/messages"))
            else {
                continue;
            };
            for message in body["messages"].as_array().unwrap() {
                out.entry(thread.to_string())
                    .or_default()
                    .push(message["content"].as_str().unwrap().to_string());
            }
        }
        out
    }
}

async fn zep_handler(
    State(fake): State<Arc<Fake>>,
    method: AxumMethod,
    uri: Uri,
    headers: AxumHeaders,
    body: Bytes,
) -> Response {
    fake.calls.fetch_add(1, Ordering::SeqCst);
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    fake.auth.lock().unwrap().push(auth.clone());
    fake.requests.lock().unwrap().push(format!(
        "{method} {}",
        uri.path_and_query().map_or("", |p| p.as_str())
    ));
    match fake.mode.load(Ordering::SeqCst) {
        DOWN => return (Code::SERVICE_UNAVAILABLE, "zep is down").into_response(),
        REFUSE => {
            return (
                Code::UNAUTHORIZED,
                axum::Json(json!({ "message": "unauthorized" })),
            )
                .into_response();
        }
        HANG => {
            tokio::time::sleep(Duration::from_secs(30)).await;
            return "too late".into_response();
        }
        _ => {}
    }
    let Some(path) = uri.path().strip_prefix("/api/v2") else {
        return (Code::NOT_FOUND, "no such API").into_response();
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let accept = |body: Value| {
        fake.accepted
            .lock()
            .unwrap()
            .push((format!("{method} {path}"), body));
    };
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["users"]) => {
            let id = body["user_id"].as_str().unwrap_or_default().to_string();
            if !fake.users.lock().unwrap().insert(id) {
                return (
                    Code::BAD_REQUEST,
                    axum::Json(json!({ "message": "user already exists" })),
                )
                    .into_response();
            }
            accept(body.clone());
            (Code::CREATED, axum::Json(body)).into_response()
        }
        ("POST", ["threads"]) => {
            let id = body["thread_id"].as_str().unwrap_or_default().to_string();
            if !fake.threads.lock().unwrap().insert(id) {
                return (
                    Code::BAD_REQUEST,
                    axum::Json(json!({ "message": "thread already exists" })),
                )
                    .into_response();
            }
            accept(body.clone());
            (Code::CREATED, axum::Json(body)).into_response()
        }
        ("POST", ["threads", "reject", "messages"]) => {
            (Code::UNPROCESSABLE_ENTITY, "messages: role is required").into_response()
        }
        ("POST", ["threads", _, "messages"]) => {
            accept(body);
            axum::Json(json!({ "message": "OK" })).into_response()
        }
        ("GET", ["users-ordered"]) => {
            axum::Json(json!({ "users": [], "row_count": 0, "total_count": 0 })).into_response()
        }
        ("GET", ["threads", thread, "context"]) => {
            if *thread == "unknown" {
                return (Code::NOT_FOUND, "thread not found").into_response();
            }
            axum::Json(json!({ "context": format!("facts of {thread}") })).into_response()
        }
        ("GET", ["echo"]) => (
            [("x-upstream", "fake-zep")],
            axum::Json(json!({
                "auth": auth,
                "caller": headers.get("x-caller").and_then(|v| v.to_str().ok()),
                "query": uri.query(),
            })),
        )
            .into_response(),
        _ => (Code::NOT_FOUND, "no such route").into_response(),
    }
}

async fn fake_zep() -> (reqwest::Url, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let router = Router::new()
        .fallback(zep_handler)
        .with_state(Arc::clone(&fake));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let base = format!("http://{addr}/api/v2").parse().unwrap();
    (base, fake)
}

fn breaker(threshold: u32, open_for: Duration, probe_timeout: Duration) -> BreakerPolicy {
    BreakerPolicy::try_new(BreakerSettings {
        failure_threshold: threshold,
        failure_rate: None,
        open_for,
        open_for_max: open_for * 4,
        probes: 1,
        probe_timeout,
        slow_call: None,
    })
    .unwrap()
}

fn memory() -> Arc<AnyBroker> {
    Arc::new(AnyBroker::Memory(MemoryBroker::new(
        BrokerSettings::default(),
    )))
}

fn client(
    base: &reqwest::Url,
    broker: Arc<AnyBroker>,
    policy: BreakerPolicy,
    key: Option<&str>,
) -> Arc<ZepClient> {
    let settings = ZepSettings {
        resource: "zep".into(),
        base_url: base.clone(),
        api_key: key.map(str::to_string),
        api_key_env: "ZEP_API_KEY".into(),
        timeout: Duration::from_secs(5),
        breaker: policy,
        auth_probe: AuthProbe::try_new(DEFAULT_AUTH_PROBE_PATH, PROBE_EVERY).unwrap(),
    };
    Arc::new(ZepClient::new(settings, broker, "node-a").unwrap())
}

fn says(text: &str) -> ThreadMessage {
    ThreadMessage {
        role: "user".into(),
        name: None,
        content: text.into(),
    }
}

fn egress(method: Method, path: &str, body: Value) -> EgressRequest {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.insert("x-caller", HeaderValue::from_static("python-worker"));
    EgressRequest {
        method,
        path_and_query: path.into(),
        headers,
        body: if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        },
    }
}

fn body(response: &EgressResponse) -> Value {
    serde_json::from_slice(response.body.as_full().unwrap()).unwrap()
}

async fn eventually(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
    let end = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Replays until the backlog is drained (retrying while the breaker is not yet closed).
async fn drain(client: &ZepClient) {
    eventually(
        "replay to drain the backlog",
        Duration::from_secs(10),
        async || client.replay(1_000).await.unwrap().drained,
    )
    .await;
}

#[tokio::test]
async fn while_closed_calls_reach_zep_with_the_key_and_answers_are_typed() {
    let (base, fake) = fake_zep().await;
    let zep = client(
        &base,
        memory(),
        breaker(3, Duration::from_secs(5), Duration::from_secs(1)),
        Some(KEY),
    );
    let user = ZepUser {
        user_id: "u-1".into(),
        email: Some("ada@example.com".into()),
        ..ZepUser::default()
    };
    assert_eq!(zep.ensure_user(&user).await.unwrap(), Write::Written);
    assert_eq!(zep.ensure_user(&user).await.unwrap(), Write::AlreadyExists);
    assert_eq!(
        zep.ensure_thread("t 1/x", "u-1").await.unwrap(),
        Write::Written
    );
    assert_eq!(
        zep.add_messages("t 1/x", &[says("hi"), says("there")])
            .await
            .unwrap(),
        Write::Written
    );
    let context = zep.get_context("t 1/x").await.unwrap();
    assert_eq!(
        context,
        Context {
            context: "facts of t%201%2Fx".into(),
            degraded: false
        }
    );
    assert_eq!(
        zep.get_context("unknown").await.unwrap(),
        Context::default()
    );
    let err = zep.add_messages("reject", &[says("x")]).await.unwrap_err();
    assert!(
        matches!(&err, ZepError::Rejected { status, .. } if *status == StatusCode::UNPROCESSABLE_ENTITY),
        "{err}"
    );
    assert!(err.to_string().contains("role is required"), "{err}");

    let accepted = fake.accepted();
    assert_eq!(
        accepted[0],
        (
            "POST /users".into(),
            json!({ "user_id": "u-1", "email": "ada@example.com" })
        )
    );
    assert_eq!(accepted[2].0, "POST /threads/t%201%2Fx/messages");
    assert_eq!(
        accepted[2].1["messages"][1],
        json!({ "role": "user", "content": "there" })
    );
    let auth = fake.auth.lock().unwrap().clone();
    assert!(
        auth.iter()
            .all(|a| a.as_deref() == Some(&format!("Api-Key {KEY}")[..])),
        "{auth:?}"
    );
    // A 4xx is Zep's answer, not a failure of Zep: the breaker stays closed.
    assert_eq!(zep.breaker().state(), BreakerState::Closed);
    assert_eq!(zep.breaker().snapshot()["failures"], 0);
}

/// The seed incident: every chat task needs Zep, Zep answers 503. Each "task" reads the
/// context and writes its message, 10 at a time (a bulkhead of 10), 500 in all.
#[tokio::test]
async fn retry_storm_500_calls_to_a_dead_zep_cost_at_most_50_and_every_write_is_replayed_in_order()
{
    let (base, fake) = fake_zep().await;
    fake.set(DOWN);
    let open_for = Duration::from_millis(30);
    let zep = client(
        &base,
        memory(),
        breaker(5, open_for, Duration::from_secs(1)),
        Some(KEY),
    );
    let mut workers = Vec::new();
    for worker in 0..10 {
        let zep = Arc::clone(&zep);
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for seq in 0..50 {
                let thread = format!("t{worker}");
                let context = zep.get_context(&thread).await.unwrap();
                let write = zep
                    .add_messages(&thread, &[says(&format!("{worker}-{seq}"))])
                    .await
                    .unwrap();
                outcomes.push((context, write));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for worker in workers {
        outcomes.extend(worker.await.unwrap());
    }
    let during_outage = fake.calls();
    println!("500 tasks against a dead Zep: {during_outage} calls reached it");
    assert_eq!(outcomes.len(), 500);
    assert!(
        outcomes
            .iter()
            .all(|(context, _)| context.degraded && context.context.is_empty())
    );
    assert!(outcomes.iter().all(|(_, write)| *write == Write::Buffered));
    assert!(
        (5..=50).contains(&during_outage),
        "500 tasks cost {during_outage} calls to the dead Zep (threshold + probes, not per task)"
    );
    assert!(fake.accepted().is_empty());
    let snapshot = zep.snapshot();
    assert_eq!(snapshot["replay"]["buffered"], 500);
    assert!(
        snapshot["breaker"]["rejected"].as_u64().unwrap() > 400,
        "{snapshot}"
    );

    // Zep comes back: the backlog is replayed, in order, nothing lost, nothing twice.
    fake.set(UP);
    drain(&zep).await;
    let messages = fake.messages();
    assert_eq!(messages.len(), 10);
    for (thread, got) in &messages {
        let worker = thread.trim_start_matches('t');
        let expected: Vec<String> = (0..50).map(|seq| format!("{worker}-{seq}")).collect();
        assert_eq!(got, &expected, "thread {thread}");
    }
    assert_eq!(zep.breaker().state(), BreakerState::Closed);
    assert_eq!(zep.snapshot()["replay"]["replayed"], 500);
    let depth = zep.backlog().await.unwrap();
    assert_eq!(
        (depth.ready, depth.in_flight, depth.dead),
        (0, 0, 0),
        "{depth:?}"
    );
    // And the next task is served for real again.
    assert!(!zep.get_context("t0").await.unwrap().degraded);
    assert_eq!(
        zep.add_messages("t0", &[says("after")]).await.unwrap(),
        Write::Written
    );
}

#[tokio::test]
async fn new_writes_queue_behind_the_backlog_and_refused_replays_are_dead_lettered() {
    let (base, fake) = fake_zep().await;
    let broker = memory();
    let open_for = Duration::from_millis(50);
    let zep = client(
        &base,
        Arc::clone(&broker),
        breaker(1, open_for, Duration::from_secs(1)),
        Some(KEY),
    );
    let user = ZepUser {
        user_id: "u-1".into(),
        ..ZepUser::default()
    };
    assert_eq!(zep.ensure_user(&user).await.unwrap(), Write::Written);

    fake.set(DOWN);
    assert_eq!(
        zep.add_messages("t1", &[says("m1")]).await.unwrap(),
        Write::Buffered
    );
    assert_eq!(zep.breaker().state(), BreakerState::Open);
    // An ensure of a user that already exists, a refused write, more messages.
    assert_eq!(zep.ensure_user(&user).await.unwrap(), Write::Buffered);
    let refused = zep
        .forward(egress(
            Method::POST,
            "/threads/reject/messages",
            json!({ "messages": [] }),
        ))
        .await;
    assert_eq!(refused.status, StatusCode::ACCEPTED);
    assert_eq!(
        zep.add_messages("t1", &[says("m2")]).await.unwrap(),
        Write::Buffered
    );

    fake.set(UP);
    tokio::time::sleep(open_for * 2).await;
    // The breaker would admit the call, but m3 must not overtake m1 and m2.
    assert_eq!(
        zep.add_messages("t1", &[says("m3")]).await.unwrap(),
        Write::Buffered
    );
    drain(&zep).await;
    assert_eq!(fake.messages()["t1"], ["m1", "m2", "m3"]);
    let dead = broker.dead_letters(zep.replay_queue(), 10).await.unwrap();
    assert_eq!(dead.len(), 1, "only the refused write: {dead:?}");
    assert!(dead[0].reason.contains("422"), "{}", dead[0].reason);
    assert_eq!(
        dead[0].envelope.as_ref().unwrap().kwargs["path"],
        "/threads/reject/messages"
    );
    // Drained: writes go straight to Zep again.
    assert_eq!(
        zep.add_messages("t1", &[says("m4")]).await.unwrap(),
        Write::Written
    );
    assert_eq!(fake.messages()["t1"], ["m1", "m2", "m3", "m4"]);
}

#[tokio::test]
async fn a_hanging_half_open_probe_reopens_the_breaker_at_its_timeout() {
    let (base, fake) = fake_zep().await;
    let open_for = Duration::from_millis(50);
    let probe_timeout = Duration::from_millis(300);
    let zep = client(
        &base,
        memory(),
        breaker(1, open_for, probe_timeout),
        Some(KEY),
    );
    fake.set(DOWN);
    assert!(zep.get_context("t1").await.unwrap().degraded);
    assert_eq!(zep.breaker().state(), BreakerState::Open);

    fake.set(HANG);
    tokio::time::sleep(open_for + Duration::from_millis(10)).await;
    assert_eq!(zep.breaker().state(), BreakerState::HalfOpen);
    let started = Instant::now();
    let probe = {
        let zep = Arc::clone(&zep);
        tokio::spawn(async move { zep.get_context("t1").await.unwrap() })
    };
    // While the probe hangs, other callers are answered at once, without calling Zep.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let calls = fake.calls();
    let quick = Instant::now();
    assert!(zep.get_context("t2").await.unwrap().degraded);
    assert!(quick.elapsed() < Duration::from_millis(100));
    assert_eq!(fake.calls(), calls);
    // The probe gives up at its timeout, degraded, and the breaker is open again.
    assert!(probe.await.unwrap().degraded);
    let took = started.elapsed();
    assert!(
        took >= probe_timeout && took < probe_timeout + Duration::from_millis(500),
        "{took:?}"
    );
    assert_eq!(zep.breaker().state(), BreakerState::Open);
    let snapshot = zep.breaker().snapshot();
    assert_eq!(snapshot["consecutive_opens"], 2, "{snapshot}");
    assert!(
        snapshot["time_until_half_open_ms"].as_u64().unwrap() > 50,
        "{snapshot}"
    );

    // Zep answers again: the next probe closes it.
    fake.set(UP);
    tokio::time::sleep(open_for * 2 + Duration::from_millis(20)).await;
    assert!(!zep.get_context("t1").await.unwrap().degraded);
    assert_eq!(zep.breaker().state(), BreakerState::Closed);
}

#[tokio::test]
async fn egress_passes_through_while_closed_and_degrades_buffers_or_refuses_while_open() {
    let (base, fake) = fake_zep().await;
    let open_for = Duration::from_millis(50);
    let zep = client(
        &base,
        memory(),
        breaker(1, open_for, Duration::from_secs(1)),
        Some(KEY),
    );

    let echo = zep
        .forward(egress(Method::GET, "/echo?lastn=3", Value::Null))
        .await;
    assert_eq!(echo.status, StatusCode::OK);
    assert_eq!(
        body(&echo),
        json!({ "auth": format!("Api-Key {KEY}"), "caller": "python-worker", "query": "lastn=3" })
    );
    assert_eq!(echo.headers["x-upstream"], "fake-zep");
    assert!(echo.headers.get("content-length").is_none());
    let created = zep
        .forward(egress(
            Method::POST,
            "/threads",
            json!({ "thread_id": "t1", "user_id": "u" }),
        ))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let missing = zep
        .forward(egress(Method::GET, "/nowhere", Value::Null))
        .await;
    assert_eq!(
        missing.status,
        StatusCode::NOT_FOUND,
        "4xx answers pass through"
    );

    fake.set(DOWN);
    let read = zep
        .forward(egress(Method::GET, "/threads/t1/context", Value::Null))
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(body(&read), json!({ "context": "", "degraded": true }));
    assert_eq!(read.headers["x-runtime-degraded"], "zep unavailable");
    assert_eq!(zep.breaker().state(), BreakerState::Open);

    let calls = fake.calls();
    let read = zep
        .forward(egress(Method::GET, "/threads/t1/context", Value::Null))
        .await;
    assert_eq!(body(&read)["degraded"], true);
    let write = zep
        .forward(egress(
            Method::POST,
            "/threads/t1/messages",
            json!({ "messages": [{ "role": "user", "content": "via proxy" }] }),
        ))
        .await;
    assert_eq!(write.status, StatusCode::ACCEPTED);
    assert_eq!(body(&write)["buffered"], true);
    let delete = zep
        .forward(egress(Method::DELETE, "/threads/t1", Value::Null))
        .await;
    assert_eq!(delete.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(delete.headers.get(RETRY_AFTER).is_some());
    let search = zep
        .forward(egress(
            Method::POST,
            "/graph/search",
            json!({ "query": "x" }),
        ))
        .await;
    assert_eq!(
        search.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a search is not a write"
    );
    assert_eq!(fake.calls(), calls, "nothing reached Zep while open");

    fake.set(UP);
    tokio::time::sleep(open_for * 2).await;
    drain(&zep).await;
    assert_eq!(fake.messages()["t1"], ["via proxy"]);
}

#[tokio::test]
async fn a_missing_key_makes_zep_unusable_and_a_key_never_shows() {
    let (base, fake) = fake_zep().await;
    let open_for = Duration::from_secs(30);
    let keyless = client(
        &base,
        memory(),
        breaker(1, open_for, Duration::from_secs(1)),
        None,
    );
    let unusable = Admission::Unusable {
        resource: "zep".into(),
        reason: "ZEP_API_KEY is not set".into(),
    };
    assert_eq!(keyless.admission(), unusable);
    let err = keyless.get_context("t1").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "zep cannot be used: ZEP_API_KEY is not set"
    );
    assert!(matches!(
        keyless.ensure_user(&ZepUser::default()).await,
        Err(ZepError::Unusable { .. })
    ));
    let proxied = keyless
        .forward(egress(Method::GET, "/echo", Value::Null))
        .await;
    assert_eq!(proxied.status, StatusCode::FAILED_DEPENDENCY);
    assert_eq!(body(&proxied)["error"], "ZEP_API_KEY is not set");
    assert_eq!(fake.calls(), 0);
    assert_eq!(
        keyless.snapshot()["api_key"],
        json!({ "env": "ZEP_API_KEY", "set": false })
    );

    let zep = client(
        &base,
        memory(),
        breaker(1, open_for, Duration::from_secs(1)),
        Some(KEY),
    );
    assert_eq!(zep.admission(), Admission::Open);
    fake.set(DOWN);
    assert!(zep.get_context("t1").await.unwrap().degraded);
    match zep.admission() {
        Admission::ClosedUntil { resource, until } => {
            assert_eq!(resource, "zep");
            let left = until.duration_since(SystemTime::now()).unwrap();
            assert!(
                left > Duration::from_secs(29) && left <= open_for,
                "{left:?}"
            );
        }
        other => panic!("expected ClosedUntil, got {other:?}"),
    }
    let shown = format!("{zep:?} {} {:?}", zep.snapshot(), zep.breaker());
    assert!(!shown.contains(KEY), "the key leaked: {shown}");
    assert!(zep.snapshot()["api_key"]["set"] == true);
    let bad = ZepClient::new(
        ZepSettings {
            resource: "zep".into(),
            base_url: base.clone(),
            api_key: Some("line\nbreak-secret".into()),
            api_key_env: "ZEP_API_KEY".into(),
            timeout: Duration::from_secs(1),
            breaker: breaker(1, open_for, Duration::from_secs(1)),
            auth_probe: AuthProbe::try_new(DEFAULT_AUTH_PROBE_PATH, PROBE_EVERY).unwrap(),
        },
        memory(),
        "node-a",
    )
    .unwrap_err();
    assert!(!bad.to_string().contains("secret"), "{bad}");
    assert!(bad.to_string().contains("ZEP_API_KEY"), "{bad}");
    // Surrounding whitespace is not part of the key: not sent, not what is redacted; a blank
    // key is no key.
    for (key, usable) in [(" zk-padded-1234\n", true), ("  ", false)] {
        let zep = ZepClient::new(
            ZepSettings {
                resource: "zep".into(),
                base_url: base.clone(),
                api_key: Some(key.into()),
                api_key_env: "ZEP_API_KEY".into(),
                timeout: Duration::from_secs(1),
                breaker: breaker(1, open_for, Duration::from_secs(1)),
                auth_probe: AuthProbe::try_new(DEFAULT_AUTH_PROBE_PATH, PROBE_EVERY).unwrap(),
            },
            memory(),
            "node-a",
        )
        .unwrap();
        assert_eq!(zep.unusable().is_none(), usable, "{key:?}");
        if usable {
            let redactor = zep.redactor().unwrap();
            assert_eq!(
                redactor.redact_text("bad key: zk-padded-1234."),
                "bad key: <redacted>."
            );
        }
    }
}

#[tokio::test]
async fn killing_the_actor_while_open_keeps_the_breaker_open_and_replay_resumes() {
    use crate::supervisor::{ChildSpec, Restart, start_root};
    use crate::tree::{Status, Tree};

    let (base, fake) = fake_zep().await;
    let open_for = Duration::from_secs(2);
    // Threshold 1: after the first failed write the others queue behind the backlog
    // without calling Zep, so only one failure is guaranteed before the assertion.
    let zep = client(
        &base,
        memory(),
        breaker(1, open_for, Duration::from_secs(1)),
        Some(KEY),
    );
    let tree = Tree::new();
    let shared = Arc::clone(&zep);
    let child = ChildSpec::new("zep", "zep", Restart::Permanent, move |node| {
        let args = ZepArgs {
            node,
            client: Arc::clone(&shared),
            replay_every: Duration::from_millis(20),
        };
        (ZepActor, args)
    });
    let spec = crate::supervisor::quick_restarts(vec![child]);
    let (root, _) = start_root(&tree, "root", spec).await.unwrap();
    eventually("first snapshot", Duration::from_secs(2), async || {
        tree.get("root/zep")
            .is_some_and(|z| z.snapshot["breaker"]["state"] == "closed")
    })
    .await;

    fake.set(DOWN);
    for text in ["w1", "w2", "w3"] {
        assert_eq!(
            zep.add_messages("t1", &[says(text)]).await.unwrap(),
            Write::Buffered
        );
    }
    assert_eq!(zep.breaker().state(), BreakerState::Open);
    eventually("degraded while open", Duration::from_secs(1), async || {
        tree.get("root/zep").is_some_and(|z| z.degraded.is_some())
    })
    .await;

    // Chaos: kill the actor. The supervisor restarts it; the breaker does not close.
    tree.cell("root/zep").unwrap().kill();
    eventually("zep restarted", Duration::from_secs(1), async || {
        tree.get("root/zep")
            .is_some_and(|z| z.restarts == 1 && z.status == Status::Running)
    })
    .await;
    assert_eq!(zep.breaker().state(), BreakerState::Open);
    eventually(
        "snapshot of the new incarnation",
        Duration::from_secs(1),
        async || {
            tree.get("root/zep")
                .is_some_and(|z| z.snapshot["breaker"]["state"] == "open")
        },
    )
    .await;
    let info = tree.get("root/zep").unwrap();
    assert!(
        info.degraded
            .as_deref()
            .unwrap()
            .contains("circuit breaker is open"),
        "{info:?}"
    );
    assert!(fake.accepted().is_empty());

    // Zep recovers: the restarted actor replays the backlog by itself once the breaker lets it.
    fake.set(UP);
    eventually(
        "replayed by the actor",
        Duration::from_secs(5),
        async || fake.messages().get("t1").is_some_and(|m| m.len() == 3),
    )
    .await;
    assert_eq!(fake.messages()["t1"], ["w1", "w2", "w3"]);
    eventually("healthy again", Duration::from_secs(2), async || {
        tree.get("root/zep").is_some_and(|z| {
            z.degraded.is_none()
                && z.snapshot["replay"]["backlog"] == 0
                && z.snapshot["breaker"]["state"] == "closed"
        })
    })
    .await;
    let snapshot = tree.get("root/zep").unwrap().snapshot;
    assert_eq!(snapshot["replay"]["queue"], "zep-replay");
    assert_eq!(snapshot["replay"]["replayed"], 3);
    assert!(!snapshot.to_string().contains(KEY));
    root.stop(None);
}

#[tokio::test]
async fn the_backlog_lives_in_redis_and_a_new_client_replays_it_in_order() {
    let redis = crate::test_util::RedisServer::start();
    backlog_in_redis(&redis.url(), BrokerSettings::default()).await;
}

/// The same on a Redis Cluster (the backlog is a queue: its stream, records and events in its
/// slot).
#[tokio::test]
async fn the_backlog_replays_in_order_on_a_redis_cluster() {
    let url = tokio::task::spawn_blocking(|| crate::test_util::RedisCluster::shared().url())
        .await
        .unwrap();
    let prefix = format!("rt{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    backlog_in_redis(
        &url,
        BrokerSettings {
            prefix,
            ..BrokerSettings::default()
        },
    )
    .await;
}

async fn backlog_in_redis(url: &str, settings: BrokerSettings) {
    let connect = async || Arc::new(AnyBroker::connect(url, settings.clone()).await.unwrap());
    let (base, fake) = fake_zep().await;
    let policy = breaker(1, Duration::from_millis(50), Duration::from_secs(1));
    let first = client(&base, connect().await, policy, Some(KEY));
    fake.set(DOWN);
    for n in 1..=5 {
        let write = first
            .add_messages("t1", &[says(&format!("m{n}"))])
            .await
            .unwrap();
        assert_eq!(write, Write::Buffered);
    }
    // The node dies; another process (a fresh client, a closed breaker) takes over.
    drop(first);
    fake.set(UP);
    let second = client(&base, connect().await, policy, Some(KEY));
    assert_eq!(second.backlog().await.unwrap().ready, 5);
    assert_eq!(
        second.add_messages("t1", &[says("m6")]).await.unwrap(),
        Write::Buffered,
        "a backlog found in Redis is not overtaken"
    );
    drain(&second).await;
    assert_eq!(fake.messages()["t1"], ["m1", "m2", "m3", "m4", "m5", "m6"]);
    assert_eq!(second.backlog().await.unwrap(), QueueDepth::default());
}

/// The seed's real root cause: Zep answers 401 (a wrong key or base URL). The first 401 marks
/// Zep misconfigured; after it nothing reaches Zep but one probe per period, reads degrade,
/// writes are buffered (never dead-lettered), and the first accepted probe brings calls back.
#[tokio::test]
async fn a_refused_key_marks_zep_misconfigured_until_a_probe_is_accepted() {
    let (base, fake) = fake_zep().await;
    let zep = client(
        &base,
        memory(),
        breaker(3, Duration::from_secs(5), Duration::from_secs(1)),
        Some(KEY),
    );
    fake.set(REFUSE);
    let first = zep.get_context("t1").await.unwrap();
    assert!(first.degraded, "the refused read degrades: {first:?}");
    assert_eq!(fake.calls(), 1);
    let reason = "zep answered 401 Unauthorized to GET /threads/t1/context: check ZEP_API_KEY \
                  and base_url";
    assert_eq!(
        zep.admission(),
        Admission::Misconfigured {
            resource: "zep".into(),
            reason: reason.into(),
        }
    );
    assert_eq!(
        zep.breaker().state(),
        BreakerState::Closed,
        "a 401 is an answer, not a breaker failure"
    );

    // A call per task no more: reads degrade, writes are buffered, other calls get 503.
    for n in 0..20 {
        assert!(zep.get_context("t1").await.unwrap().degraded);
        let write = zep.add_messages("t1", &[says(&format!("m{n}"))]).await;
        assert_eq!(write.unwrap(), Write::Buffered);
    }
    let read = zep
        .forward(egress(Method::GET, "/threads/t1/context", Value::Null))
        .await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(body(&read), json!({ "context": "", "degraded": true }));
    assert_eq!(read.headers["x-runtime-degraded"], "zep misconfigured");
    let write = zep
        .forward(egress(
            Method::POST,
            "/threads/t1/messages",
            json!({ "messages": [{ "role": "user", "content": "m20" }] }),
        ))
        .await;
    assert_eq!(write.status, StatusCode::ACCEPTED);
    let search = zep
        .forward(egress(Method::POST, "/graph/search", json!({})))
        .await;
    assert_eq!(search.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        body(&search)["error"],
        format!("zep is misconfigured: {reason}")
    );
    assert!(search.headers.contains_key(RETRY_AFTER));
    let round = zep.replay(100).await.unwrap();
    assert_eq!((round.replayed, round.dead_lettered), (0, 0));
    assert!(round.stopped.unwrap().contains("misconfigured"));
    assert_eq!(fake.calls(), 1, "nothing but the first call reached Zep");
    let auth = zep.snapshot()["auth"].clone();
    assert_eq!(auth["misconfigured"], true);
    assert_eq!(auth["status"], 401);
    assert_eq!(auth["reason"], reason);

    // The probe: not before its time, then one call per period, with the key.
    zep.probe().await;
    assert_eq!(fake.calls(), 1, "the probe is not due yet");
    tokio::time::sleep(PROBE_EVERY).await;
    zep.probe().await;
    assert_eq!(fake.calls(), 2);
    assert!(zep.auth().refused().is_some(), "refused again");
    assert_eq!(
        zep.snapshot()["auth"]["last_probe"],
        "refused: 401 Unauthorized"
    );
    fake.set(UP);
    zep.probe().await;
    assert_eq!(fake.calls(), 2, "a refused probe waits a whole period");
    tokio::time::sleep(PROBE_EVERY).await;
    zep.probe().await;
    assert_eq!(fake.calls(), 3);
    assert_eq!(zep.admission(), Admission::Open);
    let requests = fake.requests.lock().unwrap().clone();
    assert_eq!(
        requests[1..],
        [
            "GET /api/v2/users-ordered?pageNumber=1&pageSize=1",
            "GET /api/v2/users-ordered?pageNumber=1&pageSize=1"
        ]
    );
    assert!(
        fake.auth
            .lock()
            .unwrap()
            .iter()
            .all(|a| a.as_deref() == Some(&format!("Api-Key {KEY}")[..]))
    );

    // Every buffered write reaches Zep in order; none was dead-lettered.
    drain(&zep).await;
    let expected: Vec<String> = (0..=20).map(|n| format!("m{n}")).collect();
    assert_eq!(fake.messages()["t1"], expected);
    assert_eq!(zep.snapshot()["replay"]["dead_lettered"], 0);
    assert_eq!(zep.get_context("t1").await.unwrap().context, "facts of t1");

    // A replayed write that meets a refused key stays the head instead of dying.
    fake.set(DOWN);
    assert_eq!(
        zep.add_messages("t2", &[says("late")]).await.unwrap(),
        Write::Buffered
    );
    fake.set(REFUSE);
    let round = zep.replay(100).await.unwrap();
    assert_eq!((round.replayed, round.dead_lettered), (0, 0));
    assert!(zep.auth().refused().is_some());
    assert_eq!(zep.auth().snapshot()["times"], 2);
    fake.set(UP);
    tokio::time::sleep(PROBE_EVERY).await;
    zep.probe().await;
    drain(&zep).await;
    assert_eq!(fake.messages()["t2"], ["late"]);
    assert_eq!(zep.snapshot()["replay"]["dead_lettered"], 0);
}
