//! Shared resources (docs/resources.md): the clients every task of a node shares, each behind
//! its protection — [`zep`] behind a circuit breaker ([`breaker`]), [`openai`] behind rate
//! limiters, both stopped while their upstream refuses the node's credentials ([`auth`]).
//! Their state (breaker, limiters, replay backlog, misconfiguration) lives in `Arc`s outside
//! the actors, so a restarted actor neither closes an open breaker, nor forgets a limit or a
//! refused key.
//!
//! Three ways in: native tasks call the clients directly; Python tasks go through the egress
//! proxy (`/egress/{resource}/…`, built on [`EgressRequest`] / [`EgressResponse`]); consumers
//! ask the [`crate::gate::ResourceGate`] before starting a task that declares a resource.
//!
//! What comes back from an upstream is read by [`decode`] (any `Content-Encoding` undone,
//! bounded memory) and, on its way to an egress caller, kept free of the injected key by
//! [`redact`] — the resource hands the proxy its [`SharedResource::redactor`].

pub mod auth;
pub mod breaker;
pub mod decode;
pub mod openai;
pub mod redact;
mod scrape;
pub mod zep;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};

use self::decode::{BodyError, Decoded};
use self::redact::Redactor;
use crate::broker::EventSink;
use crate::gate::{Admission, ResourceGate, Use};

/// The largest body the egress proxy takes from a caller, and the most of an upstream's
/// decoded answer a client keeps in memory whole (4 MiB). Longer egress answers are streamed
/// ([`EgressBody::read`]); Zep and native calls fail beyond it.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// What the egress proxy, the gate and the snapshots need of a shared resource.
pub trait SharedResource: Send + Sync + fmt::Debug {
    /// `zep`, `openai`.
    fn kind(&self) -> &'static str;
    /// Forwards a proxied call through the resource's protections.
    fn forward(
        &self,
        request: EgressRequest,
    ) -> Pin<Box<dyn Future<Output = EgressResponse> + Send + '_>>;
    /// Its state for the gate: open, closed until a time, misconfigured or unusable.
    fn admission(&self) -> Admission;
    /// Whether its upstream accepts the node's credentials, if it has credentials (read by
    /// `/metrics`).
    fn auth(&self) -> Option<&auth::AuthState> {
        None
    }
    /// Breaker / limiter state for `/actors` (never a secret).
    fn snapshot(&self) -> serde_json::Value;
    /// Puts the resource's state changes (breaker transitions, misconfiguration) on the
    /// events stream.
    fn attach_events(&self, sink: &EventSink) {
        if let Some(auth) = self.auth() {
            auth.attach_events(sink.clone());
        }
    }
    /// Its circuit breaker, if it has one (read by `/metrics`).
    fn breaker(&self) -> Option<&breaker::Breaker> {
        None
    }
    /// Its rate limiters' waits, if it has limiters (read by `/metrics`).
    fn limiter(&self) -> Option<LimiterStats<'_>> {
        None
    }
    /// What the egress proxy keeps out of every answer it passes back: the key this resource
    /// injects (`None` without one).
    fn redactor(&self) -> Option<Arc<Redactor>> {
        None
    }
}

/// What `/metrics` reads of a resource's rate limiters.
#[derive(Debug)]
pub struct LimiterStats<'a> {
    /// Calls waiting for the limiters (or the concurrency cap, or a server hold) now.
    pub waiting: u64,
    /// How long admitted calls waited, in seconds.
    pub waits: &'a prometheus_client::metrics::histogram::Histogram,
}

/// Every shared resource of a node, by name; the node's [`ResourceGate`].
#[derive(Clone, Debug, Default)]
pub struct Resources {
    by_name: HashMap<String, Arc<dyn SharedResource>>,
}

impl Resources {
    /// Adds (or replaces) the resource `name`.
    pub fn insert(&mut self, name: &str, resource: Arc<dyn SharedResource>) {
        self.by_name.insert(name.to_string(), resource);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn SharedResource>> {
        self.by_name.get(name)
    }

    /// Puts every resource's state changes on the events stream through `sink`.
    pub fn attach_events(&self, sink: &EventSink) {
        for resource in self.by_name.values() {
            resource.attach_events(sink);
        }
    }

    /// The names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.by_name.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

impl ResourceGate for Resources {
    /// Each declared resource's state, weighed by the task's need of it
    /// ([`Admission::for_need`]); a permanent failure wins over a deferral, the first
    /// declared among equals. Unknown names (the config compiler rejects them) are open.
    fn admit(&self, uses: &[Use]) -> Admission {
        let mut deferral = None;
        for declared in uses {
            let Some(resource) = self.by_name.get(&declared.resource) else {
                continue;
            };
            match resource.admission().for_need(declared.need) {
                Admission::Open => {}
                permanent if permanent.is_permanent() => return permanent,
                closed => {
                    deferral.get_or_insert(closed);
                }
            }
        }
        deferral.unwrap_or(Admission::Open)
    }
}

impl SharedResource for zep::ZepClient {
    fn kind(&self) -> &'static str {
        "zep"
    }
    fn forward(
        &self,
        request: EgressRequest,
    ) -> Pin<Box<dyn Future<Output = EgressResponse> + Send + '_>> {
        Box::pin(zep::ZepClient::forward(self, request))
    }
    fn admission(&self) -> Admission {
        zep::ZepClient::admission(self)
    }
    fn auth(&self) -> Option<&auth::AuthState> {
        Some(zep::ZepClient::auth(self))
    }
    fn snapshot(&self) -> serde_json::Value {
        zep::ZepClient::snapshot(self)
    }
    fn attach_events(&self, sink: &EventSink) {
        zep::ZepClient::breaker(self).attach_events(sink.clone());
        zep::ZepClient::auth(self).attach_events(sink.clone());
    }
    fn breaker(&self) -> Option<&breaker::Breaker> {
        Some(zep::ZepClient::breaker(self))
    }
    fn redactor(&self) -> Option<Arc<Redactor>> {
        zep::ZepClient::redactor(self)
    }
}

