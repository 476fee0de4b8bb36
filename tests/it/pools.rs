//! Process pools through the binary: a warm pool of fake voice agents, the pool actor killed
//! through the chaos route (it comes back with the same agents), a claim over HTTP, a task
//! with a `pool` handler, and a clean stop that leaves no agent behind.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use crate::common::{Node, eventually};
use serde_json::{Value, json};

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
        python = common::python3(),
        script = agent_script(),
    );
    let mut node = Node::start(&config, &[]);
    eventually("the pool warm", Duration::from_secs(20), async || {
        let pools = node.get_json("/pools").await;
        if pools["pools"]["voice"]["counts"]["idle"] == 2 {
            Ok(())
        } else {
            Err(pools)
        }
    })
    .await;
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
    eventually("the pool actor back", Duration::from_secs(10), async || {
        let actor = node.actor("root/pools/voice").await.unwrap();
        if actor["restarts"] == 1 && actor["status"] == "running" {
            Ok(())
        } else {
            Err(actor)
        }
    })
    .await;
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
    let record = node.until_ended(id, Duration::from_secs(20)).await;
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

/// Runs `runtime ARGS` against `node` with `RT_ADMIN_TOKEN` = `token`.
fn cli(node: &Node, args: &[&str], token: &str) -> (bool, String, String) {
    let out = std::process::Command::new(common::binary())
        .args(args)
        .env("RT_URL", &node.url)
        .env("RT_ADMIN_TOKEN", token)
        .output()
        .expect("run runtime");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_pool_is_reset_over_http_and_the_cli_once_its_cause_is_fixed() {
    let scratch = common::Scratch::new();
    let flag = scratch.path().join("fixed");
    // Fails to start until the flag file exists, then is ready and waits to be stopped.
    let agent = scratch.write(
        "agent.sh",
        "#!/bin/sh\nif [ -f \"$FLAG\" ]; then echo 'Pipeline ready'; exec /bin/sleep 600; fi\n\
         echo 'cannot load the model' >&2\nexit 1\n",
    );
    let config = format!(
        r#"
[http]
bind = "127.0.0.1:0"
admin_token_env = "POOL_TEST_TOKEN"

[pools.voice]
command = "/bin/sh"
args = ["{agent}"]
env = {{ FLAG = "{flag}" }}
min_idle = 2
max = 3
startup_timeout = "5s"
ready_pattern = "Pipeline ready"
stop_timeout = "1s"
startretries = 2
"#,
        agent = agent.display(),
        flag = flag.display(),
    );
    let token = "p00l-t0k3n";
    let node = Node::start(&config, &[("POOL_TEST_TOKEN", token)]);
    let until = |what: &'static str, done: fn(&Value) -> bool| {
        let node = &node;
        async move {
            eventually(what, Duration::from_secs(20), async || {
                let pools = node.get_json("/pools").await;
                let voice = pools["pools"]["voice"].clone();
                if done(&voice) { Ok(voice) } else { Err(pools) }
            })
            .await
        }
    };
    let fatal = until("fatal", |p| p["health"] == "fatal").await;
    assert!(
        fatal["reason"]
            .as_str()
            .unwrap()
            .contains("exited before ready"),
        "{fatal}"
    );
    // Fatal stays fatal: nothing starts by itself, and /health names the pool.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let health = node.get("/health").await;
    assert_eq!(health.status(), 503);
    let health = health.text().await.unwrap();
    assert!(
        health.contains("root/pools/voice") && health.contains("fatal"),
        "{health}"
    );
    let still = node.get_json("/pools").await["pools"]["voice"].clone();
    assert_eq!(still["health"], "fatal");
    assert_eq!(
        still["totals"]["spawned"], fatal["totals"]["spawned"],
        "{still}"
    );

    std::fs::write(&flag, "").unwrap();
    // The reset is an operator's action: it needs the token; an unknown pool is a 404.
    let client = reqwest::Client::new();
    let reset = |name: &str, token: Option<&str>| {
        let mut request = client.post(format!("{}/pools/{name}/reset", node.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(reset("voice", None).await.unwrap().status(), 401);
    let missing = reset("nope", Some(token)).await.unwrap();
    assert_eq!(missing.status(), 404);
    let missing: Value = missing.json().await.unwrap();
    assert_eq!(missing["error"], "no such pool `nope`");

    let (ok, out, err) = cli(&node, &["pools", "reset", "voice"], token);
    assert!(ok, "{out}{err}");
    assert!(
        out.starts_with("pool voice was fatal (2 consecutive startup failures"),
        "{out}"
    );
    assert!(out.contains("it starts agents again"), "{out}");
    let healthy = until("idle again", |p| p["counts"]["idle"] == 2).await;
    assert_eq!(healthy["health"], "ok", "{healthy}");
    assert_eq!(healthy["consecutive_startup_failures"], 0);
    eventually("/health healthy", Duration::from_secs(5), async || {
        let status = node.get("/health").await.status();
        if status == 200 { Ok(()) } else { Err(status) }
    })
    .await;

    // A healthy pool: nothing to reset, nothing restarted.
    let again = reset("voice", Some(token)).await.unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["reset"], false, "{again}");
    assert_eq!(again["was"], "ok", "{again}");
    assert_eq!(again["state"]["counts"]["idle"], 2, "{again}");
    let (ok, out, _) = cli(&node, &["pools", "reset", "voice"], token);
    assert!(ok);
    assert_eq!(out.trim(), "pool voice is healthy: nothing to reset");
}
