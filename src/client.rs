//! The commands that talk to a running node over its HTTP API: `inspect` ([`inspect`]),
//! `tree`, `enqueue`, `result`, `revoke`, `dlq`, `purge`, `nodes`, `pools`, `chaos`
//! ([`chaos`]); their tables all come from [`table`]. Errors name the node and repeat its JSON
//! error; nothing here panics on a bad answer. A node that does not answer at all is an
//! [`Unreachable`] error, which the binary turns into exit status [`EX_UNAVAILABLE`]. `result`
//! and `enqueue --wait` say how the task ended through their [`Ended`] (exit 0, [`EX_DEAD`] or
//! [`EX_TEMPFAIL`]).

pub mod chaos;
pub mod inspect;
pub mod table;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cli::{
    DlqCommand, DlqListArgs, EnqueueArgs, NodeArgs, NodesArgs, PoolsCommand, PurgeArgs, ResultArgs,
    RevokeArgs, TreeArgs,
};
use crate::innermost;

/// Exit status when the node cannot be reached (`EX_UNAVAILABLE` of sysexits.h).
pub const EX_UNAVAILABLE: u8 = 69;

/// Exit status of `result` / `enqueue --wait` for a task that is dead (failed for good, or
/// revoked).
pub const EX_DEAD: u8 = 3;

/// Exit status of `result` / `enqueue --wait` for a task that has not ended (without
/// `--wait`), or still had not when `--timeout` passed (`EX_TEMPFAIL` of sysexits.h: try
/// again later).
pub const EX_TEMPFAIL: u8 = 75;

/// Where a task stood when `result` or `enqueue --wait` printed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// It succeeded (exit 0).
    Succeeded,
    /// It is dead: failed for good, or revoked ([`EX_DEAD`]).
    Dead,
    /// Not yet (no `--wait`, or the wait timed out: [`EX_TEMPFAIL`]).
    NotYet,
}

impl Ended {
    /// The exit status that says it.
    pub fn exit_status(self) -> u8 {
        match self {
            Self::Succeeded => 0,
            Self::Dead => EX_DEAD,
            Self::NotYet => EX_TEMPFAIL,
        }
    }
}

/// First and longest pause between two looks at a task's record while waiting for it.
const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(500);

/// Time to open the connection to a node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for a whole request/answer (not for an event stream).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The node did not answer: nothing listens there, the name does not resolve, or it timed
/// out.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot reach the node at {url}: {reason} (is it running? the URL comes from --url or RT_URL)"
)]
pub struct Unreachable {
    /// The node's base URL.
    pub url: String,
    /// What the connection attempt said.
    pub reason: String,
}

/// A node's HTTP API.
struct Node {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Node {
    fn new(args: &NodeArgs) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            base: args.url.trim_end_matches('/').to_string(),
            token: args.token.clone(),
            http,
        }
    }

    /// Sends a request and returns the response whatever its status; `timeout` bounds the
    /// whole exchange (`None` for a stream).
    async fn open(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        if let Some(timeout) = timeout {
            request = request.timeout(timeout);
        }
        request.send().await.map_err(|err| {
            if err.is_builder() {
                anyhow::anyhow!("invalid node URL `{}`: {}", self.base, innermost(&err))
            } else {
                Unreachable {
                    url: self.base.clone(),
                    reason: if err.is_timeout() {
                        "no answer in time".to_string()
                    } else {
                        innermost(&err)
                    },
                }
                .into()
            }
        })
    }

    /// Fails with the node's JSON error when `response` is not a success.
    async fn check(path: &str, response: reqwest::Response) -> Result<reqwest::Response> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let error = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        bail!("{path}: {status}: {error}");
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<String> {
        let response = self.open(method, path, body, Some(REQUEST_TIMEOUT)).await?;
        let response = Self::check(path, response).await?;
        response.text().await.context("reading the answer")
    }

    async fn get(&self, path: &str) -> Result<String> {
        self.send(reqwest::Method::GET, path, None).await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> Result<String> {
        self.send(reqwest::Method::POST, path, body).await
    }
}

fn parse(text: &str) -> Result<Value> {
    serde_json::from_str(text).context("the node answered something that is not JSON")
}

/// `runtime tree`: the same as `runtime inspect tree`.
pub async fn tree(args: TreeArgs) -> Result<()> {
    let node = Node::new(&NodeArgs {
        url: args.url,
        token: None,
    });
    inspect::tree(&node, args.json).await
}

