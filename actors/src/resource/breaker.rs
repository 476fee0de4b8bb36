//! Circuit breaker (docs/resources.md): a pure state machine on [`tokio::time::Instant`], shared
//! through an `Arc` and held outside any actor, so a restarted actor never closes an open
//! breaker (which would restart the retry storm).
//!
//! ```text
//!            failure_threshold consecutive failures,
//!            or failure rate ≥ rate over the last `window` calls (≥ min_calls of them)
//!  Closed ───────────────────────────────────────────────> Open (for open_for · 2^(opens−1),
//!    ^                                                       │    capped at open_for_max)
//!    │ `probes` probes succeeded                             │ time is up
//!    │                                                       v
//!    └──────────────────────────────────────────────── HalfOpen (admits `probes` calls, each
//!                         a probe failed, was dropped,          with its own probe_timeout)
//!                         or outlived its probe_timeout ──> Open (longer)
//! ```
//!
//! Transitions that depend only on time (open → half-open, a probe that outlived its timeout)
//! are applied lazily by every call that looks at the breaker (`try_acquire`, `state`,
//! `snapshot`, `next_probe_at`), dated at the instant they were due — no timer task, so a
//! hanging probe can never wedge it: the first caller after the probe's deadline re-opens it.
//!
//! Results are recorded through the [`Permit`] that `try_acquire` handed out: `succeed` (a
//! success slower than `slow_call` counts as a failure), `fail`, or dropping it unresolved (a
//! cancelled call counts as a failure). A permit that outlives a transition is *stale*: its
//! result is counted in the totals but moves nothing (a late failure of a call started while
//! closed cannot re-open a breaker that has since recovered, nor can a late success close it).
//!
//! The lock is a `std::sync::Mutex` held for a few arithmetic steps, never across an await.
//!
//! With an [`EventSink`] attached ([`Breaker::attach_events`]) every transition is also put on
//! the events stream — `breaker_opened`, `breaker_half_opened`, `breaker_closed`, with
//! `resource`, `from`, `to` (and `reason`, `open_for_ms` when it opens) — by a non-blocking
//! `try_send`, so emitting under the lock costs nothing that can wait.

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::broker::{Event, EventSink, rfc3339};
use crate::shown;

/// Calls kept for the failure rate shown in snapshots when no rate rule is configured.
const DISPLAY_WINDOW: u32 = 20;

/// The optional failure-rate rule: open when at least `rate` of the last `window` calls failed,
/// once at least `min_calls` calls are in the window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRate {
    /// Fraction of failed calls that opens the breaker, in `(0, 1]`.
    pub rate: f64,
    /// How many of the most recent calls are looked at.
    pub window: u32,
    /// Calls needed in the window before the rule applies (`1..=window`).
    pub min_calls: u32,
}

/// The raw breaker parameters, as read from the config; [`BreakerPolicy::try_new`] checks them.
/// The [`Default`] is a `breaker` table with nothing written.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker (at least 1; default 5).
    pub failure_threshold: u32,
    /// The optional failure-rate rule (default none).
    pub failure_rate: Option<FailureRate>,
    /// How long the first opening lasts (> 0; default 30 s); each consecutive re-opening
    /// doubles it.
    pub open_for: Duration,
    /// The cap of the growing open time (≥ `open_for`; default 300 s).
    pub open_for_max: Duration,
    /// Calls admitted while half-open; all must succeed to close (at least 1; default 1).
    pub probes: u32,
    /// How long a probe may take before it counts as a failure (> 0; default 2 s).
    pub probe_timeout: Duration,
    /// A success slower than this counts as a failure (> 0 when set; default none).
    pub slow_call: Option<Duration>,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            failure_rate: None,
            open_for: Duration::from_secs(30),
            open_for_max: Duration::from_secs(300),
            probes: 1,
            probe_timeout: Duration::from_secs(2),
            slow_call: None,
        }
    }
}

/// A breaker parameter that cannot be used; `field` is the config key below the breaker's
/// table (`failure_threshold`, `failure_rate.window`, …).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct InvalidBreaker {
    pub field: &'static str,
    pub reason: String,
}

/// Validated breaker parameters: an invalid policy cannot be built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerPolicy {
    settings: BreakerSettings,
}

