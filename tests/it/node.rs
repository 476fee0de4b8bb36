//! End-to-end: the `runtime` binary on a real port — tree introspection, chaos kills and
//! restarts, escalation past the restart intensity, signals.

use crate::common;

use std::time::Duration;

use tokio::time::Instant;

use crate::common::Node;

const CHAOS: &str = r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[supervision]
max_restarts = 3
within = "30s"
backoff = "5ms"
backoff_max = "50ms"

[chaos]
enabled = true
"#;

#[tokio::test]
async fn actors_lists_the_tree_and_health_is_ok() {
    let node = Node::start(CHAOS, &[]);
    let tree = node.get_json("/actors").await;
    assert_eq!(tree[0]["path"], "root");
    assert_eq!(tree[0]["status"], "running");
    assert_eq!(tree[0]["children"][0]["path"], "root/broker");
    assert_eq!(tree[0]["children"][1]["path"], "root/queues");
    assert_eq!(tree[0]["children"][2]["path"], "root/heartbeat");
    assert_eq!(tree[0]["children"][2]["restart"], "permanent");

    let text = node.get("/actors?format=text").await.text().await.unwrap();
    assert!(text.starts_with("root "), "{text}");
    assert!(text.contains("├── broker "), "{text}");
    assert!(text.contains("└── heartbeat "), "{text}");

    let health = node.get("/health").await;
    assert_eq!(health.status(), 200);
    assert_eq!(
        health.json::<serde_json::Value>().await.unwrap()["status"],
        "ok"
    );

    let bad = node.get("/actors?format=xml").await;
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("format"));
}

#[tokio::test]
async fn a_killed_actor_is_back_with_one_restart_within_100ms() {
    let node = Node::start(CHAOS, &[]);
    let killed = node.post("/chaos/kill/root/heartbeat", None).await;
    assert_eq!(killed.status(), 202);
    let at = Instant::now();
    loop {
        let heartbeat = node
            .actor("root/heartbeat")
            .await
            .expect("heartbeat listed");
        if heartbeat["restarts"] == 1 && heartbeat["status"] == "running" {
            assert_eq!(heartbeat["last_error"], "stopped: killed");
            break;
        }
        assert!(
            at.elapsed() < Duration::from_millis(100),
            "not restarted within 100 ms: {heartbeat}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(node.get("/health").await.status(), 200);

    let missing = node.post("/chaos/kill/root/nothing", None).await;
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn killing_past_the_intensity_escalates_and_the_process_exits_non_zero() {
    let mut node = Node::start(CHAOS, &[]);
    for n in 1..=3 {
        assert_eq!(node.post("/chaos/kill/heartbeat", None).await.status(), 202);
        common::eventually(
            &format!("restart {n}"),
            Duration::from_secs(5),
            async || {
                let heartbeat = node.actor("root/heartbeat").await;
                let done = heartbeat
                    .as_ref()
                    .is_some_and(|h| h["restarts"] == n && h["status"] == "running");
                if done {
                    Ok(())
                } else {
                    Err(format!("{heartbeat:?}"))
                }
            },
        )
        .await;
    }
    // The fourth kill within 30 s is one more than max_restarts = 3: the root gives up.
    assert_eq!(node.post("/chaos/kill/heartbeat", None).await.status(), 202);
    let status = node
        .wait_exit(Duration::from_secs(10))
        .expect("process exits");
    assert!(!status.success(), "exit status {status:?}");
    let log = node.log();
    assert!(
        log.contains("root gave up after more than 3 restarts within 30s; last: root/heartbeat stopped: killed"),
        "{log}"
    );
    assert!(log.contains("the root supervisor ended"), "{log}");
}

#[tokio::test]
async fn sigterm_stops_the_tree_and_exits_zero_naming_the_signal() {
    for signal in ["TERM", "INT"] {
        let mut node = Node::start(CHAOS, &[]);
        let at = Instant::now();
        node.signal(signal);
        let status = node
            .wait_exit(Duration::from_secs(5))
            .expect("exits within the grace");
        assert_eq!(status.code(), Some(0), "{}", node.log());
        assert!(at.elapsed() < Duration::from_secs(5));
        let log = node.log();
        assert!(log.contains(&format!("signal=\"SIG{signal}\"")), "{log}");
        assert!(log.contains("tree stopped"), "{log}");
    }
}

#[tokio::test]
async fn chaos_routes_do_not_exist_unless_enabled() {
    let node = Node::start("[http]\nbind = \"127.0.0.1:0\"\n", &[]);
    assert_eq!(node.post("/chaos/kill/heartbeat", None).await.status(), 404);
}

#[tokio::test]
async fn runtime_tree_prints_the_text_tree_of_a_running_node() {
    let node = Node::start(CHAOS, &[]);
    let out = std::process::Command::new(common::binary())
        .args(["tree", "--url", &node.url])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("root "), "{text}");
    assert!(text.contains("heartbeat"), "{text}");

    let down = std::process::Command::new(common::binary())
        .args(["tree", "--url", "http://127.0.0.1:9"])
        .output()
        .unwrap();
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr)
            .contains("cannot reach the node at http://127.0.0.1:9")
    );
}

