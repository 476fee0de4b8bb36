//! `EventSink`: how code that must never wait (a supervisor handling an exit, a breaker under
//! its lock, a pool under its membership lock) puts an [`Event`] on the events stream.
//!
//! [`EventSink::emit`] is a `try_send` on a bounded channel: it never blocks and never awaits.
//! One writer task per node drains the channel and calls [`Records::publish`] for each event,
//! in emission order. When the broker is slow or down and the channel is full, new events
//! are dropped and counted ([`EventSink::dropped`]) rather than slowing the emitter — the
//! events stream is for observation; the task records and the tree stay authoritative.
//!
//! Task lifecycle events are not written through the sink: the broker writes them itself in
//! the same round trip as the state change (`enqueue`, `ack`, `retry`, …).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Event, Records};

/// Events buffered while the writer is busy; beyond it new ones are dropped.
pub const SINK_CAPACITY: usize = 4096;

/// A cheap, cloneable handle that publishes events without waiting.
#[derive(Clone, Debug)]
pub struct EventSink {
    tx: mpsc::Sender<Event>,
    dropped: Arc<AtomicU64>,
}

impl EventSink {
    /// A sink whose events `broker` publishes, through a writer task spawned on the current
    /// tokio runtime. The task ends when the last handle is dropped.
    pub fn spawn<B: Records>(broker: Arc<B>) -> Self {
        let (sink, mut rx) = Self::channel(SINK_CAPACITY);
        tokio::spawn(async move {
            let mut failing = false;
            while let Some(event) = rx.recv().await {
                match broker.publish(event).await {
                    Ok(()) if failing => {
                        failing = false;
                        debug!("events are written again");
                    }
                    Ok(()) => {}
                    Err(err) if !failing => {
                        failing = true;
                        warn!(error = %err, "an event could not be written (more may follow)");
                    }
                    Err(_) => {}
                }
            }
        });
        sink
    }

    /// A sink and the receiving end of its channel (tests read the events from it).
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let sink = Self {
            tx,
            dropped: Arc::default(),
        };
        (sink, rx)
    }

    /// Queues `event` for publishing; drops it (and counts it) when the queue is full.
    pub fn emit(&self, event: Event) {
        if self.tx.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Events dropped because the writer could not keep up (or had stopped).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::broker::BrokerSettings;
    use crate::broker::memory::MemoryBroker;

    #[tokio::test]
    async fn emitted_events_are_published_in_order_and_overflow_is_counted() {
        let broker = Arc::new(MemoryBroker::new(BrokerSettings::default()));
        let sink = EventSink::spawn(Arc::clone(&broker));
        for n in 0..3 {
            sink.emit(Event::new("actor_restarted", json!({ "n": n })));
        }
        let mut events = Vec::new();
        for _ in 0..200 {
            events = broker.events(None, 10).await.unwrap();
            if events.len() == 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let ns: Vec<_> = events.iter().map(|e| e.detail["n"].clone()).collect();
        assert_eq!(ns, [json!(0), json!(1), json!(2)]);
        assert_eq!(sink.dropped(), 0);

        let (full, _rx) = EventSink::channel(1);
        full.emit(Event::new("a", json!(null)));
        full.emit(Event::new("b", json!(null)));
        assert_eq!(full.dropped(), 1, "the second one did not fit");
    }
}
