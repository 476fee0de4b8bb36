//! `GET /`: the live tree page — one static HTML file with inline CSS and JavaScript
//! ([`PAGE`], `page.html` beside this file), compiled into the binary, no build step.
//!
//! The page reads what any client can read: `GET /actors` (the tree and each actor's snapshot,
//! polled every second), `GET /queues`, `GET /health`, and `GET /events` through an
//! `EventSource`. It never calls a mutating route, so it needs no admin token even when one is
//! configured.
//!
//! Everything the page renders from the node — task names, errors, reasons — is set as text
//! (`textContent`, `setAttribute`), never parsed as HTML. The response's
//! [`CONTENT_SECURITY_POLICY`] backs that up in the browser: nothing may be loaded from another
//! origin (no CDN, fonts, images or frames), requests go only to the node itself, and Trusted
//! Types are required, so assigning a string to an HTML sink (`innerHTML` and friends) throws
//! instead of rendering markup. Inline script and style are allowed (`'unsafe-inline'`)
//! because the page is one file by design; a hash source would have to be recomputed on every
//! edit of the page, and the rules above already keep injected markup from ever being parsed.

use axum::http::header;
use axum::response::IntoResponse;

/// The page.
pub const PAGE: &str = include_str!("page.html");

/// The `Content-Security-Policy` the page is served with.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; \
    script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; \
    img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; \
    require-trusted-types-for 'script'; trusted-types 'none'";

/// `GET /`: the page, never cached (a new binary may serve a new page).
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
