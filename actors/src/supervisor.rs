//! `SupervisorActor`: OTP-style supervision on ractor, usable at every level of the tree.
//!
//! ractor reports a child's exit to its parent and leaves the rest to
//! `handle_supervisor_evt`, whose default stops the parent. This supervisor implements it:
//!
//! - **strategies** `one_for_one`, `one_for_all`, `rest_for_one` ([`Strategy`]);
//! - **restart types** `permanent`, `transient`, `temporary` ([`Restart`]). A kill (ractor's
//!   reason `"killed"`) and a failure (panic or `Err`) are abnormal exits, a `stop` is normal;
//! - **restart intensity** ([`Intensity`]): one restart too many within the window and the
//!   supervisor stops its children, marks itself `failed` and fails, escalating to its parent;
//!   a root that gives up ends, and the program exits non-zero;
//! - **restart backoff** ([`Backoff`]): a restart waits `min(max, base·2ⁿ)` minus jitter, n being
//!   the restarts already inside the intensity window, so a crash loop never spins the CPU;
//! - **ordered start, reverse-ordered stop** with a deadline: children start in declaration
//!   order in `pre_start` (a child that cannot start fails the supervisor's start); an orderly
//!   stop stops them last-first, each within what is left of `shutdown_timeout`, and kills
//!   (and logs) any that does not stop in time.
//!
//! Every exit, restart, failed restart and surrender is also put on the events stream
//! through the tree's sink (`actor_exited`, `actor_restarted`, `actor_start_failed`,
//! `actor_gave_up`, with the actor's `path` in the detail), without waiting on the broker.
//!
//! A child that fails to start again (`SpawnErr`, e.g. an `Err` from its `pre_start`) counts
//! as a restart and is retried after the backoff — it never takes the supervisor down by
//! itself. Children are spawned unnamed (ractor's registry is process-wide); they are known
//! by their tree path.

#![warn(missing_docs)]

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::broker::Event;
use crate::policy::RestartWindow;
pub use crate::policy::{Backoff, Intensity, PolicyError, Restart, Strategy};
use crate::tree::{Status, Tree, TreeHandle};

/// Why a supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// Restart intensity exceeded.
    #[error(
        "{path} gave up after more than {max_restarts} restarts within {within:?}; last: {last}"
    )]
    GaveUp {
        /// The supervisor's path.
        path: String,
        /// The intensity's restart budget.
        max_restarts: u32,
        /// The intensity's window.
        within: Duration,
        /// The exit that went over the budget.
        last: String,
    },
    /// A child could not be started when the supervisor started.
    #[error("child {path} failed to start: {reason}")]
    ChildStart {
        /// The child's path.
        path: String,
        /// The spawn error.
        reason: String,
    },
}

/// The future that starts one child, linked to its supervisor.
pub type StartFuture = Pin<Box<dyn Future<Output = Result<ActorCell, SpawnErr>> + Send>>;

type StartFn = dyn Fn(TreeHandle, ActorCell) -> StartFuture + Send + Sync;

/// How to start (and start again) one child: its name, kind, restart type and a factory.
#[derive(Clone)]
pub struct ChildSpec {
    name: String,
    kind: String,
    restart: Restart,
    start: Arc<StartFn>,
}

impl std::fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("restart", &self.restart)
            .finish_non_exhaustive()
    }
}

impl ChildSpec {
    /// A child made by `make`, called with the child's tree handle on every (re)start.
    pub fn new<A, F>(name: &str, kind: &str, restart: Restart, make: F) -> Self
    where
        A: Actor,
        F: Fn(TreeHandle) -> (A, A::Arguments) + Send + Sync + 'static,
    {
        Self {
            name: name.to_string(),
            kind: kind.to_string(),
            restart,
            start: Arc::new(move |node, supervisor| {
                let (actor, args) = make(node);
                Box::pin(async move {
                    A::spawn_linked(None, actor, args, supervisor)
                        .await
                        .map(|(actor, _)| actor.get_cell())
                })
            }),
        }
    }

    /// A permanent child supervisor running `spec`.
    pub fn supervisor(name: &str, spec: SupervisorSpec) -> Self {
        Self::new(name, "supervisor", Restart::Permanent, move |node| {
            (
                SupervisorActor,
                SupervisorArgs {
                    node,
                    spec: spec.clone(),
                },
            )
        })
    }