impl SharedResource for openai::OpenAiClient {
    fn kind(&self) -> &'static str {
        "openai"
    }
    fn forward(
        &self,
        request: EgressRequest,
    ) -> Pin<Box<dyn Future<Output = EgressResponse> + Send + '_>> {
        Box::pin(openai::OpenAiClient::forward(self, request))
    }
    fn admission(&self) -> Admission {
        openai::OpenAiClient::admission(self)
    }
    fn auth(&self) -> Option<&auth::AuthState> {
        Some(openai::OpenAiClient::auth(self))
    }
    fn snapshot(&self) -> serde_json::Value {
        openai::OpenAiClient::snapshot(self)
    }
    fn limiter(&self) -> Option<LimiterStats<'_>> {
        Some(openai::OpenAiClient::limiter_stats(self))
    }
    fn redactor(&self) -> Option<Arc<Redactor>> {
        openai::OpenAiClient::redactor(self)
    }
}

/// A call forwarded by the egress proxy, already checked: `path_and_query` starts with `/`,
/// has no `..` segment and no encoded slash; `headers` no longer carry the caller's
/// `Authorization`, `Host` or hop-by-hop headers; the body is within the proxy's cap.
#[derive(Debug, Clone)]
pub struct EgressRequest {
    pub method: Method,
    /// Path (relative to the resource's base URL) and query.
    pub path_and_query: String,
    /// Headers to forward.
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What the proxy answers.
#[derive(Debug)]
pub struct EgressResponse {
    pub status: StatusCode,
    /// Headers (the upstream's, minus hop-by-hop ones and the `Content-Encoding` /
    /// `Content-Length` of the bytes as sent; or the runtime's own).
    pub headers: HeaderMap,
    /// Body, decoded.
    pub body: EgressBody,
}

/// The body of an [`EgressResponse`], always decoded (no `Content-Encoding` left to undo).
#[derive(Debug)]
pub enum EgressBody {
    /// All of it.
    Full(Bytes),
    /// Passed on as it arrives.
    Stream(EgressStream),
}

impl EgressBody {
    /// How the proxy passes an upstream's `body` on: an event stream (`Content-Type:
    /// text/event-stream`, such as an OpenAI `stream: true` completion) as it arrives;
    /// anything else whole when it is at most [`MAX_BODY`] decoded, and as it arrives after
    /// its first [`MAX_BODY`] otherwise (so memory stays bounded). `hold` (a concurrency
    /// permit, say) is kept until the body has been read.
    pub async fn read(
        mut body: Decoded,
        headers: &HeaderMap,
        hold: Box<dyn Send>,
    ) -> Result<Self, BodyError> {
        let event_stream = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(';')
                    .next()
                    .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
            });
        if !event_stream {
            if let Some(whole) = body.up_to(MAX_BODY).await? {
                return Ok(Self::Full(whole));
            }
        }
        Ok(Self::Stream(EgressStream {
            body,
            hold: Some(hold),
        }))
    }

    /// The body when it is [`EgressBody::Full`].
    pub fn as_full(&self) -> Option<&Bytes> {
        match self {
            Self::Full(bytes) => Some(bytes),
            Self::Stream(_) => None,
        }
    }
}

/// An upstream body passed on as it arrives, with what its call holds until it has been read.
pub struct EgressStream {
    body: Decoded,
    hold: Option<Box<dyn Send>>,
}

impl fmt::Debug for EgressStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressStream")
            .field("body", &self.body)
            .field("held", &self.hold.is_some())
            .finish()
    }
}

impl EgressStream {
    /// The next piece of the body, `None` at its end; the hold is let go at the end or at an
    /// error (and when the stream is dropped: a caller that went away).
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        let chunk = self.body.chunk().await;
        if !matches!(chunk, Ok(Some(_))) {
            self.hold = None;
        }
        chunk
    }
}

