//! `POST /tasks` (enqueue one task or a batch), `GET /tasks/{id}` (a task's record: its
//! state from enqueue to outcome) and `POST /tasks/{id}/revoke`.
//!
//! A request names a task defined under `[tasks.NAME]`; its queue comes from the config
//! unless the request routes it to another defined queue. Every problem is a 400 that names
//! the field (`[1].args: invalid type: …`, `[0].task: no such task `x``); a batch with one bad
//! item enqueues nothing.
//!
//! Times and limits: `countdown` (seconds), `eta`, `expires` (RFC 3339), `time_limit_ms` and
//! `soft_time_limit_ms` are checked as the consumer will read them ([`actors::caps`],
//! `Envelope::due` / `expiry` / `limits`): a countdown or eta more than 365 days ahead, a time
//! that is not RFC 3339, a limit of zero, over 7 days, or a soft limit not below the hard one
//! it ends up with is a 400 naming the field and the limit — never a panic.
//!
//! Sizes: an envelope whose JSON is over the broker's `max_entry_bytes` is a 413 naming its
//! size and the limit (`[2]: task `x`: the envelope is … bytes, over …`), and so is a body
//! over [`body_limit`] (read no further). Both are JSON errors like every other; the body is
//! read here with its own limit, not through axum's `DefaultBodyLimit` (whose 2 MB rejection
//! would come before the per-envelope check and say less).
//!
//! Ids: a chosen `id` must pass the broker's rule ([`check_id`]: at most 256 bytes, no control
//! character, not `.`/`..`; a 400 naming `[n].id` otherwise) and is unique while its task is
//! queued or running and while its record lasts: posting it again answers
//! `{"id", "duplicate": true}` and runs nothing. `GET /tasks/{id}` takes the id
//! percent-encoded (`a%2Fb` for `a/b`).
//!
//! Revoke: `POST /tasks/{id}/revoke` with an optional body `{"terminate": true}` answers what
//! the task was when revoked — `202 {"id", "was", "terminate"}` with `was` = `queued`,
//! `scheduled`, `retrying` (it will not run), `running` (stopped when `terminate`, else it
//! finishes and is not retried) or `unknown` (kept `broker.result_ttl` for a task not met
//! yet); `200` with `was` = `revoked` when it was revoked already; `409` when it had ended.

use std::time::SystemTime;

use actors::broker::{
    BrokerError, Callback, Enqueued, Envelope, FieldError, Records, Revoked, TaskQueue, TaskState,
    Timestamp, check_id,
};
use actors::caps::{self, MAX_DELAY, Unit};
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{ApiError, AppState};

/// Most tasks one request may enqueue.
pub const MAX_BATCH: usize = 10_000;

/// The smallest [`body_limit`]: axum's default body limit, so a batch that fitted before a
/// small `max_entry_bytes` was configured still fits.
pub const MIN_BODY_LIMIT: usize = 2 * 1024 * 1024;

/// The largest `POST /tasks` body read: four times `max_entry_bytes` (a single task somewhat
/// over the cap still gets the precise per-envelope 413), at least [`MIN_BODY_LIMIT`].
pub fn body_limit(max_entry_bytes: usize) -> usize {
    max_entry_bytes.saturating_mul(4).max(MIN_BODY_LIMIT)
}

/// One task to enqueue, as posted.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskRequest {
    task: String,
    #[serde(default)]
    args: Vec<Value>,
    #[serde(default)]
    kwargs: Map<String, Value>,
    /// Another defined queue than the task's own.
    queue: Option<String>,
    /// Chosen id (a UUID is generated otherwise): unique while its task lives.
    id: Option<String>,
    /// Not before (RFC 3339).
    eta: Option<String>,
    /// Not before now + this many seconds.
    countdown: Option<f64>,
    /// Not after (RFC 3339).
    expires: Option<String>,
    idempotency_key: Option<String>,
    time_limit_ms: Option<u64>,
    soft_time_limit_ms: Option<u64>,
    #[serde(default)]
    link: Vec<Callback>,
    #[serde(default)]
    link_error: Vec<Callback>,
    trace_id: Option<String>,
    parent_id: Option<String>,
    root_id: Option<String>,
}

/// `POST /tasks`: a task object or an array of them → `202` with `{"id", "duplicate"}` (or
/// an array of those, in order).
pub async fn enqueue(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let max_entry_bytes = state.broker.settings().max_entry_bytes;
    let limit = body_limit(max_entry_bytes);
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        let sent = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .map_or(String::new(), |n| format!(" ({n} bytes)"));
        ApiError::TooLarge(format!(
            "body{sent}: over the limit of {limit} bytes for one request (4 × the broker's \
             max_entry_bytes of {max_entry_bytes}, at least {MIN_BODY_LIMIT})"
        ))
    })?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("body: not JSON: {e}")))?;
    let (items, batch) = match value {
        Value::Array(items) => (items, true),
        single @ Value::Object(_) => (vec![single], false),
        _ => {
            return Err(ApiError::BadRequest(
                "body: expected a task object or an array of them".into(),
            ));
        }
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(ApiError::BadRequest(format!(
            "body: expected 1 to {MAX_BATCH} tasks, got {}",
            items.len()
        )));
    }
    let now = SystemTime::now();
    let mut envelopes = Vec::with_capacity(items.len());
    for (n, item) in items.into_iter().enumerate() {
        let at = if batch {
            format!("[{n}]")
        } else {
            String::new()
        };
        let request: TaskRequest = serde_path_to_error::deserialize(item).map_err(|e| {
            let path = e.path().to_string();
            let field = match (at.is_empty(), path.as_str()) {
                (_, ".") => at.clone(),
                (true, _) => path,
                (false, _) => format!("{at}.{path}"),
            };
            let field = if field.is_empty() {
                "body".to_string()
            } else {
                field
            };
            ApiError::BadRequest(format!("{field}: {}", e.inner()))
        })?;
        envelopes.push(envelope(&state, request, now).map_err(|(field, why)| {
            let prefix = if at.is_empty() {
                field
            } else {
                format!("{at}.{field}")
            };
            ApiError::BadRequest(format!("{prefix}: {why}"))
        })?);
    }
    let counting = state.metrics.enqueuing(&envelopes);
    let enqueued: Vec<Enqueued> = state.broker.enqueue(envelopes).await.map_err(|err| {
        // An envelope over the size cap: name its place in a batch.
        if let (true, BrokerError::TooLarge { index, .. }) = (batch, &err) {
            return ApiError::TooLarge(format!("[{index}]: {err}"));
        }
        ApiError::from(err)
    })?;
    counting.done(&enqueued);
    let body = if batch {
        json!(enqueued)
    } else {
        json!(enqueued[0])
    };
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}

