//! The tree registry: what every actor of the node is, where it sits and how it is doing.
//!
//! Supervisors write the lifecycle fields (status, restarts, last error) of their children;
//! each actor writes its own kind-specific `snapshot`. Readers (the HTTP introspection
//! routes) copy entries out of a [`DashMap`] and never wait on an actor's mailbox.
//!
//! Paths are `/`-separated names from the root: `root`, `root/queues`, `root/queues/chat`.
//!
//! With an [`EventSink`] attached ([`Tree::attach_events`]) the supervisors also put what
//! happens to their children on the events stream (`actor_exited`, `actor_restarted`, …).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use dashmap::DashMap;
use ractor::ActorCell;
use serde::Serialize;
use tokio::time::Instant;

use crate::broker::{Event, EventSink};
use crate::metrics::Metrics;
use crate::policy::Restart;

/// Lifecycle status of an actor as its supervisor last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Being spawned (`pre_start` running).
    Starting,
    /// Running and handling messages.
    Running,
    /// Exited; its supervisor will start it again after the restart backoff.
    Restarting,
    /// Being stopped in an orderly way.
    Stopping,
    /// Exited and not coming back (a normal exit of a transient child, or shutdown).
    Stopped,
    /// Exited abnormally and not coming back (a supervisor that gave up).
    Failed,
}

impl Status {
    /// The JSON / text spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Restarting => "restarting",
            Status::Stopping => "stopping",
            Status::Stopped => "stopped",
            Status::Failed => "failed",
        }
    }
}

/// One actor as the registry knows it.
#[derive(Clone, Debug, Serialize)]
pub struct ActorInfo {
    /// Name within its parent (`chat`).
    pub name: String,
    /// What kind of actor it is (`supervisor`, `heartbeat`, `consumer`, …).
    pub kind: String,
    /// Full path from the root (`root/queues/chat`).
    pub path: String,
    /// Path of the supervisor, `None` for the root.
    pub parent: Option<String>,
    /// Lifecycle status.
    pub status: Status,
    /// Restart type under its supervisor (`None` for the root).
    pub restart: Option<Restart>,
    /// How many times its supervisor has restarted it.
    pub restarts: u32,
    /// When the current incarnation started (RFC 3339, UTC).
    pub started_at: String,
    /// Seconds the current incarnation has been up.
    pub uptime_secs: f64,
    /// Why it last exited, if it ever did.
    pub last_error: Option<String>,
    /// Why it is running but not doing its job (e.g. the broker lost Redis), if it says so.
    pub degraded: Option<String>,
    /// Kind-specific state published by the actor itself.
    pub snapshot: serde_json::Value,
}

/// An [`ActorInfo`] with its children, as served by `GET /actors`.
#[derive(Clone, Debug, Serialize)]
pub struct ActorNode {
    /// The actor.
    #[serde(flatten)]
    pub info: ActorInfo,
    /// Its children in start order.
    pub children: Vec<ActorNode>,
}

#[derive(Debug)]
struct Entry {
    name: String,
    kind: String,
    parent: Option<String>,
    restart: Option<Restart>,
    /// Registration order, kept across restarts so children list in start order.
    order: u64,
    status: Status,
    restarts: u32,
    started_at: SystemTime,
    started: Instant,
    last_error: Option<String>,
    degraded: Option<String>,
    snapshot: serde_json::Value,
    cell: Option<ActorCell>,
}

/// The shared registry of every actor in the node.
#[derive(Debug, Default)]
pub struct Tree {
    entries: DashMap<String, Entry>,
    next_order: AtomicU64,
    events: OnceLock<EventSink>,
    /// Where restarts are counted for `/metrics` (disabled unless given).
    metrics: Arc<Metrics>,
}

