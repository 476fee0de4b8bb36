//! Keeping a secret out of what an upstream sends back: [`Redactor`] replaces the API key a
//! resource injects wherever it shows up in a response — header values, header names, a whole
//! body, or a body streamed in chunks ([`Redaction`]). The egress proxy runs every answer
//! through it (after [`super::decode`] has undone any `Content-Encoding`); the clients run
//! the error texts they keep through it.
//!
//! # What is caught
//!
//! The key written as itself, or with any of its characters — each on its own, so mixed forms
//! are caught too — written as
//! - a JSON escape: `\u0073`, `\u006B` (hex digits in either case; a surrogate pair for a
//!   character outside the BMP), or JSON's short escapes `\/`, `\\`, `\"`, `\t`, …;
//! - percent-encoding of its UTF-8 bytes (`%73`, `%2f`, `%2F`), as in a reflected URL.
//!
//! Each occurrence becomes `<redacted>`. In a header *name* (which HTTP lower-cases) the key is
//! looked for without regard to case, and such a header is dropped.
//!
//! # What is not
//!
//! Any other transformation of the key: base64 or hex of it, HTML entities (`&#115;`), a
//! changed case (in a body or a value), escapes nested twice (`\\u0073`, `%255C`), the key
//! split by other text, reversed, hashed, or only partly shown (`sk-a7…58f6`, which is how
//! OpenAI masks it).
//!
//! # Streams
//!
//! [`Redaction`] passes each chunk on at once, except a tail that could still be the start of
//! the key in one of the forms above: those bytes are held until the next chunk decides (the
//! key, or not), or the body ends (then they are passed on as they are). At most
//! [`Redactor::max_held`] bytes are held; a chunk that ends in `\n` (every server-sent event
//! does) holds nothing back, since no form of a key can contain a line feed.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// What an occurrence of the key is replaced with.
pub const REDACTED: &str = "<redacted>";

/// One way a character of the key may be written.
#[derive(Clone)]
struct Form {
    bytes: Box<[u8]>,
    /// Compare ASCII letters without case (the hex digits of an escape).
    fold: bool,
}

impl Form {
    fn accepts(&self, at: usize, byte: u8) -> bool {
        let want = self.bytes[at];
        want == byte || (self.fold && want.eq_ignore_ascii_case(&byte))
    }
}

/// Where a partial match stands: character `ch` of the key, written as its form `form`, of
/// which `at` bytes matched.
#[derive(Clone, Copy, PartialEq, Eq)]
struct State {
    ch: usize,
    form: usize,
    at: usize,
}

/// What starts at one position of a text.
enum Scan {
    /// Not the key.
    No,
    /// The key, up to (excluding) this position.
    Full(usize),
    /// Could be the key, but the text ends first.
    Partial,
}

/// Finds a secret in any of its forms (module docs). Built once per resource; shared.
pub struct Redactor {
    /// For each character of the key, the ways it may be written.
    chars: Vec<Vec<Form>>,
    /// The bytes a match can start with.
    starts: [bool; 256],
    /// The key in lower case, for header names.
    lowered: String,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor").finish_non_exhaustive()
    }
}

impl Redactor {
    /// A redactor of `secret`; `None` for an empty one (nothing to hide).
    pub fn new(secret: &str) -> Option<Self> {
        if secret.is_empty() {
            return None;
        }
        let chars: Vec<Vec<Form>> = secret.chars().map(forms).collect();
        let mut starts = [false; 256];
        for form in &chars[0] {
            let first = form.bytes[0];
            starts[usize::from(first)] = true;
            if form.fold {
                starts[usize::from(first.to_ascii_lowercase())] = true;
                starts[usize::from(first.to_ascii_uppercase())] = true;
            }
        }
        Some(Self {
            chars,
            starts,
            lowered: secret.to_lowercase(),
        })
    }

    /// The most bytes a [`Redaction`] ever holds back.
    pub fn max_held(&self) -> usize {
        self.chars
            .iter()
            .map(|forms| forms.iter().map(|f| f.bytes.len()).max().unwrap_or(0))
            .sum()
    }

