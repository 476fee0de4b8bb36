//! `runtime chaos kill`: fault injection against a running node over `POST /chaos/kill/{path}`
//! (only served with `[chaos] enabled = true`), then `GET /actors` polled until the tree is
//! whole again — every actor `running`, the killed one started again (a new `started_at`) — and the time that took.
//!
//! - `runtime chaos kill root/queues/chat` kills one actor by path;
//! - `runtime chaos kill root/queues/chat/<task id>` kills that running task's actor (the route
//!   asks the consumer, which keeps its task actors: they are not tree nodes);
//! - `--kind consumer` kills a random actor of that kind (the kinds of `/actors`; never the
//!   root); `--kind agent` SIGKILLs a random pool agent process (pids from `GET /pools`, so the
//!   node must run on this machine); `--kind task` kills a random running task (from the
//!   consumers' snapshots in `/actors`, refreshed every second: a picked task that has finished
//!   since is passed over for the next one). A killed task's attempt counts as a retryable
//!   failure (an `exec` command's process group is SIGKILLed and reaped); the tree is whole
//!   again once every actor runs — its consumer is not restarted;
//! - `--every 100ms --for 10s [--seed 42]` repeats: one kill per interval, each reported with
//!   the time the tree took to be whole again (or that it was not yet whole at the next kill),
//!   then a summary once the tree is whole after the last kill.
//!
//! Exit status (through `main`): 0; 1 when chaos is disabled on the node (404 on the route),
//! no actor matches (for `--kind task`: no task is running — with `--every` that kill is
//! skipped and said so instead), the token is refused, or the tree is not whole within
//! `--whole-timeout`; 69 when the node cannot be reached.

use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use tokio::time::Instant;

use super::{Node, REQUEST_TIMEOUT, encode_segment, parse};
use crate::cli::{ChaosCommand, ChaosKillArgs};

/// Pause between two reads of `/actors` while waiting for the tree to be whole.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// Most listed tasks tried for one `--kind task` kill (listed ones may have finished since).
const TASK_TRIES: usize = 32;

/// `runtime chaos …`
pub async fn run(command: ChaosCommand) -> Result<()> {
    match command {
        ChaosCommand::Kill(args) => kill(args).await,
    }
}

/// What one kill hit.
#[derive(Debug)]
enum Victim {
    /// A supervised actor: its path, kind, and start time before the kill (a restart changes
    /// it; so does a restart of its supervisor, which starts the child afresh).
    Actor {
        path: String,
        kind: String,
        started_at: String,
    },
    /// A pool agent process.
    Agent { pool: String, id: String, pid: i32 },
    /// A running task's actor, killed through its consumer.
    Task {
        consumer: String,
        id: String,
        task: String,
        attempt: u64,
    },
}

impl Victim {
    fn describe(&self) -> String {
        match self {
            Victim::Actor { path, kind, .. } => format!("{path} ({kind})"),
            Victim::Task {
                consumer,
                id,
                task,
                attempt,
            } => format!("task {id} ({task}, attempt {attempt}) of {consumer}"),
            Victim::Agent { pool, id, pid } => format!("agent {id} of pool {pool} (pid {pid})"),
        }
    }
}

