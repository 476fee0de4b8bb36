//! `ResourceGate`: asked before a task that declares `uses = [...]` starts. While a resource
//! is closed (its circuit breaker is open) the task is deferred to the time the gate names —
//! without spending an attempt — so calls to a dead dependency are bounded by the breaker,
//! not by the number of messages (DESIGN.md §3). A resource that cannot be used at all (its
//! API key is not set) fails the task permanently with that reason, and its `link_error`
//! callbacks run: never a silent skip.

use std::fmt;
use std::time::SystemTime;

/// The gate's answer for one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every resource may be called.
    Open,
    /// `resource` is closed until `until`: defer the task to then.
    ClosedUntil {
        /// The closed resource.
        resource: String,
        /// Its next probe time.
        until: SystemTime,
    },
    /// `resource` cannot be used (e.g. its API key is missing): fail the task permanently.
    Unusable {
        /// The resource.
        resource: String,
        /// Why.
        reason: String,
    },
}

/// Whether resources may be called now.
pub trait ResourceGate: Send + Sync + fmt::Debug {
    /// The admission of a task that uses `uses`.
    fn admit(&self, uses: &[String]) -> Admission;
}

/// A gate that never closes.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysOpen;

impl ResourceGate for AlwaysOpen {
    fn admit(&self, _uses: &[String]) -> Admission {
        Admission::Open
    }
}
