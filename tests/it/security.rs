//! Security checks through the real binary: a non-loopback bind needs a token; mutating routes
//! need it; secrets never show up in logs, errors or any read route; exec commands never go
//! through a shell and payloads never reach argv; the egress proxy only reaches each resource's
//! base URL, drops the caller's credentials and hop-by-hop headers, caps bodies and never
//! echoes the injected key — whatever the upstream's `Content-Encoding`, escaped in JSON,
//! percent-encoded, or split across the chunks of a streamed answer, which reaches the caller
//! chunk by chunk — against fake upstreams on 127.0.0.1 that record what they got.

use std::io::{Read, Write};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{self, Node, Scratch, binary, fakes, raw_http};
use actors::resource::target_url;
use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flate2::Compression;
use flate2::write::{DeflateEncoder, GzEncoder, ZlibEncoder};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runtime::http::egress::check_path;
use serde_json::{Value, json};
use tokio::time::Instant;

const ADMIN_TOKEN: &str = "adm-9f3c2e7a51d84b06";
const ZEP_KEY: &str = "zk-5e1b7c0d93a24f68";
// With a `/`, which JSON may write as `\/`.
const OPENAI_KEY: &str = "sk-a71c4e9b/20d358f6";

/// A fake upstream: records every request; `…/redirect` answers 302 to `elsewhere`,
/// `…/reflect` answers with the request's `Authorization` in a header and in the body,
/// `…/reflect-{form}` the same written another way ([`reflection`]), `…/sse/…` an event
/// stream that pauses after its first event, `…/split-{form}-{at}` an event stream whose
/// event with the key is cut in two at byte `at`, anything else 200 `{"ok": true}`.
#[derive(Clone, Default)]
struct Upstream {
    fake: fakes::Upstream,
    /// When `…/sse/…` sent its first event, and when it sent the rest.
    sse: Arc<Mutex<(Option<Instant>, Option<Instant>)>>,
}

/// How long `…/sse/…` waits between its first event and the rest.
const SSE_PAUSE: Duration = Duration::from_millis(1500);

/// The key written as `form`: `plain`, `escaped` (JSON `\u` escapes in both cases of hex,
/// `\/`, a few characters as they are) or `percent`.
fn written(key: &str, form: &str) -> String {
    match form {
        "escaped" => key
            .chars()
            .enumerate()
            .map(|(n, c)| match (c, n % 3) {
                ('/', _) => "\\/".to_string(),
                (c, 0) => format!("\\u{:04X}", c as u32),
                (c, 1) => format!("\\u{:04x}", c as u32),
                (c, _) => c.to_string(),
            })
            .collect(),
        "percent" => key.bytes().map(|b| format!("%{b:02x}")).collect(),
        _ => key.to_string(),
    }
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

/// A 400 (an upstream echoing the request in its error; not a 401, which would mark the
/// resource misconfigured and stop the calls after it) whose JSON body and `x-reflected`
/// header carry the caller's key (from
/// `authorization`) in `mode`: `gzip`, `deflate` (zlib), `rawdeflate`, `gzip-gzip` (stacked),
/// `escaped`, `percent`, `gzip-escaped`, or `br` (a coding the proxy does not decode; the body
/// is plain text with the key).
fn reflection(mode: &str, authorization: &str) -> Response {
    let key = authorization
        .split_once(' ')
        .map_or(authorization, |(_, key)| key);
    let form = match mode {
        "escaped" | "gzip-escaped" => "escaped",
        "percent" => "percent",
        _ => "plain",
    };
    let body = format!(
        r#"{{"error": {{"message": "Incorrect API key provided: {}", "type": "invalid_request_error"}}}}"#,
        written(key, form)
    )
    .into_bytes();
    let (encoding, body) = match mode {
        "gzip" | "gzip-escaped" => (Some("gzip"), gzip(&body)),
        "gzip-gzip" => (Some("gzip, gzip"), gzip(&gzip(&body))),
        "deflate" => {
            let mut encoder = ZlibEncoder::new(Vec::new(), Compression::default());
            encoder.write_all(&body).unwrap();
            (Some("deflate"), encoder.finish().unwrap())
        }
        "rawdeflate" => {
            let mut encoder = DeflateEncoder::new(Vec::new(), Compression::default());
            encoder.write_all(&body).unwrap();
            (Some("deflate"), encoder.finish().unwrap())
        }
        "br" => (Some("br"), body),
        _ => (None, body),
    };
    let mut response = Response::builder()
        .status(StatusCode::BAD_REQUEST)
        .header("content-type", "application/json")
        .header("x-reflected", written(key, "percent"))
        .header("x-reflected-plain", authorization);
    if let Some(encoding) = encoding {
        response = response.header("content-encoding", encoding);
    }
    response.body(Body::from(body)).unwrap()
}

/// Decoded size of [`bomb`].
const BOMB: usize = 64 << 20;

/// 64 MiB of zeros in 64 KiB of gzip (one member of 1 MiB, 64 times: gzip allows that).
fn bomb() -> &'static [u8] {
    static BOMB_GZ: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BOMB_GZ.get_or_init(|| gzip(&vec![0u8; 1 << 20]).repeat(BOMB >> 20))
}

