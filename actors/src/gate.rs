//! `ResourceGate`: asked before a task that declares resources (`uses = [...]`,
//! `degrades = [...]`) starts. Each declared resource is a [`Use`]: the resource and what the
//! task does while it cannot be called ([`Need`]):
//!
//! | the resource is | [`Need::Required`] (`uses`) | [`Need::Degradable`] (`degrades`) |
//! |---|---|---|
//! | open (callable) | runs | runs |
//! | closed (its circuit breaker is open) | deferred to the time the gate names, without spending an attempt | runs; its calls get the resource's degraded answers |
//! | misconfigured (it answered `401`/`403`; see [`crate::resource::auth`]) | fails permanently with the reason | runs; its calls get the degraded answers |
//! | unusable (its API key is not set) | fails permanently with the reason | fails permanently with the reason |
//!
//! Deferral bounds the calls to a dead dependency by the breaker, not by the number of
//! messages (docs/tasks.md, "Running tasks"); a permanent failure runs the task's
//! `link_error` callbacks — never a silent skip. A task that can do without a resource (chat
//! without its memory) declares it `degrades` and goes on while it is down. A missing key
//! fails even those: it is a deployment error known at start (`runtime check` warns), not an
//! outage.
//!
//! When several resources disagree, a permanent failure wins over a deferral (deferring a task
//! that would then fail gains nothing), and among the same kind the first declared decides.

use std::fmt;
use std::time::SystemTime;

/// What a task does while a resource it declares cannot be called (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `uses`: deferred while the resource is closed, failed while it is misconfigured.
    Required,
    /// `degrades`: runs while the resource is closed or misconfigured.
    Degradable,
}

/// A resource a task declares, and how much it needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Use {
    /// The resource (`[resources.NAME]`).
    pub resource: String,
    /// What the task does while it cannot be called.
    pub need: Need,
}

impl Use {
    /// A resource the task cannot run without (`uses`).
    pub fn required(resource: &str) -> Self {
        Self {
            resource: resource.to_string(),
            need: Need::Required,
        }
    }

    /// A resource the task can do without (`degrades`).
    pub fn degradable(resource: &str) -> Self {
        Self {
            resource: resource.to_string(),
            need: Need::Degradable,
        }
    }
}

/// A resource's state as the gate sees it, and the gate's answer for one task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every resource may be called (or the task can do without the ones that may not).
    Open,
    /// `resource` is closed until `until`: defer the task to then.
    ClosedUntil {
        resource: String,
        /// Its next probe time.
        until: SystemTime,
    },
    /// `resource` refused the node's credentials (`401`/`403`): fail the task permanently.
    Misconfigured {
        resource: String,
        /// What it refused, and what to check.
        reason: String,
    },
    /// `resource` cannot be used (e.g. its API key is missing): fail the task permanently.
    Unusable { resource: String, reason: String },
}

impl Admission {
    /// The answer for a task that declares a resource in this state with `need` (module
    /// docs): `Open` when the task runs anyway.
    pub fn for_need(self, need: Need) -> Self {
        match (self, need) {
            (Admission::ClosedUntil { .. } | Admission::Misconfigured { .. }, Need::Degradable) => {
                Admission::Open
            }
            (admission, _) => admission,
        }
    }

    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Admission::Misconfigured { .. } | Admission::Unusable { .. }
        )
    }
}

/// Whether resources may be called now.
pub trait ResourceGate: Send + Sync + fmt::Debug {
    /// The admission of a task that declares `uses`.
    fn admit(&self, uses: &[Use]) -> Admission;
}

#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysOpen;

impl ResourceGate for AlwaysOpen {
    fn admit(&self, _uses: &[Use]) -> Admission {
        Admission::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degradable_uses_run_while_closed_or_misconfigured_but_not_without_a_key() {
        let closed = Admission::ClosedUntil {
            resource: "zep".into(),
            until: SystemTime::UNIX_EPOCH,
        };
        let misconfigured = Admission::Misconfigured {
            resource: "zep".into(),
            reason: "zep answered 401 Unauthorized to GET /x".into(),
        };
        let unusable = Admission::Unusable {
            resource: "zep".into(),
            reason: "ZEP_API_KEY is not set".into(),
        };
        for state in [&closed, &misconfigured, &unusable] {
            assert_eq!(&state.clone().for_need(Need::Required), state);
        }
        assert_eq!(closed.for_need(Need::Degradable), Admission::Open);
        assert_eq!(misconfigured.for_need(Need::Degradable), Admission::Open);
        assert_eq!(unusable.clone().for_need(Need::Degradable), unusable);
        assert!(unusable.is_permanent());
        assert!(!Admission::Open.is_permanent());
    }
}
