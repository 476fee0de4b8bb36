//! Python worker pools through the binary (`[workers.NAME]`, `kind = "python"` tasks), with real
//! `python -m taskrt.worker` processes running tests/fixtures/python/worker_tasks.py: results,
//! the exception taxonomy, soft and hard limits, crashing and misbehaving processes, recycling,
//! the memory limit, async concurrency, an import error, and Django set up once per process.
//!
//! The worker needs only the standard library and the package's source (`python/src` on
//! `PYTHONPATH`); the Django test needs the project's venv (`target/py-venv`, made by .ci/run).

use std::collections::HashSet;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Value, json};

use crate::common::{self, Node, eventually};

fn pythonpath() -> String {
    format!(
        "{}:{}",
        common::repo("python/src").display(),
        common::repo("tests/fixtures/python").display()
    )
}

/// A node with one worker pool `py` (`workers` holds its extra keys) and one queue `py`
/// (`concurrency`) for the tasks of `tasks` (TOML, each `[tasks.X]` with `queue = "py"`).
fn config(workers: &str, concurrency: u32, tasks: &str) -> String {
    format!(
        r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[queues.py]
concurrency = {concurrency}

[workers.py]
python = "{python}"
modules = ["worker_tasks"]
env = {{ PYTHONPATH = "{pythonpath}" }}
startup_timeout = "20s"
stop_timeout = "2s"
{workers}

{tasks}
"#,
        python = common::python3(),
        pythonpath = pythonpath(),
    )
}

/// `[tasks.NAME]` on queue `py` running the function of the same name, with `extra` keys.
fn python_task(name: &str, extra: &str) -> String {
    format!(
        "[tasks.{name}]\nqueue = \"py\"\nhandler = {{ kind = \"python\", workers = \"py\" }}\nbackoff = \"50ms\"\n{extra}\n"
    )
}

