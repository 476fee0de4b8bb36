//! Security checks through the real binary: a non-loopback bind needs a token; mutating routes
//! need it; secrets never show up in logs, errors or any read route; exec commands never go
//! through a shell and payloads never reach argv; the egress proxy only reaches each resource's
//! base URL, drops the caller's credentials and hop-by-hop headers, caps bodies and never
//! echoes the injected key — against fake upstreams on 127.0.0.1 that record what they got.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actors::resource::target_url;
use axum::Router;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::any;
use common::{Node, Scratch, binary, raw_http};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use runtime::http::egress::check_path;
use serde_json::{Value, json};
use tokio::time::Instant;

const ADMIN_TOKEN: &str = "adm-9f3c2e7a51d84b06";
const ZEP_KEY: &str = "zk-5e1b7c0d93a24f68";
const OPENAI_KEY: &str = "sk-a71c4e9b20d358f6";

/// One request a fake upstream received: method, path and query, headers (lower-case names).
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A fake upstream: records every request; `…/redirect` answers 302 to `elsewhere`,
/// `…/reflect` answers with the request's `Authorization` in a header and in the body,
/// anything else 200 `{"ok": true}`.
#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(&self, elsewhere: Option<String>) -> String {
        let me = self.clone();
        let router =
            Router::new().fallback(any(move |method: Method, uri: Uri, headers: HeaderMap| {
                let me = me.clone();
                let elsewhere = elsewhere.clone();
                async move {
                    me.hits.fetch_add(1, Ordering::SeqCst);
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    me.seen.lock().unwrap().push(Seen {
                        method: method.to_string(),
                        target: uri.to_string(),
                        headers: headers
                            .iter()
                            .map(|(k, v)| {
                                (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                            })
                            .collect(),
                    });
                    if uri.path().contains("/redirect") {
                        let to = format!("{}/stolen", elsewhere.unwrap_or_default());
                        return (StatusCode::FOUND, [("location", to)], String::new())
                            .into_response();
                    }
                    if uri.path().contains("/reflect") {
                        return (
                            StatusCode::UNAUTHORIZED,
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
            }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}")
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

async fn wait_task(node: &Node, id: &str) -> Value {
    let at = Instant::now();
    loop {
        let response = reqwest::Client::new()
            .get(format!("{}/tasks/{id}", node.url))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            let record: Value = response.json().await.unwrap();
            if record["state"] == "succeeded" || record["state"] == "dead" {
                return record;
            }
        }
        assert!(
            at.elapsed() < Duration::from_secs(20),
            "task {id} never settled; log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    assert_eq!(upstream.hits.load(Ordering::SeqCst), 0);

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
    let record = wait_task(&node, &id).await;
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
    let at = Instant::now();
    while !argv_file.exists() {
        assert!(
            at.elapsed() < Duration::from_secs(10),
            "the agent wrote nothing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
        let before = upstream.hits.load(Ordering::SeqCst);
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
        assert_eq!(upstream.hits.load(Ordering::SeqCst), before);

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
        let seen = upstream.seen.lock().unwrap().last().cloned().unwrap();
        assert_eq!(seen.target, format!("{base}/echo/search?q=1"));
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
            elsewhere.hits.load(Ordering::SeqCst),
            0,
            "{resource}: the proxy followed a redirect to another host ({status}): {:?}",
            elsewhere.seen.lock().unwrap()
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
    for seen in upstream.seen.lock().unwrap().iter() {
        assert!(
            (seen.target.starts_with("/api/v2/") || seen.target.starts_with("/v1/"))
                && !seen.target.contains(".."),
            "{seen:?}"
        );
    }
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0);

    // 4. A failed task and a few errors, then: no secret anywhere a client or a log can see.
    let id = enqueue(
        &node,
        json!({ "task": "rt_fail", "kwargs": { "permanent": true, "message": "nope" } }),
    )
    .await;
    wait_task(&node, &id).await;
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
