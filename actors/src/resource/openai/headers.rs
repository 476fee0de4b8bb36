//! What an OpenAI response says beyond its status: the `x-ratelimit-*` headers, the
//! `retry-after-ms` / `retry-after` delay, and whether a 429 is `insufficient_quota`.
//!
//! The reset headers are Go-style durations (`1s`, `6m0s`, `20ms`, `7.66s`, `1h2m3.5s`).

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;

/// The `x-ratelimit-*` headers of one response (each when present and readable).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RateHeaders {
    /// `x-ratelimit-limit-requests`.
    pub(crate) limit_requests: Option<u64>,
    /// `x-ratelimit-limit-tokens`.
    pub(crate) limit_tokens: Option<u64>,
    /// `x-ratelimit-remaining-requests`.
    pub(crate) remaining_requests: Option<u64>,
    /// `x-ratelimit-remaining-tokens`.
    pub(crate) remaining_tokens: Option<u64>,
    /// `x-ratelimit-reset-requests`: until the requests limit is back to full.
    pub(crate) reset_requests: Option<Duration>,
    /// `x-ratelimit-reset-tokens`.
    pub(crate) reset_tokens: Option<Duration>,
}

impl RateHeaders {
    /// Reads them from `headers`.
    pub(crate) fn read(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let number = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let duration = |name: &str| text(name).and_then(parse_go_duration);
        Self {
            limit_requests: number("x-ratelimit-limit-requests"),
            limit_tokens: number("x-ratelimit-limit-tokens"),
            remaining_requests: number("x-ratelimit-remaining-requests"),
            remaining_tokens: number("x-ratelimit-remaining-tokens"),
            reset_requests: duration("x-ratelimit-reset-requests"),
            reset_tokens: duration("x-ratelimit-reset-tokens"),
        }
    }

    /// Whether any of them was there.
    pub(crate) fn any(&self) -> bool {
        *self != Self::default()
    }

    /// How long the server says nothing more will pass: the reset of every limit it reports
    /// as exhausted (remaining 0), the longest of them.
    pub(crate) fn exhausted_for(&self) -> Option<Duration> {
        let requests = (self.remaining_requests == Some(0))
            .then_some(self.reset_requests)
            .flatten();
        let tokens = (self.remaining_tokens == Some(0))
            .then_some(self.reset_tokens)
            .flatten();
        requests.max(tokens)
    }
}

/// The server's delay: `retry-after-ms` (milliseconds) first, else `retry-after` (seconds,
/// possibly fractional). HTTP dates are not used by OpenAI and are ignored.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    number("retry-after-ms")
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| number(RETRY_AFTER.as_str()).map(Duration::from_secs_f64))
}

/// Whether an error body says the account is out of quota (`error.code` or `error.type` is
/// `insufficient_quota`): no retry will help.
pub(crate) fn is_insufficient_quota(body: &Value) -> bool {
    let error = &body["error"];
    error["code"] == "insufficient_quota" || error["type"] == "insufficient_quota"
}

/// A Go-style duration (`6m0s`, `20ms`, `1.5s`, `1h2m`); `None` when unreadable.
pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * seconds;
    }
    Some(Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    use reqwest::header::HeaderValue;
    use serde_json::json;

    use super::*;

    #[test]
    fn go_durations() {
        let ms = Duration::from_millis;
        assert_eq!(parse_go_duration("1s"), Some(ms(1000)));
        assert_eq!(parse_go_duration("6m0s"), Some(ms(360_000)));
        assert_eq!(parse_go_duration("20ms"), Some(ms(20)));
        assert_eq!(parse_go_duration("1h2m3.5s"), Some(ms(3_723_500)));
        assert_eq!(parse_go_duration("7.66s"), Some(ms(7660)));
        for bad in ["", "s", "12", "3 days", "1x"] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn rate_headers_and_exhaustion() {
        let read = RateHeaders::read(&headers(&[
            ("x-ratelimit-limit-requests", "300"),
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "200ms"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-tokens", "1.5s"),
        ]));
        assert_eq!(read.limit_requests, Some(300));
        assert_eq!(read.limit_tokens, None);
        assert_eq!(read.exhausted_for(), Some(Duration::from_millis(1500)));
        let some_left = RateHeaders::read(&headers(&[
            ("x-ratelimit-remaining-requests", "3"),
            ("x-ratelimit-reset-requests", "2s"),
        ]));
        assert!(some_left.any());
        assert_eq!(some_left.exhausted_for(), None);
        assert!(!RateHeaders::read(&HeaderMap::new()).any());
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let both = headers(&[("retry-after-ms", "1500"), ("retry-after", "9")]);
        assert_eq!(retry_after(&both), Some(Duration::from_millis(1500)));
        let secs = headers(&[("retry-after", "2")]);
        assert_eq!(retry_after(&secs), Some(Duration::from_secs(2)));
        let date = headers(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]);
        assert_eq!(retry_after(&date), None);
    }

    #[test]
    fn insufficient_quota_by_code_or_type() {
        assert!(is_insufficient_quota(
            &json!({ "error": { "code": "insufficient_quota", "type": "x" } })
        ));
        assert!(is_insufficient_quota(
            &json!({ "error": { "type": "insufficient_quota" } })
        ));
        assert!(!is_insufficient_quota(
            &json!({ "error": { "code": "rate_limit_exceeded" } })
        ));
        assert!(!is_insufficient_quota(&Value::Null));
    }
}