/// Percent-encodes one path segment (a task id may hold `/`, `?`, `%`…).
pub(crate) fn encode_segment(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `runtime enqueue`: prints the task id; with `--wait`, then its state and result once it
/// ended ([`Ended`]).
pub async fn enqueue(args: EnqueueArgs) -> Result<Ended> {
    let positional: Value =
        serde_json::from_str(&args.args).context("--args: expected a JSON array")?;
    let keywords: Value =
        serde_json::from_str(&args.kwargs).context("--kwargs: expected a JSON object")?;
    let mut body = json!({ "task": args.task, "args": positional, "kwargs": keywords });
    for (key, value) in [
        ("queue", args.queue.map(Value::from)),
        ("countdown", args.countdown.map(Value::from)),
        ("eta", args.eta.map(Value::from)),
        ("idempotency_key", args.idempotency_key.map(Value::from)),
        ("id", args.id.map(Value::from)),
    ] {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    let node = Node::new(&args.node);
    let answer = parse(&node.post("/tasks", Some(body)).await?)?;
    let id = answer["id"].as_str().unwrap_or_default();
    if answer["duplicate"] == true {
        println!("{id} (duplicate: a task with this id or idempotency key exists; not enqueued)");
    } else {
        println!("{id}");
    }
    if !args.wait {
        return Ok(Ended::Succeeded);
    }
    let (record, ended) = wait_for(&node, id, Some(args.timeout)).await?;
    print!("{}", record_lines(&record, false));
    Ok(ended)
}

/// `runtime result ID`: the task's state and result (its whole record), once it ended with
/// `--wait`.
pub async fn result(args: ResultArgs) -> Result<Ended> {
    let node = Node::new(&args.node);
    let timeout = args.wait.then_some(args.timeout);
    let (record, ended) = wait_for(&node, &args.id, timeout).await?;
    if args.json {
        println!("{record}");
    } else {
        print!("{}", record_lines(&record, true));
    }
    Ok(ended)
}

/// Reads task `id`'s record — again and again until it has ended when `wait` is given, for at
/// most that long — and says where it stands.
async fn wait_for(node: &Node, id: &str, wait: Option<Duration>) -> Result<(Value, Ended)> {
    let path = format!("/tasks/{}", encode_segment(id));
    let deadline = wait.map(|wait| tokio::time::Instant::now() + wait);
    let mut pause = POLL_FIRST;
    loop {
        let record = parse(&node.get(&path).await?)?;
        let ended = match record["state"].as_str() {
            Some("succeeded") => Ended::Succeeded,
            Some("dead") => Ended::Dead,
            _ => Ended::NotYet,
        };
        let now = tokio::time::Instant::now();
        match deadline {
            Some(deadline) if ended == Ended::NotYet && now < deadline => {
                tokio::time::sleep(pause.min(deadline - now)).await;
                pause = (pause * 2).min(POLL_MAX);
            }
            _ => return Ok((record, ended)),
        }
    }
}

/// A record as `name  value` lines: with `whole`, the id, task, queue and times too; else
/// what `enqueue --wait` adds after the id (state, attempts, eta, error, result).
pub fn record_lines(record: &Value, whole: bool) -> String {
    let text = |name: &str| match &record[name] {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let mut lines: Vec<(&str, Option<String>)> = Vec::new();
    if whole {
        lines.extend([
            ("id", text("id")),
            ("task", text("task")),
            ("queue", text("queue")),
        ]);
    }
    lines.extend([
        ("state", text("state")),
        ("attempts", text("attempts")),
        ("eta", text("eta")),
    ]);
    if whole {
        lines.extend([
            ("enqueued", text("enqueued_at")),
            ("started", text("started_at")),
            ("node", text("node")),
            ("updated", text("updated_at")),
        ]);
    }
    lines.push(("error", text("error")));
    if record["state"] == "succeeded" {
        // `null` is a result too.
        lines.push(("result", Some(record["result"].to_string())));
    }
    lines
        .into_iter()
        .filter_map(|(name, value)| Some(format!("{name:<9} {}\n", value?)))
        .collect()
}

/// `runtime revoke ID [--terminate]`: says what the task was and what happens to it now.
pub async fn revoke(args: RevokeArgs) -> Result<()> {
    let path = format!("/tasks/{}/revoke", encode_segment(&args.id));
    let body = json!({ "terminate": args.terminate });
    let answer = parse(&Node::new(&args.node).post(&path, Some(body)).await?)?;
    let id = &args.id;
    let what = match (answer["was"].as_str().unwrap_or(""), args.terminate) {
        ("revoked", _) => format!("{id} was revoked already"),
        ("unknown", _) => format!(
            "revoked {id}: no such task yet; the revocation is kept for broker.result_ttl, so \
             a task with this id that comes in that time does not run"
        ),
        ("running", true) => format!(
            "revoked {id}: it was running; it is being stopped (the soft signal now, the hard \
             stop after runtime.terminate_grace) and recorded dead/revoked"
        ),
        ("running", false) => format!(
            "revoked {id}: it was running; its attempt finishes and it is not retried \
             (--terminate stops it)"
        ),
        (was, _) => format!("revoked {id}: it was {was}; it will not run"),
    };
    println!("{what}");
    Ok(())
}

/// `runtime dlq list|requeue`
pub async fn dlq(command: DlqCommand) -> Result<()> {
    match command {
        DlqCommand::List(args) => dlq_list(args).await,
        DlqCommand::Requeue(args) => {
            let path = format!("/dlq/{}/requeue?limit={}", args.queue, args.limit);
            let text = Node::new(&args.node).post(&path, None).await?;
            if args.json {
                println!("{}", text.trim_end());
                return Ok(());
            }
            let answer = parse(&text)?;
            println!(
                "requeued {} dead letters of {}",
                answer["requeued"], args.queue
            );
            Ok(())
        }
    }
}

async fn dlq_list(args: DlqListArgs) -> Result<()> {
    let path = format!("/dlq/{}?limit={}", args.queue, args.limit);
    let text = Node::new(&args.node).get(&path).await?;
    if args.json {
        println!("{text}");
        return Ok(());
    }
    let answer = parse(&text)?;
    let letters = answer["dead_letters"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if letters.is_empty() {
        println!("no dead letters in {}", args.queue);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|letter| {
            let envelope = &letter["envelope"];
            vec![
                letter["at"].as_str().unwrap_or("").to_string(),
                envelope["task"]
                    .as_str()
                    .unwrap_or("(malformed)")
                    .to_string(),
                letter["attempts"].to_string(),
                envelope["id"].as_str().unwrap_or("").to_string(),
                letter["reason"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(&["at", "task", "attempts", "id", "reason"], &rows)
    );
    Ok(())
}

/// `runtime purge QUEUE --yes`
pub async fn purge(args: PurgeArgs) -> Result<()> {
    if !args.yes {
        bail!(
            "purging drops every ready and delayed task of `{}` for good; add --yes to do it",
            args.queue
        );
    }
    let path = format!("/queues/{}/purge", args.queue);
    let answer = parse(&Node::new(&args.node).post(&path, None).await?)?;
    println!(
        "purged {} ready and {} delayed entries of {}",
        answer["purged"]["ready"], answer["purged"]["delayed"], args.queue
    );
    Ok(())
}

/// `runtime pools reset NAME`: says what the pool was and that it starts agents again, or
/// that it was healthy and nothing was done.
pub async fn pools(command: PoolsCommand) -> Result<()> {
    match command {
        PoolsCommand::Reset(args) => {
            let path = format!("/pools/{}/reset", args.name);
            let answer = parse(&Node::new(&args.node).post(&path, None).await?)?;
            let was = answer["was"].as_str().unwrap_or("?");
            if answer["reset"] == true {
                let (state, reason) = was.split_once(": ").unwrap_or((was, ""));
                println!(
                    "pool {} was {state} ({reason}); it starts agents again",
                    args.name
                );
            } else {
                println!("pool {} is healthy: nothing to reset", args.name);
            }
            Ok(())
        }
    }
}

/// `runtime nodes`: one line per node consuming from the broker.
pub async fn nodes(args: NodesArgs) -> Result<()> {
    let text = Node::new(&args.node).get("/nodes").await?;
    if args.json {
        println!("{text}");
        return Ok(());
    }
    let answer = parse(&text)?;
    let nodes = answer["nodes"].as_array().cloned().unwrap_or_default();
    print!("{}", nodes_table(&nodes));
    Ok(())
}

/// The table `runtime nodes` prints: `NODE`, `STATE`, `QUEUES`, `IN_FLIGHT` (total, then per
/// queue), `STARTED_AT`, `LAST_SEEN`.
pub fn nodes_table(nodes: &[Value]) -> String {
    if nodes.is_empty() {
        return "no nodes\n".to_string();
    }
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let queues: Vec<&str> = n["queues"]
                .as_array()
                .map(|q| q.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let held = n["in_flight"].as_object().cloned().unwrap_or_default();
            let total: u64 = held.values().filter_map(Value::as_u64).sum();
            let per: Vec<String> = held
                .iter()
                .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
                .map(|(q, v)| format!("{q}={v}"))
                .collect();
            let in_flight = if per.is_empty() {
                total.to_string()
            } else {
                format!("{total} ({})", per.join(" "))
            };
            vec![
                n["name"].as_str().unwrap_or("").to_string(),
                n["state"].as_str().unwrap_or("running").to_string(),
                queues.join(","),
                in_flight,
                n["started_at"].as_str().unwrap_or("").to_string(),
                n["last_seen"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    table::render(
        &[
            "node",
            "state",
            "queues",
            "in_flight",
            "started_at",
            "last_seen",
        ],
        &rows,
    )
}