/// Checks a request against the config and builds its envelope; `Err((field, why))`.
fn envelope(
    state: &AppState,
    request: TaskRequest,
    now: SystemTime,
) -> Result<Envelope, (String, String)> {
    if let Some(id) = &request.id {
        check_id(id).map_err(|why| ("id".to_string(), why))?;
    }
    let config = &state.config;
    let defined = |name: &str| config.tasks.get(name);
    let Some(task) = defined(&request.task) else {
        let known: Vec<&str> = config.tasks.keys().map(String::as_str).collect();
        return Err((
            "task".into(),
            format!(
                "no such task `{}` (defined: {})",
                request.task,
                known.join(", ")
            ),
        ));
    };
    let queue = match request.queue {
        Some(queue) if !config.queues.contains_key(&queue) => {
            return Err(("queue".into(), format!("no such queue `{queue}`")));
        }
        Some(queue) => queue,
        None => task.queue.clone(),
    };
    for (field, callbacks) in [("link", &request.link), ("link_error", &request.link_error)] {
        for (n, callback) in callbacks.iter().enumerate() {
            if defined(&callback.task).is_none() {
                return Err((
                    format!("{field}[{n}].task"),
                    format!("no such task `{}`", callback.task),
                ));
            }
        }
    }
    let eta = match (request.eta, request.countdown) {
        (Some(_), Some(_)) => {
            return Err(("countdown".into(), "give eta or countdown, not both".into()));
        }
        (None, Some(secs)) => {
            let countdown = caps::checked(secs, Unit::Seconds, MAX_DELAY)
                .map_err(|e| ("countdown".to_string(), e.to_string()))?;
            Some(Timestamp::at(caps::due_after(now, countdown)))
        }
        (eta, None) => eta.map(Timestamp::from),
    };
    let (hard, soft) = (task.time_limit, task.soft_time_limit);
    let mut envelope = Envelope::new(request.task, queue);
    envelope.id = request.id.unwrap_or_default();
    envelope.args = request.args;
    envelope.kwargs = request.kwargs;
    envelope.eta = eta;
    envelope.expires = request.expires.map(Timestamp::from);
    envelope.idempotency_key = request.idempotency_key;
    envelope.time_limit_ms = request.time_limit_ms;
    envelope.soft_time_limit_ms = request.soft_time_limit_ms;
    envelope.link = request.link;
    envelope.link_error = request.link_error;
    envelope.trace_id = request.trace_id;
    envelope.parent_id = request.parent_id;
    envelope.root_id = request.root_id;
    // Its times and limits, as the consumer will read them (caps, the soft < hard rule).
    let field = |e: FieldError| (e.field.to_string(), e.why);
    envelope.due(now).map_err(field)?;
    envelope.expiry().map_err(field)?;
    envelope.limits(hard, soft).map_err(field)?;
    Ok(envelope)
}

/// `GET /tasks/{id}`: the task's record (its state from enqueue to outcome), or 404.
pub async fn record(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.broker.record(&id).await? {
        Some(record) => Ok(Json(record).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no task {id}: unknown, or ended more than broker.result_ttl ago (an entry \
             another program wrote to a stream has a record once a consumer takes it)"
        ))),
    }
}

/// The optional body of `POST /tasks/{id}/revoke`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    /// Stop a running attempt (soft signal, then hard after `runtime.terminate_grace`).
    #[serde(default)]
    terminate: bool,
}

/// `POST /tasks/{id}/revoke` (body optional: `{"terminate": true}`).
pub async fn revoke(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let request: RevokeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RevokeRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("body: {e}")))?
    };
    check_id(&id).map_err(|why| ApiError::BadRequest(format!("id: {why}")))?;
    let was = match state.broker.revoke(&id, request.terminate).await? {
        Revoked::Ended(ended) => {
            return Err(ApiError::Conflict(format!(
                "task {id} has ended ({}): nothing to revoke",
                ended.name()
            )));
        }
        Revoked::AlreadyRevoked => {
            let body = json!({ "id": id, "was": "revoked", "terminate": request.terminate });
            return Ok((StatusCode::OK, Json(body)).into_response());
        }
        Revoked::Unknown => "unknown",
        Revoked::Running => TaskState::Running.name(),
        Revoked::Pending(pending) => pending.name(),
    };
    let body = json!({ "id": id, "was": was, "terminate": request.terminate });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
