//! Reading a child's pipe line by line with a cap on what is kept: a line longer than the cap
//! keeps its first `cap` bytes and its length, the rest is read and dropped. Whatever a child
//! prints — one 300 MB line, binary data, invalid UTF-8 — the reader holds at most `cap` bytes
//! plus its buffer, and the pipe is still read to its end (a child blocked on a full pipe
//! never finishes).

use std::borrow::Cow;
use std::io;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

/// Longest piece of a line written to the log (a longer line is cut, with a marker saying
/// how long it was).
pub const LOG_LINE_BYTES: usize = 16 * 1024;

/// Buffer of one pipe's reader: larger than a pipe's atomic write, small enough per child.
const BUFFER: usize = 64 * 1024;

/// One line as kept: its first bytes (at most the reader's cap, without the line ending) and
/// the length it had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    kept: Vec<u8>,
    len: u64,
}

impl Line {
    /// Bytes the whole line had, without its line ending.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether bytes beyond the cap were dropped.
    pub fn is_truncated(&self) -> bool {
        self.len > self.kept.len() as u64
    }

    /// Whether the line holds nothing but whitespace (a truncated line never counts as blank).
    pub fn is_blank(&self) -> bool {
        !self.is_truncated() && self.kept.iter().all(u8::is_ascii_whitespace)
    }

    /// The whole line as text (invalid UTF-8 replaced), when nothing was dropped.
    pub fn whole(&self) -> Option<Cow<'_, str>> {
        (!self.is_truncated()).then(|| String::from_utf8_lossy(&self.kept))
    }

    /// The kept bytes as text (invalid UTF-8 replaced): the whole line, or its start when
    /// it was truncated.
    pub fn kept(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.kept)
    }

    /// The line as text of at most `limit` bytes (plus a marker): a longer line is cut and
    /// ends with `… [truncated: N bytes in all]`.
    pub fn shown(&self, limit: usize) -> Cow<'_, str> {
        if !self.is_truncated() && self.kept.len() <= limit {
            return String::from_utf8_lossy(&self.kept);
        }
        let cut = &self.kept[..self.kept.len().min(limit)];
        Cow::Owned(format!(
            "{}… [truncated: {} bytes in all]",
            String::from_utf8_lossy(cut),
            self.len
        ))
    }
}

/// Reads lines of at most `cap` kept bytes each from a pipe.
#[derive(Debug)]
pub struct Lines<R> {
    reader: BufReader<R>,
    cap: usize,
}

impl<R: AsyncRead + Unpin> Lines<R> {
    /// A reader of `pipe` keeping at most `cap` bytes of each line.
    pub fn new(pipe: R, cap: usize) -> Self {
        Self {
            reader: BufReader::with_capacity(BUFFER, pipe),
            cap,
        }
    }

    /// The next line (`\n` or `\r\n` removed), `None` at the end of the pipe. A last line
    /// without a newline is a line.
    pub async fn next_line(&mut self) -> io::Result<Option<Line>> {
        let mut kept = Vec::new();
        let mut len: u64 = 0;
        let mut read_any = false;
        let mut last_byte = None;
        let mut ended = false;
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if !read_any {
                    return Ok(None);
                }
                break;
            }
            read_any = true;
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            let room = self.cap.saturating_sub(kept.len());
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
            len = len.saturating_add(chunk.len() as u64);
            last_byte = chunk.last().copied().or(last_byte);
            let consumed = newline.map_or(available.len(), |at| at + 1);
            self.reader.consume(consumed);
            if newline.is_some() {
                ended = true;
                break;
            }
        }
        // `\r\n`: the `\r` belongs to the line ending.
        if ended && last_byte == Some(b'\r') {
            len -= 1;
            kept.truncate(usize::try_from(len).unwrap_or(usize::MAX));
        }
        Ok(Some(Line { kept, len }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(input: &[u8], cap: usize) -> Vec<Line> {
        let mut lines = Lines::new(input, cap);
        let mut out = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            out.push(line);
        }
        out
    }

    #[tokio::test]
    async fn short_lines_are_whole_and_endings_removed() {
        let lines = read_all(b"one\r\ntwo\n\n  \nlast", 16).await;
        let texts: Vec<_> = lines.iter().map(|l| l.whole().unwrap()).collect();
        assert_eq!(texts, ["one", "two", "", "  ", "last"]);
        assert!(lines[2].is_blank() && lines[3].is_blank() && !lines[4].is_blank());
        assert!(lines.iter().all(|l| !l.is_truncated()));
        assert!(read_all(b"", 16).await.is_empty());
    }

    #[tokio::test]
    async fn a_long_line_keeps_its_start_and_length_and_the_next_line_is_intact() {
        let mut input = vec![b'x'; 1_000_000];
        input.extend_from_slice(b"\n{\"ok\": true}\n");
        let lines = read_all(&input, 12).await;
        assert_eq!(lines.len(), 2);
        assert!(lines[0].is_truncated() && !lines[0].is_blank());
        assert_eq!(lines[0].len(), 1_000_000);
        assert_eq!(lines[0].whole(), None);
        assert_eq!(lines[0].shown(4), "xxxx… [truncated: 1000000 bytes in all]");
        assert_eq!(
            lines[0].shown(100),
            "xxxxxxxxxxxx… [truncated: 1000000 bytes in all]"
        );
        assert_eq!(lines[1].whole().unwrap(), "{\"ok\": true}");
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_cap_is_whole_even_with_crlf() {
        let lines = read_all(b"abcd\nabcd\r\nabcde\nab\r", 4).await;
        assert_eq!(lines[0].whole().unwrap(), "abcd");
        assert_eq!(lines[1].whole().unwrap(), "abcd");
        assert!(lines[2].is_truncated());
        assert_eq!(lines[2].len(), 5);
        // Without a newline the `\r` is the line's own.
        assert_eq!(lines[3].whole().unwrap(), "ab\r");
    }

    #[tokio::test]
    async fn invalid_utf8_is_replaced_not_an_error() {
        let lines = read_all(b"caf\xe9\n\xff\xfe\x00binary\nafter\n", 64).await;
        assert_eq!(lines[0].whole().unwrap(), "caf\u{FFFD}");
        assert_eq!(lines[2].whole().unwrap(), "after");
    }
}
