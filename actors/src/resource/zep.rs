//! The Zep Cloud client (DESIGN.md §5) and its actor ([`actor::ZepActor`]).
//!
//! [`ZepClient`] is created by the node, outside any actor, and shared through an `Arc` by the
//! native tasks, the egress proxy, the resource gate and the [`actor::ZepActor`]: the
//! reqwest client, the `Authorization: Api-Key <key>` header, the [`Breaker`] and the replay
//! backlog all survive a restart of the actor.
//!
//! # Operations (Zep's `/api/v2` REST shape; every path is relative to `base_url`)
//!
//! | operation | call | while the breaker is open, Zep fails (5xx, timeout, refused) or is misconfigured (401/403) |
//! |---|---|---|
//! | [`ensure_user`](ZepClient::ensure_user) | `POST /users` | buffered for replay |
//! | [`ensure_thread`](ZepClient::ensure_thread) | `POST /threads` | buffered for replay |
//! | [`add_messages`](ZepClient::add_messages) | `POST /threads/{id}/messages` | buffered for replay |
//! | [`get_context`](ZepClient::get_context) | `GET /threads/{id}/context` | empty context, `degraded: true` |
//!
//! Nobody waits and no task retries because of Zep: a read degrades at once, a write is
//! appended to the replay queue at once (so a failed write costs one call, never a retry
//! storm). An "already exists" answer (409, or 400 saying so) to `POST /users` or
//! `POST /threads` is [`Write::AlreadyExists`]; other 4xx answers but 401/403 are
//! [`ZepError::Rejected`] (the caller's bug, permanent); a 404 on a context read is an empty,
//! non-degraded context (a thread with no memory yet).
//!
//! # Replay
//!
//! Buffered writes are envelopes on the broker queue [`replay_queue`]`(resource)` —
//! `zep-replay` for the resource `zep` — with the task name `zep.replay` and kwargs
//! `{method, path, content_type, body_json | body_text, buffered_at}`. They live in Redis
//! with a Redis broker (so the backlog survives a crash and is shared by the nodes) and are
//! replayed by [`ZepClient::replay`] (run by the actor's loop) **in order**: one entry at a
//! time is reserved and held (the *head*, kept in the client, its lease renewed), sent
//! through the breaker, and acked on success; a 5xx / timeout / 408 / 429 keeps the head and
//! ends the round (the breaker decides when to try again: a half-open breaker's probe may be
//! the head itself); a 401 / 403 keeps the head too and marks Zep misconfigured (below) —
//! the key is wrong, not the write; another 4xx dead-letters it with Zep's answer (visible
//! with the DLQ routes, never silently lost) and replay goes on.
//!
//! While a backlog exists, new writes are appended to it too instead of overtaking it, so a
//! thread's messages reach Zep in the order they were written. Limits: the order holds per
//! node; two nodes draining one Redis backlog may interleave, and an entry recovered from a
//! dead node (after [`REPLAY_LEASE`]) goes to the back of the queue.
//!
//! # Egress
//!
//! [`ZepClient::forward`] serves `/egress/zep/…`: while calls are admitted the request goes to
//! `base_url + path` with the key injected and the upstream answer is passed through
//! (5xx, timeouts and refused connections count as breaker failures, as do slow calls). While
//! the breaker is open — or Zep just failed — a `GET`/`HEAD` gets `200
//! {"context": "", "degraded": true}`, a write (`POST`/`PUT`/`PATCH`, except `…/search`
//! queries) is buffered and gets `202 {"buffered": true}`, anything else gets `503` with
//! `Retry-After`. Responses the runtime makes itself carry `x-runtime-degraded`.
//!
//! Every request asks for `Accept-Encoding: identity`; an answer encoded anyway is decoded
//! ([`super::decode`]) and read whole, up to 4 MiB decoded ([`super::MAX_BODY`]). An answer
//! whose body cannot be read — it breaks off, does not decode, uses a coding other than gzip /
//! deflate, or is larger — counts as a failed call, like a timeout (logged with the reason when
//! it is not a broken connection): the proxy degrades or buffers as above. Zep's API has no
//! streamed answers, so nothing is streamed here. The key is kept out of egress answers by the
//! proxy ([`ZepClient::redactor`]) and out of error texts here.
//!
//! A missing API key makes the resource unusable: [`ZepClient::admission`] says
//! [`Admission::Unusable`] naming the env var (never its value), the operations return
//! [`ZepError::Unusable`], the proxy answers `424`. The key is never logged, never in a
//! snapshot, error or `Debug` output.
//!
//! # Misconfigured
//!
//! A `401` or `403` answer to any call marks the resource misconfigured ([`super::auth`]):
//! the call that got it is answered like a failure (a read degrades, a write is buffered; a
//! replayed write stays the head instead of being dead-lettered) and from then on nothing
//! goes to Zep but the probe — `GET auth_probe_path` (default
//! [`DEFAULT_AUTH_PROBE_PATH`]) every `auth_probe_every`, sent by the actor through the
//! breaker — until one is accepted. Meanwhile Zep is treated as while its breaker is open:
//! reads answer an empty, degraded context, writes are buffered for replay (so nothing is
//! lost and the backlog reaches Zep once the key is right), other egress calls get `503`
//! with `Retry-After` (the time to the next probe), and the answers the runtime makes carry
//! `x-runtime-degraded: zep misconfigured`. [`ZepClient::admission`] says
//! [`Admission::Misconfigured`]: tasks that `uses` Zep fail permanently, those that
//! `degrades` it run. A `401`/`403` is not a breaker failure (Zep answered): the breaker and
//! the misconfiguration are separate states.

