//! The task envelope (docs/tasks.md, "Tasks and delivery guarantees"): what travels through the broker, as JSON.
//!
//! Producers may be Python code that `XADD`s directly, so parsing is lenient where it can be
//! (missing `args`, `kwargs`, `attempt`, … default) and strict where it must be (`task` and
//! `queue` are required). Fields this version does not know are kept in `extra` and written
//! back unchanged: a newer producer's data is never dropped by an older node.
//!
//! Task ids ([`check_id`]): a producer may choose a task's id (a Celery id, a deterministic
//! `telegram:process:a1b2c3d4`) instead of getting a UUID. Every way in checks it with the one
//! rule here — `POST /tasks` (a 400 naming `[n].id`), `Broker::enqueue`, an entry read from a
//! queue ([`Envelope::from_json`]: dead-lettered as malformed with the reason), and the Celery
//! bridge's `take.lua` (the same rule in Lua, with [`MAX_ID_BYTES`] passed in).
//!
//! Its times and limits are text and numbers from outside: they are read through
//! [`Envelope::due`], [`Envelope::expiry`] and [`Envelope::limits`], which check them against
//! the caps of [`crate::caps`] and name the field that is wrong ([`FieldError`]). `POST /tasks`
//! answers such an error with a `400`, `enqueue` refuses the envelope, and the consumer
//! dead-letters an entry that carries one with the error as the reason.

#![warn(missing_docs)]

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::parse_time;
use crate::caps::{self, MAX_DELAY, MAX_TIME_LIMIT, Unit};

/// A field of an envelope whose value cannot be used, and why (`time_limit_ms: must be longer
/// than zero`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {why}")]
pub struct FieldError {
    /// The field's name.
    pub field: &'static str,
    /// What is wrong with its value.
    pub why: String,
}

impl FieldError {
    fn new(field: &'static str, why: impl Into<String>) -> Self {
        Self {
            field,
            why: why.into(),
        }
    }
}

/// The longest task id accepted, in bytes of UTF-8. Ids are Redis key parts
/// (`p:result:<id>`, members of `p:revoked`), log fields and URL path segments; 256 holds a UUID, a Celery
/// id or a composed `source:action:hash` id with room to spare.
pub const MAX_ID_BYTES: usize = 256;

/// Checks a task id chosen by a producer: not empty, at most [`MAX_ID_BYTES`] bytes, no control
/// character (C0, DEL, C1: they would split log lines and cannot be typed into a URL), and not
/// `.` or `..` (HTTP clients resolve those path segments away, so `GET /tasks/{id}` could never
/// read them back). Anything else — `/`, `%`, spaces, `?`, any Unicode — is accepted and read
/// back percent-encoded (`GET /tasks/a%2Fb` is the record of `a/b`). `Err` says why, without
/// repeating the id (it may be long or unprintable).
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty (leave `id` out to get a generated one)".into());
    }
    if id.len() > MAX_ID_BYTES {
        return Err(format!(
            "is {} bytes, over the limit of {MAX_ID_BYTES}",
            id.len()
        ));
    }
    if let Some((at, c)) = id.char_indices().find(|(_, c)| c.is_control()) {
        return Err(format!(
            "holds a control character (U+{:04X} at byte {at})",
            u32::from(c)
        ));
    }
    if id == "." || id == ".." {
        return Err(format!(
            "`{id}` cannot be read back at GET /tasks/{{id}} (HTTP clients resolve it away)"
        ));
    }
    Ok(())
}

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
    pub eta: Option<Timestamp>,
    /// Not after this time (RFC 3339): an expired task is dead-lettered unrun.
    #[serde(default)]
    pub expires: Option<Timestamp>,
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

/// A time field of an envelope (`eta`, `expires`): the text as it came, parsed once when the
/// envelope is read or built. It is written back as that same text, so an entry keeps its wire
/// form (older nodes and foreign producers read and write RFC 3339 text); a text that is not a
/// time is kept with its parse error, which whoever checks the field reports (an enqueue is
/// refused, a delivery dead-lettered naming the field) — never ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct Timestamp {
    text: String,
    parsed: Result<SystemTime, String>,
}

