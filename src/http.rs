//! The introspection and admin HTTP surface (axum), loopback by default.
//!
//! | route | what |
//! |---|---|
//! | `GET /`, `GET /page.css`, `GET /page.js` | the live page ([`page`]): tree, queues, events, charts, task search and detail, dead letters, nodes |
//! | `GET /health` | 200 when the root and every permanent actor are running, else 503 with reasons |
//! | `GET /actors` | the supervision tree as JSON; `?format=text` for an indented rendering |
//! | `POST /tasks`, `GET /tasks/{id}`, `POST /tasks/{id}/revoke` | enqueue (one or a batch), a task's record, revoke ([`tasks`]) |
//! | `GET /tasks`, `GET /tasks/{id}/timeline` | search tasks over the recent events, one task's events and dead letter ([`search`]) |
//! | `GET /queues`, `GET /dlq/{queue}`, `POST /dlq/{queue}/requeue`, `POST /dlq/{queue}/purge`, `POST /dlq/{queue}/{entry}/requeue`, `DELETE /dlq/{queue}/{entry}`, `POST /queues/{queue}/purge` | depths and dead letters ([`queues`]) |
//! | `GET /stats/history` | throughput, wait and run time per queue over the last minutes ([`stats`]) |
//! | `ANY /egress/{resource}/{path}` | the egress proxy to a shared resource ([`egress`]) |
//! | `GET /pools`, `POST /pools/{name}/claim`, `POST /pools/{name}/reset` | process pools ([`pools`]) |
//! | `GET /events` | the events stream as Server-Sent Events ([`events`]) |
//! | `GET /metrics` | Prometheus text format ([`metrics`]) |
//! | `GET /nodes` | the nodes consuming from the broker, from their presence records ([`nodes`]) |
//! | `POST /chaos/kill/{path}` | kill that actor, or with `{consumer path}/{task id}` that running task's actor (only with `[chaos] enabled = true`) |
//!
//! Mutating routes require `Authorization: Bearer <token>` when `http.admin_token_env` names a
//! token. Errors are JSON `{"error": "..."}` and never carry internals or secrets — except
//! what hyper answers itself before a route runs ([`serve`] lists it). Every request body
//! must arrive within `http.body_read_timeout` (`serve::guard_body`); the server is
//! [`serve::serve`].

pub mod egress;
pub mod events;
pub mod metrics;
pub mod nodes;
pub mod page;
pub mod pools;
pub mod queues;
pub mod search;
pub mod serve;
pub mod stats;
pub mod tasks;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use actors::broker::{AnyBroker, BrokerError};
use actors::consumer::KillTaskError;
use actors::history::History;
use actors::metrics::Metrics;
use actors::pool::Pool;
use actors::resource::Resources;
use actors::tree::Tree;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use tracing::warn;

use crate::config::Config;
use crate::topology::ROOT;

/// What the handlers read.
#[derive(Clone, Debug)]
pub struct AppState {
    pub tree: Arc<Tree>,
    pub broker: Arc<AnyBroker>,
    /// Shared resources, for the egress proxy.
    pub resources: Arc<Resources>,
    /// Process pools, by name.
    pub pools: Arc<BTreeMap<String, Pool>>,
    /// The node's metrics (disabled unless the node sets them).
    pub metrics: Arc<Metrics>,
    /// The validated config (task routing, queue names).
    pub config: Arc<Config>,
    /// Bearer token for mutating routes, when configured.
    pub admin_token: Option<Arc<str>>,
    /// The token the node's children present to the egress proxy instead of the admin token
    /// ([`egress::EgressAccess`]); `None`: only the admin token opens it.
    pub egress_token: Option<Arc<str>>,
    /// Whether the chaos routes exist.
    pub chaos: bool,
    /// The bound on open `/events` streams.
    pub event_streams: Arc<events::EventStreams>,
    /// The node's throughput, wait and run time over the last minutes (`GET /stats/history`;
    /// empty unless the node samples it).
    pub history: Arc<History>,
}

