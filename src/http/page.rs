//! `GET /`: the live page — the operator's dashboard of a node — as three static files
//! compiled into the binary, no build step: the markup ([`PAGE`], `page.html`), its style
//! ([`STYLE`], `page.css`, at `GET /page.css`) and its script ([`SCRIPT`], `page.js`, at
//! `GET /page.js`), beside this file.
//!
//! What it shows and which routes it reads: the supervision tree (`GET /actors`, every
//! second), queue depths (`GET /queues`), health (`GET /health`), the events feed (`GET
//! /events` through an `EventSource`), charts of the last minutes (`GET /stats/history`),
//! task search and detail (`GET /tasks`, `GET /tasks/{id}`, `GET /tasks/{id}/timeline`), dead
//! letters (`GET /dlq/{queue}`) and the nodes (`GET /nodes`). Its actions — requeue, retry
//! or delete a dead letter, purge a queue or its dead letters — call the mutating routes with
//! the admin token the operator typed in (kept in the tab's `sessionStorage`, sent as
//! `Authorization: Bearer`); a `401` asks for it.
//!
//! Everything the page renders from the node — task names, errors, reasons, envelopes — is set
//! as text (`textContent`, `setAttribute`), never parsed as HTML. The response's
//! [`CONTENT_SECURITY_POLICY`] backs that up in the browser: scripts and styles come only from
//! the node's own `/page.js` and `/page.css` (no inline script or style at all), nothing may be
//! loaded from another origin (no CDN, fonts, images or frames), requests go only to the node
//! itself, forms never navigate, and Trusted Types are required, so assigning a string to an
//! HTML sink (`innerHTML` and friends) throws instead of rendering markup.

use axum::http::header;
use axum::response::IntoResponse;

/// The page's markup.
pub const PAGE: &str = include_str!("page.html");

/// The page's style (`GET /page.css`).
pub const STYLE: &str = include_str!("page.css");

/// The page's script (`GET /page.js`).
pub const SCRIPT: &str = include_str!("page.js");

/// The `Content-Security-Policy` the page is served with.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; \
    script-src 'self'; style-src 'self'; connect-src 'self'; \
    img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
    require-trusted-types-for 'script'; trusted-types 'none'";

/// One of the page's files, never cached (a new binary may serve a new page).
fn file(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

/// `GET /`: the page.
pub async fn page() -> impl IntoResponse {
    file("text/html; charset=utf-8", PAGE)
}

/// `GET /page.css`
pub async fn style() -> impl IntoResponse {
    file("text/css; charset=utf-8", STYLE)
}

/// `GET /page.js`
pub async fn script() -> impl IntoResponse {
    file("text/javascript; charset=utf-8", SCRIPT)
}
