//! README.md's "Quick start", run as written: the blocks it marks `quickstart:node` (the node
//! command) and `quickstart:run` (commands, each followed by a `text` block of what they
//! print) are read from the README itself, the node command is started from the repository's
//! root on a fresh node, each `run` block goes through `sh`, and what it prints must be the
//! README's text — only ids (UUIDs) and times (RFC 3339) may differ. Then the live page the
//! section tells the reader to open is fetched from that node.
//!
//! Two things differ from a reader's terminal, and only through the environment, so the
//! commands stay verbatim: `runtime` on `PATH` is the binary this test build made (the reader
//! installs one with `cargo install --path .`), and the node listens on a free port
//! (`RT_HTTP_BIND=127.0.0.1:0`, the address read from the file `RT_ADDRESS_FILE` names) which the
//! commands reach through `RT_URL`, instead of 127.0.0.1:7070, which may be taken here.

use crate::common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use regex::Regex;

/// The README's quick start: its node command, and each run block with its expected output.
struct QuickStart {
    node: String,
    runs: Vec<(String, String)>,
}

/// The body of the fenced block that opens on the first line after `from` starting with
/// "```" + `lang`, and the position after it.
fn block(text: &str, from: usize, lang: &str) -> Option<(String, usize)> {
    let open = format!("```{lang}\n");
    let start = from + text[from..].find(&open)? + open.len();
    let end = start + text[start..].find("\n```")?;
    Some((text[start..end].to_string(), end + 4))
}

fn quick_start(readme: &str) -> QuickStart {
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Quick start\n"))
        .expect("README.md has a `## Quick start` section");
    let node_at = section
        .find("<!-- quickstart:node -->")
        .expect("a quickstart:node block");
    let (node, _) = block(section, node_at, "sh").expect("the node command");
    let mut runs = Vec::new();
    for (at, _) in section.match_indices("<!-- quickstart:run -->") {
        let (commands, after) = block(section, at, "sh").expect("a run block's commands");
        let (expected, _) = block(section, after, "text").expect("a run block's output");
        runs.push((commands, expected));
    }
    assert!(runs.len() >= 3, "the quick start runs a few commands");
    QuickStart { node, runs }
}

/// `text` with every UUID and RFC 3339 time replaced by a placeholder, line by line.
fn normalized(text: &str) -> Vec<String> {
    let uuid = Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap();
    let time = Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z").unwrap();
    text.trim_end()
        .lines()
        .map(|line| {
            let line = uuid.replace_all(line, "<uuid>");
            time.replace_all(&line, "<time>").into_owned()
        })
        .collect()
}

/// Stops the node when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_quick_start_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let steps = quick_start(&readme);
    let bin = Path::new(common::binary()).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let scratch = common::Scratch::new();
    let address = scratch.path().join("address");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("exec {}", steps.node.trim()))
        .current_dir(root)
        .env("PATH", &path)
        .env("RT_HTTP_BIND", "127.0.0.1:0")
        .env("RT_ADDRESS_FILE", &address)
        .env("RUST_LOG", "info")
        .env_remove("RT_BROKER_URL")
        .env_remove("RT_CONFIG")
        .env_remove("RT_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run the node command through sh");
    let addr = common::wait_address(&mut child, &address, Duration::from_secs(30))
        .expect("the node command started a node");
    let url = format!("http://{addr}");
    let node = Running(child);

    for (commands, expected) in &steps.runs {
        let out = Command::new("sh")
            .arg("-c")
            .arg(commands)
            .current_dir(root)
            .env("PATH", &path)
            .env("RT_URL", &url)
            .env_remove("RT_ADMIN_TOKEN")
            .output()
            .expect("run a block through sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.is_empty(),
            "{commands}\nprinted on stderr:\n{stderr}"
        );
        assert_eq!(
            normalized(&stdout),
            normalized(expected),
            "{commands}\nprinted:\n{stdout}"
        );
    }

    // "Now open http://127.0.0.1:7070 in a browser": the page is there.
    let page = reqwest::get(&url).await.unwrap();
    assert_eq!(page.status(), 200);
    let kind = page.headers()["content-type"].to_str().unwrap().to_string();
    assert!(kind.starts_with("text/html"), "{kind}");
    assert!(page.text().await.unwrap().contains("<html"));
    drop(node);
}

#[test]
fn the_quick_start_extraction_finds_the_blocks_and_ignores_ids_and_times() {
    let readme = "# x\n\n## Quick start\n\n<!-- quickstart:node -->\n```sh\nruntime\n```\n\n\
        <!-- quickstart:run -->\n```sh\na\n```\n\n```text\n1\n```\n\
        <!-- quickstart:run -->\n```sh\nb\n```\n\nprose\n\n```text\n2\n```\n\
        <!-- quickstart:run -->\n```sh\nc\n```\n```text\n3\n```\n\n## Next\n\n\
        <!-- quickstart:run -->\n```sh\nnot this\n```\n";
    let steps = quick_start(readme);
    assert_eq!(steps.node, "runtime");
    let runs: Vec<(&str, &str)> = steps
        .runs
        .iter()
        .map(|(c, e)| (c.as_str(), e.as_str()))
        .collect();
    assert_eq!(runs, [("a", "1"), ("b", "2"), ("c", "3")]);
    assert_eq!(
        normalized("id 0b9c5d2e-8f1a-4c3b-9e7d-6a5f4b3c2d1e at 2026-12-04T21:06:01.128Z\n"),
        ["id <uuid> at <time>"]
    );
    assert_ne!(normalized("state succeeded"), normalized("state dead"));
}
