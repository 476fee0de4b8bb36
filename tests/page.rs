//! The live tree page (`GET /`) in headless Chromium against the `runtime` binary, driven over
//! the DevTools protocol (a small client over one websocket: `Runtime.evaluate`,
//! `Input.dispatchKeyEvent`, `Page.captureScreenshot`).
//!
//! The test loads the page from a node that has an admin token (the page only reads, so it
//! needs none), waits for the tree, the queues, the in-flight tasks and the events feed to
//! render, checks that an error carrying markup is shown as text, walks the tree with the
//! keyboard, kills `root/queues/default` through the chaos route and waits for the page to show
//! its restart counter go from 0 to 1 — then checks the page did not scroll sideways at
//! 1366 px, threw nothing and broke no rule of its Content-Security-Policy.
//!
//! It needs Chromium (`chromium` or `chromium-browser` on `PATH`, or the binary named by
//! `RT_CHROMIUM`); where there is none it prints why and passes, except under CI (`CI` set),
//! where a missing Chromium fails it — `.ci/run` installs Debian's `chromium`.
//!
//! `screenshot_of_the_page_under_load` (ignored; run it with `cargo test --test page --
//! --ignored`) rewrites `docs/live-tree.png`: a node with a few hundred tasks flowing through
//! four queues, a pool of fake voice agents and a Zep resource whose breaker is open.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use common::{Node, Scratch};

/// Generous on a loaded two-core machine; a passing run takes a few seconds.
const WAIT: Duration = Duration::from_secs(20);

/// The Chromium binary, or `None` (with the reason printed) where none is installed.
fn chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("RT_CHROMIUM") {
        return Some(PathBuf::from(path));
    }
    let found = ["chromium", "chromium-browser"].iter().find_map(|name| {
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "Chromium is not installed, and CI must run the page test (.ci/run installs it)"
        );
        println!(
            "SKIPPED: the live page test needs Chromium (`apt-get install -y chromium`, or set \
             RT_CHROMIUM to its binary); none is on PATH"
        );
    }
    found
}

/// A headless Chromium and one page of it, attached over the DevTools protocol.
struct Browser {
    child: Child,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    /// Uncaught exceptions of the page (`Runtime.exceptionThrown`).
    exceptions: Vec<String>,
    /// Chromium's stderr, for failure messages.
    log: Arc<Mutex<Vec<String>>>,
    _profile: Scratch,
}

