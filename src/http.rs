//! The introspection and admin HTTP surface (axum), loopback by default.
//!
//! | route | what |
//! |---|---|
//! | `GET /health` | 200 when the root and every permanent actor are running, else 503 with reasons |
//! | `GET /actors` | the supervision tree as JSON; `?format=text` for an indented rendering |
//! | `POST /chaos/kill/{path}` | kill that actor (only with `[chaos] enabled = true`) |
//!
//! Mutating routes require `Authorization: Bearer <token>` when `http.admin_token_env` names a
//! token. Errors are JSON `{"error": "..."}` and never carry internals or secrets.

use std::sync::Arc;

use actors::tree::Tree;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tracing::warn;

use crate::topology::ROOT;

/// What the handlers read.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The node's tree registry.
    pub tree: Arc<Tree>,
    /// Bearer token for mutating routes, when configured.
    pub admin_token: Option<Arc<str>>,
    /// Whether the chaos routes exist.
    pub chaos: bool,
}

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400
    #[error("{0}")]
    BadRequest(String),
    /// 401
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// 404
    #[error("{0}")]
    NotFound(String),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        };
        let body = Json(json!({ "error": self.to_string() }));
        if status == StatusCode::UNAUTHORIZED {
            (status, [(header::WWW_AUTHENTICATE, "Bearer")], body).into_response()
        } else {
            (status, body).into_response()
        }
    }
}

/// The router of the node's HTTP server.
pub fn app(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/health", get(health))
        .route("/actors", get(actors));
    if state.chaos {
        let mutating = Router::new()
            .route("/chaos/kill/{*path}", post(chaos_kill))
            .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
        router = router.merge(mutating);
    }
    router
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .with_state(state)
}

async fn health(State(state): State<AppState>) -> Response {
    let problems = state.tree.unhealthy();
    if problems.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response()
    } else {
        let body = json!({ "status": "unhealthy", "problems": problems });
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActorsQuery {
    format: Option<String>,
}

async fn actors(
    State(state): State<AppState>,
    query: Result<Query<ActorsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    match query.format.as_deref() {
        None | Some("json") => Ok(Json(state.tree.nested()).into_response()),
        Some("text") => Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            state.tree.render_text(),
        )
            .into_response()),
        Some(other) => Err(ApiError::BadRequest(format!(
            "format: expected `json` or `text`, got `{other}`"
        ))),
    }
}

async fn chaos_kill(
    State(state): State<AppState>,
    Path(path): Path<String>,
) -> Result<Response, ApiError> {
    let path = path.trim_matches('/');
    let path = if path == ROOT || path.starts_with(&format!("{ROOT}/")) {
        path.to_string()
    } else {
        format!("{ROOT}/{path}")
    };
    let cell = state
        .tree
        .cell(&path)
        .ok_or_else(|| ApiError::NotFound(format!("no running actor at {path}")))?;
    warn!(actor = %path, "chaos: killing actor");
    cell.kill();
    Ok((StatusCode::ACCEPTED, Json(json!({ "killed": path }))).into_response())
}

async fn authorize(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.admin_token {
        let offered = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(offered.as_bytes(), token.as_bytes()) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// Compares without an early exit on the first differing byte.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
