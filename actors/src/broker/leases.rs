//! `Leases`: the entries this node's consumers hold, by queue and consumer.
//!
//! Kept outside every actor (an `Arc` shared by the consumers and the broker actor) so that a
//! restarted `BrokerActor` goes on renewing what the consumers still run: a crash of the
//! renewer must not let a long task's lease expire and be run again by another node.

use std::collections::HashSet;

use dashmap::DashMap;

/// Leased entries of this node.
#[derive(Debug, Default)]
pub struct Leases {
    held: DashMap<(String, String), HashSet<String>>,
    lost: DashMap<String, ()>,
}

/// The entries one consumer holds in one queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// Queue.
    pub queue: String,
    /// Consumer name.
    pub consumer: String,
    /// Entry ids.
    pub entries: Vec<String>,
}

impl Leases {
    /// Records that `consumer` holds `entry` of `queue`.
    pub fn hold(&self, queue: &str, consumer: &str, entry: &str) {
        self.held
            .entry((queue.to_string(), consumer.to_string()))
            .or_default()
            .insert(entry.to_string());
    }

    /// Forgets `entry` (acked, retried or dead-lettered); true if it was held.
    pub fn release(&self, queue: &str, consumer: &str, entry: &str) -> bool {
        self.lost.remove(entry);
        match self
            .held
            .get_mut(&(queue.to_string(), consumer.to_string()))
        {
            Some(mut set) => set.remove(entry),
            None => false,
        }
    }

    /// Every held entry, grouped by queue and consumer (for renewal).
    pub fn held(&self) -> Vec<Held> {
        self.held
            .iter()
            .filter(|e| !e.value().is_empty())
            .map(|e| Held {
                queue: e.key().0.clone(),
                consumer: e.key().1.clone(),
                entries: e.value().iter().cloned().collect(),
            })
            .collect()
    }

    /// Marks entries whose lease another node took over (after it expired here).
    pub fn mark_lost(&self, queue: &str, consumer: &str, entries: &[String]) {
        if let Some(mut set) = self
            .held
            .get_mut(&(queue.to_string(), consumer.to_string()))
        {
            for entry in entries {
                set.remove(entry);
                self.lost.insert(entry.clone(), ());
            }
        }
    }

    /// Whether `entry`'s lease was lost (its task may be running elsewhere too).
    pub fn is_lost(&self, entry: &str) -> bool {
        self.lost.contains_key(entry)
    }

    /// Number of held entries.
    pub fn count(&self) -> usize {
        self.held.iter().map(|e| e.value().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_release_and_lose() {
        let leases = Leases::default();
        leases.hold("chat", "node-a", "1-0");
        leases.hold("chat", "node-a", "2-0");
        leases.hold("default", "node-a", "3-0");
        assert_eq!(leases.count(), 3);
        assert!(leases.release("chat", "node-a", "1-0"));
        assert!(!leases.release("chat", "node-a", "1-0"));
        leases.mark_lost("default", "node-a", &["3-0".to_string()]);
        assert!(leases.is_lost("3-0"));
        let held = leases.held();
        assert_eq!(
            held,
            [Held {
                queue: "chat".into(),
                consumer: "node-a".into(),
                entries: vec!["2-0".into()]
            }]
        );
    }
}