impl Tree {
    /// An empty registry (restarts are not counted in any [`Metrics`]).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An empty registry whose restarts are also counted in `metrics`
    /// (`rt_actor_restarts_total`).
    pub fn with_metrics(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            ..Self::default()
        })
    }

    /// The handle of the root actor, named `name` (conventionally `root`).
    pub fn root(self: &Arc<Self>, name: &str) -> TreeHandle {
        TreeHandle {
            tree: Arc::clone(self),
            path: name.to_string(),
        }
    }

    /// Publishes the supervision events of this tree through `sink` (the first sink attached
    /// stays).
    pub fn attach_events(&self, sink: EventSink) {
        let _ = self.events.set(sink);
    }

    /// Puts `event` on the events stream, if a sink is attached (never waits).
    pub fn emit(&self, event: Event) {
        if let Some(sink) = self.events.get() {
            sink.emit(event);
        }
    }

    /// Adds (or re-adds, keeping the restart count and order) an actor in `Starting` status.
    pub(crate) fn register(
        &self,
        path: &str,
        kind: &str,
        parent: Option<&str>,
        restart: Option<Restart>,
    ) {
        let name = path.rsplit('/').next().unwrap_or(path).to_string();
        self.metrics.actor_registered(path, kind);
        let mut entry = self
            .entries
            .entry(path.to_string())
            .or_insert_with(|| Entry {
                name,
                kind: kind.to_string(),
                parent: parent.map(str::to_string),
                restart,
                order: self.next_order.fetch_add(1, Ordering::Relaxed),
                status: Status::Starting,
                restarts: 0,
                started_at: SystemTime::now(),
                started: Instant::now(),
                last_error: None,
                degraded: None,
                snapshot: serde_json::Value::Null,
                cell: None,
            });
        entry.status = Status::Starting;
        entry.snapshot = serde_json::Value::Null;
        entry.degraded = None;
        entry.kind = kind.to_string();
        entry.restart = restart;
    }

    /// Marks an actor running as `cell`; `restarted` counts one more restart.
    pub(crate) fn set_running(&self, path: &str, cell: ActorCell, restarted: bool) {
        if let Some(mut e) = self.entries.get_mut(path) {
            e.status = Status::Running;
            e.cell = Some(cell);
            e.started_at = SystemTime::now();
            e.started = Instant::now();
            if restarted {
                e.restarts += 1;
                self.metrics.actor_restarted(path, &e.kind);
            }
        }
    }

    /// Sets the status (and, when given, the last error); drops the cell unless running.
    pub(crate) fn set_status(&self, path: &str, status: Status, error: Option<String>) {
        if let Some(mut e) = self.entries.get_mut(path) {
            e.status = status;
            if status != Status::Running {
                e.cell = None;
            }
            if error.is_some() {
                e.last_error = error;
            }
        }
    }

    /// Removes an actor and everything below it.
    pub(crate) fn remove_subtree(&self, path: &str) {
        let prefix = format!("{path}/");
        self.entries
            .retain(|p, _| p.as_str() != path && !p.starts_with(&prefix));
    }

    /// Removes everything below `path`, keeping `path` itself.
    pub(crate) fn remove_descendants(&self, path: &str) {
        let prefix = format!("{path}/");
        self.entries.retain(|p, _| !p.starts_with(&prefix));
    }

    /// The running actor at `path`, for the chaos route.
    pub fn cell(&self, path: &str) -> Option<ActorCell> {
        self.entries.get(path).and_then(|e| e.cell.clone())
    }

    /// One actor's current info.
    pub fn get(&self, path: &str) -> Option<ActorInfo> {
        self.entries.get(path).map(|e| info(path, &e))
    }

    /// Every actor, parents before children, siblings in start order.
    pub fn list(&self) -> Vec<ActorInfo> {
        let mut all: Vec<(u64, ActorInfo)> = self
            .entries
            .iter()
            .map(|e| (e.order, info(e.key(), e.value())))
            .collect();
        all.sort_by_key(|(order, _)| *order);
        let mut out = Vec::with_capacity(all.len());
        let roots: Vec<ActorInfo> = all
            .iter()
            .filter(|(_, i)| i.parent.is_none())
            .map(|(_, i)| i.clone())
            .collect();
        fn walk(node: ActorInfo, all: &[(u64, ActorInfo)], out: &mut Vec<ActorInfo>) {
            let path = node.path.clone();
            out.push(node);
            for (_, child) in all
                .iter()
                .filter(|(_, i)| i.parent.as_deref() == Some(&path))
            {
                walk(child.clone(), all, out);
            }
        }
        for root in roots {
            walk(root, &all, &mut out);
        }
        out
    }

    /// The whole tree as nested nodes (one per root, normally exactly one).
    pub fn nested(&self) -> Vec<ActorNode> {
        let list = self.list();
        fn build(info: &ActorInfo, list: &[ActorInfo]) -> ActorNode {
            ActorNode {
                info: info.clone(),
                children: list
                    .iter()
                    .filter(|c| c.parent.as_deref() == Some(info.path.as_str()))
                    .map(|c| build(c, list))
                    .collect(),
            }
        }
        list.iter()
            .filter(|i| i.parent.is_none())
            .map(|i| build(i, &list))
            .collect()
    }

    /// Why the node is not healthy: every permanent actor (and the root) that is not running
    /// or says it is degraded. Empty when healthy.
    pub fn unhealthy(&self) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|i| matches!(i.restart, None | Some(Restart::Permanent)))
            .filter_map(|i| match (i.status, &i.degraded, &i.last_error) {
                (Status::Running, None, _) => None,
                (Status::Running, Some(why), _) => Some(format!("{} is degraded: {why}", i.path)),
                (status, _, Some(err)) => Some(format!("{} is {}: {err}", i.path, status.as_str())),
                (status, _, None) => Some(format!("{} is {}", i.path, status.as_str())),
            })
            .collect()
    }

    /// An indented rendering for terminals (`GET /actors?format=text`, `runtime tree`).
    pub fn render_text(&self) -> String {
        let mut out = String::new();
        for root in self.nested() {
            render(&root, "", true, true, &mut out);
        }
        out
    }
}

