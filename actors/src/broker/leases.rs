//! `Leases`: the entries this node's consumers hold, by queue and consumer.
//!
//! Kept outside every actor (an `Arc` shared by the consumers and the broker actor) so that a
//! restarted `BrokerActor` goes on renewing what the consumers still run: a crash of the
//! renewer must not let a long task's lease expire and be run again by another node. It
//! keeps each delivery too, so a restarted consumer finds the entries its previous
//! incarnation held (their task actors died with it) and runs them again at once.

use std::collections::HashMap;
use std::sync::Arc;

use dashmap::DashMap;

use super::Delivery;

/// Leased entries of this node.
#[derive(Debug, Default)]
pub struct Leases {
    held: DashMap<(String, String), HashMap<String, Arc<Delivery>>>,
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
    /// Records that `consumer` holds `delivery`.
    pub fn hold(&self, consumer: &str, delivery: &Arc<Delivery>) {
        self.held
            .entry((delivery.queue.clone(), consumer.to_string()))
            .or_default()
            .insert(delivery.entry.clone(), Arc::clone(delivery));
    }

    /// Takes every delivery `consumer` holds in `queue` (a restarted consumer adopting what
    /// its previous incarnation left).
    /// Its partitions' (`queue:1`, `queue:2`, …: a delivery is held under the stream it came
    /// from) are taken too.
    pub fn take(&self, queue: &str, consumer: &str) -> Vec<Arc<Delivery>> {
        let mine: Vec<(String, String)> = self
            .held
            .iter()
            .map(|e| e.key().clone())
            .filter(|(stream, who)| who == consumer && super::is_stream_of(stream, queue))
            .collect();
        let mut taken: Vec<Arc<Delivery>> = mine
            .into_iter()
            .filter_map(|key| self.held.remove(&key))
            .flat_map(|(_, held)| held.into_values())
            .collect();
        taken.sort_by(|a, b| a.entry.cmp(&b.entry));
        taken
    }

    /// Forgets `entry` (acked, retried or dead-lettered); true if it was held.
    pub fn release(&self, queue: &str, consumer: &str, entry: &str) -> bool {
        self.lost.remove(entry);
        match self
            .held
            .get_mut(&(queue.to_string(), consumer.to_string()))
        {
            Some(mut held) => held.remove(entry).is_some(),
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
                entries: e.value().keys().cloned().collect(),
            })
            .collect()
    }

    /// Marks entries whose lease another node took over (after it expired here).
    pub fn mark_lost(&self, queue: &str, consumer: &str, entries: &[String]) {
        if let Some(mut held) = self
            .held
            .get_mut(&(queue.to_string(), consumer.to_string()))
        {
            for entry in entries {
                held.remove(entry);
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

    use crate::broker::Envelope;

    fn delivery(queue: &str, entry: &str) -> Arc<Delivery> {
        Arc::new(Delivery {
            queue: queue.into(),
            entry: entry.into(),
            deliveries: 1,
            size: 0,
            envelope: Envelope::new("t", queue),
        })
    }

    #[test]
    fn hold_release_lose_and_take() {
        let leases = Leases::default();
        leases.hold("node-a", &delivery("chat", "1-0"));
        leases.hold("node-a", &delivery("chat", "2-0"));
        leases.hold("node-a", &delivery("default", "3-0"));
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
        let taken = leases.take("chat", "node-a");
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].entry, "2-0");
        assert_eq!(leases.count(), 0);
    }
}