impl BreakerPolicy {
    /// Checks `settings`, returning every problem at once, each naming its field.
    pub fn try_new(settings: BreakerSettings) -> Result<Self, Vec<InvalidBreaker>> {
        let mut errors = Vec::new();
        let mut invalid = |field, reason: String| errors.push(InvalidBreaker { field, reason });
        let s = &settings;
        if s.failure_threshold == 0 {
            invalid("failure_threshold", "must be at least 1, got 0".into());
        }
        if s.open_for.is_zero() {
            invalid("open_for", "must be longer than zero".into());
        }
        if s.open_for_max < s.open_for {
            invalid(
                "open_for_max",
                format!(
                    "{} is below open_for {}",
                    shown::duration(s.open_for_max),
                    shown::duration(s.open_for)
                ),
            );
        }
        if s.probes == 0 {
            invalid("probes", "must be at least 1, got 0".into());
        }
        if s.probe_timeout.is_zero() {
            invalid("probe_timeout", "must be longer than zero".into());
        }
        if s.slow_call.is_some_and(|slow| slow.is_zero()) {
            invalid("slow_call", "must be longer than zero when set".into());
        }
        if let Some(rule) = s.failure_rate {
            if !(rule.rate > 0.0 && rule.rate <= 1.0) {
                invalid(
                    "failure_rate.rate",
                    format!("must be in (0, 1], got {}", rule.rate),
                );
            }
            if rule.window == 0 {
                invalid("failure_rate.window", "must be at least 1, got 0".into());
            } else if rule.min_calls == 0 || rule.min_calls > rule.window {
                invalid(
                    "failure_rate.min_calls",
                    format!(
                        "must be between 1 and the window ({}), got {}",
                        rule.window, rule.min_calls
                    ),
                );
            }
        }
        if errors.is_empty() {
            Ok(Self { settings })
        } else {
            Err(errors)
        }
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// How long the `opens`-th consecutive opening lasts (1 = the first).
    pub fn open_time(&self, opens: u32) -> Duration {
        let factor = 2u32.saturating_pow(opens.saturating_sub(1));
        self.settings
            .open_for
            .saturating_mul(factor)
            .min(self.settings.open_for_max)
    }

    fn window(&self) -> usize {
        self.settings
            .failure_rate
            .map_or(DISPLAY_WINDOW, |rule| rule.window) as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the open time is up.
    Open,
    /// A few probe calls go through; the rest are refused.
    HalfOpen,
}

impl BreakerState {
    /// Every state, in the order of [`BreakerStats::transitions`].
    pub const ALL: [BreakerState; 3] = [
        BreakerState::Closed,
        BreakerState::Open,
        BreakerState::HalfOpen,
    ];

    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The breaker's numbers for `/metrics` (monotonic except `state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerStats {
    pub state: BreakerState,
    /// Transitions by the state entered, in [`BreakerState::ALL`] order.
    pub transitions: [(BreakerState, u64); 3],
    /// Calls refused.
    pub rejected: u64,
}

/// A refused call: the breaker is open (or half-open with every probe slot taken).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("circuit breaker is open; retry in {retry_after:?}")]
pub struct Rejected {
    /// When asking again may succeed (the next probe time).
    pub retry_after: Duration,
}

/// A shared circuit breaker. Cloning is cheap: clones share one state.
#[derive(Clone)]
pub struct Breaker {
    shared: Arc<Shared>,
}

impl fmt::Debug for Breaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Breaker")
            .field("name", &self.shared.name)
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

struct Shared {
    name: String,
    policy: BreakerPolicy,
    inner: Mutex<Inner>,
    events: OnceLock<EventSink>,
}

#[derive(Debug)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        admitted: u32,
        succeeded: u32,
        /// Probe id → its deadline.
        in_flight: BTreeMap<u64, Instant>,
    },
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Bumped by every transition; permits of an older generation are stale.
    generation: u64,
    consecutive_failures: u32,
    /// Most recent outcomes while closed, `true` = failure.
    outcomes: VecDeque<bool>,
    /// Openings since the breaker last closed.
    opens: u32,
    next_probe: u64,
    calls: u64,
    successes: u64,
    failures: u64,
    slow_calls: u64,
    stale: u64,
    rejected: u64,
    /// Transitions by the state entered, indexed like [`BreakerState::ALL`].
    transitions: [u64; 3],
    last_transition: Option<SystemTime>,
    last_reason: Option<String>,
}

/// The wall-clock time of `at` (a tokio instant), seen from `now`.
fn wall(at: Instant, now: Instant) -> SystemTime {
    let sys = SystemTime::now();
    if at >= now {
        sys + (at - now)
    } else {
        sys.checked_sub(now - at).unwrap_or(sys)
    }
}

