//! The egress proxy: `/egress/{resource}/{path}` forwards a task's call to the resource's
//! configured base URL through the node's one breaker / limiter for it, with the API key
//! injected. Python tasks point their client's base URL at
//! `http://127.0.0.1:7070/egress/zep` (or `/egress/openai`) and share the node's protections.
//!
//! It is never an open proxy:
//! - only the resource's base URL is reachable: the path is taken raw from the request and
//!   refused (400) when it has a `.` or `..` segment, an empty segment (`//`), a backslash, an
//!   encoded slash, backslash or dot (`%2F`, `%5C`, `%2E`), or a control character — so neither
//!   `..` nor an absolute URL can leave the base;
//! - the caller's `Authorization`, `Host`, `Cookie`, `Proxy-*` and hop-by-hop headers (and any
//!   header named in `Connection`) are dropped; the resource adds its own key;
//! - bodies are capped at [`MAX_BODY`] (413 beyond);
//! - the resource clients do not follow redirects;
//! - the injected key never comes back: the resource clients replace the caller's
//!   `Accept-Encoding` with `identity` and decode whatever encoding the upstream uses anyway
//!   (gzip, deflate; any other is never passed on — OpenAI answers `502` naming it, Zep counts a
//!   failed call: see [`actors::resource::decode`]), and the proxy runs every header and the
//!   decoded body through the resource's [`Redactor`] — the key as itself, as JSON `\u`
//!   escapes or percent-encoded becomes `<redacted>` ([`actors::resource::redact`] says what is
//!   and is not caught). The answer goes out without `Content-Encoding`, with the
//!   `Content-Length` of what is sent (or chunked).
//!
//! Answers are streamed when the resource streams them ([`EgressBody::Stream`]: an OpenAI
//! event stream, or an answer over [`MAX_BODY`]): each decoded chunk is redacted and sent as it
//! arrives, holding back only a tail that could still be the start of the key. A stream that
//! breaks off upstream is cut off to the caller too (logged), never completed as if whole.
//!
//! When an admin token is configured, callers must present it in `X-Runtime-Token` (their
//! `Authorization` header belongs to the upstream API and is dropped) — or the node's egress
//! token ([`EgressAccess`]), which the node's own children get instead of the admin token and
//! which opens nothing but this proxy.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::sync::Arc;

use actors::resource::redact::{Redaction, Redactor};
use actors::resource::{EgressBody, EgressRequest, EgressStream, HOP_BY_HOP};
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use tracing::warn;

use super::{ApiError, AppState, constant_time_eq};

/// Largest request body forwarded (and the most of an answer a resource keeps whole).
pub use actors::resource::MAX_BODY;

/// Header carrying the admin token on egress calls.
pub const TOKEN_HEADER: &str = "x-runtime-token";

/// How the node's children (`exec` commands, pool agents) reach the egress proxy: its base
/// URL and a token of their own, handed to them as `RT_EGRESS_URL` and `RT_EGRESS_TOKEN`.
///
/// Children never get the admin token. The egress token is random for each start of the node
/// and, where an admin token is configured, the proxy accepts it in `X-Runtime-Token` in its
/// place; every other route refuses it. Without an admin token the proxy asks for no token.
#[derive(Clone)]
pub struct EgressAccess {
    url: String,
    token: String,
}

impl EgressAccess {
    /// The access to the proxy of a node listening on `addr` (an unspecified address is
    /// reached on loopback), with a fresh random token.
    pub fn new(addr: SocketAddr) -> Self {
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Self {
            url: format!("http://{}/egress", SocketAddr::new(ip, addr.port())),
            token: format!("{:032x}", rand::random::<u128>()),
        }
    }

    /// `http://IP:PORT/egress`: a resource is at `{url}/{resource}/…`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The token the proxy accepts from the node's children.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The variables every child of the node gets: `RT_EGRESS_URL` and `RT_EGRESS_TOKEN`.
    pub fn vars(&self) -> [(&'static str, &str); 2] {
        [
            ("RT_EGRESS_URL", &self.url),
            ("RT_EGRESS_TOKEN", &self.token),
        ]
    }
}

impl fmt::Debug for EgressAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EgressAccess")
            .field("url", &self.url)
            .field("token", &"***")
            .finish()
    }
}

