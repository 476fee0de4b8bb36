//! Queue depths and dead letters: `GET /queues`, `GET /dlq/{queue}`,
//! `POST /dlq/{queue}/requeue`, `POST /queues/{queue}/purge`.

use actors::broker::Broker;
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
                    "concurrency": queue.concurrency,
                })
            }
            Err(err) => {
                let answer = json!({ "error": err.to_string(), "concurrency": queue.concurrency });
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

/// `GET /dlq/{queue}?limit=N`: the oldest dead letters.
pub async fn dead_letters(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    query: LimitQuery,
) -> Result<Response, ApiError> {
    known(&state, &queue)?;
    let letters = state.broker.dead_letters(&queue, limit(query)?).await?;
    Ok(Json(json!({ "queue": queue, "dead_letters": letters })).into_response())
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
