//! Reading an upstream's answer whatever its `Content-Encoding` ([`Decoded`]), so that what
//! the resource clients parse and the egress proxy redacts ([`super::redact`]) is the content
//! itself, never compressed bytes that could carry the key past a redactor.
//!
//! The clients ask for `Accept-Encoding: identity` ([`ask_identity`]: compressing a server-sent
//! event stream can also hold its events back); an upstream that encodes anyway is decoded:
//! - `gzip` / `x-gzip`, with several members (concatenated files) too;
//! - `deflate`, zlib-wrapped as RFC 9110 says or raw as some servers send it (told apart by
//!   the zlib header);
//! - `identity`;
//! - stacked (`Content-Encoding: gzip, deflate`, undone last to first), up to [`MAX_CODINGS`].
//!
//! Anything else — `br`, `zstd`, `compress`, an unknown name, or more stacked codings — is
//! [`BodyError::Unsupported`] before a byte of the body is read: such a body is never passed
//! on. An empty body (a `HEAD`, a `204`) is empty whatever its header says.
//!
//! Memory stays bounded whatever the compression ratio (a gzip bomb): the body is decoded in
//! pieces of at most [`CHUNK`] bytes as it is read, and whoever keeps a body whole keeps at
//! most the limit it asks for ([`Decoded::whole`], [`Decoded::up_to`]).

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use async_compression::tokio::bufread::{DeflateDecoder, GzipDecoder, ZlibDecoder};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, HeaderMap, HeaderValue};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use tokio_util::io::StreamReader;

/// The most decoded bytes handed out at once.
pub const CHUNK: usize = 16 * 1024;

/// The most codings stacked in one `Content-Encoding` that are decoded.
pub const MAX_CODINGS: usize = 3;

/// Asks the upstream not to encode its answer.
pub fn ask_identity(headers: &mut HeaderMap) {
    headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
}

/// Why an answer's body cannot be had (the messages name no URL and no header value beyond
/// the coding's name).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// A `Content-Encoding` that is not decoded (module docs).
    #[error("the answer's Content-Encoding `{0}` cannot be decoded (decoded: gzip, deflate)")]
    Unsupported(String),
    /// The connection broke or timed out while the body was read.
    #[error("the answer's body broke off: {0}")]
    Broken(&'static str),
    /// The bytes are not what their `Content-Encoding` says.
    #[error("the answer's body is not valid `{0}`")]
    Corrupt(String),
    /// Longer than the reader's limit once decoded.
    #[error("the answer's body is larger than {0} bytes decoded")]
    TooLarge(usize),
}

/// A content coding that is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Coding {
    Gzip,
    Deflate,
}

impl fmt::Display for Coding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Coding::Gzip => "gzip",
            Coding::Deflate => "deflate",
        })
    }
}

/// The codings `headers` say were applied, in the order they were applied.
fn codings(headers: &HeaderMap) -> Result<Vec<Coding>, BodyError> {
    let mut codings = Vec::new();
    for value in headers.get_all(CONTENT_ENCODING) {
        let text = value
            .to_str()
            .map_err(|_| BodyError::Unsupported("(not text)".into()))?;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name.to_ascii_lowercase().as_str() {
                "identity" => {}
                "gzip" | "x-gzip" => codings.push(Coding::Gzip),
                "deflate" => codings.push(Coding::Deflate),
                _ => {
                    let shown: String = name.chars().take(40).collect();
                    return Err(BodyError::Unsupported(shown));
                }
            }
        }
    }
    if codings.len() > MAX_CODINGS {
        let all: Vec<String> = codings.iter().map(Coding::to_string).collect();
        return Err(BodyError::Unsupported(all.join(", ")));
    }
    Ok(codings)
}

type BufRead = Box<dyn AsyncBufRead + Send + Unpin>;
type Read = Box<dyn AsyncRead + Send + Unpin>;

enum State {
    /// Nothing read yet: the decoders are set up on the first read, once there is a body.
    Start(BufRead),
    Reading(Read),
    Done,
}

/// An answer's body, decoded as it is read (module docs).
pub struct Decoded {
    state: State,
    codings: Vec<Coding>,
    /// Decoded bytes given back by [`Decoded::up_to`], handed out first.
    unread: Option<Bytes>,
}

impl fmt::Debug for Decoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decoded")
            .field("codings", &self.codings)
            .finish_non_exhaustive()
    }
}

impl Decoded {
    /// The body of `response`, whose headers are `headers` (a copy the caller keeps): fails
    /// at once for a coding that is not decoded. Takes `Content-Encoding` and
    /// `Content-Length` out of `headers`, since they describe the bytes as sent, not the
    /// decoded body.
    pub fn new(response: reqwest::Response, headers: &mut HeaderMap) -> Result<Self, BodyError> {
        let codings = codings(headers)?;
        headers.remove(CONTENT_ENCODING);
        headers.remove(CONTENT_LENGTH);
        let raw = response
            .bytes_stream()
            .map(|chunk| chunk.map_err(io::Error::other));
        Ok(Self {
            state: State::Start(Box::new(StreamReader::new(raw))),
            codings,
            unread: None,
        })
    }