impl EgressResponse {
    /// A JSON answer made by the runtime itself.
    pub fn json(status: StatusCode, body: &serde_json::Value) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Self {
            status,
            headers,
            body: EgressBody::Full(Bytes::from(body.to_string())),
        }
    }

    /// `503` with `Retry-After` (whole seconds, at least 1) and the reason.
    pub fn unavailable(retry_after: Duration, reason: &str) -> Self {
        let mut response = Self::json(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "error": reason }),
        );
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        if let Ok(value) = HeaderValue::from_str(&secs.to_string()) {
            response.headers.insert(RETRY_AFTER, value);
        }
        response
    }
}

/// Headers that belong to one connection (hop-by-hop: `Connection`, `Keep-Alive`, `TE`, …) and
/// the length, which whoever sends a body sets for it: a proxy passes none of them on, in
/// either direction.
pub const HOP_BY_HOP: [&str; 9] = [
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

/// Removes the [`HOP_BY_HOP`] headers (an upstream's answer, before it is passed back).
pub fn drop_hop_by_hop(headers: &mut HeaderMap) {
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The URL of `path_and_query` under `base` (`https://api.openai.com/v1` + `/chat/completions`
/// → `https://api.openai.com/v1/chat/completions`). The proxy has checked `path_and_query`.
pub fn target_url(base: &reqwest::Url, path_and_query: &str) -> String {
    let base = base.as_str().trim_end_matches('/');
    format!("{base}{path_and_query}")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::breaker::{BreakerPolicy, BreakerSettings};
    use super::openai::{OpenAiClient, OpenAiSettings};
    use super::zep::{DEFAULT_AUTH_PROBE_PATH, ZepClient, ZepSettings};
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::{AnyBroker, BrokerSettings};
    use crate::gate::Use;

    /// A Zep client whose breaker is open (its one call found nobody listening).
    async fn open_zep() -> Arc<ZepClient> {
        let policy = BreakerPolicy::try_new(BreakerSettings {
            failure_threshold: 1,
            failure_rate: None,
            open_for: Duration::from_secs(60),
            open_for_max: Duration::from_secs(60),
            probes: 1,
            probe_timeout: Duration::from_secs(1),
            slow_call: None,
        })
        .unwrap();
        let settings = ZepSettings {
            resource: "zep".into(),
            base_url: "http://127.0.0.1:9/api/v2".parse().unwrap(),
            api_key: Some("zk".into()),
            api_key_env: "ZEP_API_KEY".into(),
            timeout: Duration::from_secs(1),
            breaker: policy,
            auth_probe: auth::AuthProbe::try_new(
                DEFAULT_AUTH_PROBE_PATH,
                auth::DEFAULT_PROBE_EVERY,
            )
            .unwrap(),
        };
        let broker = Arc::new(AnyBroker::Memory(MemoryBroker::new(
            BrokerSettings::default(),
        )));
        let zep = Arc::new(ZepClient::new(settings, broker, "node").unwrap());
        assert!(zep.get_context("t1").await.unwrap().degraded);
        zep
    }

    fn openai(name: &str, key: Option<&str>) -> Arc<OpenAiClient> {
        let settings = OpenAiSettings::new("OPENAI_API_KEY", key.map(str::to_string));
        Arc::new(OpenAiClient::try_new(name, settings, reqwest::Client::new()).unwrap())
    }

    #[tokio::test]
    async fn the_gate_weighs_each_resource_by_the_tasks_need_of_it() {
        let mut resources = Resources::default();
        resources.insert("zep", open_zep().await);
        resources.insert("keyless", openai("keyless", None));
        let refused = openai("openai", Some("sk-1"));
        refused
            .auth()
            .refuse(reqwest::StatusCode::UNAUTHORIZED, "POST /chat/completions");
        resources.insert("openai", refused);

        let admit = |uses: &[Use]| resources.admit(uses);
        assert!(matches!(
            admit(&[Use::required("zep")]),
            Admission::ClosedUntil { resource, .. } if resource == "zep"
        ));
        assert_eq!(admit(&[Use::degradable("zep")]), Admission::Open);
        assert!(matches!(
            admit(&[Use::required("openai")]),
            Admission::Misconfigured { resource, .. } if resource == "openai"
        ));
        assert_eq!(
            admit(&[Use::degradable("zep"), Use::degradable("openai")]),
            Admission::Open
        );
        // A missing key fails even a task that can do without the resource.
        assert!(matches!(
            admit(&[Use::degradable("keyless")]),
            Admission::Unusable { .. }
        ));
        // A permanent failure wins over a deferral, whatever the order.
        assert!(matches!(
            admit(&[Use::required("zep"), Use::required("openai")]),
            Admission::Misconfigured { .. }
        ));
        assert_eq!(admit(&[]), Admission::Open);
    }
}