impl Breaker {
    /// A closed breaker; `name` (the resource) appears in its logs.
    pub fn new(name: &str, policy: BreakerPolicy) -> Self {
        Self {
            shared: Arc::new(Shared {
                name: name.to_string(),
                policy,
                inner: Mutex::new(Inner {
                    phase: Phase::Closed,
                    generation: 0,
                    consecutive_failures: 0,
                    outcomes: VecDeque::with_capacity(policy.window()),
                    opens: 0,
                    next_probe: 0,
                    calls: 0,
                    successes: 0,
                    failures: 0,
                    slow_calls: 0,
                    stale: 0,
                    rejected: 0,
                    transitions: [0; 3],
                    last_transition: None,
                    last_reason: None,
                }),
                events: OnceLock::new(),
            }),
        }
    }

    /// Puts this breaker's transitions on the events stream through `sink` (the first sink
    /// attached stays).
    pub fn attach_events(&self, sink: EventSink) {
        let _ = self.shared.events.set(sink);
    }

    /// The resource it protects.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn policy(&self) -> &BreakerPolicy {
        &self.shared.policy
    }

    /// Asks to make one call. `Ok` carries the permit to report the call's result with;
    /// `Err` says when to ask again.
    pub fn try_acquire(&self) -> Result<Permit, Rejected> {
        let now = Instant::now();
        let mut guard = self.shared.lock();
        let inner: &mut Inner = &mut guard;
        self.shared.refresh(inner, now);
        let settings = &self.shared.policy.settings;
        let generation = inner.generation;
        let probe = match &mut inner.phase {
            Phase::Closed => None,
            Phase::Open { until } => {
                let retry_after = until.saturating_duration_since(now);
                inner.rejected += 1;
                return Err(Rejected { retry_after });
            }
            Phase::HalfOpen {
                admitted,
                in_flight,
                ..
            } => {
                if *admitted >= settings.probes {
                    let first = in_flight.values().min().copied().unwrap_or(now);
                    inner.rejected += 1;
                    return Err(Rejected {
                        retry_after: first.saturating_duration_since(now),
                    });
                }
                *admitted += 1;
                let id = inner.next_probe;
                inner.next_probe += 1;
                let deadline = now + settings.probe_timeout;
                in_flight.insert(id, deadline);
                Some((id, deadline))
            }
        };
        drop(guard);
        Ok(Permit {
            shared: Arc::clone(&self.shared),
            generation,
            probe,
            started: now,
            resolved: false,
        })
    }

    /// The current state (time-driven transitions applied first).
    pub fn state(&self) -> BreakerState {
        let mut inner = self.shared.lock();
        self.shared.refresh(&mut inner, Instant::now());
        match inner.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When a call may next be admitted, while none may be now: the end of the open time, or
    /// (half-open, every probe slot taken) the earliest probe deadline. `None` while calls are
    /// admitted (closed, or half-open with a free probe slot). For the resource gate.
    pub fn next_probe_at(&self) -> Option<SystemTime> {
        let now = Instant::now();
        let mut inner = self.shared.lock();
        self.shared.refresh(&mut inner, now);
        match &inner.phase {
            Phase::Closed => None,
            Phase::Open { until } => Some(wall(*until, now)),
            Phase::HalfOpen {
                admitted,
                in_flight,
                ..
            } => {
                if *admitted < self.shared.policy.settings.probes {
                    None
                } else {
                    let first = in_flight.values().min().copied().unwrap_or(now);
                    Some(wall(first, now))
                }
            }
        }
    }

    /// State, transitions by the state entered, and rejected calls (time-driven transitions
    /// applied first), for `/metrics`.
    pub fn stats(&self) -> BreakerStats {
        let mut inner = self.shared.lock();
        self.shared.refresh(&mut inner, Instant::now());
        let state = match inner.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        let t = inner.transitions;
        BreakerStats {
            state,
            transitions: [
                (BreakerState::Closed, t[0]),
                (BreakerState::Open, t[1]),
                (BreakerState::HalfOpen, t[2]),
            ],
            rejected: inner.rejected,
        }
    }

    /// What `/actors` shows: state, consecutive failures, failure rate over the recent calls,
    /// time until half-open, rejected calls, transitions, last transition, totals, policy.
    pub fn snapshot(&self) -> Value {
        let now = Instant::now();
        let mut inner = self.shared.lock();
        self.shared.refresh(&mut inner, now);
        let policy = &self.shared.policy.settings;
        let (state, until_half_open, probes_in_flight) = match &inner.phase {
            Phase::Closed => (BreakerState::Closed, None, 0),
            Phase::Open { until } => (
                BreakerState::Open,
                Some(until.saturating_duration_since(now).as_millis() as u64),
                0,
            ),
            Phase::HalfOpen { in_flight, .. } => (BreakerState::HalfOpen, None, in_flight.len()),
        };
        let window = inner.outcomes.len();
        let failed = inner.outcomes.iter().filter(|failed| **failed).count();
        let rate = (window > 0).then(|| failed as f64 / window as f64);
        json!({
            "state": state,
            "consecutive_failures": inner.consecutive_failures,
            "failure_rate": rate,
            "window_calls": window,
            "time_until_half_open_ms": until_half_open,
            "probes_in_flight": probes_in_flight,
            "consecutive_opens": inner.opens,
            "rejected": inner.rejected,
            "transitions": inner.transitions.iter().sum::<u64>(),
            "last_transition": inner.last_transition.map(rfc3339),
            "last_reason": inner.last_reason,
            "calls": inner.calls,
            "successes": inner.successes,
            "failures": inner.failures,
            "slow_calls": inner.slow_calls,
            "stale_results": inner.stale,
            "policy": {
                "failure_threshold": policy.failure_threshold,
                "failure_rate": policy.failure_rate.map(|rule| json!({
                    "rate": rule.rate, "window": rule.window, "min_calls": rule.min_calls,
                })),
                "open_for_ms": policy.open_for.as_millis() as u64,
                "open_for_max_ms": policy.open_for_max.as_millis() as u64,
                "probes": policy.probes,
                "probe_timeout_ms": policy.probe_timeout.as_millis() as u64,
                "slow_call_ms": policy.slow_call.map(|slow| slow.as_millis() as u64),
            },
        })
    }
}

