//! The Celery bridge end to end with real Python Celery (5.x, installed into
//! `target/py-venv`, made by `tests/run`; `RT_TEST_PYTHON` overrides the interpreter) on a private
//! redis-server: `.delay()` → the runtime runs it → `AsyncResult.get()`; failures, countdown,
//! time limits and `track_started`, malformed messages, `link_error`, a chain Python → runtime → Python worker, and a kill of the
//! bridge actor while 1,000 messages flow. The Python side is `tests/celery/app.py`.
//!
//! Without the venv: the tests fail under CI (`CI` set) and are skipped with a message
//! otherwise.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{self, Node};
use actors::test_util::RedisServer;
use serde_json::Value;
use tokio::time::Instant;

fn config(extra: &str) -> String {
    format!(
        r#"
[runtime]
shutdown_grace = "3s"

[http]
bind = "127.0.0.1:0"

[broker]
lease = "5s"

[queues.default]
concurrency = 8
prefetch = 8

[tasks.rt_add]
handler = {{ kind = "native" }}

[tasks.rt_fail]
handler = {{ kind = "native" }}
max_retries = 0

[tasks.rt_echo]
handler = {{ kind = "native" }}

[tasks.rt_noop]
handler = {{ kind = "native" }}

[tasks.sleep5]
handler = {{ kind = "exec", command = "/bin/sleep", args = ["5"] }}
max_retries = 0

[celery]
queues = ["celery"]
default_queue = "py"
poll = "20ms"

[celery.tasks."tasks.add"]
task = "rt_add"
track_started = true
[celery.tasks."tasks.fail"]
task = "rt_fail"
[celery.tasks."tasks.sleep"]
task = "sleep5"
track_started = true
[celery.tasks."tasks.noop"]
task = "rt_noop"
[celery.tasks."tasks.on_error"]
task = "rt_echo"
{extra}
"#
    )
}

/// The venv's python, or `None` (skip) outside CI; panics under CI.
fn python() -> Option<PathBuf> {
    common::venv_python("celery, redis")
}

fn app_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/celery")
}

/// Runs `app.py SCENARIO` and returns its last JSON line.
fn scenario(python: &PathBuf, redis: &RedisServer, name: &str) -> Value {
    scenario_with(python, redis, name, &[])
}

/// [`scenario`] with more environment variables (`RT_URL`: the node's API).
fn scenario_with(
    python: &PathBuf,
    redis: &RedisServer,
    name: &str,
    envs: &[(&str, &str)],
) -> Value {
    let output = Command::new(python)
        .arg("app.py")
        .arg(name)
        .current_dir(app_dir())
        .env("CELERY_BROKER", redis.url())
        .envs(envs.iter().copied())
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "scenario {name} failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("scenario {name}: {e}: {stdout}"))
}

