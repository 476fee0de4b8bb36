//! `http` handler: POST the envelope as JSON to the app's internal endpoint (DESIGN.md §3).
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx | success; the JSON body is the result (an empty body is `null`, other text a string) |
//! | connect error, timeout, 408, 429, 5xx | retryable; `Retry-After` (seconds) is honoured |
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

use super::{Attempt, Handler, TaskContext, TaskError};
use crate::broker::rfc3339;

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
            .map_err(|err| TaskError::retry(describe(&err)))?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|secs| secs.is_finite() && *secs >= 0.0)
            .map(Duration::from_secs_f64);
        let body = response
            .bytes()
            .await
            .map_err(|err| TaskError::retry(describe(&err)))?;
        if status.is_success() {
            return Ok(parse_body(&body));
        }
        let snippet: String = String::from_utf8_lossy(&body)
            .chars()
            .take(BODY_SNIPPET)
            .collect();
        let reason = format!("HTTP {status} from {}: {snippet}", self.url);
        if status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
            || status.is_server_error()
        {
            Err(TaskError::Retry {
                reason,
                after: retry_after,
            })
        } else {
            Err(TaskError::Permanent(reason))
        }
    }
}

fn parse_body(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn describe(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "request timed out".to_string()
    } else if err.is_connect() {
        "cannot connect".to_string()
    } else {
        format!("request failed: {err}")
    }
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
        let down = handler(&base, "/down", None).call(ctx()).await.unwrap_err();
        assert!(
            matches!(down, TaskError::Retry { after: None, .. }),
            "{down:?}"
        );
        let bad = handler(&base, "/bad", None).call(ctx()).await.unwrap_err();
        assert_eq!(
            bad,
            TaskError::Permanent(format!(
                "HTTP 422 Unprocessable Entity from {base}/bad: thread_id missing"
            ))
        );
    }

    #[tokio::test]
    async fn timeouts_and_refused_connections_are_retryable() {
        let (base, _) = app().await;
        let slow = handler(&base, "/slow", Some(Duration::from_millis(100)))
            .call(ctx())
            .await
            .unwrap_err();
        assert_eq!(slow, TaskError::retry("request timed out"));
        let refused = handler("http://127.0.0.1:9", "/x", None)
            .call(ctx())
            .await
            .unwrap_err();
        assert_eq!(refused, TaskError::retry("cannot connect"));
    }
}