const JSON_LOGS: &str = r##"
[http]
bind = "127.0.0.1:0"

[queues.default]

# The first attempt fails (exit 75: retried), the second succeeds and links a callback.
[tasks.flaky]
handler = { kind = "exec", command = "/bin/sh", args = ["-c", '''read envelope; case "$envelope" in *'"attempt":0'*) echo "first try fails" >&2; exit 75;; esac; echo working >&2; echo '{"ok": true}' '''] }
max_retries = 2
backoff = "10ms"
backoff_max = "20ms"
link = ["after_flaky"]

[tasks.after_flaky]
handler = { kind = "exec", command = "/bin/sh", args = ["-c", "read envelope; echo 'callback ran' >&2"] }
"##;

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_task_lines_carry_the_task_fields() {
    let mut node = Node::start_with_args(JSON_LOGS, &["--log-format", "json"], &[]);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        client
            .post(format!("{}/tasks", node.url))
            .json(&body)
            .send()
    };
    let answer = post(serde_json::json!({ "task": "flaky", "trace_id": trace }))
        .await
        .unwrap();
    assert_eq!(answer.status(), 202);
    let flaky: serde_json::Value = answer.json().await.unwrap();
    let answer = post(serde_json::json!({ "task": "after_flaky" }))
        .await
        .unwrap();
    let untraced: serde_json::Value = answer.json().await.unwrap();

    let started = Instant::now();
    common::eventually(
        "two `callback ran` lines",
        Duration::from_secs(10),
        async || {
            let log = node.log();
            if log.matches("callback ran").count() >= 2 {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;
    // Up for two seconds at least: `tree stopped` must not report that as its stop time.
    tokio::time::sleep_until(started + Duration::from_secs(2)).await;
    node.signal("TERM");
    assert!(node.wait_exit(Duration::from_secs(10)).unwrap().success());

    let log = node.log();
    let mut lines = Vec::new();
    for line in log.lines().chain(node.stdout().lines()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON object ({e}): {line}\nlog:\n{log}"));
        assert!(value.is_object(), "{line}");
        assert!(
            value["timestamp"].is_string() && value["level"].is_string(),
            "{line}"
        );
        lines.push(value);
    }
    // `elapsed` is the stop itself (an idle node stops in well under a second); `uptime` the
    // node's life (two seconds at least).
    let stopped: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["message"] == "tree stopped")
        .collect();
    assert_eq!(stopped.len(), 1, "{log}");
    let elapsed = debug_duration(&stopped[0]["elapsed"]);
    let uptime = debug_duration(&stopped[0]["uptime"]);
    assert!(uptime >= Duration::from_secs(2), "{}", stopped[0]);
    assert!(elapsed < Duration::from_secs(1), "{}", stopped[0]);
    let task_lines: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l.get("task_id").is_some())
        .collect();
    for line in &task_lines {
        for field in ["task", "queue", "attempt", "trace_id"] {
            assert!(line.get(field).is_some(), "no {field}: {line}");
        }
        assert_eq!(line["queue"], "default", "{line}");
    }
    let said = |message: &str| -> Vec<&serde_json::Value> {
        task_lines
            .iter()
            .copied()
            .filter(|l| l["message"] == message)
            .collect()
    };
    // The retry is told at the default level: one INFO line, in the task's span (task, id,
    // the attempt that failed), with the delay and the reason.
    let retries = said("retry scheduled");
    assert_eq!(retries.len(), 1, "{log}");
    assert_eq!(retries[0]["level"], "INFO");
    assert_eq!(retries[0]["task"], "flaky");
    assert_eq!(retries[0]["task_id"], flaky["id"]);
    assert_eq!(retries[0]["attempt"], 0);
    let delay = retries[0]["delay"].as_str().unwrap_or_default();
    assert!(delay.ends_with("ms"), "{}", retries[0]);
    let reason = retries[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("75"), "{}", retries[0]);
    let first = said("first try fails");
    assert_eq!(first.len(), 1, "{log}");
    assert_eq!(first[0]["task_id"], flaky["id"]);
    assert_eq!(first[0]["task"], "flaky");
    assert_eq!(first[0]["attempt"], 0);
    assert_eq!(first[0]["trace_id"], trace);
    let second = said("working");
    assert_eq!(second.len(), 1, "{log}");
    assert_eq!(
        second[0]["task_id"], flaky["id"],
        "the retry is the same task"
    );
    assert_eq!(second[0]["attempt"], 1);
    assert_eq!(second[0]["trace_id"], trace, "the retry keeps the trace");
    let callbacks = said("callback ran");
    assert_eq!(callbacks.len(), 2, "{log}");
    let linked = callbacks
        .iter()
        .find(|l| l["task_id"] != untraced["id"])
        .unwrap();
    assert_eq!(linked["task"], "after_flaky");
    assert_eq!(
        linked["trace_id"], trace,
        "the callback joins its parent's trace"
    );
    let own = callbacks
        .iter()
        .find(|l| l["task_id"] == untraced["id"])
        .unwrap();
    let own_trace = own["trace_id"].as_str().unwrap();
    assert_eq!(
        own_trace.len(),
        32,
        "a new trace gets a W3C-shaped id: {own_trace}"
    );
    assert!(own_trace.chars().all(|c| c.is_ascii_hexdigit()));
}

