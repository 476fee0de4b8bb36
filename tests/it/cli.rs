//! The commands that talk to a running node: enqueue, dlq, purge (through the binary).

use crate::common;

use std::process::Command;

use crate::common::Node;

const CONFIG: &str = r#"
[http]
bind = "127.0.0.1:0"
admin_token_env = "TEST_ADMIN_TOKEN"

[queues.chat]
concurrency = 2

# Nothing listens on port 9: every attempt fails to connect, and with no retries the task is
# dead-lettered at once.
[tasks.process_chat_message]
queue = "chat"
handler = { kind = "http", url = "http://127.0.0.1:9/internal/tasks/process_chat_message" }
max_retries = 0
"#;

fn runtime(node: &Node, args: &[&str], token: Option<&str>) -> (bool, String, String) {
    let mut cmd = Command::new(common::binary());
    cmd.args(args)
        .env("RT_URL", &node.url)
        .env_remove("RT_ADMIN_TOKEN");
    if let Some(token) = token {
        cmd.env("RT_ADMIN_TOKEN", token);
    }
    let out = cmd.output().expect("run runtime");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn enqueue_list_dead_letters_and_purge_through_a_running_node() {
    let node = Node::start(CONFIG, &[("TEST_ADMIN_TOKEN", "t0k3n")]);
    let token = Some("t0k3n");

    let (ok, _, err) = runtime(&node, &["enqueue", "process_chat_message"], None);
    assert!(!ok);
    assert!(
        err.contains("401 Unauthorized: missing or wrong bearer token"),
        "{err}"
    );

    let (ok, out, err) = runtime(
        &node,
        &[
            "enqueue",
            "process_chat_message",
            "--args",
            r#"["hello"]"#,
            "--idempotency-key",
            "m-1",
        ],
        token,
    );
    assert!(ok, "{err}");
    let id = out.trim().to_string();
    assert_eq!(id.len(), 36, "{out}");
    let (ok, out, _) = runtime(
        &node,
        &[
            "enqueue",
            "process_chat_message",
            "--idempotency-key",
            "m-1",
        ],
        token,
    );
    assert!(ok);
    assert_eq!(
        out.trim(),
        format!("{id} (duplicate: a task with this id or idempotency key exists; not enqueued)")
    );

    let (ok, _, err) = runtime(&node, &["enqueue", "nope"], token);
    assert!(!ok);
    assert!(err.contains("task: no such task `nope`"), "{err}");
    let (ok, _, err) = runtime(
        &node,
        &["enqueue", "process_chat_message", "--args", "{"],
        token,
    );
    assert!(!ok);
    assert!(err.contains("--args: expected a JSON array"), "{err}");

    // The app is down: the task is dead-lettered with the reason.
    common::eventually(
        "the task dead-lettered",
        std::time::Duration::from_secs(10),
        async || {
            let chat = node.get_json("/queues").await["queues"]["chat"].clone();
            if chat["dead"] == 1 { Ok(()) } else { Err(chat) }
        },
    )
    .await;
    let (ok, out, _) = runtime(&node, &["dlq", "list", "chat"], None);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["AT", "TASK", "ATTEMPTS", "ID", "REASON"],
        "{out}"
    );
    assert!(lines[1].contains("process_chat_message"), "{out}");
    assert!(lines[1].contains(&id), "{out}");
    assert!(
        lines[1].contains(
            "retries exhausted after 1 attempts: cannot connect to \
             http://127.0.0.1:9/internal/tasks/process_chat_message: Connection refused"
        ),
        "{out}"
    );
    // The node's log names the URL it could not reach, as the dead letter does.
    assert!(
        node.log()
            .contains("cannot connect to http://127.0.0.1:9/internal/tasks/process_chat_message"),
        "{}",
        node.log()
    );
    let (ok, out, _) = runtime(&node, &["dlq", "requeue", "chat", "--limit", "5"], token);
    assert!(ok);
    assert_eq!(out.trim(), "requeued 1 dead letters of chat");

    let (ok, _, err) = runtime(&node, &["purge", "chat"], token);
    assert!(!ok);
    assert!(err.contains("add --yes"), "{err}");
    let (ok, _, _) = runtime(
        &node,
        &["enqueue", "process_chat_message", "--countdown", "60"],
        token,
    );
    assert!(ok);
    let (ok, out, _) = runtime(&node, &["purge", "chat", "--yes"], token);
    assert!(ok);
    assert_eq!(out.trim(), "purged 0 ready and 1 delayed entries of chat");

    // A chosen id: once while the task waits; refused when it breaks the id rule.
    let chosen = |id: &str| {
        let args = [
            "enqueue",
            "process_chat_message",
            "--id",
            id,
            "--countdown",
            "60",
        ];
        runtime(&node, &args, token)
    };
    let (ok, out, err) = chosen("telegram:process:a1b2c3d4");
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "telegram:process:a1b2c3d4");
    let (ok, out, _) = chosen("telegram:process:a1b2c3d4");
    assert!(ok);
    assert_eq!(
        out.trim(),
        "telegram:process:a1b2c3d4 (duplicate: a task with this id or idempotency key exists; \
         not enqueued)"
    );
    let (ok, _, err) = chosen("two\nlines");
    assert!(!ok);
    assert!(
        err.contains("400 Bad Request: id: holds a control character (U+000A at byte 3)"),
        "{err}"
    );
    // Purged, nothing of it is left: the id is free again.
    let (ok, out, _) = runtime(&node, &["purge", "chat", "--yes"], token);
    assert!(ok);
    assert_eq!(out.trim(), "purged 0 ready and 1 delayed entries of chat");
    let (ok, out, _) = chosen("telegram:process:a1b2c3d4");
    assert!(ok);
    assert_eq!(out.trim(), "telegram:process:a1b2c3d4");
}

