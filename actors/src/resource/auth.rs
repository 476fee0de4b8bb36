//! The *misconfigured* state of a shared resource: its upstream refused our credentials.
//!
//! A `401` or `403` from Zep or OpenAI means the key or the base URL is wrong (the seed's real
//! root cause: a key for one Zep answering another one). No retry can fix that, and a breaker
//! that counts such an answer as a success never opens — so without this state the resource
//! got a call per task forever while `/health` said ok. The first `401`/`403` of any call
//! (task, egress, replay) marks the resource misconfigured ([`AuthState::refuse`]); from then
//! on, until a probe passes:
//!
//! - **no real call goes upstream**: Zep answers the way it does while its breaker is open
//!   (reads empty and degraded, writes buffered for replay, other calls `503`), OpenAI answers
//!   the status it got (`401`/`403`) with an OpenAI-shaped error naming the resource and the
//!   reason — its SDKs raise at once on those instead of retrying;
//! - **the gate** fails the tasks that `uses` the resource permanently (dead-lettered with the
//!   reason, `link_error` callbacks run) and lets the tasks that `degrades` it run
//!   ([`crate::gate`]);
//! - **it shows**: the resource's actor reports itself degraded (`/health` answers 503 naming
//!   the resource, the status and the reason), `rt_resource_misconfigured{resource}` is 1,
//!   the snapshot's `auth` says it, and the events `resource_misconfigured` /
//!   `resource_restored` mark the change;
//! - **the probe**: every [`AuthProbe::every`] the resource's actor sends one authenticated
//!   `GET` of [`AuthProbe::path`] through the same client (OpenAI `/models`, Zep
//!   `/users-ordered?pageNumber=1&pageSize=1`). An answer that refuses the credentials again
//!   (`401`/`403`) or says nothing about them (`5xx`, `408`, `429`, a timeout, a refused
//!   connection, Zep's breaker open) leaves the state as it is until the next probe; any other
//!   answer (`2xx`, or a `404` of a path this API version lacks: the credentials were
//!   accepted) clears it and calls resume. So a misconfigured resource costs its upstream one
//!   call per `every`, whatever the number of tasks.
//!
//! The state lives in the client's `Arc` (like the breaker), outside the actor: a restarted
//! actor neither forgets it nor probes early — the next probe time is kept here too.
//!
//! Reasons name the resource, the status, the operation (method and path, never the query)
//! and the key's variable; never the key, nor the upstream's body (which could reflect it).

use std::fmt;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::broker::{Event, EventSink, rfc3339};

/// Default pause between two probes of a misconfigured resource.
pub const DEFAULT_PROBE_EVERY: Duration = Duration::from_secs(30);

/// The probe of a misconfigured resource: `GET path` (relative to its base URL, with its key)
/// every `every`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthProbe {
    path: String,
    every: Duration,
}

/// An [`AuthProbe`] setting that cannot be used; `field` is the config key below the
/// resource's table (`auth_probe_path`, `auth_probe_every`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidProbe {
    pub field: &'static str,
    pub reason: String,
}

impl AuthProbe {
    /// Checks the settings: `path` starts with `/` and holds no whitespace, control character,
    /// backslash or `..` segment; `every` is above zero.
    pub fn try_new(path: &str, every: Duration) -> Result<Self, InvalidProbe> {
        let invalid = |field, reason: &str| InvalidProbe {
            field,
            reason: reason.to_string(),
        };
        if !path.starts_with('/') {
            return Err(invalid("auth_probe_path", "must start with `/`"));
        }
        if path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '\\')
        {
            return Err(invalid(
                "auth_probe_path",
                "must not hold whitespace, control characters or backslashes",
            ));
        }
        let route = path.split('?').next().unwrap_or(path);
        if route.split('/').any(|segment| segment == "..") {
            return Err(invalid("auth_probe_path", "must not hold a `..` segment"));
        }
        if every.is_zero() {
            return Err(invalid("auth_probe_every", "must be longer than zero"));
        }
        Ok(Self {
            path: path.to_string(),
            every,
        })
    }

    /// The path (and query) probed.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The pause between probes.
    pub fn every(&self) -> Duration {
        self.every
    }
}

