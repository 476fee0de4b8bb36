//! Redis replies to the broker's types and back: stream entries, dead letters, events,
//! records (`p:result:<id>` hashes).

use std::borrow::Cow;

use redis::Value;

use crate::broker::{DeadLetter, Envelope, Event, EventKind, StoredRecord, TaskState};

/// A record as the fields of its hash (`HSET p:result:<id>`), the inverse of
/// [`stored_record`]: what it holds, nothing for what is absent. The id is the key's, and
/// `updated_at` is left out while it equals `enqueued_at` (it reads as that) — an enqueue,
/// which writes [`StoredRecord::enqueued`] this way (in its pipeline or as `enqueue.lua`'s
/// argument), pays for no more than `task`, `queue`, `state`, `enqueued_at` and a `due`.
pub(super) fn record_fields(record: &StoredRecord) -> Vec<(&'static str, Cow<'_, str>)> {
    let updated_at =
        Some(record.updated_at.as_str()).filter(|&at| record.enqueued_at.as_deref() != Some(at));
    let texts = [
        ("task", Some(record.task.as_str())),
        ("queue", Some(record.queue.as_str())),
        ("state", record.state.map(TaskState::name)),
        ("error", record.error.as_deref()),
        ("started_at", record.started_at.as_deref()),
        ("node", record.node.as_deref()),
        ("enqueued_at", record.enqueued_at.as_deref()),
        ("updated_at", updated_at),
    ];
    let mut fields: Vec<(&'static str, Cow<'_, str>)> = texts
        .into_iter()
        .filter_map(|(name, value)| Some((name, Cow::Borrowed(value.filter(|v| !v.is_empty())?))))
        .collect();
    let numbers = [
        ("due", record.due_ms),
        (
            "attempts",
            Some(u64::from(record.attempts)).filter(|&n| n > 0),
        ),
        ("started", record.started.map(u64::from)),
        ("lost", record.lost.then_some(1)),
    ];
    for (name, value) in numbers {
        if let Some(value) = value {
            fields.push((name, Cow::Owned(value.to_string())));
        }
    }
    if let Some(result) = &record.result {
        fields.push(("result", Cow::Owned(result.to_string())));
    }
    fields
}

/// A record as read from its hash (`HGETALL p:result:<id>`). Fields a careless writer left
/// out or garbled read as absent; only a `state` that is no state is an error.
pub(super) fn stored_record(id: &str, fields: &[(String, String)]) -> Result<StoredRecord, String> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let state = match get("state") {
        None => None,
        Some(name) => match TaskState::from_name(name).filter(|s| *s != TaskState::Running) {
            Some(state) => Some(state),
            None => return Err(format!("record {id}: unknown state `{name}`")),
        },
    };
    let owned = |name: &str| get(name).map(str::to_string);
    Ok(StoredRecord {
        id: get("id").unwrap_or(id).to_string(),
        task: owned("task").unwrap_or_default(),
        queue: owned("queue").unwrap_or_default(),
        state,
        due_ms: get("due").and_then(|due| due.parse().ok()),
        result: get("result").and_then(|result| serde_json::from_str(result).ok()),
        error: owned("error"),
        attempts: get("attempts").and_then(|n| n.parse().ok()).unwrap_or(0),
        started: get("started").and_then(|n| n.parse().ok()),
        lost: get("lost") == Some("1"),
        started_at: owned("started_at"),
        node: owned("node"),
        enqueued_at: owned("enqueued_at"),
        updated_at: owned("updated_at")
            .or_else(|| owned("enqueued_at"))
            .unwrap_or_default(),
    })
}

/// One stream entry as read: id and fields in order.
#[derive(Debug)]
pub(super) struct StreamEntry {
    pub(super) id: String,
    pub(super) fields: Vec<(String, String)>,
    /// Names of the fields whose value was not valid UTF-8 (decoded lossily in `fields`).
    pub(super) not_utf8: Vec<String>,
}

/// Text of a reply value (bulk strings that are not UTF-8 are decoded lossily).
pub(super) fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::Int(n) => n.to_string(),
        Value::Okay => "OK".to_string(),
        _ => String::new(),
    }
}

pub(super) fn into_text(value: Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()),
        Value::SimpleString(s) => s,
        other => text(&other),
    }
}

pub(super) fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        other => text(other).parse().unwrap_or(0),
    }
}

