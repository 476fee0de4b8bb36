//! The node's HTTP server: the accept loop and each connection, with the limits
//! `axum::serve` does not offer — a cap on open connections, a time limit on reading a
//! request's head and one on reading its body — and an orderly stop.
//!
//! Why not `axum::serve`: it builds hyper's connection without a timer, which leaves hyper's
//! header read timeout off, and it has no connection cap. Here each connection is hyper's
//! HTTP/1 connection ([`hyper::server::conn::http1::Builder`]: only HTTP/1 is built, so there
//! is no protocol sniffing before the head is read) with [`TokioTimer`] and:
//!
//! - **`http.header_read_timeout`** — hyper's: the request line and headers must arrive within
//!   it, counted from the moment the connection waits for them (when it opens, and after each
//!   answer on a kept-alive one, so it also ends idle connections). Past it hyper closes the
//!   connection **without an answer**: it has no hook to write one.
//! - **[`MAX_HEADER_BYTES`]** — hyper's `max_header_size`: a larger head (request line and
//!   headers) is answered `431` by hyper itself.
//! - **`http.max_connections`** — an owned semaphore permit per connection, taken *before*
//!   `accept`: at the cap the server stops accepting and new connections wait in the kernel's
//!   listen backlog (a client sees a slow connect, not a refusal) until one closes. Reaching
//!   the cap is logged once, until a slot frees again.
//! - **`http.body_read_timeout`** — applied by `guard_body` in the router (the body only
//!   exists there): the whole request body must arrive within it, counted from when the
//!   router got the request; past it the body fails, the handler's error answer is replaced
//!   by a JSON `408` and the connection is closed. Answers — the `/events` stream, a streamed
//!   egress response — are never limited.
//!
//! What hyper answers by itself, before any route runs, and so **not in JSON**: a malformed
//! request line, method, URI, version or header (`400`), a head over [`MAX_HEADER_BYTES`] or
//! with more than 100 headers (`431`), a URI over hyper's limit (`414`) — each a bare status
//! line with `content-length: 0`, then the connection is closed — and a head that is not
//! complete within `header_read_timeout` (the connection is closed, no answer). A request
//! body that breaks off or is malformed (a bad chunk size, a connection closed mid-body) is
//! seen by the router: `guard_body` turns the handler's answer into a JSON `400` saying
//! why.
//!
//! Stopping: the accept loop ends when `shutdown` resolves, every connection is told to
//! finish its request in flight and close ([`hyper`]'s graceful shutdown), and [`serve`]
//! returns once all are closed — the caller bounds that wait (an `/events` stream never
//! finishes by itself).

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes, HttpBody};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tracing::{debug, info, warn};

use crate::config::HttpSettings;

