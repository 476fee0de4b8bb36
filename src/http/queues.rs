//! Queue depths and dead letters: `GET /queues`, `GET /dlq/{queue}` (paged by `?after=`),
//! `POST /dlq/{queue}/requeue` (many), `POST /dlq/{queue}/{entry}/requeue` and
//! `DELETE /dlq/{queue}/{entry}` (one, by its entry id), `POST /dlq/{queue}/purge` (every dead
//! letter), `POST /queues/{queue}/purge` (ready and delayed entries).
//!
//! An entry id is checked before it reaches the broker (`<ms>-<seq>`,
//! [`actors::broker::check_entry`]): anything else is a 400 naming `entry` or `after`.

use actors::broker::{Admin, check_entry};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, json};

use super::{ApiError, AppState};

/// `?limit=N`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    limit: Option<usize>,
}

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;

impl Limit {
    fn get(&self) -> Result<usize, ApiError> {
        match self.limit.unwrap_or(DEFAULT_LIMIT) {
            n @ 1..=MAX_LIMIT => Ok(n),
            n => Err(ApiError::BadRequest(format!(
                "limit: expected 1 to {MAX_LIMIT}, got {n}"
            ))),
        }
    }
}

fn known(state: &AppState, queue: &str) -> Result<(), ApiError> {
    if state.config.queues.contains_key(queue) {
        Ok(())
    } else {
        Err(ApiError::NotFound(format!("no such queue `{queue}`")))
    }
}

type LimitQuery = Result<Query<Limit>, axum::extract::rejection::QueryRejection>;

fn limit(query: LimitQuery) -> Result<usize, ApiError> {
    let Query(limit) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    limit.get()
}

/// `GET /queues`: every configured queue with its depth and concurrency. One bad queue never
/// hides the others: a queue whose depth cannot be read (a key of the wrong type in its place)
/// is answered as `{"error", "concurrency"}` beside the good ones. A 503 only when no queue
/// could be read at all (the broker is down).
pub async fn depths(State(state): State<AppState>) -> Result<Response, ApiError> {
    let mut queues = Map::new();
    let mut failed = None;
    let mut read = 0usize;
    for (name, queue) in &state.config.queues {
        let answer = match state.broker.depth(name).await {
            Ok(depth) => {
                read += 1;
                json!({
                    "ready": depth.ready,
                    "delayed": depth.delayed,
                    "in_flight": depth.in_flight,
                    "dead": depth.dead,
                    "concurrency": queue.settings.concurrency,
                })
            }
            Err(err) => {
                let answer =
                    json!({ "error": err.to_string(), "concurrency": queue.settings.concurrency });
                failed.get_or_insert(err);
                answer
            }
        };
        queues.insert(name.clone(), answer);
    }
    if let (0, Some(err)) = (read, failed) {
        return Err(err.into());
    }
    Ok(Json(json!({ "queues": queues })).into_response())
}

/// `?limit=N&after=ENTRY`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    limit: Option<usize>,
    after: Option<String>,
}

/// `GET /dlq/{queue}?limit=N&after=ENTRY`: the oldest dead letters (after the entry `after`,
/// for the next page), and `next`: the `after` of the next page, `null` when this one was the
/// last.
pub async fn dead_letters(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    query: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    known(&state, &queue)?;
    let Query(page) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = Limit { limit: page.limit }.get()?;
    let after = page.after.filter(|a| !a.is_empty());
    if let Some(after) = &after {
        check_entry(after).map_err(|why| ApiError::BadRequest(format!("after: {why}")))?;
    }
    let letters = (state.broker)
        .dead_letters_after(&queue, after.as_deref(), limit)
        .await?;
    let next = (letters.len() == limit)
        .then(|| letters.last().map(|l| l.entry.clone()))
        .flatten();
    Ok(Json(json!({ "queue": queue, "dead_letters": letters, "next": next })).into_response())
}

/// Checks the `{entry}` of a route.
fn entry_param(entry: &str) -> Result<(), ApiError> {
    check_entry(entry).map_err(|why| ApiError::BadRequest(format!("entry: {why}")))
}

/// `POST /dlq/{queue}/{entry}/requeue`: that one dead letter back to the ready queue,
/// attempts reset → `{"queue", "entry", "requeued": task id}`; `404` when there is no such
/// letter (requeued or deleted already), `400` for a malformed one (it stays).
pub async fn requeue_dead_entry(
    State(state): State<AppState>,
    Path((queue, entry)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    known(&state, &queue)?;
    entry_param(&entry)?;
    match state.broker.requeue_dead_entry(&queue, &entry).await? {
        Some(id) => {
            Ok(Json(json!({ "queue": queue, "entry": entry, "requeued": id })).into_response())
        }
        None => Err(no_letter(&queue, &entry)),
    }
}

/// `DELETE /dlq/{queue}/{entry}`: deletes that one dead letter → `{"queue", "entry",
/// "deleted": true}`; `404` when there is none. The task's record stays.
pub async fn delete_dead(
    State(state): State<AppState>,
    Path((queue, entry)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    known(&state, &queue)?;
    entry_param(&entry)?;
    if state.broker.delete_dead(&queue, &entry).await? {
        Ok(Json(json!({ "queue": queue, "entry": entry, "deleted": true })).into_response())
    } else {
        Err(no_letter(&queue, &entry))
    }
}

fn no_letter(queue: &str, entry: &str) -> ApiError {
    ApiError::NotFound(format!(
        "no dead letter {entry} in `{queue}` (requeued or deleted already?)"
    ))
}

/// `POST /dlq/{queue}/purge`: deletes every dead letter of the queue → `{"queue",
/// "purged": n}`. The tasks' records stay.
pub async fn purge_dead(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Response, ApiError> {
    known(&state, &queue)?;
    let purged = state.broker.purge_dead(&queue).await?;
    Ok(Json(json!({ "queue": queue, "purged": purged })).into_response())
}

/// `POST /dlq/{queue}/requeue?limit=N`: back to the ready queue, attempts reset.
pub async fn requeue_dead(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    query: LimitQuery,
) -> Result<Response, ApiError> {
    known(&state, &queue)?;
    let moved = state.broker.requeue_dead(&queue, limit(query)?).await?;
    Ok(Json(json!({ "queue": queue, "requeued": moved })).into_response())
}

/// `POST /queues/{queue}/purge`: drop every ready and delayed entry.
pub async fn purge(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Response, ApiError> {
    known(&state, &queue)?;
    let purged = state.broker.purge(&queue).await?;
    Ok(Json(json!({ "queue": queue, "purged": purged })).into_response())
}