    /// The next piece of the decoded body (at most [`CHUNK`] bytes), `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, BodyError> {
        if let Some(unread) = self.unread.take() {
            return Ok(Some(unread));
        }
        loop {
            match &mut self.state {
                State::Done => return Ok(None),
                State::Start(_) if self.codings.is_empty() => {
                    let State::Start(raw) = std::mem::replace(&mut self.state, State::Done) else {
                        return Ok(None);
                    };
                    self.state = State::Reading(Box::new(raw));
                }
                State::Start(raw) => {
                    let empty = match raw.fill_buf().await {
                        Ok(available) => available.is_empty(),
                        Err(err) => return Err(self.failed(err)),
                    };
                    let State::Start(raw) = std::mem::replace(&mut self.state, State::Done) else {
                        return Ok(None);
                    };
                    if !empty {
                        self.state = State::Reading(decoders(raw, &self.codings));
                    }
                }
                State::Reading(reader) => {
                    let mut buf = BytesMut::zeroed(CHUNK);
                    let read = reader.read(&mut buf).await;
                    return match read {
                        Ok(0) => {
                            self.state = State::Done;
                            Ok(None)
                        }
                        Ok(n) => {
                            buf.truncate(n);
                            Ok(Some(buf.freeze()))
                        }
                        Err(err) => {
                            self.state = State::Done;
                            Err(self.failed(err))
                        }
                    };
                }
            }
        }
    }

    /// The whole decoded body, or [`BodyError::TooLarge`] once it passes `limit`.
    pub async fn whole(mut self, limit: usize) -> Result<Bytes, BodyError> {
        match self.up_to(limit).await? {
            Some(body) => Ok(body),
            None => Err(BodyError::TooLarge(limit)),
        }
    }

    /// The whole decoded body when it is at most `limit` bytes; else `None`, with everything
    /// read so far given back (the next [`Decoded::chunk`] returns it).
    pub async fn up_to(&mut self, limit: usize) -> Result<Option<Bytes>, BodyError> {
        let mut body = BytesMut::new();
        while let Some(chunk) = self.chunk().await? {
            body.extend_from_slice(&chunk);
            if body.len() > limit {
                self.unread = Some(body.freeze());
                return Ok(None);
            }
        }
        Ok(Some(body.freeze()))
    }

    /// What a read error means: the connection's (reqwest's error inside), or the decoder's.
    fn failed(&self, err: io::Error) -> BodyError {
        let transport = err
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<reqwest::Error>());
        match transport {
            Some(err) if err.is_timeout() => BodyError::Broken("timed out"),
            Some(_) => BodyError::Broken("the connection failed"),
            None => {
                let all: Vec<String> = self.codings.iter().map(Coding::to_string).collect();
                BodyError::Corrupt(all.join(", "))
            }
        }
    }
}

/// `raw` with `codings` undone, the last applied first.
fn decoders(raw: BufRead, codings: &[Coding]) -> Read {
    let mut reader: BufRead = raw;
    for coding in codings.iter().rev() {
        let decoder: Read = match coding {
            Coding::Gzip => {
                let mut gzip = GzipDecoder::new(reader);
                gzip.multiple_members(true);
                Box::new(gzip)
            }
            Coding::Deflate => Box::new(Deflate::Sniffing {
                input: Some(reader),
                head: Vec::new(),
            }),
        };
        reader = Box::new(BufReader::with_capacity(CHUNK, decoder));
    }
    Box::new(reader)
}

/// `deflate` as either zlib or raw deflate, chosen by the first two bytes.
enum Deflate {
    Sniffing {
        input: Option<BufRead>,
        head: Vec<u8>,
    },
    Decoding(Read),
}

/// A zlib header: compression method 8 (deflate), a window of at most 32 KiB, and the check
/// bits that make the first two bytes a multiple of 31.
fn is_zlib(head: &[u8]) -> bool {
    match head {
        [cmf, flg, ..] => {
            cmf & 0x0f == 8 && cmf >> 4 <= 7 && ((u16::from(*cmf) << 8) | u16::from(*flg)) % 31 == 0
        }
        _ => false,
    }
}

impl AsyncRead for Deflate {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this {
                Deflate::Decoding(inner) => return Pin::new(inner).poll_read(cx, buf),
                Deflate::Sniffing { input, head } => {
                    let Some(reader) = input.as_mut() else {
                        return Poll::Ready(Err(io::Error::other("deflate: no input")));
                    };
                    if head.len() < 2 {
                        let available = ready!(Pin::new(&mut *reader).poll_fill_buf(cx))?;
                        if !available.is_empty() {
                            let take = (2 - head.len()).min(available.len());
                            head.extend_from_slice(&available[..take]);
                            Pin::new(&mut *reader).consume(take);
                            continue;
                        }
                    }
                    let Some(reader) = input.take() else {
                        return Poll::Ready(Err(io::Error::other("deflate: no input")));
                    };
                    let zlib = is_zlib(head);
                    let input = std::io::Cursor::new(std::mem::take(head)).chain(reader);
                    *this = Deflate::Decoding(if zlib {
                        Box::new(ZlibDecoder::new(input))
                    } else {
                        Box::new(DeflateDecoder::new(input))
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