/// Field/value pairs of a hash or stream entry reply (a flat array in RESP2, a map in RESP3).
pub(super) fn pairs(value: Value) -> Vec<(String, String)> {
    match value {
        Value::Map(map) => map
            .into_iter()
            .map(|(k, v)| (into_text(k), into_text(v)))
            .collect(),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                out.push((into_text(k), into_text(v)));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Names of the fields of a stream entry reply whose value is a bulk string that is not UTF-8.
pub(super) fn not_utf8_fields(value: &Value) -> Vec<String> {
    let bad =
        |v: &Value| matches!(v, Value::BulkString(bytes) if std::str::from_utf8(bytes).is_err());
    match value {
        Value::Map(map) => map
            .iter()
            .filter(|(_, v)| bad(v))
            .map(|(k, _)| text(k))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter(|pair| pair.len() == 2 && bad(&pair[1]))
            .map(|pair| text(&pair[0]))
            .collect(),
        _ => Vec::new(),
    }
}

/// Entries of an `XRANGE` reply (or of one stream in an `XREADGROUP` reply).
pub(super) fn stream_entries(value: Value) -> Vec<StreamEntry> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let mut parts = parts.into_iter();
            let id = into_text(parts.next()?);
            let raw = parts.next();
            let not_utf8 = raw.as_ref().map(not_utf8_fields).unwrap_or_default();
            let fields = raw.map(pairs).unwrap_or_default();
            Some(StreamEntry {
                id,
                fields,
                not_utf8,
            })
        })
        .collect()
}

/// Entries of an `XREADGROUP` reply for one stream (nil when the block timed out).
pub(super) fn read_reply(value: Value) -> Vec<StreamEntry> {
    match value {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|stream| match stream {
                Value::Array(parts) => parts
                    .into_iter()
                    .nth(1)
                    .map(stream_entries)
                    .unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams
            .into_iter()
            .flat_map(|(_, entries)| stream_entries(entries))
            .collect(),
        _ => Vec::new(),
    }
}

/// A dead letter from its stream entry (`raw` when `e` is not a valid envelope).
pub(super) fn dead_letter(entry: StreamEntry) -> DeadLetter {
    let mut letter = DeadLetter {
        entry: entry.id,
        reason: String::new(),
        attempts: 0,
        at: String::new(),
        envelope: None,
        raw: None,
    };
    let mut e = String::new();
    let mut raw = false;
    for (name, value) in entry.fields {
        match name.as_str() {
            "e" => e = value,
            "reason" => letter.reason = value,
            "attempts" => letter.attempts = value.parse().unwrap_or(0),
            "at" => letter.at = value,
            "raw" => raw = value == "1",
            _ => {}
        }
    }
    if !raw {
        letter.envelope = Envelope::from_json(&e).ok();
    }
    if letter.envelope.is_none() {
        letter.raw = Some(e);
    }
    letter
}

/// An event from its stream entry.
pub(super) fn event(entry: StreamEntry) -> Event {
    let mut event = Event {
        id: entry.id,
        kind: EventKind::Other(String::new()),
        at: String::new(),
        task_id: None,
        task: None,
        queue: None,
        detail: serde_json::Value::Null,
    };
    for (name, value) in entry.fields {
        match name.as_str() {
            "kind" => event.kind = value.into(),
            "at" => event.at = value,
            "task_id" => event.task_id = Some(value),
            "task" => event.task = Some(value),
            "queue" => event.queue = Some(value),
            "detail" => {
                event.detail =
                    serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value))
            }
            _ => {}
        }
    }
    event
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record written as its fields reads back as itself: the enqueued one (its few fields)
    /// and one with every field set.
    #[test]
    fn record_fields_read_back_as_the_record() {
        let mut envelope = Envelope::new("t1", "default");
        envelope.enqueued_at = "2026-01-01T00:00:00.000Z".into();
        let enqueued = StoredRecord::enqueued(&envelope, Some(42), &envelope.enqueued_at);
        let names: Vec<&str> = record_fields(&enqueued).iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["task", "queue", "state", "enqueued_at", "due"]);
        let full = StoredRecord {
            state: Some(TaskState::Retrying),
            result: Some(serde_json::json!({"a": [1, 2]})),
            error: Some("boom".into()),
            attempts: 2,
            started: Some(1),
            lost: true,
            started_at: Some("2026-01-01T00:00:01.000Z".into()),
            node: Some("n1".into()),
            updated_at: "2026-01-01T00:00:02.000Z".into(),
            ..enqueued.clone()
        };
        for record in [enqueued, full] {
            let fields: Vec<(String, String)> = record_fields(&record)
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.into_owned()))
                .collect();
            assert_eq!(stored_record(&record.id, &fields).unwrap(), record);
        }
    }
}
