//! OpenAI (`kind = "openai"`, docs/resources.md): [`OpenAiClient`], the node's one way to the
//! OpenAI API — requests/min and tokens/min limiters, a concurrency cap, the key injected —
//! and [`OpenAiActor`], which keeps its snapshot in the tree.
//!
//! The client is made by the node (outside the actor) and shared through an `Arc` by native
//! tasks ([`OpenAiClient::call`]), the egress proxy ([`OpenAiClient::forward`]), the resource
//! gate ([`OpenAiClient::admission`]) and the actor. The limiters live in the client, so a
//! restarted actor forgets nothing.
//!
//! # A call
//!
//! 1. a concurrency permit (when `concurrency` is set), then — in FIFO order, one caller at a
//!    time — the server's hold (below), one request cell and the estimated tokens: one per
//!    four characters of the prompt fields (`messages`, `input`, `prompt`, `instructions`)
//!    plus `max_tokens` / `max_completion_tokens` / `max_output_tokens`, clamped to the tokens
//!    burst (`openai/estimate.rs` has the details).
//!    Rate limits make calls *wait*; they never defer or fail a task. Waiting calls are counted
//!    in the snapshot (`calls.waiting`);
//! 2. the request, with `Authorization: Bearer <key>` (the caller's own `Authorization` is
//!    replaced);
//! 3. the correction from the response: governor cannot refund cells, so the client does not
//!    try to re-balance its limiters; it records the server's `x-ratelimit-*` view for the
//!    snapshot and, when the server reports a limit exhausted (`remaining` 0), **holds every
//!    further call until that limit's reset**. A 429 that is not `insufficient_quota` holds
//!    further calls for its `retry-after-ms` / `retry-after` the same way.
//!
//! # Outcomes
//!
//! | answer | [`call`](OpenAiClient::call) (native tasks) | [`forward`](OpenAiClient::forward) (egress) |
//! |---|---|---|
//! | 2xx | `Ok(json)` | passed through |
//! | 429 `insufficient_quota` (`error.code` or `error.type`) | `Permanent` — no retry helps | passed through |
//! | other 429, 408, 5xx | `Retry { after }` from `retry-after-ms` / `retry-after` | passed through with its headers, so the caller backs off |
//! | other 4xx | `Permanent` | passed through |
//! | cannot connect, timeout | `Retry { after: None }` | `502` / `504`, OpenAI-shaped error body |
//! | a body that breaks off or does not decode | `Retry { after: None }` | `502`, OpenAI-shaped error body |
//! | a `Content-Encoding` other than gzip / deflate | `Permanent` | `502` naming it, OpenAI-shaped (`upstream_unreadable`) |
//! | an answer over 4 MiB decoded | `Permanent` | streamed (below) |
//! | no API key | `Permanent("<ENV> is not set")` | `401`, OpenAI-shaped error body |
//! | misconfigured (an earlier `401`/`403`) | `Permanent("openai is misconfigured: …")`, no call | that status, OpenAI-shaped error body (code `resource_misconfigured`), no call |
//!
//! `call` does not retry by itself: the task's retry policy decides (and delays the retry in
//! Redis, not in a sleeping actor).
//!
//! # Streamed answers
//!
//! Every request asks for `Accept-Encoding: identity`; whatever encoding comes back anyway is
//! decoded ([`super::decode`]). [`forward`](OpenAiClient::forward) passes an event stream
//! (`stream: true` completions) on as it arrives, and any other answer whole up to 4 MiB
//! decoded, streamed beyond that ([`EgressBody::read`]). A streamed call is judged by its
//! status and headers, when they arrive: that is when it counts as succeeded or failed and when
//! the `x-ratelimit-*` correction is taken (a stream's `usage` is not read: `tokens_used`
//! counts the answers read whole). It keeps its concurrency permit and its place in
//! `in_flight` until the stream has been read to its end or the caller went away.
//!
//! **A missing key answers `401`, not `503`**: OpenAI's SDKs retry 408/409/429/5xx on their
//! own, so a 503 would make a Python task spin through its SDK retries and then look
//! retryable to its task policy; a 401 raises `AuthenticationError` at once, which is what the
//! missing key is — a permanent failure for every task that needs the key.
//!
//! # Misconfigured
//!
//! The first `401` or `403` answer (a wrong key, a revoked one, a base URL of another
//! service) marks the resource misconfigured ([`super::auth`]): from then on no call goes to
//! OpenAI — `call` fails permanently and the proxy answers the refused status itself, for the
//! same reason as the missing key — except the probe the actor sends every
//! `auth_probe_every`: `GET auth_probe_path` (default [`DEFAULT_AUTH_PROBE_PATH`], the model
//! list: cheap, authenticated, no tokens), with the key, outside the limiters, bounded by the
//! client's `timeout` or [`PROBE_TIMEOUT`]. Once one is accepted, calls resume.
//!
//! The key never appears in `Debug` output, logs, snapshots or errors (error texts taken from
//! a response body have it scrubbed).

