//! The caps on every duration that comes from outside — a `POST /tasks` body, a queue entry, a
//! Celery message, a handler's answer, an upstream's header — and the one checked conversion
//! each number goes through before it becomes a [`Duration`] or a due time.
//!
//! Numbers from outside are hostile: `Duration::from_secs_f64(1e300)` panics, so does
//! `SystemTime + Duration` past the clock's range or formatting a time after the year 9999, and
//! `millis as u64` wraps a far due time round to "now". Here a number becomes a `Duration` only
//! when it is not negative, not NaN and at most its cap ([`checked`]); what the caller does with
//! one out of range is its own rule:
//!
//! | where the number comes from | out of range |
//! |---|---|
//! | `POST /tasks` (`countdown`, `time_limit_ms`, …), `runtime enqueue --countdown` | `400` naming the field and the cap |
//! | a queue entry or a Celery message (`eta`, `time_limit_ms`, `timelimit`, …) | dead-lettered unrun, the reason names the field and the cap |
//! | an upstream's header (`Retry-After`, `retry-after-ms`, `x-ratelimit-reset-*`) | the cap applied, a `WARN` line ([`capped`], [`upstream_wait`]) |
//! | a retry's delay (backoff, the server's delay, a handler's `after`) | the cap applied ([`due_after`]) |
//!
//! The caps:
//!
//! - [`MAX_DELAY`] (365 days): the furthest ahead a task is scheduled — `countdown`, an `eta`
//!   (which must also be a real RFC 3339 time: years 0000–9999), a retry, a deferral;
//! - [`MAX_TIME_LIMIT`] (7 days): an envelope's `time_limit_ms` / `soft_time_limit_ms`, a
//!   Celery message's `timelimit`;
//! - [`MAX_UPSTREAM_WAIT`] (1 day): the longest an upstream's `Retry-After`, `retry-after-ms` or
//!   `x-ratelimit-reset-*` is honoured.

use std::fmt;
use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;
use tracing::warn;

/// A cap on a duration from outside, with how it is written in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cap {
    /// The longest duration accepted.
    pub max: Duration,
    /// The cap in words (`365 days`).
    pub text: &'static str,
}

const DAY: u64 = 24 * 3600;

/// The furthest ahead a task is scheduled: `countdown`, `eta`, a retry, a deferral.
pub const MAX_DELAY: Cap = Cap {
    max: Duration::from_secs(365 * DAY),
    text: "365 days",
};

/// The longest time limit an envelope or a Celery message may ask for.
pub const MAX_TIME_LIMIT: Cap = Cap {
    max: Duration::from_secs(7 * DAY),
    text: "7 days",
};

/// The longest wait an upstream's header is honoured for.
pub const MAX_UPSTREAM_WAIT: Cap = Cap {
    max: Duration::from_secs(DAY),
    text: "1 day",
};

/// The unit a number is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Seconds (may be fractional).
    Seconds,
    Millis,
}

impl Unit {
    fn per_second(self) -> f64 {
        match self {
            Unit::Seconds => 1.0,
            Unit::Millis => 1000.0,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Seconds => "seconds",
            Unit::Millis => "ms",
        }
    }
}

/// A number that is not a duration within its cap.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OutOfRange {
    /// Negative or NaN.
    #[error("must be ≥ 0 {unit}, got {got}", unit = .unit.name(), got = shown(*.got))]
    Negative {
        /// The number as received.
        got: f64,
        unit: Unit,
    },
    /// Above the cap (infinity included).
    #[error("{got} {unit} is over the limit of {max} {unit} ({text})", unit = .unit.name(),
        got = shown(*.got), max = .cap.max.as_secs_f64() * .unit.per_second(), text = .cap.text)]
    OverCap {
        /// The number as received.
        got: f64,
        unit: Unit,
        cap: Cap,
    },
}

/// A number as a message shows it: plain up to 16 digits, else in exponent form (`1e300`, not
/// three hundred zeros).
fn shown(n: f64) -> String {
    if n.abs() < 1e16 {
        n.to_string()
    } else {
        format!("{n:e}")
    }
}

