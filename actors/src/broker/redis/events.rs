//! The events stream (`p:events`): the one `XADD` that writes it, the writes of an attempt's
//! start (merged into its outcome or written on their own by the outcome writer), and the
//! events of a recovery sweep.

use std::time::SystemTime;

use redis::Pipeline;
use redis::Value;

use super::RedisBroker;
use super::codec::{StreamEntry, event, int, text};
use crate::broker::outcome::recovery_event;
use crate::broker::{BrokerError, Envelope, Event, rfc3339};

/// An attempt's start, handed to [`TaskQueue::started`](crate::broker::TaskQueue::started): its
/// record's start marker and its `started` event ([`start_write`]), written by the outcome
/// writer with the attempt's outcome or on their own.
#[derive(Debug)]
pub(super) struct Start {
    /// `p:result:<id>`.
    pub(super) record: String,
    /// The events stream it goes to (its stream's on a cluster).
    pub(super) events: std::sync::Arc<str>,
    /// The `started` event (its `at` is the marker's time).
    pub(super) event: Event,
    pub(super) attempt: u32,
    pub(super) consumer: String,
}

impl Start {
    /// The task's id (its event's `task_id`).
    pub(super) fn id(&self) -> &str {
        self.event.task_id.as_deref().unwrap_or_default()
    }
}

impl RedisBroker {
    /// Whether events are written (`[events] enabled`).
    pub(super) fn events_on(&self) -> bool {
        self.settings.events_maxlen > 0
    }

    /// Appends `event`'s `XADD` ([`xadd_whole`]) to `pipe`, unless events are off: to the
    /// events stream of `stream`'s tasks ([`Keys::events_of`](super::keys::Keys::events_of)),
    /// or of no task's for `None`.
    pub(super) fn add_whole_event(&self, pipe: &mut Pipeline, stream: Option<&str>, event: &Event) {
        if self.events_on() {
            let key = match stream {
                Some(stream) => self.keys.events_of(stream),
                None => self.keys.events(),
            };
            xadd_whole(pipe, &key, self.settings.events_maxlen, event);
        }
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

/// The writes of an attempt's start, as one outcome: its record's start marker (`HSET` of
/// `id`, `task`, `queue`, `started` = the attempt, `started_at`, `node`, `lost` = 0,
/// `updated_at`: a record this makes — an entry another producer wrote — has no state, read as
/// `running`) and its `started` event (unless events are off: `maxlen` 0). `with_outcome`: the
/// marker goes into the `HSET` of the attempt's outcome, which writes `id`, `task`, `queue` and
/// `updated_at` itself, so only the start's own fields are given.
pub(super) fn start_write(start: &Start, maxlen: usize, with_outcome: bool) -> Pipeline {
    let event = &start.event;
    let mut pipe = redis::pipe();
    let hset = pipe.cmd("HSET").arg(&start.record);
    if !with_outcome {
        hset.arg("id")
            .arg(start.id())
            .arg("task")
            .arg(event.task.as_deref().unwrap_or_default())
            .arg("queue")
            .arg(event.queue.as_deref().unwrap_or_default())
            .arg("updated_at")
            .arg(&event.at);
    }
    hset.arg("started")
        .arg(start.attempt)
        .arg("started_at")
        .arg(&event.at)
        .arg("node")
        .arg(&start.consumer)
        .arg("lost")
        .arg("0")
        .ignore();
    if maxlen > 0 {
        xadd_whole(&mut pipe, &start.events, maxlen, event);
    }
    pipe
}

/// Where the fields of an event `XADD` ([`xadd_event`]) start: after `XADD key MAXLEN ~ n *`.
pub(super) const XADD_FIELDS_AT: usize = 6;

/// The one place that writes the events stream: `XADD p:events MAXLEN ~ n * <kind> <rest>`
/// (reply ignored), the event as one field: its kind names it, its value is the rest of it as
/// one JSON object ([`event_value`]). Two arguments per event whatever it carries — Redis
/// parses, stores and (in `commit.lua`) hands over far less than one field per attribute.
/// The outcome writer adds an attempt's `started` event to its outcome's `XADD` as one more
/// field (see [`events_of_entry`]).
pub(super) fn xadd_event(
    pipe: &mut Pipeline,
    key: &str,
    maxlen: usize,
    kind: &str,
    at: &str,
    optional: [(&str, Option<&str>); 3],
    detail: &str,
) {
    let value = event_value(at, optional, detail);
    let mut xadd = redis::Cmd::with_capacity(8, 64 + key.len() + kind.len() + value.len());
    xadd.arg("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen)
        .arg("*")
        .arg(kind)
        .arg(value);
    pipe.add_command(xadd).ignore();
}

/// An event's stream value: `{"at":…,"task_id":…,"task":…,"queue":…,"detail":…}` (the three
/// optional ones only when given); `detail` is already JSON.
pub(super) fn event_value(at: &str, optional: [(&str, Option<&str>); 3], detail: &str) -> Vec<u8> {
    let given: usize = optional
        .iter()
        .filter_map(|(name, value)| value.map(|v| name.len() + v.len() + 8))
        .sum();
    let mut json = Vec::with_capacity(32 + at.len() + given + detail.len());
    json.extend_from_slice(b"{\"at\":");
    string_into(&mut json, at);
    for (name, value) in optional {
        if let Some(value) = value {
            json.extend_from_slice(b",\"");
            json.extend_from_slice(name.as_bytes());
            json.extend_from_slice(b"\":");
            string_into(&mut json, value);
        }
    }
    json.extend_from_slice(b",\"detail\":");
    json.extend_from_slice(detail.as_bytes());
    json.push(b'}');
    json
}

/// `text` as a JSON string (quoted, escaped) at the end of `json`.
fn string_into(json: &mut Vec<u8>, text: &str) {
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *json, text);
}

/// The rest of an event, as [`event_value`] writes it.
#[derive(serde::Deserialize)]
struct Rest {
    #[serde(default)]
    at: String,
    #[serde(default)]
    task_id: Option<String>,
    #[serde(default)]
    task: Option<String>,
    #[serde(default)]
    queue: Option<String>,
    #[serde(default)]
    detail: serde_json::Value,
}

/// The events of one stream entry, oldest first. An entry holds one event per field
/// ([`xadd_event`]: the kind, the rest as JSON) — two when an attempt's start was written with
/// its outcome. The first event's id is the entry's; the next ones add their place: `<entry>.1`.
/// An entry of the earlier layout (a field per attribute: `kind`, `at`, `task_id`, `task`,
/// `queue`, `detail`, written by nodes before this one and by the Lua scripts that write
/// events) is one event.
pub(super) fn events_of_entry(entry: StreamEntry) -> Vec<Event> {
    if entry.fields.iter().any(|(name, _)| name == "kind") {
        return vec![event(entry)];
    }
    let StreamEntry { id, fields, .. } = entry;
    fields
        .into_iter()
        .enumerate()
        .map(|(n, (kind, value))| {
            let rest = match serde_json::from_str::<Rest>(&value) {
                Ok(rest) => rest,
                // Not ours: shown as it is rather than dropped.
                Err(_) => Rest {
                    at: String::new(),
                    task_id: None,
                    task: None,
                    queue: None,
                    detail: serde_json::Value::String(value),
                },
            };
            Event {
                id: if n == 0 {
                    id.clone()
                } else {
                    format!("{id}.{n}")
                },
                kind: kind.into(),
                at: rest.at,
                task_id: rest.task_id,
                task: rest.task,
                queue: rest.queue,
                detail: rest.detail,
            }
        })
        .collect()
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
            self.add_whole_event(&mut pipe, Some(queue), &event);
        }
        self.query_pipe::<()>(&pipe).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, fields: &[(&str, &str)]) -> StreamEntry {
        StreamEntry {
            id: id.into(),
            fields: fields
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            not_utf8: Vec::new(),
        }
    }

