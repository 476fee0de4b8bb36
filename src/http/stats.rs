//! `GET /stats/history`: this node's throughput, wait and run time per queue over the last
//! minutes, from its [`History`](actors::history::History) (one sample every
//! [`EVERY`], the newest [`KEEP`] kept). The
//! live page draws it. Works with `[metrics] enabled = false` too: the history reads the
//! queues' own counters, not the Prometheus registry.

use actors::history::{EVERY, KEEP};
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;

/// `GET /stats/history` → `{"every_ms", "keep", "samples": [{"at", "interval_ms", "queues":
/// {"chat": {"succeeded", "retried", "dead", "wait": {"count", "mean_ms", "p95_ms"}, "run":
/// {…}, "depth": {"ready", "delayed", "in_flight", "dead"} | null}}}]}`, oldest first.
pub async fn history(State(state): State<AppState>) -> Response {
    Json(json!({
        "every_ms": u64::try_from(EVERY.as_millis()).unwrap_or(u64::MAX),
        "keep": KEEP,
        "samples": state.history.samples(),
    }))
    .into_response()
}