impl AppState {
    /// The state of a node running `config`.
    pub fn new(
        tree: Arc<Tree>,
        broker: Arc<AnyBroker>,
        resources: Arc<Resources>,
        config: &Config,
    ) -> Self {
        Self {
            tree,
            broker,
            resources,
            pools: Arc::default(),
            metrics: Arc::default(),
            admin_token: config.http.admin_token.as_deref().map(Arc::from),
            egress_token: None,
            chaos: config.chaos.enabled,
            event_streams: Arc::default(),
            history: Arc::default(),
            config: Arc::new(config.clone()),
        }
    }
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
    /// 409: the request does not fit the resource's state (revoking a task that ended).
    #[error("{0}")]
    Conflict(String),
    /// 413
    #[error("{0}")]
    TooLarge(String),
    /// 503: an actor did not answer in time.
    #[error("{0}")]
    NoAnswer(String),
    /// 503: the broker failed the request.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

impl From<BrokerError> for ApiError {
    fn from(err: BrokerError) -> Self {
        match err {
            BrokerError::Invalid(why) => ApiError::BadRequest(why),
            too_large @ BrokerError::TooLarge { .. } => ApiError::TooLarge(too_large.to_string()),
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) | ApiError::NoAnswer(_) => StatusCode::SERVICE_UNAVAILABLE,
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
    let mut mutating = Router::new()
        .route("/tasks", post(tasks::enqueue))
        .route("/tasks/{id}/revoke", post(tasks::revoke))
        .route("/dlq/{queue}/requeue", post(queues::requeue_dead))
        .route("/dlq/{queue}/purge", post(queues::purge_dead))
        .route(
            "/dlq/{queue}/{entry}/requeue",
            post(queues::requeue_dead_entry),
        )
        .route("/dlq/{queue}/{entry}", delete(queues::delete_dead))
        .route("/pools/{name}/claim", post(pools::claim))
        .route("/pools/{name}/reset", post(pools::reset))
        .route("/queues/{queue}/purge", post(queues::purge));
    if state.chaos {
        mutating = mutating.route("/chaos/kill/{*path}", post(chaos_kill));
    }
    let mutating = mutating.route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .route("/", get(page::page))
        .route("/page.css", get(page::style))
        .route("/page.js", get(page::script))
        .route("/tasks", get(search::search))
        .route("/tasks/{id}/timeline", get(search::timeline))
        .route("/stats/history", get(stats::history))
        .route("/health", get(health))
        .route("/actors", get(actors))
        .route("/tasks/{id}", get(tasks::record))
        .route("/queues", get(queues::depths))
        .route("/pools", get(pools::snapshots))
        .route("/metrics", get(metrics::scrape))
        .route("/dlq/{queue}", get(queues::dead_letters))
        .route("/events", get(events::stream))
        .route("/nodes", get(nodes::list))
        .route("/egress/{resource}", any(egress::forward))
        .route("/egress/{resource}/{*path}", any(egress::forward))
        .merge(mutating)
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), json_errors))
        .with_state(state)
}

/// Axum's own rejections — a method not allowed (405, empty body), a path parameter that is
/// not UTF-8 (400, text), a body over the extractor's limit (413, text) — are not the JSON
/// error every route promises: this rewrites any error answer that is not JSON into
/// `{"error": "<its text, or the status reason>"}`, keeping its status and headers (`Allow`).
/// Egress answers are the upstream's own and pass untouched.
///
/// It also puts the request body under `http.body_read_timeout` ([`serve::guard_body`]):
/// when the body timed out or broke, the handler's error answer (whatever it made of the
/// failed read: a 413 from a size-limited read, a 400 from an extractor, an egress error) is
/// replaced by the JSON `408` or `400` that says what happened.
async fn json_errors(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let egress = request.uri().path().starts_with("/egress/");
    let (parts, body) = request.into_parts();
    let (body, body_watch) = serve::guard_body(body, state.config.http.body_read_timeout);
    let response = next.run(Request::from_parts(parts, body)).await;
    let status = response.status();
    if status.is_client_error() || status.is_server_error() {
        if let Some(failure) = body_watch.take() {
            return failure.into_response();
        }
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if egress || is_json || !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_string())
        .unwrap_or_default();
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
    } else {
        text
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    let body = axum::body::Body::from(json!({ "error": error }).to_string());
    Response::from_parts(parts, body)
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

/// How long the chaos route waits for a consumer to answer a task kill.
const KILL_TASK_TIMEOUT: Duration = Duration::from_secs(2);

/// `POST /chaos/kill/{path}`: kills the actor at `path`; or, when `path` is
/// `{consumer path}/{task id}`, asks that consumer to kill the task actor running that task
/// (task actors are not tree nodes; their consumer keeps them). The task id is everything
/// after the consumer's path, so it may contain `/` (sent percent-encoded).
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
    if let Some(cell) = state.tree.cell(&path) {
        warn!(actor = %path, "chaos: killing actor");
        cell.kill();
        return Ok((StatusCode::ACCEPTED, Json(json!({ "killed": path }))).into_response());
    }
    let Some((consumer, id)) = consumer_and_task(&state.tree, &path) else {
        return Err(ApiError::NotFound(format!("no running actor at {path}")));
    };
    let cell = state
        .tree
        .cell(consumer)
        .ok_or_else(|| ApiError::NotFound(format!("no running consumer at {consumer}")))?;
    match actors::consumer::kill_task(&cell, id, KILL_TASK_TIMEOUT).await {
        Ok(killed) => {
            warn!(actor = %consumer, task_id = %killed.id, task = %killed.task,
                attempt = killed.attempt, "chaos: killed task actor");
            let body = json!({
                "killed": path,
                "consumer": consumer,
                "task_id": killed.id,
                "task": killed.task,
                "queue": killed.queue,
                "attempt": killed.attempt,
            });
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
        Err(KillTaskError::NotRunning(id)) => Err(ApiError::NotFound(format!(
            "no running task `{id}` in {consumer}"
        ))),
        Err(KillTaskError::NotAConsumer) => Err(ApiError::NotFound(format!(
            "no running consumer at {consumer}"
        ))),
        Err(err @ KillTaskError::NoAnswer(_)) => {
            Err(ApiError::NoAnswer(format!("{consumer}: {err}")))
        }
    }
}

/// Splits `root/queues/chat/<task id>` into the path of a consumer of the tree and the rest
/// (the task id, possibly with `/` in it); `None` when no prefix of `path` is a consumer.
fn consumer_and_task<'a>(tree: &Tree, path: &'a str) -> Option<(&'a str, &'a str)> {
    path.match_indices('/').find_map(|(at, _)| {
        let (consumer, id) = (&path[..at], &path[at + 1..]);
        let is_consumer = tree.get(consumer).is_some_and(|a| a.kind == "consumer");
        (is_consumer && !id.is_empty()).then_some((consumer, id))
    })
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
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
