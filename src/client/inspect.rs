//! `runtime inspect`: what a running node is doing, from its HTTP API — the `celery inspect`
//! / Flower replacement for a terminal or a script.
//!
//! | subcommand | reads | shows |
//! |---|---|---|
//! | `tree` | `GET /actors?format=text` (`/actors` with `--json`) | the supervision tree |
//! | `queues` | `GET /queues`, `GET /actors` | depths per queue, running/waiting tasks, concurrency |
//! | `active` | `GET /actors` (the consumers' snapshots) | running tasks with their elapsed time |
//! | `stats` | `GET /queues`, `GET /actors` | outcomes per queue on this node, and depths |
//! | `ping` | `GET /health` | answers and is healthy, with the round-trip time |
//! | `events` | `GET /events` (SSE) | the latest events; `--follow` keeps tailing |
//!
//! Tables by default (in the CLI's one style: [`super::table`]); `--json` prints one
//! JSON document (for `events`: one event per line,
//! exactly the `data` of the SSE messages).

use anyhow::{Result, anyhow, bail};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Node, REQUEST_TIMEOUT, parse, table};
use crate::cli::{EventsArgs, InspectArgs, InspectCommand, NodeArgs};

/// `runtime inspect …`
pub async fn run(args: InspectArgs) -> Result<()> {
    let node = Node::new(&NodeArgs {
        url: args.url,
        token: None,
    });
    match args.what {
        InspectCommand::Tree => tree(&node, args.json).await,
        InspectCommand::Queues => queues(&node, args.json).await,
        InspectCommand::Active => active(&node, args.json).await,
        InspectCommand::Stats => stats(&node, args.json).await,
        InspectCommand::Ping => ping(&node, args.json).await,
        InspectCommand::Events(events_args) => events(&node, events_args, args.json).await,
    }
}

/// The supervision tree, as the node renders it (or its JSON).
pub(super) async fn tree(node: &Node, json: bool) -> Result<()> {
    let path = if json {
        "/actors"
    } else {
        "/actors?format=text"
    };
    let text = node.get(path).await?;
    if json {
        println!("{}", text.trim_end());
    } else {
        print!("{text}");
    }
    Ok(())
}

/// The actor at `path` in the nested tree of `/actors`.
fn find<'a>(nodes: &'a Value, path: &str) -> Option<&'a Value> {
    for node in nodes.as_array()? {
        if node["path"] == path {
            return Some(node);
        }
        if path.starts_with(&format!("{}/", node["path"].as_str().unwrap_or("")))
            && let Some(found) = find(&node["children"], path)
        {
            return Some(found);
        }
    }
    None
}

/// What one queue looks like: depths from `/queues`, the consumer's snapshot from `/actors`.
struct Queue {
    name: String,
    depth: Value,
    consumer: Value,
}

async fn queue_views(node: &Node) -> Result<Vec<Queue>> {
    let depths = parse(&node.get("/queues").await?)?;
    let tree = parse(&node.get("/actors").await?)?;
    let Some(queues) = depths["queues"].as_object() else {
        bail!("/queues: the answer has no `queues` object");
    };
    Ok(queues
        .iter()
        .map(|(name, depth)| Queue {
            name: name.clone(),
            depth: depth.clone(),
            consumer: find(&tree, &format!("root/queues/{name}"))
                .map(|c| c["snapshot"].clone())
                .unwrap_or(Value::Null),
        })
        .collect())
}

