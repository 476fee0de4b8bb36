//! Finding tasks: `GET /tasks` (search) and `GET /tasks/{id}/timeline` (one task's events,
//! and its dead letter).
//!
//! There is no index of tasks: a task leaves its record (`p:result:<id>`, from its enqueue
//! until `broker.result_ttl` after it ended) and its events in the capped events stream
//! (`p:events`, about `[events] maxlen` long: `sent`, `started`, `retried`, `deferred`,
//! `recovered`, `succeeded`, `dead`, each with the task's id, name and queue). A search reads
//! the newest events backwards, in pages of [`PAGE`], at most `scan` of them
//! ([`DEFAULT_SCAN`], at most [`MAX_SCAN`]), and groups them by task: its newest event gives
//! its state, its `sent` event its trace. The tasks found are then joined with their records
//! (one read each, at most `limit` — [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`] — sent at once).
//! So a search covers what the events stream still holds, and no more: an answer says how far
//! back it looked (`scanned`, `oldest`) and whether it reached the start of the stream
//! (`complete`). An exact `id` also finds a task whose events are gone, by its record.
//!
//! The state of a task is its record's: every task has one from its enqueue until
//! `broker.result_ttl` after it ended, written at each step of its life (see
//! [`actors::broker::TaskRecord`]). Only a task without one — its record expired, or an entry
//! another program wrote to a stream and no consumer took yet — is given the state its newest
//! event implies: `sent` → `queued` (`scheduled` while its eta is ahead), `started` →
//! `running`, `retried` → `retrying`, `deferred` → `scheduled`, `recovered` → `queued`,
//! `succeeded`, `dead`.
//!
//! Filters (all optional, combined): `id` (a prefix of the task id), `task` (part of the task
//! name, any case), `queue` (exact), `state` (one of [`STATES`]), `trace` (the exact trace id
//! its `sent` event names). Results are ordered by their newest event, newest first.

use std::collections::HashMap;
use std::time::SystemTime;

use actors::broker::{Admin, DeadLetter, Event, MAX_ID_BYTES, Records, TaskRecord, parse_time};
use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::events::{MAX_SCAN, PAGE};
use super::{ApiError, AppState};

/// Events a search looks at unless `scan` says otherwise.
pub const DEFAULT_SCAN: usize = 5_000;
/// Tasks a search answers unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 50;
/// The most tasks one search answers (each one a record read).
pub const MAX_LIMIT: usize = 200;
/// Dead letters of its queue the timeline of a dead task looks through for its envelope.
pub const DEAD_SCAN: usize = 1_000;
/// Dead letters read per round trip while looking.
const DEAD_PAGE: usize = 100;
/// The longest `task`, `queue` or `trace` filter.
const MAX_FILTER_BYTES: usize = 256;

/// The states a task can be found in.
pub const STATES: [&str; 6] = [
    "queued",
    "scheduled",
    "running",
    "retrying",
    "succeeded",
    "dead",
];

/// `?id=&task=&queue=&state=&trace=&limit=&scan=`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchQuery {
    id: Option<String>,
    task: Option<String>,
    queue: Option<String>,
    state: Option<String>,
    trace: Option<String>,
    limit: Option<usize>,
    scan: Option<usize>,
}

/// The checked filters of a search.
#[derive(Debug, Default)]
struct Filters {
    id: Option<String>,
    task: Option<String>,
    queue: Option<String>,
    state: Option<String>,
    trace: Option<String>,
    limit: usize,
    scan: usize,
}