/// An event stream of `events`, each sent `pause` after the one before; `on_send(n)` is called
/// as event `n` goes out.
fn event_stream(
    events: Vec<Vec<u8>>,
    pause: Duration,
    on_send: impl Fn(usize) + Send + Sync + 'static,
) -> Response {
    let on_send = Arc::new(on_send);
    let stream = futures_util::stream::unfold((events.into_iter(), 0), move |(mut events, n)| {
        let on_send = Arc::clone(&on_send);
        async move {
            let event = events.next()?;
            if n > 0 {
                tokio::time::sleep(pause).await;
            }
            on_send(n);
            Some((Ok::<_, std::io::Error>(Bytes::from(event)), (events, n + 1)))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .unwrap()
}

impl Upstream {
    async fn start(&self, elsewhere: Option<String>) -> String {
        let me = self.clone();
        self.fake
            .start(move |request: fakes::Request| {
                let me = me.clone();
                let elsewhere = elsewhere.clone();
                async move {
                    let auth = request.header("authorization").unwrap_or("").to_string();
                    let uri = request.uri;
                    if uri.path().contains("/redirect") {
                        let to = format!("{}/stolen", elsewhere.unwrap_or_default());
                        return (StatusCode::FOUND, [("location", to)], String::new())
                            .into_response();
                    }
                    if let Some(rest) = uri.path().split("/reflect-").nth(1) {
                        let mode = rest.split('/').next().unwrap_or("");
                        return reflection(mode, &auth);
                    }
                    if uri.path().contains("/sse/") {
                        let sse = Arc::clone(&me.sse);
                        let chunk = |text: &str| {
                            format!(
                                "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
                            )
                            .into_bytes()
                        };
                        let events = vec![
                            chunk("Hel"),
                            [chunk("lo"), chunk(" there"), b"data: [DONE]\n\n".to_vec()].concat(),
                        ];
                        return event_stream(events, SSE_PAUSE, move |n| {
                            let mut sse = sse.lock().unwrap();
                            let at = Some(Instant::now());
                            if n == 0 { sse.0 = at } else { sse.1 = at }
                        });
                    }
                    if let Some(rest) = uri.path().split("/split-").nth(1) {
                        let key = auth.split_once(' ').map_or(auth.as_str(), |(_, key)| key);
                        let (form, at) = rest.split_once('-').unwrap();
                        let event = format!("data: {{\"k\": \"{}\"}}\n\n", written(key, form));
                        let at: usize = at.parse::<usize>().unwrap().min(event.len());
                        let (head, tail) = event.as_bytes().split_at(at);
                        let events = vec![head.to_vec(), tail.to_vec(), b"data: [DONE]\n\n".to_vec()];
                        return event_stream(events, Duration::from_millis(5), |_| {});
                    }
                    if uri.path().ends_with("/bomb") {
                        return (
                            StatusCode::OK,
                            [
                                ("content-type", "application/octet-stream"),
                                ("content-encoding", "gzip"),
                            ],
                            bomb().to_vec(),
                        )
                            .into_response();
                    }
                    if uri.path().contains("/reflect") {
                        return (
                            StatusCode::BAD_REQUEST,
                            [
                                ("content-type", "application/json".to_string()),
                                ("x-reflected", auth.clone()),
                            ],
                            json!({ "error": format!("bad key: {auth}") }).to_string(),
                        )
                            .into_response();
                    }
                    (
                        StatusCode::OK,
                        [("content-type", "application/json".to_string())],
                        json!({ "ok": true, "context": "" }).to_string(),
                    )
                        .into_response()
                }
            })
            .await
    }
}

fn config(upstream: &str, script: &str) -> String {
    format!(
        r#"
[runtime]
shutdown_grace = "5s"

[http]
bind = "127.0.0.1:0"
admin_token_env = "SEC_ADMIN_TOKEN"

[chaos]
enabled = true

[queues.default]
concurrency = 2

[resources.zep]
kind = "zep"
base_url = "{upstream}/api/v2"
api_key_env = "SEC_ZEP_KEY"
timeout = "2s"

[resources.openai]
kind = "openai"
base_url = "{upstream}/v1"
api_key_env = "SEC_OPENAI_KEY"

[tasks.probe_argv]
handler = {{ kind = "exec", command = "/bin/sh", args = ["{script}", "fixed arg", "--flag"] }}

[tasks.rt_fail]
handler = {{ kind = "native" }}
max_retries = 0

[pools.probe]
command = "/bin/sh"
args = ["{agent}", "fixed arg"]
env = {{ PATH = "/usr/bin:/bin" }}
min_idle = 1
max = 2
startup_timeout = "5s"
ready_pattern = "^READY$"
assigned_pattern = "^GOT$"
"#,
        agent = script.replace("probe.sh", "agent.sh"),
    )
}

const ENVS: [(&str, &str); 4] = [
    ("SEC_ADMIN_TOKEN", ADMIN_TOKEN),
    ("SEC_ZEP_KEY", ZEP_KEY),
    ("SEC_OPENAI_KEY", OPENAI_KEY),
    ("RUST_LOG", "debug"),
];

/// The script each pool agent runs: ready, then the assignment from stdin, its argv and its
/// environment saved beside it, keyed by its pid.
fn agent_script(scratch: &Scratch) {
    let dir = scratch.path().display();
    scratch.write(
        "agent.sh",
        &format!(
            "echo READY\n\
             read -r assignment\n\
             printf '%s\\n' \"$assignment\" > {dir}/assignment-$$.json\n\
             env > {dir}/env-$$.txt\n\
             tr '\\000' '|' < /proc/$$/cmdline > {dir}/argv-$$.tmp\n\
             mv {dir}/argv-$$.tmp {dir}/argv-$$.txt\n\
             echo GOT\n\
             sleep 1\n"
        ),
    );
}

/// The script the exec task runs: its own argv (from `/proc/$$/cmdline`) as the result, the
/// envelope it read on stdin saved beside it.
fn probe_script(scratch: &Scratch) -> String {
    let dir = scratch.path().display();
    scratch
        .write(
            "probe.sh",
            &format!(
                "read -r envelope\n\
                 printf '%s\\n' \"$envelope\" > {dir}/stdin.json\n\
                 argv=$(tr '\\000' '|' < /proc/$$/cmdline)\n\
                 printf '{{\"argv\": \"%s\"}}\\n' \"$argv\"\n"
            ),
        )
        .display()
        .to_string()
}

async fn enqueue(node: &Node, body: Value) -> String {
    let response = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let answer: Value = response.json().await.unwrap();
    answer["id"].as_str().unwrap().to_string()
}

/// Property: a path the proxy accepts, joined to a base URL, stays on the base URL's host and
/// port and under its path — over 20,000 seeded paths built from the pieces that usually
/// break out (dot segments plain and encoded, slashes, backslashes, schemes, `@`, `?`, `#`).
#[test]
fn a_path_the_proxy_accepts_never_leaves_the_base_url() {
    let pieces = [
        "a",
        "v1",
        "..",
        ".",
        "",
        "%2e",
        "%2E%2e",
        ".%2e",
        "%2f",
        "%2F",
        "%5c",
        "\\",
        "http:",
        "evil.example",
        "@evil",
        "user@evil",
        "?",
        "#",
        "%00",
        "%252e%252e",
        ";",
        "..;",
        "~",
        "%40",
        "%3a",
        ":",
        "%",
        "%zz",
        "\u{2025}",
        "\u{ff0e}\u{ff0e}",
        "\t",
        "x\ny",
    ];
    let base = reqwest::Url::parse("http://127.0.0.1:9/api/v2").unwrap();
    let mut rng = StdRng::seed_from_u64(0x5ec);
    let mut accepted = 0;
    for _ in 0..20_000 {
        let n = rng.random_range(1..6);
        let segments: Vec<&str> = (0..n)
            .map(|_| pieces[rng.random_range(0..pieces.len())])
            .collect();
        let path = format!("/{}", segments.join("/"));
        if check_path(&path).is_err() {
            continue;
        }
        accepted += 1;
        let target = target_url(&base, &path);
        let Ok(url) = reqwest::Url::parse(&target) else {
            continue; // not a URL at all: the client refuses to send it
        };
        assert_eq!(url.host_str(), Some("127.0.0.1"), "{path:?} → {url}");
        assert_eq!(url.port(), Some(9), "{path:?} → {url}");
        assert!(url.username().is_empty(), "{path:?} → {url}");
        assert!(
            url.path() == "/api/v2" || url.path().starts_with("/api/v2/"),
            "{path:?} → {url}"
        );
    }
    assert!(accepted > 1_000, "{accepted}");
}

/// An `exec` child's environment (`/proc/<pid>/environ`, as the kernel started it) holds its
/// `env`, its `pass_env` variables, `PATH`, the attempt's `RT_TASK_ID`, `RT_TASK`, `RT_QUEUE`
/// and the node's `RT_EGRESS_URL` / `RT_EGRESS_TOKEN` — nothing else of the node's environment:
/// no admin token, no API key, no variable it was not given. Its egress token opens the egress
/// proxy and nothing else; a pool agent gets the same egress variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_children_get_a_clean_environment_and_an_egress_token_of_their_own() {
    let upstream = Upstream::default();
    let upstream_url = upstream.start(None).await;
    let scratch = Scratch::new();
    let dir = scratch.path().display().to_string();
    let config = format!(
        r#"
[http]
bind = "127.0.0.1:0"
admin_token_env = "SEC_ADMIN_TOKEN"

[queues.default]

[resources.zep]
kind = "zep"
base_url = "{upstream_url}/api/v2"
api_key_env = "SEC_ZEP_KEY"

[resources.openai]
kind = "openai"
base_url = "{upstream_url}/v1"
api_key_env = "SEC_OPENAI_KEY"

[tasks.index_document]
handler = {{ kind = "exec", command = "/bin/sh", args = ["-c", "tr '\\000' '\\n' < /proc/$$/environ > {dir}/environ-$$.tmp; mv {dir}/environ-$$.tmp {dir}/environ.txt; echo '{{}}'"], env = {{ GREETING = "merhaba", PYTHONUNBUFFERED = "1" }}, pass_env = ["SEC_PASSED"] }}

[pools.probe]
command = "/bin/sh"
args = ["-c", "tr '\\000' '\\n' < /proc/$$/environ > {dir}/agent-environ.tmp; mv {dir}/agent-environ.tmp {dir}/agent-environ.txt; echo READY; sleep 30"]
min_idle = 1
max = 1
ready_pattern = "^READY$"
"#
    );
    let mut envs = ENVS.to_vec();
    envs.push(("SEC_PASSED", "passed-7c1e93"));
    envs.push(("SEC_KEPT_OUT", "kept-out-4d2a61"));
    let node = Node::start(&config, &envs);
    let id = enqueue(&node, json!({ "task": "index_document", "args": [1] })).await;
    let record = node.until_ended(&id, Duration::from_secs(20)).await;
    assert_eq!(record["state"], "succeeded", "{record}\n{}", node.log());
    let environ = std::fs::read_to_string(scratch.path().join("environ.txt")).unwrap();
    let vars: std::collections::BTreeMap<&str, &str> = environ
        .lines()
        .filter_map(|line| line.split_once('='))
        .collect();
    let names: Vec<&str> = vars.keys().copied().collect();
    assert_eq!(
        names,
        [
            "GREETING",
            "PATH",
            "PYTHONUNBUFFERED",
            "RT_EGRESS_TOKEN",
            "RT_EGRESS_URL",
            "RT_QUEUE",
            "RT_TASK",
            "RT_TASK_ID",
            "SEC_PASSED"
        ],
        "{environ}"
    );
    for secret in [ADMIN_TOKEN, ZEP_KEY, OPENAI_KEY, "kept-out-4d2a61"] {
        assert!(!environ.contains(secret), "{secret} reached the child");
    }
    assert_eq!(vars["GREETING"], "merhaba");
    assert_eq!(vars["SEC_PASSED"], "passed-7c1e93");
    assert_eq!(vars["PATH"], std::env::var("PATH").unwrap());
    assert_eq!(vars["RT_TASK_ID"], id);
    assert_eq!(vars["RT_TASK"], "index_document");
    assert_eq!(vars["RT_QUEUE"], "default");
    assert_eq!(vars["RT_EGRESS_URL"], format!("{}/egress", node.url));
    let token = vars["RT_EGRESS_TOKEN"];
    assert!(token.len() >= 32 && token != ADMIN_TOKEN, "{token}");

    // The child's token opens the egress proxy (the key is injected upstream) …
    let client = reqwest::Client::new();
    let egress = |token: Option<&str>| {
        let mut request = client.get(format!("{}/zep/users", vars["RT_EGRESS_URL"]));
        if let Some(token) = token {
            request = request.header("x-runtime-token", token);
        }
        request.send()
    };
    let response = egress(Some(token)).await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let seen = upstream.fake.seen().last().cloned().unwrap();
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Api-Key {ZEP_KEY}").as_str())
    );
    for wrong in [None, Some("wrong"), Some(&token[..token.len() - 1])] {
        assert_eq!(egress(wrong).await.unwrap().status(), 401, "{wrong:?}");
    }
    // … and no other route.
    for (path, body) in [
        ("/tasks", r#"{"task": "index_document"}"#),
        ("/pools/probe/claim", "{}"),
    ] {
        let response = client
            .post(format!("{}{path}", node.url))
            .bearer_auth(token)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{path}");
    }

    // A pool agent: the same clean environment, with its own variables.
    let agent = scratch.path().join("agent-environ.txt");
    common::eventually(
        "the agent's environment file",
        Duration::from_secs(10),
        async || {
            if agent.exists() {
                Ok(())
            } else {
                Err(node.log())
            }
        },
    )
    .await;
    let environ = std::fs::read_to_string(&agent).unwrap();
    let mut names: Vec<&str> = environ
        .lines()
        .filter_map(|line| Some(line.split_once('=')?.0))
        .collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "PATH",
            "RT_AGENT_ID",
            "RT_EGRESS_TOKEN",
            "RT_EGRESS_URL",
            "RT_POOL"
        ],
        "{environ}"
    );
    assert!(environ.contains(&format!("RT_EGRESS_TOKEN={token}\n")));
}