    /// The child's name within its supervisor.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// What a supervisor does: its policy and its children in start order.
#[derive(Clone, Debug)]
pub struct SupervisorSpec {
    /// Which children restart together.
    pub strategy: Strategy,
    /// How many restarts are tolerated before giving up.
    pub intensity: Intensity,
    /// Delay before each restart.
    pub backoff: Backoff,
    /// Time allowed for an orderly stop of all children.
    pub shutdown_timeout: Duration,
    /// Children in start order.
    pub children: Vec<ChildSpec>,
}

/// Spawn arguments of a [`SupervisorActor`].
#[derive(Debug)]
pub struct SupervisorArgs {
    /// The supervisor's own place in the tree (its parent registered it there).
    pub node: TreeHandle,
    /// Policy and children.
    pub spec: SupervisorSpec,
}

/// Messages a supervisor sends itself.
#[derive(Debug)]
pub enum SupervisorMessage {
    /// Start again the named children, in this order (sent after the restart backoff).
    Restart(Vec<String>),
}

/// The supervisor actor.
#[derive(Debug, Clone, Copy, Default)]
pub struct SupervisorActor;

#[derive(Debug)]
struct Child {
    spec: ChildSpec,
    node: TreeHandle,
    cell: Option<ActorCell>,
}

/// Runtime state of a supervisor.
#[derive(Debug)]
pub struct SupervisorState {
    node: TreeHandle,
    strategy: Strategy,
    intensity: Intensity,
    backoff: Backoff,
    shutdown_timeout: Duration,
    children: Vec<Child>,
    window: RestartWindow,
}

/// Starts the root supervisor `name` of `tree` (unlinked: when it ends, the program ends).
pub async fn start_root(
    tree: &Arc<Tree>,
    name: &str,
    spec: SupervisorSpec,
) -> Result<(ActorRef<SupervisorMessage>, JoinHandle<()>), SpawnErr> {
    let node = tree.root(name);
    tree.register(name, "supervisor", None, None);
    match SupervisorActor::spawn(None, SupervisorActor, SupervisorArgs { node, spec }).await {
        Ok((actor, handle)) => {
            tree.set_running(name, actor.get_cell(), false);
            Ok((actor, handle))
        }
        Err(err) => {
            tree.set_status(name, Status::Failed, Some(err.to_string()));
            Err(err)
        }
    }
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMessage;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SupervisorArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let SupervisorArgs { node, spec } = args;
        // Entries left by a previous incarnation's children are stale.
        node.tree().remove_descendants(node.path());
        let mut state = SupervisorState {
            strategy: spec.strategy,
            intensity: spec.intensity,
            backoff: spec.backoff,
            shutdown_timeout: spec.shutdown_timeout,
            window: RestartWindow::new(spec.intensity),
            children: spec
                .children
                .into_iter()
                .map(|spec| Child {
                    node: node.child(&spec.name),
                    spec,
                    cell: None,
                })
                .collect(),
            node,
        };
        for k in 0..state.children.len() {
            if let Err(err) = start_child(&myself, &mut state.children[k], false).await {
                let path = state.children[k].node.path().to_string();
                state
                    .stop_children(&myself, "start of a sibling failed")
                    .await;
                return Err(SupervisorError::ChildStart {
                    path,
                    reason: err.to_string(),
                }
                .into());
            }
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.stop_children(&myself, "shutdown").await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMessage::Restart(names) => state.restart(&myself, names).await,
        }
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        event: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, abnormal, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, true, format!("failed: {err}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let abnormal = matches!(
                    reason.as_deref(),
                    Some("killed") | Some("actor_task_cancelled")
                );
                let reason = match reason {
                    Some(reason) => format!("stopped: {reason}"),
                    None => "stopped".to_string(),
                };
                (cell, abnormal, reason)
            }
            _ => return Ok(()),
        };
        state.child_exited(&myself, cell, abnormal, reason).await
    }
}

