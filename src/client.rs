//! The commands that talk to a running node over its HTTP API: `inspect` ([`inspect`]),
//! `tree`, `enqueue`, `dlq`, `purge`, `nodes`, `pools`, `chaos` ([`chaos`]); their tables all
//! come from [`table`]. Errors name the node and repeat its JSON error; nothing here panics
//! on a bad answer. A node that does not answer at all is an [`Unreachable`]
//! error, which the binary turns into exit status [`EX_UNAVAILABLE`].

pub mod chaos;
pub mod inspect;
pub mod table;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cli::{
    DlqCommand, DlqListArgs, EnqueueArgs, NodeArgs, NodesArgs, PoolsCommand, PurgeArgs, TreeArgs,
};
use crate::innermost;

/// Exit status when the node cannot be reached (`EX_UNAVAILABLE` of sysexits.h).
pub const EX_UNAVAILABLE: u8 = 69;

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

/// `runtime enqueue`: prints the task id.
pub async fn enqueue(args: EnqueueArgs) -> Result<()> {
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
    let answer = parse(&Node::new(&args.node).post("/tasks", Some(body)).await?)?;
    let id = answer["id"].as_str().unwrap_or_default();
    if answer["duplicate"] == true {
        println!("{id} (duplicate: a task with this id or idempotency key exists; not enqueued)");
    } else {
        println!("{id}");
    }
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