/// Why a resource is misconfigured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The status that refused the credentials (`401` or `403`).
    pub status: StatusCode,
    /// What was refused and what to check, e.g. ``zep answered 401 Unauthorized to GET
    /// /threads/t1/context: check ZEP_API_KEY and base_url``.
    pub reason: String,
    pub since: SystemTime,
}

/// How a probe went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// The upstream accepted the credentials (any answer but the ones below).
    Accepted(StatusCode),
    /// `401` or `403` again.
    Refused(StatusCode),
    /// No word on the credentials: `5xx`, `408`, `429`, no answer, or not sent.
    Inconclusive(String),
}

impl ProbeOutcome {
    /// What an answer with `status` says about the credentials.
    pub fn of(status: StatusCode) -> Self {
        if refuses(status) {
            ProbeOutcome::Refused(status)
        } else if status.is_server_error()
            || status == StatusCode::REQUEST_TIMEOUT
            || status == StatusCode::TOO_MANY_REQUESTS
        {
            ProbeOutcome::Inconclusive(format!("answered {status}"))
        } else {
            ProbeOutcome::Accepted(status)
        }
    }
}

/// Whether `status` refuses the credentials: `401` or `403`.
pub fn refuses(status: StatusCode) -> bool {
    status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN
}

#[derive(Debug, Default)]
struct Inner {
    refused: Option<Refusal>,
    /// While refused: when the next probe is due.
    next_probe: Option<Instant>,
    /// Answers that refused the credentials (calls and probes).
    refusals: u64,
    probes: u64,
    last_probe: Option<String>,
    /// Times the resource became misconfigured.
    times: u64,
}

/// The credentials state of one resource, shared through the client's `Arc` (module docs).
pub struct AuthState {
    resource: String,
    /// The variable holding the key, named in reasons.
    key_env: String,
    probe: AuthProbe,
    inner: Mutex<Inner>,
    events: OnceLock<EventSink>,
}

impl fmt::Debug for AuthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthState")
            .field("resource", &self.resource)
            .field("misconfigured", &self.lock().refused.is_some())
            .finish_non_exhaustive()
    }
}

impl AuthState {
    /// The state of `resource`, whose key is read from `key_env`; accepted until refused.
    pub fn new(resource: &str, key_env: &str, probe: AuthProbe) -> Self {
        Self {
            resource: resource.to_string(),
            key_env: key_env.to_string(),
            probe,
            inner: Mutex::new(Inner::default()),
            events: OnceLock::new(),
        }
    }

    /// Puts `resource_misconfigured` / `resource_restored` on the events stream.
    pub fn attach_events(&self, sink: EventSink) {
        let _ = self.events.set(sink);
    }

