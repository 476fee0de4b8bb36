//! The commands that talk to a running node: enqueue, dlq, purge (through the binary).

mod common;

use std::process::Command;

use common::Node;

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
        format!("{id} (duplicate: the idempotency key was already used)")
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
    let at = tokio::time::Instant::now();
    while node.get_json("/queues").await["queues"]["chat"]["dead"] != 1 {
        assert!(
            at.elapsed() < std::time::Duration::from_secs(10),
            "never dead-lettered"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (ok, out, _) = runtime(&node, &["dlq", "list", "chat"], None);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("at "), "{out}");
    assert!(lines[1].contains("process_chat_message"), "{out}");
    assert!(lines[1].contains(&id), "{out}");
    assert!(
        lines[1].contains("retries exhausted after 1 attempts: cannot connect"),
        "{out}"
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
}
