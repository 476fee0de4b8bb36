//! The observability starters against a running node: every series whose labels are known at
//! start is served from the first scrape (at 0), `rt_build_info` says what the binary is,
//! retries are counted by error class, and the Grafana dashboard and the Prometheus alert
//! rules in `deploy/` use only metrics and labels a node serves (so they cannot drift from it).

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::scrape::Scrape;
use crate::common::{Node, eventually, repo};
use actors::test_util::RedisServer;
use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use yaml_rust2::YamlLoader;

/// Every class a retry is counted under (the `class` label of `rt_tasks_retried_total`).
const CLASSES: [&str; 12] = [
    "timeout",
    "soft_timeout",
    "connect",
    "request_timeout",
    "http_429",
    "http_5xx",
    "transport",
    "exit_code",
    "signal",
    "no_agent",
    "crashed",
    "native",
];

/// A node with two queues, tasks, both kinds of resource and a pool: every kind of series.
fn full_config(redis: &str, upstream: &str) -> String {
    format!(
        r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"

[broker]
url = "{redis}"

[queues.chat]
concurrency = 2

[queues.default]
concurrency = 3

[tasks.rt_echo]
queue = "chat"
handler = {{ kind = "native" }}

[tasks.rt_noop]
queue = "default"
handler = {{ kind = "native" }}

[tasks.assign_voice_agent]
queue = "default"
handler = {{ kind = "pool", pool = "voice" }}

[resources.zep]
kind = "zep"
base_url = "{upstream}/zep"
api_key_env = "OBS_ZEP_KEY"

[resources.openai]
kind = "openai"
base_url = "{upstream}/v1"
api_key_env = "OBS_OPENAI_KEY"
requests_per_minute = 60

[pools.voice]
command = "/bin/sh"
args = ["-c", "echo 'Pipeline ready'; exec /bin/sleep 600"]
min_idle = 1
max = 2
startup_timeout = "5s"
ready_pattern = "Pipeline ready"
stop_timeout = "1s"
"#
    )
}

/// A base URL where nothing listens (a port bound, then released).
fn closed_url() -> String {
    format!("http://127.0.0.1:{}", common::fakes::free_port())
}

fn start_full(redis: &RedisServer) -> Node {
    let config = full_config(&redis.url(), &closed_url());
    Node::start(
        &config,
        &[("OBS_ZEP_KEY", "z-key"), ("OBS_OPENAI_KEY", "o-key")],
    )
}

/// Every actor of `GET /actors`: (path, kind).
fn actors(tree: &Value, out: &mut Vec<(String, String)>) {
    for node in tree.as_array().expect("a list of actors") {
        out.push((
            node["path"].as_str().unwrap().to_string(),
            node["kind"].as_str().unwrap().to_string(),
        ));
        actors(&node["children"], out);
    }
}

/// Scrapes until the pool has its idle agent (so every collector has something to say).
async fn settled_scrape(node: &Node) -> Scrape {
    eventually(
        "the pool's idle agent",
        Duration::from_secs(20),
        async || {
            let m = Scrape::of(node).await;
            let idle = m.get("rt_pool_agents", &[("pool", "voice"), ("state", "idle")]);
            if idle == Some(1.0) {
                Ok(m)
            } else {
                Err(format!("{}\nlog:\n{}", m.text, node.log()))
            }
        },
    )
    .await
}