pub mod actor;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::warn;

pub use actor::{ZepActor, ZepArgs, ZepMessage};

use super::auth::{AuthProbe, AuthState, ProbeOutcome, refuses};
use super::breaker::{Breaker, BreakerPolicy, BreakerState, Permit};
use super::decode::{BodyError, Decoded, ask_identity};
use super::redact::Redactor;
use super::{EgressBody, EgressRequest, EgressResponse, MAX_BODY, target_url};
use crate::broker::rfc3339;
use crate::broker::{
    Admin, AnyBroker, BrokerError, Delivery, Envelope, QueueDepth, Recovered, TaskQueue,
};
use crate::gate::Admission;
use crate::shown;

/// How long the replayer's hold on the head entry lasts without renewal; entries held longer
/// by a dead node are recovered by any node's sweep (see [`ZepClient::recover_replay`]).
pub const REPLAY_LEASE: Duration = Duration::from_secs(30);
/// How often the head's lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Characters of an error body kept in errors and dead letters.
const BODY_SNIPPET: usize = 300;
/// Header on the answers the proxy makes itself while Zep is unavailable.
const DEGRADED_HEADER: &str = "x-runtime-degraded";

/// The probe of a misconfigured Zep: the first page of one user (Zep's `/api/v2`), one
/// cheap authenticated read.
pub const DEFAULT_AUTH_PROBE_PATH: &str = "/users-ordered?pageNumber=1&pageSize=1";

/// The broker queue holding `resource`'s buffered writes: `{resource}-replay`.
pub fn replay_queue(resource: &str) -> String {
    format!("{resource}-replay")
}

/// What the client needs, from the node's config.
#[derive(Clone)]
pub struct ZepSettings {
    /// The resource's name (`zep`): logs, snapshots, the gate, the replay queue.
    pub resource: String,
    /// Zep's API root, e.g. `https://api.getzep.com/api/v2`.
    pub base_url: reqwest::Url,
    /// The API key, read from the environment by the node (surrounding whitespace is ignored);
    /// `None` or a blank one makes the resource unusable.
    pub api_key: Option<String>,
    /// The env var the key is read from (`ZEP_API_KEY`), named when it is missing.
    pub api_key_env: String,
    /// Bound of one HTTP call (a half-open probe is bounded by its `probe_timeout` too).
    pub timeout: Duration,
    /// The breaker's policy.
    pub breaker: BreakerPolicy,
    /// The probe sent while Zep refuses the key (module docs).
    pub auth_probe: AuthProbe,
}

impl fmt::Debug for ZepSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZepSettings")
            .field("resource", &self.resource)
            .field("base_url", &shown_url(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("api_key_env", &self.api_key_env)
            .field("timeout", &self.timeout)
            .field("breaker", &self.breaker)
            .field("auth_probe", &self.auth_probe)
            .finish()
    }
}

