//! The commands that talk to a running node over its HTTP API: `tree`, `enqueue`, `dlq`,
//! `purge`. Errors name the node and repeat its JSON error; nothing here panics on a bad
//! answer.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cli::{DlqArgs, DlqCommand, EnqueueArgs, NodeArgs, PurgeArgs, TreeArgs};

/// A node's HTTP API.
struct Node {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Node {
    fn new(args: &NodeArgs) -> Self {
        Self {
            base: args.url.trim_end_matches('/').to_string(),
            token: args.token.clone(),
            http: reqwest::Client::new(),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the node at {}", self.base))?;
        let status = response.status();
        let text = response.text().await.context("reading the answer")?;
        if !status.is_success() {
            let error = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or(text);
            bail!("{path}: {status}: {error}");
        }
        Ok(text)
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

/// `runtime tree`
pub async fn tree(args: TreeArgs) -> Result<()> {
    let node = Node::new(&NodeArgs {
        url: args.url,
        token: None,
    });
    let path = if args.json {
        "/actors"
    } else {
        "/actors?format=text"
    };
    print!("{}", node.get(path).await?);
    Ok(())
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
    ] {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    let answer = parse(&Node::new(&args.node).post("/tasks", Some(body)).await?)?;
    let id = answer["id"].as_str().unwrap_or_default();
    if answer["duplicate"] == true {
        println!("{id} (duplicate: the idempotency key was already used)");
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
            let answer = parse(&Node::new(&args.node).post(&path, None).await?)?;
            println!(
                "requeued {} dead letters of {}",
                answer["requeued"], args.queue
            );
            Ok(())
        }
    }
}

async fn dlq_list(args: DlqArgs) -> Result<()> {
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
    println!(
        "{:<26} {:<24} {:>8}  {:<36}  reason",
        "at", "task", "attempts", "id"
    );
    for letter in letters {
        let envelope = &letter["envelope"];
        println!(
            "{:<26} {:<24} {:>8}  {:<36}  {}",
            letter["at"].as_str().unwrap_or(""),
            envelope["task"].as_str().unwrap_or("(malformed)"),
            letter["attempts"],
            envelope["id"].as_str().unwrap_or(""),
            letter["reason"].as_str().unwrap_or(""),
        );
    }
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