/// Spawns `child`, recording it in the tree; `restarted` counts a restart on success.
async fn start_child(
    myself: &ActorRef<SupervisorMessage>,
    child: &mut Child,
    restarted: bool,
) -> Result<(), SpawnErr> {
    let path = child.node.path();
    let tree = child.node.tree();
    tree.register(
        path,
        &child.spec.kind,
        child.node.parent_path(),
        Some(child.spec.restart),
    );
    match (child.spec.start)(child.node.clone(), myself.get_cell()).await {
        Ok(cell) => {
            tree.set_running(path, cell.clone(), restarted);
            child.cell = Some(cell);
            if restarted {
                info!(actor = path, "restarted");
                let restarts = tree.get(path).map_or(0, |info| info.restarts);
                tree.emit(Event::new(
                    "actor_restarted",
                    json!({ "path": path, "kind": child.spec.kind, "restarts": restarts }),
                ));
            }
            Ok(())
        }
        Err(err) => {
            let status = if restarted {
                Status::Restarting
            } else {
                Status::Failed
            };
            let error = format!("start failed: {err}");
            if restarted {
                tree.emit(Event::new(
                    "actor_start_failed",
                    json!({ "path": path, "kind": child.spec.kind, "error": error }),
                ));
            }
            tree.set_status(path, status, Some(error));
            Err(err)
        }
    }
}

impl SupervisorState {
    async fn child_exited(
        &mut self,
        myself: &ActorRef<SupervisorMessage>,
        cell: ActorCell,
        abnormal: bool,
        reason: String,
    ) -> Result<(), ActorProcessingErr> {
        let id = cell.get_id();
        let Some(k) = self
            .children
            .iter()
            .position(|c| c.cell.as_ref().is_some_and(|c| c.get_id() == id))
        else {
            return Ok(()); // an exit we caused (a sibling restart) or a stale child
        };
        let child = &mut self.children[k];
        child.cell = None;
        let path = child.node.path().to_string();
        let tree = Arc::clone(child.node.tree());
        let restart = child.spec.restart;
        let restarting = restart.restarts_after(abnormal);
        tree.emit(Event::new(
            "actor_exited",
            json!({
                "path": path, "kind": child.spec.kind, "reason": reason,
                "abnormal": abnormal, "restarting": restarting,
            }),
        ));
        if !restarting {
            if restart == Restart::Temporary {
                info!(actor = %path, %reason, "temporary actor exited");
                tree.remove_subtree(&path);
                self.children.remove(k);
            } else {
                info!(actor = %path, %reason, "transient actor exited normally; not restarted");
                tree.set_status(&path, Status::Stopped, Some(reason));
            }
            return Ok(());
        }
        warn!(actor = %path, %reason, strategy = self.strategy.as_str(), "actor exited; restarting");
        tree.set_status(&path, Status::Restarting, Some(reason.clone()));
        let consecutive = match self.record_restart(&path, &reason) {
            Ok(consecutive) => consecutive,
            Err(err) => return Err(self.give_up(myself, err).await),
        };

        let range = match self.strategy {
            Strategy::OneForOne => k..k + 1,
            Strategy::OneForAll => 0..self.children.len(),
            Strategy::RestForOne => k..self.children.len(),
        };
        let mut names = Vec::new();
        for j in range.clone().rev() {
            if j == k {
                names.push(self.children[j].spec.name.clone());
                continue;
            }
            let sibling = &mut self.children[j];
            let Some(cell) = sibling.cell.take() else {
                continue;
            };
            let why = format!("restarted with {path} ({})", self.strategy.as_str());
            stop_child(&sibling.node, cell, self.shutdown_timeout, "restart").await;
            sibling
                .node
                .tree()
                .set_status(sibling.node.path(), Status::Restarting, Some(why));
            if sibling.spec.restart == Restart::Temporary {
                tree.remove_subtree(sibling.node.path());
            } else {
                names.push(sibling.spec.name.clone());
            }
        }
        self.children.retain(|c| {
            c.cell.is_some() || c.spec.restart != Restart::Temporary || names.contains(&c.spec.name)
        });
        names.reverse();
        self.schedule(myself, names, consecutive);
        Ok(())
    }

    /// Counts a restart against the intensity; `Err` when over budget, else the number of
    /// restarts already in the window (the backoff exponent).
    fn record_restart(&mut self, path: &str, reason: &str) -> Result<u32, SupervisorError> {
        let now = Instant::now();
        let consecutive = self.window.recent(now);
        if self.window.record(now) {
            return Ok(consecutive);
        }
        Err(SupervisorError::GaveUp {
            path: self.node.path().to_string(),
            max_restarts: self.intensity.max_restarts(),
            within: self.intensity.within(),
            last: format!("{path} {reason}"),
        })
    }

