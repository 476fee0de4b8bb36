//! `ResourceGate`: asked before a task that declares `uses = [...]` starts. While a resource
//! is closed (its circuit breaker is open) the task is deferred to the time the gate names —
//! without spending an attempt — so calls to a dead dependency are bounded by the breaker,
//! not by the number of messages (DESIGN.md §3).
//!
//! Until the resource actors land, the node's gate is [`AlwaysOpen`].

use std::fmt;
use std::time::SystemTime;

/// Whether resources may be called now.
pub trait ResourceGate: Send + Sync + fmt::Debug {
    /// `Some((resource, until))` when one of `uses` is closed until `until`; `None` when all
    /// are open.
    fn closed_until(&self, uses: &[String]) -> Option<(String, SystemTime)>;
}

/// A gate that never closes.
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysOpen;

impl ResourceGate for AlwaysOpen {
    fn closed_until(&self, _uses: &[String]) -> Option<(String, SystemTime)> {
        None
    }
}
