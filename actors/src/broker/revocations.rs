//! `Revocations`: what one node knows of the revocations kept by its broker — the ids and
//! until when they are kept — and the channel that tells this node's consumers of each one
//! ([`crate::broker::Records::revocations`]). Both brokers keep one: `memory://` as the
//! revocations themselves, Redis as a copy of `p:revoked`, caught up by `reserve` and by the
//! pub/sub subscription.
//!
//! Looking an id up costs no round trip (a consumer asks for every task it admits): one
//! atomic load while nothing is revoked, a map lookup otherwise.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use tokio::sync::broadcast;

use super::Revocation;

/// Revocations buffered for consumers that lag (a consumer busy for a moment); one that
/// lags more misses some, and its tasks are still dead-lettered when admitted.
const CHANNEL: usize = 1024;

/// One node's view of the kept revocations.
#[derive(Debug)]
pub(crate) struct Revocations {
    /// Task id → (kept until, epoch ms; terminate asked).
    ids: Mutex<HashMap<String, (u64, bool)>>,
    /// Fast path: false while `ids` is empty.
    any: AtomicBool,
    /// The broker's revocation counter this copy reflects (Redis `p:revoked:seq`); -1 before
    /// the first load.
    seq: AtomicI64,
    sender: broadcast::Sender<Revocation>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            ids: Mutex::default(),
            any: AtomicBool::new(false),
            seq: AtomicI64::new(-1),
            sender: broadcast::channel(CHANNEL).0,
        }
    }
}

impl Revocations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, bool)>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a revocation kept until `until_ms` and tells the consumers of it.
    pub(crate) fn add(&self, revocation: Revocation, until_ms: u64) {
        {
            let mut ids = self.lock();
            let entry = ids.entry(revocation.id.clone()).or_insert((0, false));
            entry.0 = entry.0.max(until_ms);
            entry.1 |= revocation.terminate;
            self.any.store(true, Ordering::Release);
        }
        // Nobody listening (no consumer yet) is fine: the map answers them at admission.
        let _ = self.sender.send(revocation);
    }

    /// Whether `id` is revoked at `now_ms`.
    pub(crate) fn contains(&self, id: &str, now_ms: u64) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return false;
        }
        self.lock()
            .get(id)
            .is_some_and(|(until, _)| *until > now_ms)
    }

    /// Forgets `id` (its dead letter was requeued: the operator wants it to run).
    pub(crate) fn remove(&self, id: &str) {
        let mut ids = self.lock();
        ids.remove(id);
        self.any.store(!ids.is_empty(), Ordering::Release);
    }

    /// The broker's counter this copy reflects (-1: never loaded).
    pub(crate) fn seq(&self) -> i64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Replaces the copy with what the broker keeps (`(id, until ms, terminate)`), as of its
    /// counter `seq`. Revocations that are new to this node are told to the consumers too
    /// (`announce`), so a running task revoked while this node was not listening is still
    /// stopped.
    pub(crate) fn replace(&self, kept: Vec<(String, u64, bool)>, seq: i64, announce: bool) {
        let mut fresh: HashMap<String, (u64, bool)> = HashMap::with_capacity(kept.len());
        for (id, until, terminate) in kept {
            let entry = fresh.entry(id).or_insert((0, false));
            entry.0 = entry.0.max(until);
            entry.1 |= terminate;
        }
        let told: Vec<Revocation> = if announce {
            fresh
                .iter()
                .map(|(id, (_, terminate))| Revocation {
                    id: id.clone(),
                    terminate: *terminate,
                })
                .collect()
        } else {
            Vec::new()
        };
        {
            let mut ids = self.lock();
            *ids = fresh;
            self.any.store(!ids.is_empty(), Ordering::Release);
            self.seq.store(seq, Ordering::Release);
        }
        for revocation in told {
            let _ = self.sender.send(revocation);
        }
    }

    /// A receiver of the revocations told from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revocation(id: &str, terminate: bool) -> Revocation {
        Revocation {
            id: id.into(),
            terminate,
        }
    }

    #[test]
    fn ids_are_kept_until_their_time_and_told_once() {
        let kept = Revocations::default();
        let mut told = kept.subscribe();
        assert!(!kept.contains("a", 0));
        kept.add(revocation("a", false), 1000);
        kept.add(revocation("a", true), 500);
        assert!(kept.contains("a", 999));
        assert!(!kept.contains("a", 1000), "expired");
        assert_eq!(told.try_recv().unwrap(), revocation("a", false));
        assert_eq!(told.try_recv().unwrap(), revocation("a", true));
        kept.remove("a");
        assert!(!kept.contains("a", 0));
        kept.replace(
            vec![("b".into(), 10, false), ("b".into(), 20, true)],
            7,
            true,
        );
        assert_eq!(kept.seq(), 7);
        assert!(kept.contains("b", 15));
        assert_eq!(
            told.try_recv().unwrap(),
            revocation("b", true),
            "terminate is sticky"
        );
        kept.replace(Vec::new(), 8, false);
        assert!(!kept.contains("b", 0));
        assert!(told.try_recv().is_err());
    }
}
