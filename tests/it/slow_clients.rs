//! Slow and broken clients against the binary, over raw TCP: heads trickled a line at a time,
//! bodies trickled a byte at a time, more connections than `http.max_connections`, malformed
//! heads and bodies — while the normal routes and a live `/events` stream keep working.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::common::Node;

/// A node with short limits, so the tests run in seconds.
fn config(max_connections: u32, header_timeout: &str) -> String {
    format!(
        r#"
[http]
bind = "127.0.0.1:0"
header_read_timeout = "{header_timeout}"
body_read_timeout = "2s"
max_connections = {max_connections}

[queues.default]

[tasks.rt_echo]
handler = {{ kind = "native" }}
"#
    )
}

async fn connect(node: &Node) -> TcpStream {
    TcpStream::connect(node.url.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Reads until the peer closes or `within` passes: what arrived, and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Status and JSON body of a raw HTTP/1.1 answer.
fn answer(bytes: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(bytes);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_heads_are_cut_at_the_header_timeout_while_routes_and_events_go_on() {
    let node = Node::start(&config(256, "1s"), &[]);
    let client = reqwest::Client::new();

    // A live events stream, opened first: it must outlive every timeout below.
    let mut events = client
        .get(format!("{}/events?last=0", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);

    // 50 connections that send one header line every 300 ms and never finish their head.
    let started = Instant::now();
    let mut slow = Vec::new();
    for n in 0..50 {
        let mut stream = connect(&node).await;
        slow.push(tokio::spawn(async move {
            let _ = stream
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                .await;
            let mut answered = Vec::new();
            for line in 0.. {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let header = format!("X-Slow-{n}-{line}: y\r\n");
                if stream.write_all(header.as_bytes()).await.is_err() {
                    break;
                }
                // The server closed: reads see the end (or a reset).
                let mut probe = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(1), stream.read(&mut probe)).await
                {
                    Ok(Ok(0) | Err(_)) => break,
                    Ok(Ok(n)) => answered.extend_from_slice(&probe[..n]),
                    Err(_) => {}
                }
            }
            let (got, closed) = read_until_closed(&mut stream, Duration::from_secs(1)).await;
            answered.extend_from_slice(&got);
            (closed, answered, started.elapsed())
        }));
    }

    // Meanwhile the normal routes answer at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let at = Instant::now();
    assert_eq!(node.get("/health").await.status(), 200);
    let sent = client
        .post(format!("{}/tasks", node.url))
        .json(&json!({ "task": "rt_echo", "args": ["while slow clients wait"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202);
    assert!(
        at.elapsed() < Duration::from_millis(500),
        "{:?}",
        at.elapsed()
    );

    for task in slow {
        let (closed, got, after) = task.await.unwrap();
        assert!(closed, "a trickling connection was not closed");
        // hyper closes at the header timeout without an answer.
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        assert!(
            after >= Duration::from_millis(900) && after < Duration::from_secs(4),
            "closed after {after:?}"
        );
    }

    // The events stream, open past both timeouts (head 1 s, body 2 s), still delivers: a task
    // sent now shows up.
    tokio::time::sleep_until(started + Duration::from_millis(2500)).await;
    let sent: Value = client
        .post(format!("{}/tasks", node.url))
        .json(&json!({ "task": "rt_echo", "args": ["after the slow clients"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sent["id"].as_str().unwrap().to_string();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !seen.contains(&format!("\"task_id\":\"{id}\"")) {
        let chunk = tokio::time::timeout_at(deadline, events.chunk())
            .await
            .expect("the events stream went quiet")
            .expect("the events stream broke")
            .expect("the events stream ended");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_trickled_a_byte_a_second_is_cut_with_a_json_408() {
    let node = Node::start(&config(256, "5s"), &[]);
    for framing in ["Content-Length: 64", "Transfer-Encoding: chunked"] {
        let mut stream = connect(&node).await;
        let head = format!(
            "POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        if framing.starts_with("Transfer") {
            stream.write_all(b"40\r\n").await.unwrap();
        }
        let started = Instant::now();
        let (mut reader, mut writer) = stream.split();
        let trickle = async {
            for byte in b"{\"task\": \"rt_echo\", \"args\": [\"slow\"]}"
                .iter()
                .cycle()
            {
                if writer.write_all(&[*byte]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        };
        // The answer comes while the client is still trickling.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        tokio::select! {
            () = trickle => {}
            () = async {
                while let Ok(n) = reader.read(&mut buf).await {
                    if n == 0 { break; }
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") { break; }
                }
            } => {}
            () = tokio::time::sleep(Duration::from_secs(8)) => {}
        }
        let took = started.elapsed();
        let (status, body) = answer(&got);
        assert_eq!(
            status,
            408,
            "{framing}: {:?}",
            String::from_utf8_lossy(&got)
        );
        assert_eq!(
            body["error"], "body: not received in full within 2s (http.body_read_timeout)",
            "{framing}"
        );
        assert!(
            took >= Duration::from_millis(1900) && took < Duration::from_secs(4),
            "{framing}: answered after {took:?}"
        );
    }
    // Nothing of those bodies was enqueued.
    let queues = node.get_json("/queues").await;
    assert_eq!(queues["queues"]["default"]["ready"], 0, "{queues}");
}

/// One raw request on a fresh connection; the answer's bytes (the connection is closed after).
async fn raw(node: &Node, request: &[u8]) -> Vec<u8> {
    let mut stream = connect(node).await;
    stream.write_all(request).await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(5))
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_get_the_right_status_json_where_the_router_sees_them() {
    let node = Node::start(&config(256, "5s"), &[]);
    // A bad chunk size: the router sees the body fail → a JSON 400 (it was a 413).
    for route in ["/tasks", "/pools/voice/claim"] {
        let got = raw(
            &node,
            format!(
                "POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        let (status, body) = answer(&got);
        assert_eq!(status, 400, "{route}: {:?}", String::from_utf8_lossy(&got));
        assert_eq!(
            body["error"], "body: could not be read: Invalid chunk size line: missing size digit",
            "{route}"
        );
    }
    // A body that ends before its Content-Length, the connection half-closed: a JSON 400 too.
    let mut stream = connect(&node).await;
    stream
        .write_all(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"task\"")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let (got, _) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let (status, body) = answer(&got);
    assert_eq!(status, 400, "{:?}", String::from_utf8_lossy(&got));
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("body: could not be read: "),
        "{body}"
    );

    // What hyper answers itself, before any route: the status is right, the body is empty
    // (README says so).
    let bare = |got: &[u8], status: u16| {
        let text = String::from_utf8_lossy(got);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} ")),
            "{status}: {text:?}"
        );
        assert!(
            text.to_ascii_lowercase().contains("content-length: 0\r\n"),
            "{text:?}"
        );
        assert!(text.ends_with("\r\n\r\n"), "{text:?}");
    };
    let big = format!(
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    bare(&raw(&node, big.as_bytes()).await, 431);
    bare(&raw(&node, b"GARBAGE\r\n\r\n").await, 400);
    bare(
        &raw(&node, b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n").await,
        400,
    );
    // Still serving.
    assert_eq!(node.get("/health").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_wait_until_one_closes() {
    let node = Node::start(&config(3, "10s"), &[]);
    // Three silent connections hold every slot (the header timeout is longer than the test).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect(&node).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A fourth is connected by the kernel but not served while the cap is reached.
    let waiting = tokio::spawn({
        let url = node.url.clone();
        async move {
            let at = Instant::now();
            let status = reqwest::get(format!("{url}/health"))
                .await
                .unwrap()
                .status();
            (status, at.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiting.is_finished(), "served above max_connections");
    // One closes: the waiting request is served at once.
    drop(held.pop());
    let (status, after) = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert_eq!(status, 200);
    assert!(after >= Duration::from_millis(800), "{after:?}");
    assert!(
        node.log()
            .contains("http: max_connections reached; new connections wait in the listen backlog"),
        "{}",
        node.log()
    );
}