/// A `Duration` as its `Debug` writes it in a JSON log field: `"3.2ms"`, `"2.000118s"`.
fn debug_duration(value: &serde_json::Value) -> Duration {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a duration: {value}"));
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().unwrap_or_else(|_| panic!("{text}"));
    let seconds = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "µs" => number / 1e6,
        "ns" => number / 1e9,
        _ => panic!("unknown unit in {text}"),
    };
    Duration::from_secs_f64(seconds)
}

/// A node on `memory://` with `shutdown_grace` = `grace`: `slow` tasks (queue `work`,
/// one at a time) and `note` tasks (queue `notes`, one at a time) sleep `sleep` seconds, then
/// append their envelope to `out`; `rt_noop` tasks (queue `fast`) succeed at once and call
/// back `note`. Returns the config and the path of `out`.
fn memory_node_config(
    scratch: &common::Scratch,
    grace: &str,
    sleep: &str,
    drain: bool,
) -> (String, std::path::PathBuf) {
    let out = scratch.path().join("ran.jsonl");
    // Only shell builtins and absolute paths: the child's environment may be empty.
    let script = scratch.write(
        "work.sh",
        &format!(
            "#!/bin/sh\nread -r envelope\n/bin/sleep {sleep}\nprintf '%s\\n' \"$envelope\" >> '{}'\n\
             echo '{{}}'\n",
            out.display()
        ),
    );
    let handler = format!(
        "{{ kind = \"exec\", command = \"/bin/sh\", args = [\"{}\"] }}",
        script.display()
    );
    // Without `drain`, the config is one that today's main accepts too.
    let broker = if drain {
        "[broker]\ndrain_on_shutdown = true\n"
    } else {
        ""
    };
    let config = format!(
        r#"
[runtime]
shutdown_grace = "{grace}"

{broker}
[http]
bind = "127.0.0.1:0"

[queues.work]
concurrency = 1
[queues.notes]
concurrency = 1
[queues.fast]
concurrency = 4

[tasks.slow]
queue = "work"
handler = {handler}

[tasks.note]
queue = "notes"
handler = {handler}

[tasks.rt_noop]
queue = "fast"
handler = {{ kind = "native" }}
link = ["note"]
"#
    );
    (config, out)
}

/// Enqueues one `note`, `slow` `slow` tasks and four `rt_noop` ones (whose callbacks queue up
/// behind the running note), then waits until `work` holds `slow - 1` ready entries and
/// `notes` four.
async fn fill_memory_queues(node: &Node, slow: usize) {
    let client = reqwest::Client::new();
    let mut batch = vec![serde_json::json!({ "task": "note" })];
    batch.extend((0..slow).map(|_| serde_json::json!({ "task": "slow" })));
    batch.extend((0..4).map(|_| serde_json::json!({ "task": "rt_noop" })));
    let sent = client
        .post(format!("{}/tasks", node.url))
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 202, "{}", sent.text().await.unwrap());
    common::eventually("the queues filled", Duration::from_secs(10), async || {
        let queues = node.get_json("/queues").await;
        let ready = |q: &str| queues["queues"][q]["ready"].as_u64().unwrap_or(0);
        if ready("work") == slow as u64 - 1 && ready("notes") == 4 {
            Ok(())
        } else {
            Err(queues)
        }
    })
    .await;
}

fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |text| text.lines().count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_memory_logs_what_it_drops_per_queue() {
    let scratch = common::Scratch::new();
    let (config, out) = memory_node_config(&scratch, "10s", "1", false);
    let mut node = Node::start(&config, &[]);
    fill_memory_queues(&node, 17).await;
    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", node.log());
    let log = node.log();
    // The running slow task and the running note finished within the grace; the rest is gone,
    // and the log says so, queue by queue.
    assert_eq!(lines(&out), 2, "{log}");
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("memory:// broker: dropping"))
        .collect();
    assert_eq!(dropped.len(), 2, "{log}");
    assert!(
        dropped
            .iter()
            .any(|l| l.contains("queue=work ready=16 delayed=0 in_flight=0 callbacks=0 dead=0")),
        "{log}"
    );
    assert!(
        dropped
            .iter()
            .any(|l| l.contains("queue=notes ready=4 delayed=0 in_flight=0 callbacks=4 dead=0")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_memory_with_drain_on_shutdown_runs_the_ready_tasks_first() {
    let scratch = common::Scratch::new();
    let (config, out) = memory_node_config(&scratch, "20s", "0.3", true);
    let mut node = Node::start(&config, &[]);
    fill_memory_queues(&node, 6).await;
    let at = Instant::now();
    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(20)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", node.log());
    let log = node.log();
    // One note, six slow tasks and the four callbacks: all ran before the process ended.
    assert_eq!(lines(&out), 11, "{log}");
    assert!(at.elapsed() < Duration::from_secs(15), "{log}");
    assert!(log.contains("draining memory:// before stopping"), "{log}");
    assert!(
        log.contains("memory:// broker: nothing left to drop"),
        "{log}"
    );
    assert!(!log.contains("memory:// broker: dropping"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_cut_by_the_grace_logs_what_is_left() {
    let scratch = common::Scratch::new();
    let (config, out) = memory_node_config(&scratch, "1s", "0.6", true);
    let mut node = Node::start(&config, &[]);
    fill_memory_queues(&node, 9).await;
    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", node.log());
    let log = node.log();
    let ran = lines(&out);
    assert!((2..14).contains(&ran), "{ran} ran\n{log}");
    assert!(
        log.contains("shutdown_grace ran out while draining memory://"),
        "{log}"
    );
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("memory:// broker: dropping"))
        .collect();
    assert!(dropped.iter().any(|l| l.contains("queue=work ")), "{log}");
}

/// `runtime nodes` on a node that was asked to stop: `stopping` while its running task
/// finishes (table and JSON, with the time it began), `draining` while `memory://` with
/// `drain_on_shutdown` still works off its queue.
#[tokio::test]
async fn runtime_nodes_shows_a_node_that_is_stopping_or_draining() {
    for (drain, expected) in [(false, "stopping"), (true, "draining")] {
        let config = format!(
            "[runtime]\nshutdown_grace = \"20s\"\n\
             [broker]\ndrain_on_shutdown = {drain}\n\
             [http]\nbind = \"127.0.0.1:0\"\n\
             [queues.default]\nconcurrency = 1\n\
             [tasks.rt_sleep]\nhandler = {{ kind = \"native\" }}\n"
        );
        let mut node = Node::start(&config, &[]);
        let nodes = |json: bool| {
            let mut cmd = std::process::Command::new(common::binary());
            cmd.args(["nodes", "--url", &node.url]);
            if json {
                cmd.arg("--json");
            }
            let out = cmd.output().expect("run runtime nodes");
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let table = nodes(false);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            [
                "NODE",
                "STATE",
                "QUEUES",
                "IN_FLIGHT",
                "STARTED_AT",
                "LAST_SEEN"
            ]
        );
        assert_eq!(
            table.lines().nth(1).unwrap().split_whitespace().nth(1),
            Some("running")
        );
        // Two tasks of 1.5 s, one at a time: the second waits in the queue.
        let client = reqwest::Client::new();
        for _ in 0..2 {
            let answer = client
                .post(format!("{}/tasks", node.url))
                .json(&serde_json::json!({ "task": "rt_sleep", "kwargs": { "ms": 1500 } }))
                .send()
                .await
                .unwrap();
            assert_eq!(answer.status(), 202);
        }
        common::eventually(
            "the first task started",
            Duration::from_secs(5),
            async || {
                let default = node.get_json("/queues").await["queues"]["default"].clone();
                if default["ready"] == 1 {
                    Ok(())
                } else {
                    Err(default)
                }
            },
        )
        .await;
        node.signal("TERM");
        let what = format!("{expected} within a second of SIGTERM");
        let record = common::eventually(&what, Duration::from_secs(1), async || {
            let listed: serde_json::Value = serde_json::from_str(&nodes(true)).unwrap();
            let record = listed["nodes"][0].clone();
            if record["state"] == expected {
                return Ok(record);
            }
            assert_eq!(record["state"], "running", "{listed}");
            Err(listed)
        })
        .await;
        assert!(record["state_since"].is_string(), "{record}");
        let table = nodes(false);
        assert_eq!(
            table.lines().nth(1).unwrap().split_whitespace().nth(1),
            Some(expected),
            "{table}"
        );
        assert!(node.wait_exit(Duration::from_secs(15)).unwrap().success());
    }
}