/// Largest request head (request line and headers) hyper reads; above it hyper answers `431`.
/// Real heads are a few hundred bytes to a few KiB (a bearer token, an OpenAI client's
/// headers); 64 KiB leaves room and keeps a slow client's buffer small.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How long the accept loop pauses after an accept error that is not about one connection
/// (out of file descriptors): retrying at once would spin.
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` under the limits of `http` (see the module docs) until
/// `shutdown` resolves; then stops accepting, lets every open connection finish its request in
/// flight, and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    http: &HttpSettings,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let max = http.max_connections.get();
    let slots = Arc::new(Semaphore::new(max as usize));
    let (closing, closed) = watch::channel(false);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(http.header_read_timeout)
        .max_header_size(MAX_HEADER_BYTES);
    let mut shutdown = pin!(shutdown);
    let mut at_cap = false;
    loop {
        let permit = match Arc::clone(&slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if !at_cap {
                    warn!(
                        max_connections = max,
                        "http: max_connections reached; new connections wait in the listen backlog until one closes"
                    );
                    at_cap = true;
                }
                tokio::select! {
                    permit = Arc::clone(&slots).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break, // never closed
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        if at_cap && slots.available_permits() > 0 {
            info!(max_connections = max, "http: below max_connections again");
            at_cap = false;
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    warn!(error = %err, pause = ?ACCEPT_PAUSE, "http: accept failed");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let connection =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let mut closed = closed.clone();
        tokio::spawn(async move {
            let _slot = permit;
            let mut connection = pin!(connection);
            tokio::select! {
                ended = connection.as_mut() => {
                    if let Err(err) = ended {
                        debug!(%peer, error = %err, "http: connection ended with an error");
                    }
                }
                () = async { drop(closed.wait_for(|closed| *closed).await) } => {
                    connection.as_mut().graceful_shutdown();
                    if let Err(err) = connection.await {
                        debug!(%peer, error = %err, "http: connection ended with an error");
                    }
                }
            }
        });
    }
    drop(listener);
    let _ = closing.send(true);
    // Every connection holds a slot until it is closed.
    let _ = slots.acquire_many(max).await;
    Ok(())
}

/// Accept errors about one connection (it went away before being accepted): not worth a
/// pause.
fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Why a request body could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BodyFailure {
    /// Not complete within `http.body_read_timeout`.
    TimedOut(Duration),
    /// The connection broke or sent something that is not a body (a bad chunk size).
    Broken(String),
}

impl IntoResponse for BodyFailure {
    /// `408` with `Connection: close`, or `400`; JSON either way.
    fn into_response(self) -> Response {
        match self {
            BodyFailure::TimedOut(limit) => {
                let error = format!(
                    "body: not received in full within {} (http.body_read_timeout)",
                    humantime::format_duration(limit)
                );
                let mut response = (
                    StatusCode::REQUEST_TIMEOUT,
                    axum::Json(json!({ "error": error })),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                response
            }
            BodyFailure::Broken(why) => (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({ "error": format!("body: could not be read: {why}") })),
            )
                .into_response(),
        }
    }
}

/// Where a [`GuardedBody`] leaves its failure for the middleware that answers the request.
#[derive(Debug, Clone, Default)]
pub(crate) struct BodyWatch(Arc<Mutex<Option<BodyFailure>>>);

impl BodyWatch {
    fn set(&self, failure: BodyFailure) {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slot.get_or_insert(failure);
    }

    /// The failure of the body, if it failed.
    pub(crate) fn take(&self) -> Option<BodyFailure> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }
}

/// Wraps `body` so that it fails once `limit` has passed from now without its end, and so that
/// any failure (that one, or the connection's) is left in the returned [`BodyWatch`].
pub(crate) fn guard_body(body: Body, limit: Duration) -> (Body, BodyWatch) {
    let watch = BodyWatch::default();
    let guarded = GuardedBody {
        inner: body,
        deadline: Instant::now() + limit,
        limit,
        timer: None,
        watch: watch.clone(),
        failed: false,
    };
    (Body::new(guarded), watch)
}

/// The error a [`GuardedBody`] fails with at its deadline.
#[derive(Debug, thiserror::Error)]
#[error("request body not received in full within {0:?}")]
struct BodyTimedOut(Duration);

/// A request body with a deadline (see [`guard_body`]).
struct GuardedBody {
    inner: Body,
    deadline: Instant,
    limit: Duration,
    /// Armed the first time the body has to wait.
    timer: Option<Pin<Box<Sleep>>>,
    watch: BodyWatch,
    /// Ends the body after its first error.
    failed: bool,
}

impl HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(err))) => {
                this.failed = true;
                this.watch.set(BodyFailure::Broken(crate::innermost(&err)));
                return Poll::Ready(Some(Err(err)));
            }
            Poll::Ready(frame) => return Poll::Ready(frame),
            Poll::Pending => {}
        }
        let deadline = this.deadline;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            this.failed = true;
            this.watch.set(BodyFailure::TimedOut(this.limit));
            return Poll::Ready(Some(Err(axum::Error::new(BodyTimedOut(this.limit)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
