//! The whole per-task path on a private redis-server: a node (in process, the same code as
//! the binary) drains a backlog of no-op native tasks, with acks and results, that was queued
//! before it started (timed from its start to an empty queue); then, at a steady offered rate,
//! the enqueue → start latency of each task.
//!
//! Run with: cargo run --release --example bench_runtime [-- TASKS RATE SECONDS [OBSERVE]]
//!
//! `OBSERVE` says what is recorded, to measure what observability costs the per-task path:
//! `on` (the default: metrics and events), `off` (neither), `no-metrics`
//! (`[metrics] enabled = false`) or `no-events` (`[events] enabled = false`; the producer writes
//! no `sent` events either).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use actors::broker::redis::RedisBroker;
use actors::broker::{Admin, BrokerSettings, Envelope, TaskQueue};
use actors::handler::native::Natives;
use actors::test_util::RedisServer;
use runtime::config::{Environment, compile_str};
use serde_json::Value;
use tokio::time::Instant;

const CONFIG: &str = r#"
[broker]
url = "REDIS"
[queues.default]
concurrency = 256
[tasks.rt_noop]
handler = { kind = "native" }
[tasks.stamp]
handler = { kind = "native" }
[metrics]
enabled = METRICS
[events]
enabled = EVENTS
"#;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().map_or(Ok(20_000), |a| a.parse())?;
    let rate: u64 = args.next().map_or(Ok(200), |a| a.parse())?;
    let seconds: u64 = args.next().map_or(Ok(10), |a| a.parse())?;
    let observe = args.next().unwrap_or_else(|| "on".into());
    let (metrics, events) = match observe.as_str() {
        "on" => (true, true),
        "off" => (false, false),
        "no-metrics" => (false, true),
        "no-events" => (true, false),
        other => {
            return Err(
                format!("OBSERVE: expected on, off, no-metrics or no-events, got {other}").into(),
            );
        }
    };

    let redis = RedisServer::start();
    let text = CONFIG
        .replace("REDIS", &redis.url())
        .replace("METRICS", &metrics.to_string())
        .replace("EVENTS", &events.to_string());
    let config = compile_str(&text, Environment::Ignored)?.config;
    let waits = Arc::new(Mutex::new(Vec::with_capacity((rate * seconds) as usize)));
    let mut natives = Natives::builtin();
    {
        let waits = Arc::clone(&waits);
        natives.register("stamp", move |ctx| {
            let waits = Arc::clone(&waits);
            async move {
                // Microseconds since the epoch, stamped by the producer just before enqueue
                // (`enqueued_at` has only millisecond precision).
                if let Some(sent) = ctx.envelope.kwargs.get("sent_us").and_then(Value::as_u64) {
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .unwrap_or_default();
                    let wait = now.saturating_sub(Duration::from_micros(sent));
                    waits.lock().unwrap().push(wait);
                }
                Ok(Value::Null)
            }
        });
    }
    let producer_settings = BrokerSettings {
        events_maxlen: if events {
            BrokerSettings::default().events_maxlen
        } else {
            0
        },
        ..BrokerSettings::default()
    };
    let producer = RedisBroker::connect(&redis.url(), producer_settings).await?;

    // Drain: the whole backlog is in the queue's stream before the node exists; the clock
    // starts when the node starts (its start-up is inside it) and stops when the queue is
    // empty. (Until 2026-12-05 the node ran while the producer enqueued and the clock started
    // after the last enqueue: it timed only the tail of the work.)
    let batch: Vec<Envelope> = (0..tasks)
        .map(|_| Envelope::new("rt_noop", "default"))
        .collect();
    let filling = Instant::now();
    for chunk in batch.chunks(500) {
        producer.enqueue(chunk.to_vec()).await?;
    }
    let enqueued = filling.elapsed();
    let started = Instant::now();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let node = runtime::node::Node::start(config, natives, listener).await?;
    let node = tokio::spawn(node.run(async move {
        let _ = stopped.await;
        "bench done"
    }));
    loop {
        let depth = producer.depth("default").await?;
        if depth.ready + depth.in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    let drain = tasks as f64 / took.as_secs_f64();
    // Every task must have succeeded: none retried (delayed) or dead-lettered.
    let depth = producer.depth("default").await?;
    if depth.delayed + depth.dead > 0 {
        return Err(format!(
            "drain: {} delayed, {} dead — tasks failed",
            depth.delayed, depth.dead
        )
        .into());
    }
    println!(
        "drain (observe {observe}): {tasks} no-op native tasks queued before the node started, \
         from its start to an empty queue in {took:?}: {drain:.0} tasks/s (the backlog was \
         written in {enqueued:?})"
    );

    // Latency at a steady offered rate.
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tick = tokio::time::interval(period);
    let mut calls = Vec::with_capacity((rate * seconds) as usize);
    for _ in 0..rate * seconds {
        tick.tick().await;
        let mut envelope = Envelope::new("stamp", "default");
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH)?;
        envelope
            .kwargs
            .insert("sent_us".into(), (now.as_micros() as u64).into());
        let call = Instant::now();
        producer.enqueue(vec![envelope]).await?;
        calls.push(call.elapsed());
    }
    calls.sort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut waits = waits.lock().unwrap().clone();
    waits.sort();
    let pct = |p: f64| waits[((waits.len() as f64 * p) as usize).min(waits.len() - 1)];
    println!(
        "latency at {rate} tasks/s offered for {seconds} s ({} tasks): enqueue→start p50 {:.2} ms, p99 {:.2} ms",
        waits.len(),
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0
    );
    println!(
        "  of which the producer's enqueue call (one pipeline round trip): p50 {:.2} ms",
        calls[calls.len() / 2].as_secs_f64() * 1000.0
    );
    let _ = stop.send(());
    let _ = node.await;
    Ok(())
}