/// Starts `app.py flood`: Python sends `n` `tasks.noop` messages, then waits for their results.
fn flood(python: &PathBuf, redis: &RedisServer, n: usize) -> std::process::Child {
    Command::new(python)
        .arg("app.py")
        .arg("flood")
        .current_dir(app_dir())
        .env("CELERY_BROKER", redis.url())
        .env("FLOOD", n.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python")
}

/// The flood's verdict: `{done, min_runs, max_runs, left_in_kombu}`.
async fn flood_outcome(flood: std::process::Child) -> Value {
    let output = tokio::task::spawn_blocking(move || flood.wait_with_output())
        .await
        .unwrap()
        .expect("python output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "flood failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

fn start(redis: &RedisServer, extra: &str) -> Node {
    Node::start(&config(extra), &[("RT_BROKER_URL", redis.url().as_str())])
}

#[tokio::test]
async fn delay_runs_on_the_runtime_and_get_returns_the_result() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let node = start(&redis, "");
    let out = scenario(&python, &redis, "add");
    assert_eq!(out["value"], 5, "{out}");
    assert_eq!(out["state"], "SUCCESS");
    // The bridge is a permanent actor in the tree, with its counters.
    let bridge = node
        .actor("root/celery/celery")
        .await
        .expect("bridge in /actors");
    assert_eq!(bridge["kind"], "celery_bridge", "{bridge}");
    assert_eq!(bridge["snapshot"]["moved"], 1, "{bridge}");
    // It waits (BLMOVE) rather than polls, and shows its rate and take latency.
    assert!(bridge["snapshot"]["blocks"].as_u64() >= Some(1), "{bridge}");
    assert!(bridge["snapshot"]["moved_per_s"].is_number(), "{bridge}");
    assert!(
        bridge["snapshot"]["take_ms"]["samples"].as_u64() <= Some(1),
        "{bridge}"
    );
    let metrics = node.get("/metrics").await.text().await.unwrap();
    assert!(
        metrics.contains("rt_celery_moved_total{kombu_queue=\"celery\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rt_celery_take_seconds_count{kombu_queue=\"celery\"}"),
        "{metrics}"
    );

    let out = scenario(&python, &redis, "fail");
    assert_eq!(out["type"], "RuntimeError", "{out}");
    assert!(
        out["message"]
            .as_str()
            .unwrap()
            .contains("boom from the handler"),
        "{out}"
    );
    assert_eq!(out["state"], "FAILURE");
}

#[tokio::test]
async fn malformed_and_unmapped_messages_are_dead_lettered_with_the_reason() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let node = start(&redis, "");
    let out = scenario(&python, &redis, "malformed");
    // An undecodable body: dead-lettered, and `.get()` raises instead of waiting forever.
    assert_eq!(out["type"], "RuntimeError", "{out}");
    assert!(
        out["message"].as_str().unwrap().contains("not base64"),
        "{out}"
    );
    // Three letters, or what there is after 10 s (the assertions below name what is missing).
    let dead = common::try_eventually(Duration::from_secs(10), async || {
        let dead = node.get_json("/dlq/default").await.to_string();
        if dead.matches("\"reason\"").count() >= 3 {
            Ok(dead)
        } else {
            Err(dead)
        }
    })
    .await
    .unwrap_or_else(|dead| dead);
    assert!(dead.contains("celery: not a kombu message"), "{dead}");
    assert!(
        dead.contains("celery: task `tasks.unknown` is not mapped to a runtime task"),
        "{dead}"
    );
    assert!(dead.contains("celery: body is not base64"), "{dead}");
    let bridge = node.actor("root/celery/celery").await.unwrap();
    assert_eq!(bridge["snapshot"]["dead_lettered"], 2, "{bridge}");
    // An unmapped task and an expired one: FAILURE with the reason, not a `.get()` timeout.
    assert_eq!(out["unmapped"]["type"], "RuntimeError", "{out}");
    assert!(
        out["unmapped"]["message"]
            .as_str()
            .unwrap()
            .contains("is not mapped to a runtime task"),
        "{out}"
    );
    assert_eq!(out["expired"]["type"], "RuntimeError", "{out}");
    assert!(
        out["expired"]["message"]
            .as_str()
            .unwrap()
            .contains("expired at"),
        "{out}"
    );
}

#[tokio::test]
async fn countdown_waits_and_time_limit_kills() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let _node = start(&redis, "");
    let out = scenario(&python, &redis, "countdown");
    assert_eq!(out["value"], 2, "{out}");
    let started = out["started_after"].as_array().unwrap();
    assert_eq!(started.len(), 1, "started exactly once: {out}");
    assert!(
        started[0].as_f64().unwrap() >= 1.99,
        "started too early: {out}"
    );

    let out = scenario(&python, &redis, "time_limit");
    assert_eq!(out["type"], "TimeLimitExceeded", "{out}");
    // track_started: STARTED while the command sleeps.
    assert_eq!(out["state_while_running"], "STARTED", "{out}");
    assert_eq!(out["state"], "FAILURE", "{out}");
    assert!(
        out["elapsed"].as_f64().unwrap() < 4.5,
        "not killed at 1 s: {out}"
    );
}

/// A Celery task revoked through the runtime before it ran: it never runs, and its result is
/// Celery's `REVOKED` (`.get()` raises `TaskRevokedError`).
#[tokio::test]
async fn a_celery_task_revoked_through_the_runtime_is_revoked_for_celery() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let node = start(&redis, "");
    let out = scenario_with(&python, &redis, "revoked", &[("RT_URL", &node.url)]);
    assert_eq!(out["type"], "TaskRevokedError", "{out}");
    assert_eq!(out["state"], "REVOKED", "{out}");
    assert!(
        ["queued", "scheduled"].contains(&out["answer"]["was"].as_str().unwrap_or("")),
        "{out}"
    );
    assert_eq!(out["ran"], 0, "{out}");
}

#[tokio::test]
async fn link_error_fires_once_on_failure() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let _node = start(&redis, "");
    let out = scenario(&python, &redis, "link_error");
    assert_eq!(out["type"], "RuntimeError", "{out}");
    // The errback (run by the runtime's rt_echo) got the failed task's id.
    assert_eq!(out["errback"]["args"][0], out["failed_id"], "{out}");
    assert_eq!(out["errback_runs"], 1, "{out}");
}

