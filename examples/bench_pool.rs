//! Claim latency of a warm process pool against a cold spawn, with the fake voice agent
//! (`examples/fake_voice_agent.py`, which logs its ready line `STARTUP` seconds after it
//! starts, like the real bot's ~1.5 s of model loading).
//!
//! - warm: `min_idle = 3`; before each claim the pool is back to 3 idle agents, so the claim
//!   takes an idle agent, writes the assignment and waits for `Connected to`;
//! - cold: `min_idle = 0` (what the Celery version did per session): the claim spawns the
//!   agent, waits for its ready line, then assigns it.
//!
//! Run with: cargo run --release --example bench_pool [-- WARM_CLAIMS COLD_CLAIMS STARTUP]
//! (defaults 50, 10, 1.5; needs python3 on PATH). It also prints the three slowest claims with
//! their position in the run; `BENCH_HEALTH_MS` sets the pool's health-check period (500 ms).
//! `BENCH_SESSION` sets the agents' session length in seconds (default 0: each claimed agent
//! exits right after "Connected to", inside the next claims' window — the harshest case).
//! `RUST_LOG=debug` traces every claim (the bench's claim/claimed lines, the agent monitor's
//! "assignment written"/"confirmed", each agent output line) on stderr.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use actors::pool::{Pool, PoolActor, PoolArgs, PoolSettings, PoolSpec};
use actors::supervisor::{
    Backoff, ChildSpec, Intensity, Restart, Strategy, SupervisorSpec, start_root,
};
use actors::tree::Tree;
use regex::Regex;
use serde_json::json;
use tokio::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // RUST_LOG=debug traces each claim (bench and agent lines, microsecond timestamps).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let mut args = std::env::args().skip(1);
    let warm_claims: usize = args.next().map_or(Ok(50), |a| a.parse())?;
    let cold_claims: usize = args.next().map_or(Ok(10), |a| a.parse())?;
    let startup: f64 = args.next().map_or(Ok(1.5), |a| a.parse())?;

    let warm = measure("warm", 3, warm_claims, startup).await?;
    let cold = measure("cold", 0, cold_claims, startup).await?;
    println!(
        "cold/warm p50 ratio: {:.0}x",
        cold.as_secs_f64() / warm.as_secs_f64()
    );
    Ok(())
}

/// Runs `claims` claims against a pool keeping `min_idle` agents warm, waiting before each
/// claim until the pool is back at `min_idle` idle agents; prints p50/p99, returns p50.
async fn measure(
    label: &str,
    min_idle: usize,
    claims: usize,
    startup: f64,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let pool =
        Pool::new(PoolSpec::try_new(settings(min_idle, startup)?).map_err(|e| format!("{e:?}"))?);
    let tree = Tree::new();
    let child = {
        let pool = pool.clone();
        ChildSpec::new("voice", "pool", Restart::Permanent, move |node| {
            (
                PoolActor,
                PoolArgs {
                    node,
                    pool: pool.clone(),
                },
            )
        })
    };
    let spec = SupervisorSpec {
        strategy: Strategy::OneForOne,
        intensity: Intensity::try_new(5, Duration::from_secs(10))?,
        backoff: Backoff::default(),
        shutdown_timeout: Duration::from_secs(10),
        children: vec![child],
    };
    let (root, handle) = start_root(&Arc::clone(&tree), "root", spec).await?;

    let mut latencies = Vec::with_capacity(claims);
    for n in 0..claims {
        let ready_by = Instant::now() + Duration::from_secs(30);
        while pool.snapshot()["counts"]["idle"].as_u64() != Some(min_idle as u64) {
            if Instant::now() > ready_by {
                return Err(format!("{label}: the pool never reached {min_idle} idle").into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        tracing::debug!(n, "claim");
        pool.claim(json!({"room": format!("bench-{n}")})).await?;
        latencies.push(t.elapsed());
        tracing::debug!(n, took_us = t.elapsed().as_micros() as u64, "claimed");
    }
    let mut slowest: Vec<(usize, Duration)> = latencies.iter().copied().enumerate().collect();
    slowest.sort_by_key(|(_, took)| std::cmp::Reverse(*took));
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    let (p50, p99) = (pct(0.50), pct(0.99));
    println!(
        "{label}: {claims} claims (min_idle {min_idle}, agent start-up {startup} s): p50 {:.2} ms, p99 {:.2} ms",
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0
    );
    let slowest: Vec<String> = slowest
        .iter()
        .take(3)
        .map(|(n, took)| format!("#{n} {:.2} ms", took.as_secs_f64() * 1000.0))
        .collect();
    println!(
        "  slowest claims: {}; assignments retried on another agent: {}",
        slowest.join(", "),
        pool.snapshot()["totals"]["assign_failures"]
    );
    root.stop(Some("bench done".into()));
    let _ = handle.await;
    pool.shutdown().await;
    Ok(p50)
}

fn settings(min_idle: usize, startup: f64) -> Result<PoolSettings, Box<dyn std::error::Error>> {
    // The interpreter itself, not a pyenv shim (agents get a clean environment).
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()?;
    let python = String::from_utf8(python.stdout)?.trim().to_string();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/fake_voice_agent.py");
    let mut s = PoolSettings::new("voice", &python, Regex::new("Pipeline ready")?);
    s.args = vec![
        script.display().to_string(),
        "--startup-delay".into(),
        startup.to_string(),
        "--session".into(),
        std::env::var("BENCH_SESSION").unwrap_or_else(|_| "0".into()),
    ];
    s.min_idle = min_idle;
    s.max = 8;
    s.startup_timeout = Duration::from_secs(30);
    s.assigned_pattern = Some(Regex::new("Connected to")?);
    s.claim_timeout = Duration::from_secs(30);
    s.health_every = std::env::var("BENCH_HEALTH_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_millis(500), Duration::from_millis);
    Ok(s)
}