    /// What `xadd_event` writes reads back as the event; a start written with its outcome is
    /// two events of one entry (`<entry>`, `<entry>.1`); an entry of the earlier layout is one.
    #[test]
    fn entries_read_back_as_their_events() {
        let mut pipe = redis::pipe();
        let optional = [
            ("task_id", Some("t\"1")),
            ("task", Some("chat.reply")),
            ("queue", None),
        ];
        xadd_event(
            &mut pipe,
            "rt:events",
            100,
            "started",
            "2026-12-06T07:00:00.000Z",
            optional,
            r#"{"attempt":0}"#,
        );
        xadd_event(
            &mut pipe,
            "rt:events",
            100,
            "succeeded",
            "2026-12-06T07:00:01.000Z",
            optional,
            "null",
        );
        let values: Vec<String> = pipe
            .cmd_iter()
            .map(|cmd| match cmd.args_iter().last() {
                Some(redis::Arg::Simple(value)) => String::from_utf8(value.to_vec()).unwrap(),
                _ => unreachable!(),
            })
            .collect();
        let events = events_of_entry(entry(
            "1732374000123-4",
            &[("started", &values[0]), ("succeeded", &values[1])],
        ));
        assert_eq!(
            serde_json::to_value(&events).unwrap(),
            serde_json::json!([
                {
                    "id": "1732374000123-4", "kind": "started", "at": "2026-12-06T07:00:00.000Z",
                    "task_id": "t\"1", "task": "chat.reply", "queue": null,
                    "detail": { "attempt": 0 }
                },
                {
                    "id": "1732374000123-4.1", "kind": "succeeded",
                    "at": "2026-12-06T07:00:01.000Z", "task_id": "t\"1", "task": "chat.reply",
                    "queue": null, "detail": null
                },
            ])
        );

        let old = events_of_entry(entry(
            "5-0",
            &[
                ("kind", "sent"),
                ("at", "x"),
                ("task_id", "t2"),
                ("detail", "{}"),
            ],
        ));
        assert_eq!(old.len(), 1);
        assert_eq!(
            (
                old[0].id.as_str(),
                old[0].kind.as_str(),
                old[0].task_id.as_deref()
            ),
            ("5-0", "sent", Some("t2"))
        );
        // A value that is not ours is shown, not dropped.
        let odd = events_of_entry(entry("6-0", &[("note", "not json")]));
        assert_eq!(odd[0].detail, serde_json::json!("not json"));
    }
}