mod actor;
mod estimate;
mod headers;
mod limiter;

pub use actor::{OpenAiActor, OpenAiArgs, OpenAiMessage, OpenAiState};
pub use limiter::Limit;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tracing::warn;

use self::estimate::{estimate_raw, estimate_tokens};
use self::headers::{RateHeaders, is_insufficient_quota, retry_after};
use self::limiter::RateGate;
use super::auth::{AuthProbe, AuthState, DEFAULT_PROBE_EVERY, ProbeOutcome, refuses};
use super::decode::{BodyError, Decoded, ask_identity};
use super::redact::Redactor;
use super::{EgressBody, EgressRequest, EgressResponse, MAX_BODY, target_url};
use crate::broker::rfc3339;
use crate::gate::Admission;
use crate::handler::http::{request_class, status_class};
use crate::handler::{ErrorClass, TaskError};
use crate::shown;

/// OpenAI's API root, the default base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// The probe of a misconfigured OpenAI resource: the model list.
pub const DEFAULT_AUTH_PROBE_PATH: &str = "/models";

/// Bound of a probe when the client has no `timeout`.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Characters of an error message kept in a task error.
const MESSAGE_SNIPPET: usize = 300;

/// Why a client cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenAiError {
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// How to build an [`OpenAiClient`] (`[resources.NAME]` with `kind = "openai"`, compiled).
#[derive(Clone)]
pub struct OpenAiSettings {
    /// API root; [`DEFAULT_BASE_URL`] unless a proxy or a test server is used.
    pub base_url: Url,
    /// The API key, read from the environment variable `api_key_env`; `None` (or blank) when
    /// it is not set — the client is then [`Admission::Unusable`].
    pub api_key: Option<String>,
    /// The name of that environment variable (`OPENAI_API_KEY`), used in every message about
    /// a missing key.
    pub api_key_env: String,
    /// Requests per minute (and burst); `None`: not limited.
    pub requests: Option<Limit>,
    /// Estimated tokens per minute (and burst); `None`: not limited.
    pub tokens: Option<Limit>,
    /// Calls in flight at once; `None`: not capped.
    pub concurrency: Option<usize>,
    /// Timeout of one request; `None`: bounded only by the task's time limit.
    pub timeout: Option<Duration>,
    /// The probe sent while the key is refused (module docs).
    pub auth_probe: AuthProbe,
}

impl fmt::Debug for OpenAiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiSettings")
            .field("base_url", &self.base_url.as_str())
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("api_key_env", &self.api_key_env)
            .field("requests", &self.requests)
            .field("tokens", &self.tokens)
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .field("auth_probe", &self.auth_probe)
            .finish()
    }
}

impl OpenAiSettings {
    /// Settings for the key read from `api_key_env`: the default base URL, no limits.
    pub fn new(api_key_env: &str, api_key: Option<String>) -> Self {
        Self {
            base_url: Url::parse(DEFAULT_BASE_URL).expect("the default base URL parses"),
            api_key,
            api_key_env: api_key_env.to_string(),
            requests: None,
            tokens: None,
            concurrency: None,
            timeout: None,
            auth_probe: AuthProbe::try_new(DEFAULT_AUTH_PROBE_PATH, DEFAULT_PROBE_EVERY)
                .expect("the default probe is valid"),
        }
    }
}

/// Counters of the client (monotonic except the two gauges).
#[derive(Debug, Default)]
struct Stats {
    waiting: AtomicU64,
    in_flight: AtomicU64,
    started: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    rate_limited: AtomicU64,
    insufficient_quota: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    holds: AtomicU64,
    tokens_estimated: AtomicU64,
    tokens_used: AtomicU64,
}