impl Browser {
    /// Starts Chromium with a fresh profile and a 1366×900 window, and opens a blank page
    /// that records Content-Security-Policy violations in `window.__violations`.
    async fn launch(binary: &Path) -> Browser {
        let profile = Scratch::new();
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--disable-gpu",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--hide-scrollbars",
                "--mute-audio",
                "--window-size=1366,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            use std::io::BufRead;
            // Keep draining after the address is found: a full pipe would block Chromium.
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(at) = line.find("ws://") {
                    let _ = tx.send(line[at..].trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let url = match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
            Ok(Some(url)) => url,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "Chromium did not open its DevTools port; stderr:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .unwrap_or_else(|e| panic!("connect to DevTools at {url}: {e}"));
        let mut browser = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            exceptions: Vec::new(),
            log,
            _profile: profile,
        };
        let target = browser
            .send(None, "Target.createTarget", json!({ "url": "about:blank" }))
            .await;
        let attached = browser
            .send(
                None,
                "Target.attachToTarget",
                json!({ "targetId": target["targetId"], "flatten": true }),
            )
            .await;
        browser.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        browser.call("Runtime.enable", json!({})).await;
        browser.call("Page.enable", json!({})).await;
        browser
            .call(
                "Emulation.setDeviceMetricsOverride",
                json!({ "width": 1366, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
            )
            .await;
        browser
            .call(
                "Page.addScriptToEvaluateOnNewDocument",
                json!({ "source": "window.__violations = []; document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(e.violatedDirective + ' ' + e.blockedURI));" }),
            )
            .await;
        browser
    }

    /// Sends one command (to the browser, or to a page's session) and returns its result.
    async fn send(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .unwrap_or_else(|e| panic!("send {method}: {e}"));
        let deadline = Instant::now() + WAIT;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(frame))) => frame,
                Ok(other) => panic!("DevTools connection ended during {method}: {other:?}"),
                Err(_) => panic!(
                    "no answer to {method} within {WAIT:?}; Chromium's stderr:\n{}",
                    self.log.lock().unwrap().join("\n")
                ),
            };
            let Message::Text(text) = frame else { continue };
            let message: Value = serde_json::from_str(text.as_str()).expect("DevTools JSON");
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("{method} failed: {error}");
                }
                return message["result"].clone();
            }
            if message["method"] == "Runtime.exceptionThrown" {
                self.exceptions
                    .push(message["params"]["exceptionDetails"].to_string());
            }
        }
    }

    /// A command to the page.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(Some(&session), method, params).await
    }

    async fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url })).await;
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        if let Some(details) = result.get("exceptionDetails") {
            panic!("`{expression}` threw: {details}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `expression` until it is neither `null` nor `false`, and returns it.
    async fn wait_for(&mut self, what: &str, expression: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.eval(expression).await;
            if !value.is_null() && value != json!(false) {
                return value;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {WAIT:?}; last value of `{expression}`: {value}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Presses and releases one key.
    async fn press(&mut self, key: &str) {
        let code = match key {
            "Tab" => 9,
            "Enter" => 13,
            "End" => 35,
            "Home" => 36,
            "ArrowLeft" => 37,
            "ArrowUp" => 38,
            "ArrowRight" => 39,
            "ArrowDown" => 40,
            other => panic!("no key code for {other}"),
        };
        for kind in ["rawKeyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({ "type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code, "nativeVirtualKeyCode": code }),
            )
            .await;
        }
        if key == "Enter" {
            // What a real Enter also sends (activates links and buttons).
            self.call(
                "Input.dispatchKeyEvent",
                json!({ "type": "char", "key": "Enter", "text": "\r", "windowsVirtualKeyCode": 13 }),
            )
            .await;
        }
    }

    /// The `data-path` of the focused element (`null` when it has none).
    async fn focused(&mut self) -> Value {
        self.eval("document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.path ?? null : null")
            .await
    }

    async fn screenshot(&mut self, to: &Path) {
        use base64::Engine as _;
        let shot = self
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const TOKEN: &str = "page-test-token";

/// Enqueues a batch through the node (with the admin token).
async fn enqueue(node: &Node, batch: Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .bearer_auth(TOKEN)
        .json(&batch)
        .send()
        .await
        .expect("POST /tasks");
    assert_eq!(response.status(), 202, "{}", response.text().await.unwrap());
}

/// The `<li>` of the actor at `path`, as a JavaScript expression.
fn item(path: &str) -> String {
    format!("document.querySelector('[role=treeitem][data-path=\"{path}\"]')")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_the_tree_and_shows_a_chaos_kill_as_a_restart() {
    let Some(chromium) = chromium() else { return };
    let node = Node::start(
        r#"
[http]
bind = "127.0.0.1:0"
admin_token_env = "RT_PAGE_TEST_TOKEN"

[supervision]
backoff = "5ms"
backoff_max = "50ms"

[chaos]
enabled = true

[queues.default]
concurrency = 2

[queues.chat]
concurrency = 2

[tasks.rt_sleep]
queue = "chat"
handler = { kind = "native" }

[tasks.rt_fail]
handler = { kind = "native" }
max_retries = 0
"#,
        &[("RT_PAGE_TEST_TOKEN", TOKEN)],
    );
    // Two tasks that stay in flight for the whole test, and one dead letter whose error is
    // markup (it must show as text).
    enqueue(
        &node,
        json!([
            { "task": "rt_sleep", "kwargs": { "ms": 60_000 } },
            { "task": "rt_sleep", "kwargs": { "ms": 60_000 } },
            { "task": "rt_fail", "kwargs": { "permanent": true,
                "message": "<img src=x onerror=\"window.__xss=1\"><b>bold</b>" } },
        ]),
    )
    .await;

    let mut browser = Browser::launch(&chromium).await;
    browser.goto(&format!("{}/", node.url)).await;

    // The tree, its consumers and their snapshots.
    let default = item("root/queues/default");
    browser
        .wait_for(
            "root/queues/default, running, 0 restarts",
            &format!(
                "{default}?.dataset.status === 'running' && {default}.dataset.restarts === '0'"
            ),
        )
        .await;
    assert_eq!(
        browser
            .eval(&format!("{default}.querySelector('.restarts').textContent"))
            .await,
        "0 restarts"
    );
    for path in [
        "root",
        "root/broker",
        "root/queues",
        "root/queues/chat",
        "root/heartbeat",
    ] {
        assert_eq!(
            browser.eval(&format!("!!{}", item(path))).await,
            true,
            "{path} is on the page"
        );
    }
    browser
        .wait_for(
            "the chat consumer running 2 of 2",
            &format!(
                "{}.querySelector('.summary').textContent.includes('running 2/2')",
                item("root/queues/chat")
            ),
        )
        .await;
    browser
        .wait_for(
            "two rt_sleep rows in the in-flight table",
            "Array.from(document.querySelectorAll('#inflight tbody tr')).filter((tr) => tr.textContent.includes('rt_sleep')).length === 2",
        )
        .await;
    browser
        .wait_for(
            "the queues table with default and chat",
            "!!document.querySelector('#queues tr[data-queue=default]') && !!document.querySelector('#queues tr[data-queue=chat]')",
        )
        .await;

    // The dead letter's error is text: no <img>, no <b>, no script ran.
    let dead = browser
        .wait_for(
            "the dead-lettered rt_fail in the feed",
            "document.querySelector('#feed li[data-kind=dead]')?.textContent ?? null",
        )
        .await;
    assert!(
        dead.as_str()
            .unwrap()
            .contains("<img src=x onerror=\"window.__xss=1\"><b>bold</b>"),
        "{dead}"
    );
    assert_eq!(
        browser
            .eval("document.querySelectorAll('#feed img, #feed b').length")
            .await,
        0
    );
    assert_eq!(browser.eval("window.__xss ?? null").await, Value::Null);

    // Keyboard: the skip link, then the tree with a roving tabindex.
    browser.press("Tab").await;
    assert_eq!(
        browser.eval("document.activeElement.textContent").await,
        "Skip to the supervision tree"
    );
    assert_eq!(
        browser
            .eval("document.activeElement.getBoundingClientRect().top >= 0")
            .await,
        true,
        "a focused skip link is visible"
    );
    browser.press("Enter").await;
    browser
        .wait_for(
            "focus on the tree section after the skip link",
            "document.activeElement.id === 'tree-panel'",
        )
        .await;
    browser.press("Tab").await;
    assert_eq!(
        browser.focused().await,
        "root",
        "Tab enters the tree at its root"
    );
    assert_eq!(
        browser
            .eval("document.querySelectorAll('[role=treeitem][tabindex=\"0\"]').length")
            .await,
        1,
        "one tree item in the tab order"
    );
    browser.press("ArrowDown").await;
    assert_eq!(browser.focused().await, "root/broker");
    browser.press("End").await;
    assert_eq!(browser.focused().await, "root/heartbeat");
    browser.press("Home").await;
    assert_eq!(browser.focused().await, "root");
    browser.press("ArrowLeft").await;
    assert_eq!(
        browser
            .eval(&format!("{}.getAttribute('aria-expanded')", item("root")))
            .await,
        "false"
    );
    assert_eq!(
        browser
            .eval(&format!("{default}.offsetParent === null"))
            .await,
        true,
        "a collapsed root hides its descendants"
    );
    browser.press("ArrowRight").await;
    assert_eq!(
        browser
            .eval(&format!("{}.getAttribute('aria-expanded')", item("root")))
            .await,
        "true"
    );
    browser.press("ArrowRight").await;
    assert_eq!(browser.focused().await, "root/broker");
    browser.press("ArrowDown").await;
    assert_eq!(browser.focused().await, "root/queues");
    browser.press("Enter").await;
    assert_eq!(
        browser
            .eval(&format!(
                "{}.getAttribute('aria-expanded')",
                item("root/queues")
            ))
            .await,
        "false"
    );
    browser.press("Enter").await;
    browser.press("ArrowRight").await;
    assert_eq!(browser.focused().await, "root/queues/default");
    browser.press("ArrowLeft").await; // collapses the consumer's in-flight list
    browser.press("ArrowLeft").await; // then goes to the parent
    assert_eq!(browser.focused().await, "root/queues");
    browser.press("ArrowRight").await;
    assert_eq!(browser.focused().await, "root/queues/default");

    // The chaos kill, and the counter on the page.
    let killed = reqwest::Client::new()
        .post(format!("{}/chaos/kill/root/queues/default", node.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("POST /chaos/kill");
    assert_eq!(killed.status(), 202);
    browser
        .wait_for(
            "root/queues/default with 1 restart, running again",
            &format!(
                "{default}.dataset.restarts === '1' && {default}.dataset.status === 'running'"
            ),
        )
        .await;
    assert_eq!(
        browser
            .eval(&format!("{default}.querySelector('.restarts').textContent"))
            .await,
        "1 restart"
    );
    browser
        .wait_for(
            "actor_restarted for root/queues/default in the feed",
            "Array.from(document.querySelectorAll('#feed li[data-kind=actor_restarted]')).some((li) => li.textContent.includes('root/queues/default'))",
        )
        .await;
    assert_eq!(
        browser.focused().await,
        "root/queues/default",
        "the focus survived the page's updates"
    );

    // Laptop width without a horizontal scrollbar; nothing thrown; no CSP violation.
    assert_eq!(
        browser
            .eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        true,
        "the page is wider than 1366 px"
    );
    assert_eq!(browser.eval("window.__violations").await, json!([]));
    assert!(
        browser.exceptions.is_empty(),
        "the page threw: {:?}",
        browser.exceptions
    );
    // The policy is in force: an HTML sink refuses a string (Trusted Types), so markup from
    // the node could not be rendered even by a future mistake in the page.
    assert_eq!(
        browser
            .eval("(() => { try { document.createElement('div').innerHTML = '<b>x</b>'; return 'rendered'; } catch (e) { return e.name; } })()")
            .await,
        "TypeError"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_events_off_the_feed_says_so_and_the_tree_still_renders() {
    let Some(chromium) = chromium() else { return };
    let node = Node::start(
        "[http]\nbind = \"127.0.0.1:0\"\n[queues.default]\n[events]\nenabled = false\n",
        &[],
    );
    let mut browser = Browser::launch(&chromium).await;
    browser.goto(&format!("{}/", node.url)).await;
    let default = item("root/queues/default");
    browser
        .wait_for(
            "root/queues/default, running",
            &format!("{default}?.dataset.status === 'running'"),
        )
        .await;
    browser
        .wait_for(
            "the feed marked off",
            "document.getElementById('events-state').textContent === 'off on this node'",
        )
        .await;
    assert!(
        browser.exceptions.is_empty(),
        "the page threw: {:?}",
        browser.exceptions
    );
}

/// Rewrites `docs/live-tree.png`: the page under load. Ignored (run it by hand, see the module
/// docs); it needs Chromium and `python3` (the fake voice agents).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "rewrites docs/live-tree.png; run with --ignored"]
async fn screenshot_of_the_page_under_load() {
    let Some(chromium) = chromium() else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let python = Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("python3 runs");
    let python = String::from_utf8(python.stdout).unwrap().trim().to_string();
    let agent = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/fake_voice_agent.py");
    // An exec task that sleeps between `lo` and `hi` tenths of a second.
    let sleepy = |lo: u32, hi: u32| {
        format!(
            r#"{{ kind = "exec", command = "sh", args = ["-c", "t=$(( $(od -An -N2 -tu2 /dev/urandom) % {span} + {lo} )); sleep $((t / 10)).$((t % 10)); echo '{{}}'"] }}"#,
            span = hi - lo + 1
        )
    };
    let config = format!(
        r#"
[http]
bind = "127.0.0.1:{port}"

[chaos]
enabled = true

[queues.chat]
concurrency = 4
time_limit = "120s"

[queues.default]
concurrency = 6

[queues.background]
concurrency = 2

[queues.notifications]
concurrency = 2

[queues.voice]
concurrency = 2

[tasks.process_chat_message]
queue = "chat"
handler = {chat}

[tasks.extract_preferences_async]
queue = "default"
handler = {default}

[tasks.recall_memory]
queue = "default"
uses = ["zep"]
max_retries = 2
backoff = "1s"
handler = {{ kind = "http", url = "http://127.0.0.1:{port}/egress/zep/graph/search", timeout = "2s" }}

[tasks.process_incoming_media_task]
queue = "background"
handler = {background}

[tasks.send_whatsapp_message_task]
queue = "notifications"
max_retries = 1
backoff = "1s"
handler = {{ kind = "exec", command = "sh", args = ["-c", "sleep 0.4; echo 'whatsapp: 401 Unauthorized (token expired)' >&2; exit 75"] }}

[tasks.start_voice_session]
queue = "voice"
handler = {{ kind = "pool", pool = "voice" }}

[resources.zep]
kind = "zep"
base_url = "http://127.0.0.1:9/api/v2"
api_key_env = "RT_SHOT_ZEP_KEY"
timeout = "1s"
breaker = {{ failure_threshold = 3, open_for = "30s" }}

[pools.voice]
command = "{python}"
args = ["{agent}", "--startup-delay", "0.5", "--session", "60"]
env = {{ PYTHONUNBUFFERED = "1" }}
min_idle = 2
max = 4
ready_pattern = "Pipeline ready"
"#,
        chat = sleepy(30, 90),
        default = sleepy(2, 15),
        background = sleepy(20, 40),
        agent = agent.display(),
    );
    let node = Node::start(&config, &[("RT_SHOT_ZEP_KEY", "zk-screenshot")]);
    let mut batch = Vec::new();
    for n in 0..400 {
        let task = match n % 10 {
            0..=2 => "process_chat_message",
            3..=6 => "extract_preferences_async",
            7 => "process_incoming_media_task",
            8 => "send_whatsapp_message_task",
            _ => "recall_memory",
        };
        batch.push(json!({ "task": task, "args": [n] }));
    }
    for n in 0..3 {
        batch.push(
            json!({ "task": "start_voice_session", "kwargs": { "room": format!("room-{n}") } }),
        );
    }
    let mut browser = Browser::launch(&chromium).await;
    browser.goto(&format!("{}/", node.url)).await;
    browser
        .wait_for("the tree", &format!("!!{}", item("root/queues/chat")))
        .await;
    let response = reqwest::Client::new()
        .post(format!("{}/tasks", node.url))
        .json(&Value::Array(batch))
        .send()
        .await
        .expect("POST /tasks");
    assert_eq!(response.status(), 202);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(node.post("/chaos/kill/heartbeat", None).await.status(), 202);
    browser
        .wait_for(
            "the open breaker",
            &format!(
                "{}.querySelector('.summary').textContent.includes('open')",
                item("root/resources/zep")
            ),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let to = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/live-tree.png");
    browser.screenshot(&to).await;
    println!("wrote {}", to.display());
    drop(browser);
    // An orderly stop, so the pool's agents are stopped with the node.
    let mut node = node;
    node.signal("TERM");
    assert!(
        node.wait_exit(Duration::from_secs(30)).is_some(),
        "the node did not stop"
    );
}