async fn kill(args: ChaosKillArgs) -> Result<()> {
    let node = Node::new(&args.node);
    let tasks = args.kind.as_deref() == Some("task");
    let seed = args.seed.unwrap_or_else(rand::random);
    let mut rng = StdRng::seed_from_u64(seed);
    if args.kind.is_some() {
        println!("seed {seed}");
    }
    let began = Instant::now();
    let (mut kills, mut whole_in_time, mut skipped) = (0u32, 0u32, 0u32);
    let mut longest = Duration::ZERO;
    loop {
        let tick = Instant::now();
        let victim = if tasks {
            strike_task(&node, &mut rng).await?
        } else {
            let victim = pick(&node, &args, &mut rng).await?;
            Some(strike(&node, victim).await?)
        };
        let stamp = humantime::format_rfc3339_millis(SystemTime::now());
        let last = match (args.every, args.duration) {
            (Some(every), Some(duration)) => began.elapsed() + every > duration,
            _ => true,
        };
        let Some(victim) = victim else {
            // `--kind task` with nothing running at this moment.
            if args.every.is_none() {
                bail!("no task is running on the node at {}", node.base);
            }
            skipped += 1;
            println!("{stamp} no task running; skipped this kill");
            if last {
                break;
            }
            if let Some(every) = args.every {
                tokio::time::sleep_until(tick + every).await;
            }
            continue;
        };
        kills += 1;
        let deadline = match (last, args.every) {
            (false, Some(every)) => tick + every,
            _ => Instant::now() + args.whole_timeout,
        };
        match whole(&node, &victim, deadline).await? {
            Ok(took) => {
                whole_in_time += 1;
                longest = longest.max(took);
                println!(
                    "{stamp} killed {}; tree whole again after {} ms",
                    victim.describe(),
                    took.as_millis()
                );
            }
            Err(problems) if last => {
                println!("{stamp} killed {}", victim.describe());
                bail!(
                    "the tree was not whole again within {}: {problems}",
                    humantime::format_duration(args.whole_timeout)
                );
            }
            Err(problems) => println!(
                "{stamp} killed {}; not whole yet at the next kill ({problems})",
                victim.describe()
            ),
        }
        if last {
            break;
        }
        if let Some(every) = args.every {
            tokio::time::sleep_until(tick + every).await;
        }
    }
    if kills > 1 || skipped > 0 {
        let skipped = if skipped > 0 {
            format!(", {skipped} skipped (no task running)")
        } else {
            String::new()
        };
        println!(
            "{kills} kills in {:.1} s (seed {seed}){skipped}; whole again before the next kill \
             {whole_in_time} times, longest {} ms",
            began.elapsed().as_secs_f64(),
            longest.as_millis()
        );
    }
    Ok(())
}

/// The running tasks the consumers of an `/actors` answer list in their snapshots.
fn running_tasks(tree: &Value) -> Vec<Victim> {
    fn walk(nodes: &Value, out: &mut Vec<Victim>) {
        for node in nodes.as_array().into_iter().flatten() {
            if node["kind"] == "consumer" && node["status"] == "running" {
                let consumer = node["path"].as_str().unwrap_or("");
                for task in node["snapshot"]["running"].as_array().into_iter().flatten() {
                    let Some(id) = task["id"].as_str() else {
                        continue;
                    };
                    out.push(Victim::Task {
                        consumer: consumer.to_string(),
                        id: id.to_string(),
                        task: task["task"].as_str().unwrap_or("").to_string(),
                        attempt: task["attempt"].as_u64().unwrap_or(0),
                    });
                }
            }
            walk(&node["children"], out);
        }
    }
    let mut out = Vec::new();
    walk(tree, &mut out);
    out
}

/// Kills a random running task (`--kind task`): the listed tasks in a random order, until
/// the node kills one (a listed task may have finished since the snapshot). `None` when none
/// was running.
async fn strike_task(node: &Node, rng: &mut StdRng) -> Result<Option<Victim>> {
    let mut candidates = running_tasks(&parse(&node.get("/actors").await?)?);
    candidates.shuffle(rng);
    for candidate in candidates.into_iter().take(TASK_TRIES) {
        let Victim::Task { consumer, id, .. } = &candidate else {
            continue;
        };
        let route = format!("/chaos/kill/{consumer}/{}", encode_segment(id));
        if let Ok(answer) = post_kill(node, &route).await? {
            return Ok(Some(killed_task(consumer, id, &answer)));
        }
    }
    Ok(None)
}

/// A killed task as the node's answer describes it (its name and the attempt it killed: the
/// snapshot may be older).
fn killed_task(consumer: &str, id: &str, answer: &Value) -> Victim {
    Victim::Task {
        consumer: consumer.to_string(),
        id: id.to_string(),
        task: answer["task"].as_str().unwrap_or("").to_string(),
        attempt: answer["attempt"].as_u64().unwrap_or(0),
    }
}