    pub fn probe(&self) -> &AuthProbe {
        &self.probe
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the state consistent: a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Why the resource is misconfigured, if it is.
    pub fn refused(&self) -> Option<Refusal> {
        self.lock().refused.clone()
    }

    /// `reason` prefixed for a task's error or an answer: `zep is misconfigured: …`.
    pub fn describe(&self, refusal: &Refusal) -> String {
        format!("{} is misconfigured: {}", self.resource, refusal.reason)
    }

    /// Records an answer `status` (`401`/`403`) to `operation` (`GET /threads/t1/context`; a
    /// query is cut off). The first one marks the resource misconfigured and schedules the
    /// first probe; later ones are only counted.
    pub fn refuse(&self, status: StatusCode, operation: &str) {
        let operation = operation.split('?').next().unwrap_or(operation);
        let mut inner = self.lock();
        inner.refusals += 1;
        if inner.refused.is_some() {
            return;
        }
        let reason = format!(
            "{} answered {status} to {operation}: check {} and base_url",
            self.resource, self.key_env
        );
        warn!(resource = %self.resource, %reason, probe_every_ms = self.probe.every.as_millis() as u64,
            "resource misconfigured: calls stop until a probe passes");
        inner.times += 1;
        inner.next_probe = Some(Instant::now() + self.probe.every);
        if let Some(sink) = self.events.get() {
            sink.emit(Event::new(
                "resource_misconfigured",
                json!({
                    "resource": self.resource,
                    "status": status.as_u16(),
                    "reason": reason,
                    "probe_every_ms": self.probe.every.as_millis() as u64,
                }),
            ));
        }
        inner.refused = Some(Refusal {
            status,
            reason,
            since: SystemTime::now(),
        });
    }

    /// While misconfigured: how long until the next probe is due (zero when it is).
    /// `None` while the credentials are accepted.
    pub fn until_probe(&self) -> Option<Duration> {
        let inner = self.lock();
        inner.refused.as_ref()?;
        let due = inner.next_probe?;
        Some(due.saturating_duration_since(Instant::now()))
    }

    /// How long a probing loop (the resource's actor) sleeps before it looks again: until
    /// the next probe while misconfigured, else `every` but at most a second (a refusal can
    /// come at any time); never below 10 ms.
    pub fn next_check(&self) -> Duration {
        self.until_probe()
            .unwrap_or_else(|| self.probe.every.min(Duration::from_secs(1)))
            .max(Duration::from_millis(10))
    }

    pub fn probe_due(&self) -> bool {
        self.until_probe().is_some_and(|left| left.is_zero())
    }

    /// Records a probe's outcome: accepted clears the state, anything else schedules the next
    /// probe `every` from now.
    pub fn probed(&self, outcome: ProbeOutcome) {
        let mut inner = self.lock();
        inner.probes += 1;
        let Some(refusal) = inner.refused.clone() else {
            return;
        };
        match outcome {
            ProbeOutcome::Accepted(status) => {
                let after = SystemTime::now()
                    .duration_since(refusal.since)
                    .unwrap_or_default();
                info!(resource = %self.resource, %status, after_ms = after.as_millis() as u64,
                    "resource credentials accepted again: calls resume");
                inner.refused = None;
                inner.next_probe = None;
                inner.last_probe = Some(format!("accepted: {status}"));
                if let Some(sink) = self.events.get() {
                    sink.emit(Event::new(
                        "resource_restored",
                        json!({
                            "resource": self.resource,
                            "status": status.as_u16(),
                            "after_ms": after.as_millis() as u64,
                        }),
                    ));
                }
            }
            ProbeOutcome::Refused(status) => {
                inner.refusals += 1;
                inner.last_probe = Some(format!("refused: {status}"));
                inner.next_probe = Some(Instant::now() + self.probe.every);
            }
            ProbeOutcome::Inconclusive(why) => {
                inner.last_probe = Some(format!("inconclusive: {why}"));
                inner.next_probe = Some(Instant::now() + self.probe.every);
            }
        }
    }

    /// What `/actors` shows under `auth`: `misconfigured`, `status`, `reason`, `since`,
    /// `next_probe_in_ms` (`null` when accepted), `probe` (`path`, `every_ms`), `probes` sent,
    /// `last_probe` (`accepted: 200 OK`, `refused: 401 Unauthorized`, `inconclusive: …`),
    /// `refusals` (answers that refused the credentials) and `times` (times it became
    /// misconfigured).
    pub fn snapshot(&self) -> Value {
        let inner = self.lock();
        let refused = inner.refused.as_ref();
        let next = inner
            .next_probe
            .filter(|_| refused.is_some())
            .map(|due| due.saturating_duration_since(Instant::now()).as_millis() as u64);
        json!({
            "misconfigured": refused.is_some(),
            "status": refused.map(|r| r.status.as_u16()),
            "reason": refused.map(|r| r.reason.clone()),
            "since": refused.map(|r| rfc3339(r.since)),
            "next_probe_in_ms": next,
            "probe": {
                "path": self.probe.path,
                "every_ms": self.probe.every.as_millis() as u64,
            },
            "probes": inner.probes,
            "last_probe": inner.last_probe,
            "refusals": inner.refusals,
            "times": inner.times,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(every: Duration) -> AuthState {
        AuthState::new(
            "zep",
            "ZEP_API_KEY",
            AuthProbe::try_new("/probe", every).unwrap(),
        )
    }

    #[test]
    fn probe_settings_are_checked() {
        let ok = AuthProbe::try_new(
            "/users-ordered?pageNumber=1&pageSize=1",
            DEFAULT_PROBE_EVERY,
        );
        assert_eq!(ok.unwrap().path(), "/users-ordered?pageNumber=1&pageSize=1");
        for (path, every, field) in [
            ("models", DEFAULT_PROBE_EVERY, "auth_probe_path"),
            ("/a b", DEFAULT_PROBE_EVERY, "auth_probe_path"),
            ("/a/../b", DEFAULT_PROBE_EVERY, "auth_probe_path"),
            ("/a\\b", DEFAULT_PROBE_EVERY, "auth_probe_path"),
            ("/models", Duration::ZERO, "auth_probe_every"),
        ] {
            let err = AuthProbe::try_new(path, every).unwrap_err();
            assert_eq!(err.field, field, "{path}");
        }
    }

    #[test]
    fn outcomes_of_statuses() {
        assert_eq!(
            ProbeOutcome::of(StatusCode::UNAUTHORIZED),
            ProbeOutcome::Refused(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            ProbeOutcome::of(StatusCode::FORBIDDEN),
            ProbeOutcome::Refused(StatusCode::FORBIDDEN)
        );
        for status in [
            StatusCode::BAD_GATEWAY,
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::REQUEST_TIMEOUT,
        ] {
            assert!(matches!(
                ProbeOutcome::of(status),
                ProbeOutcome::Inconclusive(_)
            ));
        }
        for status in [StatusCode::OK, StatusCode::NOT_FOUND] {
            assert_eq!(ProbeOutcome::of(status), ProbeOutcome::Accepted(status));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refused_until_a_probe_is_accepted_and_probes_are_spaced() {
        let (sink, mut events) = EventSink::channel(16);
        let auth = state(Duration::from_secs(30));
        auth.attach_events(sink);
        assert!(auth.refused().is_none());
        assert_eq!(auth.until_probe(), None);

        auth.refuse(StatusCode::UNAUTHORIZED, "GET /threads/t1/context?lastn=4");
        auth.refuse(StatusCode::FORBIDDEN, "POST /users");
        let refusal = auth.refused().unwrap();
        assert_eq!(
            refusal.status,
            StatusCode::UNAUTHORIZED,
            "the first one stays"
        );
        assert_eq!(
            refusal.reason,
            "zep answered 401 Unauthorized to GET /threads/t1/context: check ZEP_API_KEY and base_url"
        );
        assert!(!auth.probe_due());
        tokio::time::advance(Duration::from_secs(30)).await;
        assert!(auth.probe_due());

        auth.probed(ProbeOutcome::Refused(StatusCode::UNAUTHORIZED));
        assert!(!auth.probe_due(), "a refused probe waits a whole period");
        assert_eq!(auth.until_probe(), Some(Duration::from_secs(30)));
        tokio::time::advance(Duration::from_secs(30)).await;
        auth.probed(ProbeOutcome::Inconclusive("answered 503".into()));
        assert!(auth.refused().is_some());
        let snapshot = auth.snapshot();
        assert_eq!(snapshot["misconfigured"], true);
        assert_eq!(snapshot["status"], 401);
        assert_eq!(snapshot["probes"], 2);
        assert_eq!(snapshot["refusals"], 3);
        assert_eq!(snapshot["last_probe"], "inconclusive: answered 503");
        assert_eq!(snapshot["next_probe_in_ms"], 30_000);

        auth.probed(ProbeOutcome::Accepted(StatusCode::OK));
        assert!(auth.refused().is_none());
        assert_eq!(auth.until_probe(), None);
        let snapshot = auth.snapshot();
        assert_eq!(snapshot["misconfigured"], false);
        assert_eq!(snapshot["next_probe_in_ms"], Value::Null);
        assert_eq!(snapshot["times"], 1);

        let opened = events.recv().await.unwrap();
        assert_eq!(opened.kind, "resource_misconfigured");
        assert_eq!(opened.detail["resource"], "zep");
        assert_eq!(opened.detail["status"], 401);
        let restored = events.recv().await.unwrap();
        assert_eq!(restored.kind, "resource_restored");
        assert_eq!(restored.detail["status"], 200);
        assert!(events.try_recv().is_err(), "one event per change");
    }
}
