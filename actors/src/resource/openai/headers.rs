//! What an OpenAI response says beyond its status: the `x-ratelimit-*` headers, the
//! `retry-after-ms` / `retry-after` delay, and whether a 429 is `insufficient_quota`.
//!
//! The reset headers are Go-style durations (`1s`, `6m0s`, `20ms`, `7.66s`, `1h2m3.5s`).
//! Every wait read here is capped at [`MAX_UPSTREAM_WAIT`] (a longer one is cut to it and
//! logged): a hostile or broken upstream cannot hold the node's calls for years, nor panic it.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde_json::Value;

use crate::caps::{self, MAX_UPSTREAM_WAIT, Unit, upstream_wait};

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
    pub(crate) fn read(headers: &HeaderMap) -> Self {
        let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let number = |name: &str| text(name).and_then(|v| v.trim().parse::<u64>().ok());
        let duration = |name: &str| {
            let secs = text(name).and_then(parse_go_duration)?;
            caps::capped(name, secs, Unit::Seconds, MAX_UPSTREAM_WAIT)
        };
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
    upstream_wait(headers, "retry-after-ms", Unit::Millis)
        .or_else(|| upstream_wait(headers, RETRY_AFTER.as_str(), Unit::Seconds))
}

/// Whether an error body says the account is out of quota (`error.code` or `error.type` is
/// `insufficient_quota`): no retry will help.
pub(crate) fn is_insufficient_quota(body: &Value) -> bool {
    let error = &body["error"];
    error["code"] == "insufficient_quota" || error["type"] == "insufficient_quota"
}

/// A Go-style duration (`6m0s`, `20ms`, `1.5s`, `1h2m`) in seconds; `None` when unreadable.
/// (The caller caps it: `99999999999h` is a number of seconds here, not yet a `Duration`.)
pub(crate) fn parse_go_duration(text: &str) -> Option<f64> {
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
    Some(total)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use reqwest::header::HeaderValue;
    use serde_json::json;

    use super::*;
    use crate::caps::tests::hostile_waits;
    use crate::test_util::fuzz_cases;

    #[test]
    fn go_durations() {
        let ms = |ms| Some(Duration::from_millis(ms));
        let parse = |text| parse_go_duration(text).map(Duration::from_secs_f64);
        assert_eq!(parse("1s"), ms(1000));
        assert_eq!(parse("6m0s"), ms(360_000));
        assert_eq!(parse("20ms"), ms(20));
        assert_eq!(parse("1h2m3.5s"), ms(3_723_500));
        assert_eq!(parse("7.66s"), ms(7660));
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
    fn waits_past_the_cap_are_cut_to_it_never_a_panic() {
        let cap = Duration::from_secs(86_400);
        for (name, value) in [
            ("retry-after-ms", "18446744073709551615"),
            ("retry-after-ms", "1e300"),
            ("retry-after", "18446744073709551615"),
            ("retry-after", "9223372036854775808"),
            ("retry-after", "inf"),
        ] {
            assert_eq!(
                retry_after(&headers(&[(name, value)])),
                Some(cap),
                "{name}: {value}"
            );
        }
        let read = RateHeaders::read(&headers(&[
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-reset-requests", "99999999999999999999h"),
            ("x-ratelimit-remaining-tokens", "0"),
            (
                "x-ratelimit-reset-tokens",
                "1000000000000000000000000000000.5s",
            ),
        ]));
        assert_eq!(read.reset_requests, Some(cap));
        assert_eq!(read.reset_tokens, Some(cap));
        assert_eq!(read.exhausted_for(), Some(cap));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases(1000)))]

        /// Every header OpenAI's answers are read for, at once, with hostile values: the waits
        /// read from them are at most the cap, the counts are numbers or nothing.
        #[test]
        fn hostile_rate_headers_never_panic_and_waits_stay_under_the_cap(
            values in prop::collection::vec(hostile_waits(), 8),
        ) {
            const NAMES: [&str; 8] = [
                "retry-after",
                "retry-after-ms",
                "x-ratelimit-reset-requests",
                "x-ratelimit-reset-tokens",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-limit-requests",
                "x-ratelimit-limit-tokens",
            ];
            let mut map = HeaderMap::new();
            for (name, value) in NAMES.iter().zip(&values) {
                if let Ok(value) = HeaderValue::from_bytes(value.as_bytes()) {
                    map.insert(*name, value);
                }
            }
            let cap = MAX_UPSTREAM_WAIT.max;
            prop_assert!(retry_after(&map).is_none_or(|d| d <= cap));
            let read = RateHeaders::read(&map);
            for wait in [read.reset_requests, read.reset_tokens, read.exhausted_for()] {
                prop_assert!(wait.is_none_or(|d| d <= cap), "{:?}", wait);
            }
        }
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
