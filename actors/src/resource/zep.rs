//! The Zep Cloud client (docs/resources.md) and its actor ([`actor::ZepActor`]).
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
mod api;
mod egress;
mod replay;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value, json};

pub use actor::{ZepActor, ZepArgs, ZepMessage};
use api::{Call, Sent};
use replay::{Drain, Head};

use super::auth::{AuthProbe, AuthState, ProbeOutcome};
use super::breaker::{Breaker, BreakerPolicy};
use super::redact::Redactor;
use crate::broker::{AnyBroker, BrokerError};
use crate::gate::Admission;

/// How long the replayer's hold on the head entry lasts without renewal; entries held longer
/// by a dead node are recovered by any node's sweep (see [`ZepClient::recover_replay`]).
pub const REPLAY_LEASE: Duration = Duration::from_secs(30);
/// How often the head's lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(10);
/// Characters of an error body kept in errors and dead letters.
const BODY_SNIPPET: usize = 300;
/// Header on the answers the proxy makes itself while Zep is unavailable.
const DEGRADED_HEADER: &str = "x-runtime-degraded";

/// Zep Cloud's API root: `base_url` when the config sets none.
pub const DEFAULT_BASE_URL: &str = "https://api.getzep.com/api/v2";
/// Time allowed for one call to Zep when the config sets no `timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

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
    /// Zep's API root ([`DEFAULT_BASE_URL`] for Zep Cloud).
    pub base_url: reqwest::Url,
    /// The API key, read from the environment by the node (surrounding whitespace is ignored);
    /// `None` or a blank one makes the resource unusable.
    pub api_key: Option<String>,
    /// The env var the key is read from (`ZEP_API_KEY`), named when it is missing.
    pub api_key_env: String,
    /// Bound of one HTTP call (a half-open probe is bounded by its `probe_timeout` too).
    pub timeout: Duration,
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
    Unusable { resource: String, reason: String },
    /// Zep refused the call (4xx): permanent, the request is wrong.
    #[error("{resource} refused {operation}: {status} {detail}")]
    Rejected {
        resource: String,
        /// What was asked (`POST /threads/{id}/messages`).
        operation: String,
        status: StatusCode,
        /// The start of Zep's answer.
        detail: String,
    },
    /// Zep answered 2xx with a body that is not what its API promises.
    #[error("{resource} answered {operation} with an unexpected body: {detail}")]
    Malformed {
        resource: String,
        /// What was asked.
        operation: String,
        /// What did not parse.
        detail: String,
    },
    /// A write could not be sent nor buffered (the broker is unreachable too).
    #[error("{resource}: write could not be buffered for replay: {source}")]
    Buffer {
        resource: String,
        source: BrokerError,
    },
    /// The client could not be built.
    #[error("{resource}: {reason}")]
    Setup { resource: String, reason: String },
}

/// A user, as `POST /users` takes it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ZepUser {
    /// Your id for the user.
    pub user_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_name: Option<String>,
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
