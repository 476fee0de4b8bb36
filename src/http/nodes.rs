//! `GET /nodes`: the nodes currently consuming from this node's broker, from their presence
//! records (written every second by each node's broker actor, kept `PRESENCE_TTL`): name,
//! queues, entries held per queue, start time, last write, and whether it is running,
//! draining or stopping (and since when). With `memory://` it is this node.

use actors::broker::Coordination;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, AppState};

/// `GET /nodes` → `{"nodes": [{"name", "queues", "in_flight": {queue: n}, "started_at",
/// "last_seen", "state", "state_since"}]}`, by name.
pub async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let nodes = state.broker.nodes().await?;
    Ok(Json(json!({ "nodes": nodes })).into_response())
}
