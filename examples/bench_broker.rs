//! Broker throughput on a private redis-server: batched enqueue, then drain with batched acks
//! and results (`ack_many`: one pipeline per reserve), in tasks per second. Medians of several rounds (the machine is shared and noisy).
//!
//! Run with: cargo run --release --example bench_broker [-- TASKS ROUNDS]

use std::time::Duration;

use actors::broker::redis::RedisBroker;
use actors::broker::{BrokerSettings, Envelope, TaskQueue};
use actors::test_util::RedisServer;
use serde_json::json;
use tokio::time::Instant;

const BATCH: usize = 500;
const RESERVE: usize = 256;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().map_or(Ok(50_000), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(5), |a| a.parse())?;
    let redis = RedisServer::start();
    let broker =
        std::sync::Arc::new(RedisBroker::connect(&redis.url(), BrokerSettings::default()).await?);
    println!(
        "{tasks} no-op envelopes, enqueue batches of {BATCH}, reserve {RESERVE} at a time, {rounds} rounds"
    );

    let (mut enq, mut drain) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let queue = format!("bench{round}");
        let started = Instant::now();
        for chunk in (0..tasks).collect::<Vec<_>>().chunks(BATCH) {
            let batch = chunk
                .iter()
                .map(|n| {
                    let mut env = Envelope::new("rt_noop", queue.as_str());
                    env.args = vec![json!(n)];
                    env
                })
                .collect();
            broker.enqueue(batch).await?;
        }
        enq.push(tasks as f64 / started.elapsed().as_secs_f64());

        let started = Instant::now();
        let mut done = 0;
        while done < tasks {
            let got = broker
                .reserve(&queue, "bench", RESERVE, Duration::ZERO)
                .await?;
            done += got.len();
            let results: Vec<_> = got.into_iter().map(|d| (d, json!(null))).collect();
            broker.ack_many(&results).await?;
        }
        drain.push(tasks as f64 / started.elapsed().as_secs_f64());
        println!(
            "round {round}: enqueue {:>8.0}/s  drain+ack {:>8.0}/s",
            enq[round], drain[round]
        );
    }
    println!(
        "median: enqueue {:.0} tasks/s, drain with acks and results {:.0} tasks/s",
        median(enq),
        median(drain)
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