fn n(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

fn running(consumer: &Value) -> usize {
    consumer["running"].as_array().map_or(0, Vec::len)
}

/// `inspect queues`
async fn queues(node: &Node, json: bool) -> Result<()> {
    let views = queue_views(node).await?;
    if json {
        let list: Vec<Value> = views
            .iter()
            .map(|q| {
                json!({
                    "queue": q.name,
                    "ready": n(&q.depth["ready"]),
                    "delayed": n(&q.depth["delayed"]),
                    "in_flight": n(&q.depth["in_flight"]),
                    "dead": n(&q.depth["dead"]),
                    "running": running(&q.consumer),
                    "waiting": n(&q.consumer["waiting"]),
                    "concurrency": n(&q.depth["concurrency"]),
                })
            })
            .collect();
        println!("{}", json!({ "queues": list }));
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|q| {
            vec![
                q.name.clone(),
                n(&q.depth["ready"]).to_string(),
                n(&q.depth["delayed"]).to_string(),
                n(&q.depth["in_flight"]).to_string(),
                n(&q.depth["dead"]).to_string(),
                running(&q.consumer).to_string(),
                n(&q.consumer["waiting"]).to_string(),
                n(&q.depth["concurrency"]).to_string(),
            ]
        })
        .collect();
    let columns = [
        "queue",
        "ready",
        "delayed",
        "in_flight",
        "dead",
        "running",
        "waiting",
        "concurrency",
    ];
    print!("{}", table::render(&columns, &rows));
    Ok(())
}

/// `1.2s`, `3m04s`, `2h05m`: short durations for tables.
fn human(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// `inspect active`
async fn active(node: &Node, json: bool) -> Result<()> {
    let views = queue_views(node).await?;
    let mut tasks: Vec<Value> = Vec::new();
    for q in &views {
        for task in q.consumer["running"].as_array().into_iter().flatten() {
            tasks.push(json!({
                "queue": q.name,
                "id": task["id"],
                "task": task["task"],
                "attempt": task["attempt"],
                "elapsed_ms": task["elapsed_ms"],
                "deadline_in_ms": task["deadline_in_ms"],
            }));
        }
    }
    // Longest-running first.
    tasks.sort_by_key(|t| std::cmp::Reverse(n(&t["elapsed_ms"])));
    if json {
        println!("{}", json!({ "active": tasks }));
        return Ok(());
    }
    if tasks.is_empty() {
        println!("no tasks running");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                t["queue"].as_str().unwrap_or("").to_string(),
                t["task"].as_str().unwrap_or("").to_string(),
                t["id"].as_str().unwrap_or("").to_string(),
                n(&t["attempt"]).to_string(),
                human(n(&t["elapsed_ms"])),
                human(n(&t["deadline_in_ms"])),
            ]
        })
        .collect();
    let columns = ["queue", "task", "id", "attempt", "elapsed", "deadline_in"];
    print!("{}", table::render(&columns, &rows));
    Ok(())
}

/// `inspect stats`
async fn stats(node: &Node, json: bool) -> Result<()> {
    let views = queue_views(node).await?;
    let rows: Vec<Value> = views
        .iter()
        .map(|q| {
            let outcomes = &q.consumer["outcomes"];
            let (succeeded, retried, dead) = (
                n(&outcomes["succeeded"]),
                n(&outcomes["retried"]),
                n(&outcomes["dead"]),
            );
            json!({
                "queue": q.name,
                "processed": succeeded + retried + dead,
                "succeeded": succeeded,
                "failed": retried + dead,
                "retried": retried,
                "dead_lettered": dead,
                "deferred": n(&q.consumer["counters"]["deferred"]),
                "running": running(&q.consumer),
                "ready": n(&q.depth["ready"]),
                "delayed": n(&q.depth["delayed"]),
                "in_flight": n(&q.depth["in_flight"]),
                "dead": n(&q.depth["dead"]),
            })
        })
        .collect();
    if json {
        println!("{}", json!({ "queues": rows }));
        return Ok(());
    }
    let columns = [
        "processed",
        "succeeded",
        "failed",
        "retried",
        "dead_lettered",
        "running",
        "ready",
        "delayed",
        "in_flight",
        "dead",
    ];
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            let mut cells = vec![row["queue"].as_str().unwrap_or("").to_string()];
            cells.extend(columns.iter().map(|c| n(&row[*c]).to_string()));
            cells
        })
        .collect();
    let mut header = vec!["queue"];
    header.extend(columns);
    print!("{}", table::render(&header, &table_rows));
    println!(
        "(outcomes counted on this node since it started: processed = succeeded + failed, failed = retried + dead_lettered)"
    );
    Ok(())
}

/// `inspect ping`: exit 0 when the node answers and is healthy, 1 when it answers unhealthy.
async fn ping(node: &Node, json: bool) -> Result<()> {
    let started = Instant::now();
    let response = node
        .open(reqwest::Method::GET, "/health", None, Some(REQUEST_TIMEOUT))
        .await?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let healthy = status.is_success() && body["status"] == "ok";
    let problems: Vec<String> = body["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    if json {
        println!(
            "{}",
            json!({
                "url": node.base,
                "healthy": healthy,
                "status": status.as_u16(),
                "latency_ms": (ms * 10.0).round() / 10.0,
                "problems": problems,
            })
        );
    } else if healthy {
        println!("{}: ok ({ms:.1} ms)", node.base);
    } else {
        println!("{}: unhealthy ({status}, {ms:.1} ms)", node.base);
        for problem in &problems {
            println!("  {problem}");
        }
    }
    if healthy {
        Ok(())
    } else {
        Err(anyhow!("the node at {} is not healthy", node.base))
    }
}