async fn enqueue(node: &Node, body: Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until `py` has `n` idle workers; returns the pool's snapshot.
async fn warm(node: &Node, n: u64) -> Value {
    eventually(
        "the worker pool warm",
        Duration::from_secs(30),
        async || {
            let pools = node.get_json("/pools").await;
            let pool = &pools["pools"]["py"];
            (pool["counts"]["idle"].as_u64() == Some(n)).then(|| pool.clone())
        },
    )
    .await
}

fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_tasks_return_results_and_their_exceptions_decide_what_happens_next() {
    let tasks = [
        python_task("py_add", ""),
        python_task("py_echo_async", ""),
        python_task("py_flaky", "max_retries = 3"),
        python_task("py_retry_after", "max_retries = 1"),
        python_task("py_permanent", ""),
        python_task("py_value_error", "max_retries = 1"),
        python_task("py_not_json", ""),
        python_task("py_print", ""),
        "[tasks.py_missing]\nqueue = \"py\"\nhandler = { kind = \"python\", workers = \"py\", function = \"no_such_function\" }\n".to_string(),
    ]
    .join("\n");
    let node = Node::start(&config("processes = 2", 4, &tasks), &[]);
    let pool = warm(&node, 3).await;
    assert_eq!(pool["kind"], "python", "{pool}");
    assert_eq!(pool["worker"]["capacity"], 2, "{pool}");

    let add = enqueue(&node, json!({"task": "py_add", "args": [2, 3]})).await;
    let echo = enqueue(
        &node,
        json!({"task": "py_echo_async", "kwargs": {"x": "hi"}}),
    )
    .await;
    let flaky = enqueue(&node, json!({"task": "py_flaky", "args": [2]})).await;
    let permanent = enqueue(&node, json!({"task": "py_permanent"})).await;
    let value_error = enqueue(&node, json!({"task": "py_value_error"})).await;
    let not_json = enqueue(&node, json!({"task": "py_not_json"})).await;
    let printed = enqueue(&node, json!({"task": "py_print", "args": ["tangerine"]})).await;
    let missing = enqueue(&node, json!({"task": "py_missing"})).await;
    let bad_args = enqueue(&node, json!({"task": "py_add", "args": [1, 2, 3]})).await;
    let limit = Duration::from_secs(20);

    let record = node.until_ended(&add, limit).await;
    assert_eq!(
        (record["state"].clone(), record["result"].clone()),
        (json!("succeeded"), json!(5)),
        "{record}"
    );
    let record = node.until_ended(&echo, limit).await;
    assert_eq!(record["result"]["x"], "hi", "{record}");

    let record = node.until_ended(&flaky, limit).await;
    assert_eq!(record["state"], "succeeded", "{record}");
    assert_eq!(
        record["result"],
        json!({"attempt": 2}),
        "retried twice, then succeeded: {record}"
    );

    let record = node.until_ended(&permanent, limit).await;
    assert_eq!(
        (record["state"].clone(), record["attempts"].clone()),
        (json!("dead"), json!(1)),
        "{record}"
    );
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("thread t-1 does not exist"),
        "{record}"
    );

    let record = node.until_ended(&value_error, limit).await;
    let error = record["error"].as_str().unwrap();
    assert_eq!(
        record["attempts"], 2,
        "retried once by default policy: {record}"
    );
    assert!(error.contains("ValueError: boom\nTraceback"), "{record}");
    assert!(
        error.contains("Traceback") && error.contains("worker_tasks.py"),
        "{record}"
    );

    for (id, says) in [
        (&not_json, "set"),
        (&missing, "no_such_function"),
        (&bad_args, "TypeError"),
    ] {
        let record = node.until_ended(id, limit).await;
        assert_eq!(
            (record["state"].clone(), record["attempts"].clone()),
            (json!("dead"), json!(1)),
            "permanent at once: {record}"
        );
        assert!(
            record["error"].as_str().unwrap().contains(says),
            "{says}: {record}"
        );
    }

    let record = node.until_ended(&printed, limit).await;
    assert_eq!(record["result"], "tangerine", "{record}");
    let log = node.log();
    let line = log
        .lines()
        .find(|line| line.contains("task says tangerine"))
        .unwrap_or_else(|| panic!("the task's print is in the node's log:\n{log}"));
    assert!(line.contains(&printed), "tagged with the task id: {line}");

    // Alone, so that the clock covers only it.
    let started = Instant::now();
    let retry_after = enqueue(&node, json!({"task": "py_retry_after"})).await;
    let record = node.until_ended(&retry_after, limit).await;
    assert_eq!(record["state"], "dead", "{record}");
    assert_eq!(record["attempts"], 2, "{record}");
    let error = record["error"].as_str().unwrap();
    assert!(error.contains("upstream asked to wait"), "{record}");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "Retry(after=0.3) waited: {:?}",
        started.elapsed()
    );

    let pools = node.get_json("/pools").await;
    let pool = &pools["pools"]["py"];
    assert_eq!(
        pool["totals"]["failed"], 0,
        "no process died for an exception: {pool}"
    );
    assert!(pool["totals"]["tasks"].as_u64().unwrap() >= 14, "{pool}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_crashes_and_a_broken_channel_replace_the_process_and_leave_no_zombie() {
    let tasks = [
        python_task(
            "py_soft",
            "soft_time_limit = \"300ms\"\ntime_limit = \"5s\"",
        ),
        python_task(
            "py_soft_async",
            "soft_time_limit = \"300ms\"\ntime_limit = \"5s\"\nmax_retries = 0",
        ),
        python_task("py_spin", "time_limit = \"700ms\"\nmax_retries = 0"),
        python_task("py_exit", "max_retries = 1"),
        python_task("py_segfault", "max_retries = 0"),
        python_task("py_garbage", "max_retries = 2"),
        python_task("py_pid", ""),
    ]
    .join("\n");
    let node = Node::start(&config("processes = 2", 2, &tasks), &[]);
    warm(&node, 3).await;
    let limit = Duration::from_secs(30);

    let soft = enqueue(&node, json!({"task": "py_soft", "args": [10]})).await;
    let record = node.until_ended(&soft, limit).await;
    assert_eq!(
        record["result"], "cleaned up",
        "SoftTimeLimitExceeded raised in the task: {record}"
    );

    let soft_async = enqueue(&node, json!({"task": "py_soft_async", "args": [10]})).await;
    let record = node.until_ended(&soft_async, limit).await;
    assert_eq!(record["state"], "dead", "{record}");
    assert!(
        record["error"]
            .as_str()
            .unwrap()
            .contains("soft time limit"),
        "{record}"
    );

    let spin = enqueue(&node, json!({"task": "py_spin"})).await;
    node.until_state(&spin, &["running"], limit).await;
    let record = node.until_ended(&spin, limit).await;
    assert_eq!(record["state"], "dead", "{record}");
    assert!(
        record["error"].as_str().unwrap().contains("time limit"),
        "{record}"
    );
    let log = node.log();
    assert!(
        log.contains("in spin"),
        "the worker's stack dump (SIGUSR2 before the SIGKILL) names the function:\n{log}"
    );

    let exit = enqueue(&node, json!({"task": "py_exit"})).await;
    let record = node.until_ended(&exit, limit).await;
    assert_eq!(
        (record["state"].clone(), record["attempts"].clone()),
        (json!("dead"), json!(2)),
        "a crash is retryable: {record}"
    );
    assert!(
        record["error"].as_str().unwrap().contains("exit 1"),
        "{record}"
    );

    let segfault = enqueue(&node, json!({"task": "py_segfault"})).await;
    let record = node.until_ended(&segfault, limit).await;
    assert!(
        record["error"].as_str().unwrap().contains("SIGSEGV"),
        "{record}"
    );

    let garbage = enqueue(&node, json!({"task": "py_garbage"})).await;
    let record = node.until_ended(&garbage, limit).await;
    assert_eq!(record["result"], "clean on the retry", "{record}");
    assert_eq!(record["attempts"], 2, "{record}");

    // Every killed or crashed process was replaced, and the pool still serves.
    let pool = warm(&node, 3).await;
    let totals = &pool["totals"];
    assert!(
        totals["failed"].as_u64().unwrap() >= 4,
        "spin, exit ×2, segfault, garbage: {pool}"
    );
    assert!(
        pool["recent"].to_string().contains("protocol error"),
        "the garbage line named: {pool}"
    );
    let pid = enqueue(&node, json!({"task": "py_pid"})).await;
    let record = node.until_ended(&pid, limit).await;
    assert!(alive(record["result"].as_u64().unwrap()), "{record}");
    assert_eq!(common::zombies(&[node.pid()]).await, Vec::<u32>::new());
    let health = node.get("/health").await;
    assert_eq!(health.status(), 200, "{}", health.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_are_recycled_by_count_and_memory_and_async_tasks_share_one() {
    let tasks = [python_task("py_pid", ""), python_task("py_hog", "")].join("\n");
    let workers = "processes = 1\nspares = 0\nmax_tasks_per_process = 3\nmemory_limit_mb = 150";
    let node = Node::start(&config(workers, 1, &tasks), &[]);
    warm(&node, 1).await;
    let limit = Duration::from_secs(20);
    let mut pids = Vec::new();
    for _ in 0..6 {
        let id = enqueue(&node, json!({"task": "py_pid"})).await;
        pids.push(
            node.until_ended(&id, limit).await["result"]
                .as_u64()
                .unwrap(),
        );
    }
    assert_eq!(pids[0], pids[2], "{pids:?}");
    assert_ne!(pids[2], pids[3], "a new process after 3 tasks: {pids:?}");
    assert_eq!(pids[3], pids[5], "{pids:?}");

    // The hog's task succeeds; the process is replaced after it.
    let hog = enqueue(&node, json!({"task": "py_hog", "args": [300]})).await;
    let record = node.until_ended(&hog, limit).await;
    assert_eq!(record["state"], "succeeded", "{record}");
    let hog_pid = record["result"].as_u64().unwrap();
    let next = enqueue(&node, json!({"task": "py_pid"})).await;
    let after = node.until_ended(&next, limit).await["result"]
        .as_u64()
        .unwrap();
    assert_ne!(hog_pid, after, "replaced after going over memory_limit_mb");
    let pools = node.get_json("/pools").await;
    let totals = &pools["pools"]["py"]["totals"];
    assert!(totals["memory_kills"].as_u64() >= Some(1), "{totals}");
    assert!(totals["recycled"].as_u64() >= Some(2), "{totals}");
    drop(node);

    // concurrency = 4: four async tasks of 0.6 s on one process, at once.
    let tasks = python_task("py_echo_async", "");
    let node = Node::start(
        &config("processes = 1\nspares = 0\nconcurrency = 4", 4, &tasks),
        &[],
    );
    warm(&node, 1).await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for x in 0..4 {
        ids.push(enqueue(&node, json!({"task": "py_echo_async", "args": [x, 0.6]})).await);
    }
    let mut seen = HashSet::new();
    for id in &ids {
        let record = node.until_ended(id, limit).await;
        assert_eq!(record["state"], "succeeded", "{record}");
        seen.insert(record["result"]["pid"].as_u64().unwrap());
    }
    assert_eq!(seen.len(), 1, "one process ran them all: {seen:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "they overlapped: {:?} for 4 × 0.6 s",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_that_fails_to_import_makes_the_pool_fatal_with_the_error_in_health() {
    let text = config(
        "processes = 1\nstartretries = 2",
        1,
        &python_task("py_pid", ""),
    )
    .replace(
        "modules = [\"worker_tasks\"]",
        "modules = [\"no_such_module\"]",
    );
    let node = Node::start(&text, &[]);
    let pool = eventually("the pool fatal", Duration::from_secs(30), async || {
        let pools = node.get_json("/pools").await;
        let pool = pools["pools"]["py"].clone();
        (pool["health"] == "fatal").then_some(pool)
    })
    .await;
    assert!(
        pool["reason"]
            .as_str()
            .unwrap()
            .contains("No module named 'no_such_module'"),
        "{pool}"
    );
    let health = node.get("/health").await;
    assert_eq!(health.status(), 503);
    let body = health.text().await.unwrap();
    assert!(body.contains("ModuleNotFoundError"), "{body}");
    let claim = node.post("/pools/py/claim", None).await;
    assert_eq!(claim.status(), 409, "a worker pool takes no claims");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn django_is_set_up_once_per_process_and_stale_connections_are_closed() {
    let Some(python) = common::venv_python("django") else {
        return;
    };
    let project = common::repo("tests/fixtures/django");
    let text = format!(
        r#"
[http]
bind = "127.0.0.1:0"

[queues.py]
concurrency = 1

[workers.py]
python = "{python}"
modules = ["shop.tasks"]
processes = 1
spares = 0
cwd = "{project}"
env = {{ DJANGO_SETTINGS_MODULE = "shop.settings", PYTHONPATH = "{src}:{project}" }}

[tasks.count_orders]
queue = "py"
handler = {{ kind = "python", workers = "py" }}
"#,
        python = python.display(),
        project = project.display(),
        src = common::repo("python/src").display(),
    );
    let node = Node::start(&text, &[]);
    warm(&node, 1).await;
    let limit = Duration::from_secs(20);
    let first = enqueue(&node, json!({"task": "count_orders"})).await;
    let first = node.until_ended(&first, limit).await;
    assert_eq!(first["state"], "succeeded", "{first}");
    let second = enqueue(&node, json!({"task": "count_orders"})).await;
    let second = node.until_ended(&second, limit).await;
    let (a, b) = (&first["result"], &second["result"]);
    assert_eq!(a["orders"], 0, "{a}");
    assert_eq!(a["pid"], b["pid"], "one process, set up once: {a} {b}");
    assert_eq!(b["setups"], 1, "django.setup() ran once: {b}");
    assert_eq!(
        b["open_at_start"], false,
        "CONN_MAX_AGE = 0: the connection was closed after the first task: {b}"
    );
}

/// More tasks than processes (queue concurrency 3, one process): the ones that find no free
/// process wait in line and the process takes them as it frees up (none is retried); one that
/// waits past `claim_timeout` is retried (class `no_agent`) — here it has no retries left, so
/// it is dead with that reason; one revoked (terminate) while it waits leaves the line without
/// touching the process, whose task finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_wait_in_line_for_a_process_until_claim_timeout() {
    let tasks = [
        python_task("py_soft", ""),
        python_task("py_add", "max_retries = 0"),
        python_task("py_pid", ""),
    ]
    .join("\n");
    let workers = "processes = 1\nspares = 0\nclaim_timeout = \"1500ms\"";
    let node = Node::start(&config(workers, 3, &tasks), &[]);
    warm(&node, 1).await;
    let limit = Duration::from_secs(20);
    let first_pid = node
        .until_ended(&enqueue(&node, json!({"task": "py_pid"})).await, limit)
        .await["result"]
        .clone();

    // Two wait behind a 0.8 s task, then run on the process it frees.
    let busy = enqueue(&node, json!({"task": "py_soft", "args": [0.8]})).await;
    let waiting: Vec<String> =
        enqueue_each(&node, 2, |n| json!({"task": "py_add", "args": [n, 1]})).await;
    for (n, id) in waiting.iter().enumerate() {
        let record = node.until_ended(id, limit).await;
        assert_eq!(
            (
                record["state"].clone(),
                record["result"].clone(),
                record["attempts"].clone()
            ),
            (json!("succeeded"), json!(n + 1), json!(1)),
            "{record}"
        );
    }
    assert_eq!(node.until_ended(&busy, limit).await["result"], "slept");

    // One waits longer than claim_timeout: retried as no_agent, dead without retries left.
    let long = enqueue(&node, json!({"task": "py_soft", "args": [3.0]})).await;
    eventually("the long task running", limit, async || {
        let pools = node.get_json("/pools").await;
        (pools["pools"]["py"]["counts"]["assigned"] == 1).then_some(())
    })
    .await;
    let starved = enqueue(&node, json!({"task": "py_add", "args": [1, 1]})).await;
    let record = node.until_ended(&starved, limit).await;
    assert_eq!(record["state"], "dead", "{record}");
    let error = record["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no idle worker process within claim_timeout"),
        "{record}"
    );

    // One revoked while it waits: out of the line; the long task is left alone.
    let revoked = enqueue(&node, json!({"task": "py_add", "args": [2, 2]})).await;
    eventually("the revoked task waiting", limit, async || {
        let pools = node.get_json("/pools").await;
        (pools["pools"]["py"]["waiting_claims"] == 1).then_some(())
    })
    .await;
    let answer = reqwest::Client::new()
        .post(format!("{}/tasks/{revoked}/revoke", node.url))
        .json(&json!({"terminate": true}))
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    let record = node.until_ended(&revoked, limit).await;
    assert_eq!(record["state"], "dead", "{record}");
    let record = node.until_ended(&long, limit).await;
    assert_eq!(
        (record["state"].clone(), record["result"].clone()),
        (json!("succeeded"), json!("slept")),
        "{record}"
    );
    let pid = node
        .until_ended(&enqueue(&node, json!({"task": "py_pid"})).await, limit)
        .await["result"]
        .clone();
    assert_eq!(pid, first_pid, "the process was never replaced");
    let pools = node.get_json("/pools").await;
    assert_eq!(pools["pools"]["py"]["waiting_claims"], 0, "{pools}");
}

/// Enqueues `n` tasks made by `body(i)` (i = 0..n) one after the other; their ids.
async fn enqueue_each(node: &Node, n: u64, body: impl Fn(u64) -> Value) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(enqueue(node, body(i)).await);
    }
    ids
}
