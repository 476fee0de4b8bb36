//! Tests of [`OpenAiClient`]: the limiters on paused tokio time (600 calls at 300/min), and
//! the answers of a fake OpenAI on loopback (429 with Retry-After, `insufficient_quota`, 5xx,
//! the `x-ratelimit-*` correction, the egress pass-through, streamed and encoded answers, a
//! missing key).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap as AxumHeaders, StatusCode as Code};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::*;
use crate::handler::RetryPolicy;
use crate::policy::Backoff;
use crate::resource::openai::limiter::tests::busiest_window;

const KEY: &str = "sk-test-0123456789";
const MINUTE: Duration = Duration::from_secs(60);

/// One request the fake received.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    path: String,
    headers: AxumHeaders,
    body: String,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A fake OpenAI under `/v1` on loopback: the path picks the answer. Returns the base URL
/// and the log of requests.
async fn fake() -> (Url, Log) {
    let log: Log = Arc::default();
    let seen = Arc::clone(&log);
    let in_flight = Arc::new(AtomicU64::new(0));
    let router = Router::new().fallback(move |request: Request| {
        let (seen, in_flight) = (Arc::clone(&seen), Arc::clone(&in_flight));
        async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let path = parts.uri.path().to_string();
            seen.lock().unwrap().push(Seen {
                at: Instant::now(),
                path: path.clone(),
                headers: parts.headers.clone(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
            answer(&path, &in_flight).await
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (Url::parse(&format!("http://{addr}/v1")).unwrap(), log)
}

fn error_body(code: &str, message: &str) -> String {
    json!({ "error": { "message": message, "type": code, "code": code } }).to_string()
}

async fn answer(path: &str, in_flight: &AtomicU64) -> Response {
    let json = [("content-type", "application/json")];
    match path {
        "/v1/chat/completions" | "/v1/ok" => (
            Code::OK,
            [
                ("content-type", "application/json"),
                ("x-request-id", "req-1"),
                ("x-ratelimit-limit-requests", "300"),
                ("x-ratelimit-remaining-requests", "299"),
                ("x-ratelimit-remaining-tokens", "149000"),
                ("x-ratelimit-reset-tokens", "400ms"),
            ],
            json!({ "choices": [{ "message": { "content": "hi" } }],
                    "usage": { "total_tokens": 42 } })
            .to_string(),
        )
            .into_response(),
        "/v1/busy-ms" => (
            Code::TOO_MANY_REQUESTS,
            [
                ("content-type", "application/json"),
                ("retry-after-ms", "150"),
                ("retry-after", "1"),
            ],
            error_body("rate_limit_exceeded", "Rate limit reached for requests"),
        )
            .into_response(),
        "/v1/busy-s" => (
            Code::TOO_MANY_REQUESTS,
            [("content-type", "application/json"), ("retry-after", "1")],
            error_body("rate_limit_exceeded", "Rate limit reached for tokens"),
        )
            .into_response(),
        "/v1/quota" => (
            Code::TOO_MANY_REQUESTS,
            [("content-type", "application/json"), ("retry-after", "20")],
            error_body("insufficient_quota", "You exceeded your current quota"),
        )
            .into_response(),
        "/v1/down" => (
            Code::INTERNAL_SERVER_ERROR,
            json,
            error_body("server_error", "oops"),
        )
            .into_response(),
        "/v1/unavailable" => (
            Code::SERVICE_UNAVAILABLE,
            [("retry-after", "3")],
            "overloaded",
        )
            .into_response(),
        "/v1/bad-key" => (
            Code::UNAUTHORIZED,
            json,
            error_body(
                "invalid_api_key",
                &format!("Incorrect API key provided: {KEY}."),
            ),
        )
            .into_response(),
        "/v1/exhausted" => (
            Code::OK,
            [
                ("content-type", "application/json"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "250ms"),
                ("x-ratelimit-remaining-tokens", "5000"),
                ("x-ratelimit-reset-tokens", "9s"),
            ],
            "{}",
        )
            .into_response(),
        // An event stream: one event, a pause, the rest.
        "/v1/stream" => {
            let events = futures_util::stream::unfold(0, |n| async move {
                let event = match n {
                    0 => "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
                    1 => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        "data: {\"choices\":[{\"delta\":{\"content\":\"lo\"}}]}\n\n"
                    }
                    2 => "data: [DONE]\n\n",
                    _ => return None,
                };
                Some((Ok::<_, std::io::Error>(Bytes::from(event)), n + 1))
            });
            Response::builder()
                .header("content-type", "text/event-stream; charset=utf-8")
                .header("x-ratelimit-remaining-requests", "298")
                .body(Body::from_stream(events))
                .unwrap()
        }
        "/v1/gzip" => {
            use std::io::Write;
            let body = json!({ "choices": [], "usage": { "total_tokens": 7 } }).to_string();
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(body.as_bytes()).unwrap();
            (
                Code::OK,
                [
                    ("content-type", "application/json"),
                    ("content-encoding", "gzip"),
                ],
                encoder.finish().unwrap(),
            )
                .into_response()
        }
        "/v1/zstd" => (
            Code::OK,
            [
                ("content-type", "application/json"),
                ("content-encoding", "zstd"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "50ms"),
            ],
            format!("{{\"key\": \"{KEY}\"}}"),
        )
            .into_response(),
        "/v1/slow" => {
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            // Long enough that the snapshot below (at 50 ms) sees the first two in flight even
            // on a loaded machine.
            tokio::time::sleep(Duration::from_millis(300)).await;
            in_flight.fetch_sub(1, Ordering::SeqCst);
            (Code::OK, json, json!({ "in_flight": now }).to_string()).into_response()
        }
        _ => Response::builder()
            .status(Code::NOT_FOUND)
            .body(Body::from(error_body("not_found", "no such route")))
            .unwrap(),
    }
}

fn settings(base: &Url) -> OpenAiSettings {
    let mut settings = OpenAiSettings::new("OPENAI_API_KEY", Some(KEY.into()));
    settings.base_url = base.clone();
    settings
}

fn client(settings: OpenAiSettings) -> OpenAiClient {
    OpenAiClient::try_new("openai", settings, reqwest::Client::new()).unwrap()
}

fn chat(content: &str) -> Value {
    json!({ "model": "gpt-4o-mini", "messages": [{ "role": "user", "content": content }] })
}

#[test]
fn settings_are_validated_and_the_key_never_shows_in_debug() {
    let base = Url::parse(DEFAULT_BASE_URL).unwrap();
    let mut bad = settings(&base);
    bad.base_url = Url::parse("ftp://example.com/v1").unwrap();
    assert!(OpenAiClient::try_new("openai", bad, reqwest::Client::new()).is_err());
    let mut bad = settings(&base);
    bad.concurrency = Some(0);
    let err = OpenAiClient::try_new("openai", bad, reqwest::Client::new()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "resources.openai: concurrency must be at least 1"
    );
    let mut bad = settings(&base);
    bad.api_key_env = " ".into();
    assert!(OpenAiClient::try_new("openai", bad, reqwest::Client::new()).is_err());
    let mut bad = settings(&base);
    bad.api_key = Some("sk-with\nnewline".into());
    let err = OpenAiClient::try_new("openai", bad, reqwest::Client::new()).unwrap_err();
    assert!(!err.to_string().contains("sk-with"), "{err}");

    let good = settings(&base);
    assert!(!format!("{good:?}").contains(KEY));
    let client = client(good);
    assert!(!format!("{client:?}").contains(KEY));
    assert!(!client.snapshot().to_string().contains(KEY));
    assert_eq!(client.admission(), Admission::Open);
}

#[tokio::test(start_paused = true)]
async fn six_hundred_calls_at_300_per_minute_spread_over_two_minutes_never_over_the_quota() {
    let mut settings = settings(&Url::parse(DEFAULT_BASE_URL).unwrap());
    settings.requests = Some(Limit::per_minute(300).unwrap());
    let client = Arc::new(client(settings));
    let metrics = metrics_of(&client);
    let start = Instant::now();
    let granted: Arc<Mutex<Vec<(Duration, u64)>>> = Arc::default();
    let mut calls = Vec::new();
    for _ in 0..600 {
        let (client, granted) = (Arc::clone(&client), Arc::clone(&granted));
        calls.push(tokio::spawn(async move {
            // What `call` and `forward` wait for before they send.
            let _admitted = client.admit(1).await;
            granted.lock().unwrap().push((start.elapsed(), 1));
        }));
    }
    // Let every caller reach the limiter (paused time does not move while tasks can run).
    tokio::time::sleep(Duration::from_millis(1)).await;
    let snapshot = client.snapshot();
    assert_eq!(snapshot["calls"]["started"], 30, "the burst: {snapshot}");
    assert_eq!(snapshot["calls"]["waiting"], 570, "{snapshot}");
    assert_eq!(snapshot["limits"]["requests_per_minute"], 300);
    assert_eq!(snapshot["limits"]["requests_burst"], 30);
    let waiting = r#"rt_limiter_waiting{resource="openai"}"#;
    assert_eq!(scrape(&metrics, waiting).await, Some(570.0));

    for call in calls {
        call.await.unwrap();
    }
    let mut times = granted.lock().unwrap().clone();
    times.sort();
    assert_eq!(times.len(), 600);
    assert_eq!(busiest_window(&times, MINUTE), 300, "quota exceeded");
    // 30 at once, then 570 at 271/min: 126 s.
    let span = times.last().unwrap().0;
    assert!(
        span >= Duration::from_secs(126) && span < Duration::from_secs(127),
        "{span:?}"
    );
    assert_eq!(client.snapshot()["calls"]["waiting"], 0);
    // /metrics: nobody waits now; 600 waits observed, of which the burst's 30 took no time.
    assert_eq!(scrape(&metrics, waiting).await, Some(0.0));
    let count = r#"rt_limiter_wait_seconds_count{resource="openai"}"#;
    assert_eq!(scrape(&metrics, count).await, Some(600.0));
    let quick = r#"rt_limiter_wait_seconds_bucket{resource="openai",le="0.001"}"#;
    assert_eq!(scrape(&metrics, quick).await, Some(30.0));
}

/// A metrics registry reading `client` at scrape time.
fn metrics_of(client: &Arc<OpenAiClient>) -> crate::metrics::Metrics {
    let mut resources = crate::resource::Resources::default();
    resources.insert(
        "openai",
        Arc::clone(client) as Arc<dyn crate::resource::SharedResource>,
    );
    let mut metrics = crate::metrics::Metrics::new([], []);
    metrics.watch_resources(Arc::new(resources));
    metrics
}

/// One sample of `metrics`' exposition, named as written there.
async fn scrape(metrics: &crate::metrics::Metrics, series: &str) -> Option<f64> {
    let broker = crate::broker::AnyBroker::Memory(crate::broker::memory::MemoryBroker::new(
        crate::broker::BrokerSettings::default(),
    ));
    let text = metrics.render(&broker).await.unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test(start_paused = true)]
async fn estimated_tokens_are_limited_per_minute() {
    let mut settings = settings(&Url::parse(DEFAULT_BASE_URL).unwrap());
    settings.tokens = Some(Limit::try_new(6000, 1000).unwrap());
    let client = Arc::new(client(settings));
    // 2000 characters of prompt ("user" and the content) → 500 tokens each.
    let estimate = estimate_tokens(&chat(&"x".repeat(1996)));
    assert_eq!(estimate, 500);
    let start = Instant::now();
    let granted: Arc<Mutex<Vec<(Duration, u64)>>> = Arc::default();
    let mut calls = Vec::new();
    for _ in 0..40 {
        let (client, granted) = (Arc::clone(&client), Arc::clone(&granted));
        calls.push(tokio::spawn(async move {
            let _admitted = client.admit(estimate).await;
            granted.lock().unwrap().push((start.elapsed(), estimate));
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let mut times = granted.lock().unwrap().clone();
    times.sort();
    assert_eq!(times.iter().filter(|(t, _)| t.is_zero()).count(), 2);
    assert!(busiest_window(&times, MINUTE) <= 6000);
    // 38 × 500 tokens after the burst at 5001 tokens/min: 3.8 minutes.
    let span = times.last().unwrap().0;
    let expected = MINUTE * 38 * 500 / 5001;
    assert!(
        span >= expected && span < expected + Duration::from_secs(1),
        "{span:?}"
    );
    assert_eq!(client.snapshot()["tokens_estimated"], 40 * 500);
}

#[tokio::test]
async fn calls_go_through_the_limiter_with_the_key() {
    let (base, log) = fake().await;
    let mut settings = settings(&base);
    // Two at once, then one every ~100 ms.
    settings.requests = Some(Limit::try_new(600, 2).unwrap());
    let client = Arc::new(client(settings));
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let client = Arc::clone(&client);
            tokio::spawn(async move {
                client
                    .call(Method::POST, "/chat/completions", chat("hello"))
                    .await
            })
        })
        .collect();
    for call in calls {
        let answer = call.await.unwrap().unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], "hi");
    }
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.len(), 6);
    for request in &seen {
        assert_eq!(request.path, "/v1/chat/completions");
        assert_eq!(request.headers["authorization"], format!("Bearer {KEY}"));
        assert_eq!(request.headers["content-type"], "application/json");
        assert_eq!(
            serde_json::from_str::<Value>(&request.body).unwrap(),
            chat("hello")
        );
    }
    // The four after the burst are spaced by the replenish interval (~100 ms).
    let span = seen[5].at - seen[0].at;
    assert!(span >= Duration::from_millis(390), "{span:?}");
    let snapshot = client.snapshot();
    assert_eq!(snapshot["calls"]["succeeded"], 6);
    assert_eq!(snapshot["tokens_used"], 6 * 42);
    assert_eq!(snapshot["server"]["remaining_requests"], 299);
    assert_eq!(snapshot["server"]["reset_tokens_ms"], 400);
}

#[tokio::test]
async fn a_429_is_retried_after_its_retry_after_and_holds_further_calls() {
    let (base, _) = fake().await;
    let client = client(settings(&base));
    let busy = client
        .call(Method::POST, "/busy-ms", chat("hi"))
        .await
        .unwrap_err();
    let returned = Instant::now();
    assert_eq!(
        busy,
        TaskError::Retry {
            reason:
                "OpenAI POST /busy-ms: HTTP 429 Too Many Requests: Rate limit reached for requests"
                    .into(),
            after: Some(Duration::from_millis(150)),
            class: ErrorClass::Http429,
        }
    );
    // The retry policy waits at least that long, even with a shorter backoff.
    let policy = RetryPolicy {
        max_retries: 3,
        backoff: Backoff::try_new(Duration::from_millis(10), Duration::from_secs(1), 0.0).unwrap(),
        retry_on_timeout: true,
    };
    assert_eq!(
        policy.next_delay(0, &busy),
        Some(Duration::from_millis(150))
    );
    // Other calls of the node hold back for as long.
    client.call(Method::POST, "/ok", chat("hi")).await.unwrap();
    assert!(returned.elapsed() >= Duration::from_millis(140));

    let busy = client
        .call(Method::POST, "/busy-s", chat("hi"))
        .await
        .unwrap_err();
    assert!(
        matches!(busy, TaskError::Retry { after: Some(d), .. } if d == Duration::from_secs(1)),
        "{busy:?}"
    );
    let snapshot = client.snapshot();
    assert_eq!(snapshot["rate_limited_429"], 2);
    assert_eq!(snapshot["holds"], 2);
    assert!(snapshot["hold_ms"].as_u64().unwrap() > 500, "{snapshot}");
}

#[tokio::test]
async fn insufficient_quota_is_permanent_and_not_retried() {
    let (base, log) = fake().await;
    let client = client(settings(&base));
    let quota = client
        .call(Method::POST, "/quota", chat("hi"))
        .await
        .unwrap_err();
    assert_eq!(
        quota,
        TaskError::Permanent(
            "OpenAI POST /quota: HTTP 429 Too Many Requests: You exceeded your current quota"
                .into()
        )
    );
    let policy = RetryPolicy {
        max_retries: 5,
        backoff: Backoff::try_new(Duration::from_secs(1), Duration::from_secs(60), 0.0).unwrap(),
        retry_on_timeout: true,
    };
    assert_eq!(policy.next_delay(0, &quota), None);
    let snapshot = client.snapshot();
    assert_eq!(snapshot["insufficient_quota"], 1);
    assert_eq!(snapshot["rate_limited_429"], 0);
    assert_eq!(
        snapshot["holds"], 0,
        "its retry-after does not hold the node"
    );
    assert_eq!(log.lock().unwrap().len(), 1, "called once");
}

#[tokio::test]
async fn server_errors_retry_and_other_client_errors_are_permanent_without_the_key() {
    let (base, _) = fake().await;
    let client = client(settings(&base));
    let down = client
        .call(Method::POST, "/down", chat("hi"))
        .await
        .unwrap_err();
    assert!(
        matches!(down, TaskError::Retry { after: None, .. }),
        "{down:?}"
    );
    let unavailable = client
        .call(Method::GET, "/unavailable", Value::Null)
        .await
        .unwrap_err();
    assert_eq!(
        unavailable,
        TaskError::Retry {
            reason: "OpenAI GET /unavailable: HTTP 503 Service Unavailable: overloaded".into(),
            after: Some(Duration::from_secs(3)),
            class: ErrorClass::Http5xx,
        }
    );
    let missing = client
        .call(Method::POST, "/nope", chat("hi"))
        .await
        .unwrap_err();
    assert!(!missing.is_retryable(), "{missing:?}");
    // Last: a 401 marks the resource misconfigured, and later calls would not reach it.
    let bad = client
        .call(Method::POST, "/bad-key", chat("hi"))
        .await
        .unwrap_err();
    assert_eq!(
        bad,
        TaskError::Permanent(
            "OpenAI POST /bad-key: HTTP 401 Unauthorized: Incorrect API key provided: <redacted>."
                .into()
        )
    );
    let refused = OpenAiClient::try_new(
        "openai",
        settings(&Url::parse("http://127.0.0.1:9/v1").unwrap()),
        reqwest::Client::new(),
    )
    .unwrap()
    .call(Method::POST, "/chat/completions", chat("hi"))
    .await
    .unwrap_err();
    assert_eq!(
        refused,
        TaskError::retry_as(
            ErrorClass::Connect,
            "OpenAI POST /chat/completions: cannot connect to \
             http://127.0.0.1:9/v1/chat/completions: Connection refused (os error 111)"
        )
    );
    let snapshot = client.snapshot();
    assert_eq!(snapshot["server_errors"], 2);
    assert_eq!(snapshot["calls"]["failed"], 4);
}

#[tokio::test]
async fn an_exhausted_limit_reported_by_the_server_holds_calls_until_its_reset() {
    let (base, log) = fake().await;
    let client = client(settings(&base));
    client
        .call(Method::POST, "/exhausted", Value::Null)
        .await
        .unwrap();
    let snapshot = client.snapshot();
    assert_eq!(snapshot["server"]["remaining_requests"], 0);
    assert_eq!(snapshot["server"]["reset_requests_ms"], 250);
    assert_eq!(snapshot["server"]["remaining_tokens"], 5000);
    assert!(snapshot["server"]["observed_at"].is_string());
    assert_eq!(snapshot["holds"], 1);
    client.call(Method::POST, "/ok", Value::Null).await.unwrap();
    let seen = log.lock().unwrap().clone();
    let gap = seen[1].at - seen[0].at;
    assert!(gap >= Duration::from_millis(240), "{gap:?}");
    assert!(seen[0].body.is_empty(), "a Null body sends nothing");
}

#[tokio::test]
async fn the_concurrency_cap_bounds_calls_in_flight() {
    let (base, _) = fake().await;
    let mut settings = settings(&base);
    settings.concurrency = Some(2);
    let client = Arc::new(client(settings));
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let client = Arc::clone(&client);
            tokio::spawn(async move { client.call(Method::POST, "/slow", Value::Null).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let snapshot = client.snapshot();
    assert_eq!(snapshot["concurrency_in_use"], 2, "{snapshot}");
    assert_eq!(snapshot["calls"]["in_flight"], 2, "{snapshot}");
    assert_eq!(snapshot["calls"]["waiting"], 4, "{snapshot}");
    let mut most = 0;
    for call in calls {
        most = most.max(call.await.unwrap().unwrap()["in_flight"].as_u64().unwrap());
    }
    assert_eq!(most, 2);
    assert_eq!(client.snapshot()["concurrency_in_use"], 0);
}

#[tokio::test]
async fn forward_injects_the_key_and_passes_the_answer_through() {
    let (base, log) = fake().await;
    let client = client(settings(&base));
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer caller-key"));
    headers.insert("openai-organization", HeaderValue::from_static("org-1"));
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let body = chat("from python").to_string();
    let response = client
        .forward(EgressRequest {
            method: Method::POST,
            path_and_query: "/chat/completions?trace=1".into(),
            headers,
            body: Bytes::from(body.clone()),
        })
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.headers["x-request-id"], "req-1");
    assert_eq!(response.headers["x-ratelimit-remaining-requests"], "299");
    assert!(response.headers.get("content-length").is_none());
    let answer: Value = serde_json::from_slice(response.body.as_full().unwrap()).unwrap();
    assert_eq!(answer["usage"]["total_tokens"], 42);

    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.path, "/v1/chat/completions");
    let authorization: Vec<_> = seen.headers.get_all("authorization").iter().collect();
    assert_eq!(authorization, [format!("Bearer {KEY}").as_str()]);
    assert_eq!(seen.headers["openai-organization"], "org-1");
    assert_eq!(seen.body, body);

    // A 429 passes through with its Retry-After, so the Python caller backs off.
    let busy = client
        .forward(EgressRequest {
            method: Method::POST,
            path_and_query: "/busy-s".into(),
            headers: HeaderMap::new(),
            body: Bytes::new(),
        })
        .await;
    assert_eq!(busy.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(busy.headers["retry-after"], "1");
    let error: Value = serde_json::from_slice(busy.body.as_full().unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    let snapshot = client.snapshot();
    assert_eq!(snapshot["calls"]["started"], 2);
    assert_eq!(snapshot["rate_limited_429"], 1);
    assert_eq!(snapshot["tokens_used"], 42);
}

#[tokio::test]
async fn a_missing_key_makes_the_resource_unusable_and_calls_fail_permanently() {
    let (base, log) = fake().await;
    for key in [None, Some("  ".to_string())] {
        let mut settings = settings(&base);
        settings.api_key_env = "MY_OPENAI_KEY".into();
        settings.api_key = key;
        let client = client(settings);
        assert_eq!(
            client.admission(),
            Admission::Unusable {
                resource: "openai".into(),
                reason: "MY_OPENAI_KEY is not set".into(),
            }
        );
        let err = client
            .call(Method::POST, "/chat/completions", chat("hi"))
            .await
            .unwrap_err();
        assert_eq!(err, TaskError::Permanent("MY_OPENAI_KEY is not set".into()));
        let response = client
            .forward(EgressRequest {
                method: Method::POST,
                path_and_query: "/chat/completions".into(),
                headers: HeaderMap::new(),
                body: Bytes::from(chat("hi").to_string()),
            })
            .await;
        assert_eq!(response.status, StatusCode::UNAUTHORIZED);
        assert!(response.headers.get("retry-after").is_none());
        let body: Value = serde_json::from_slice(response.body.as_full().unwrap()).unwrap();
        assert_eq!(body["error"]["message"], "MY_OPENAI_KEY is not set");
        assert_eq!(body["error"]["code"], "api_key_missing");
        let snapshot = client.snapshot();
        assert_eq!(snapshot["api_key_set"], false);
        assert_eq!(snapshot["api_key_env"], "MY_OPENAI_KEY");
    }
    assert!(log.lock().unwrap().is_empty(), "nothing reached OpenAI");
}

/// A fake OpenAI answering every request with the status in `status` (200 with a model list
/// or a chat answer, else an `invalid_api_key` error). Returns the base URL and the paths
/// received with their `Authorization`.
async fn fake_with_status(status: Arc<std::sync::atomic::AtomicU16>) -> (Url, Log) {
    let log: Log = Arc::default();
    let seen = Arc::clone(&log);
    let router = Router::new().fallback(move |request: Request| {
        let (seen, status) = (Arc::clone(&seen), Arc::clone(&status));
        async move {
            let (parts, _) = request.into_parts();
            seen.lock().unwrap().push(Seen {
                at: Instant::now(),
                path: parts.uri.path().to_string(),
                headers: parts.headers.clone(),
                body: String::new(),
            });
            let code = Code::from_u16(status.load(Ordering::SeqCst)).unwrap();
            let body = if code.is_success() {
                json!({ "object": "list", "data": [], "choices": [] }).to_string()
            } else {
                error_body("invalid_api_key", "Incorrect API key provided")
            };
            (code, [("content-type", "application/json")], body).into_response()
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (Url::parse(&format!("http://{addr}/v1")).unwrap(), log)
}

#[tokio::test]
async fn a_refused_key_marks_openai_misconfigured_and_only_the_probe_reaches_it() {
    let every = Duration::from_millis(150);
    let status = Arc::new(std::sync::atomic::AtomicU16::new(401));
    let (base, log) = fake_with_status(Arc::clone(&status)).await;
    let mut settings = settings(&base);
    settings.auth_probe = AuthProbe::try_new(DEFAULT_AUTH_PROBE_PATH, every).unwrap();
    let client = client(settings);
    let egress = || EgressRequest {
        method: Method::POST,
        path_and_query: "/chat/completions".into(),
        headers: HeaderMap::new(),
        body: Bytes::from(chat("hi").to_string()),
    };

    let first = client.forward(egress()).await;
    assert_eq!(
        first.status,
        StatusCode::UNAUTHORIZED,
        "the upstream's answer"
    );
    let reason = "openai answered 401 Unauthorized to POST /chat/completions: check \
                  OPENAI_API_KEY and base_url";
    assert_eq!(
        client.admission(),
        Admission::Misconfigured {
            resource: "openai".into(),
            reason: reason.into(),
        }
    );
    for _ in 0..10 {
        let err = client
            .call(Method::POST, "/chat/completions", chat("hi"))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            TaskError::Permanent(format!("openai is misconfigured: {reason}"))
        );
        let answer = client.forward(egress()).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        let body: Value = serde_json::from_slice(answer.body.as_full().unwrap()).unwrap();
        assert_eq!(body["error"]["code"], "resource_misconfigured");
        assert_eq!(
            body["error"]["message"],
            format!("openai is misconfigured: {reason}")
        );
    }
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "only the first call reached it"
    );
    let auth = client.snapshot()["auth"].clone();
    assert_eq!(auth["misconfigured"], true);
    assert_eq!(auth["probe"]["path"], "/models");

    client.probe().await;
    assert_eq!(log.lock().unwrap().len(), 1, "not due yet");
    tokio::time::sleep(every).await;
    client.probe().await;
    assert_eq!(log.lock().unwrap().len(), 2);
    assert!(client.auth().refused().is_some());
    status.store(200, Ordering::SeqCst);
    tokio::time::sleep(every).await;
    client.probe().await;
    assert_eq!(client.admission(), Admission::Open);
    let probes: Vec<Seen> = log.lock().unwrap()[1..].to_vec();
    for probe in &probes {
        assert_eq!(probe.path, "/v1/models");
        assert_eq!(
            probe.headers["authorization"],
            format!("Bearer {KEY}").as_str()
        );
    }
    client
        .call(Method::POST, "/chat/completions", chat("hi"))
        .await
        .unwrap();
    assert_eq!(log.lock().unwrap().len(), 4, "calls resume");

    // A 403 (a key without access) is a refusal too.
    status.store(403, Ordering::SeqCst);
    let forbidden = client
        .call(Method::POST, "/chat/completions", chat("hi"))
        .await
        .unwrap_err();
    assert!(!forbidden.is_retryable());
    assert!(matches!(
        client.admission(),
        Admission::Misconfigured { reason, .. } if reason.contains("403 Forbidden")
    ));
    assert!(!client.snapshot().to_string().contains(KEY));
}

#[tokio::test]
async fn a_streamed_answer_counts_at_its_headers_and_holds_its_permit_until_read() {
    let (base, log) = fake().await;
    let mut settings = settings(&base);
    settings.concurrency = Some(1);
    let client = Arc::new(client(settings));
    let stream_call = || EgressRequest {
        method: Method::POST,
        path_and_query: "/stream".into(),
        headers: HeaderMap::new(),
        body: Bytes::from(r#"{"stream": true}"#),
    };
    let response = client.forward(stream_call()).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(
        log.lock().unwrap()[0].headers["accept-encoding"],
        "identity"
    );
    let EgressBody::Stream(mut stream) = response.body else {
        panic!("an event stream is passed on as it arrives");
    };
    // Judged by its status and headers as soon as they came.
    let snapshot = client.snapshot();
    assert_eq!(snapshot["calls"]["succeeded"], 1, "{snapshot}");
    assert_eq!(snapshot["server"]["remaining_requests"], 298, "{snapshot}");
    assert_eq!(snapshot["calls"]["in_flight"], 1, "{snapshot}");
    assert_eq!(snapshot["concurrency_in_use"], 1, "{snapshot}");
    let first = stream.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: {"), "{first:?}");

    // While it is read, the one permit is taken: the next call waits.
    let next = tokio::spawn({
        let client = Arc::clone(&client);
        async move { client.forward(stream_call()).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!next.is_finished());
    assert_eq!(client.snapshot()["calls"]["waiting"], 1);
    let mut rest = Vec::new();
    while let Some(chunk) = stream.chunk().await.unwrap() {
        rest.extend_from_slice(&chunk);
    }
    assert!(rest.ends_with(b"data: [DONE]\n\n"));
    let next = next.await.unwrap();
    assert_eq!(next.status, StatusCode::OK);

    // A caller that goes away mid-stream gives the permit back too.
    drop(next);
    let snapshot = client.snapshot();
    assert_eq!(snapshot["calls"]["in_flight"], 0, "{snapshot}");
    assert_eq!(snapshot["concurrency_in_use"], 0, "{snapshot}");
    assert_eq!(snapshot["tokens_used"], 0, "a stream's usage is not read");
}

#[tokio::test]
async fn encoded_answers_are_decoded_and_an_unknown_coding_is_refused() {
    let (base, _log) = fake().await;
    let client = client(settings(&base));
    let call = |path: &str| EgressRequest {
        method: Method::GET,
        path_and_query: path.into(),
        headers: HeaderMap::new(),
        body: Bytes::new(),
    };
    let response = client.forward(call("/gzip")).await;
    assert_eq!(response.status, StatusCode::OK);
    assert!(response.headers.get("content-encoding").is_none());
    let body: Value = serde_json::from_slice(response.body.as_full().unwrap()).unwrap();
    assert_eq!(body["usage"]["total_tokens"], 7);
    assert_eq!(client.snapshot()["tokens_used"], 7);
    let native = client
        .call(Method::GET, "/gzip", Value::Null)
        .await
        .unwrap();
    assert_eq!(native["usage"]["total_tokens"], 7);

    let refused = client.forward(call("/zstd")).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    let error: Value = serde_json::from_slice(refused.body.as_full().unwrap()).unwrap();
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("`zstd`"), "{message}");
    assert!(!error.to_string().contains(KEY));
    assert_eq!(error["error"]["code"], "upstream_unreadable");
    let snapshot = client.snapshot();
    assert_eq!(snapshot["calls"]["failed"], 1, "{snapshot}");
    assert_eq!(
        snapshot["server"]["remaining_requests"], 0,
        "its limits still count"
    );
    let err = client
        .call(Method::GET, "/zstd", Value::Null)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TaskError::Permanent(reason) if reason.contains("`zstd`")),
        "{err:?}"
    );
}