/// `inspect events`: the latest `--limit` events (or those after `--after`), then, with
/// `--follow`, every new one until interrupted.
async fn events(node: &Node, args: EventsArgs, json: bool) -> Result<()> {
    let mut query = vec![format!("follow={}", args.follow)];
    match &args.after {
        Some(after) => query.push(format!("after={after}")),
        None => query.push(format!("last={}", args.limit)),
    }
    if let Some(types) = &args.types {
        query.push(format!("types={types}"));
    }
    let path = format!("/events?{}", query.join("&"));
    let response = node.open(reqwest::Method::GET, &path, None, None).await?;
    let mut response = Node::check(&path, response).await?;
    let mut parser = SseParser::default();
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(err) => bail!(
                "the event stream of {} broke off: {}",
                node.base,
                crate::innermost(&err)
            ),
        };
        for data in parser.feed(&chunk) {
            print_event(&data, json);
        }
    }
    if args.follow {
        bail!("the node at {} ended the event stream", node.base);
    }
    Ok(())
}

fn print_event(data: &str, json: bool) {
    if json {
        println!("{data}");
        return;
    }
    let Ok(event) = serde_json::from_str::<Value>(data) else {
        println!("{data}");
        return;
    };
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    let subject = if event["task_id"].is_string() {
        format!(
            "{} {} {}",
            text(&event["queue"]),
            text(&event["task"]),
            text(&event["task_id"])
        )
    } else {
        let detail = &event["detail"];
        ["path", "resource", "pool"]
            .iter()
            .find_map(|k| detail[*k].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let mut rest = Vec::new();
    if let Some(detail) = event["detail"].as_object() {
        for (key, value) in detail {
            if value.is_null() || ["path", "resource", "pool"].contains(&key.as_str()) {
                continue;
            }
            let shown = match value {
                Value::String(s) if !s.contains(' ') && !s.is_empty() => s.clone(),
                other => other.to_string(),
            };
            rest.push(format!("{key}={shown}"));
        }
    }
    let line = format!(
        "{:<24}  {:<20} {}  {}",
        text(&event["at"]),
        text(&event["kind"]),
        subject,
        rest.join(" ")
    );
    println!("{}", line.trim_end());
}

/// Splits an SSE byte stream into messages and returns their `data` (comments and other
/// fields are skipped; the id is inside the data too).
///
/// Kept rather than replaced by a crate: eventsource-stream over reqwest's `bytes_stream`
/// would save these thirty lines but bring nom and a stream adapter for a client that only
/// reads our own server's `data:` lines, and it has not had a release since 2022.
#[derive(Debug, Default)]
struct SseParser {
    buffer: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buffer.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buffer.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(value) = line.strip_prefix("data:") {
                self.data
                    .push(value.strip_prefix(' ').unwrap_or(value).to_string());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_messages_are_split_across_chunks() {
        let mut parser = SseParser::default();
        assert!(
            parser
                .feed(b": keep-alive\n\nid: 1-0\nevent: sent\nda")
                .is_empty()
        );
        let got = parser.feed(b"ta: {\"kind\":\"sent\"}\n\nid: 2-0\ndata: x\r\n\r\n");
        assert_eq!(got, ["{\"kind\":\"sent\"}", "x"]);
    }

    #[test]
    fn durations_read_well_in_tables() {
        assert_eq!(human(1234), "1.2s");
        assert_eq!(human(184_000), "3m04s");
        assert_eq!(human(7_500_000), "2h05m");
    }

    #[test]
    fn actors_are_found_by_path() {
        let tree = json!([{ "path": "root", "children": [
            { "path": "root/queues", "children": [
                { "path": "root/queues/chat", "children": [], "snapshot": { "waiting": 2 } }
            ]}
        ]}]);
        assert_eq!(
            find(&tree, "root/queues/chat").unwrap()["snapshot"]["waiting"],
            2
        );
        assert!(find(&tree, "root/queues/nope").is_none());
    }
}
