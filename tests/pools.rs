//! Process pools through the binary: a warm pool of fake voice agents, the pool actor killed
//! through the chaos route (it comes back with the same agents), a claim over HTTP, a task
//! with a `pool` handler, and a clean stop that leaves no agent behind.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::Node;
use serde_json::{Value, json};
use tokio::time::Instant;

/// The real interpreter, not a pyenv shim (children get a clean environment: a shim would find
/// no `PYENV_*` variables).
fn python() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn agent_script() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/fake_voice_agent.py")
        .display()
        .to_string()
}

/// Live processes whose command line holds `tag`.
fn tagged(tag: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(tag))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_pool_serves_claims_and_pool_tasks_and_stops_clean() {
    let tag = format!("pool-e2e-{}", std::process::id());
    let config = format!(
        r#"
[runtime]
shutdown_grace = "10s"

[http]
bind = "127.0.0.1:0"

[chaos]
enabled = true

[queues.voice]
concurrency = 2

[pools.voice]
command = "{python}"
args = ["{script}", "--startup-delay", "0.2", "--session", "0.3", "--tag", "{tag}"]
env = {{ PYTHONUNBUFFERED = "1" }}
min_idle = 2
max = 4
startup_timeout = "10s"
ready_pattern = "Pipeline ready"
assigned_pattern = "Connected to"
assign_timeout = "5s"
claim_timeout = "5s"
stop_timeout = "2s"

[tasks.start_voice_session]
queue = "voice"
handler = {{ kind = "pool", pool = "voice" }}
"#,
        python = python(),
        script = agent_script(),
    );
    let mut node = Node::start(&config, &[]);
    let at = Instant::now();
    loop {
        let pools = node.get_json("/pools").await;
        if pools["pools"]["voice"]["counts"]["idle"] == 2 {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(20),
            "pool never warm: {pools}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.actor("root/pools/voice").await.is_some());

    // Kill the pool actor: it restarts and re-adopts the agents it had — same pids, none
    // leaked, none replaced.
    let pids = |pools: &Value| -> Vec<u64> {
        let mut pids: Vec<u64> = pools["pools"]["voice"]["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["pid"].as_u64().unwrap())
            .collect();
        pids.sort();
        pids
    };
    let before = pids(&node.get_json("/pools").await);
    assert_eq!(before.len(), 2);
    let killed = reqwest::Client::new()
        .post(format!("{}/chaos/kill/root/pools/voice", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(killed.status(), 202);
    let at = Instant::now();
    loop {
        let actor = node.actor("root/pools/voice").await.unwrap();
        if actor["restarts"] == 1 && actor["status"] == "running" {
            break;
        }
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "pool actor not back: {actor}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pools = node.get_json("/pools").await;
    assert_eq!(pids(&pools), before, "{pools}");
    assert_eq!(pools["pools"]["voice"]["totals"]["adopted"], 2, "{pools}");
    assert_eq!(tagged(&tag), 2, "no agent leaked or duplicated");

    let claimed: Value = reqwest::Client::new()
        .post(format!("{}/pools/voice/claim", node.url))
        .json(&json!({ "room": "room-42" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        claimed["agent_id"].as_str().unwrap().starts_with("voice-"),
        "{claimed}"
    );
    assert!(claimed["pid"].as_u64().unwrap() > 0);

    let sent: Value = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&json!({ "task": "start_voice_session", "kwargs": { "room": "room-43" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = sent["id"].as_str().unwrap();
    let at = Instant::now();
    let record = loop {
        let response = node.get(&format!("/tasks/{id}")).await;
        if response.status() == 200 {
            break response.json::<Value>().await.unwrap();
        }
        assert!(
            at.elapsed() < Duration::from_secs(20),
            "the pool task never finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(record["state"], "succeeded", "{record}");
    assert!(
        record["result"]["agent_id"]
            .as_str()
            .unwrap()
            .starts_with("voice-")
    );

    // Two claims (HTTP, then the pool task), each timed; agents per state from the pool.
    let claims = r#"rt_pool_claim_seconds_count{pool="voice"}"#;
    assert_eq!(node.metric(claims).await, Some(2.0));
    let failures = r#"rt_pool_startup_failures_total{pool="voice"}"#;
    assert_eq!(node.metric(failures).await, Some(0.0));
    let mut live = 0.0;
    for state in ["starting", "idle", "assigned", "draining"] {
        let series = format!(r#"rt_pool_agents{{pool="voice",state="{state}"}}"#);
        live += node.metric(&series).await.expect("agents per state");
    }
    assert!((1.0..=4.0).contains(&live), "{live} live agents");

    let missing = reqwest::Client::new()
        .post(format!("{}/pools/nope/claim", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(15)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", node.log());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(tagged(&tag), 0, "agents left behind after the node stopped");
}