/// A filter left empty is no filter (what an HTML form sends for an empty field).
fn given(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

fn bounded(field: &str, value: Option<String>, max: usize) -> Result<Option<String>, ApiError> {
    match given(value) {
        Some(v) if v.len() > max => Err(ApiError::BadRequest(format!(
            "{field}: {} bytes, over the limit of {max}",
            v.len()
        ))),
        other => Ok(other),
    }
}

fn count(field: &str, value: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match value.unwrap_or(default) {
        n @ 1.. if n <= max => Ok(n),
        n => Err(ApiError::BadRequest(format!(
            "{field}: expected 1 to {max}, got {n}"
        ))),
    }
}

impl SearchQuery {
    fn check(self) -> Result<Filters, ApiError> {
        let state = given(self.state);
        if let Some(state) = &state
            && !STATES.contains(&state.as_str())
        {
            return Err(ApiError::BadRequest(format!(
                "state: expected one of {}, got `{}`",
                STATES.join(", "),
                state.chars().take(64).collect::<String>()
            )));
        }
        Ok(Filters {
            id: bounded("id", self.id, MAX_ID_BYTES)?,
            task: bounded("task", self.task, MAX_FILTER_BYTES)?.map(|t| t.to_lowercase()),
            queue: bounded("queue", self.queue, MAX_FILTER_BYTES)?,
            state,
            trace: bounded("trace", self.trace, MAX_FILTER_BYTES)?,
            limit: count("limit", self.limit, DEFAULT_LIMIT, MAX_LIMIT)?,
            scan: count("scan", self.scan, DEFAULT_SCAN, MAX_SCAN)?,
        })
    }
}

/// One task as a search finds it.
#[derive(Clone, Debug, Serialize)]
pub struct Found {
    pub id: String,
    pub task: Option<String>,
    pub queue: Option<String>,
    /// State (see the module docs).
    pub state: String,
    /// Attempts started so far (as far as its events or record say).
    pub attempts: u32,
    /// Its newest event's time, or its record's when that is newer (RFC 3339).
    pub updated_at: String,
    /// When it was enqueued (its `sent` event), when the scan reached it.
    pub sent_at: Option<String>,
    /// The trace it belongs to (its `sent` event's), when the scan reached it.
    pub trace_id: Option<String>,
    /// Its parent task, for a callback or sub-task.
    pub parent_id: Option<String>,
    /// The last error (retrying, dead).
    pub error: Option<String>,
    /// Its events among those scanned.
    pub events: usize,
    /// Whether its record was found (kept `broker.result_ttl` after each outcome).
    pub recorded: bool,
}

/// The state a task is in after `event`, its newest.
fn state_after(event: &Event, now: SystemTime) -> String {
    match event.kind.as_str() {
        "sent" => {
            let ahead = (event.detail.get("eta").and_then(Value::as_str))
                .and_then(|eta| parse_time(eta).ok())
                .is_some_and(|eta| eta > now);
            if ahead { "scheduled" } else { "queued" }.to_string()
        }
        "started" => "running".into(),
        "retried" => "retrying".into(),
        "deferred" => "scheduled".into(),
        "recovered" => "queued".into(),
        other => other.to_string(),
    }
}

/// Attempts started, as far as `event` tells: its `attempt` (0-based) + 1; none for `sent`.
fn attempts_after(event: &Event) -> u32 {
    (event.detail.get("attempt").and_then(Value::as_u64))
        .and_then(|n| u32::try_from(n).ok())
        .map_or(0, |n| n.saturating_add(1))
}

/// The error or reason `event` carries, if any.
fn error_of(event: &Event) -> Option<String> {
    ["error", "reason"]
        .iter()
        .find_map(|field| event.detail.get(*field).and_then(Value::as_str))
        .map(str::to_string)
}

/// A task first seen (newest event first) at `event`.
fn found(id: &str, event: &Event, now: SystemTime) -> Found {
    Found {
        id: id.to_string(),
        task: event.task.clone(),
        queue: event.queue.clone(),
        state: state_after(event, now),
        attempts: attempts_after(event),
        updated_at: event.at.clone(),
        sent_at: None,
        trace_id: None,
        parent_id: None,
        error: matches!(event.kind.as_str(), "retried" | "dead" | "deferred")
            .then(|| error_of(event))
            .flatten(),
        events: 0,
        recorded: false,
    }
}

/// An older event of a task already found.
fn older(task: &mut Found, event: &Event) {
    task.events += 1;
    task.attempts = task.attempts.max(attempts_after(event));
    if event.kind == "sent" {
        task.sent_at = Some(event.at.clone());
        let text = |field: &str| {
            event
                .detail
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        task.trace_id = text("trace_id");
        task.parent_id = text("parent_id");
    }
}

/// Whether `task` passes the filters (the trace once its `sent` event is known).
fn passes(task: &Found, filters: &Filters) -> bool {
    filters
        .id
        .as_ref()
        .is_none_or(|id| task.id.starts_with(id.as_str()))
        && (filters.task.as_ref()).is_none_or(|name| {
            task.task
                .as_ref()
                .is_some_and(|t| t.to_lowercase().contains(name.as_str()))
        })
        && (filters.queue.as_ref()).is_none_or(|queue| task.queue.as_ref() == Some(queue))
        && (filters.state.as_ref()).is_none_or(|state| &task.state == state)
        && (filters.trace.as_ref()).is_none_or(|trace| task.trace_id.as_ref() == Some(trace))
}

/// How far a scan of the events stream went.
#[derive(Debug, Default, Serialize)]
struct Coverage {
    /// Events looked at.
    scanned: usize,
    /// The time of the oldest of them.
    oldest: Option<String>,
    /// Whether the scan reached the start of the stream (it saw every event still kept).
    complete: bool,
}

/// Reads the events stream backwards from the newest, a page at a time, handing each event
/// (newest first) to `each` until `scan` events were read, the stream's start is reached, or
/// `each` answers false.
async fn scan_back(
    state: &AppState,
    scan: usize,
    mut each: impl FnMut(&Event) -> bool,
) -> Result<Coverage, ApiError> {
    let mut coverage = Coverage::default();
    let mut before: Option<String> = None;
    while coverage.scanned < scan {
        let want = PAGE.min(scan - coverage.scanned);
        let page = state.broker.events_before(before.as_deref(), want).await?;
        coverage.scanned += page.len();
        if let Some(first) = page.first() {
            before = Some(first.id.clone());
            coverage.oldest = Some(first.at.clone());
        }
        if page.len() < want {
            coverage.complete = true;
        }
        for event in page.iter().rev() {
            if !each(event) {
                return Ok(coverage);
            }
        }
        if coverage.complete {
            break;
        }
    }
    Ok(coverage)
}

/// `GET /tasks?…` → `{"tasks": [Found…], "scanned", "oldest", "complete", "events"}`; see the
/// module docs.
pub async fn search(
    State(state): State<AppState>,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let filters = query.check()?;
    let now = SystemTime::now();
    let events_on = state.broker.settings().events_maxlen > 0;
    // Tasks in the order first met (newest event first), and where each one is.
    let mut tasks: Vec<Found> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let coverage = if events_on {
        // Without a trace filter a task's newest event decides whether it passes: stop once
        // `limit` have. With one, its `sent` event (its oldest) does: read on.
        let early = filters.trace.is_none();
        let mut passing = 0usize;
        scan_back(&state, filters.scan, |event| {
            let Some(id) = event.task_id.as_deref() else {
                return true;
            };
            match at.get(id) {
                Some(&n) => older(&mut tasks[n], event),
                None => {
                    if early && passing >= filters.limit {
                        // Every task met from here on is older than the ones kept.
                        return false;
                    }
                    let mut task = found(id, event, now);
                    older(&mut task, event);
                    if early && passes(&task, &filters) {
                        passing += 1;
                    }
                    at.insert(id.to_string(), tasks.len());
                    tasks.push(task);
                }
            }
            true
        })
        .await?
    } else {
        Coverage::default()
    };
    let mut hits: Vec<Found> = tasks
        .into_iter()
        .filter(|task| passes(task, &filters))
        .take(filters.limit)
        .collect();
    // An exact id: its record finds it even when its events are gone.
    if let Some(id) = &filters.id
        && !hits.iter().any(|t| &t.id == id)
        && let Some(record) = state.broker.record(id).await?
    {
        let task = from_record(&record);
        if passes(&task, &filters) {
            hits.insert(0, task);
        }
    }
    join_records(&state, &mut hits).await?;
    hits.retain(|task| passes(task, &filters));
    Ok(Json(json!({
        "tasks": hits,
        "scanned": coverage.scanned,
        "oldest": coverage.oldest,
        "complete": coverage.complete,
        "events": if events_on { "on" } else { "off" },
    }))
    .into_response())
}

/// A task known only by its record.
fn from_record(record: &TaskRecord) -> Found {
    Found {
        id: record.id.clone(),
        task: Some(record.task.clone()),
        queue: Some(record.queue.clone()),
        state: state_name(record),
        attempts: record.attempts,
        updated_at: record.updated_at.clone(),
        sent_at: None,
        trace_id: None,
        parent_id: None,
        error: record.error.clone().filter(|e| !e.is_empty()),
        events: 0,
        recorded: true,
    }
}

/// A record's state as its JSON says it.
fn state_name(record: &TaskRecord) -> String {
    match serde_json::to_value(record.state) {
        Ok(Value::String(state)) => state,
        _ => "unknown".into(),
    }
}

/// Reads the records of `tasks` (at once): a task's record, where it has one, says its state
/// (see the module docs).
async fn join_records(state: &AppState, tasks: &mut [Found]) -> Result<(), ApiError> {
    let reads = join_all(tasks.iter().map(|t| state.broker.record(&t.id))).await;
    for (task, read) in tasks.iter_mut().zip(reads) {
        let Some(record) = read? else {
            continue;
        };
        task.recorded = true;
        task.state = state_name(&record);
        task.attempts = task.attempts.max(record.attempts);
        task.updated_at = record.updated_at.clone();
        task.error = record
            .error
            .clone()
            .filter(|e| !e.is_empty())
            .or(task.error.take());
    }
    Ok(())
}

/// `?scan=`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimelineQuery {
    scan: Option<usize>,
}

/// `GET /tasks/{id}/timeline` → `{"id", "task", "queue", "state", "attempts", "trace_id",
/// "parent_id", "events": [oldest first], "scanned", "oldest", "complete", "dead_letter"}`:
/// its state as a search finds it (`null` when neither an event nor a record is found); the
/// task's events among
/// the newest `scan` (the scan stops at its `sent` event, its first); and, when its newest
/// event is `dead`, its dead letter (entry id, reason, envelope) looked for among the oldest
/// [`DEAD_SCAN`] of its queue — the one place the runtime keeps a finished task's envelope.
pub async fn timeline(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<TimelineQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let scan = count("scan", query.scan, DEFAULT_SCAN, MAX_SCAN)?;
    if id.len() > MAX_ID_BYTES {
        return Err(ApiError::BadRequest(format!(
            "id: {} bytes, over the limit of {MAX_ID_BYTES}",
            id.len()
        )));
    }
    let mut mine: Vec<Event> = Vec::new();
    let mut coverage = scan_back(&state, scan, |event| {
        if event.task_id.as_deref() != Some(id.as_str()) {
            return true;
        }
        mine.push(event.clone());
        event.kind != "sent"
    })
    .await?;
    // Its state, as a search finds it: from its newest event, joined with its record.
    let mut summary = match mine.first() {
        Some(newest) => {
            let mut task = found(&id, newest, SystemTime::now());
            for event in &mine {
                older(&mut task, event);
            }
            Some(task)
        }
        None => None,
    };
    match &mut summary {
        Some(task) => join_records(&state, std::slice::from_mut(task)).await?,
        None => summary = state.broker.record(&id).await?.as_ref().map(from_record),
    }
    let sent = mine.last().filter(|e| e.kind == "sent");
    coverage.complete |= sent.is_some();
    let text = |field: &str| {
        sent.and_then(|e| e.detail.get(field))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let (trace_id, parent_id) = (text("trace_id"), text("parent_id"));
    mine.reverse();
    let newest = mine.last();
    let task = newest.and_then(|e| e.task.clone());
    let queue = newest.and_then(|e| e.queue.clone());
    let dead = match (newest, &queue) {
        (Some(event), Some(queue))
            if event.kind == "dead" && state.config.queues.contains_key(queue) =>
        {
            dead_letter_of(&state, queue, &id).await?
        }
        _ => None,
    };
    Ok(Json(json!({
        "id": id,
        "task": task.or_else(|| summary.as_ref().and_then(|t| t.task.clone())),
        "queue": queue.clone().or_else(|| summary.as_ref().and_then(|t| t.queue.clone())),
        "state": summary.as_ref().map(|t| t.state.clone()),
        "attempts": summary.as_ref().map_or(0, |t| t.attempts),
        "trace_id": trace_id,
        "parent_id": parent_id,
        "events": mine,
        "scanned": coverage.scanned,
        "oldest": coverage.oldest,
        "complete": coverage.complete,
        "dead_letter": dead,
    }))
    .into_response())
}

/// The dead letter of task `id` in `queue`, among its oldest [`DEAD_SCAN`].
async fn dead_letter_of(
    state: &AppState,
    queue: &str,
    id: &str,
) -> Result<Option<DeadLetter>, ApiError> {
    let mut after: Option<String> = None;
    let mut looked = 0usize;
    while looked < DEAD_SCAN {
        let page = (state.broker)
            .dead_letters_after(queue, after.as_deref(), DEAD_PAGE)
            .await?;
        looked += page.len();
        let full = page.len() == DEAD_PAGE;
        after = page.last().map(|l| l.entry.clone());
        if let Some(letter) = page
            .into_iter()
            .find(|l| l.envelope.as_ref().is_some_and(|e| e.id == id))
        {
            return Ok(Some(letter));
        }
        if !full {
            break;
        }
    }
    Ok(None)
}
