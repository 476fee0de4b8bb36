//! Child processes through the binary: whatever an `exec` command prints, the node's memory
//! stays flat and the task's outcome is clear; and when the node is SIGKILLed, its `exec`
//! process trees and assigned pool agents die with it (within 1 s, grandchildren included) and
//! finish no side effect — also when the watchdog that kills them was killed too, in which case
//! the next node to start on the machine kills what was left.

use std::path::Path;
use std::time::Duration;

use crate::common::{Node, Scratch, eventually};
use actors::test_util::RedisServer;
use serde_json::{Value, json};
use tokio::time::Instant;

/// One line of a process's `/proc/<pid>/status`, in kB (`VmHWM`: the peak resident memory).
fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {status}"))
}

async fn enqueue(node: &Node, body: Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    answer["id"].as_str().unwrap().to_string()
}

const OUTPUT_CONFIG: &str = r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[queues.default]
concurrency = 2

[tasks.huge_result]
handler = { kind = "exec", command = "/bin/sh", args = ["-c", "head -c 200000000 /dev/zero | tr '\\0' x; echo"] }
max_retries = 0
time_limit = "60s"

[tasks.huge_log_then_result]
handler = { kind = "exec", command = "/bin/sh", args = ["-c", "head -c 200000000 /dev/zero | tr '\\0' x; echo; head -c 100000000 /dev/zero | tr '\\0' y >&2; echo >&2; seq 1 200000; echo '{\"ok\": true}'"] }
max_retries = 0
time_limit = "60s"

[tasks.huge_error]
handler = { kind = "exec", command = "/bin/sh", args = ["-c", "head -c 100000000 /dev/zero | tr '\\0' z >&2; exit 3"] }
max_retries = 0
time_limit = "60s"

[tasks.binary_output]
handler = { kind = "exec", command = "/bin/sh", args = ["-c", "printf 'caf\\351\\n' >&2; head -c 3000000 /dev/urandom; echo; echo '\"still read\"'"] }
max_retries = 0
time_limit = "60s"
"#;

/// At most the first 300 characters of `value` (a record may hold a huge result).
fn short(value: &Value) -> String {
    value.to_string().chars().take(300).collect()
}

/// A child printing 200 MB on one line, 100 MB on one stderr line and 200,000 short lines
/// leaves the node's peak memory where it was; an over-long result line is a permanent error
/// naming `broker.max_entry_bytes`; an over-long stderr line reaches the error truncated with a
/// marker; invalid UTF-8 and binary output are read to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_printing_hundreds_of_megabytes_leaves_the_node_memory_flat() {
    let node = Node::start(OUTPUT_CONFIG, &[]);
    // Warm up the paths a task takes (the first task allocates pools, buffers, log state).
    let warm = enqueue(&node, json!({ "task": "binary_output" })).await;
    let warm = node.until_ended(&warm, Duration::from_secs(60)).await;
    let before = status_kb(node.pid(), "VmHWM");

    let huge = enqueue(&node, json!({ "task": "huge_result" })).await;
    let mixed = enqueue(&node, json!({ "task": "huge_log_then_result" })).await;
    let huge = node.until_ended(&huge, Duration::from_secs(60)).await;
    let mixed = node.until_ended(&mixed, Duration::from_secs(60)).await;
    let failed = enqueue(&node, json!({ "task": "huge_error" })).await;
    let failed = node.until_ended(&failed, Duration::from_secs(60)).await;
    let after = status_kb(node.pid(), "VmHWM");
    let grown_mb = after.saturating_sub(before) / 1024;
    eprintln!("peak memory: {before} kB before, {after} kB after");
    assert!(
        grown_mb < 16,
        "peak memory grew by {grown_mb} MB ({before} kB → {after} kB)"
    );

    assert_eq!(warm["state"], "succeeded", "{}", short(&warm));
    assert_eq!(warm["result"], "still read", "{}", short(&warm));
    assert!(
        node.log().contains("caf\u{FFFD}"),
        "invalid UTF-8 was not logged"
    );
    assert_eq!(huge["state"], "dead", "{}", short(&huge));
    let error = huge["error"].as_str().unwrap();
    assert!(
        error.contains("result line of 200000000 bytes")
            && error.contains("over the broker's max_entry_bytes of 1048576"),
        "{error}"
    );
    assert_eq!(mixed["state"], "succeeded", "{}", short(&mixed));
    assert_eq!(mixed["result"], json!({"ok": true}));
    assert_eq!(failed["state"], "dead", "{}", short(&failed));
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("/bin/sh exited 3: zzzz")
            && error.ends_with("[truncated: 100000000 bytes in all]"),
        "{}…{}",
        &error[..error.len().min(80)],
        &error[error.len().saturating_sub(80)..]
    );
    assert!(
        error.len() < 20_000,
        "the error holds {} bytes",
        error.len()
    );
    // The log got each line once, cut with a marker (not 200 MB of x).
    let log = node.log();
    assert!(
        log.contains("[truncated: 100000000 bytes in all]"),
        "no truncated line in the log"
    );
    assert!(log.len() < 5_000_000, "the log holds {} bytes", log.len());
}