/// The server's last word on its limits.
#[derive(Debug, Default, Clone)]
struct ServerView {
    headers: RateHeaders,
    at: Option<SystemTime>,
}

/// A gauge of [`Stats`] held up while a guard lives (dropped futures decrement it too).
struct Gauge {
    stats: Arc<Stats>,
    counter: fn(&Stats) -> &AtomicU64,
}

impl Gauge {
    fn enter(stats: &Arc<Stats>, counter: fn(&Stats) -> &AtomicU64) -> Self {
        counter(stats).fetch_add(1, Ordering::Relaxed);
        Self {
            stats: Arc::clone(stats),
            counter,
        }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        (self.counter)(&self.stats).fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a call holds while it runs — its concurrency permit and its place in `in_flight` — for
/// as long as its answer is being read (a streamed one too).
struct Admitted {
    _permit: Option<OwnedSemaphorePermit>,
    _in_flight: Gauge,
}

/// The node's OpenAI client (module docs). Shared through an `Arc`.
pub struct OpenAiClient {
    resource: String,
    base_url: Url,
    /// `Bearer <key>`, marked sensitive.
    authorization: Option<HeaderValue>,
    /// Keeps the key out of error texts and (through the proxy) out of egress answers.
    redactor: Option<Arc<Redactor>>,
    api_key_env: String,
    http: reqwest::Client,
    timeout: Option<Duration>,
    requests: Option<RateGate>,
    tokens: Option<RateGate>,
    concurrency: Option<(Arc<Semaphore>, usize)>,
    /// Callers waiting for the limiters, in FIFO order.
    queue: tokio::sync::Mutex<()>,
    /// No call starts before this (the server said its limit is exhausted, or a 429).
    hold_until: Mutex<Option<Instant>>,
    stats: Arc<Stats>,
    /// How long admitted calls waited in `admit` (seconds), for `/metrics`.
    waits: prometheus_client::metrics::histogram::Histogram,
    server: Mutex<ServerView>,
    auth: AuthState,
}

impl fmt::Debug for OpenAiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiClient")
            .field("resource", &self.resource)
            .field("base_url", &self.base_url.as_str())
            .field("api_key_set", &self.authorization.is_some())
            .field("api_key_env", &self.api_key_env)
            .finish_non_exhaustive()
    }
}