/// The one conversion of a number from outside into a duration: `amount` `unit`s, if it is
/// ≥ 0 and at most `cap`. Never panics (NaN, infinities, 1e300 and `u64::MAX` are errors).
pub fn checked(amount: f64, unit: Unit, cap: Cap) -> Result<Duration, OutOfRange> {
    if amount.is_nan() || amount < 0.0 {
        return Err(OutOfRange::Negative { got: amount, unit });
    }
    let secs = amount / unit.per_second();
    if secs > cap.max.as_secs_f64() {
        return Err(OutOfRange::OverCap {
            got: amount,
            unit,
            cap,
        });
    }
    // Whole milliseconds stay exact; `+ 0.0` turns -0.0 into 0.0.
    Ok(match unit {
        Unit::Millis if amount.fract() == 0.0 => Duration::from_millis(amount as u64),
        _ => Duration::try_from_secs_f64(secs + 0.0)
            .unwrap_or(cap.max)
            .min(cap.max),
    })
}

/// A duration `what` (a header's name, a field) asks for from a source whose excess is cut,
/// not refused (an upstream's header, a handler's delay): [`checked`], with a value over
/// `cap` taken as `cap` and logged at `WARN`; `None` for a negative or NaN one (ignored).
pub fn capped(what: &str, amount: f64, unit: Unit, cap: Cap) -> Option<Duration> {
    match checked(amount, unit, cap) {
        Ok(duration) => Some(duration),
        Err(OutOfRange::Negative { .. }) => None,
        Err(err @ OutOfRange::OverCap { .. }) => {
            warn!(what, error = %err, "a wait longer than the cap was asked for; the cap applies");
            Some(cap.max)
        }
    }
}

/// The wait an upstream's header `name` asks for (a number of `unit`s), [`capped`] at
/// [`MAX_UPSTREAM_WAIT`]; `None` when the header is absent or not a number ≥ 0 (an HTTP date
/// in `Retry-After` is not used).
pub fn upstream_wait(headers: &HeaderMap, name: &str, unit: Unit) -> Option<Duration> {
    let amount: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
    capped(name, amount, unit, MAX_UPSTREAM_WAIT)
}

