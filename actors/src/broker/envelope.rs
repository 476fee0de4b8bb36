//! The task envelope (DESIGN.md §3): what travels through the broker, as JSON.
//!
//! Producers may be Python code that `XADD`s directly, so parsing is lenient where it can be
//! (missing `args`, `kwargs`, `attempt`, … default) and strict where it must be (`task` and
//! `queue` are required). Fields this version does not know are kept in `extra` and written
//! back unchanged: a newer producer's data is never dropped by an older node.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A callback (`link` / `link_error`): a task to enqueue when this one succeeds or fails.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Callback {
    /// Task name.
    pub task: String,
    /// Queue override; the task's configured queue when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    /// Positional arguments (the result or error is appended when enqueued).
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
}

/// One task invocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Task id (a UUID unless the producer chose one); the key of its result.
    #[serde(default)]
    pub id: String,
    /// Task name, as defined under `[tasks.NAME]`.
    pub task: String,
    /// Queue it travels on.
    pub queue: String,
    /// Positional arguments.
    #[serde(default)]
    pub args: Vec<Value>,
    /// Keyword arguments.
    #[serde(default)]
    pub kwargs: Map<String, Value>,
    /// Attempts already made (0 for the first run).
    #[serde(default)]
    pub attempt: u32,
    /// Not before this time (RFC 3339); `None` runs as soon as possible.
    #[serde(default)]
    pub eta: Option<String>,
    /// Not after this time (RFC 3339): an expired task is dead-lettered unrun.
    #[serde(default)]
    pub expires: Option<String>,
    /// A duplicate enqueue with the same key (within the idempotency TTL) returns the first
    /// task's id instead of enqueuing again.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Hard time limit override in milliseconds.
    #[serde(default)]
    pub time_limit_ms: Option<u64>,
    /// Soft time limit override in milliseconds.
    #[serde(default)]
    pub soft_time_limit_ms: Option<u64>,
    /// Enqueued with the result when the task succeeds.
    #[serde(default)]
    pub link: Vec<Callback>,
    /// Enqueued with the error when the task fails for good.
    #[serde(default)]
    pub link_error: Vec<Callback>,
    /// Trace id shared by a task and everything it causes.
    #[serde(default)]
    pub trace_id: Option<String>,
    /// The task that enqueued this one.
    #[serde(default)]
    pub parent_id: Option<String>,
    /// The first task of the chain.
    #[serde(default)]
    pub root_id: Option<String>,
    /// When it was first enqueued (RFC 3339); set by the broker when empty.
    #[serde(default)]
    pub enqueued_at: String,
    /// Fields this version does not know, kept as they came.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Envelope {
    /// A fresh envelope for `task` on `queue` with no arguments.
    pub fn new(task: impl Into<String>, queue: impl Into<String>) -> Self {
        Self {
            id: String::new(),
            task: task.into(),
            queue: queue.into(),
            args: Vec::new(),
            kwargs: Map::new(),
            attempt: 0,
            eta: None,
            expires: None,
            idempotency_key: None,
            time_limit_ms: None,
            soft_time_limit_ms: None,
            link: Vec::new(),
            link_error: Vec::new(),
            trace_id: None,
            parent_id: None,
            root_id: None,
            enqueued_at: String::new(),
            extra: Map::new(),
        }
    }

    /// Parses an envelope as found in a queue, naming what is wrong (`missing field `task``,
    /// …). A queued envelope must carry its `id` (the key of its record): the broker fills it
    /// in at enqueue, and a producer writing to the stream directly must set a unique one.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let envelope: Self = serde_json::from_str(text)?;
        if envelope.id.is_empty() {
            return Err(serde::de::Error::custom(
                "missing field `id` (a producer writing to the queue directly must set a unique id)",
            ));
        }
        Ok(envelope)
    }

    /// The trace this task belongs to: its `trace_id` (set at enqueue when the producer gave
    /// none), else — for an envelope a producer wrote to the queue directly without one — its
    /// `root_id`, else its own id. Stable across retries; callbacks inherit it.
    pub fn trace(&self) -> &str {
        self.trace_id
            .as_deref()
            .or(self.root_id.as_deref())
            .unwrap_or(&self.id)
    }

    /// Serialises the envelope (cannot fail: every field is plain JSON).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_producer_json_parses_and_unknown_fields_survive_a_round_trip() {
        let text = r#"{"id":"m-1","task":"process_chat_message","queue":"chat","args":[1],"celery_origin":"web-1","headers":{"x":1}}"#;
        let env = Envelope::from_json(text).unwrap();
        assert_eq!(env.task, "process_chat_message");
        assert_eq!(env.attempt, 0);
        assert_eq!(env.extra["celery_origin"], "web-1");
        let again = Envelope::from_json(&env.to_json()).unwrap();
        assert_eq!(again, env);
        assert_eq!(again.extra["headers"]["x"], 1);
    }

    #[test]
    fn missing_and_mistyped_fields_are_named() {
        let err = Envelope::from_json(r#"{"queue":"chat"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `task`"), "{err}");
        let err = Envelope::from_json(r#"{"task":"t","queue":"q","attempt":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid type"), "{err}");
        let err = Envelope::from_json(r#"{"task":"t","queue":"q"}"#).unwrap_err();
        assert!(err.to_string().starts_with("missing field `id`"), "{err}");
    }
}