/// The right to make one call, and the way to report how it went. Dropping it without
/// [`succeed`](Self::succeed) or [`fail`](Self::fail) counts as a failure.
#[must_use = "report the call's result with succeed() or fail(); dropping it counts as a failure"]
pub struct Permit {
    shared: Arc<Shared>,
    generation: u64,
    probe: Option<(u64, Instant)>,
    started: Instant,
    resolved: bool,
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("breaker", &self.shared.name)
            .field("probe", &self.probe.is_some())
            .finish_non_exhaustive()
    }
}

impl Permit {
    /// Whether this call is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe.is_some()
    }

    /// A probe's deadline: the call should give up by then (it counts as a failure anyway).
    pub fn deadline(&self) -> Option<Instant> {
        self.probe.map(|(_, deadline)| deadline)
    }

    /// The call succeeded (slower than `slow_call`, it counts as a failure).
    pub fn succeed(mut self) {
        self.resolved = true;
        let elapsed = self.started.elapsed();
        self.shared
            .record(self.generation, self.probe, Some(elapsed));
    }

    /// The call failed (5xx, timeout, connection refused, …).
    pub fn fail(mut self) {
        self.resolved = true;
        self.shared.record(self.generation, self.probe, None);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.resolved {
            self.shared.record(self.generation, self.probe, None);
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the state consistent between statements that could panic
        // (there are none that can): a poisoned lock still holds a usable breaker.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies the transitions that are due by `now`, each dated when it was due.
    fn refresh(&self, inner: &mut Inner, now: Instant) {
        loop {
            match &inner.phase {
                Phase::Open { until } if *until <= now => {
                    let at = *until;
                    self.half_open(inner, at, now);
                }
                Phase::HalfOpen { in_flight, .. } => {
                    let Some(expired) = in_flight.values().min().copied().filter(|d| *d <= now)
                    else {
                        return;
                    };
                    inner.failures += 1;
                    let reason = format!(
                        "a half-open probe outlived its timeout ({:?})",
                        self.policy.settings.probe_timeout
                    );
                    self.open(inner, expired, now, reason);
                }
                _ => return,
            }
        }
    }

    /// Records one result: `Some(elapsed)` for a success, `None` for a failure.
    fn record(&self, generation: u64, probe: Option<(u64, Instant)>, elapsed: Option<Duration>) {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner: &mut Inner = &mut guard;
        // A probe that answers after its deadline has already been counted as failed.
        self.refresh(inner, now);
        inner.calls += 1;
        let slow = elapsed.is_some_and(|took| {
            self.policy
                .settings
                .slow_call
                .is_some_and(|slow| took > slow)
        });
        if slow {
            inner.slow_calls += 1;
        }
        let failed = elapsed.is_none() || slow;
        if failed {
            inner.failures += 1;
        } else {
            inner.successes += 1;
        }
        if generation != inner.generation {
            inner.stale += 1;
            return;
        }
        let settings = &self.policy.settings;
        match &mut inner.phase {
            Phase::Closed => {
                if inner.outcomes.len() == self.policy.window() {
                    inner.outcomes.pop_front();
                }
                inner.outcomes.push_back(failed);
                if !failed {
                    inner.consecutive_failures = 0;
                    return;
                }
                inner.consecutive_failures += 1;
                if inner.consecutive_failures >= settings.failure_threshold {
                    let reason = format!("{} consecutive failures", inner.consecutive_failures);
                    self.open(inner, now, now, reason);
                    return;
                }
                if let Some(rule) = settings.failure_rate {
                    let calls = inner.outcomes.len();
                    let failures = inner.outcomes.iter().filter(|f| **f).count();
                    if calls >= rule.min_calls as usize
                        && failures as f64 >= rule.rate * calls as f64
                    {
                        let reason = format!("{failures} of the last {calls} calls failed");
                        self.open(inner, now, now, reason);
                    }
                }
            }
            Phase::HalfOpen {
                succeeded,
                in_flight,
                ..
            } => {
                if let Some((id, _)) = probe {
                    in_flight.remove(&id);
                }
                if failed {
                    let reason = if slow {
                        "a half-open probe was slower than slow_call".to_string()
                    } else {
                        "a half-open probe failed".to_string()
                    };
                    self.open(inner, now, now, reason);
                } else {
                    *succeeded += 1;
                    if *succeeded >= settings.probes {
                        self.close(inner);
                    }
                }
            }
            // Opening bumps the generation, so no current permit exists while open.
            Phase::Open { .. } => inner.stale += 1,
        }
    }

    fn transition(&self, inner: &mut Inner, at: Instant, now: Instant, phase: Phase) {
        if let Some(sink) = self.events.get() {
            let name = |phase: &Phase| match phase {
                Phase::Closed => BreakerState::Closed,
                Phase::Open { .. } => BreakerState::Open,
                Phase::HalfOpen { .. } => BreakerState::HalfOpen,
            };
            let (from, to) = (name(&inner.phase), name(&phase));
            let mut detail =
                json!({ "resource": self.name, "from": from.as_str(), "to": to.as_str() });
            let kind = match &phase {
                Phase::Closed => "breaker_closed",
                Phase::HalfOpen { .. } => "breaker_half_opened",
                Phase::Open { until } => {
                    detail["reason"] = json!(inner.last_reason);
                    detail["open_for_ms"] = json!(until.duration_since(at).as_millis() as u64);
                    detail["opens"] = json!(inner.opens);
                    "breaker_opened"
                }
            };
            sink.emit(Event::new(kind, detail));
        }
        let entered = match phase {
            Phase::Closed => 0,
            Phase::Open { .. } => 1,
            Phase::HalfOpen { .. } => 2,
        };
        inner.phase = phase;
        inner.generation += 1;
        inner.transitions[entered] += 1;
        inner.last_transition = Some(wall(at, now));
    }

    fn open(&self, inner: &mut Inner, at: Instant, now: Instant, reason: String) {
        inner.opens = inner.opens.saturating_add(1);
        let open_for = self.policy.open_time(inner.opens);
        warn!(
            breaker = %self.name,
            %reason,
            open_for_ms = open_for.as_millis() as u64,
            consecutive_opens = inner.opens,
            "circuit breaker opened"
        );
        inner.outcomes.clear();
        inner.last_reason = Some(reason);
        self.transition(
            inner,
            at,
            now,
            Phase::Open {
                until: at + open_for,
            },
        );
    }

    fn half_open(&self, inner: &mut Inner, at: Instant, now: Instant) {
        info!(breaker = %self.name, "circuit breaker half-open: admitting probes");
        self.transition(
            inner,
            at,
            now,
            Phase::HalfOpen {
                admitted: 0,
                succeeded: 0,
                in_flight: BTreeMap::new(),
            },
        );
    }

    fn close(&self, inner: &mut Inner) {
        info!(breaker = %self.name, after_opens = inner.opens, "circuit breaker closed");
        inner.opens = 0;
        inner.consecutive_failures = 0;
        inner.outcomes.clear();
        inner.last_reason = None;
        let now = Instant::now();
        self.transition(inner, now, now, Phase::Closed);
    }
}