/// The due time `delay` after `now`, the delay cut at [`MAX_DELAY`]: where a retry or a
/// countdown is scheduled. Never panics: a real clock's `now` plus at most 365 days always
/// fits a `SystemTime` (the fallback to `now` is for a `now` at the end of its range).
pub fn due_after(now: SystemTime, delay: Duration) -> SystemTime {
    let delay = delay.min(MAX_DELAY.max);
    now.checked_add(delay).unwrap_or(now)
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.text)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;
    use reqwest::header::HeaderValue;

    use super::*;
    use crate::test_util::fuzz_cases;

    /// What a broken or hostile upstream may put in a header that says how long to wait:
    /// numbers of every magnitude and form, Go-style durations with huge parts, and junk.
    pub(crate) fn hostile_waits() -> impl Strategy<Value = String> {
        let special = prop::sample::select(vec![
            "18446744073709551615",
            "18446744073709551616",
            "9223372036854775808",
            "340282366920938463463374607431768211456",
            "1e308",
            "1e309",
            "-1e309",
            "inf",
            "-inf",
            "NaN",
            "-0",
            "+7",
            " 5 ",
            "0.000000001",
            "86400",
            "86400.000001",
            "1.5e-300",
            "",
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "99999999999999999999h",
            "1e300s",
            "1h1h1h",
            "6m0s",
            "0.5ms",
        ])
        .prop_map(str::to_string);
        let unit = prop::sample::select(vec!["h", "m", "s", "ms", "us", "µs", "ns", "", "d", "."]);
        let go = prop::collection::vec((any::<f64>().prop_map(f64::abs), unit), 1..4).prop_map(
            |parts| {
                parts
                    .into_iter()
                    .map(|(n, unit)| format!("{n}{unit}"))
                    .collect::<String>()
            },
        );
        prop_oneof![
            special,
            any::<f64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|n| format!("{n:e}")),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            (0u32..400).prop_map(|e| format!("1e{e}")),
            (0u64..200_000).prop_map(|n| n.to_string()),
            go,
            "[ -~]{0,24}",
            "\\PC{0,8}",
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases(2000)))]

        /// Whatever a header says, the wait is the number when it is one within the cap, the
        /// cap when it is over, nothing when it is not a number ≥ 0 — never a panic.
        #[test]
        fn an_upstreams_wait_is_the_number_the_cap_or_nothing(text in hostile_waits()) {
            let mut headers = HeaderMap::new();
            if let Ok(value) = HeaderValue::from_bytes(text.as_bytes()) {
                headers.insert("retry-after", value);
            }
            let got = upstream_wait(&headers, "retry-after", Unit::Seconds);
            let number = headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok());
            let cap = MAX_UPSTREAM_WAIT.max;
            match number {
                Some(n) if n >= 0.0 && n > cap.as_secs_f64() => prop_assert_eq!(got, Some(cap)),
                Some(n) if n >= 0.0 => {
                    let got = got.expect("a number within the cap is honoured");
                    prop_assert!((got.as_secs_f64() - n).abs() < 1e-6, "{} → {:?}", n, got);
                }
                _ => prop_assert_eq!(got, None),
            }
        }
    }

    #[test]
    fn numbers_of_every_magnitude_convert_or_are_named_never_panic() {
        let secs = |n: f64| checked(n, Unit::Seconds, MAX_DELAY);
        assert_eq!(secs(0.0), Ok(Duration::ZERO));
        assert_eq!(secs(-0.0), Ok(Duration::ZERO));
        assert_eq!(secs(1.5), Ok(Duration::from_millis(1500)));
        assert_eq!(secs(31_536_000.0), Ok(MAX_DELAY.max));
        for huge in [
            31_536_000.001,
            3e11,
            1e15,
            1e300,
            f64::MAX,
            f64::INFINITY,
            18_446_744_073_709_551_615.0,
            9_223_372_036_854_775_808.0,
        ] {
            let err = secs(huge).unwrap_err();
            assert!(
                err.to_string()
                    .ends_with(" seconds is over the limit of 31536000 seconds (365 days)"),
                "{err}"
            );
        }
        assert_eq!(
            secs(3e11).unwrap_err().to_string(),
            "300000000000 seconds is over the limit of 31536000 seconds (365 days)"
        );
        assert_eq!(
            secs(1e300).unwrap_err().to_string(),
            "1e300 seconds is over the limit of 31536000 seconds (365 days)"
        );
        assert_eq!(
            secs(-1.0).unwrap_err().to_string(),
            "must be ≥ 0 seconds, got -1"
        );
        assert!(secs(f64::NAN).is_err());
        assert!(secs(f64::NEG_INFINITY).is_err());
        let ms = |n: f64| checked(n, Unit::Millis, MAX_TIME_LIMIT);
        assert_eq!(ms(7.0), Ok(Duration::from_millis(7)));
        assert_eq!(ms(604_800_000.0), Ok(MAX_TIME_LIMIT.max));
        assert_eq!(
            ms(u64::MAX as f64).unwrap_err().to_string(),
            "1.8446744073709552e19 ms is over the limit of 604800000 ms (7 days)"
        );
        assert_eq!(ms(0.5), Ok(Duration::from_micros(500)));
    }

    #[test]
    fn an_upstreams_wait_is_cut_at_the_cap_and_garbage_is_ignored() {
        let mut headers = HeaderMap::new();
        let wait = |headers: &HeaderMap| upstream_wait(headers, "retry-after", Unit::Seconds);
        assert_eq!(wait(&headers), None);
        for (text, expected) in [
            ("7", Some(Duration::from_secs(7))),
            (" 0.25 ", Some(Duration::from_millis(250))),
            ("18446744073709551615", Some(MAX_UPSTREAM_WAIT.max)),
            ("1e300", Some(MAX_UPSTREAM_WAIT.max)),
            ("inf", Some(MAX_UPSTREAM_WAIT.max)),
            ("-5", None),
            ("NaN", None),
            ("Wed, 21 Oct 2015 07:28:00 GMT", None),
            ("", None),
        ] {
            headers.insert("retry-after", HeaderValue::from_static(text));
            assert_eq!(wait(&headers), expected, "{text:?}");
        }
        headers.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(
            upstream_wait(&headers, "retry-after-ms", Unit::Millis),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn due_times_are_at_most_the_cap_ahead() {
        let now = SystemTime::now();
        assert_eq!(
            due_after(now, Duration::from_secs(3)),
            now + Duration::from_secs(3)
        );
        assert_eq!(due_after(now, Duration::MAX), now + MAX_DELAY.max);
        assert_eq!(
            due_after(now, Duration::from_millis(u64::MAX)),
            now + MAX_DELAY.max
        );
    }
}