/// What went wrong with a Zep call. Transient failures never show up here: they degrade
/// (reads) or are buffered (writes).
#[derive(Debug, thiserror::Error)]
pub enum ZepError {
    /// The resource cannot be used at all (its API key is not set): permanent.
    #[error("{resource} cannot be used: {reason}")]
    Unusable {
        /// The resource.
        resource: String,
        /// Why.
        reason: String,
    },
    /// Zep refused the call (4xx): permanent, the request is wrong.
    #[error("{resource} refused {operation}: {status} {detail}")]
    Rejected {
        /// The resource.
        resource: String,
        /// What was asked (`POST /threads/{id}/messages`).
        operation: String,
        /// Zep's status.
        status: StatusCode,
        /// The start of Zep's answer.
        detail: String,
    },
    /// Zep answered 2xx with a body that is not what its API promises.
    #[error("{resource} answered {operation} with an unexpected body: {detail}")]
    Malformed {
        /// The resource.
        resource: String,
        /// What was asked.
        operation: String,
        /// What did not parse.
        detail: String,
    },
    /// A write could not be sent nor buffered (the broker is unreachable too).
    #[error("{resource}: write could not be buffered for replay: {source}")]
    Buffer {
        /// The resource.
        resource: String,
        /// The broker's error.
        source: BrokerError,
    },
    /// The client could not be built.
    #[error("{resource}: {reason}")]
    Setup {
        /// The resource.
        resource: String,
        /// Why.
        reason: String,
    },
}

/// A user, as `POST /users` takes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ZepUser {
    /// Your id for the user.
    pub user_id: String,
    /// Email.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// First name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
    /// Last name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_name: Option<String>,
    /// Anything else.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
}

/// One chat message, as `POST /threads/{id}/messages` takes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ThreadMessage {
    /// `user`, `assistant`, `system`, …
    pub role: String,
    /// The speaker's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The text.
    pub content: String,
}

/// How a write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Write {
    /// Zep accepted it.
    Written,
    /// The user or thread already existed (an ensure that had nothing to do).
    AlreadyExists,
    /// Appended to the replay queue; it reaches Zep once the breaker closes.
    Buffered,
}

/// A thread's memory context.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Context {
    /// The context block (empty when Zep has none, or is unavailable).
    pub context: String,
    /// True when Zep was not asked or did not answer: the empty context is not the truth.
    pub degraded: bool,
}

/// What one replay round did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReplayRound {
    /// Entries Zep accepted (acked).
    pub replayed: u64,
    /// Entries Zep refused with a 4xx (dead-lettered).
    pub dead_lettered: u64,
    /// The backlog was found empty.
    pub drained: bool,
    /// Why the round stopped early (breaker open, Zep failed), if it did.
    pub stopped: Option<String>,
}

/// A request to Zep.
#[derive(Clone, Debug)]
struct Call {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

impl Call {
    fn json(method: Method, path: String, body: &Value) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Self {
            method,
            path,
            headers,
            body: Bytes::from(body.to_string()),
        }
    }

    fn operation(&self) -> String {
        let path = self.path.split('?').next().unwrap_or(&self.path);
        format!("{} {path}", self.method)
    }

    /// `POST /users` and `POST /threads`: creations whose "already exists" means done.
    fn is_ensure(&self) -> bool {
        self.method == Method::POST && matches!(self.path.as_str(), "/users" | "/threads")
    }

    /// The replay envelope's kwargs; `None` when the body is neither JSON nor UTF-8 text.
    fn to_kwargs(&self) -> Option<Map<String, Value>> {
        let content_type = self
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut kwargs = Map::new();
        kwargs.insert("method".into(), json!(self.method.as_str()));
        kwargs.insert("path".into(), json!(self.path));
        kwargs.insert("content_type".into(), json!(content_type));
        if self.body.is_empty() {
        } else if let Ok(value) = serde_json::from_slice::<Value>(&self.body) {
            kwargs.insert("body_json".into(), value);
        } else {
            let text = std::str::from_utf8(&self.body).ok()?;
            kwargs.insert("body_text".into(), json!(text));
        }
        kwargs.insert("buffered_at".into(), json!(rfc3339(SystemTime::now())));
        Some(kwargs)
    }