#[tokio::test]
async fn every_series_known_at_start_is_served_at_zero_from_the_first_scrape() {
    let redis = RedisServer::start();
    let node = start_full(&redis);
    let m = Scrape::of(&node).await;

    // Restarts: every actor of the tree, at 0, before anything restarted.
    let mut tree = Vec::new();
    actors(&node.get_json("/actors").await, &mut tree);
    assert!(tree.len() >= 8, "{tree:?}");
    for (path, kind) in &tree {
        assert_eq!(
            m.get(
                "rt_actor_restarts_total",
                &[("path", path.as_str()), ("kind", kind.as_str())]
            ),
            Some(0.0),
            "rt_actor_restarts_total of {path} ({kind}) in:\n{}",
            m.text
        );
    }

    // Every task counter of the configured tasks on their queues; retries once per class,
    // dead letters once per reason.
    for (task, queue) in [
        ("rt_echo", "chat"),
        ("rt_noop", "default"),
        ("assign_voice_agent", "default"),
    ] {
        let labels = [("task", task), ("queue", queue)];
        for name in [
            "rt_tasks_enqueued_total",
            "rt_tasks_started_total",
            "rt_tasks_succeeded_total",
            "rt_tasks_failed_total",
            "rt_tasks_deferred_total",
            "rt_task_duration_seconds_count",
            "rt_task_wait_seconds_count",
        ] {
            assert_eq!(m.get(name, &labels), Some(0.0), "{name} of {task}");
        }
        for class in CLASSES {
            let labels = [("task", task), ("queue", queue), ("class", class)];
            assert_eq!(
                m.get("rt_tasks_retried_total", &labels),
                Some(0.0),
                "retries of {task} for {class}"
            );
        }
        for reason in ["failed", "rejected", "poison"] {
            let labels = [("task", task), ("queue", queue), ("reason", reason)];
            assert_eq!(
                m.get("rt_tasks_dead_lettered_total", &labels),
                Some(0.0),
                "dead letters of {task} for {reason}"
            );
        }
    }
    // No error text, no class of a permanent error.
    assert!(!m.text.contains("class=\"permanent\""), "{}", m.text);

    // Consumers, depths, the broker.
    for queue in ["chat", "default"] {
        assert!(
            m.get("rt_consumer_concurrency", &[("queue", queue)])
                .is_some()
        );
        assert_eq!(
            m.get("rt_consumer_in_flight", &[("queue", queue)]),
            Some(0.0)
        );
        for state in ["ready", "delayed", "in_flight", "dead"] {
            let depth = m.get("rt_queue_depth", &[("queue", queue), ("state", state)]);
            assert_eq!(depth, Some(0.0), "{queue} {state}");
        }
    }
    assert_eq!(m.get("rt_broker_connected", &[]), Some(1.0));

    // Resources and pools (read at the scrape).
    for resource in ["zep", "openai"] {
        let labels = [("resource", resource)];
        assert_eq!(m.get("rt_resource_misconfigured", &labels), Some(0.0));
    }
    assert_eq!(
        m.get(
            "rt_breaker_state",
            &[("resource", "zep"), ("state", "closed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get("rt_breaker_rejected_total", &[("resource", "zep")]),
        Some(0.0)
    );
    assert_eq!(
        m.get("rt_limiter_waiting", &[("resource", "openai")]),
        Some(0.0)
    );
    let m = settled_scrape(&node).await;
    for (state, value) in [("ok", 1.0), ("backoff", 0.0), ("fatal", 0.0)] {
        assert_eq!(
            m.get("rt_pool_health", &[("pool", "voice"), ("state", state)]),
            Some(value),
            "pool health {state}"
        );
    }
    assert_eq!(
        m.get("rt_pool_startup_failures_total", &[("pool", "voice")]),
        Some(0.0)
    );
}

#[tokio::test]
async fn build_info_names_the_version_commit_and_compiler() {
    let node = Node::start("[http]\nbind = \"127.0.0.1:0\"\n[queues.default]\n", &[]);
    let m = Scrape::of(&node).await;
    let infos: Vec<_> = m
        .samples
        .iter()
        .filter(|((name, _), _)| name == "rt_build_info")
        .collect();
    assert_eq!(infos.len(), 1, "{}", m.text);
    let ((_, labels), value) = infos[0];
    assert_eq!(*value, 1.0);
    let names: Vec<&str> = labels.keys().map(String::as_str).collect();
    assert_eq!(names, ["git_sha", "rustc", "version"]);
    assert_eq!(labels["version"], env!("CARGO_PKG_VERSION"));
    // The commit of this checkout when git can tell (a clean clone can), else `unknown`.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8(out.stdout).unwrap().trim().to_string());
    match head {
        Some(head) if std::env::var("RT_GIT_SHA").is_err() => {
            assert_eq!(labels["git_sha"], head)
        }
        _ => assert!(
            labels["git_sha"] == "unknown"
                || labels["git_sha"].bytes().all(|b| b.is_ascii_hexdigit()),
            "{labels:?}"
        ),
    }
    let rustc = &labels["rustc"];
    assert!(
        rustc.starts_with(|c: char| c.is_ascii_digit()) && rustc.contains('.'),
        "{rustc}"
    );
}

/// A fake app for the `http` tasks: `/busy` answers 429, `/down` 503, `/slow` takes 5 s.
async fn fake_app() -> String {
    let app = Router::new()
        .route("/busy", post(|| async { StatusCode::TOO_MANY_REQUESTS }))
        .route("/down", post(|| async { StatusCode::SERVICE_UNAVAILABLE }))
        .route(
            "/slow",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                StatusCode::OK
            }),
        );
    format!("http://{}", common::fakes::serve(app).await)
}

#[tokio::test]
async fn retries_are_counted_by_error_class() {
    let app = fake_app().await;
    let closed = closed_url();
    // Each task fails once for its class, is retried once, then dead-lettered.
    let tasks = [
        (
            "rt_fail",
            "native",
            r#"{ kind = "native" }"#.to_string(),
            "",
        ),
        (
            "rt_sleep",
            "soft_timeout",
            r#"{ kind = "native" }"#.to_string(),
            "soft_time_limit = \"100ms\"\ntime_limit = \"5s\"",
        ),
        (
            "hangs",
            "timeout",
            r#"{ kind = "exec", command = "/bin/sh", args = ["-c", "exec /bin/sleep 30"] }"#
                .to_string(),
            "time_limit = \"300ms\"",
        ),
        (
            "tempfail",
            "exit_code",
            r#"{ kind = "exec", command = "/bin/sh", args = ["-c", "exit 75"] }"#.to_string(),
            "",
        ),
        (
            "killed",
            "signal",
            r#"{ kind = "exec", command = "/bin/sh", args = ["-c", "kill -KILL $$"] }"#.to_string(),
            "",
        ),
        (
            "busy",
            "http_429",
            format!(r#"{{ kind = "http", url = "{app}/busy" }}"#),
            "",
        ),
        (
            "down",
            "http_5xx",
            format!(r#"{{ kind = "http", url = "{app}/down" }}"#),
            "",
        ),
        (
            "slow",
            "request_timeout",
            format!(r#"{{ kind = "http", url = "{app}/slow", timeout = "150ms" }}"#),
            "",
        ),
        (
            "unreachable",
            "connect",
            format!(r#"{{ kind = "http", url = "{closed}/task" }}"#),
            "",
        ),
    ];
    let mut config = String::from(
        "[runtime]\nshutdown_grace = \"2s\"\n[http]\nbind = \"127.0.0.1:0\"\n\
         [queues.default]\nconcurrency = 16\n",
    );
    for (task, _, handler, extra) in &tasks {
        config.push_str(&format!(
            "[tasks.{task}]\nqueue = \"default\"\nhandler = {handler}\nmax_retries = 1\n\
             backoff = \"10ms\"\nbackoff_max = \"10ms\"\n{extra}\n"
        ));
    }
    let node = Node::start(&config, &[]);
    let client = reqwest::Client::new();
    for (task, ..) in &tasks {
        let kwargs = json!({ "ms": 5000 });
        let response = client
            .post(format!("{}/tasks", node.url))
            .json(&json!({ "task": task, "kwargs": kwargs }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 202, "{task}");
    }
    let m = eventually(
        "every task dead-lettered",
        Duration::from_secs(30),
        async || {
            let m = Scrape::of(&node).await;
            if m.sum("rt_tasks_dead_lettered_total", &[]) >= tasks.len() as f64 {
                Ok(m)
            } else {
                Err(format!("{}\nlog:\n{}", m.text, node.log()))
            }
        },
    )
    .await;
    for (task, class, ..) in &tasks {
        for other in CLASSES {
            let labels = [("task", *task), ("queue", "default"), ("class", other)];
            let expected = if other == *class { 1.0 } else { 0.0 };
            assert_eq!(
                m.get("rt_tasks_retried_total", &labels),
                Some(expected),
                "{task}: retries for {other} (it fails with {class})\n{}",
                m.text
            );
        }
        let dead = [("task", *task), ("queue", "default"), ("reason", "failed")];
        assert_eq!(m.get("rt_tasks_dead_lettered_total", &dead), Some(1.0));
    }
    // The error texts (a URL, a command line) are in the dead letters, never in a label.
    assert!(!m.text.contains("127.0.0.1"), "{}", m.text);
    assert!(!m.text.contains("EX_TEMPFAIL"), "{}", m.text);
}

/// What a PromQL expression uses: metric names (`rt_…`) and label names (in matchers,
/// `by`/`without`/`on`/`ignoring` lists, and `{{label}}` / `$labels.label` templates).
#[derive(Debug, Default)]
struct Uses {
    /// Metric name → label names used in its own matchers.
    metrics: BTreeMap<String, BTreeSet<String>>,
    /// Label names used in groupings and templates (each must exist on one of the metrics of
    /// the same expression).
    grouped: BTreeSet<String>,
    /// Whether it uses Prometheus' own `up` (of the scrape, not of the node).
    up: bool,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Reads the uses of one expression (a light scan, not a PromQL parser: enough for the
/// expressions in `deploy/`, which a test of the rules also runs through `promtool`).
fn uses_of(expr: &str) -> Uses {
    let mut uses = Uses::default();
    let chars: Vec<char> = expr.chars().collect();
    let word_at = |i: usize| -> String {
        chars[i..]
            .iter()
            .take_while(|c| is_name_char(**c))
            .collect()
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' {
            // A string literal (a label value or a regex): skipped.
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            continue;
        }
        let starts_word = is_name_char(c) && (i == 0 || !is_name_char(chars[i - 1]));
        if !starts_word {
            i += 1;
            continue;
        }
        let word = word_at(i);
        i += word.len();
        if word == "up" && chars.get(i) == Some(&'{') {
            uses.up = true;
        }
        if word.starts_with("rt_") {
            let labels = uses.metrics.entry(word).or_default();
            if chars.get(i) == Some(&'{') {
                // Matchers: `name op "value"`, separated by commas, to the closing brace.
                i += 1;
                while i < chars.len() && chars[i] != '}' {
                    if chars[i] == ',' || chars[i].is_whitespace() {
                        i += 1;
                        continue;
                    }
                    let name = word_at(i);
                    assert!(!name.is_empty(), "a matcher without a name in `{expr}`");
                    i += name.len();
                    labels.insert(name);
                    while i < chars.len() && chars[i] != '"' && chars[i] != '\'' {
                        i += 1;
                    }
                    let quote = chars[i];
                    i += 1;
                    while i < chars.len() && chars[i] != quote {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                    i += 1;
                }
                i += 1;
            }
        } else if [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ]
        .contains(&word.as_str())
        {
            let rest: String = chars[i..].iter().collect();
            let rest = rest.trim_start();
            if let Some(list) = rest.strip_prefix('(') {
                let list = &list[..list.find(')').unwrap()];
                for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    uses.grouped.insert(name.to_string());
                }
            }
        }
    }
    uses
}

/// Label names in templates: `{{queue}}` (Grafana legends), `$labels.queue` (alert text).
fn template_labels(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for part in text.split("{{").skip(1) {
        let name = part.split("}}").next().unwrap_or("").trim();
        if !name.is_empty() && name.chars().all(is_name_char) {
            out.insert(name.to_string());
        }
    }
    for part in text.split("$labels.").skip(1) {
        let name: String = part.chars().take_while(|c| is_name_char(*c)).collect();
        out.insert(name);
    }
    out
}

/// Labels Prometheus adds to every scraped series (the node does not serve them).
const FROM_SCRAPE: [&str; 2] = ["instance", "job"];

/// Checks `uses` (plus `templates`) of one expression against a scrape; the problems found.
fn check_uses(
    what: &str,
    uses: &Uses,
    templates: &BTreeSet<String>,
    served: &BTreeMap<String, BTreeSet<String>>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut available: BTreeSet<String> = BTreeSet::new();
    for (metric, labels) in &uses.metrics {
        match served.get(metric) {
            None => problems.push(format!("{what}: no metric `{metric}` in GET /metrics")),
            Some(has) => {
                available.extend(has.iter().cloned());
                for label in labels {
                    if !has.contains(label) && !FROM_SCRAPE.contains(&label.as_str()) {
                        problems.push(format!("{what}: `{metric}` has no label `{label}`"));
                    }
                }
            }
        }
    }
    for label in uses.grouped.iter().chain(templates) {
        if !FROM_SCRAPE.contains(&label.as_str()) && !available.contains(label) {
            problems.push(format!(
                "{what}: label `{label}` is on none of its metrics {:?}",
                uses.metrics.keys().collect::<Vec<_>>()
            ));
        }
    }
    if uses.metrics.is_empty() && !uses.up {
        problems.push(format!("{what}: uses no rt_ metric"));
    }
    problems
}

/// Grafana's variables and interval macros, replaced by something PromQL accepts.
fn expand_grafana(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("${queue:regex}", "chat")
        .replace("$queue", "chat")
        .replace("$task", "rt_echo")
        .replace("$instance", ".*")
}

#[tokio::test]
async fn dashboard_and_alert_rules_use_only_metrics_and_labels_a_node_serves() {
    let redis = RedisServer::start();
    let node = start_full(&redis);
    let m = settled_scrape(&node).await;
    let served = m.labels_by_name();
    let mut problems = Vec::new();

    // The dashboard: every target's expression and legend, and the variables' queries.
    let text = std::fs::read_to_string(repo("deploy/grafana/runtime.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut exprs = 0;
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = expand_grafana(target["expr"].as_str().expect("a target expr"));
            let legend = target["legendFormat"].as_str().unwrap_or("");
            let what = format!("dashboard panel `{title}`");
            problems.extend(check_uses(
                &what,
                &uses_of(&expr),
                &template_labels(legend),
                &served,
            ));
            exprs += 1;
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(query) = variable["query"]["query"]
            .as_str()
            .or(variable["query"].as_str())
        {
            if let Some(inner) = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
            {
                let (metric, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
                let mut uses = uses_of(metric);
                uses.grouped.insert(label.trim().to_string());
                let what = format!("dashboard variable `{}`", variable["name"]);
                problems.extend(check_uses(&what, &uses, &BTreeSet::new(), &served));
            }
        }
    }
    assert!(exprs >= 15, "only {exprs} expressions in the dashboard");

    // The alert rules: each rule's expression and the labels its annotations use.
    let text = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    let docs = YamlLoader::load_from_str(&text).expect("the rules are YAML");
    let mut alerts = 0;
    for group in docs[0]["groups"].as_vec().expect("groups") {
        for rule in group["rules"].as_vec().expect("rules") {
            let name = rule["alert"].as_str().expect("an alert name");
            let expr = rule["expr"].as_str().expect("an expr");
            let mut templates = BTreeSet::new();
            for (_, text) in rule["annotations"].as_hash().into_iter().flatten() {
                templates.extend(template_labels(text.as_str().unwrap_or("")));
            }
            let what = format!("alert {name}");
            problems.extend(check_uses(&what, &uses_of(expr), &templates, &served));
            alerts += 1;
        }
    }
    assert!(alerts >= 7, "only {alerts} alerts");

    assert!(
        problems.is_empty(),
        "{}\n\nserved: {served:#?}",
        problems.join("\n")
    );
}

#[test]
fn the_expression_scan_finds_metrics_matchers_and_groupings() {
    let uses = uses_of(
        r#"histogram_quantile(0.95, sum by (le, queue) (rate(rt_task_wait_seconds_bucket{queue=~"chat|x", task!="a,b"}[5m]))) > on (queue) group_left rt_consumer_concurrency"#,
    );
    let metrics: Vec<&String> = uses.metrics.keys().collect();
    assert_eq!(
        metrics,
        ["rt_consumer_concurrency", "rt_task_wait_seconds_bucket"]
    );
    let labels: Vec<&String> = uses.metrics["rt_task_wait_seconds_bucket"].iter().collect();
    assert_eq!(labels, ["queue", "task"]);
    let grouped: Vec<&String> = uses.grouped.iter().collect();
    assert_eq!(grouped, ["le", "queue"]);
    let served = BTreeMap::from([(
        "rt_task_wait_seconds_bucket".to_string(),
        BTreeSet::from(["le".to_string(), "queue".to_string()]),
    )]);
    let problems = check_uses("x", &uses, &BTreeSet::new(), &served);
    assert_eq!(
        problems,
        [
            "x: no metric `rt_consumer_concurrency` in GET /metrics",
            "x: `rt_task_wait_seconds_bucket` has no label `task`",
        ]
    );
    assert_eq!(
        template_labels("{{queue}} / {{ task }} $labels.resource"),
        BTreeSet::from(["queue".into(), "task".into(), "resource".into()])
    );
}

/// promtool (Debian's `prometheus` package ships it; .ci/run unpacks it into target/tools).
fn promtool() -> Option<PathBuf> {
    common::tool(
        "PROMTOOL",
        &["promtool"],
        &[repo("target/tools")],
        "`apt-get download prometheus` and unpack usr/bin/promtool, as .ci/run does into \
         target/tools",
        true,
    )
}

/// Runs `promtool args…` (with `stdin`), asserting it succeeds.
fn run_promtool(promtool: &Path, args: &[&str], stdin: Option<&str>) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(promtool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn rules_dashboard_queries_and_the_exposition_pass_promtool() {
    let Some(promtool) = promtool() else {
        return;
    };
    let prometheus = repo("deploy/prometheus");
    let path = |name: &str| prometheus.join(name).display().to_string();
    // The rules parse, their unit tests pass (each alert fires on what should fire it, with
    // its labels and annotations), and the compose Prometheus config loads them.
    run_promtool(&promtool, &["check", "rules", &path("alerts.yml")], None);
    run_promtool(
        &promtool,
        &["test", "rules", &path("alerts.test.yml")],
        None,
    );
    run_promtool(
        &promtool,
        &["check", "config", &path("prometheus.yml")],
        None,
    );

    // Every dashboard query is valid PromQL: checked as recording rules of a scratch file.
    let text = std::fs::read_to_string(repo("deploy/grafana/runtime.json")).unwrap();
    let dashboard: Value = serde_json::from_str(&text).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (n, target) in dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().into_iter().flatten())
        .enumerate()
    {
        let expr = expand_grafana(target["expr"].as_str().unwrap());
        rules.push_str(&format!(
            "      - record: dashboard:query_{n}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let scratch = common::Scratch::new();
    let file = scratch.write("dashboard-rules.yml", &rules);
    run_promtool(
        &promtool,
        &["check", "rules", &file.display().to_string()],
        None,
    );

    // The exposition of a node with every kind of series follows Prometheus' conventions.
    let redis = RedisServer::start();
    let node = start_full(&redis);
    let m = settled_scrape(&node).await;
    run_promtool(&promtool, &["check", "metrics"], Some(&m.text));
}
