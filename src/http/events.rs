//! `GET /events`: the events stream (`p:events` in Redis, its twin in `memory://`) as
//! Server-Sent Events.
//!
//! Each message is one event of the stream:
//!
//! ```text
//! id: 1732374000123-0
//! event: succeeded
//! data: {"id":"1732374000123-0","kind":"succeeded","at":"…","task_id":"…","task":"…","queue":"chat","detail":{…}}
//! ```
//!
//! - **Where it starts.** `Last-Event-ID` (what a browser's `EventSource` sends when it
//!   reconnects) or `?after=ID`: the events after that id — the header wins when both are
//!   given. `?after=0`: from the oldest event the capped stream still holds. `?last=N` (at most
//!   1000): the last N events that pass the filter, then the new ones. None of them: new events
//!   only.
//! - **Filter.** `?types=started,succeeded` keeps those kinds; an entry ending in `_` or `*` is a
//!   prefix (`actor_`, `pool_agent_*`). Skipped events still move the position.
//! - **`?follow=false`** ends the response once the events already written are sent (what
//!   `runtime inspect events` does without `--follow`).
//! - **Tailing.** Each stream reads the broker in pages (`events(after, 500)`); when it has
//!   caught up it waits [`POLL`] before asking again — a short poll, no busy loop, no blocking
//!   read holding a connection. A comment line (`:`) is sent every 15 s without events, so
//!   proxies keep the connection and a dropped client is noticed; the reader stops as soon as
//!   the response body is dropped.
//! - **Bounded.** At most [`MAX_STREAMS`] streams are open at once per node; beyond that the
//!   answer is `503` with `Retry-After` and a JSON error.
//! - **Off.** With `[events] enabled = false` nothing writes the stream and the route answers
//!   `404` with a JSON error.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use actors::broker::{AnyBroker, Event, Records};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::{ApiError, AppState};

/// Event streams a node serves at once.
pub const MAX_STREAMS: usize = 64;
/// How long a stream that has caught up waits before reading the broker again.
pub const POLL: Duration = Duration::from_millis(250);
/// Interval of the keep-alive comments.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events read from the broker per round trip (here and by the task search).
pub const PAGE: usize = 500;
/// The most `?last=` may ask for.
const MAX_LAST: usize = 1000;
/// Events looked at, newest first, to find the last N that pass a filter (here and by the
/// task search).
pub const MAX_SCAN: usize = 20_000;
/// Pause after a failed read.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// The bound on open event streams (shared by every request of a node).
#[derive(Debug)]
pub struct EventStreams {
    slots: Arc<Semaphore>,
    limit: usize,
}

impl EventStreams {
    /// At most `limit` streams at once.
    pub fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// Streams open right now.
    pub fn open(&self) -> usize {
        self.limit - self.slots.available_permits()
    }
}

impl Default for EventStreams {
    fn default() -> Self {
        Self::new(MAX_STREAMS)
    }
}

/// `?types=…&after=…&last=…&follow=…`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    types: Option<String>,
    after: Option<String>,
    last: Option<usize>,
    follow: Option<bool>,
}

/// Which kinds pass: exact names and prefixes; none of either = every kind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Kinds {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl Kinds {
    fn parse(text: Option<&str>) -> Result<Self, ApiError> {
        let mut kinds = Self::default();
        for item in text.unwrap_or("").split(',').map(str::trim) {
            if item.is_empty() {
                continue;
            }
            let (name, prefix) = match item.strip_suffix('*') {
                Some(stem) => (stem, true),
                None => (item, item.ends_with('_')),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ApiError::BadRequest(format!(
                    "types: expected kinds such as `started,succeeded` or a prefix such as `actor_`, got `{item}`"
                )));
            }
            if prefix {
                kinds.prefixes.push(name.to_string());
            } else {
                kinds.exact.push(name.to_string());
            }
        }
        Ok(kinds)
    }

    fn all(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    fn matches(&self, kind: &str) -> bool {
        self.all()
            || self.exact.iter().any(|k| k == kind)
            || self.prefixes.iter().any(|p| kind.starts_with(p.as_str()))
    }
}

