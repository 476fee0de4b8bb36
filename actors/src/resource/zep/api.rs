//! The calls to Zep's API: the typed operations (users, threads, messages, context), each
//! through the breaker, and the one place a request is sent (`send_raw`).

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::warn;

use super::{
    BODY_SNIPPET, Context, ThreadMessage, Write, ZepClient, ZepError, ZepUser, bump, segment,
};
use crate::resource::auth::refuses;
use crate::resource::breaker::Permit;
use crate::resource::decode::{BodyError, Decoded, ask_identity};
use crate::resource::{MAX_BODY, target_url};
use crate::shown;

/// A request to Zep.
#[derive(Clone, Debug)]
pub(super) struct Call {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Call {
    pub(super) fn json(method: Method, path: String, body: &Value) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Self {
            method,
            path,
            headers,
            body: Bytes::from(body.to_string()),
        }
    }

    pub(super) fn operation(&self) -> String {
        let path = self.path.split('?').next().unwrap_or(&self.path);
        format!("{} {path}", self.method)
    }

    /// `POST /users` and `POST /threads`: creations whose "already exists" means done.
    pub(super) fn is_ensure(&self) -> bool {
        self.method == Method::POST && matches!(self.path.as_str(), "/users" | "/threads")
    }
}

/// Zep's answer.
#[derive(Debug)]
pub(super) struct Upstream {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
}

impl Upstream {
    pub(super) fn snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        text.chars().take(BODY_SNIPPET).collect()
    }

    /// 409, or a 400 that says the thing already exists (what Zep answers to a second
    /// `POST /users` with the same id).
    pub(super) fn already_exists(&self) -> bool {
        self.status == StatusCode::CONFLICT
            || (self.status == StatusCode::BAD_REQUEST
                && self
                    .snippet()
                    .to_ascii_lowercase()
                    .contains("already exists"))
    }

    /// Worth trying again later: 5xx, 408, 429.
    pub(super) fn transient(&self) -> bool {
        self.status.is_server_error()
            || self.status == StatusCode::REQUEST_TIMEOUT
            || self.status == StatusCode::TOO_MANY_REQUESTS
    }
}
/// How a sent call ended.
#[derive(Debug)]
pub(super) enum Sent {
    /// Zep answered (any status; a 5xx was counted as a breaker failure).
    Answered(Upstream),
    /// No answer: timeout, refused connection, broken body.
    Unreachable(String),
}

impl ZepClient {
    /// `POST /users`: creates the user unless it exists.
    pub async fn ensure_user(&self, user: &ZepUser) -> Result<Write, ZepError> {
        let body = serde_json::to_value(user).unwrap_or_default();
        self.typed_write(Call::json(Method::POST, "/users".into(), &body))
            .await
    }

    /// `POST /threads`: creates the thread of `user_id` unless it exists.
    pub async fn ensure_thread(&self, thread_id: &str, user_id: &str) -> Result<Write, ZepError> {
        let body = json!({ "thread_id": thread_id, "user_id": user_id });
        self.typed_write(Call::json(Method::POST, "/threads".into(), &body))
            .await
    }

    /// `POST /threads/{thread_id}/messages`.
    pub async fn add_messages(
        &self,
        thread_id: &str,
        messages: &[ThreadMessage],
    ) -> Result<Write, ZepError> {
        let path = format!("/threads/{}/messages", segment(thread_id));
        let body = json!({ "messages": messages });
        self.typed_write(Call::json(Method::POST, path, &body))
            .await
    }

    /// `GET /threads/{thread_id}/context`: the user's memory as seen from this thread.
    pub async fn get_context(&self, thread_id: &str) -> Result<Context, ZepError> {
        self.check_usable()?;
        let path = format!("/threads/{}/context", segment(thread_id));
        let call = Call {
            method: Method::GET,
            path,
            headers: HeaderMap::new(),
            body: Bytes::new(),
        };
        let operation = call.operation();
        let Some(upstream) = self.read(call).await else {
            return Ok(Context {
                context: String::new(),
                degraded: true,
            });
        };
        if upstream.status == StatusCode::NOT_FOUND {
            return Ok(Context::default());
        }
        if !upstream.status.is_success() {
            return Err(self.rejected(operation, &upstream));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            #[serde(default)]
            context: Option<String>,
        }
        let answer: Answer =
            serde_json::from_slice(&upstream.body).map_err(|e| ZepError::Malformed {
                resource: self.resource.clone(),
                operation,
                detail: e.to_string(),
            })?;
        Ok(Context {
            context: answer.context.unwrap_or_default(),
            degraded: false,
        })
    }