/// A broker password — in the user info or in the query string — is in no log line and no
/// error, whether the node starts or `runtime check` looks.
#[test]
fn a_broker_password_never_reaches_the_output() {
    let scratch = Scratch::new();
    let path = scratch.write(
        "broker.toml",
        "[queues.default]\n[tasks.rt_echo]\nhandler = { kind = \"native\" }\n",
    );
    for url in [
        "redis://user:hunter2-pw@127.0.0.1:1/0",
        "redis://:hunter2-pw@127.0.0.1:1/0",
        "redis://hunter2-pw@127.0.0.1:1/0",
        "redis://user:hunter2-pw@127.0.0.1:1/0?password=hunter2-pw",
        "redis://127.0.0.1:1/0?password=hunter2-pw",
        "redis://:hunter2-pw@[::1",
        "redis+unix:///tmp/no.sock?pass=hunter2-pw",
    ] {
        for args in [&["--config"][..], &["check", "--config"][..]] {
            let output = Command::new(binary())
                .env("RT_BROKER_URL", url)
                .env("RUST_LOG", "debug")
                .env_remove("RT_CONFIG")
                .args(args)
                .arg(&path)
                .output()
                .unwrap();
            assert!(!output.status.success(), "{url}: {args:?} succeeded");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(!said.contains("hunter2-pw"), "{url} {args:?}:\n{said}");
        }
    }
}

