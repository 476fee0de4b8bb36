//! The events stream (`p:events`): the one `XADD` that writes it, the starts of attempts
//! written with the next outcome or by the flusher, and the events of a recovery sweep.

use std::sync::{Mutex, Weak};
use std::time::SystemTime;

use redis::Pipeline;
use redis::Value;
use redis::aio::ConnectionManager;

use super::RedisBroker;
use super::codec::{int, text};
use super::connection::lock;
use crate::broker::outcome::recovery_event;
use crate::broker::{BrokerError, EVENT_FLUSH, Envelope, Event, rfc3339};

/// An attempt's start, handed to [`TaskQueue::started`](crate::broker::TaskQueue::started): its record's start marker and its
/// `started` event, written later in one go ([`soon_pipeline`]).
#[derive(Debug)]
pub(super) struct Start {
    /// `p:result:<id>`.
    pub(super) record: String,
    /// The `started` event (its `at` is the marker's time).
    pub(super) event: Event,
    pub(super) attempt: u32,
    pub(super) consumer: String,
}

impl RedisBroker {
    /// Whether events are written (`[events] enabled`).
    pub(super) fn events_on(&self) -> bool {
        self.settings.events_maxlen > 0
    }

    /// Appends `event`'s `XADD` ([`xadd_whole`]) to `pipe`, unless events are off.
    pub(super) fn add_whole_event(&self, pipe: &mut Pipeline, event: &Event) {
        if self.events_on() {
            xadd_whole(pipe, &self.events_key, self.settings.events_maxlen, event);
        }
    }

    /// The starts handed to `started`, taken out of the buffer as one pipeline
    /// ([`soon_pipeline`]; `None` when there are none).
    pub(super) fn take_soon(&self) -> Option<Pipeline> {
        let soon = std::mem::take(&mut *lock(&self.soon));
        if soon.is_empty() {
            return None;
        }
        Some(soon_pipeline(
            &soon,
            &self.events_key,
            self.settings.events_maxlen,
        ))
    }
}

/// [`xadd_event`] for a whole [`Event`].
pub(super) fn xadd_whole(pipe: &mut Pipeline, key: &str, maxlen: usize, event: &Event) {
    xadd_event(
        pipe,
        key,
        maxlen,
        event.kind.as_str(),
        &event.at,
        [
            ("task_id", event.task_id.as_deref()),
            ("task", event.task.as_deref()),
            ("queue", event.queue.as_deref()),
        ],
        &event.detail.to_string(),
    );
}

/// The writes of attempts' starts: per start, its record's start marker (`HSET` of `id`,
/// `task`, `queue`, `started` = the attempt, `started_at`, `node`, `lost` = 0, `updated_at`: a record
/// this makes — an entry another producer wrote — has no state, read as `running`) and its
/// `started` event (unless events are off: `maxlen` 0).
pub(super) fn soon_pipeline(starts: &[Start], events_key: &str, maxlen: usize) -> Pipeline {
    let mut pipe = redis::pipe();
    for start in starts {
        let event = &start.event;
        pipe.cmd("HSET")
            .arg(&start.record)
            .arg("id")
            .arg(event.task_id.as_deref().unwrap_or_default())
            .arg("task")
            .arg(event.task.as_deref().unwrap_or_default())
            .arg("queue")
            .arg(event.queue.as_deref().unwrap_or_default())
            .arg("started")
            .arg(start.attempt)
            .arg("started_at")
            .arg(&event.at)
            .arg("node")
            .arg(&start.consumer)
            .arg("lost")
            .arg("0")
            .arg("updated_at")
            .arg(&event.at)
            .ignore();
        if maxlen > 0 {
            xadd_whole(&mut pipe, events_key, maxlen, event);
        }
    }
    pipe
}

/// Writes the starts handed to `started` that no outcome took along, every
/// [`EVENT_FLUSH`], until the broker is dropped.
pub(super) async fn flush_soon(
    soon: Weak<Mutex<Vec<Start>>>,
    mut conn: ConnectionManager,
    key: String,
    maxlen: usize,
) {
    loop {
        tokio::time::sleep(EVENT_FLUSH).await;
        let Some(soon) = soon.upgrade() else { return };
        let starts = std::mem::take(&mut *lock(&soon));
        drop(soon);
        if starts.is_empty() {
            continue;
        }
        let pipe = soon_pipeline(&starts, &key, maxlen);
        if let Err(err) = pipe.query_async::<()>(&mut conn).await {
            tracing::debug!(error = %err, starts = starts.len(), "starts (records, events) not written");
        }
    }
}

/// The one place that writes the events stream: `XADD p:events MAXLEN ~ n * kind … at …
/// [task_id …] [task …] [queue …] detail …` (reply ignored).
pub(super) fn xadd_event(
    pipe: &mut Pipeline,
    key: &str,
    maxlen: usize,
    kind: &str,
    at: &str,
    optional: [(&str, Option<&str>); 3],
    detail: &str,
) {
    let cmd = pipe
        .cmd("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen)
        .arg("*")
        .arg("kind")
        .arg(kind)
        .arg("at")
        .arg(at);
    for (name, value) in optional {
        if let Some(value) = value {
            cmd.arg(name).arg(value);
        }
    }
    cmd.arg("detail").arg(detail).ignore();
}

impl RedisBroker {
    /// Events for what `recover.lua` did (`kind, e, deliveries, consumer` per entry).
    pub(super) async fn recovery_events(
        &self,
        queue: &str,
        moved: &[Value],
    ) -> Result<(), BrokerError> {
        if moved.is_empty() || !self.events_on() {
            return Ok(());
        }
        let at = rfc3339(SystemTime::now());
        let mut pipe = redis::pipe();
        for entry in moved.chunks(4) {
            let [kind, e, deliveries, consumer] = entry else {
                continue;
            };
            let envelope = Envelope::from_json(&text(e)).ok();
            let event = recovery_event(
                text(kind) == "dead",
                envelope.as_ref(),
                queue,
                u64::try_from(int(deliveries)).unwrap_or(0),
                &text(consumer),
                &at,
            );
            self.add_whole_event(&mut pipe, &event);
        }
        self.query_pipe::<()>(&pipe).await
    }
}