/// A stream position as a client may give it: `MS-SEQ` or `MS` (digits).
fn position(what: &str, text: &str) -> Result<String, ApiError> {
    let text = text.trim();
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    // On a Redis Cluster an event id names its stream: `1732374000123-0@chat`.
    let (entry, stream) = match text.split_once('@') {
        Some((entry, stream)) => (entry, Some(stream)),
        None => (text, None),
    };
    let stream_ok = stream.is_none_or(|s| {
        s.len() <= 200
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(&b))
    });
    // An entry holds up to two events: the second one's id adds its place (`….1`).
    let (entry, place) = match entry.split_once('.') {
        Some((entry, place)) => (entry, Some(place)),
        None => (entry, None),
    };
    let valid = stream_ok
        && place.is_none_or(|p| p.len() <= 3 && digits(p))
        && match entry.split_once('-') {
            Some((ms, seq)) => digits(ms) && digits(seq),
            None => stream.is_none() && place.is_none() && digits(entry),
        };
    if valid {
        Ok(text.to_string())
    } else {
        Err(ApiError::BadRequest(format!(
            "{what}: expected an event id such as `1732374000123-0`, `1732374000123-0.1` or `1732374000123-0@chat` (or `0` for the oldest kept), got `{text}`"
        )))
    }
}

/// `GET /events`
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    if !state.config.events.enabled {
        return Err(ApiError::NotFound(
            "events are disabled ([events] enabled = false)".into(),
        ));
    }
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let kinds = Kinds::parse(query.types.as_deref())?;
    let resume = match headers.get("last-event-id") {
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                ApiError::BadRequest("Last-Event-ID: not a readable header value".into())
            })?;
            Some(position("Last-Event-ID", text)?)
        }
        None => query
            .after
            .as_deref()
            .map(|after| position("after", after))
            .transpose()?,
    };
    let last = query.last.unwrap_or(0);
    if last > MAX_LAST {
        return Err(ApiError::BadRequest(format!(
            "last: expected 0 to {MAX_LAST}, got {last}"
        )));
    }
    let Ok(permit) = Arc::clone(&state.event_streams.slots).try_acquire_owned() else {
        let body = json!({ "error": format!(
            "too many event streams: {} are open, the most this node serves; try again later",
            state.event_streams.limit
        ) });
        return Ok((
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(body),
        )
            .into_response());
    };
    let broker = Arc::clone(&state.broker);
    let (backlog, after) = match resume {
        Some(after) => (Vec::new(), after),
        None if last > 0 => recent(&broker, &kinds, last).await?,
        None => {
            let newest = broker.events_before(None, 1).await?;
            let after = newest
                .last()
                .map_or_else(|| "0".to_string(), |e| e.id.clone());
            (Vec::new(), after)
        }
    };
    debug!(%after, backlog = backlog.len(), open = state.event_streams.open(), "event stream opened");
    let tail = Tail {
        broker,
        kinds,
        after,
        pending: backlog.into(),
        follow: query.follow.unwrap_or(true),
        done: false,
        failing: false,
        _permit: permit,
    };
    let sse = Sse::new(events(tail)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE));
    // Tells nginx-like proxies not to buffer the stream.
    let no_buffering = [(HeaderName::from_static("x-accel-buffering"), "no")];
    Ok((no_buffering, sse).into_response())
}

/// The last `n` events that pass `kinds` (oldest first) and the position after which new
/// events start (the newest event looked at, or `0` when the stream is empty).
async fn recent(
    broker: &AnyBroker,
    kinds: &Kinds,
    n: usize,
) -> Result<(Vec<Event>, String), ApiError> {
    let page = if kinds.all() { n.min(PAGE) } else { PAGE };
    let mut found = Vec::with_capacity(n);
    let mut before: Option<String> = None;
    let mut newest: Option<String> = None;
    let mut scanned = 0;
    while found.len() < n && scanned < MAX_SCAN {
        let events = broker.events_before(before.as_deref(), page).await?;
        let Some(oldest) = events.first() else {
            break;
        };
        before = Some(oldest.id.clone());
        if newest.is_none() {
            newest = events.last().map(|e| e.id.clone());
        }
        scanned += events.len();
        let short = events.len() < page;
        for event in events.into_iter().rev() {
            if found.len() < n && kinds.matches(&event.kind) {
                found.push(event);
            }
        }
        if short {
            break;
        }
    }
    found.reverse();
    Ok((found, newest.unwrap_or_else(|| "0".to_string())))
}