    fn from_kwargs(kwargs: &Map<String, Value>) -> Result<Self, String> {
        let text = |key: &str| kwargs.get(key).and_then(Value::as_str);
        let method = text("method")
            .ok_or("missing `method`")?
            .parse::<Method>()
            .map_err(|e| format!("bad `method`: {e}"))?;
        let path = text("path").ok_or("missing `path`")?.to_string();
        if !path.starts_with('/') {
            return Err(format!("bad `path`: `{path}` does not start with /"));
        }
        let mut headers = HeaderMap::new();
        if let Some(content_type) = text("content_type") {
            let value = HeaderValue::from_str(content_type)
                .map_err(|e| format!("bad `content_type`: {e}"))?;
            headers.insert(CONTENT_TYPE, value);
        }
        let body = match (kwargs.get("body_json"), text("body_text")) {
            (Some(value), _) => Bytes::from(value.to_string()),
            (None, Some(text)) => Bytes::from(text.to_string()),
            (None, None) => Bytes::new(),
        };
        Ok(Self {
            method,
            path,
            headers,
            body,
        })
    }
}

/// Zep's answer.
#[derive(Debug)]
struct Upstream {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Upstream {
    fn snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        text.chars().take(BODY_SNIPPET).collect()
    }

    /// 409, or a 400 that says the thing already exists (what Zep answers to a second
    /// `POST /users` with the same id).
    fn already_exists(&self) -> bool {
        self.status == StatusCode::CONFLICT
            || (self.status == StatusCode::BAD_REQUEST
                && self
                    .snippet()
                    .to_ascii_lowercase()
                    .contains("already exists"))
    }

    /// Worth trying again later: 5xx, 408, 429.
    fn transient(&self) -> bool {
        self.status.is_server_error()
            || self.status == StatusCode::REQUEST_TIMEOUT
            || self.status == StatusCode::TOO_MANY_REQUESTS
    }
}

/// How a sent call ended.
#[derive(Debug)]
enum Sent {
    /// Zep answered (any status; a 5xx was counted as a breaker failure).
    Answered(Upstream),
    /// No answer: timeout, refused connection, broken body.
    Unreachable(String),
}

/// Where new writes go: straight to Zep, or behind a backlog.
#[derive(Debug)]
struct Drain {
    /// `None` until the backlog has been looked at once.
    backlog: Option<bool>,
    /// Bumped by every buffered write, so a replay round that found the queue empty only
    /// clears the flag when nothing was buffered since it looked.
    seq: u64,
}

/// The entry being replayed, held until Zep accepts or refuses it.
#[derive(Debug, Clone)]
struct Head {
    delivery: Delivery,
    renewed: Instant,
}

#[derive(Debug, Default)]
struct Counters {
    reads: AtomicU64,
    degraded_reads: AtomicU64,
    writes: AtomicU64,
    buffered: AtomicU64,
    forwarded: AtomicU64,
    replayed: AtomicU64,
    replay_dead_lettered: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// The node's Zep client; see the module docs.
pub struct ZepClient {
    resource: String,
    base_url: reqwest::Url,
    api_key: Option<HeaderValue>,
    /// Keeps the key out of error texts and (through the proxy) out of egress answers.
    redactor: Option<Arc<Redactor>>,
    api_key_env: String,
    timeout: Duration,
    http: reqwest::Client,
    breaker: Breaker,
    auth: AuthState,
    broker: Arc<AnyBroker>,
    queue: String,
    consumer: String,
    drain: Mutex<Drain>,
    head: Mutex<Option<Head>>,
    /// One replay round at a time (held across its awaits).
    replaying: tokio::sync::Mutex<()>,
    counters: Counters,
    last_replay_error: Mutex<Option<String>>,
}

impl fmt::Debug for ZepClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZepClient")
            .field("resource", &self.resource)
            .field("base_url", &shown_url(&self.base_url))
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("breaker", &self.breaker)
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

/// The URL without credentials or query, for logs and snapshots.
fn shown_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.to_string()
}