/// The next victim: the named actor, or a random one of `--kind`.
async fn pick(node: &Node, args: &ChaosKillArgs, rng: &mut StdRng) -> Result<Victim> {
    if args.kind.as_deref() == Some("agent") {
        let pools = parse(&node.get("/pools").await?)?;
        let mut agents = Vec::new();
        for (pool, snapshot) in pools["pools"].as_object().into_iter().flatten() {
            for agent in snapshot["agents"].as_array().into_iter().flatten() {
                if let Some(pid) = agent["pid"].as_i64().and_then(|p| i32::try_from(p).ok()) {
                    let id = agent["id"].as_str().unwrap_or("").to_string();
                    agents.push(Victim::Agent {
                        pool: pool.clone(),
                        id,
                        pid,
                    });
                }
            }
        }
        if agents.is_empty() {
            bail!("no pool agent runs on the node at {}", node.base);
        }
        let at = rng.random_range(0..agents.len());
        return Ok(agents.swap_remove(at));
    }
    let actors = flatten(&parse(&node.get("/actors").await?)?);
    if let Some(path) = &args.path {
        let path = qualified(path);
        return match actors.iter().find(|a| a.0 == path) {
            Some((path, kind, _, _, started_at)) => Ok(Victim::Actor {
                path: path.clone(),
                kind: kind.clone(),
                started_at: started_at.clone(),
            }),
            None => {
                // A running task of a listed consumer: `root/queues/chat/<task id>`.
                let task = actors.iter().find_map(|a| {
                    let id = path.strip_prefix(&a.0)?.strip_prefix('/')?;
                    (a.1 == "consumer" && !id.is_empty()).then(|| (a.0.clone(), id.to_string()))
                });
                Ok(match task {
                    Some((consumer, id)) => Victim::Task {
                        consumer,
                        id,
                        task: String::new(),
                        attempt: 0,
                    },
                    // Not listed: let the node answer (404 names the path, or says chaos is
                    // off).
                    None => Victim::Actor {
                        path,
                        kind: "?".into(),
                        started_at: String::new(),
                    },
                })
            }
        };
    }
    let kind = args.kind.as_deref().unwrap_or_default();
    let mut candidates: Vec<&Actor> = actors
        .iter()
        .filter(|a| a.1 == kind && a.0 != "root" && a.3 == "running")
        .collect();
    if candidates.is_empty() {
        let mut kinds: Vec<&str> = actors.iter().map(|a| a.1.as_str()).collect();
        kinds.sort_unstable();
        kinds.dedup();
        bail!(
            "no running actor of kind `{kind}` on the node at {} (kinds there: {}, or agent)",
            node.base,
            kinds.join(", ")
        );
    }
    let (path, kind, _, _, started_at) =
        candidates.swap_remove(rng.random_range(0..candidates.len()));
    Ok(Victim::Actor {
        path: path.clone(),
        kind: kind.clone(),
        started_at: started_at.clone(),
    })
}

/// `queues/chat` → `root/queues/chat`.
fn qualified(path: &str) -> String {
    let path = path.trim_matches('/');
    if path == "root" || path.starts_with("root/") {
        path.to_string()
    } else {
        format!("root/{path}")
    }
}

/// One actor of `/actors`: path, kind, restarts, status, started at.
pub type Actor = (String, String, u64, String, String);

/// Every actor of an `/actors` answer, depth first.
pub fn flatten(tree: &Value) -> Vec<Actor> {
    fn walk(nodes: &Value, out: &mut Vec<Actor>) {
        for node in nodes.as_array().into_iter().flatten() {
            out.push((
                node["path"].as_str().unwrap_or("").to_string(),
                node["kind"].as_str().unwrap_or("").to_string(),
                node["restarts"].as_u64().unwrap_or(0),
                node["status"].as_str().unwrap_or("").to_string(),
                node["started_at"].as_str().unwrap_or("").to_string(),
            ));
            walk(&node["children"], out);
        }
    }
    let mut out = Vec::new();
    walk(tree, &mut out);
    out
}