#[test]
fn a_non_loopback_bind_without_a_token_is_refused_by_check_and_at_start() {
    let scratch = Scratch::new();
    let path = scratch.write(
        "open.toml",
        "[http]\nbind = \"0.0.0.0:0\"\n[queues.default]\n[tasks.rt_echo]\nhandler = { kind = \"native\" }\n",
    );
    let check = Command::new(binary())
        .env_remove("RT_BROKER_URL")
        .env_remove("RT_CONFIG")
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!check.status.success());
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        said.contains("error: http.bind:") && said.contains("not a loopback address"),
        "{said}"
    );
    let start = Command::new(binary())
        .env_remove("RT_BROKER_URL")
        .env_remove("RT_CONFIG")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        !start.status.success(),
        "a node started on 0.0.0.0 without a token"
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&start.stdout),
        String::from_utf8_lossy(&start.stderr)
    );
    assert!(said.contains("http.bind"), "{said}");
    assert!(!said.contains("http listening on"), "{said}");

    // Naming a token variable that is unset is refused too.
    let path = scratch.write(
        "unset.toml",
        "[http]\nbind = \"0.0.0.0:0\"\nadmin_token_env = \"SEC_UNSET_TOKEN\"\n[queues.default]\n",
    );
    let start = Command::new(binary())
        .env_remove("SEC_UNSET_TOKEN")
        .env_remove("RT_BROKER_URL")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!start.status.success());
}

