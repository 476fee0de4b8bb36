//! Embedding the runtime with your own native (Rust) task handlers.
//!
//! Run with: cargo run --example native_handler
//!
//! A program registers async functions by task name (`Natives::register`), compiles a config
//! whose tasks use `handler = { kind = "native" }`, and starts a `runtime::node::Node` on a
//! listener it binds itself (port 0: the system picks a free port, read back from the node) —
//! the same node the `runtime` binary runs, with its HTTP surface and supervision tree. This
//! example enqueues a few tasks through the node's own HTTP API, prints their records and
//! stops.

use std::time::Duration;

use actors::handler::TaskError;
use actors::handler::native::Natives;
use runtime::config::{Environment, compile_str};
use runtime::node::Node;
use serde_json::{Value, json};

const CONFIG: &str = r#"
[queues.default]
concurrency = 4

[tasks.summarize_thread]
handler = { kind = "native" }
max_retries = 2
backoff = "50ms"
soft_time_limit = "2s"
time_limit = "3s"
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut natives = Natives::builtin();
    natives.register("summarize_thread", |ctx| async move {
        let text = ctx
            .envelope
            .args
            .first()
            .and_then(Value::as_str)
            .ok_or_else(|| TaskError::Permanent("args[0]: expected the thread text".into()))?
            .to_string();
        // Long work should watch the soft limit and stop cleanly.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
            () = ctx.soft.cancelled() => return Err(TaskError::Cancelled("soft limit".into())),
        }
        let words = text.split_whitespace().count();
        Ok(json!({ "words": words, "summary": text.chars().take(24).collect::<String>() }))
    });

    let config = compile_str(CONFIG, Environment::Ignored)?.config;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let node = Node::start(config, natives, listener).await?;
    let base = format!("http://{}", node.addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let node = tokio::spawn(node.run(async move {
        let _ = stopped.await;
        "example done"
    }));

    let http = reqwest::Client::new();
    let sent: Vec<Value> = http
        .post(format!("{base}/tasks"))
        .json(&json!([
            { "task": "summarize_thread", "args": ["the boat leaves at nine from the north pier"] },
            { "task": "summarize_thread", "args": [42] },
        ]))
        .send()
        .await?
        .json()
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for task in sent {
        let id = task["id"].as_str().unwrap_or_default();
        let record: Value = http
            .get(format!("{base}/tasks/{id}"))
            .send()
            .await?
            .json()
            .await?;
        println!(
            "{id}: {} {}",
            record["state"],
            if record["state"] == "succeeded" {
                &record["result"]
            } else {
                &record["error"]
            }
        );
    }
    let _ = stop.send(());
    node.await??;
    Ok(())
}
