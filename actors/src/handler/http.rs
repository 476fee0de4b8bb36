//! `http` handler: POST the envelope as JSON to the app's internal endpoint (docs/tasks.md, "Running tasks").
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | success; the JSON body is the result (an empty body is `null`, other text a string) |
//! | connect error, timeout, 408, 429, 5xx | retryable (the reason names the URL, without credentials or query); `Retry-After` (seconds) is honoured, up to [`crate::caps::MAX_UPSTREAM_WAIT`] (a longer one is cut to it, with a warning); classed by `request_class` and `status_class` |
//! | other 4xx | permanent |
//!
//! Headers sent: `X-Task-Id`, `X-Task-Attempt`, `X-Task-Deadline` (RFC 3339: the soft limit,
//! else the hard one — the app should finish by then). The request is bounded by the handler
//! `timeout` and by the hard limit; dropping the attempt aborts it.

use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use serde_json::Value;
use tokio::time::Instant;

use super::{Attempt, ErrorClass, Handler, TaskContext, TaskError};
use crate::broker::rfc3339;
use crate::caps::{self, Unit};
use crate::shown;

/// Characters of an error body kept in a task error.
const BODY_SNIPPET: usize = 300;

/// POSTs envelopes to one URL.
#[derive(Debug, Clone)]
pub struct HttpHandler {
    url: String,
    timeout: Option<Duration>,
    client: reqwest::Client,
}

impl HttpHandler {
    /// A handler posting to `url`, each request bounded by `timeout` (and the hard limit).
    pub fn new(url: &str, timeout: Option<Duration>, client: reqwest::Client) -> Self {
        Self {
            url: url.to_string(),
            timeout,
            client,
        }
    }
}

impl Handler for HttpHandler {
    fn call(&self, ctx: TaskContext) -> Attempt {
        let this = self.clone();
        Box::pin(async move { this.post(ctx).await })
    }

    fn kind(&self) -> &'static str {
        "http"
    }
}

impl HttpHandler {
    async fn post(self, ctx: TaskContext) -> Result<Value, TaskError> {
        let left = ctx.deadline.saturating_duration_since(Instant::now());
        let timeout = self.timeout.map_or(left, |t| t.min(left));
        let deadline = ctx.soft_deadline.unwrap_or(ctx.deadline);
        let wall_deadline = SystemTime::now() + deadline.saturating_duration_since(Instant::now());
        let response = self
            .client
            .post(&self.url)
            .timeout(timeout)
            .header("X-Task-Id", &ctx.envelope.id)
            .header("X-Task-Attempt", ctx.envelope.attempt.to_string())
            .header("X-Task-Deadline", rfc3339(wall_deadline))
            .json(&*ctx.envelope)
            .send()
            .await
            .map_err(|err| {
                TaskError::retry_as(request_class(&err), shown::no_answer(&err, &self.url))
            })?;
        let status = response.status();
        let retry_after =
            caps::upstream_wait(response.headers(), RETRY_AFTER.as_str(), Unit::Seconds);
        let body = response.bytes().await.map_err(|err| {
            TaskError::retry_as(request_class(&err), shown::no_answer(&err, &self.url))
        })?;
        if status.is_success() {
            return Ok(parse_body(&body));
        }
        let snippet: String = String::from_utf8_lossy(&body)
            .chars()
            .take(BODY_SNIPPET)
            .collect();
        let reason = format!("HTTP {status} from {}: {snippet}", shown::url(&self.url));
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            Err(TaskError::Retry {
                reason,
                after: retry_after,
                class: status_class(status),
            })
        } else {
            Err(TaskError::Permanent(reason))
        }
    }
}

/// The class of a request that got no answer: [`ErrorClass::RequestTimeout`] (its own
/// timeout), [`ErrorClass::Connect`], else [`ErrorClass::Transport`]. Shared with the OpenAI
/// resource's calls.
pub(crate) fn request_class(err: &reqwest::Error) -> ErrorClass {
    if err.is_timeout() {
        ErrorClass::RequestTimeout
    } else if err.is_connect() {
        ErrorClass::Connect
    } else {
        ErrorClass::Transport
    }
}