/// One client's reader: its position, filter, the events read but not sent yet, and its slot
/// (released when the response body is dropped — the client went away — or ends).
struct Tail {
    broker: Arc<AnyBroker>,
    kinds: Kinds,
    after: String,
    pending: VecDeque<Event>,
    follow: bool,
    done: bool,
    failing: bool,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Tail {
    fn drop(&mut self) {
        debug!(after = %self.after, "event stream closed");
    }
}

fn events(tail: Tail) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    stream::unfold(tail, |mut tail| async move {
        loop {
            if let Some(event) = tail.pending.pop_front() {
                return Some((Ok(message(&event)), tail));
            }
            if tail.done {
                return None;
            }
            match tail.broker.events(Some(&tail.after), PAGE).await {
                Ok(mut page) => {
                    if tail.failing {
                        tail.failing = false;
                        debug!("event stream reads again");
                    }
                    let mut caught_up = page.len() < PAGE;
                    // Where several streams are merged (a Redis Cluster), the newest events are
                    // left for the next read: one with a smaller id may still come in.
                    let settle = tail.broker.events_settle();
                    if tail.follow && !settle.is_zero() {
                        let horizon = now_ms().saturating_sub(settle.as_millis() as u64);
                        let settled = page
                            .iter()
                            .take_while(|e| event_ms(&e.id) < horizon)
                            .count();
                        if settled < page.len() {
                            page.truncate(settled);
                            caught_up = true;
                        }
                    }
                    if let Some(newest) = page.last() {
                        tail.after = newest.id.clone();
                    }
                    let kinds = &tail.kinds;
                    tail.pending
                        .extend(page.into_iter().filter(|e| kinds.matches(&e.kind)));
                    if caught_up {
                        if !tail.follow {
                            tail.done = true;
                        } else if tail.pending.is_empty() {
                            tokio::time::sleep(POLL).await;
                        }
                    }
                }
                Err(err) => {
                    if !tail.failing {
                        tail.failing = true;
                        warn!(error = %err, "event stream cannot read the events; retrying");
                    }
                    if !tail.follow {
                        return None;
                    }
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
        }
    })
}

/// Milliseconds since the epoch, now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The time part of an event id (`1732374000123-0@chat` → 1732374000123).
fn event_ms(id: &str) -> u64 {
    id.split(['-', '@'])
        .next()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0)
}

/// The SSE message of one event: `id`, `event` (its kind) and the event as one line of JSON.
fn message(event: &Event) -> SseEvent {
    let data = serde_json::to_string(event).unwrap_or_default();
    let mut message = SseEvent::default().data(data);
    // Ids and kinds come from the stream: anything that could break the framing is left out
    // rather than allowed to panic the writer.
    let safe = |s: &str| !s.is_empty() && !s.contains(['\n', '\r', '\0']);
    if safe(&event.id) {
        message = message.id(&event.id);
    }
    if safe(&event.kind) {
        message = message.event(&event.kind);
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_filter_exact_names_and_prefixes() {
        let kinds = Kinds::parse(Some("started, succeeded,actor_,pool_agent_*")).unwrap();
        assert!(kinds.matches("started"));
        assert!(kinds.matches("succeeded"));
        assert!(kinds.matches("actor_restarted"));
        assert!(kinds.matches("pool_agent_idle"));
        assert!(!kinds.matches("sent"));
        assert!(!kinds.matches("start"));
        assert!(Kinds::parse(None).unwrap().matches("anything"));
        assert!(Kinds::parse(Some(" , ")).unwrap().all());
        let err = Kinds::parse(Some("started,bad kind")).unwrap_err();
        assert!(err.to_string().contains("got `bad kind`"), "{err}");
        assert!(Kinds::parse(Some("*")).is_err());
    }

    #[test]
    fn positions_are_stream_ids() {
        for good in [
            "0",
            " 1732374000123-7 ",
            "1732374000123-7@chat:2",
            "1732374000123-7@",
            "1732374000123-7.1",
            "1732374000123-7.1@chat",
        ] {
            assert_eq!(position("after", good).unwrap(), good.trim());
        }
        for bad in [
            "", "-", "1-", "a-0", "1-2-3", "$", "+", "(5", "1@chat", "1-0@a b", "1-0@{x}", "1.1",
            "1-0.", "1-0.x", "1-0.1.2", "1-0.1234",
        ] {
            assert!(position("after", bad).is_err(), "{bad}");
        }
    }
}