fn info(path: &str, e: &Entry) -> ActorInfo {
    ActorInfo {
        name: e.name.clone(),
        kind: e.kind.clone(),
        path: path.to_string(),
        parent: e.parent.clone(),
        status: e.status,
        restart: e.restart,
        restarts: e.restarts,
        started_at: humantime::format_rfc3339_millis(e.started_at).to_string(),
        uptime_secs: (e.started.elapsed().as_millis() as f64) / 1000.0,
        last_error: e.last_error.clone(),
        degraded: e.degraded.clone(),
        snapshot: e.snapshot.clone(),
    }
}

fn render(node: &ActorNode, prefix: &str, last: bool, top: bool, out: &mut String) {
    let i = &node.info;
    let (branch, next_prefix) = if top {
        (String::new(), String::new())
    } else if last {
        (format!("{prefix}└── "), format!("{prefix}    "))
    } else {
        (format!("{prefix}├── "), format!("{prefix}│   "))
    };
    let label = format!("{branch}{}", i.name);
    let _ = write!(
        out,
        "{label:<32} {:<12} {:<10} restarts={:<3} up={:.1}s",
        i.kind,
        i.status.as_str(),
        i.restarts,
        i.uptime_secs
    );
    if let Some(err) = &i.last_error {
        let _ = write!(out, "  last_error={err:?}");
    }
    out.push('\n');
    let n = node.children.len();
    for (k, child) in node.children.iter().enumerate() {
        render(child, &next_prefix, k + 1 == n, false, out);
    }
}

/// An actor's own place in the tree: its path and the shared registry. Passed to every
/// actor at spawn so it can publish its snapshot and name its children.
#[derive(Clone, Debug)]
pub struct TreeHandle {
    tree: Arc<Tree>,
    path: String,
}

impl TreeHandle {
    /// The handle of the child `name` of this actor.
    pub fn child(&self, name: &str) -> TreeHandle {
        TreeHandle {
            tree: Arc::clone(&self.tree),
            path: format!("{}/{name}", self.path),
        }
    }

    /// This actor's path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The shared registry.
    pub fn tree(&self) -> &Arc<Tree> {
        &self.tree
    }

    /// Replaces this actor's kind-specific snapshot.
    pub fn publish(&self, snapshot: serde_json::Value) {
        if let Some(mut e) = self.tree.entries.get_mut(&self.path) {
            e.snapshot = snapshot;
        }
    }

    /// Declares this actor degraded (`Some(reason)`) or back to normal (`None`); a degraded
    /// permanent actor makes `/health` answer 503 with the reason.
    pub fn set_degraded(&self, reason: Option<String>) {
        if let Some(mut e) = self.tree.entries.get_mut(&self.path) {
            e.degraded = reason;
        }
    }

    /// The parent's path (`None` for the root).
    pub fn parent_path(&self) -> Option<&str> {
        self.path.rsplit_once('/').map(|(parent, _)| parent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parents_before_children_in_start_order_and_renders_text() {
        let tree = Tree::new();
        tree.register("root", "supervisor", None, None);
        tree.register(
            "root/b",
            "heartbeat",
            Some("root"),
            Some(Restart::Permanent),
        );
        tree.register(
            "root/a",
            "supervisor",
            Some("root"),
            Some(Restart::Permanent),
        );
        tree.register(
            "root/a/x",
            "heartbeat",
            Some("root/a"),
            Some(Restart::Transient),
        );
        let paths: Vec<String> = tree.list().into_iter().map(|i| i.path).collect();
        assert_eq!(paths, ["root", "root/b", "root/a", "root/a/x"]);
        let text = tree.render_text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("root "), "{text}");
        assert!(lines[1].starts_with("├── b "), "{text}");
        assert!(lines[2].starts_with("└── a "), "{text}");
        assert!(lines[3].starts_with("    └── x "), "{text}");
        assert_eq!(
            tree.nested()[0].children[1].children[0].info.path,
            "root/a/x"
        );
    }

    #[test]
    fn unhealthy_names_permanent_actors_that_are_not_running() {
        let tree = Tree::new();
        tree.register("root", "supervisor", None, None);
        tree.register(
            "root/p",
            "heartbeat",
            Some("root"),
            Some(Restart::Permanent),
        );
        tree.register(
            "root/t",
            "heartbeat",
            Some("root"),
            Some(Restart::Transient),
        );
        tree.set_status("root", Status::Running, None);
        tree.set_status("root/t", Status::Stopped, None);
        tree.set_status("root/p", Status::Restarting, Some("killed".into()));
        assert_eq!(tree.unhealthy(), ["root/p is restarting: killed"]);
        tree.set_status("root/p", Status::Running, None);
        let p = tree.root("root").child("p");
        p.set_degraded(Some("redis connection lost".into()));
        assert_eq!(
            tree.unhealthy(),
            ["root/p is degraded: redis connection lost"]
        );
        p.set_degraded(None);
        assert!(tree.unhealthy().is_empty());
        tree.remove_subtree("root/p");
        assert!(tree.unhealthy().is_empty());
        tree.remove_descendants("root");
        assert_eq!(tree.list().len(), 1);
    }
}