/// Percent-encodes one path segment (everything but RFC 3986 unreserved characters).
fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Headers never passed back from upstream (hop-by-hop, or recomputed by the server).
const DROPPED_RESPONSE_HEADERS: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

impl ZepClient {
    /// A client for `settings`, buffering writes through `broker`; `node` names this node's
    /// replayer (its consumer name on the replay queue).
    pub fn new(
        settings: ZepSettings,
        broker: Arc<AnyBroker>,
        node: &str,
    ) -> Result<Self, ZepError> {
        let setup = |reason: String| ZepError::Setup {
            resource: settings.resource.clone(),
            reason,
        };
        // Trimmed, as the OpenAI client does: a key read from a file often ends in a newline,
        // and the redactor must look for the key as it is sent.
        let key = settings
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|key| !key.is_empty());
        let api_key = match key {
            None => None,
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Api-Key {key}")).map_err(|_| {
                    setup(format!(
                        "{} holds characters that cannot be sent in a header",
                        settings.api_key_env
                    ))
                })?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            // A redirect could leave the configured host with the key: never follow one.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| setup(format!("HTTP client: {e}")))?;
        let breaker = Breaker::new(&settings.resource, settings.breaker);
        let auth = AuthState::new(
            &settings.resource,
            &settings.api_key_env,
            settings.auth_probe,
        );
        let redactor = key.and_then(Redactor::new).map(Arc::new);
        Ok(Self {
            redactor,
            queue: replay_queue(&settings.resource),
            consumer: format!("{node}-{}-replay", settings.resource),
            resource: settings.resource,
            base_url: settings.base_url,
            api_key,
            api_key_env: settings.api_key_env,
            timeout: settings.timeout,
            http,
            breaker,
            auth,
            broker,
            drain: Mutex::new(Drain {
                backlog: None,
                seq: 0,
            }),
            head: Mutex::new(None),
            replaying: tokio::sync::Mutex::new(()),
            counters: Counters::default(),
            last_replay_error: Mutex::new(None),
        })
    }

    /// The resource's name.
    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// What keeps the key out of egress answers (`None` without a key).
    pub fn redactor(&self) -> Option<Arc<Redactor>> {
        self.redactor.clone()
    }

    /// `text` with the key replaced.
    fn scrub(&self, text: &str) -> String {
        match &self.redactor {
            Some(redactor) => redactor.redact_text(text),
            None => text.to_string(),
        }
    }

    /// The breaker (shared: clones see the same state).
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Whether Zep accepts the key (shared: clones see the same state).
    pub fn auth(&self) -> &AuthState {
        &self.auth
    }

    /// The replay queue's name.
    pub fn replay_queue(&self) -> &str {
        &self.queue
    }

    /// Why the resource cannot be used, if it cannot.
    pub fn unusable(&self) -> Option<String> {
        self.api_key
            .is_none()
            .then(|| format!("{} is not set", self.api_key_env))
    }

    /// The gate's answer for this resource: unusable without a key, misconfigured while Zep
    /// refuses the key, closed until the next probe while the breaker refuses calls, open
    /// otherwise.
    pub fn admission(&self) -> Admission {
        if let Some(reason) = self.unusable() {
            return Admission::Unusable {
                resource: self.resource.clone(),
                reason,
            };
        }
        if let Some(refusal) = self.auth.refused() {
            return Admission::Misconfigured {
                resource: self.resource.clone(),
                reason: refusal.reason,
            };
        }
        match self.breaker.next_probe_at() {
            None => Admission::Open,
            Some(until) => Admission::ClosedUntil {
                resource: self.resource.clone(),
                until,
            },
        }
    }

    fn check_usable(&self) -> Result<(), ZepError> {
        match self.unusable() {
            None => Ok(()),
            Some(reason) => Err(ZepError::Unusable {
                resource: self.resource.clone(),
                reason,
            }),
        }
    }

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

    fn rejected(&self, operation: String, upstream: &Upstream) -> ZepError {
        ZepError::Rejected {
            resource: self.resource.clone(),
            operation,
            status: upstream.status,
            detail: self.scrub(&upstream.snippet()),
        }
    }

    async fn typed_write(&self, call: Call) -> Result<Write, ZepError> {
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
    async fn read(&self, call: Call) -> Option<Upstream> {
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
    async fn write(&self, call: Call) -> Result<Option<Upstream>, ZepError> {
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

    /// Whether writes must queue behind a backlog. Looked up in the broker once (a backlog
    /// left by a previous run); after that the flag follows buffering and replay.
    async fn has_backlog(&self) -> bool {
        let (known, seq) = {
            let drain = self.drain();
            (drain.backlog, drain.seq)
        };
        if let Some(backlog) = known {
            return backlog;
        }
        let backlog = match self.broker.depth(&self.queue).await {
            Ok(depth) => depth.ready + depth.delayed + depth.in_flight > 0,
            // Cannot tell (the broker is unreachable, so no replay can run either): send
            // the write rather than fail it, and look again next time.
            Err(_) => return false,
        };
        let mut drain = self.drain();
        if drain.seq == seq && drain.backlog.is_none() {
            drain.backlog = Some(backlog);
        }
        drain.backlog.unwrap_or(true)
    }

    fn drain(&self) -> MutexGuard<'_, Drain> {
        self.drain.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn head(&self) -> MutexGuard<'_, Option<Head>> {
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `call` to the replay queue.
    async fn buffer(&self, call: &Call) -> Result<(), ZepError> {
        let Some(kwargs) = call.to_kwargs() else {
            return Err(ZepError::Buffer {
                resource: self.resource.clone(),
                source: BrokerError::Invalid("a body that is neither JSON nor text".into()),
            });
        };
        {
            let mut drain = self.drain();
            drain.backlog = Some(true);
            drain.seq += 1;
        }
        let mut envelope = Envelope::new(format!("{}.replay", self.resource), &self.queue);
        envelope.kwargs = kwargs;
        self.broker
            .enqueue(vec![envelope])
            .await
            .map_err(|source| ZepError::Buffer {
                resource: self.resource.clone(),
                source,
            })?;
        bump(&self.counters.buffered);
        Ok(())
    }

    /// [`send_raw`](Self::send_raw), and a `401`/`403` answer marks Zep misconfigured.
    async fn send(&self, call: &Call, permit: Permit) -> Sent {
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
    async fn send_raw(&self, call: &Call, permit: Permit) -> Sent {
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

    /// The egress proxy's call (see the module docs).
    pub async fn forward(&self, request: EgressRequest) -> EgressResponse {
        bump(&self.counters.forwarded);
        if let Some(reason) = self.unusable() {
            return EgressResponse::json(
                StatusCode::FAILED_DEPENDENCY,
                &json!({ "error": reason, "resource": self.resource }),
            );
        }
        let call = Call {
            method: request.method,
            path: request.path_and_query,
            headers: request.headers,
            body: request.body,
        };
        let search = call
            .path
            .split('?')
            .next()
            .is_some_and(|path| path.ends_with("/search"));
        match call.method {
            Method::GET | Method::HEAD => match self.read(call).await {
                Some(upstream) => passthrough(upstream),
                None => self.degraded(json!({ "context": "", "degraded": true }), StatusCode::OK),
            },
            Method::POST | Method::PUT | Method::PATCH if !search => match self.write(call).await {
                Ok(Some(upstream)) => passthrough(upstream),
                Ok(None) => self.degraded(
                    json!({ "buffered": true, "queue": self.queue }),
                    StatusCode::ACCEPTED,
                ),
                Err(err) => EgressResponse::unavailable(Duration::from_secs(1), &err.to_string()),
            },
            _ if self.auth.refused().is_some() => self.misconfigured(),
            _ => match self.breaker.try_acquire() {
                Err(rejected) => EgressResponse::unavailable(
                    rejected.retry_after,
                    &format!("{} circuit breaker is open", self.resource),
                ),
                Ok(permit) => match self.send(&call, permit).await {
                    Sent::Answered(upstream) => passthrough(upstream),
                    Sent::Unreachable(why) => EgressResponse::unavailable(
                        Duration::from_secs(1),
                        &format!("{}: {why}", self.resource),
                    ),
                },
            },
        }
    }

    /// `503` naming the refusal, with `Retry-After` until the next probe (no call to Zep).
    fn misconfigured(&self) -> EgressResponse {
        let reason = self.auth.refused().map_or_else(
            || format!("{} is misconfigured", self.resource),
            |refusal| self.auth.describe(&refusal),
        );
        let retry_after = self.auth.until_probe().unwrap_or_default();
        EgressResponse::unavailable(retry_after, &reason)
    }

    /// An answer the runtime makes itself while Zep is unavailable (or misconfigured).
    fn degraded(&self, body: Value, status: StatusCode) -> EgressResponse {
        let mut response = EgressResponse::json(status, &body);
        let why = match self.auth.refused() {
            Some(_) => "misconfigured",
            None => "unavailable",
        };
        if let Ok(value) = HeaderValue::from_str(&format!("{} {why}", self.resource)) {
            response
                .headers
                .insert(HeaderName::from_static(DEGRADED_HEADER), value);
        }
        response
    }

    /// Replays up to `max` buffered writes in order (see the module docs). Also renews the
    /// head's lease when due, even while the breaker is open. One round at a time.
    pub async fn replay(&self, max: usize) -> Result<ReplayRound, BrokerError> {
        let _single = self.replaying.lock().await;
        let result = self.replay_round(max).await;
        *self
            .last_replay_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = result.as_ref().err().map(ToString::to_string);
        result
    }

    async fn replay_round(&self, max: usize) -> Result<ReplayRound, BrokerError> {
        let mut round = ReplayRound::default();
        self.renew_head().await?;
        if self.api_key.is_none() {
            round.stopped = self.unusable();
            return Ok(round);
        }
        while ((round.replayed + round.dead_lettered) as usize) < max {
            if let Some(refusal) = self.auth.refused() {
                round.stopped = Some(self.auth.describe(&refusal));
                break;
            }
            if self.breaker.state() == BreakerState::Open {
                round.stopped = Some(format!("{} circuit breaker is open", self.resource));
                break;
            }
            let seq = self.drain().seq;
            let Some(delivery) = self.head_or_reserve().await? else {
                let mut drain = self.drain();
                if drain.seq == seq {
                    drain.backlog = Some(false);
                }
                round.drained = true;
                break;
            };
            let call = match Call::from_kwargs(&delivery.envelope.kwargs) {
                Ok(call) => call,
                Err(why) => {
                    self.bury(&delivery, &format!("not a replayable write: {why}"))
                        .await?;
                    round.dead_lettered += 1;
                    continue;
                }
            };
            let Ok(permit) = self.breaker.try_acquire() else {
                round.stopped = Some(format!(
                    "{} circuit breaker is not admitting calls",
                    self.resource
                ));
                break;
            };
            match self.send(&call, permit).await {
                Sent::Answered(upstream)
                    if upstream.status.is_success()
                        || (call.is_ensure() && upstream.already_exists()) =>
                {
                    let result = json!({ "status": upstream.status.as_u16() });
                    self.broker.ack(&delivery, result).await?;
                    self.head().take();
                    bump(&self.counters.replayed);
                    round.replayed += 1;
                }
                Sent::Answered(upstream) if upstream.transient() || refuses(upstream.status) => {
                    // A refused key is the node's fault, not the write's: it stays the head.
                    round.stopped = Some(format!("{} answered {}", self.resource, upstream.status));
                    break;
                }
                Sent::Answered(upstream) => {
                    let reason = format!(
                        "{} refused {}: {} {}",
                        self.resource,
                        call.operation(),
                        upstream.status,
                        self.scrub(&upstream.snippet())
                    );
                    warn!(resource = %self.resource, entry = %delivery.entry, %reason,
                        "replayed write refused; dead-lettered");
                    self.bury(&delivery, &reason).await?;
                    round.dead_lettered += 1;
                }
                Sent::Unreachable(why) => {
                    round.stopped = Some(format!("{}: {why}", self.resource));
                    break;
                }
            }
        }
        Ok(round)
    }

    async fn bury(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        self.broker.dead_letter(delivery, reason).await?;
        self.head().take();
        bump(&self.counters.replay_dead_lettered);
        Ok(())
    }

    /// The held head, or the next entry reserved (and held) from the queue.
    async fn head_or_reserve(&self) -> Result<Option<Delivery>, BrokerError> {
        if let Some(head) = self.head().as_ref() {
            return Ok(Some(head.delivery.clone()));
        }
        let got = self
            .broker
            .reserve(&self.queue, &self.consumer, 1, Duration::ZERO)
            .await?;
        let Some(delivery) = got.into_iter().next() else {
            return Ok(None);
        };
        *self.head() = Some(Head {
            delivery: delivery.clone(),
            renewed: Instant::now(),
        });
        Ok(Some(delivery))
    }

    /// Renews the head's lease when due; forgets it when another node took it over.
    async fn renew_head(&self) -> Result<(), BrokerError> {
        let due = self
            .head()
            .as_ref()
            .filter(|head| head.renewed.elapsed() >= RENEW_EVERY)
            .map(|head| head.delivery.entry.clone());
        let Some(entry) = due else {
            return Ok(());
        };
        let lost = self
            .broker
            .renew(&self.queue, &self.consumer, std::slice::from_ref(&entry))
            .await?;
        let mut head = self.head();
        if head.as_ref().is_some_and(|h| h.delivery.entry == entry) {
            if lost.is_empty() {
                if let Some(h) = head.as_mut() {
                    h.renewed = Instant::now();
                }
            } else {
                warn!(resource = %self.resource, %entry,
                    "replay head was recovered by another node; it may be replayed twice");
                *head = None;
            }
        }
        Ok(())
    }

    /// Sends the probe of a misconfigured Zep when it is due (module docs): through the
    /// breaker, with the key, answered by [`ProbeOutcome::of`]. Nothing happens while Zep
    /// accepts the key or before the probe time; run by the actor.
    pub async fn probe(&self) {
        if !self.auth.probe_due() || self.api_key.is_none() {
            return;
        }
        let outcome = match self.breaker.try_acquire() {
            Err(_) => {
                ProbeOutcome::Inconclusive(format!("{} circuit breaker is open", self.resource))
            }
            Ok(permit) => {
                let call = Call {
                    method: Method::GET,
                    path: self.auth.probe().path().to_string(),
                    headers: HeaderMap::new(),
                    body: Bytes::new(),
                };
                match self.send_raw(&call, permit).await {
                    Sent::Answered(upstream) => ProbeOutcome::of(upstream.status),
                    Sent::Unreachable(why) => ProbeOutcome::Inconclusive(why),
                }
            }
        };
        self.auth.probed(outcome);
    }

    /// Returns entries held longer than [`REPLAY_LEASE`] by a replayer that died.
    pub async fn recover_replay(&self) -> Result<Recovered, BrokerError> {
        self.broker.recover(&self.queue, REPLAY_LEASE).await
    }

    /// The replay queue's depth.
    pub async fn backlog(&self) -> Result<QueueDepth, BrokerError> {
        self.broker.depth(&self.queue).await
    }

    /// What the actor publishes (the key never appears).
    pub fn snapshot(&self) -> Value {
        let c = &self.counters;
        let backlog_known = self.drain().backlog;
        let head = self.head().as_ref().map(|h| h.delivery.entry.clone());
        let last_replay_error = self
            .last_replay_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        json!({
            "resource": self.resource,
            "base_url": shown_url(&self.base_url),
            "api_key": { "env": self.api_key_env, "set": self.api_key.is_some() },
            "timeout_ms": self.timeout.as_millis() as u64,
            "breaker": self.breaker.snapshot(),
            "auth": self.auth.snapshot(),
            "replay": {
                "queue": self.queue,
                "writes_queue_behind_backlog": backlog_known,
                "head": head,
                "buffered": read(&c.buffered),
                "replayed": read(&c.replayed),
                "dead_lettered": read(&c.replay_dead_lettered),
                "last_error": last_replay_error,
            },
            "calls": {
                "reads": read(&c.reads),
                "degraded_reads": read(&c.degraded_reads),
                "writes": read(&c.writes),
                "forwarded": read(&c.forwarded),
            },
        })
    }
}

fn passthrough(upstream: Upstream) -> EgressResponse {
    let mut headers = upstream.headers;
    for name in DROPPED_RESPONSE_HEADERS {
        headers.remove(name);
    }
    EgressResponse {
        status: upstream.status,
        headers,
        body: EgressBody::Full(upstream.body),
    }
}
