//! Process pools: `GET /pools` (every pool's snapshot), `POST /pools/{name}/claim` (take
//! an idle agent and hand it the JSON body as its assignment) and `POST /pools/{name}/reset`
//! (an operator leaves `fatal`/`backoff` once the cause is fixed).

use std::time::Duration;

use actors::pool::ClaimError;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{ApiError, AppState};

/// `GET /pools`
pub async fn snapshots(State(state): State<AppState>) -> Response {
    let pools: Map<String, Value> = state
        .pools
        .iter()
        .map(|(name, pool)| (name.clone(), pool.snapshot()))
        .collect();
    Json(json!({ "pools": pools })).into_response()
}

/// `POST /pools/{name}/claim` with the assignment as the JSON body (empty → `{}`): `200
/// {"agent_id", "pid"}`; `503` with `Retry-After` when no agent was idle within
/// `claim_timeout`, `503` with the reason when the pool is fatal or stopping; `409` for a
/// worker pool (it runs tasks, it has no agents to claim).
pub async fn claim(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let pool = state
        .pools
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no such pool `{name}`")))?;
    if pool.is_worker() {
        return Err(ApiError::Conflict(
            ClaimError::Workers { pool: name }.to_string(),
        ));
    }
    let assignment: Value = if body.is_empty() {
        json!({})
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("body: not JSON: {e}")))?
    };
    match pool.claim(assignment).await {
        Ok(claimed) => {
            Ok(Json(json!({ "agent_id": claimed.agent_id, "pid": claimed.pid })).into_response())
        }
        Err(err) => {
            let retry = match &err {
                ClaimError::Timeout { .. } => Some(Duration::from_secs(1)),
                _ => None,
            };
            let mut response = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": err.to_string() })),
            )
                .into_response();
            if let Some(retry) = retry {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry.as_secs().into());
            }
            Ok(response)
        }
    }
}

/// `POST /pools/{name}/reset`: clears a `fatal` or `backoff` pool's failure count
/// ([`Pool::reset`](actors::pool::Pool::reset)) so it starts agents again at once: `202
/// {"pool", "reset": true, "was": "fatal: …", "state": {snapshot}}`. A healthy pool is left
/// alone (no agent is stopped or started): `200` with `"reset": false, "was": "ok"`. `404`
/// for an unknown pool.
pub async fn reset(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let pool = state
        .pools
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no such pool `{name}`")))?;
    let (status, reset, was) = match pool.reset() {
        Some(was) => (StatusCode::ACCEPTED, true, was),
        None => (StatusCode::OK, false, "ok".to_string()),
    };
    let body = json!({ "pool": name, "reset": reset, "was": was, "state": pool.snapshot() });
    Ok((status, Json(body)).into_response())
}