    /// Gives up: stops the remaining children, marks this supervisor failed and returns the
    /// error that fails it (its parent sees `ActorFailed`; a root ends).
    async fn give_up(
        &mut self,
        myself: &ActorRef<SupervisorMessage>,
        err: SupervisorError,
    ) -> ActorProcessingErr {
        error!(supervisor = self.node.path(), error = %err, "restart intensity exceeded; escalating");
        self.node.tree().emit(Event::new(
            "actor_gave_up",
            json!({ "path": self.node.path(), "error": err.to_string() }),
        ));
        self.stop_children(myself, "supervisor gave up").await;
        self.node
            .tree()
            .set_status(self.node.path(), Status::Failed, Some(err.to_string()));
        err.into()
    }

    fn schedule(&self, myself: &ActorRef<SupervisorMessage>, names: Vec<String>, consecutive: u32) {
        let delay = self.backoff.delay(consecutive);
        if delay.is_zero() {
            let _ = myself.cast(SupervisorMessage::Restart(names));
        } else {
            myself.send_after(delay, move || SupervisorMessage::Restart(names));
        }
    }

    async fn restart(
        &mut self,
        myself: &ActorRef<SupervisorMessage>,
        names: Vec<String>,
    ) -> Result<(), ActorProcessingErr> {
        for (pos, name) in names.iter().enumerate() {
            let Some(child) = self.children.iter_mut().find(|c| &c.spec.name == name) else {
                continue;
            };
            if child.cell.is_some() {
                continue;
            }
            if let Err(err) = start_child(myself, child, true).await {
                let path = child.node.path().to_string();
                let reason = format!("restart failed: {err}");
                warn!(actor = %path, %reason, "restart failed; will retry");
                let consecutive = match self.record_restart(&path, &reason) {
                    Ok(consecutive) => consecutive,
                    Err(err) => return Err(self.give_up(myself, err).await),
                };
                self.schedule(myself, names[pos..].to_vec(), consecutive);
                return Ok(());
            }
        }
        Ok(())
    }

    /// Stops every running child, last-started first, within `shutdown_timeout` overall.
    async fn stop_children(&mut self, _myself: &ActorRef<SupervisorMessage>, why: &str) {
        let deadline = Instant::now() + self.shutdown_timeout;
        for child in self.children.iter_mut().rev() {
            if let Some(cell) = child.cell.take() {
                let left = deadline.saturating_duration_since(Instant::now());
                stop_child(&child.node, cell, left, why).await;
            }
        }
    }
}

/// Stops one child within `timeout`, killing it (and saying so) if it does not stop in time.
async fn stop_child(node: &TreeHandle, cell: ActorCell, timeout: Duration, why: &str) {
    let tree = node.tree();
    tree.set_status(node.path(), Status::Stopping, None);
    match cell
        .stop_and_wait(Some(why.to_string()), Some(timeout))
        .await
    {
        Err(ractor::RactorErr::Timeout) => {
            warn!(
                actor = node.path(),
                ?timeout,
                "did not stop in time; killing it"
            );
            let _ = cell.kill_and_wait(Some(Duration::from_secs(1))).await;
            tree.set_status(
                node.path(),
                Status::Stopped,
                Some(format!("killed: did not stop within {timeout:?}")),
            );
        }
        _ => tree.set_status(node.path(), Status::Stopped, None),
    }
}

/// A one-level policy for tests of a single actor under a supervisor: one_for_one, 5
/// restarts in 10 s, a fixed 5 ms restart delay, 1 s to stop.
#[cfg(test)]
pub(crate) fn quick_restarts(children: Vec<ChildSpec>) -> SupervisorSpec {
    SupervisorSpec {
        strategy: Strategy::OneForOne,
        intensity: Intensity::try_new(5, Duration::from_secs(10)).expect("valid intensity"),
        backoff: Backoff::try_new(Duration::from_millis(5), Duration::from_millis(5), 0.0)
            .expect("valid backoff"),
        shutdown_timeout: Duration::from_secs(1),
        children,
    }
}

#[cfg(test)]
mod tests;
