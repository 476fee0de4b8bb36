use std::borrow::Cow;
use std::sync::Arc;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::{REDACTED, Redaction, Redactor};

const KEY: &str = "sk-a71c/4e9b20d358f6";

/// The key written every way the redactor knows, one character at a time or all at once.
fn encodings(key: &str) -> Vec<String> {
    let escape = |c: char, upper: bool| {
        let hex = format!("{:04x}", c as u32);
        let hex = if upper { hex.to_uppercase() } else { hex };
        format!("\\u{hex}")
    };
    let percent = |c: char| format!("%{:02x}", c as u32);
    let mut all = vec![
        key.to_string(),
        key.chars().map(|c| escape(c, false)).collect(),
        key.chars().map(|c| escape(c, true)).collect(),
        key.replace('/', "\\/"),
        key.chars().map(percent).collect(),
        key.chars().map(percent).collect::<String>().to_uppercase(),
    ];
    // Mixed: every other character escaped, the slash as `\/`, one percent-encoded.
    let mixed: String = key
        .chars()
        .enumerate()
        .map(|(n, c)| match (n % 3, c) {
            (_, '/') => "\\/".to_string(),
            (0, c) => escape(c, n % 2 == 0),
            (1, c) => percent(c),
            (_, c) => c.to_string(),
        })
        .collect();
    all.push(mixed);
    all
}

fn redactor() -> Arc<Redactor> {
    Arc::new(Redactor::new(KEY).unwrap())
}

fn streamed(redactor: &Arc<Redactor>, chunks: &[&[u8]]) -> Vec<u8> {
    let mut redaction = Redaction::new(Arc::clone(redactor));
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend_from_slice(&redaction.push(chunk));
        assert!(redaction.held.len() <= redactor.max_held());
    }
    out.extend_from_slice(&redaction.finish());
    out
}

