//! Test harness: runs the real `runtime` binary on a throw-away config and talks to it.

#![allow(dead_code, unreachable_pub)]

pub mod fakes;
pub mod scrape;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::broker::{AnyBroker, BrokerSettings};
use actors::heartbeat::{HeartbeatActor, HeartbeatArgs};
use actors::resource::Resources;
use actors::supervisor::{
    Backoff, ChildSpec, Intensity, Restart, Strategy, SupervisorSpec, start_root,
};
use actors::tree::Tree;
use runtime::config::{Environment, compile_str};
use runtime::http::AppState;
use tokio::time::Instant;

/// The built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_runtime")
}

/// A command-line tool a test drives (promtool, systemd-analyze): `$env_var` when set, else the
/// first of `names` on `PATH` or in `extra_dirs`. Where there is none it prints `SKIPPED: …`
/// with `install` (how to get it) and answers `None` — except under CI (`CI` set) when
/// `required_in_ci`, where a missing tool fails the test (.ci/run installs those).
pub fn tool(
    env_var: &str,
    names: &[&str],
    extra_dirs: &[PathBuf],
    install: &str,
    required_in_ci: bool,
) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(extra_dirs.iter().cloned())
        .collect();
    let found = names
        .iter()
        .find_map(|name| dirs.iter().map(|dir| dir.join(name)).find(|p| p.is_file()));
    if found.is_none() {
        assert!(
            !required_in_ci || std::env::var_os("CI").is_none(),
            "{} is not installed, and CI must run this check ({install})",
            names[0]
        );
        println!(
            "SKIPPED: this check needs {} ({install}, or set {env_var}); none found",
            names[0]
        );
    }
    found
}