impl Timestamp {
    /// `at` as RFC 3339 (milliseconds, UTC), as the runtime writes times.
    pub fn at(at: SystemTime) -> Self {
        Self::from(super::rfc3339(at))
    }

    /// The time, or why the text is not one (`` `soon` is not an RFC 3339 time: … ``).
    pub fn time(&self) -> Result<SystemTime, String> {
        self.parsed.clone()
    }

    /// The text as it came.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl From<String> for Timestamp {
    fn from(text: String) -> Self {
        let parsed = parse_time(&text);
        Self { text, parsed }
    }
}

impl From<&str> for Timestamp {
    fn from(text: &str) -> Self {
        Self::from(text.to_string())
    }
}

/// A timestamp reads as its text where text is expected (`envelope.eta.as_deref()`).
impl std::ops::Deref for Timestamp {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::from)
    }
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
    /// in at enqueue, and a producer writing to the stream directly must set a unique one that
    /// passes [`check_id`].
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let envelope: Self = serde_json::from_str(text)?;
        if envelope.id.is_empty() {
            return Err(serde::de::Error::custom(
                "missing field `id` (a producer writing to the queue directly must set a unique id)",
            ));
        }
        check_id(&envelope.id)
            .map_err(|why| serde::de::Error::custom(format!("invalid `id`: {why}")))?;
        Ok(envelope)
    }

    /// The `id` an entry's text carries, read even when the entry is not a valid envelope
    /// (JSON with a string `id` that passes [`check_id`]): the brokers use it to end (or
    /// delete) the record of an entry that leaves without a task outcome (malformed, purged).
    pub fn id_in(text: &str) -> Option<String> {
        #[derive(Deserialize)]
        struct IdOnly {
            id: String,
        }
        let IdOnly { id } = serde_json::from_str(text).ok()?;
        check_id(&id).is_ok().then_some(id)
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

    /// When it may run: `None` as soon as possible, else its `eta` — an RFC 3339 time at most
    /// [`MAX_DELAY`] after `now` (a time in the past runs at once).
    pub fn due(&self, now: SystemTime) -> Result<Option<SystemTime>, FieldError> {
        let Some(eta) = &self.eta else {
            return Ok(None);
        };
        let at = eta.time().map_err(|why| FieldError::new("eta", why))?;
        if at
            .duration_since(now)
            .is_ok_and(|ahead| ahead > MAX_DELAY.max)
        {
            return Err(FieldError::new(
                "eta",
                format!(
                    "`{eta}` is more than {} ahead (the furthest a task is scheduled)",
                    MAX_DELAY
                ),
            ));
        }
        Ok(Some(at))
    }

    /// How long its first attempt waited to start at `now`: since it was enqueued, or since
    /// its `eta` when that is later. `None` for a retry (its wait is the backoff its policy
    /// chose) and when `enqueued_at` is not a time.
    pub fn first_wait(&self, now: SystemTime) -> Option<Duration> {
        if self.attempt != 0 {
            return None;
        }
        let enqueued = parse_time(&self.enqueued_at).ok()?;
        let due = (self.eta.as_ref())
            .and_then(|eta| eta.time().ok())
            .map_or(enqueued, |eta| eta.max(enqueued));
        Some(now.duration_since(due).unwrap_or_default())
    }

    /// When it expires, if it does: its `expires` (any RFC 3339 time; a far one is as good as
    /// never, a past one is expired).
    pub fn expiry(&self) -> Result<Option<SystemTime>, FieldError> {
        self.expires
            .as_ref()
            .map(|expires| {
                expires
                    .time()
                    .map_err(|why| FieldError::new("expires", why))
            })
            .transpose()
    }

    /// The (hard, soft) limits of an attempt: the envelope's `time_limit_ms` and
    /// `soft_time_limit_ms` over the task's own `hard` and `soft`. Like the config's rule, a
    /// limit is longer than zero, and a soft limit the envelope sets must be below the hard one
    /// it ends up with (else it would never fire); each is at most [`MAX_TIME_LIMIT`]. The task's
    /// own soft limit is dropped when the envelope's hard limit is not above it.
    pub fn limits(
        &self,
        hard: Duration,
        soft: Option<Duration>,
    ) -> Result<(Duration, Option<Duration>), FieldError> {
        let millis = |field: &'static str, ms: Option<u64>| {
            ms.map(
                |ms| match caps::checked(ms as f64, Unit::Millis, MAX_TIME_LIMIT) {
                    Ok(limit) if limit.is_zero() => {
                        Err(FieldError::new(field, "must be longer than zero"))
                    }
                    Ok(limit) => Ok(limit),
                    Err(err) => Err(FieldError::new(field, err.to_string())),
                },
            )
            .transpose()
        };
        let own_hard = millis("time_limit_ms", self.time_limit_ms)?;
        let own_soft = millis("soft_time_limit_ms", self.soft_time_limit_ms)?;
        let hard = own_hard.unwrap_or(hard);
        match own_soft {
            Some(soft) if soft >= hard => {
                let hard_text = match own_hard {
                    Some(_) => format!("time_limit_ms {}", hard.as_millis()),
                    None => format!(
                        "the task's time_limit of {}",
                        humantime::format_duration(hard)
                    ),
                };
                Err(FieldError::new(
                    "soft_time_limit_ms",
                    format!(
                        "{} is not below {hard_text}: the soft limit would never fire",
                        soft.as_millis()
                    ),
                ))
            }
            Some(soft) => Ok((hard, Some(soft))),
            None => Ok((hard, soft.filter(|soft| *soft < hard))),
        }
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
        let err = Envelope::from_json(r#"{"id":"a\nb","task":"t","queue":"q"}"#).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("invalid `id`: holds a control character (U+000A at byte 1)"),
            "{err}"
        );
    }

    #[test]
    fn ids_are_checked_by_one_rule() {
        for good in [
            "telegram:process:a1b2c3d4",
            "0b9c5d1e-6f7a-4b8c-9d0e-1f2a3b4c5d6e",
            "a/b",
            "100%",
            "with spaces",
            "?#&=+",
            "привіт-✓",
            "...",
            &"x".repeat(MAX_ID_BYTES),
        ] {
            assert_eq!(check_id(good), Ok(()), "{good:?}");
        }
        let why = |id: &str| check_id(id).unwrap_err();
        assert!(why("").starts_with("must not be empty"));
        assert_eq!(
            why(&"é".repeat(MAX_ID_BYTES / 2 + 1)),
            "is 258 bytes, over the limit of 256"
        );
        assert_eq!(
            why("a\u{7f}"),
            "holds a control character (U+007F at byte 1)"
        );
        assert_eq!(
            why("tab\there"),
            "holds a control character (U+0009 at byte 3)"
        );
        assert!(why("c1\u{85}").contains("U+0085"));
        assert!(why("..").contains("cannot be read back"));
        assert!(why(".").contains("cannot be read back"));
        assert_eq!(
            Envelope::id_in(r#"{"id":"x-1","task":7}"#).as_deref(),
            Some("x-1")
        );
        assert_eq!(Envelope::id_in(r#"{"id":"a\u0000"}"#), None);
        assert_eq!(Envelope::id_in("not json"), None);
    }

    #[test]
    fn times_keep_their_text_on_the_wire_and_are_parsed_once_when_read() {
        let json = r#"{"id":"t1","task":"t","queue":"q","eta":"2026-01-01T00:00:00+01:00","expires":"tomorrow"}"#;
        let env = Envelope::from_json(json).unwrap();
        let eta = env.eta.as_ref().unwrap();
        assert_eq!(eta.as_str(), "2026-01-01T00:00:00+01:00");
        assert_eq!(
            crate::broker::rfc3339(eta.time().unwrap()),
            "2025-12-31T23:00:00.000Z"
        );
        // A bad time is read (kept with its error), and refused where it is checked.
        let expires = env.expires.as_ref().unwrap();
        assert!(
            expires
                .time()
                .unwrap_err()
                .starts_with("`tomorrow` is not an RFC 3339 time")
        );
        let written = serde_json::to_value(&env).unwrap();
        assert_eq!(written["eta"], "2026-01-01T00:00:00+01:00");
        assert_eq!(written["expires"], "tomorrow");
    }

    #[test]
    fn eta_and_expires_are_rfc3339_times_and_an_eta_is_at_most_the_cap_ahead() {
        let now = SystemTime::now();
        let mut env = Envelope::new("t", "q");
        assert_eq!(env.due(now), Ok(None));
        assert_eq!(env.expiry(), Ok(None));
        env.eta = Some("2026-01-01T00:00:00+01:00".into());
        let due = env.due(now).unwrap().unwrap();
        assert_eq!(crate::broker::rfc3339(due), "2025-12-31T23:00:00.000Z");
        env.eta = Some(crate::broker::Timestamp::at(
            now + Duration::from_secs(364 * 86_400),
        ));
        assert!(env.due(now).unwrap().is_some());
        // The last second RFC 3339 can write is a time; as an eta it is too far ahead.
        env.eta = Some("9999-12-31T23:59:59Z".into());
        assert_eq!(
            env.due(now).unwrap_err().to_string(),
            "eta: `9999-12-31T23:59:59Z` is more than 365 days ahead (the furthest a task is \
             scheduled)"
        );
        env.eta = Some("soon".into());
        assert!(
            env.due(now)
                .unwrap_err()
                .to_string()
                .starts_with("eta: `soon` is not an RFC 3339 time")
        );
        // A past eta (1960 included) runs at once.
        env.eta = Some("1960-01-01T00:00:00Z".into());
        assert!(env.due(now).unwrap().unwrap() < now);
        // As an expiry the year 9999 is as good as never.
        env.expires = Some("9999-12-31T23:59:59Z".into());
        assert!(env.expiry().unwrap().unwrap() > now);
        env.expires = Some("10000-01-01T00:00:00Z".into());
        assert!(
            env.expiry()
                .unwrap_err()
                .to_string()
                .starts_with("expires: `10000-01-01T00:00:00Z` is not an RFC 3339 time")
        );
    }

    #[test]
    fn limits_follow_the_config_rule_and_the_cap() {
        let s = Duration::from_secs;
        let mut env = Envelope::new("t", "q");
        assert_eq!(env.limits(s(60), Some(s(50))), Ok((s(60), Some(s(50)))));
        env.time_limit_ms = Some(10_000);
        assert_eq!(
            env.limits(s(60), Some(s(50))),
            Ok((s(10), None)),
            "the task's soft is dropped"
        );
        env.soft_time_limit_ms = Some(5_000);
        assert_eq!(env.limits(s(60), Some(s(50))), Ok((s(10), Some(s(5)))));
        let cases = [
            (Some(0), None, "time_limit_ms: must be longer than zero"),
            (
                None,
                Some(0),
                "soft_time_limit_ms: must be longer than zero",
            ),
            (
                Some(u64::MAX),
                None,
                "time_limit_ms: 1.8446744073709552e19 ms is over the limit of 604800000 ms (7 days)",
            ),
            (
                Some(604_800_001),
                None,
                "time_limit_ms: 604800001 ms is over the limit of 604800000 ms (7 days)",
            ),
            (
                None,
                Some(u64::MAX),
                "soft_time_limit_ms: 1.8446744073709552e19 ms is over the limit of 604800000 ms (7 days)",
            ),
            (
                Some(5_000),
                Some(5_000),
                "soft_time_limit_ms: 5000 is not below time_limit_ms 5000: the soft limit would never fire",
            ),
            (
                None,
                Some(60_000),
                "soft_time_limit_ms: 60000 is not below the task's time_limit of 1m: the soft limit would never fire",
            ),
        ];
        for (hard, soft, expected) in cases {
            env.time_limit_ms = hard;
            env.soft_time_limit_ms = soft;
            let err = env.limits(s(60), None).unwrap_err();
            assert_eq!(err.to_string(), expected);
        }
        env.time_limit_ms = Some(604_800_000);
        env.soft_time_limit_ms = None;
        assert_eq!(env.limits(s(60), None), Ok((s(604_800), None)));
    }
}