#[test]
fn a_blank_admin_token_is_refused_at_start_without_echoing_it() {
    let scratch = Scratch::new();
    let path = scratch.write(
        "blank.toml",
        "[http]\nbind = \"127.0.0.1:0\"\nadmin_token_env = \"SEC_BLANK_TOKEN\"\n[queues.default]\n",
    );
    for blank in ["   ", "\t", "tok\n"] {
        let start = Command::new(binary())
            .env("SEC_BLANK_TOKEN", blank)
            .env_remove("RT_BROKER_URL")
            .env_remove("RT_CONFIG")
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&start.stdout),
            String::from_utf8_lossy(&start.stderr)
        );
        assert_eq!(start.status.code(), Some(78), "{blank:?}: {said}");
        assert!(
            said.contains("http.admin_token_env: environment variable SEC_BLANK_TOKEN"),
            "{blank:?}: {said}"
        );
        assert!(!said.contains("http listening on"), "{said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_secrets_argv_and_the_egress_proxy_hold_up() {
    let elsewhere = Upstream::default();
    let elsewhere_url = elsewhere.start(None).await;
    let upstream = Upstream::default();
    let upstream_url = upstream.start(Some(elsewhere_url.clone())).await;
    let scratch = Scratch::new();
    let script = probe_script(&scratch);
    agent_script(&scratch);
    let node = Node::start_with_args(
        &config(&upstream_url, &script),
        &["--log-format", "json"],
        &ENVS,
    );
    // The test's own client must not follow a redirect the proxy passes back.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // The /events stream, read for the whole test.
    let events = Arc::new(Mutex::new(String::new()));
    let reader = {
        let events = Arc::clone(&events);
        let mut response = client
            .get(format!("{}/events", node.url))
            .send()
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Ok(Some(chunk)) = response.chunk().await {
                events
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk));
            }
        })
    };

    // 1. Mutating routes: 401 without the token or with a wrong one, through the binary.
    for (method, path) in [
        ("POST", "/tasks"),
        ("POST", "/dlq/default/requeue"),
        ("POST", "/queues/default/purge"),
        ("POST", "/pools/none/claim"),
        ("POST", "/pools/none/reset"),
        ("POST", "/chaos/kill/heartbeat"),
    ] {
        for token in [
            None,
            Some("wrong"),
            Some(&ADMIN_TOKEN[..ADMIN_TOKEN.len() - 1]),
        ] {
            let mut request =
                client.request(method.parse().unwrap(), format!("{}{path}", node.url));
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.body("{}").send().await.unwrap();
            assert_eq!(response.status(), 401, "{method} {path} with {token:?}");
            let body = response.text().await.unwrap();
            assert_eq!(body, r#"{"error":"missing or wrong bearer token"}"#);
        }
    }
    // The egress proxy wants it in X-Runtime-Token (Authorization belongs to the upstream).
    let response = client
        .get(format!("{}/egress/zep/users", node.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(upstream.fake.calls(), 0);

    // 2. Exec: no shell, payloads on stdin only, argv exactly as configured.
    let markers = ["semicolon", "subst", "backtick", "pipe", "and", "newline"];
    let dir = scratch.path().display().to_string();
    let nasty = json!([
        format!("; touch {dir}/semicolon"),
        format!("$(touch {dir}/subst)"),
        format!("`touch {dir}/backtick`"),
        format!("| touch {dir}/pipe"),
        format!("&& touch {dir}/and"),
        format!("x\ntouch {dir}/newline"),
    ]);
    let id = enqueue(
        &node,
        json!({ "task": "probe_argv", "args": nasty, "kwargs": { "cmd": format!("$(touch {dir}/subst)") } }),
    )
    .await;
    let record = node.until_ended(&id, Duration::from_secs(20)).await;
    assert_eq!(record["state"], "succeeded", "{record}\n{}", node.log());
    assert_eq!(
        record["result"]["argv"],
        format!("/bin/sh|{script}|fixed arg|--flag|"),
        "{record}"
    );
    for marker in markers {
        assert!(
            !scratch.path().join(marker).exists(),
            "the payload ran a shell command ({marker})"
        );
    }
    let stdin: Value =
        serde_json::from_str(&std::fs::read_to_string(scratch.path().join("stdin.json")).unwrap())
            .unwrap();
    assert_eq!(stdin["args"], nasty, "the payload reached stdin intact");

    // The same for a pool agent: its assignment goes to stdin, never to argv or a shell, and
    // its environment is only what the pool config gives it.
    let assignment = json!({
        "room": format!("; touch {dir}/pool-semicolon"),
        "token": format!("$(touch {dir}/pool-subst)"),
        "tick": format!("`touch {dir}/pool-backtick`"),
    });
    let response = client
        .post(format!("{}/pools/probe/claim", node.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&assignment)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", node.log());
    let claimed: Value = response.json().await.unwrap();
    let pid = claimed["pid"].as_u64().unwrap();
    let argv_file = scratch.path().join(format!("argv-{pid}.txt"));
    common::eventually(
        "the agent's argv file",
        Duration::from_secs(10),
        async || argv_file.exists(),
    )
    .await;
    let agent = scratch.path().join("agent.sh").display().to_string();
    assert_eq!(
        std::fs::read_to_string(&argv_file).unwrap(),
        format!("/bin/sh|{agent}|fixed arg|")
    );
    let got =
        std::fs::read_to_string(scratch.path().join(format!("assignment-{pid}.json"))).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&got).unwrap(), assignment);
    for marker in ["pool-semicolon", "pool-subst", "pool-backtick"] {
        assert!(
            !scratch.path().join(marker).exists(),
            "an assignment ran a shell command ({marker})"
        );
    }
    let env = std::fs::read_to_string(scratch.path().join(format!("env-{pid}.txt"))).unwrap();
    for secret in [ADMIN_TOKEN, ZEP_KEY, OPENAI_KEY] {
        assert!(
            !env.contains(secret),
            "{secret} reached a pool agent: {env}"
        );
    }

    // 3. The egress proxy, for both resources.
    let evil = elsewhere_url.trim_start_matches("http://").to_string();
    for (resource, base, key, scheme) in [
        ("zep", "/api/v2", ZEP_KEY, "Api-Key"),
        ("openai", "/v1", OPENAI_KEY, "Bearer"),
    ] {
        // Paths that try to leave the base: each a 400 and nothing sent anywhere.
        let before = upstream.fake.calls();
        for target in [
            format!("/egress/{resource}/http://{evil}/x"),
            format!("/egress/{resource}//{evil}/x"),
            format!("/egress/{resource}/../../x"),
            format!("/egress/{resource}/a/../../../x"),
            format!("/egress/{resource}/%2e%2e/%2e%2e/x"),
            format!("/egress/{resource}/.%2e/x"),
            format!("/egress/{resource}/..%2Fx"),
            format!("/egress/{resource}/a%2F..%2F..%2Fx"),
            format!("/egress/{resource}/a%5C..%5Cx"),
            format!("/egress/{resource}/%00/x"),
        ] {
            let request = format!(
                "GET {target} HTTP/1.1\r\nHost: {evil}\r\nX-Runtime-Token: {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
            );
            let (status, body) = raw_http(&node.url, request.as_bytes()).await;
            assert_eq!(status, 400, "{target} → {status} {body}");
            assert!(body.contains("\"error\":\"path: "), "{target} → {body}");
        }
        assert_eq!(upstream.fake.calls(), before);

        // An absolute-form request target and a forged Host reach the configured base only.
        for request in [
            format!(
                "GET http://{evil}/egress/{resource}/models HTTP/1.1\r\nHost: {evil}\r\nX-Runtime-Token: {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
            ),
            format!(
                "GET http://{evil}/x HTTP/1.1\r\nHost: {evil}\r\nX-Runtime-Token: {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
            ),
            format!(
                "GET /egress/{resource}/models HTTP/1.1\r\nHost: {evil}\r\nX-Forwarded-Host: {evil}\r\nX-Runtime-Token: {ADMIN_TOKEN}\r\nConnection: close\r\n\r\n"
            ),
        ] {
            let (status, body) = raw_http(&node.url, request.as_bytes()).await;
            assert!(
                status == 200 || status == 404,
                "{request} → {status} {body}"
            );
        }

        // The caller's credentials and hop-by-hop headers are dropped; its own are kept.
        let response = client
            .post(format!("{}/egress/{resource}/echo/search?q=1", node.url))
            .header("x-runtime-token", ADMIN_TOKEN)
            .header("authorization", "Bearer the-callers-own")
            .header("proxy-authorization", "Basic cHJveHk=")
            .header("cookie", "sid=caller")
            .header("connection", "x-hop")
            .header("x-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("x-kept", "yes")
            .header("content-type", "application/json")
            .body(r#"{"query": "boats"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        let seen = upstream.fake.seen().last().cloned().unwrap();
        assert_eq!(seen.target(), format!("{base}/echo/search?q=1"));
        assert_eq!(seen.method, "POST");
        assert_eq!(
            seen.header("authorization"),
            Some(format!("{scheme} {key}").as_str())
        );
        assert_eq!(seen.header("x-kept"), Some("yes"));
        for gone in [
            "proxy-authorization",
            "cookie",
            "x-hop",
            "keep-alive",
            "te",
            "x-runtime-token",
        ] {
            assert!(
                seen.header(gone).is_none(),
                "{gone} was forwarded: {seen:?}"
            );
        }
        assert_eq!(
            seen.header("host"),
            Some(upstream_url.trim_start_matches("http://"))
        );

        // A redirect to another host is not followed.
        let response = client
            .get(format!("{}/egress/{resource}/go/redirect", node.url))
            .header("x-runtime-token", ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(!body.contains(key), "{resource}: {body}");
        assert_eq!(
            elsewhere.fake.calls(),
            0,
            "{resource}: the proxy followed a redirect to another host ({status}): {:?}",
            elsewhere.fake.seen()
        );

        // An upstream that reflects the key: the caller never sees it.
        let response = client
            .post(format!("{}/egress/{resource}/x/reflect/search", node.url))
            .header("x-runtime-token", ADMIN_TOKEN)
            .body("{}")
            .send()
            .await
            .unwrap();
        let headers = format!("{:?}", response.headers());
        let body = response.text().await.unwrap();
        let response = client
            .get(format!("{}/egress/{resource}/x/reflect", node.url))
            .header("x-runtime-token", ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let headers = format!("{headers}{:?}", response.headers());
        let body = format!("{body}{}", response.text().await.unwrap());
        assert!(
            !body.contains(key) && !headers.contains(key),
            "{resource}: the key came back: {headers} {body}"
        );

        // Bodies are capped.
        let response = client
            .post(format!("{}/egress/{resource}/big", node.url))
            .header("x-runtime-token", ADMIN_TOKEN)
            .body(vec![b'x'; 4 * 1024 * 1024 + 1])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 413);
    }
    // Everything the upstream got stayed under a configured base URL.
    for seen in upstream.fake.seen() {
        assert!(
            (seen.target().starts_with("/api/v2/") || seen.target().starts_with("/v1/"))
                && !seen.target().contains(".."),
            "{seen:?}"
        );
    }
    assert_eq!(elsewhere.fake.calls(), 0);

    // 4. A failed task and a few errors, then: no secret anywhere a client or a log can see.
    let id = enqueue(
        &node,
        json!({ "task": "rt_fail", "kwargs": { "permanent": true, "message": "nope" } }),
    )
    .await;
    node.until_ended(&id, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = String::new();
    for path in [
        "/",
        "/health",
        "/actors",
        "/actors?format=text",
        "/metrics",
        "/queues",
        "/dlq/default",
        "/pools",
        "/nodes",
        &format!("/tasks/{id}"),
        "/no/such/route",
    ] {
        let text = client
            .get(format!("{}{path}", node.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        seen.push_str(&text);
    }
    assert!(seen.contains("root/resources/zep"), "the routes answered");
    reader.abort();
    let events = events.lock().unwrap().clone();
    assert!(events.contains("succeeded"), "events were read: {events}");
    let check = Command::new(binary())
        .envs(ENVS)
        .env_remove("RT_BROKER_URL")
        .args(["check", "--config"])
        .arg(scratch.write("check.toml", &config(&upstream_url, &script)))
        .output()
        .unwrap();
    let check = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let log = format!("{}\n{}", node.log(), node.stdout());
    assert!(log.contains("probe_argv"), "the log was captured");
    for secret in [ADMIN_TOKEN, ZEP_KEY, OPENAI_KEY] {
        for (place, text) in [
            ("the log", &log),
            ("a read route", &seen),
            ("/events", &events),
            ("runtime check", &check),
        ] {
            assert!(!text.contains(secret), "{secret} leaked into {place}");
        }
    }
}

/// What a client that decodes like an SDK reads: `body` with its `Content-Encoding` undone.
fn client_decoded(headers: &reqwest::header::HeaderMap, body: &[u8]) -> Vec<u8> {
    let codings: Vec<String> = headers
        .get_all("content-encoding")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(','))
        .map(|c| c.trim().to_ascii_lowercase())
        .filter(|c| !c.is_empty())
        .collect();
    let mut body = body.to_vec();
    for coding in codings.iter().rev() {
        let mut out = Vec::new();
        match coding.as_str() {
            "gzip" => {
                flate2::read::MultiGzDecoder::new(&body[..])
                    .read_to_end(&mut out)
                    .unwrap();
            }
            "deflate" => {
                if flate2::read::ZlibDecoder::new(&body[..])
                    .read_to_end(&mut out)
                    .is_err()
                {
                    out.clear();
                    flate2::read::DeflateDecoder::new(&body[..])
                        .read_to_end(&mut out)
                        .unwrap();
                }
            }
            _ => out = body.clone(),
        }
        body = out;
    }
    body
}

/// Whether `bytes` hold `key`: as itself, in JSON (escapes undone; also in each `data:` line
/// of an event stream), or percent-encoded.
fn holds_key(bytes: &[u8], key: &str) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let in_json = |text: &str| {
        serde_json::from_str::<Value>(text).is_ok_and(|value| value.to_string().contains(key))
    };
    let percent_decoded = {
        let mut out = Vec::new();
        let mut at = 0;
        let raw = text.as_bytes();
        while at < raw.len() {
            let hex = raw
                .get(at + 1..at + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match (raw[at], hex) {
                (b'%', Some(byte)) => {
                    out.push(byte);
                    at += 3;
                }
                (byte, _) => {
                    out.push(byte);
                    at += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    text.contains(key)
        || in_json(&text)
        || text
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .any(in_json)
        || percent_decoded.contains(key)
}

/// A node with both resources against one fake upstream. The OpenAI key's variable ends in a
/// newline (as a key read from a file does): the key sent, and so the one to redact, is the
/// trimmed one.
async fn egress_node() -> (Upstream, Node, Scratch) {
    let upstream = Upstream::default();
    let upstream_url = upstream.start(None).await;
    let scratch = Scratch::new();
    let script = probe_script(&scratch);
    agent_script(&scratch);
    let padded = format!("{OPENAI_KEY}\n");
    let envs = ENVS.map(|(name, value)| match name {
        "SEC_OPENAI_KEY" => (name, padded.as_str()),
        _ => (name, value),
    });
    let node = Node::start(&config(&upstream_url, &script), &envs);
    (upstream, node, scratch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_never_comes_back_whatever_the_encoding_and_events_stream_as_they_come() {
    let (upstream, node, _scratch) = egress_node().await;
    let client = reqwest::Client::new();
    let get = |path: String| {
        client
            .get(format!("{}{path}", node.url))
            .header("x-runtime-token", ADMIN_TOKEN)
            // What OpenAI's Python SDK asks for (httpx), and more.
            .header("accept-encoding", "gzip, deflate, br")
            .send()
    };

    // 1. A reflected key, compressed, stacked, escaped, percent-encoded: decoded (as a client
    // decodes it) it is nowhere in the body or the headers; the answer goes out decoded.
    for (resource, key) in [("zep", ZEP_KEY), ("openai", OPENAI_KEY)] {
        for mode in [
            "gzip",
            "deflate",
            "rawdeflate",
            "gzip-gzip",
            "escaped",
            "percent",
            "gzip-escaped",
        ] {
            let response = get(format!("/egress/{resource}/x/reflect-{mode}"))
                .await
                .unwrap();
            let status = response.status();
            let headers = response.headers().clone();
            let raw = response.bytes().await.unwrap();
            let body = client_decoded(&headers, &raw);
            assert!(
                !holds_key(&body, key),
                "{resource} {mode}: the key came back: {}",
                String::from_utf8_lossy(&body)
            );
            for (name, value) in &headers {
                assert!(
                    !holds_key(value.as_bytes(), key),
                    "{resource} {mode}: the key came back in {name}: {value:?}"
                );
            }
            assert_eq!(status, 400, "{resource} {mode}: {headers:?}");
            assert!(headers.get("content-encoding").is_none(), "{headers:?}");
            assert_eq!(headers["content-length"], raw.len().to_string());
            let error: Value = serde_json::from_slice(&raw).unwrap();
            assert_eq!(
                error["error"]["message"], "Incorrect API key provided: <redacted>",
                "{resource} {mode}"
            );
            assert_eq!(headers["x-reflected"], "<redacted>");
            assert!(
                headers["x-reflected-plain"]
                    .to_str()
                    .unwrap()
                    .ends_with(" <redacted>")
            );
            let seen = upstream.fake.seen().last().cloned().unwrap();
            assert_eq!(
                seen.header("accept-encoding"),
                Some("identity"),
                "{resource} asks for no encoding"
            );
            assert!(
                seen.header("authorization")
                    .is_some_and(|auth| auth.ends_with(&format!(" {key}"))),
                "{seen:?}"
            );
        }
        // A coding the proxy cannot decode is not passed on: OpenAI answers 502 naming it, Zep
        // counts a failed call and degrades the read.
        let response = get(format!("/egress/{resource}/x/reflect-br"))
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap();
        assert!(!holds_key(&body, key), "{resource} br: {body:?}");
        assert!(headers.get("content-encoding").is_none(), "{headers:?}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        if resource == "openai" {
            assert_eq!(status, 502, "{body}");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("Content-Encoding `br`"), "{message}");
        } else {
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, json!({ "context": "", "degraded": true }));
        }
    }

    // 2. A streamed completion reaches the caller event by event: its first event arrives
    // while the upstream is still holding the rest back.
    let mut response = client
        .post(format!("{}/egress/openai/sse/chat/completions", node.url))
        .header("x-runtime-token", ADMIN_TOKEN)
        .header("accept-encoding", "gzip, deflate")
        .header("content-type", "application/json")
        .body(r#"{"model": "gpt-4o-mini", "stream": true, "messages": []}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().get("content-length").is_none());
    let first = response.chunk().await.unwrap().unwrap();
    let got_first = Instant::now();
    let (sent_first, sent_rest) = *upstream.sse.lock().unwrap();
    assert!(
        sent_rest.is_none(),
        "the first event came only after the upstream had sent everything"
    );
    let since_sent = got_first.duration_since(sent_first.expect("the first event was sent"));
    assert!(
        since_sent < Duration::from_millis(500),
        "the first event took {since_sent:?} through the proxy"
    );
    assert!(
        String::from_utf8_lossy(&first).contains(r#""content":"Hel""#),
        "{first:?}"
    );
    let mut all = first.to_vec();
    while let Some(chunk) = response.chunk().await.unwrap() {
        all.extend_from_slice(&chunk);
    }
    let all = String::from_utf8(all).unwrap();
    assert!(upstream.sse.lock().unwrap().1.is_some());
    assert_eq!(all.matches("data: ").count(), 4, "{all}");
    assert!(all.ends_with("data: [DONE]\n\n"), "{all}");

    // 3. A key cut in two between the chunks of a stream, at every byte, as itself and
    // JSON-escaped: redacted all the same, and the rest of the stream intact.
    for form in ["plain", "escaped"] {
        let event = format!("data: {{\"k\": \"{}\"}}\n\n", written(OPENAI_KEY, form));
        for at in 0..=event.len() {
            let response = get(format!("/egress/openai/split-{form}-{at}"))
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let text = response.text().await.unwrap();
            assert_eq!(
                text, "data: {\"k\": \"<redacted>\"}\n\ndata: [DONE]\n\n",
                "{form} cut at {at}"
            );
        }
    }
    // 4. A gzip bomb: Zep's whole-body read stops at 4 MiB (a failed call, the read degrades);
    // OpenAI's answer is streamed past its first 4 MiB, decoded piece by piece. The node's
    // peak memory does not grow by anything like the 64 MiB that went through it.
    let peak = || {
        let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).unwrap();
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmHWM:"))
            .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024
    };
    let before = peak();
    let response = get("/egress/zep/x/bomb".into()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({ "context": "", "degraded": true })
    );
    let mut response = get("/egress/openai/x/bomb".into()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("content-encoding").is_none());
    let mut received = 0;
    while let Some(chunk) = response.chunk().await.unwrap() {
        assert!(chunk.iter().all(|&b| b == 0));
        received += chunk.len();
    }
    assert_eq!(received, BOMB);
    let grown = peak().saturating_sub(before);
    assert!(
        grown < (BOMB / 2) as u64,
        "the node's peak memory grew by {} MiB",
        grown >> 20
    );

    let log = node.log();
    assert!(
        log.contains("egress answer refused"),
        "the br answer was logged"
    );
    assert!(
        log.contains("larger than 4194304 bytes decoded"),
        "Zep's bomb was logged"
    );
    for key in [ZEP_KEY, OPENAI_KEY] {
        assert!(!holds_key(log.as_bytes(), key), "the key is in the log");
    }
}

/// A Python client as OpenAI's SDK behaves (stdlib only): it asks for gzip and decodes what
/// it gets, and reads an event stream as it comes.
const PYTHON_CLIENT: &str = r#"
import gzip, http.client, json, sys, time, zlib

host, port, token, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
headers = {"X-Runtime-Token": token, "Accept-Encoding": "gzip, deflate"}

def decoded(body, encoding):
    for coding in reversed([c.strip().lower() for c in (encoding or "").split(",") if c.strip()]):
        if coding in ("gzip", "x-gzip"):
            body = gzip.decompress(body)
        elif coding == "deflate":
            try:
                body = zlib.decompress(body)
            except zlib.error:
                body = zlib.decompress(body, -15)
    return body

conn = http.client.HTTPConnection(host, port, timeout=10)
conn.request("GET", "/egress/openai/x/reflect-gzip-escaped", headers=headers)
response = conn.getresponse()
body = decoded(response.read(), response.getheader("Content-Encoding"))
text = body.decode("utf-8", "replace")
try:
    unescaped = json.dumps(json.loads(text), ensure_ascii=False)
except ValueError:
    unescaped = text
leaked = key in text or key in unescaped or any(key in v for _, v in response.getheaders())
reflect = {"status": response.status, "leaked": leaked, "body": unescaped}

conn = http.client.HTTPConnection(host, port, timeout=10)
request = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
started = time.monotonic()
conn.request("POST", "/egress/openai/sse/chat/completions", body=json.dumps(request),
             headers=dict(headers, **{"Content-Type": "application/json", "Accept": "text/event-stream"}))
response = conn.getresponse()
first, data = None, b""
while True:
    chunk = response.read1(65536)
    if not chunk:
        break
    if first is None:
        first = time.monotonic() - started
    data += chunk
total = time.monotonic() - started
data = decoded(data, response.getheader("Content-Encoding")).decode()
events = [line for line in data.splitlines() if line.startswith("data: ")]
stream = {"status": response.status, "first_s": first, "total_s": total, "events": len(events),
          "leaked": key in data}
print(json.dumps({"reflect": reflect, "stream": stream}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_that_asks_for_gzip_gets_no_key_and_its_stream_as_it_comes() {
    let (_upstream, node, scratch) = egress_node().await;
    let script = scratch.write("client.py", PYTHON_CLIENT);
    let (host, port) = node
        .url
        .trim_start_matches("http://")
        .split_once(':')
        .unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .args([host, port, ADMIN_TOKEN, OPENAI_KEY])
        .output()
        .await
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("the client's report");
    assert_eq!(report["reflect"]["status"], 400, "{report}");
    assert_eq!(report["reflect"]["leaked"], false, "{report}");
    assert!(
        report["reflect"]["body"]
            .as_str()
            .unwrap()
            .contains("Incorrect API key provided: <redacted>"),
        "{report}"
    );
    let stream = &report["stream"];
    assert_eq!(stream["status"], 200, "{report}");
    assert_eq!(stream["events"], 4, "{report}");
    assert_eq!(stream["leaked"], false, "{report}");
    let (first, total) = (
        stream["first_s"].as_f64().unwrap(),
        stream["total_s"].as_f64().unwrap(),
    );
    assert!(
        total - first > SSE_PAUSE.as_secs_f64() * 0.6,
        "the first event came {first:.3} s after asking, the stream ended at {total:.3} s: \
         it was held back"
    );
}
