use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use reqwest::header::{CONTENT_ENCODING, CONTENT_LENGTH, HeaderMap, HeaderValue};
use tokio::sync::mpsc;

use super::{BodyError, CHUNK, Decoded};

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn zlib(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn raw_deflate(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A response whose body arrives as `chunks`, with `Content-Encoding: encoding`.
fn response(encoding: Option<&str>, chunks: Vec<Vec<u8>>) -> (reqwest::Response, HeaderMap) {
    let total: usize = chunks.iter().map(Vec::len).sum();
    let stream = futures_util::stream::iter(
        chunks
            .into_iter()
            .map(|chunk| Ok::<_, std::io::Error>(Bytes::from(chunk))),
    );
    let mut builder = axum::http::Response::builder().header(CONTENT_LENGTH, total);
    if let Some(encoding) = encoding {
        builder = builder.header(CONTENT_ENCODING, encoding);
    }
    let response =
        reqwest::Response::from(builder.body(reqwest::Body::wrap_stream(stream)).unwrap());
    let headers = response.headers().clone();
    (response, headers)
}

async fn decode(encoding: Option<&str>, chunks: Vec<Vec<u8>>) -> Result<Bytes, BodyError> {
    let (response, mut headers) = response(encoding, chunks);
    let body = Decoded::new(response, &mut headers)?;
    assert!(headers.get(CONTENT_ENCODING).is_none());
    assert!(headers.get(CONTENT_LENGTH).is_none());
    body.whole(1 << 20).await
}

fn text() -> Vec<u8> {
    (0..2000)
        .map(|n| format!("line {n}: the key could be in here\n"))
        .collect::<String>()
        .into_bytes()
}

#[tokio::test]
async fn every_coding_decodes_to_the_same_text_however_it_is_cut() {
    let text = text();
    let cases: Vec<(Option<&str>, Vec<u8>)> = vec![
        (None, text.clone()),
        (Some("identity"), text.clone()),
        (Some("gzip"), gzip(&text)),
        (Some("x-gzip"), gzip(&text)),
        (Some("GZip"), gzip(&text)),
        (Some("deflate"), zlib(&text)),
        (Some("deflate"), raw_deflate(&text)),
        (Some("gzip, gzip"), gzip(&gzip(&text))),
        (Some("deflate, gzip"), gzip(&raw_deflate(&text))),
        (Some("gzip,identity, deflate"), zlib(&gzip(&text))),
        // Two gzip members, as `cat a.gz b.gz` gives.
        (
            Some("gzip"),
            [gzip(&text[..1000]), gzip(&text[1000..])].concat(),
        ),
    ];
    for (encoding, body) in cases {
        for piece in [1, 2, 7, 4096, body.len()] {
            let chunks: Vec<Vec<u8>> = body.chunks(piece).map(<[u8]>::to_vec).collect();
            let decoded = decode(encoding, chunks).await;
            assert_eq!(
                decoded.as_deref(),
                Ok(&text[..]),
                "{encoding:?} in pieces of {piece}"
            );
        }
    }
}

#[tokio::test]
async fn other_codings_are_refused_before_the_body_is_read() {
    for (encoding, named) in [
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, br", "br"),
        ("compress", "compress"),
        ("gzip, gzip, gzip, gzip", "gzip, gzip, gzip, gzip"),
    ] {
        let (response, mut headers) = response(Some(encoding), vec![b"anything".to_vec()]);
        let err = Decoded::new(response, &mut headers).unwrap_err();
        assert_eq!(err, BodyError::Unsupported(named.into()), "{encoding}");
        assert!(err.to_string().contains(&format!("`{named}`")), "{err}");
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_ENCODING,
        HeaderValue::from_bytes(b"gzip\xff").unwrap(),
    );
    assert!(super::codings(&headers).is_err());
}

#[tokio::test]
async fn broken_data_is_an_error_and_an_empty_body_is_empty() {
    let text = text();
    let compressed = gzip(&text);
    for (encoding, body) in [
        ("gzip", b"not gzip at all".to_vec()),
        ("gzip", compressed[..compressed.len() / 2].to_vec()),
        ("deflate", b"\x78\x9c garbage".to_vec()),
        (
            "gzip",
            [compressed.clone(), b"trailing junk".to_vec()].concat(),
        ),
    ] {
        let result = decode(Some(encoding), vec![body]).await;
        assert!(
            matches!(result, Err(BodyError::Corrupt(_))),
            "{encoding}: {result:?}"
        );
    }
    assert_eq!(decode(Some("gzip"), vec![]).await, Ok(Bytes::new()));
    assert_eq!(
        decode(Some("deflate"), vec![Vec::new()]).await,
        Ok(Bytes::new())
    );
}

#[tokio::test]
async fn a_bomb_is_read_in_small_pieces_and_refused_past_the_limit() {
    // 16 MiB of zeros: 16 KiB gzipped, less than 100 bytes gzipped twice.
    let zeros = vec![0u8; 16 << 20];
    let once = gzip(&zeros);
    let twice = gzip(&once);
    assert!(twice.len() < 1 << 20);
    for (encoding, body) in [("gzip", once), ("gzip, gzip", twice)] {
        let (answer, mut headers) = response(Some(encoding), vec![body.clone()]);
        let result = Decoded::new(answer, &mut headers)
            .unwrap()
            .whole(4 << 20)
            .await;
        assert_eq!(result, Err(BodyError::TooLarge(4 << 20)), "{encoding}");

        let (answer, mut headers) = response(Some(encoding), vec![body]);
        let mut decoded = Decoded::new(answer, &mut headers).unwrap();
        let mut total = 0;
        while let Some(chunk) = decoded.chunk().await.unwrap() {
            assert!(chunk.len() <= CHUNK);
            total += chunk.len();
        }
        assert_eq!(total, 16 << 20, "{encoding}");
    }
}

#[tokio::test]
async fn up_to_gives_back_what_it_read_when_the_body_is_longer() {
    let text = text();
    let (response, mut headers) = response(Some("gzip"), vec![gzip(&text)]);
    let mut decoded = Decoded::new(response, &mut headers).unwrap();
    assert_eq!(decoded.up_to(1000).await, Ok(None));
    let mut again = Vec::new();
    while let Some(chunk) = decoded.chunk().await.unwrap() {
        again.extend_from_slice(&chunk);
    }
    assert_eq!(again, text);
}

#[tokio::test]
async fn a_compressed_stream_is_decoded_as_it_arrives() {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let response = reqwest::Response::from(
        axum::http::Response::builder()
            .header(CONTENT_ENCODING, "gzip")
            .body(reqwest::Body::wrap_stream(stream))
            .unwrap(),
    );
    let mut headers = response.headers().clone();
    let mut decoded = Decoded::new(response, &mut headers).unwrap();
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(b"data: first\n\n").unwrap();
    encoder.flush().unwrap();
    let first = std::mem::take(encoder.get_mut());
    tx.send(Ok(Bytes::from(first))).await.unwrap();
    let chunk = tokio::time::timeout(Duration::from_secs(5), decoded.chunk())
        .await
        .expect("the first event is decoded before the rest is sent")
        .unwrap();
    assert_eq!(chunk.as_deref(), Some(&b"data: first\n\n"[..]));
    encoder.write_all(b"data: [DONE]\n\n").unwrap();
    tx.send(Ok(Bytes::from(encoder.finish().unwrap())))
        .await
        .unwrap();
    drop(tx);
    assert_eq!(
        decoded.chunk().await.unwrap().as_deref(),
        Some(&b"data: [DONE]\n\n"[..])
    );
    assert_eq!(decoded.chunk().await, Ok(None));
}