#[tokio::test]
async fn a_chain_goes_python_to_runtime_to_a_python_worker() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let node = start(&redis, "");
    let out = scenario(&python, &redis, "chain");
    // add(2, 3) on the runtime, mul(5, 10) on the Celery worker consuming `py`.
    assert_eq!(out["value"], 50, "{out}\n{}", node.log());
    assert_eq!(out["parent"], 5, "{out}");
    // The worker and the runtime share the broker without interfering.
    assert_eq!(out["python_only"], 42, "{out}");
}

#[tokio::test]
async fn killing_the_bridge_while_1000_messages_flow_loses_and_repeats_none() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let node = start(&redis, "[chaos]\nenabled = true\n");
    let flood = flood(&python, &redis, 1000);
    let end = Instant::now() + Duration::from_secs(3);
    let mut kills = 0;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(150)).await;
        if node
            .post("/chaos/kill/root/celery/celery", None)
            .await
            .status()
            .is_success()
        {
            kills += 1;
        }
    }
    let out = flood_outcome(flood).await;
    assert!(kills >= 5, "the bridge was killed only {kills} times");
    assert_eq!(out["done"], 1000, "{out}");
    assert_eq!(out["min_runs"], 1, "a message was lost: {out}");
    assert_eq!(out["max_runs"], 1, "a message ran twice: {out}");
    assert_eq!(out["left_in_kombu"], 0, "{out}");
    // A bridge restarted by the last kill shows its snapshot once it published one.
    let mut bridge = serde_json::Value::Null;
    crate::common::eventually(
        "the bridge's snapshot",
        Duration::from_secs(10),
        async || {
            bridge = node.actor("root/celery/celery").await.unwrap_or_default();
            if bridge["snapshot"]["moved"].is_u64() {
                Ok(())
            } else {
                Err(bridge.to_string())
            }
        },
    )
    .await;
    // A batch whose script ran while its actor was killed is moved but not counted (the
    // reply was lost with the actor): the counter is a lower bound.
    let moved = bridge["snapshot"]["moved"].as_u64().unwrap();
    assert!(moved > 0 && moved <= 1000, "{bridge}");
    assert!(bridge["restarts"].as_u64().unwrap() >= 1, "{bridge}");
}

#[tokio::test]
async fn sigkilling_the_node_while_python_produces_loses_no_message() {
    let Some(python) = python() else { return };
    let redis = RedisServer::start();
    let mut node = start(&redis, "");
    let flood = flood(&python, &redis, 600);
    // Kill the node while Python is still sending and the bridge is moving, then start a new
    // one on the same Redis: what the dead node held comes back after its lease (5 s).
    tokio::time::sleep(Duration::from_millis(300)).await;
    node.signal("KILL");
    assert!(node.wait_exit(Duration::from_secs(5)).is_some());
    let _node = start(&redis, "");
    let out = flood_outcome(flood).await;
    eprintln!("node SIGKILL during a Celery flood: {out}");
    assert_eq!(out["done"], 600, "{out}");
    assert_eq!(out["min_runs"], 1, "a message was lost: {out}");
    // A re-run is possible only for a task the dead node had started but not acked.
    assert!(out["max_runs"].as_u64().unwrap() <= 2, "{out}");
    assert_eq!(out["left_in_kombu"], 0, "{out}");
}