const INSPECTED: &str = r#"
[http]
bind = "127.0.0.1:0"

[queues.default]
concurrency = 2

[tasks.rt_noop]
handler = { kind = "native" }

[tasks.rt_sleep]
handler = { kind = "native" }

[tasks.rt_fail]
handler = { kind = "native" }
max_retries = 1
backoff = "10ms"
backoff_max = "20ms"
"#;

/// Runs `runtime inspect ARGS… --url URL`: (exit code, stdout, stderr).
fn inspect(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::binary())
        .arg("inspect")
        .args(args)
        .args(["--url", url])
        .env_remove("RT_URL")
        .output()
        .expect("run runtime inspect");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_of(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("--json output is not JSON ({e}): {out}"))
}

#[tokio::test]
async fn inspect_shows_active_tasks_stats_queues_ping_tree_and_events() {
    let node = Node::start(INSPECTED, &[]);
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for body in [
        serde_json::json!({ "task": "rt_sleep", "kwargs": { "ms": 60_000 } }),
        serde_json::json!({ "task": "rt_noop" }),
        serde_json::json!({ "task": "rt_noop" }),
        serde_json::json!({ "task": "rt_fail", "kwargs": { "message": "boom" } }),
    ] {
        let answer = client
            .post(format!("{}/tasks", node.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 202);
        let answer: serde_json::Value = answer.json().await.unwrap();
        ids.push(answer["id"].as_str().unwrap().to_string());
    }
    // Two succeed, one fails twice (one retry, then a dead letter), one keeps running.
    let stats = common::eventually(
        "the stats settled",
        std::time::Duration::from_secs(10),
        async || {
            let (code, out, err) = inspect(&node.url, &["stats", "--json"]);
            assert_eq!(code, 0, "{err}");
            let stats = json_of(&out);
            let default = &stats["queues"][0];
            let settled = default["succeeded"] == 2
                && default["dead_lettered"] == 1
                && default["running"] == 1;
            if settled { Ok(stats) } else { Err(out) }
        },
    )
    .await;
    let default = &stats["queues"][0];
    assert_eq!(default["queue"], "default");
    assert_eq!(default["processed"], 4);
    assert_eq!(default["failed"], 2);
    assert_eq!(default["retried"], 1);
    assert_eq!(default["dead"], 1, "the dead-letter depth");
    assert_eq!(default["in_flight"], 1);

    let (code, out, _) = inspect(&node.url, &["stats"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        [
            "QUEUE",
            "PROCESSED",
            "SUCCEEDED",
            "FAILED",
            "RETRIED",
            "DEAD_LETTERED",
            "RUNNING",
            "READY",
            "DELAYED",
            "IN_FLIGHT",
            "DEAD"
        ],
        "{out}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[..6], ["default", "4", "2", "2", "1", "1"], "{out}");

    let (code, out, _) = inspect(&node.url, &["active"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["QUEUE", "TASK", "ID", "ATTEMPT", "ELAPSED", "DEADLINE_IN"],
        "{out}"
    );
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[1].contains("rt_sleep") && lines[1].contains(&ids[0]),
        "{out}"
    );
    let (code, out, _) = inspect(&node.url, &["--json", "active"]);
    assert_eq!(code, 0);
    let active = json_of(&out);
    assert_eq!(active["active"][0]["id"], ids[0].as_str());
    assert_eq!(active["active"][0]["task"], "rt_sleep");
    assert_eq!(active["active"][0]["queue"], "default");
    assert!(
        active["active"][0]["elapsed_ms"].as_u64().is_some(),
        "{out}"
    );

    let (code, out, _) = inspect(&node.url, &["queues"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines()
            .next()
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>(),
        [
            "QUEUE",
            "READY",
            "DELAYED",
            "IN_FLIGHT",
            "DEAD",
            "RUNNING",
            "WAITING",
            "CONCURRENCY"
        ],
        "{out}"
    );
    let row: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row, ["default", "0", "0", "1", "1", "1", "0", "2"], "{out}");
    let (code, out, _) = inspect(&node.url, &["queues", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["queues"][0]["running"], 1);

    let (code, out, _) = inspect(&node.url, &["ping"]);
    assert_eq!(code, 0);
    assert!(out.starts_with(&format!("{}: ok (", node.url)), "{out}");
    let (code, out, _) = inspect(&node.url, &["ping", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)["healthy"], true);

    let (code, out, _) = inspect(&node.url, &["tree"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("root ") && out.contains("consumer"),
        "{out}"
    );
    let (code, out, _) = inspect(&node.url, &["tree", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(json_of(&out)[0]["path"], "root");

    // The latest events, filtered; --json prints one event per line.
    let (code, out, err) = inspect(&node.url, &["events", "--types", "dead", "--json"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let dead = json_of(lines[0]);
    assert_eq!(dead["kind"], "dead");
    assert_eq!(dead["task_id"], ids[3].as_str());
    let (code, out, _) = inspect(&node.url, &["events", "-n", "2", "--types", "sent"]);
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[1].contains(" sent ") && lines[1].contains(&ids[3]),
        "{out}"
    );

    // --follow prints new events as they happen.
    let mut follow = std::process::Command::new(common::binary())
        .args([
            "inspect",
            "events",
            "--follow",
            "-n",
            "0",
            "--types",
            "succeeded",
        ])
        .args(["--url", &node.url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    // The follower may not be connected yet: enqueue until one of ours shows up.
    let mut seen = None;
    for _ in 0..50 {
        let answer: serde_json::Value = client
            .post(format!("{}/tasks", node.url))
            .json(&serde_json::json!({ "task": "rt_noop" }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Ok(line) = rx.recv_timeout(std::time::Duration::from_millis(200)) {
            seen = Some((line, answer));
            break;
        }
    }
    let _ = follow.kill();
    let _ = follow.wait();
    let (line, _) = seen.expect("--follow printed nothing");
    assert!(
        line.contains("succeeded") && line.contains("rt_noop"),
        "{line}"
    );
}

#[test]
fn inspect_names_the_url_and_exits_69_when_the_node_is_unreachable() {
    for what in [&["ping"][..], &["stats", "--json"], &["events", "--follow"]] {
        let (code, out, err) = inspect("http://127.0.0.1:9", what);
        assert_eq!(code, 69, "{what:?}: {err}");
        assert!(out.is_empty(), "{out}");
        assert!(
            err.contains("cannot reach the node at http://127.0.0.1:9"),
            "{what:?}: {err}"
        );
    }
    // The older `runtime tree` shares the code and the exit status.
    let out = Command::new(common::binary())
        .args(["tree", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
}

const TASKS: &str = r#"
[http]
bind = "127.0.0.1:0"
[runtime]
terminate_grace = "200ms"
[queues.default]
concurrency = 2
[tasks.rt_echo]
handler = { kind = "native" }
[tasks.rt_sleep]
handler = { kind = "native" }
[tasks.rt_fail]
handler = { kind = "native" }
max_retries = 0
"#;

/// `runtime ARGS…` against `node`: exit status, stdout, stderr.
fn run(node: &Node, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(common::binary())
        .args(args)
        .env("RT_URL", &node.url)
        .env_remove("RT_ADMIN_TOKEN")
        .output()
        .expect("run runtime");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `enqueue --wait`, `result [--wait] [--json]` and `revoke [--terminate]`, with the exit
/// status that says how the task ended: 0 succeeded, 3 dead (failed or revoked), 75 not ended
/// (or `--wait` timed out), 1 for the node's refusals (unknown id, ended task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_and_revocations_through_the_cli() {
    let node = Node::start(TASKS, &[]);

    let (code, out, err) = run(
        &node,
        &["enqueue", "rt_echo", "--args", r#"["hi"]"#, "--wait"],
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0].len(), 36, "the id first: {out}");
    assert_eq!(
        &lines[1..],
        [
            "state     succeeded",
            "attempts  1",
            r#"result    {"args":["hi"],"kwargs":{}}"#
        ]
    );
    let echoed = lines[0].to_string();
    let (code, out, _) = run(&node, &["result", &echoed, "--json"]);
    assert_eq!(code, 0);
    let record: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(record["state"], "succeeded", "{out}");

    let (code, out, _) = run(&node, &["enqueue", "rt_fail", "--wait"]);
    assert_eq!(code, 3, "dead: {out}");
    assert!(out.contains("state     dead\n"), "{out}");
    assert!(
        out.contains("error     permanent: rt_fail") || out.contains("error     retries exhausted"),
        "{out}"
    );

    let (code, out, err) = run(
        &node,
        &["enqueue", "rt_sleep", "--kwargs", r#"{"ms": 60000}"#],
    );
    assert_eq!(code, 0, "{err}");
    let sleeping = out.trim().to_string();
    let out = common::eventually(
        "the task running",
        std::time::Duration::from_secs(10),
        async || {
            let (code, out, _) = run(&node, &["result", &sleeping]);
            assert_eq!(code, 75, "not ended: {out}");
            if out.contains("state     running\n") {
                Ok(out)
            } else {
                Err(out)
            }
        },
    )
    .await;
    assert!(
        out.starts_with(&format!(
            "id        {sleeping}\ntask      rt_sleep\nqueue     default\n"
        )),
        "{out}"
    );
    let (code, _, _) = run(
        &node,
        &["result", &sleeping, "--wait", "--timeout", "300ms"],
    );
    assert_eq!(code, 75, "--wait timed out");

    let (code, out, err) = run(&node, &["revoke", &sleeping, "--terminate"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!(
            "revoked {sleeping}: it was running; it is being stopped"
        )),
        "{out}"
    );
    let (code, out, _) = run(&node, &["result", &sleeping, "--wait", "--timeout", "10s"]);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("state     dead\n") && out.contains("error     revoked\n"),
        "{out}"
    );
    let (code, out, _) = run(&node, &["revoke", &sleeping]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("{sleeping} was revoked already").as_str())
    );

    let (code, _, err) = run(&node, &["revoke", &echoed]);
    assert_eq!(code, 1);
    assert!(
        err.contains("409 Conflict") && err.contains("has ended (succeeded): nothing to revoke"),
        "{err}"
    );
    let (code, _, err) = run(&node, &["result", "nobody"]);
    assert_eq!(code, 1);
    assert!(err.contains("404 Not Found: no task nobody"), "{err}");

    // Revoked before it exists: the task that comes with that id does not run.
    let (code, out, _) = run(&node, &["revoke", "later/1"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("revoked later/1: no such task yet"),
        "{out}"
    );
    let (code, out, _) = run(&node, &["enqueue", "rt_echo", "--id", "later/1", "--wait"]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("error     revoked\n"), "{out}");
}