#[test]
fn every_form_of_the_key_is_replaced_and_nothing_else() {
    let redactor = redactor();
    for encoded in encodings(KEY) {
        let text = format!(r#"{{"error": "bad key: Bearer {encoded}", "again": "{encoded}"}}"#);
        let out = redactor.redact(text.as_bytes());
        assert_eq!(
            String::from_utf8(out.into_owned()).unwrap(),
            format!(r#"{{"error": "bad key: Bearer {REDACTED}", "again": "{REDACTED}"}}"#),
            "{encoded}"
        );
    }
    let clean = r#"{"ok": true, "note": "sk-a71c/4e9b20d358f", "escaped": "\u0073k-"}"#;
    assert!(matches!(
        redactor.redact(clean.as_bytes()),
        Cow::Borrowed(_)
    ));
    // JSON that a parser turns back into the key, escapes and all.
    let escaped = serde_json::to_string(&serde_json::json!({ "k": KEY })).unwrap();
    assert!(!redactor.redact_text(&escaped).contains("4e9b20d358f6"));
    // Mixed JSON escapes (every other character, hex case alternating, `\/`) parse back to
    // the key, and are caught.
    let json_mixed: String = KEY
        .chars()
        .enumerate()
        .map(|(n, c)| match c {
            '/' => "\\/".to_string(),
            c if n % 2 == 0 => format!("\\u{:04X}", c as u32),
            c if n % 3 == 0 => format!("\\u{:04x}", c as u32),
            c => c.to_string(),
        })
        .collect();
    let text = format!(r#"{{"k": "{json_mixed}"}}"#);
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(parsed["k"], KEY, "the mixed form really is the key");
    assert_eq!(
        redactor.redact_text(&text),
        format!(r#"{{"k": "{REDACTED}"}}"#)
    );
}

#[test]
fn a_key_split_across_chunks_at_every_offset_is_caught() {
    let redactor = redactor();
    for encoded in encodings(KEY) {
        let text = format!("data: {{\"x\": \"{encoded}\"}}\n\ndata: [DONE]\n\n");
        let whole = redactor.redact(text.as_bytes()).into_owned();
        assert!(!String::from_utf8_lossy(&whole).contains("4e9b"));
        let bytes = text.as_bytes();
        for split in 0..=bytes.len() {
            let out = streamed(&redactor, &[&bytes[..split], &bytes[split..]]);
            assert_eq!(out, whole, "{encoded} split at {split}");
        }
        for (first, second) in [(3, 9), (10, 11), (7, 30)] {
            let (a, b) = (first.min(bytes.len()), second.min(bytes.len()));
            let out = streamed(&redactor, &[&bytes[..a], &bytes[a..b], &bytes[b..]]);
            assert_eq!(out, whole, "{encoded} split at {a} and {b}");
        }
        let one_by_one: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(
            streamed(&redactor, &one_by_one),
            whole,
            "{encoded} byte by byte"
        );
    }
}

#[test]
fn only_what_could_still_be_the_key_is_held_back() {
    let redactor = redactor();
    let mut redaction = Redaction::new(Arc::clone(&redactor));
    assert_eq!(&redaction.push(b"data: one\n\n")[..], b"data: one\n\n");
    assert_eq!(&redaction.push(b"data: sk-a7")[..], b"data: ");
    assert_eq!(&redaction.push(b"1x")[..], b"sk-a71x", "no longer the key");
    assert_eq!(&redaction.push(b" \\u00")[..], b" ");
    assert_eq!(&redaction.push(b"7")[..], b"");
    assert_eq!(&redaction.push(b"3k-a71c\\/")[..], b"");
    assert_eq!(
        &redaction.push(b"4e9b20d358f6 and %7")[..],
        format!("{REDACTED} and ").as_bytes()
    );
    assert_eq!(
        &redaction.finish()[..],
        b"%7",
        "a tail that never became the key"
    );
    assert!(redactor.max_held() >= 6 * KEY.len());
}

#[test]
fn header_values_and_names_lose_the_key() {
    let redactor = redactor();
    let mut headers = HeaderMap::new();
    headers.insert(
        "x-reflected",
        HeaderValue::from_static("Bearer sk-a71c/4e9b20d358f6"),
    );
    headers.insert(
        "location",
        HeaderValue::from_static("https://x.example/?k=sk-a71c%2F4e9b20d358f6"),
    );
    headers.insert("x-kept", HeaderValue::from_static("sk-other"));
    // A name can hold a key without `/` (HTTP lower-cases it): that header is dropped.
    let mut named = HeaderMap::new();
    named.insert(
        HeaderName::from_static("x-sk-a71c-4e9b20d358f6"),
        HeaderValue::from_static("1"),
    );
    named.insert("x-kept", HeaderValue::from_static("1"));
    let dashed = Redactor::new("SK-a71c-4E9b20d358f6").unwrap();
    dashed.redact_headers(&mut named);
    assert_eq!(named.keys().collect::<Vec<_>>(), ["x-kept"], "{named:?}");
    redactor.redact_headers(&mut headers);
    assert_eq!(headers["x-reflected"], "Bearer <redacted>");
    assert_eq!(headers["location"], "https://x.example/?k=<redacted>");
    assert_eq!(headers["x-kept"], "sk-other");
}

#[test]
fn keys_with_ambiguous_characters_and_no_key() {
    assert!(Redactor::new("").is_none());
    // `%` and `\` are also the start of their own escapes.
    for key in ["%%25\\x", "\\u0041", "é€😀z"] {
        let redactor = Arc::new(Redactor::new(key).unwrap());
        let json = serde_json::to_string(key)
            .unwrap()
            .trim_matches('"')
            .to_string();
        let ascii_json: String = key
            .encode_utf16()
            .map(|unit| format!("\\u{unit:04X}"))
            .collect();
        let percent: String = key.bytes().map(|b| format!("%{b:02x}")).collect();
        for form in [key.to_string(), json, ascii_json, percent] {
            let text = format!("<{form}>");
            let whole = redactor.redact(text.as_bytes()).into_owned();
            assert_eq!(whole, format!("<{REDACTED}>").as_bytes(), "{key}: {form}");
            let bytes = text.as_bytes();
            for split in 0..=bytes.len() {
                let out = streamed(&redactor, &[&bytes[..split], &bytes[split..]]);
                assert_eq!(out, whole, "{key}: {form} split at {split}");
            }
        }
    }
}