/// A Celery protocol v2 message for `tasks.noop` with the task id `id`, as kombu stores it.
fn kombu_message(id: &str) -> String {
    use base64::Engine;
    let body = serde_json::json!([[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]);
    serde_json::json!({
        "body": base64::engine::general_purpose::STANDARD.encode(body.to_string()),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": { "lang": "py", "task": "tasks.noop", "id": id, "retries": 0,
                     "root_id": id, "parent_id": null, "eta": null, "expires": null },
        "properties": { "body_encoding": "base64", "delivery_tag": id },
    })
    .to_string()
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Waits until the bridge's snapshot satisfies `done`.
async fn bridge_until(node: &Node, done: impl Fn(&Value) -> bool) -> Value {
    common::eventually(
        "the bridge's snapshot",
        Duration::from_secs(10),
        async || {
            let snapshot = node.actor("root/celery/celery").await.unwrap()["snapshot"].clone();
            if done(&snapshot) {
                Ok(snapshot)
            } else {
                Err(snapshot)
            }
        },
    )
    .await
}

/// Celery's task id is kept and follows the runtime's id rule (no Python needed): the same
/// message published twice runs once (the second is dropped as a duplicate and counted), an
/// id with a control character is dead-lettered with the reason, a good one runs.
#[tokio::test]
async fn celery_ids_are_checked_and_a_message_published_twice_runs_once() {
    let redis = RedisServer::start();
    let node = start(&redis, "");
    let mut conn = redis_conn(&redis).await;
    for id in ["dup-1", "dup-1", "bad\u{1}id", "ok-1"] {
        let _: () = redis::cmd("LPUSH")
            .arg("celery")
            .arg(kombu_message(id))
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let bridge = bridge_until(&node, |s| s["moved"] == 2 && s["duplicates"] == 1).await;
    assert_eq!(bridge["dead_lettered"], 1, "{bridge}");
    for id in ["dup-1", "ok-1"] {
        node.until_state(id, &["succeeded"], Duration::from_secs(10))
            .await;
    }
    // Ran once: one `succeeded` event for dup-1.
    let events = common::stream_events(&mut conn, "rt:events").await;
    let succeeded = events
        .iter()
        .filter(|(kind, id)| kind == "succeeded" && id.as_deref() == Some("dup-1"))
        .count();
    assert_eq!(succeeded, 1);
    let dead = node.get_json("/dlq/default").await.to_string();
    assert!(
        dead.contains("celery: `headers.id` holds a control character"),
        "{dead}"
    );
    assert!(
        node.log().contains("celery message dropped"),
        "{}",
        node.log()
    );
}

/// A runtime stream holding another type (`SET rt:{default}:stream x`) makes the bridge's
/// move fail before it pops anything: the message waits in its kombu list (before, it was
/// popped, the XADD failed, and it was gone) and runs once the key is fixed.
#[tokio::test]
async fn a_wrong_type_runtime_stream_loses_no_celery_message() {
    let redis = RedisServer::start();
    let node = start(&redis, "");
    let mut conn = redis_conn(&redis).await;
    let _: () = redis::cmd("SET")
        .arg("rt:{default}:stream")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("LPUSH")
        .arg("celery")
        .arg(kombu_message("kept-1"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let bridge = bridge_until(&node, |s| s["errors"].as_u64() > Some(0)).await;
    let error = bridge["last_error"].as_str().unwrap();
    assert!(
        error.contains("rt:{default}:stream holds a string, not a stream"),
        "{bridge}"
    );
    // A fetch (or a wait) has moved it into a holding list, whence the next call places it:
    // it is in exactly one list.
    let mut pipe = redis::pipe();
    pipe.cmd("LLEN").arg("celery");
    for held in bridge["held_lists"].as_array().unwrap() {
        pipe.cmd("LLEN").arg(held.as_str().unwrap());
    }
    let lengths: Vec<u64> = pipe.query_async(&mut conn).await.unwrap();
    assert_eq!(
        lengths.iter().sum::<u64>(),
        1,
        "the message stays in its kombu list or a holding list: {lengths:?}"
    );
    let _: () = redis::cmd("DEL")
        .arg("rt:{default}:stream")
        .query_async(&mut conn)
        .await
        .unwrap();
    node.until_state("kept-1", &["succeeded"], Duration::from_secs(15))
        .await;
}

/// Messages left in holding lists when a node starts — its own movers' (a node of the same
/// name killed between a move into a holding list and placing the message), a dead node's (its
/// registration in the holding registry ran out) and one of a node of the earlier version
/// (named in the legacy holders set, no presence record) — are moved first, once each: a copy
/// of the held message still in the kombu list is dropped as a duplicate, not run again. A
/// list whose node's registration still runs is left alone until it runs out.
#[tokio::test]
async fn messages_in_holding_lists_when_a_node_starts_run_once() {
    let redis = RedisServer::start();
    let mut conn = redis_conn(&redis).await;
    let far = 4_000_000_000_000u64; // epoch ms, in 2096
    let _: () = redis::pipe()
        .cmd("LPUSH")
        .arg("rt:celery:held:n1:celery")
        .arg(kombu_message("held-own"))
        .ignore()
        .cmd("LPUSH")
        .arg("rt:celery:held:n1#1:celery")
        .arg(kombu_message("held-own-1"))
        .ignore()
        .cmd("LPUSH")
        .arg("rt:celery:held:gone:celery")
        .arg(kombu_message("held-orphan"))
        .ignore()
        .cmd("SADD")
        .arg("rt:celery:holders:celery")
        .arg("gone")
        .ignore()
        .cmd("LPUSH")
        .arg("rt:celery:held:dead#1:celery")
        .arg(kombu_message("held-dead"))
        .ignore()
        .cmd("LPUSH")
        .arg("rt:celery:held:alive:celery")
        .arg(kombu_message("held-alive"))
        .ignore()
        .cmd("ZADD")
        .arg("rt:celery:holding:celery")
        .arg(0)
        .arg("rt:celery:held:dead#1:celery")
        .arg(far)
        .arg("rt:celery:held:alive:celery")
        .ignore()
        .cmd("LPUSH")
        .arg("celery")
        .arg(kombu_message("held-own"))
        .ignore()
        .query_async(&mut conn)
        .await
        .unwrap();
    let config = config("").replace("[runtime]\n", "[runtime]\nnode_name = \"n1\"\n");
    let node = Node::start(&config, &[("RT_BROKER_URL", redis.url().as_str())]);
    let bridge = bridge_until(&node, |s| s["moved"] == 4 && s["duplicates"] == 1).await;
    assert_eq!(bridge["held_list"], "rt:celery:held:n1:celery", "{bridge}");
    for id in ["held-own", "held-own-1", "held-orphan", "held-dead"] {
        node.until_state(id, &["succeeded"], Duration::from_secs(10))
            .await;
    }
    let lengths: Vec<u64> = redis::pipe()
        .cmd("LLEN")
        .arg("rt:celery:held:n1:celery")
        .cmd("LLEN")
        .arg("rt:celery:held:n1#1:celery")
        .cmd("LLEN")
        .arg("rt:celery:held:gone:celery")
        .cmd("LLEN")
        .arg("rt:celery:held:dead#1:celery")
        .cmd("LLEN")
        .arg("celery")
        .cmd("LLEN")
        .arg("rt:celery:held:alive:celery")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        lengths,
        [0, 0, 0, 0, 0, 1],
        "the live node's list is left alone"
    );
    // Its node stops renewing the registration: the next sweep (every 10 s) adopts it.
    let _: () = redis::cmd("ZADD")
        .arg("rt:celery:holding:celery")
        .arg(0)
        .arg("rt:celery:held:alive:celery")
        .query_async(&mut conn)
        .await
        .unwrap();
    common::eventually(
        "the run-out list adopted",
        Duration::from_secs(20),
        async || {
            let snapshot = node.actor("root/celery/celery").await.unwrap()["snapshot"].clone();
            if snapshot["moved"] == 5 {
                Ok(())
            } else {
                Err(snapshot)
            }
        },
    )
    .await;
    node.until_state("held-alive", &["succeeded"], Duration::from_secs(10))
        .await;
    let events = common::stream_events(&mut conn, "rt:events").await;
    for id in [
        "held-own",
        "held-own-1",
        "held-orphan",
        "held-dead",
        "held-alive",
    ] {
        let started = events
            .iter()
            .filter(|(kind, task)| kind == "started" && task.as_deref() == Some(id))
            .count();
        assert_eq!(started, 1, "{id} started {started} times");
    }
}

/// Every kombu list of the queue is waited on (one `BLMOVE` each): a message on a priority
/// sub-queue is taken at once, however long `celery.poll` is.
#[tokio::test]
async fn a_message_on_a_priority_sub_queue_is_taken_at_once() {
    let redis = RedisServer::start();
    let config = config("").replace("poll = \"20ms\"", "poll = \"60s\"");
    let node = Node::start(&config, &[("RT_BROKER_URL", redis.url().as_str())]);
    // Idle: a wait on each of the four lists.
    bridge_until(&node, |s| s["blocks"] == 4).await;
    let mut conn = redis_conn(&redis).await;
    for (list, id) in [
        ("celery\x06\x169", "prio-9"),
        ("celery\x06\x163", "prio-3"),
        ("celery", "prio-0"),
    ] {
        let sent = Instant::now();
        let _: () = redis::cmd("LPUSH")
            .arg(list)
            .arg(kombu_message(id))
            .query_async(&mut conn)
            .await
            .unwrap();
        node.until_state(id, &["succeeded"], Duration::from_secs(5))
            .await;
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "{id} took {:?} (the waits time out after 60 s)",
            sent.elapsed()
        );
    }
    let bridge = node.actor("root/celery/celery").await.unwrap();
    assert_eq!(bridge["snapshot"]["moved"], 3, "{bridge}");
    assert!(
        bridge["snapshot"]["take_ms"]["samples"].as_u64() >= Some(1),
        "{bridge}"
    );
}