/// A path inside the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The address a `runtime` child wrote to `path` (its `RT_ADDRESS_FILE`, written once it
/// serves HTTP), waiting up to `limit`; `None` when it exited or the time ran out first.
pub fn wait_address(child: &mut Child, path: &Path, limit: Duration) -> Option<String> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            return Some(text.trim().to_string());
        }
        if child.try_wait().ok().flatten().is_some() || Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a probe of [`eventually`] answers: done (with a value), or not yet (with what it saw,
/// for the panic message).
pub trait Probe {
    type Done;
    fn done(self) -> Result<Self::Done, String>;
}

impl Probe for bool {
    type Done = ();
    fn done(self) -> Result<(), String> {
        if self { Ok(()) } else { Err("false".into()) }
    }
}

impl<T> Probe for Option<T> {
    type Done = T;
    fn done(self) -> Result<T, String> {
        self.ok_or_else(|| "nothing yet".into())
    }
}

impl<T, E: std::fmt::Display> Probe for Result<T, E> {
    type Done = T;
    fn done(self) -> Result<T, String> {
        self.map_err(|seen| seen.to_string())
    }
}

/// Polls `probe` (first at once, then after 5 ms, doubling up to 50 ms) until it is done or
/// `limit` has passed; what it saw last when the time ran out.
pub async fn try_eventually<P: Probe>(
    limit: Duration,
    mut probe: impl AsyncFnMut() -> P,
) -> Result<P::Done, String> {
    let end = Instant::now() + limit;
    let mut pause = Duration::from_millis(5);
    loop {
        let seen = match probe().await.done() {
            Ok(done) => return Ok(done),
            Err(seen) => seen,
        };
        if Instant::now() >= end {
            return Err(seen);
        }
        tokio::time::sleep(pause.min(end.saturating_duration_since(Instant::now()))).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// [`try_eventually`], panicking with `what`, `limit` and the last thing seen when the time
/// runs out. `probe` answers `bool`, `Option<T>` or `Result<T, seen>`.
pub async fn eventually<P: Probe>(
    what: &str,
    limit: Duration,
    probe: impl AsyncFnMut() -> P,
) -> P::Done {
    match try_eventually(limit, probe).await {
        Ok(done) => done,
        Err(seen) => panic!("timed out after {limit:?} waiting for {what}; last seen: {seen}"),
    }
}

/// A scratch directory removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("runtime-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write scratch file");
        path
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running node: the child process, its base URL and everything it logged so far (stderr)
/// and printed (stdout).
pub struct Node {
    child: Child,
    pub url: String,
    log: Arc<Mutex<Vec<String>>>,
    out: Arc<Mutex<Vec<String>>>,
    _scratch: Scratch,
}

impl Node {
    /// Starts the binary on `config` (TOML text; use `bind = "127.0.0.1:0"`) with `envs`, and
    /// waits until its HTTP server listens.
    pub fn start(config: &str, envs: &[(&str, &str)]) -> Node {
        Self::start_with_args(config, &[], envs)
    }

    /// [`Node::start`] with more command-line arguments (e.g. `--log-format json`).
    pub fn start_with_args(config: &str, args: &[&str], envs: &[(&str, &str)]) -> Node {
        let scratch = Scratch::new();
        let path = scratch.write("actors.toml", config);
        let address = scratch.path().join("address");
        let mut cmd = Command::new(binary());
        cmd.arg("--config")
            .arg(&path)
            .args(args)
            .env("RT_ADDRESS_FILE", &address)
            .env("RUST_LOG", "info")
            .env_remove("RT_BROKER_URL")
            .env_remove("RT_HTTP_BIND")
            .env_remove("RT_CONFIG")
            .env_remove("RT_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn runtime");
        let out = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("stdout");
        let printed = Arc::clone(&out);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                printed.lock().unwrap().push(line);
            }
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let url = match wait_address(&mut child, &address, Duration::from_secs(30)) {
            Some(addr) => format!("http://{addr}"),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                panic!(
                    "node did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Node {
            child,
            url,
            log,
            out,
            _scratch: scratch,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Everything printed on stdout so far.
    pub fn stdout(&self) -> String {
        self.out.lock().unwrap().join("\n")
    }

    /// Sends `signal` (e.g. "TERM", "INT") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the reader thread take the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        reqwest::get(format!("{}{path}", self.url))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path).await.json().await.expect("JSON body")
    }

    pub async fn post(&self, path: &str, token: Option<&str>) -> reqwest::Response {
        let mut request = reqwest::Client::new().post(format!("{}{path}", self.url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"))
    }

    /// The record of task `id` once its state is one of `states`, waiting up to `limit`;
    /// panics with the last record and the node's log when it is not.
    pub async fn until_state(
        &self,
        id: &str,
        states: &[&str],
        limit: Duration,
    ) -> serde_json::Value {
        let path = format!("/tasks/{id}");
        let found = try_eventually(limit, async || {
            let response = self.get(&path).await;
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            match serde_json::from_str::<serde_json::Value>(&text) {
                Ok(record) if status == 200 && states.iter().any(|s| record["state"] == *s) => {
                    Ok(record)
                }
                _ => Err(format!("{status} {text}")),
            }
        })
        .await;
        found.unwrap_or_else(|seen| {
            panic!(
                "task {id} did not reach {states:?} within {limit:?}; last seen: {seen}; log:\n{}",
                self.log()
            )
        })
    }

    /// The record of task `id` once it has ended (`succeeded` or `dead`; before that a record
    /// says `queued`, `scheduled`, `running` or `retrying`), waiting up to `limit`.
    pub async fn until_ended(&self, id: &str, limit: Duration) -> serde_json::Value {
        self.until_state(id, &["succeeded", "dead"], limit).await
    }

    /// One sample of `GET /metrics`, named as it is written there
    /// (`rt_breaker_state{resource="zep",state="open"}`), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self
            .get("/metrics")
            .await
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// The actor at `path` in `GET /actors`, if listed.
    pub async fn actor(&self, path: &str) -> Option<serde_json::Value> {
        fn find(nodes: &serde_json::Value, path: &str) -> Option<serde_json::Value> {
            for node in nodes.as_array()? {
                if node["path"] == path {
                    return Some(node.clone());
                }
                if let Some(found) = find(&node["children"], path) {
                    return Some(found);
                }
            }
            None
        }
        find(&self.get_json("/actors").await, path)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw HTTP/1.1 request to `url` (the bytes as given: no client normalises the target or
/// the headers; add `Connection: close`) → status and body.
pub async fn raw_http(url: &str, request: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write request");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// The HTTP state of a node on `config` over `memory://`, with a running tree (a root and its
/// heartbeat) and `resources`: the router driven in process (`tower::ServiceExt::oneshot`).
pub async fn router_state(config: &str, resources: Resources) -> AppState {
    let broker = memory_broker(BrokerSettings::default()).await;
    app_state(config, broker, resources, Duration::from_millis(5)).await
}

/// A `memory://` broker with `settings`.
pub async fn memory_broker(settings: BrokerSettings) -> AnyBroker {
    AnyBroker::connect("memory://", settings).await.unwrap()
}

/// [`router_state`] over `broker`, the root restarting its heartbeat after `backoff`.
pub async fn app_state(
    config: &str,
    broker: AnyBroker,
    resources: Resources,
    backoff: Duration,
) -> AppState {
    let config = compile_str(config, Environment::Ignored).unwrap().config;
    let tree = Tree::new();
    let heartbeat = ChildSpec::new("heartbeat", "heartbeat", Restart::Permanent, |node| {
        (
            HeartbeatActor,
            HeartbeatArgs {
                node,
                interval: Duration::from_secs(1),
                node_started: Instant::now(),
            },
        )
    });
    let spec = SupervisorSpec {
        strategy: Strategy::OneForOne,
        intensity: Intensity::try_new(5, Duration::from_secs(10)).unwrap(),
        backoff: Backoff::try_new(backoff, backoff, 0.0).unwrap(),
        shutdown_timeout: Duration::from_secs(1),
        children: vec![heartbeat],
    };
    start_root(&tree, "root", spec).await.unwrap();
    AppState::new(tree, Arc::new(broker), Arc::new(resources), &config)
}

/// The project's venv (`target/py-venv`; `RT_TEST_PYTHON` overrides) if it imports `modules`;
/// `None` (the test skips) outside CI, a panic under CI.
pub fn venv_python(modules: &str) -> Option<PathBuf> {
    let path = std::env::var_os("RT_TEST_PYTHON")
        .map_or_else(|| repo("target/py-venv/bin/python"), PathBuf::from);
    let works = std::process::Command::new(&path)
        .args(["-c", &format!("import {modules}")])
        .output()
        .is_ok_and(|out| out.status.success());
    if works {
        return Some(path);
    }
    let message = format!(
        "{} cannot import {modules} (run .ci/run, which makes target/py-venv, or set RT_TEST_PYTHON)",
        path.display()
    );
    assert!(std::env::var_os("CI").is_none(), "{message}");
    eprintln!("SKIPPED: {message}");
    None
}

/// The real interpreter, not a pyenv shim (children get a clean environment: a shim would find
/// no `PYENV_*` variables).
pub fn python3() -> String {
    let out = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Processes: (pid, ppid, state, command line).
pub fn processes() -> Vec<(u32, u32, char, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|at| &stat[at + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(ppid)) = (
            fields.first().and_then(|s| s.chars().next()),
            fields.get(1).and_then(|p| p.parse().ok()),
        ) else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        out.push((pid, ppid, state, cmdline));
    }
    out
}

/// Zombie children of `parents` seen in two samples 300 ms apart (a child that just exited
/// and is being reaped is not one).
pub async fn zombies(parents: &[u32]) -> Vec<u32> {
    let sample = || -> Vec<u32> {
        processes()
            .into_iter()
            .filter(|p| p.2 == 'Z' && parents.contains(&p.1))
            .map(|p| p.0)
            .collect()
    };
    let first = sample();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = sample();
    first.into_iter().filter(|p| second.contains(p)).collect()
}

/// The events in the Redis stream `key` (`XRANGE key - +`), each as `(kind, task_id)`, oldest
/// first, whichever layout an entry has: one field per event (its kind → the rest as JSON; a
/// task's start and outcome written together share an entry), or one event with a field per
/// attribute (`kind`, `task_id`, …, as the Lua scripts write them).
pub async fn stream_events(
    conn: &mut impl redis::aio::ConnectionLike,
    key: &str,
) -> Vec<(String, Option<String>)> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    let mut events = Vec::new();
    for (_, fields) in entries {
        let field = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        if let Some(kind) = field("kind") {
            events.push((kind, field("task_id")));
            continue;
        }
        for (kind, rest) in fields {
            let rest: serde_json::Value = serde_json::from_str(&rest).unwrap();
            let task_id = rest["task_id"].as_str().map(str::to_string);
            events.push((kind, task_id));
        }
    }
    events
}