/// `POST` to a chaos kill route: `Ok(answer)` on success, `Err(the node's error)` on a 404
/// (no such actor or running task), an error for anything else — chaos disabled (the route
/// does not exist), a refused token.
async fn post_kill(node: &Node, route: &str) -> Result<std::result::Result<Value, String>> {
    let response = node
        .open(reqwest::Method::POST, route, None, Some(REQUEST_TIMEOUT))
        .await?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        let text = response.text().await.unwrap_or_default();
        let error = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        if error == "no such route" {
            bail!(
                "chaos is disabled on the node at {}: POST /chaos/kill answers 404 (set \
                 `[chaos] enabled = true` in its config)",
                node.base
            );
        }
        return Ok(Err(error));
    }
    let response = Node::check(route, response).await?;
    let text = response.text().await.unwrap_or_default();
    Ok(Ok(serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// Kills the victim: the chaos route for an actor or a task, SIGKILL for an agent. Returns it
/// (a task with its name and attempt from the node's answer).
async fn strike(node: &Node, victim: Victim) -> Result<Victim> {
    let route = match &victim {
        Victim::Actor { path, .. } => format!("/chaos/kill/{path}"),
        Victim::Task { consumer, id, .. } => {
            format!("/chaos/kill/{consumer}/{}", encode_segment(id))
        }
        Victim::Agent { pid, .. } => {
            use nix::sys::signal::{Signal, kill};
            use nix::unistd::Pid;
            kill(Pid::from_raw(*pid), Signal::SIGKILL).map_err(|err| {
                anyhow::anyhow!(
                    "cannot SIGKILL pid {pid}: {err} (agents can only be killed on the node's \
                     machine)"
                )
            })?;
            return Ok(victim);
        }
    };
    match (post_kill(node, &route).await?, &victim) {
        (Ok(answer), Victim::Task { consumer, id, .. }) => Ok(killed_task(consumer, id, &answer)),
        (Ok(_), _) => Ok(victim),
        (Err(error), _) => bail!("{route}: {error}"),
    }
}

/// Polls `/actors` until every actor runs and the victim is back (a restarted actor's count
/// started again; a killed agent is gone from `/pools`): `Ok(time taken)`, or `Err(what is not
/// whole)` at `deadline`.
async fn whole(
    node: &Node,
    victim: &Victim,
    deadline: Instant,
) -> Result<std::result::Result<Duration, String>> {
    let from = Instant::now();
    loop {
        let actors = flatten(&parse(&node.get("/actors").await?)?);
        let mut problems: Vec<String> = actors
            .iter()
            .filter(|a| a.3 != "running")
            .map(|a| format!("{} is {}", a.0, a.3))
            .collect();
        match victim {
            Victim::Actor {
                path, started_at, ..
            } => {
                if !actors.iter().any(|a| &a.0 == path && &a.4 != started_at) {
                    problems.push(format!("{path} not restarted yet"));
                }
            }
            // The task's consumer must still run (killing a task never restarts it): covered
            // by every actor running, and checked by path in case it left the tree.
            Victim::Task { consumer, .. } => {
                if !actors.iter().any(|a| &a.0 == consumer) {
                    problems.push(format!("{consumer} is gone"));
                }
            }
            Victim::Agent { pid, .. } => {
                let pools = parse(&node.get("/pools").await?)?;
                let listed = pools["pools"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .flat_map(|(_, p)| p["agents"].as_array().into_iter().flatten())
                    .any(|a| a["pid"].as_i64() == Some(i64::from(*pid)));
                if listed {
                    problems.push(format!("pid {pid} still listed"));
                }
            }
        }
        if problems.is_empty() {
            return Ok(Ok(from.elapsed()));
        }
        if Instant::now() >= deadline {
            return Ok(Err(problems.join("; ")));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
