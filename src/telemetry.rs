//! Logging: `tracing` to stderr, filtered like `RUST_LOG` (default [`DEFAULT_FILTER`]), as text
//! or JSON.
//!
//! **JSON** (`--log-format json`, env `RT_LOG_FORMAT=json`) writes one object per line with
//! every field at the top level, so log pipelines can index them without unnesting:
//!
//! ```json
//! {"timestamp":"2026-11-23T15:00:00.123456Z","level":"WARN","target":"actors::task",
//!  "message":"dead-lettered","task_id":"0b9c…","task":"process_chat_message","queue":"chat",
//!  "attempt":3,"trace_id":"4bf92f35…","reason":"retries exhausted after 4 attempts: …","span":"task"}
//! ```
//!
//! `timestamp` (RFC 3339, UTC), `level`, `target`, `message`, then the fields of the spans the
//! line was logged in (outermost first), then the line's own fields (a line's own field wins
//! over a span's of the same name), then `span`: the name of the innermost span, if any. Lines
//! about one task are logged in its `task` span (`actors::task::task_span`), so they all carry
//! `task_id`, `task`, `queue`, `attempt` and `trace_id`.
//!
//! **Text** (the default) shows the same span as a prefix:
//! `task{task_id=… task=… queue=chat attempt=0 trace_id=…}: actors::task: dead-lettered …`.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;
use std::time::SystemTime;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

use crate::cli::LogFormat;

/// The filter without `RUST_LOG`: `info`, but ractor's own at `warn` — ractor opens an
/// `Actor` span around every actor's message loop, one per task actor, which the formatter
/// would render for every task although no line of ours needs it (a task's lines carry the
/// `task` span).
pub const DEFAULT_FILTER: &str = "info,ractor=warn";

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(true)
            .init(),
        LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .init(),
    }
}

/// One JSON object per line with span and event fields at the top level (see the module
/// docs). Span fields are recorded as JSON by [`JsonFields`].
#[derive(Debug, Clone, Copy, Default)]
pub struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Line::default();
        let stamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
        line.set("timestamp", Value::String(stamp));
        line.set("level", Value::String(meta.level().to_string()));
        line.set("target", Value::String(meta.target().to_string()));
        let mut innermost = None;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                innermost = Some(span.name());
                let extensions = span.extensions();
                let Some(fields) = extensions.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(&fields.fields) {
                    for (key, value) in fields {
                        line.set(&key, value);
                    }
                }
            }
        }
        event.record(&mut line);
        if let Some(name) = innermost {
            line.set("span", Value::String(name.to_string()));
        }
        writeln!(writer, "{}", line.to_json())
    }
}

/// Fields in insertion order; setting a key again replaces its value in place.
#[derive(Debug, Default)]
struct Line {
    fields: Vec<(String, Value)>,
}

impl Line {
    fn set(&mut self, key: &str, value: Value) {
        match self.fields.iter_mut().find(|(k, _)| k == key) {
            Some((_, slot)) => *slot = value,
            None => self.fields.push((key.to_string(), value)),
        }
    }

    fn to_json(&self) -> String {
        let mut out = String::from("{");
        for (n, (key, value)) in self.fields.iter().enumerate() {
            if n > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}:{value}", Value::String(key.clone()));
        }
        out.push('}');
        out
    }

    /// Records a field of the event; `log.*` fields of `log` records are folded into
    /// `target` or dropped.
    fn record(&mut self, field: &Field, value: Value) {
        match field.name() {
            "log.target" => self.set("target", value),
            name if name.starts_with("log.") => {}
            name => self.set(name, value),
        }
    }
}

impl Visit for Line {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.record(field, serde_json::json!(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, Value::Bool(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, Value::String(value.to_string()));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.record(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_carry_span_and_event_fields_at_the_top_level() {
        let out = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(out.clone())
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("task", task_id = "t-1", attempt = 2u32);
            let _entered = span.enter();
            tracing::warn!(
                reason = "boom \"quoted\"",
                attempt = 3u32,
                ok = true,
                "dead-lettered"
            );
            tracing::info!("plain");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let first = &lines[0];
        assert_eq!(first["level"], "WARN");
        assert_eq!(first["message"], "dead-lettered");
        assert_eq!(first["task_id"], "t-1");
        assert_eq!(first["attempt"], 3, "the line's own field wins");
        assert_eq!(first["reason"], "boom \"quoted\"");
        assert_eq!(first["ok"], true);
        assert_eq!(first["span"], "task");
        assert!(first["timestamp"].as_str().unwrap().ends_with('Z'));
        assert_eq!(lines[1]["attempt"], 2);
        assert_eq!(lines[1]["message"], "plain");
    }
}