impl OpenAiClient {
    /// The client of resource `resource` (its name in the config, e.g. `openai`), sending
    /// through `http`. Fails when a setting is invalid: a base URL that is not http(s), an
    /// empty `api_key_env`, a key that cannot be a header value, a concurrency of 0.
    ///
    /// The limiters start full, on tokio's clock (so tests may pause time).
    pub fn try_new(
        resource: &str,
        settings: OpenAiSettings,
        http: reqwest::Client,
    ) -> Result<Self, OpenAiError> {
        let invalid = |what: String| {
            Err(OpenAiError::Invalid(format!(
                "resources.{resource}: {what}"
            )))
        };
        if !matches!(settings.base_url.scheme(), "http" | "https")
            || settings.base_url.cannot_be_a_base()
        {
            return invalid(format!(
                "base_url must be an http(s) URL, got {}",
                settings.base_url
            ));
        }
        if settings.api_key_env.trim().is_empty() {
            return invalid("api_key_env must name an environment variable".into());
        }
        if settings.concurrency == Some(0) {
            return invalid("concurrency must be at least 1".into());
        }
        let key = settings
            .api_key
            .map(|key| key.trim().to_string())
            .filter(|key| !key.is_empty());
        let authorization = match &key {
            None => None,
            Some(key) => match HeaderValue::from_str(&format!("Bearer {key}")) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    Some(value)
                }
                Err(_) => {
                    return invalid(format!(
                        "the key in {} is not a valid header value",
                        settings.api_key_env
                    ));
                }
            },
        };
        let auth = AuthState::new(resource, &settings.api_key_env, settings.auth_probe);
        Ok(Self {
            auth,
            resource: resource.to_string(),
            base_url: settings.base_url,
            authorization,
            redactor: key.as_deref().and_then(Redactor::new).map(Arc::new),
            api_key_env: settings.api_key_env,
            http,
            timeout: settings.timeout,
            requests: settings.requests.map(RateGate::new),
            tokens: settings.tokens.map(RateGate::new),
            concurrency: settings
                .concurrency
                .map(|n| (Arc::new(Semaphore::new(n)), n)),
            queue: tokio::sync::Mutex::new(()),
            hold_until: Mutex::new(None),
            stats: Arc::default(),
            waits: crate::metrics::seconds_histogram(),
            server: Mutex::new(ServerView::default()),
        })
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    /// What keeps the key out of egress answers (`None` without a key).
    pub fn redactor(&self) -> Option<Arc<Redactor>> {
        self.redactor.clone()
    }

    /// `Unusable` (reason `"<ENV> is not set"`) without a key, `Misconfigured` while the key
    /// is refused, else `Open`: rate limits make calls wait, they do not defer tasks.
    pub fn admission(&self) -> Admission {
        if self.authorization.is_none() {
            return Admission::Unusable {
                resource: self.resource.clone(),
                reason: self.missing_key(),
            };
        }
        match self.auth.refused() {
            Some(refusal) => Admission::Misconfigured {
                resource: self.resource.clone(),
                reason: refusal.reason,
            },
            None => Admission::Open,
        }
    }

    /// Whether OpenAI accepts the key (shared: every holder of the client sees the same).
    pub fn auth(&self) -> &AuthState {
        &self.auth
    }

    /// Sends the probe of a misconfigured resource when it is due (module docs); nothing
    /// happens while the key is accepted or before the probe time. Run by the actor.
    pub async fn probe(&self) {
        let Some(authorization) = self.authorization.clone() else {
            return;
        };
        if !self.auth.probe_due() {
            return;
        }
        let target = target_url(&self.base_url, self.auth.probe().path());
        let request = self
            .http
            .get(&target)
            .header(AUTHORIZATION, authorization)
            .timeout(self.timeout.unwrap_or(PROBE_TIMEOUT));
        let outcome = match request.send().await {
            Ok(response) => ProbeOutcome::of(response.status()),
            Err(err) => ProbeOutcome::Inconclusive(shown::no_answer(&err, &target)),
        };
        self.auth.probed(outcome);
    }

    /// Calls `method path` (relative to the base URL, e.g. `/chat/completions`) with `body`
    /// as JSON (`Null`: no body) for a native task. Errors are typed for the task's retry
    /// policy (module docs); there are no retries in here.
    pub async fn call(&self, method: Method, path: &str, body: Value) -> Result<Value, TaskError> {
        let Some(authorization) = self.authorization.clone() else {
            return Err(TaskError::Permanent(self.missing_key()));
        };
        if let Some(refusal) = self.auth.refused() {
            return Err(TaskError::Permanent(self.auth.describe(&refusal)));
        }
        let _admitted = self.admit(estimate_tokens(&body)).await;
        let mut headers = HeaderMap::new();
        ask_identity(&mut headers);
        headers.insert(AUTHORIZATION, authorization);
        let target = target_url(&self.base_url, path);
        let mut request = self.http.request(method.clone(), &target).headers(headers);
        if !body.is_null() {
            request = request.json(&body);
        }
        if let Some(timeout) = self.timeout {
            request = request.timeout(timeout);
        }
        let fail = |err: reqwest::Error| {
            self.stats.transport_errors.fetch_add(1, Ordering::Relaxed);
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            TaskError::retry_as(
                request_class(&err),
                format!(
                    "OpenAI {method} {path}: {}",
                    shown::no_answer(&err, &target)
                ),
            )
        };
        let response = request.send().await.map_err(fail)?;
        let status = response.status();
        let mut headers = response.headers().clone();
        let read = match Decoded::new(response, &mut headers) {
            Ok(body) => body.whole(MAX_BODY).await,
            Err(err) => Err(err),
        };
        let bytes = match read {
            Ok(bytes) => bytes,
            Err(err) => {
                self.observe_limits(&headers);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                let reason = self.scrub(&format!("OpenAI {method} {path}: {err}"));
                return Err(match err {
                    BodyError::Broken(_) | BodyError::Corrupt(_) => {
                        self.stats.transport_errors.fetch_add(1, Ordering::Relaxed);
                        TaskError::retry_as(ErrorClass::Transport, reason)
                    }
                    BodyError::Unsupported(_) | BodyError::TooLarge(_) => {
                        TaskError::Permanent(reason)
                    }
                });
            }
        };
        let json = serde_json::from_slice::<Value>(&bytes).ok();
        self.observe(status, &headers, json.as_ref());
        if refuses(status) {
            self.auth.refuse(status, &format!("{method} {path}"));
        }
        if status.is_success() {
            return Ok(json.unwrap_or_else(|| Value::String(lossy(&bytes))));
        }
        let message = json
            .as_ref()
            .and_then(|body| body["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| lossy(&bytes));
        let message: String = self.scrub(&message).chars().take(MESSAGE_SNIPPET).collect();
        let reason = format!("OpenAI {method} {path}: HTTP {status}: {message}");
        Err(match Verdict::of(status, json.as_ref()) {
            Verdict::Retry => TaskError::Retry {
                reason,
                after: retry_after(&headers),
                class: status_class(status),
            },
            Verdict::Quota | Verdict::Permanent => TaskError::Permanent(reason),
            Verdict::Success => unreachable!("success returned above"),
        })
    }

    /// Forwards an egress request (already checked by the proxy) with the key injected and
    /// the limiters applied; the upstream's status, headers (minus hop-by-hop) and body are
    /// passed through — a 429 with its `retry-after` included, so the caller backs off.
    pub async fn forward(&self, request: EgressRequest) -> EgressResponse {
        let Some(authorization) = self.authorization.clone() else {
            return runtime_error(
                StatusCode::UNAUTHORIZED,
                &self.missing_key(),
                "api_key_missing",
            );
        };
        if let Some(refusal) = self.auth.refused() {
            return runtime_error(
                refusal.status,
                &self.auth.describe(&refusal),
                "resource_misconfigured",
            );
        }
        let operation = format!("{} {}", request.method, request.path_and_query);
        let admitted = self.admit(estimate_raw(&request.body)).await;
        let mut headers = request.headers;
        for name in [AUTHORIZATION, HOST, CONTENT_LENGTH] {
            headers.remove(name);
        }
        headers.insert(AUTHORIZATION, authorization);
        ask_identity(&mut headers);
        let target = target_url(&self.base_url, &request.path_and_query);
        let mut upstream = self
            .http
            .request(request.method, &target)
            .headers(headers)
            .body(request.body);
        if let Some(timeout) = self.timeout {
            upstream = upstream.timeout(timeout);
        }
        let fail = |err: reqwest::Error| {
            self.stats.transport_errors.fetch_add(1, Ordering::Relaxed);
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            let status = if err.is_timeout() {
                StatusCode::GATEWAY_TIMEOUT
            } else {
                StatusCode::BAD_GATEWAY
            };
            runtime_error(
                status,
                &format!("OpenAI: {}", shown::no_answer(&err, &target)),
                "upstream_unreachable",
            )
        };
        let response = match upstream.send().await {
            Ok(response) => response,
            Err(err) => return fail(err),
        };
        let status = response.status();
        let mut headers = response.headers().clone();
        let read = match Decoded::new(response, &mut headers) {
            Ok(body) => EgressBody::read(body, &headers, Box::new(admitted)).await,
            Err(err) => Err(err),
        };
        let body = match read {
            Ok(body) => body,
            Err(err) => return self.unreadable(status, &headers, &err),
        };
        let is_json = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let json = match body.as_full() {
            Some(bytes) if is_json => serde_json::from_slice::<Value>(bytes).ok(),
            _ => None,
        };
        self.observe(status, &headers, json.as_ref());
        if refuses(status) {
            self.auth.refuse(status, &operation);
        }
        super::drop_hop_by_hop(&mut headers);
        EgressResponse {
            status,
            headers,
            body,
        }
    }

    /// Callers waiting now and the waits of admitted calls, for `/metrics`.
    pub fn limiter_stats(&self) -> super::LimiterStats<'_> {
        super::LimiterStats {
            waiting: self.stats.waiting.load(Ordering::Relaxed),
            waits: &self.waits,
        }
    }

    /// The client's state for `/actors` (never the key): `resource`, `base_url`,
    /// `api_key_env`, `api_key_set`; `limits` (`requests_per_minute`, `requests_burst`,
    /// `tokens_per_minute`, `tokens_burst`, `concurrency` — `null` when not limited);
    /// `calls` (`waiting` for the limiters, `in_flight`, `started`, `succeeded`, `failed`);
    /// `concurrency_in_use`; `rate_limited_429`, `insufficient_quota`, `server_errors`,
    /// `transport_errors`; `holds` (times the server made the client hold) and `hold_ms`
    /// (left of the current hold, `null` when none); `tokens_estimated` (debited) and
    /// `tokens_used` (the responses' `usage.total_tokens`); `server` (the last
    /// `x-ratelimit-*` values seen: `limit_requests`, `limit_tokens`, `remaining_requests`,
    /// `remaining_tokens`, `reset_requests_ms`, `reset_tokens_ms`, `observed_at`); `auth`
    /// (whether the key is refused: [`AuthState::snapshot`]).
    pub fn snapshot(&self) -> Value {
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let stats = &self.stats;
        let server = self
            .server
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let hold = self
            .hold_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .and_then(|until| until.checked_duration_since(Instant::now()))
            .map(|left| left.as_millis() as u64);
        let limit = |gate: &Option<RateGate>| {
            gate.as_ref().map(|gate| {
                let limit = gate.limit();
                (limit.per_minute_limit(), limit.burst())
            })
        };
        let (requests, tokens) = (limit(&self.requests), limit(&self.tokens));
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64);
        json!({
            "resource": self.resource,
            "base_url": self.base_url.as_str(),
            "api_key_env": self.api_key_env,
            "api_key_set": self.authorization.is_some(),
            "limits": {
                "requests_per_minute": requests.map(|l| l.0),
                "requests_burst": requests.map(|l| l.1),
                "tokens_per_minute": tokens.map(|l| l.0),
                "tokens_burst": tokens.map(|l| l.1),
                "concurrency": self.concurrency.as_ref().map(|(_, n)| *n),
            },
            "calls": {
                "waiting": count(&stats.waiting),
                "in_flight": count(&stats.in_flight),
                "started": count(&stats.started),
                "succeeded": count(&stats.succeeded),
                "failed": count(&stats.failed),
            },
            "concurrency_in_use": self
                .concurrency
                .as_ref()
                .map(|(semaphore, n)| n - semaphore.available_permits()),
            "rate_limited_429": count(&stats.rate_limited),
            "insufficient_quota": count(&stats.insufficient_quota),
            "server_errors": count(&stats.server_errors),
            "transport_errors": count(&stats.transport_errors),
            "holds": count(&stats.holds),
            "hold_ms": hold,
            "tokens_estimated": count(&stats.tokens_estimated),
            "tokens_used": count(&stats.tokens_used),
            "server": {
                "limit_requests": server.headers.limit_requests,
                "limit_tokens": server.headers.limit_tokens,
                "remaining_requests": server.headers.remaining_requests,
                "remaining_tokens": server.headers.remaining_tokens,
                "reset_requests_ms": ms(server.headers.reset_requests),
                "reset_tokens_ms": ms(server.headers.reset_tokens),
                "observed_at": server.at.map(rfc3339),
            },
            "auth": self.auth.snapshot(),
        })
    }

    fn missing_key(&self) -> String {
        format!("{} is not set", self.api_key_env)
    }

    /// The proxy's answer when the upstream's body cannot be passed on (`err`): a `502`
    /// naming why. The call counts as failed; the server's rate-limit headers still count.
    fn unreadable(
        &self,
        status: StatusCode,
        headers: &HeaderMap,
        err: &BodyError,
    ) -> EgressResponse {
        self.observe_limits(headers);
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        if matches!(err, BodyError::Broken(_) | BodyError::Corrupt(_)) {
            self.stats.transport_errors.fetch_add(1, Ordering::Relaxed);
        }
        let message = self.scrub(&format!("OpenAI answered {status}, but {err}"));
        warn!(resource = %self.resource, %message, "egress answer refused");
        runtime_error(StatusCode::BAD_GATEWAY, &message, "upstream_unreadable")
    }

    /// Waits for a concurrency permit, then (FIFO, one caller at a time) for the server's
    /// hold, one request cell and `estimate` tokens.
    async fn admit(&self, estimate: u64) -> Admitted {
        let entered = Instant::now();
        let waiting = Gauge::enter(&self.stats, |s| &s.waiting);
        let permit = match &self.concurrency {
            // The semaphore is never closed, so `acquire` cannot fail.
            Some((semaphore, _)) => Arc::clone(semaphore).acquire_owned().await.ok(),
            None => None,
        };
        {
            let _turn = self.queue.lock().await;
            self.wait_for_hold().await;
            if let Some(requests) = &self.requests {
                requests.take(1).await;
            }
            if let Some(tokens) = &self.tokens {
                tokens.take(estimate).await;
            }
        }
        drop(waiting);
        self.waits.observe(entered.elapsed().as_secs_f64());
        self.stats.started.fetch_add(1, Ordering::Relaxed);
        self.stats
            .tokens_estimated
            .fetch_add(estimate, Ordering::Relaxed);
        Admitted {
            _permit: permit,
            _in_flight: Gauge::enter(&self.stats, |s| &s.in_flight),
        }
    }

    async fn wait_for_hold(&self) {
        loop {
            let until = *self.hold_until.lock().unwrap_or_else(|e| e.into_inner());
            match until {
                Some(until) if until > Instant::now() => tokio::time::sleep_until(until).await,
                _ => return,
            }
        }
    }

    /// Holds every further call for `how_long` (extends a shorter hold, never shortens one).
    fn hold_for(&self, how_long: Duration) {
        let until = Instant::now() + how_long;
        let mut hold = self.hold_until.lock().unwrap_or_else(|e| e.into_inner());
        if hold.is_none_or(|current| current < until) {
            *hold = Some(until);
            self.stats.holds.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the server's correction from its `x-ratelimit-*` headers (module docs).
    fn observe_limits(&self, headers: &HeaderMap) {
        let rate = RateHeaders::read(headers);
        if rate.any() {
            let mut server = self.server.lock().unwrap_or_else(|e| e.into_inner());
            server.headers = rate;
            server.at = Some(SystemTime::now());
        }
        if let Some(exhausted) = rate.exhausted_for() {
            self.hold_for(exhausted);
        }
    }

    /// Counts the outcome and takes the server's correction (module docs).
    fn observe(&self, status: StatusCode, headers: &HeaderMap, body: Option<&Value>) {
        let stats = &self.stats;
        self.observe_limits(headers);
        let verdict = Verdict::of(status, body);
        match verdict {
            Verdict::Success => {
                stats.succeeded.fetch_add(1, Ordering::Relaxed);
                if let Some(used) = body.and_then(|b| b["usage"]["total_tokens"].as_u64()) {
                    stats.tokens_used.fetch_add(used, Ordering::Relaxed);
                }
            }
            Verdict::Quota => {
                stats.insufficient_quota.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Retry if status == StatusCode::TOO_MANY_REQUESTS => {
                stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                if let Some(after) = retry_after(headers) {
                    self.hold_for(after);
                }
            }
            Verdict::Retry if status.is_server_error() => {
                stats.server_errors.fetch_add(1, Ordering::Relaxed);
            }
            Verdict::Retry | Verdict::Permanent => {}
        }
        if verdict != Verdict::Success {
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `text` with the key replaced.
    fn scrub(&self, text: &str) -> String {
        match &self.redactor {
            Some(redactor) => redactor.redact_text(text),
            None => text.to_string(),
        }
    }
}

/// What an answer means for a retry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Success,
    Retry,
    /// 429 `insufficient_quota`.
    Quota,
    Permanent,
}

impl Verdict {
    fn of(status: StatusCode, body: Option<&Value>) -> Self {
        if status.is_success() {
            Verdict::Success
        } else if status == StatusCode::TOO_MANY_REQUESTS && body.is_some_and(is_insufficient_quota)
        {
            Verdict::Quota
        } else if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            Verdict::Retry
        } else {
            Verdict::Permanent
        }
    }
}

/// An answer made by the runtime, shaped like OpenAI's errors so SDKs show the message.
fn runtime_error(status: StatusCode, message: &str, code: &str) -> EgressResponse {
    EgressResponse::json(
        status,
        &json!({ "error": { "message": message, "type": "runtime_error", "code": code } }),
    )
}

fn lossy(bytes: &Bytes) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests;
