//! `GET /metrics`: the node's metrics in the Prometheus text format (version 0.0.4), from
//! [`actors::metrics::Metrics`]; the queue depths and the broker connection are read at
//! scrape time. `404` when `[metrics] enabled = false`.

use actors::metrics::CONTENT_TYPE;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// `GET /metrics`
pub async fn scrape(State(state): State<AppState>) -> Result<Response, ApiError> {
    match state.metrics.render(&state.broker).await {
        Some(text) => Ok(([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response()),
        None => Err(ApiError::NotFound(
            "metrics are disabled ([metrics] enabled = false)".into(),
        )),
    }
}