/// `(pid, pgid, state)` of every process, from `/proc/<pid>/stat`.
fn processes() -> Vec<(u32, u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(pgid)) = (
            fields.first().and_then(|s| s.chars().next()),
            fields.get(2).and_then(|p| p.parse().ok()),
        ) else {
            continue;
        };
        out.push((pid, pgid, state));
    }
    out
}

/// The live (not zombie) processes among `pids` or in the groups `pgids`.
fn alive(pids: &[u32], pgids: &[u32]) -> Vec<(u32, u32, char)> {
    processes()
        .into_iter()
        .filter(|(pid, pgid, state)| *state != 'Z' && (pids.contains(pid) || pgids.contains(pgid)))
        .collect()
}

/// The pid of the node's watchdog (its child running `sh -c … rt-watchdog`).
fn watchdog_of(node: u32) -> Option<u32> {
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if ppid == Some(node) && String::from_utf8_lossy(&cmdline).contains("rt-watchdog") {
            return Some(pid);
        }
    }
    None
}

fn orphan_config(dir: &Path) -> String {
    let dir = dir.display();
    format!(
        r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[broker]
lease = "60s"

[queues.default]
concurrency = 4

[tasks.write_report]
handler = {{ kind = "exec", command = "/bin/sh", args = ["-c", "read -r envelope; (sleep 2; touch {dir}/task-$$) & echo $$ $! > {dir}/pids-$$.tmp; mv {dir}/pids-$$.tmp {dir}/pids-$$; sleep 3; echo done"] }}
time_limit = "30s"

[pools.voice]
command = "/bin/sh"
args = ["-c", "echo READY; read -r assignment; (sleep 2; touch {dir}/agent-$$) & echo $$ $! > {dir}/pids-$$.tmp; mv {dir}/pids-$$.tmp {dir}/pids-$$; echo GOT; sleep 3"]
min_idle = 2
max = 2
startup_timeout = "5s"
ready_pattern = "^READY$"
assigned_pattern = "^GOT$"
"#
    )
}

/// The `(leader, grandchild)` pids every running child wrote down.
fn written_pids(dir: &Path) -> Vec<(u32, u32)> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.starts_with("pids-") && !name.ends_with(".tmp")
        })
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let mut ids = text.split_whitespace().map(|p| p.parse::<u32>().unwrap());
            (ids.next().unwrap(), ids.next().unwrap())
        })
        .collect()
}

/// Side-effect files (`task-*`, `agent-*`) in `dir`.
fn side_effects(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|name| name.starts_with("task-") || name.starts_with("agent-"))
        .collect()
}

