//! `/egress/zep/…`: requests passed through with the key injected while Zep answers, answered
//! by the runtime (degraded, buffered, `503`) while it does not (module docs of [`super`]).

use std::time::Duration;

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use super::api::{Call, Sent, Upstream};
use super::{DEGRADED_HEADER, ZepClient, bump};
use crate::resource::{EgressBody, EgressRequest, EgressResponse, drop_hop_by_hop};

impl ZepClient {
    /// The egress proxy's call (see the module docs).
    pub async fn forward(&self, request: EgressRequest) -> EgressResponse {
        bump(&self.counters.forwarded);
        if let Some(reason) = self.unusable() {
            return EgressResponse::json(
                StatusCode::FAILED_DEPENDENCY,
                &json!({ "error": reason, "resource": self.resource }),
            );
        }
        let call = Call {
            method: request.method,
            path: request.path_and_query,
            headers: request.headers,
            body: request.body,
        };
        let search = call
            .path
            .split('?')
            .next()
            .is_some_and(|path| path.ends_with("/search"));
        match call.method {
            Method::GET | Method::HEAD => match self.read(call).await {
                Some(upstream) => passthrough(upstream),
                None => self.degraded(json!({ "context": "", "degraded": true }), StatusCode::OK),
            },
            Method::POST | Method::PUT | Method::PATCH if !search => match self.write(call).await {
                Ok(Some(upstream)) => passthrough(upstream),
                Ok(None) => self.degraded(
                    json!({ "buffered": true, "queue": self.queue }),
                    StatusCode::ACCEPTED,
                ),
                Err(err) => EgressResponse::unavailable(Duration::from_secs(1), &err.to_string()),
            },
            _ if self.auth.refused().is_some() => self.misconfigured(),
            _ => match self.breaker.try_acquire() {
                Err(rejected) => EgressResponse::unavailable(
                    rejected.retry_after,
                    &format!("{} circuit breaker is open", self.resource),
                ),
                Ok(permit) => match self.send(&call, permit).await {
                    Sent::Answered(upstream) => passthrough(upstream),
                    Sent::Unreachable(why) => EgressResponse::unavailable(
                        Duration::from_secs(1),
                        &format!("{}: {why}", self.resource),
                    ),
                },
            },
        }
    }

    /// `503` naming the refusal, with `Retry-After` until the next probe (no call to Zep).
    pub(super) fn misconfigured(&self) -> EgressResponse {
        let reason = self.auth.refused().map_or_else(
            || format!("{} is misconfigured", self.resource),
            |refusal| self.auth.describe(&refusal),
        );
        let retry_after = self.auth.until_probe().unwrap_or_default();
        EgressResponse::unavailable(retry_after, &reason)
    }

    /// An answer the runtime makes itself while Zep is unavailable (or misconfigured).
    pub(super) fn degraded(&self, body: Value, status: StatusCode) -> EgressResponse {
        let mut response = EgressResponse::json(status, &body);
        let why = match self.auth.refused() {
            Some(_) => "misconfigured",
            None => "unavailable",
        };
        if let Ok(value) = HeaderValue::from_str(&format!("{} {why}", self.resource)) {
            response
                .headers
                .insert(HeaderName::from_static(DEGRADED_HEADER), value);
        }
        response
    }
}

/// Zep's answer as the egress proxy passes it back.
fn passthrough(upstream: Upstream) -> EgressResponse {
    let mut headers = upstream.headers;
    drop_hop_by_hop(&mut headers);
    EgressResponse {
        status: upstream.status,
        headers,
        body: EgressBody::Full(upstream.body),
    }
}