/// The class of a retryable status: `429` → [`ErrorClass::Http429`], `408` →
/// [`ErrorClass::RequestTimeout`], anything else (the 5xx) → [`ErrorClass::Http5xx`].
pub(crate) fn status_class(status: StatusCode) -> ErrorClass {
    match status {
        StatusCode::TOO_MANY_REQUESTS => ErrorClass::Http429,
        StatusCode::REQUEST_TIMEOUT => ErrorClass::RequestTimeout,
        _ => ErrorClass::Http5xx,
    }
}

fn parse_body(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::Router;
    use axum::http::{HeaderMap, StatusCode as Code};
    use axum::routing::post;
    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::broker::Envelope;

    /// A fake Django endpoint on loopback; returns its base URL and the headers it saw.
    async fn app() -> (String, Arc<Mutex<Vec<HeaderMap>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let router = Router::new()
            .route(
                "/ok",
                post(move |headers: HeaderMap, body: String| {
                    let log = Arc::clone(&log);
                    async move {
                        log.lock().unwrap().push(headers);
                        let envelope: Value = serde_json::from_str(&body).unwrap();
                        axum::Json(json!({ "echo": envelope["args"] }))
                    }
                }),
            )
            .route("/empty", post(|| async { Code::NO_CONTENT }))
            .route(
                "/busy",
                post(|| async { (Code::TOO_MANY_REQUESTS, [("retry-after", "7")], "slow down") }),
            )
            .route(
                "/down",
                post(|| async { (Code::BAD_GATEWAY, "upstream down") }),
            )
            .route(
                "/bad",
                post(|| async { (Code::UNPROCESSABLE_ENTITY, "thread_id missing") }),
            )
            .route(
                "/slow",
                post(|| async {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    "late"
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        (format!("http://{addr}"), seen)
    }

    fn ctx() -> TaskContext {
        let mut envelope = Envelope::new("process_chat_message", "chat");
        envelope.id = "t-42".into();
        envelope.args = vec![json!("hello")];
        TaskContext {
            envelope: Arc::new(envelope),
            soft: CancellationToken::new(),
            soft_deadline: Some(Instant::now() + Duration::from_secs(100)),
            deadline: Instant::now() + Duration::from_secs(120),
        }
    }

    fn handler(base: &str, path: &str, timeout: Option<Duration>) -> HttpHandler {
        HttpHandler::new(&format!("{base}{path}"), timeout, reqwest::Client::new())
    }

    #[tokio::test]
    async fn answers_are_classified_as_design_section_3_says() {
        let (base, seen) = app().await;
        let ok = handler(&base, "/ok", None).call(ctx()).await.unwrap();
        assert_eq!(ok, json!({ "echo": ["hello"] }));
        let headers = seen.lock().unwrap()[0].clone();
        assert_eq!(headers["x-task-id"], "t-42");
        assert_eq!(headers["x-task-attempt"], "0");
        assert!(headers["x-task-deadline"].to_str().unwrap().ends_with('Z'));

        assert_eq!(
            handler(&base, "/empty", None).call(ctx()).await.unwrap(),
            Value::Null
        );

        let busy = handler(&base, "/busy", None).call(ctx()).await.unwrap_err();
        assert!(
            matches!(busy, TaskError::Retry { after: Some(d), .. } if d == Duration::from_secs(7)),
            "{busy:?}"
        );
        assert_eq!(busy.class(), ErrorClass::Http429);
        let down = handler(&base, "/down", None).call(ctx()).await.unwrap_err();
        assert!(
            matches!(down, TaskError::Retry { after: None, .. }),
            "{down:?}"
        );
        assert_eq!(down.class(), ErrorClass::Http5xx);
        let bad = handler(&base, "/bad", None).call(ctx()).await.unwrap_err();
        assert_eq!(
            bad,
            TaskError::Permanent(format!(
                "HTTP 422 Unprocessable Entity from {base}/bad: thread_id missing"
            ))
        );
    }

    /// A fake app that answers every request with the status and `Retry-After` the
    /// envelope's kwargs ask for (`status`, `retry_after`).
    async fn echoing_app() -> String {
        let router = Router::new().route(
            "/",
            post(|body: String| async move {
                let envelope: Value = serde_json::from_str(&body).unwrap();
                let kwargs = &envelope["kwargs"];
                let status = kwargs["status"].as_u64().unwrap_or(503) as u16;
                let mut response = axum::response::Response::new(axum::body::Body::from("{}"));
                *response.status_mut() = Code::from_u16(status).unwrap();
                let value = kwargs["retry_after"].as_str().unwrap_or_default();
                if let Ok(value) = axum::http::HeaderValue::from_bytes(value.as_bytes()) {
                    response.headers_mut().insert("retry-after", value);
                }
                response
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}/")
    }

    fn asking(status: u16, retry_after: &str) -> TaskContext {
        let mut context = ctx();
        let mut envelope = (*context.envelope).clone();
        envelope.kwargs.insert("status".into(), json!(status));
        envelope
            .kwargs
            .insert("retry_after".into(), json!(retry_after));
        context.envelope = Arc::new(envelope);
        context
    }

    #[tokio::test]
    async fn a_retry_after_past_the_cap_is_cut_to_it_never_a_panic() {
        let url = echoing_app().await;
        let day = Duration::from_secs(86_400);
        for retry_after in ["18446744073709551615", "1e300", "inf", "86401"] {
            let handler = HttpHandler::new(&url, None, reqwest::Client::new());
            let err = handler.call(asking(503, retry_after)).await.unwrap_err();
            assert!(
                matches!(err, TaskError::Retry { after: Some(d), .. } if d == day),
                "{retry_after}: {err:?}"
            );
        }
    }

    #[test]
    fn generated_answers_never_panic_the_handler() {
        use proptest::prelude::*;
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let url = runtime.block_on(echoing_app());
        let client = reqwest::Client::new();
        let statuses = prop::sample::select(vec![200u16, 204, 408, 429, 500, 502, 503, 404, 422]);
        let config = ProptestConfig::with_cases(crate::test_util::fuzz_cases(200));
        proptest!(config, |(status in statuses, retry_after in crate::caps::tests::hostile_waits())| {
            let handler = HttpHandler::new(&url, None, client.clone());
            let outcome = runtime.block_on(handler.call(asking(status, &retry_after)));
            match outcome {
                Ok(_) => prop_assert!(status < 300),
                Err(TaskError::Retry { after, .. }) => {
                    prop_assert!([408, 429, 500, 502, 503].contains(&status));
                    prop_assert!(after.is_none_or(|d| d <= crate::caps::MAX_UPSTREAM_WAIT.max));
                }
                Err(TaskError::Permanent(_)) => prop_assert!([404, 422].contains(&status)),
                Err(other) => prop_assert!(false, "{:?}", other),
            }
        });
    }

    #[tokio::test]
    async fn timeouts_and_refused_connections_are_retryable() {
        let (base, _) = app().await;
        let slow = handler(&base, "/slow", Some(Duration::from_millis(100)))
            .call(ctx())
            .await
            .unwrap_err();
        assert_eq!(
            slow,
            TaskError::retry_as(
                ErrorClass::RequestTimeout,
                format!("request to {base}/slow timed out")
            )
        );
        let refused = handler("http://127.0.0.1:9", "/x?token=s3cret", None)
            .call(ctx())
            .await
            .unwrap_err();
        assert_eq!(
            refused,
            TaskError::retry_as(
                ErrorClass::Connect,
                "cannot connect to http://127.0.0.1:9/x: Connection refused (os error 111)"
            )
        );
    }
}