    pub(super) fn rejected(&self, operation: String, upstream: &Upstream) -> ZepError {
        ZepError::Rejected {
            resource: self.resource.clone(),
            operation,
            status: upstream.status,
            detail: self.scrub(&upstream.snippet()),
        }
    }

    pub(super) async fn typed_write(&self, call: Call) -> Result<Write, ZepError> {
        self.check_usable()?;
        let operation = call.operation();
        let ensure = call.is_ensure();
        match self.write(call).await? {
            None => Ok(Write::Buffered),
            Some(upstream) if upstream.status.is_success() => Ok(Write::Written),
            Some(upstream) if ensure && upstream.already_exists() => Ok(Write::AlreadyExists),
            Some(upstream) => Err(self.rejected(operation, &upstream)),
        }
    }

    /// A read: Zep's answer, or `None` (degraded) when the breaker refuses, Zep fails, or
    /// Zep refuses the key (now or before).
    pub(super) async fn read(&self, call: Call) -> Option<Upstream> {
        bump(&self.counters.reads);
        let permit = match self.auth.refused() {
            Some(_) => None,
            None => self.breaker.try_acquire().ok(),
        };
        let answer = match permit {
            None => None,
            Some(permit) => match self.send(&call, permit).await {
                Sent::Answered(upstream)
                    if !upstream.status.is_server_error() && !refuses(upstream.status) =>
                {
                    Some(upstream)
                }
                Sent::Answered(_) | Sent::Unreachable(_) => None,
            },
        };
        if answer.is_none() {
            bump(&self.counters.degraded_reads);
        }
        answer
    }

    /// A write: Zep's answer (2xx, or a 4xx that is not worth retrying), or `None` when it
    /// was buffered for replay (breaker refused, backlog pending, Zep failed, or Zep refuses
    /// the key).
    pub(super) async fn write(&self, call: Call) -> Result<Option<Upstream>, ZepError> {
        bump(&self.counters.writes);
        if self.auth.refused().is_none() && !self.has_backlog().await {
            if let Ok(permit) = self.breaker.try_acquire() {
                match self.send(&call, permit).await {
                    Sent::Answered(upstream)
                        if !upstream.transient() && !refuses(upstream.status) =>
                    {
                        return Ok(Some(upstream));
                    }
                    Sent::Answered(_) | Sent::Unreachable(_) => {}
                }
            }
        }
        self.buffer(&call).await?;
        Ok(None)
    }

    /// [`send_raw`](Self::send_raw), and a `401`/`403` answer marks Zep misconfigured.
    pub(super) async fn send(&self, call: &Call, permit: Permit) -> Sent {
        let sent = self.send_raw(call, permit).await;
        if let Sent::Answered(upstream) = &sent
            && refuses(upstream.status)
        {
            self.auth.refuse(upstream.status, &call.operation());
        }
        sent
    }

    /// Sends `call` under `permit`, reporting the result to the breaker: 5xx, timeouts and
    /// failed connections are failures, every other answer a success (a slow one a failure).
    pub(super) async fn send_raw(&self, call: &Call, permit: Permit) -> Sent {
        let Some(key) = &self.api_key else {
            // Unreachable through the public API (checked first); not Zep's fault.
            drop(permit);
            return Sent::Unreachable("no API key".into());
        };
        let timeout = match permit.deadline() {
            Some(deadline) => deadline
                .saturating_duration_since(Instant::now())
                .min(self.timeout),
            None => self.timeout,
        };
        let mut headers = call.headers.clone();
        headers.remove(reqwest::header::CONTENT_LENGTH);
        headers.remove(reqwest::header::HOST);
        headers.insert(AUTHORIZATION, key.clone());
        ask_identity(&mut headers);
        let target = target_url(&self.base_url, &call.path);
        let request = self
            .http
            .request(call.method.clone(), &target)
            .headers(headers)
            .body(call.body.clone())
            .timeout(timeout);
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => {
                permit.fail();
                return Sent::Unreachable(shown::no_answer(&err, &target));
            }
        };
        let status = response.status();
        let mut headers = response.headers().clone();
        let read = match Decoded::new(response, &mut headers) {
            Ok(body) => body.whole(MAX_BODY).await,
            Err(err) => Err(err),
        };
        let body = match read {
            Ok(body) => body,
            Err(err) => {
                permit.fail();
                let why = self.scrub(&format!("answered {status}, but {err}"));
                if !matches!(err, BodyError::Broken(_)) {
                    warn!(resource = %self.resource, operation = %call.operation(), %why,
                        "answer refused; counted as a failed call");
                }
                return Sent::Unreachable(why);
            }
        };
        if status.is_server_error() {
            permit.fail();
        } else {
            permit.succeed();
        }
        Sent::Answered(Upstream {
            status,
            headers,
            body,
        })
    }
}