    /// `bytes` with every occurrence of the key replaced (borrowed when there is none).
    pub fn redact<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        let mut out = Vec::new();
        let found = self.pass(bytes, true, &mut out).1;
        if found {
            Cow::Owned(out)
        } else {
            Cow::Borrowed(bytes)
        }
    }

    /// [`Redactor::redact`] for text (error messages).
    pub fn redact_text(&self, text: &str) -> String {
        String::from_utf8_lossy(&self.redact(text.as_bytes())).into_owned()
    }

    /// Replaces the key in every header value, and drops every header whose name holds it.
    pub fn redact_headers(&self, headers: &mut HeaderMap) {
        let named: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().contains(&self.lowered))
            .cloned()
            .collect();
        for name in named {
            headers.remove(name);
        }
        for value in headers.values_mut() {
            if let Cow::Owned(redacted) = self.redact(value.as_bytes()) {
                *value = HeaderValue::from_bytes(&redacted)
                    .unwrap_or_else(|_| HeaderValue::from_static(REDACTED));
            }
        }
    }

    /// Copies `text` to `out` with the key replaced. Returns how many bytes of `text` were
    /// dealt with — all of them when `last`, else up to the start of a tail that could still
    /// be the key — and whether the key was found.
    fn pass(&self, text: &[u8], last: bool, out: &mut Vec<u8>) -> (usize, bool) {
        out.reserve(text.len());
        let (mut live, mut next) = (Vec::new(), Vec::new());
        let mut found = false;
        let (mut at, mut copied) = (0, 0);
        while at < text.len() {
            if !self.starts[usize::from(text[at])] {
                at += 1;
                continue;
            }
            match self.scan(text, at, &mut live, &mut next) {
                Scan::Full(end) => {
                    out.extend_from_slice(&text[copied..at]);
                    out.extend_from_slice(REDACTED.as_bytes());
                    found = true;
                    at = end;
                    copied = end;
                }
                Scan::Partial if !last => {
                    out.extend_from_slice(&text[copied..at]);
                    return (at, found);
                }
                Scan::Partial | Scan::No => at += 1,
            }
        }
        out.extend_from_slice(&text[copied..]);
        (text.len(), found)
    }

    /// Whether the key, in any of its forms, starts at `start` of `text` (the shortest match).
    fn scan(
        &self,
        text: &[u8],
        start: usize,
        live: &mut Vec<State>,
        next: &mut Vec<State>,
    ) -> Scan {
        live.clear();
        live.extend((0..self.chars[0].len()).map(|form| State { ch: 0, form, at: 0 }));
        let mut at = start;
        loop {
            if live.is_empty() {
                return Scan::No;
            }
            let Some(&byte) = text.get(at) else {
                return Scan::Partial;
            };
            next.clear();
            for state in live.iter() {
                let form = &self.chars[state.ch][state.form];
                if !form.accepts(state.at, byte) {
                    continue;
                }
                if state.at + 1 < form.bytes.len() {
                    push_new(
                        next,
                        State {
                            at: state.at + 1,
                            ..*state
                        },
                    );
                    continue;
                }
                let ch = state.ch + 1;
                if ch == self.chars.len() {
                    return Scan::Full(at + 1);
                }
                for form in 0..self.chars[ch].len() {
                    push_new(next, State { ch, form, at: 0 });
                }
            }
            std::mem::swap(live, next);
            at += 1;
        }
    }
}

fn push_new(states: &mut Vec<State>, state: State) {
    if !states.contains(&state) {
        states.push(state);
    }
}

/// The ways `c` may be written (module docs).
fn forms(c: char) -> Vec<Form> {
    let form = |text: String, fold: bool| Form {
        bytes: text.into_bytes().into_boxed_slice(),
        fold,
    };
    let mut forms = vec![form(c.to_string(), false)];
    let mut units = [0u16; 2];
    let escaped: String = c
        .encode_utf16(&mut units)
        .iter()
        .map(|unit| format!("\\u{unit:04x}"))
        .collect();
    forms.push(form(escaped, true));
    let short = match c {
        '"' => Some("\\\""),
        '\\' => Some("\\\\"),
        '/' => Some("\\/"),
        '\u{8}' => Some("\\b"),
        '\u{c}' => Some("\\f"),
        '\n' => Some("\\n"),
        '\r' => Some("\\r"),
        '\t' => Some("\\t"),
        _ => None,
    };
    if let Some(short) = short {
        forms.push(form(short.to_string(), false));
    }
    let mut utf8 = [0u8; 4];
    let percent: String = c
        .encode_utf8(&mut utf8)
        .bytes()
        .map(|byte| format!("%{byte:02X}"))
        .collect();
    forms.push(form(percent, true));
    forms
}

/// Redaction of a body that arrives in chunks (module docs).
#[derive(Debug)]
pub struct Redaction {
    redactor: Arc<Redactor>,
    /// The tail of what came so far that could still be the start of the key.
    held: Vec<u8>,
}

impl Redaction {
    /// Redacts a body with `redactor`.
    pub fn new(redactor: Arc<Redactor>) -> Self {
        Self {
            redactor,
            held: Vec::new(),
        }
    }

    /// What can be passed on once `chunk` arrived (possibly nothing).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        let mut out = Vec::new();
        if self.held.is_empty() {
            let (done, _) = self.redactor.pass(chunk, false, &mut out);
            self.held.extend_from_slice(&chunk[done..]);
        } else {
            self.held.extend_from_slice(chunk);
            let (done, _) = self.redactor.pass(&self.held, false, &mut out);
            self.held.drain(..done);
        }
        Bytes::from(out)
    }

    /// What is left once the body ended.
    pub fn finish(&mut self) -> Bytes {
        let mut out = Vec::new();
        self.redactor.pass(&self.held, true, &mut out);
        self.held.clear();
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests;
