//! Durations as the config writes them: strings with a unit, such as `"120s"`, `"500ms"`,
//! `"5m"`, `"24h"` (parsed by `humantime`, so `"1h 30m"` works too).
//!
//! The raw structs keep the text ([`RawDuration`]); `compile()` parses it, so that every bad
//! duration in a file is reported at once, each under its key path.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// A duration as written in the file, not yet parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawDuration(pub(crate) String);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawDurationVisitor)
    }
}

struct RawDurationVisitor;

impl RawDurationVisitor {
    fn unitless<E: de::Error>(number: impl fmt::Display) -> E {
        E::custom(format!(
            "a duration needs a unit: write \"{number}s\" (or ms, m, h), not a bare number"
        ))
    }
}

impl Visitor<'_> for RawDurationVisitor {
    type Value = RawDuration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration string such as \"120s\", \"500ms\" or \"5m\"")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<RawDuration, E> {
        Ok(RawDuration(text.to_owned()))
    }

    fn visit_i64<E: de::Error>(self, number: i64) -> Result<RawDuration, E> {
        Err(Self::unitless(number))
    }

    fn visit_u64<E: de::Error>(self, number: u64) -> Result<RawDuration, E> {
        Err(Self::unitless(number))
    }

    fn visit_f64<E: de::Error>(self, number: f64) -> Result<RawDuration, E> {
        Err(Self::unitless(number))
    }
}

/// Parses a duration string; the error is a one-line message that quotes the text.
pub(crate) fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|err| {
        format!("invalid duration \"{text}\": {err} (write e.g. \"120s\", \"500ms\", \"5m\")")
    })
}

/// A duration as the config spells it (`600s`, `250ms`), in messages.
pub(crate) use actors::shown::duration as display;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_refuses_bare_numbers() {
        assert_eq!(parse("120s"), Ok(Duration::from_secs(120)));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5_400)));
        let err = parse("120").unwrap_err();
        assert!(err.starts_with("invalid duration \"120\": "), "{err}");
        assert!(parse("12x").is_err());
    }

    #[test]
    fn displays_like_the_config_writes_it() {
        assert_eq!(display(Duration::from_secs(120)), "120s");
        assert_eq!(display(Duration::from_millis(500)), "500ms");
        assert_eq!(display(Duration::from_millis(1500)), "1500ms");
        assert_eq!(display(Duration::ZERO), "0s");
    }
}