/// Starts a node, runs four `exec` tasks and claims both pool agents — each child with a
/// grandchild in its group that touches a file 2 s later — and returns once all six wrote
/// their pids: `(node, leaders, grandchildren)`.
async fn busy_node(config: &str, redis: &RedisServer, dir: &Path) -> (Node, Vec<u32>, Vec<u32>) {
    // The watchdog's ledger of children in this test's own directory: a node of another
    // test starting meanwhile must not kill (as leftovers of a dead node) what this test
    // wants to see orphaned.
    let ledger = dir.display().to_string();
    let node = Node::start(
        config,
        &[
            ("RT_BROKER_URL", &redis.url()),
            ("XDG_RUNTIME_DIR", &ledger),
        ],
    );
    eventually("two idle agents", Duration::from_secs(10), async || {
        let voice = node.get_json("/pools").await["pools"]["voice"].clone();
        if voice["counts"]["idle"] == 2 {
            Ok(())
        } else {
            Err(voice)
        }
    })
    .await;
    for n in 0..4 {
        enqueue(&node, json!({ "task": "write_report", "args": [n] })).await;
    }
    for _ in 0..2 {
        let response = reqwest::Client::new()
            .post(format!("{}/pools/voice/claim", node.url))
            .json(&json!({ "room": "r" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", node.log());
    }
    let pids = eventually(
        "six children running",
        Duration::from_millis(1500),
        async || {
            let pids = written_pids(dir);
            if pids.len() == 6 {
                Ok(pids)
            } else {
                Err(format!("{pids:?}"))
            }
        },
    )
    .await;
    let (leaders, grandchildren) = pids.into_iter().unzip();
    (node, leaders, grandchildren)
}

/// Waits up to `limit` for every process of `leaders` (and their groups) and `others` to be
/// gone; returns what is still alive then.
async fn gone_within(leaders: &[u32], others: &[u32], limit: Duration) -> Vec<(u32, u32, char)> {
    let pids: Vec<u32> = leaders.iter().chain(others).copied().collect();
    let at = Instant::now();
    loop {
        let left = alive(&pids, leaders);
        if left.is_empty() || at.elapsed() > limit {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_die_with_a_sigkilled_node_and_do_no_work_after_it() {
    let redis = RedisServer::start();
    let scratch = Scratch::new();
    let config = orphan_config(scratch.path());
    let (mut node, leaders, grandchildren) = busy_node(&config, &redis, scratch.path()).await;
    let watchdog = watchdog_of(node.pid());

    node.signal("KILL");
    let killed = Instant::now();
    node.wait_exit(Duration::from_secs(5))
        .expect("the node exits");
    let left = gone_within(&leaders, &grandchildren, Duration::from_secs(1)).await;
    assert!(
        left.is_empty(),
        "alive 1 s after the node's SIGKILL: {left:?} (leaders {leaders:?}, grandchildren {grandchildren:?})"
    );
    eprintln!("all children gone {:?} after the SIGKILL", killed.elapsed());
    // The grandchildren would have touched their files 2 s after starting.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(side_effects(scratch.path()), Vec::<String>::new());
    let watchdog = watchdog.expect("the node had a watchdog");
    assert!(
        alive(&[watchdog], &[]).is_empty(),
        "the watchdog outlived its node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_node_kills_what_a_node_and_its_watchdog_left() {
    let redis = RedisServer::start();
    let scratch = Scratch::new();
    let config = orphan_config(scratch.path());
    let (mut node, leaders, grandchildren) = busy_node(&config, &redis, scratch.path()).await;
    let watchdog = watchdog_of(node.pid()).expect("the node has a watchdog");

    // Both die. The node is stopped first so that it cannot replace its watchdog (a stopped
    // watchdog would not do: orphaned, its group gets SIGHUP and SIGCONT and it does its work).
    let signal = |pid: u32, signal| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal).unwrap()
    };
    signal(node.pid(), nix::sys::signal::Signal::SIGSTOP);
    signal(watchdog, nix::sys::signal::Signal::SIGKILL);
    node.signal("KILL");
    node.wait_exit(Duration::from_secs(5))
        .expect("the node exits");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let orphans = alive(&leaders, &leaders);
    assert!(!orphans.is_empty(), "the children outlived both");

    // A new node on the machine (here: the same config and ledger, restarted) kills them at
    // start.
    let started = Instant::now();
    let ledger = scratch.path().display().to_string();
    let _next = Node::start(
        &config,
        &[
            ("RT_BROKER_URL", &redis.url()),
            ("XDG_RUNTIME_DIR", &ledger),
        ],
    );
    let left = gone_within(&leaders, &grandchildren, Duration::from_secs(1)).await;
    assert!(
        left.is_empty(),
        "alive after the next node started ({:?}): {left:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(side_effects(scratch.path()), Vec::<String>::new());
}