/// `ANY /egress/{resource}/{*path}`
pub async fn forward(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.admin_token {
        let offered = request
            .headers()
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .as_bytes();
        let children = state.egress_token.as_deref().unwrap_or_default();
        let child = !children.is_empty() && constant_time_eq(offered, children.as_bytes());
        if !constant_time_eq(offered, token.as_bytes()) && !child {
            return Err(ApiError::Unauthorized);
        }
    }
    let (parts, body) = request.into_parts();
    let raw = parts.uri.path();
    let rest = raw
        .strip_prefix("/egress/")
        .ok_or_else(|| ApiError::NotFound("no such route".into()))?;
    let (name, path) = match rest.split_once('/') {
        Some((name, path)) => (name, format!("/{path}")),
        None => (rest, "/".to_string()),
    };
    let resource = state
        .resources
        .get(name)
        .ok_or_else(|| ApiError::NotFound(format!("no such resource `{name}`")))?
        .clone();
    check_path(&path).map_err(ApiError::BadRequest)?;
    let path_and_query = match parts.uri.query() {
        Some(query) if query.chars().any(char::is_control) => {
            return Err(ApiError::BadRequest("query: control characters".into()));
        }
        Some(query) => format!("{path}?{query}"),
        None => path,
    };
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError::TooLarge(format!("body: larger than {MAX_BODY} bytes")))?;
    let egress = EgressRequest {
        method: parts.method,
        path_and_query,
        headers: forwarded_headers(&parts.headers),
        body,
    };
    let answer = resource.forward(egress).await;
    let redactor = resource.redactor();
    let mut headers = forwarded_headers(&answer.headers);
    // The body below is decoded: what it was sent as no longer applies.
    headers.remove(header::CONTENT_ENCODING);
    if let Some(redactor) = &redactor {
        redactor.redact_headers(&mut headers);
    }
    let body = match answer.body {
        EgressBody::Full(bytes) => Body::from(match &redactor {
            Some(redactor) => Bytes::from(redactor.redact(&bytes).into_owned()),
            None => bytes,
        }),
        EgressBody::Stream(stream) => {
            Body::from_stream(redacted(stream, redactor, name.to_string()))
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = answer.status;
    *response.headers_mut() = headers;
    Ok(response.into_response())
}

/// `stream`, redacted chunk by chunk (module docs); an upstream failure ends it with an error,
/// so the caller's response is cut off rather than looking complete.
fn redacted(
    stream: EgressStream,
    redactor: Option<Arc<Redactor>>,
    resource: String,
) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    let redaction = redactor.map(Redaction::new);
    futures_util::stream::unfold(Some((stream, redaction)), move |state| {
        let resource = resource.clone();
        async move {
            let (mut stream, mut redaction) = state?;
            loop {
                match stream.chunk().await {
                    Ok(Some(chunk)) => {
                        let out = match &mut redaction {
                            Some(redaction) => redaction.push(&chunk),
                            None => chunk,
                        };
                        if !out.is_empty() {
                            return Some((Ok(out), Some((stream, redaction))));
                        }
                    }
                    Ok(None) => {
                        let rest = redaction.as_mut().map(Redaction::finish)?;
                        return (!rest.is_empty()).then_some((Ok(rest), None));
                    }
                    Err(err) => {
                        warn!(%resource, error = %err, "egress answer cut off");
                        return Some((Err(std::io::Error::other(err)), None));
                    }
                }
            }
        }
    })
}

/// Refuses a path that could leave the base URL (see the module docs).
pub fn check_path(path: &str) -> Result<(), String> {
    if path.chars().any(|c| c.is_control() || c == '\\') {
        return Err("path: control characters or backslashes are not allowed".into());
    }
    let lowered = path.to_ascii_lowercase();
    for encoded in ["%2f", "%5c", "%2e", "%00"] {
        if lowered.contains(encoded) {
            return Err(format!("path: encoded `{encoded}` is not allowed"));
        }
    }
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
    for (n, segment) in segments.iter().enumerate() {
        let last = n + 1 == segments.len();
        if segment.is_empty() && !last {
            return Err("path: empty segment (`//`) is not allowed".into());
        }
        if *segment == "." || *segment == ".." {
            return Err("path: `.` and `..` segments are not allowed".into());
        }
    }
    Ok(())
}

/// Headers a proxy must not pass on besides the hop-by-hop ones ([`HOP_BY_HOP`]): the
/// caller's credentials and the host it called.
const CREDENTIALS: [HeaderName; 4] = [
    header::AUTHORIZATION,
    header::HOST,
    header::COOKIE,
    header::SET_COOKIE,
];

/// `headers` without the dropped ones, `Keep-Alive`, the admin token and whatever
/// `Connection` names.
pub fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let lower = name.as_str();
        if CREDENTIALS.contains(name)
            || HOP_BY_HOP.contains(&lower)
            || lower == TOKEN_HEADER
            || named.iter().any(|n| n == lower)
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}
