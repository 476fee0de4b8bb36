//! Process pools (docs/resources.md, "Process pools"): prewarmed agent processes (voice
//! bots), claimed one per session.
//!
//! - [`PoolSpec`] — one pool's validated settings ([`PoolSpec::try_new`] from [`PoolSettings`]).
//! - [`Pool`] — the handle made by the node, outside any actor: it owns the pool's membership
//!   (agent id → pid/pgid, state, start time, last RSS) and the agents' monitor tasks, and
//!   serves [`Pool::claim`], [`Pool::release`], [`Pool::snapshot`] and [`Pool::health`].
//! - [`PoolActor`] (kind `pool`, permanent) — keeps `min_idle` warm agents (never above `max`),
//!   replaces assigned and exited ones, recycles idle agents older than `max_idle_age`, kills
//!   agents above `memory_limit_mb`, publishes the snapshot and marks itself degraded while the
//!   pool is in `backoff` or `fatal`.
//! - `agent` — one agent's life: a task owning the `tokio::process::Child`, draining both pipes,
//!   watching for the ready / assigned patterns and enforcing the timeouts.
//! - `process` — spawning (own process group, clean environment), group signals, RSS of an
//!   agent with its descendants.
//!
//! # Why agents are tasks owned by the [`Pool`], not ractor children of the actor
//!
//! A ractor actor that is killed runs no `post_stop`, and its linked children are killed with
//! it: a process owned by an actor would be orphaned (or killed) by every restart of that
//! actor. Pool membership is state that must survive a crash, so each agent's
//! process and monitor task belong to the [`Pool`]; a restarted [`PoolActor`] re-adopts the
//! agents whose monitor still runs and kills the process group of any that lost its monitor.
//! The per-agent "actor" is therefore a monitor task with explicit states
//! ([`AgentState`]) that is visible, agent by agent, in the pool's snapshot.
//!
//! # Agent states
//!
//! `starting → idle → assigned → draining → exited`, plus `failed`:
//!
//! | state | meaning | leaves to |
//! |---|---|---|
//! | `starting` | spawned, `ready_pattern` not seen yet (on stdout **or** stderr) | `idle`; `failed` at `startup_timeout` (SIGKILL to the group) or on an early exit |
//! | `idle` | ready, waiting in FIFO order for a claim | `assigned`; `draining` (recycled or over the memory limit) |
//! | `assigned` | the assignment was written to stdin (and `assigned_pattern` seen) | `exited` when the session ends; `draining` on release |
//! | `draining` | `stop_signal` sent to the group, SIGKILL after `stop_timeout` | `exited` / `failed` |
//! | `exited`, `failed` | reaped; kept in the snapshot's `recent` list with the reason | — |
//!
//! Agents are single-use by default: an agent exits after its session, is reaped and
//! replaced. With `reusable`, an assigned agent that logs `ready_pattern` again has ended its
//! session and goes back to `idle` (at the end of the FIFO); one that exits is replaced as usual.
//!
//! # Pool health
//!
//! A startup failure (spawn error, exit before ready, `startup_timeout`) counts towards
//! `startretries` once per round (the agents started together, e.g. the first `min_idle`,
//! fail for one reason and count once); the next start waits the respawn [`Backoff`]
//! (`backoff`), only one agent starts at a time while failures are counted (a crash loop runs
//! at the backoff's pace, never faster), and after `startretries` consecutive failures
//! the pool is `fatal` (supervisord's semantics): no more starts until [`Pool::reset`]. A ready
//! agent resets the count. Both states are in [`Pool::health`], the snapshot and `/health`
//! (through the actor's degraded mark).
//!
//! # Events
//!
//! With an [`EventSink`] attached ([`Pool::attach_events`]) the pool puts its changes on the
//! events stream without waiting: `pool_agent_starting`, `pool_agent_idle`,
//! `pool_agent_assigned`, `pool_agent_draining`, `pool_agent_exited`, `pool_agent_failed`
//! (detail: `pool`, `agent`, `pid`, `reason` where there is one), `pool_backoff`,
//! `pool_fatal` and `pool_reset`.

mod actor;
mod agent;
mod process;
mod scrape;
#[cfg(test)]
mod tests;
mod worker;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use nix::sys::signal::Signal;
use prometheus_client::metrics::histogram::Histogram;
use regex::Regex;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{error, info, warn};

pub use actor::{PoolActor, PoolArgs, PoolMessage};
use agent::AgentCommand;

use crate::broker::{Event, EventSink};
use crate::policy::Backoff;

/// Ended agents kept in the snapshot's `recent` list.
const RECENT: usize = 32;
/// How long after a claim is confirmed its replacement may start: a new agent's interpreter
/// starting up (tens of ms of CPU) preempted the claiming task between the confirmation and
/// its return — on 2 cores, 1–3 claims in 50 took 5–10 ms instead of 0.5 ms.
const REPLACE_AFTER: Duration = Duration::from_millis(20);
/// Env vars the pool sets itself (the runtime reserves them in every child:
/// [`crate::child::RESERVED`]).
const RESERVED_ENV: [&str; 2] = [crate::child::AGENT_ID_VAR, crate::child::POOL_VAR];

/// One pool's settings, as built by the node from its config; validated by
/// [`PoolSpec::try_new`].
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// The pool's name (`voice`): agent ids are `{name}-{n}`, `RT_POOL` is set to it.
    pub name: String,
    /// The program (an absolute path, or found through `PATH` given in `env`).
    pub command: String,
    /// Its arguments (never a shell).
    pub args: Vec<String>,
    /// The agents' whole environment, plus `RT_AGENT_ID` and `RT_POOL` (nothing is inherited).
    pub env: BTreeMap<String, String>,
    /// Working directory (the node's when `None`).
    pub cwd: Option<PathBuf>,
    /// Ready agents kept warm.
    pub min_idle: usize,
    /// Agent processes alive at most (starting, idle, assigned and draining together).
    pub max: usize,
    /// Time allowed from spawn to `ready_pattern`.
    pub startup_timeout: Duration,
    /// A line matching this, on stdout or stderr, makes a starting agent ready.
    pub ready_pattern: Regex,
    /// A line matching this, after the assignment was written, confirms it; `None` confirms
    /// once the line is written.
    pub assigned_pattern: Option<Regex>,
    /// Time allowed from writing the assignment to `assigned_pattern`.
    pub assign_timeout: Duration,
    /// How long a claim waits for an idle agent.
    pub claim_timeout: Duration,
    /// Resident memory (VmRSS of the agent and its descendants) above which an agent is
    /// stopped and replaced.
    pub memory_limit_mb: Option<u64>,
    /// Idle agents older than this are recycled.
    pub max_idle_age: Option<Duration>,
    /// An assigned agent that logs `ready_pattern` again has finished its session and goes
    /// back to idle (at the end of the FIFO); `false`: single-use agents, replaced after
    /// their session.
    pub reusable: bool,
    /// Signal of an orderly stop, sent to the agent's process group.
    pub stop_signal: Signal,
    /// Time from `stop_signal` to SIGKILL.
    pub stop_timeout: Duration,
    /// Consecutive startup failures that make the pool `fatal`.
    pub startretries: u32,
    /// Delay before the start that follows a startup failure.
    pub backoff: Backoff,
    /// How often liveness, RSS and idle age are checked.
    pub health_every: Duration,
    /// `Some`: the agents are Python worker processes that run tasks over the worker protocol
    /// ([`Pool::run`]; `[workers.NAME]`), not agents claimed for a session.
    pub worker: Option<WorkerSettings>,
}

/// A worker pool's own settings (`[workers.NAME]`, docs/python.md): its agents are
/// `python -u -m taskrt.worker` processes that import `modules` once, then run tasks sent over
/// a socket. The pool keeps `processes + spares` of them warm (its `min_idle` and `max`) and
/// runs at most `processes × concurrency` tasks at once.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Modules each process imports at start (their `@task` functions register).
    pub modules: Vec<String>,
    /// Processes that run tasks at once.
    pub processes: usize,
    /// Tasks at once in one process (1: prefork semantics; more: `async def` tasks share it).
    pub concurrency: usize,
    /// A process is replaced after this many tasks; `None`: never.
    pub max_tasks_per_process: Option<u64>,
    /// Django's connections between tasks: `stale` (`close_old_connections`) or `always`.
    pub db_close: String,
    /// The longest line a process may send (a result); longer is a protocol error.
    pub max_message_bytes: usize,
}

impl WorkerSettings {
    /// Defaults: `concurrency` 1, no recycling, `db_close = "stale"`, messages up to 16 MiB.
    pub fn new(modules: Vec<String>, processes: usize) -> Self {
        Self {
            modules,
            processes,
            concurrency: 1,
            max_tasks_per_process: None,
            db_close: "stale".to_string(),
            max_message_bytes: worker::MAX_MESSAGE_BYTES,
        }
    }

    /// Tasks the pool runs at once.
    pub fn capacity(&self) -> usize {
        self.processes.saturating_mul(self.concurrency)
    }
}

impl PoolSettings {
    /// Settings with the defaults — those of a `[pools.NAME]` table, which the node's config
    /// compiles to: `min_idle` 0, `max` 4, `startup_timeout` 30 s, `assigned_pattern` none,
    /// `assign_timeout` 10 s, `claim_timeout` 5 s, no memory limit, no idle age, single-use
    /// agents, SIGTERM then SIGKILL after 10 s, `startretries` 3, the default backoff, health
    /// every 2 s.
    pub fn new(name: &str, command: &str, ready_pattern: Regex) -> Self {
        Self {
            name: name.to_string(),
            command: command.to_string(),
            args: Vec::new(),
            env: BTreeMap::new(),
            cwd: None,
            min_idle: 0,
            max: 4,
            startup_timeout: Duration::from_secs(30),
            ready_pattern,
            assigned_pattern: None,
            assign_timeout: Duration::from_secs(10),
            claim_timeout: Duration::from_secs(5),
            memory_limit_mb: None,
            max_idle_age: None,
            reusable: false,
            stop_signal: Signal::SIGTERM,
            stop_timeout: Duration::from_secs(10),
            startretries: 3,
            backoff: Backoff::default(),
            health_every: Duration::from_secs(2),
            worker: None,
        }
    }
}

/// One invalid pool setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct PoolSpecError {
    /// The setting's name (`min_idle`).
    pub field: &'static str,
    pub reason: String,
}

/// A pool's validated settings: it cannot be built from invalid ones.
#[derive(Debug, Clone)]
pub struct PoolSpec(PoolSettings);

impl PoolSpec {
    /// Validates `settings`, returning every error at once.
    pub fn try_new(settings: PoolSettings) -> Result<Self, Vec<PoolSpecError>> {
        let mut errors = Vec::new();
        let mut bad = |field, reason: &str| {
            errors.push(PoolSpecError {
                field,
                reason: reason.to_string(),
            })
        };
        let s = &settings;
        if s.name.is_empty() || s.name.contains(['/', ' ']) {
            bad("name", "must be non-empty, without '/' or spaces");
        }
        if s.command.trim().is_empty() {
            bad("command", "must not be empty");
        }
        if s.max == 0 {
            bad("max", "must be at least 1, got 0");
        }
        if s.min_idle > s.max {
            bad(
                "min_idle",
                &format!(
                    "{} is above max {}: the pool could never keep that many idle",
                    s.min_idle, s.max
                ),
            );
        }
        for (field, value) in [
            ("startup_timeout", s.startup_timeout),
            ("assign_timeout", s.assign_timeout),
            ("claim_timeout", s.claim_timeout),
            ("stop_timeout", s.stop_timeout),
            ("health_every", s.health_every),
        ] {
            if value.is_zero() {
                bad(field, "must be longer than zero");
            }
        }
        if s.max_idle_age.is_some_and(|d| d.is_zero()) {
            bad("max_idle_age", "must be longer than zero");
        }
        if s.memory_limit_mb == Some(0) {
            bad("memory_limit_mb", "must be at least 1, got 0");
        }
        if s.startretries == 0 {
            bad("startretries", "must be at least 1, got 0");
        }
        if s.stop_signal == Signal::SIGKILL {
            // Allowed, but it leaves the agent no chance to leave its room cleanly.
            warn!(pool = %s.name, "stop_signal is SIGKILL: agents cannot stop cleanly");
        }
        for key in s.env.keys() {
            if key.is_empty() || key.contains(['=', '\0']) {
                bad("env", &format!("invalid variable name {key:?}"));
            } else if RESERVED_ENV.contains(&key.as_str())
                || (s.worker.is_some() && worker::RESERVED_ENV.contains(&key.as_str()))
            {
                bad("env", &format!("{key} is set by the pool"));
            }
        }
        if let Some(w) = &s.worker {
            if w.modules.is_empty() {
                bad("modules", "name at least one module to import");
            }
            for module in &w.modules {
                let valid = !module.is_empty()
                    && module.split('.').all(|part| {
                        part.chars().next().is_some_and(|c| !c.is_ascii_digit())
                            && part.chars().all(|c| c.is_alphanumeric() || c == '_')
                    });
                if !valid {
                    bad(
                        "modules",
                        &format!("{module:?} is not a Python module name"),
                    );
                }
            }
            if w.processes == 0 {
                bad("processes", "must be at least 1, got 0");
            }
            if w.concurrency == 0 {
                bad("concurrency", "must be at least 1, got 0");
            }
            if w.max_tasks_per_process == Some(0) {
                bad("max_tasks_per_process", "must be at least 1, got 0");
            }
            if !matches!(w.db_close.as_str(), "stale" | "always") {
                bad(
                    "db_close",
                    &format!("expected \"stale\" or \"always\", got {:?}", w.db_close),
                );
            }
        }
        if errors.is_empty() {
            Ok(Self(settings))
        } else {
            Err(errors)
        }
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.0
    }

    /// The same spec with the agents' whole environment replaced by `env` (a node adds the
    /// variables it resolves at start, e.g. `pass_env` and its egress URL), validated again.
    pub fn with_env(self, env: BTreeMap<String, String>) -> Result<Self, Vec<PoolSpecError>> {
        Self::try_new(PoolSettings { env, ..self.0 })
    }
}

/// An agent's state (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgentState {
    /// Spawned, not ready yet.
    Starting,
    /// Ready, waiting for a claim.
    Idle,
    /// Claimed: the assignment was written to its stdin.
    Assigned,
    /// Stopping: `stop_signal` sent, SIGKILL at `stop_timeout`.
    Draining,
    /// Reaped after its session or an orderly stop.
    Exited,
    /// Reaped after a startup failure, a crash, a failed assignment or a kill for memory.
    Failed,
}

impl AgentState {
    /// The state's name in snapshots.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Idle => "idle",
            Self::Assigned => "assigned",
            Self::Draining => "draining",
            Self::Exited => "exited",
            Self::Failed => "failed",
        }
    }
}

/// A successful claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The agent's id (`voice-17`), also in its `RT_AGENT_ID`.
    pub agent_id: String,
    /// Its process id (and process group id).
    pub pid: u32,
}

/// Why a claim got no agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClaimError {
    /// No idle agent within `claim_timeout` (retry later).
    #[error("pool {pool}: no idle agent within {waited:?}")]
    Timeout {
        pool: String,
        /// How long the claim waited.
        waited: Duration,
    },
    /// The pool gave up starting agents (needs an operator: see the reason).
    #[error("pool {pool} is fatal: {reason}")]
    Fatal { pool: String, reason: String },
    /// The pool is stopping.
    #[error("pool {pool} is stopping")]
    Closed { pool: String },
    /// A worker pool runs tasks; it has no agents to claim.
    #[error("pool {pool} is a Python worker pool: it runs tasks and takes no claims")]
    Workers { pool: String },
}

/// Why a release did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    /// No live agent with that id in this pool.
    #[error("pool {pool} has no agent {agent_id}")]
    Unknown {
        pool: String,
        /// The id asked for.
        agent_id: String,
    },
}

/// A live agent, as the pool knows it.
#[derive(Debug)]
struct Member {
    id: String,
    pid: u32,
    state: AgentState,
    started: Instant,
    /// When it became idle (FIFO order of claims).
    idle_since: Option<Instant>,
    rss_kb: Option<u64>,
    commands: mpsc::UnboundedSender<AgentCommand>,
    /// The pool's failure generation when it was started (see `record_startup_failure`).
    generation: u64,
    /// Worker pools: the ids of the tasks it runs now (at most `concurrency`).
    running: Vec<String>,
    /// Worker pools: tasks it finished.
    served: u64,
    /// Worker pools: replaced once its running tasks finish (recycled or over memory).
    retiring: Option<String>,
}

/// An agent that ended.
#[derive(Debug)]
struct Ended {
    id: String,
    pid: u32,
    state: AgentState,
    reason: String,
    lived: Duration,
}

#[derive(Debug, Default)]
struct Totals {
    spawned: u64,
    ready: u64,
    claims: u64,
    exited: u64,
    failed: u64,
    startup_failures: u64,
    assign_failures: u64,
    recycled: u64,
    reused: u64,
    memory_kills: u64,
    sigkills: u64,
    adopted: u64,
    /// Worker pools: tasks run (finished, however they ended).
    tasks: u64,
}

#[derive(Debug, Default)]
struct Membership {
    /// Live agents by sequence number.
    agents: BTreeMap<u64, Member>,
    /// Agents being spawned right now (not in `agents` yet).
    launching: usize,
    /// Claims waiting for an idle agent.
    waiters: usize,
    /// Worker pools: tasks waiting for a free process, oldest first; a process that frees up
    /// takes the first itself ([`Pool::next_run`]).
    pending: VecDeque<worker::Pending>,
    /// Claimed agents whose replacement is held back ([`Deferred`]).
    deferred: usize,
    consecutive_failures: u32,
    /// Bumped by every counted startup failure: agents started before it are of an older round.
    failure_generation: u64,
    next_start_at: Option<Instant>,
    last_failure: Option<String>,
    fatal: Option<String>,
    closed: bool,
    recent: VecDeque<Ended>,
    totals: Totals,
}

impl Membership {
    fn count(&self, state: AgentState) -> usize {
        self.agents.values().filter(|m| m.state == state).count()
    }

    fn health(&self) -> PoolHealth {
        match (&self.fatal, self.consecutive_failures) {
            (Some(_), _) => PoolHealth::Fatal,
            (None, 0) => PoolHealth::Ok,
            (None, _) => PoolHealth::Backoff,
        }
    }
}

/// A pool's health (see "Pool health" in the module docs; [`Pool::health`] says why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolHealth {
    /// Starting agents as needed.
    Ok,
    /// Waiting before the next start after consecutive startup failures.
    Backoff,
    /// Gave up starting agents (`startretries` reached) until reset.
    Fatal,
}

impl PoolHealth {
    /// Every health, in label order.
    pub const ALL: [PoolHealth; 3] = [PoolHealth::Ok, PoolHealth::Backoff, PoolHealth::Fatal];

    /// The name in snapshots and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolHealth::Ok => "ok",
            PoolHealth::Backoff => "backoff",
            PoolHealth::Fatal => "fatal",
        }
    }
}

struct Shared {
    spec: PoolSpec,
    members: Mutex<Membership>,
    changed: watch::Sender<u64>,
    next_seq: AtomicU64,
    events: OnceLock<EventSink>,
    /// Time from a claim to its confirmed assignment (successful claims), for `/metrics`.
    claim_latency: Histogram,
    /// Worker pools: numbers the runs that wait for a process ([`worker::Pending`]).
    next_run: AtomicU64,
}

/// A pool's numbers for `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    /// Live agents per state (`starting` includes agents being spawned).
    pub agents: [(AgentState, usize); 4],
    /// Agents that failed to start, ever.
    pub startup_failures: u64,
    pub health: PoolHealth,
}

/// A pool: its membership, its agents and the claim API. Cheap to clone; made by the node and
/// shared by the [`PoolActor`], the `pool` task handler and the HTTP routes.
#[derive(Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

/// Decrements the waiting-claims count when a claim ends, however it ends.
struct Waiting<'a>(&'a Pool);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiters -= 1;
    }
}

/// A claimed agent whose replacement is held back: counted in `deferred` (as if its
/// replacement were starting) until dropped — [`REPLACE_AFTER`] after a confirmed claim, at
/// once when the assignment failed or the claim was abandoned — which lets the actor start it.
struct Deferred(Pool);

impl Drop for Deferred {
    fn drop(&mut self) {
        self.0.lock().deferred -= 1;
        self.0.touch();
    }
}

impl Pool {
    /// A pool with no agents yet; its [`PoolActor`] starts them.
    pub fn new(spec: PoolSpec) -> Self {
        Self {
            shared: Arc::new(Shared {
                members: Mutex::new(Membership::default()),
                changed: watch::Sender::new(0),
                next_seq: AtomicU64::new(1),
                events: OnceLock::new(),
                claim_latency: crate::metrics::seconds_histogram(),
                next_run: AtomicU64::new(1),
                spec,
            }),
        }
    }

    /// Puts the pool's changes on the events stream through `sink` (the first sink attached
    /// stays).
    pub fn attach_events(&self, sink: EventSink) {
        let _ = self.shared.events.set(sink);
    }

    /// Emits `kind` with `detail` plus the pool's name (never waits).
    fn emit(&self, kind: &str, mut detail: Value) {
        if let Some(sink) = self.shared.events.get() {
            detail["pool"] = json!(self.name());
            sink.emit(Event::new(kind, detail));
        }
    }

    /// Emits `pool_agent_<state>` for one agent.
    fn emit_agent(&self, state: AgentState, agent: &str, pid: u32, reason: Option<&str>) {
        if self.shared.events.get().is_some() {
            let kind = format!("pool_agent_{}", state.as_str());
            self.emit(
                &kind,
                json!({ "agent": agent, "pid": pid, "reason": reason }),
            );
        }
    }

    pub fn name(&self) -> &str {
        &self.shared.spec.0.name
    }

    pub fn spec(&self) -> &PoolSpec {
        &self.shared.spec
    }

    fn settings(&self) -> &PoolSettings {
        &self.shared.spec.0
    }

    fn lock(&self) -> MutexGuard<'_, Membership> {
        // A panic while holding the lock leaves consistent data (no multi-step invariants are
        // broken half-way that later code relies on), so poisoning is ignored.
        self.shared
            .members
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes claims waiting for an agent and the actor.
    fn touch(&self) {
        self.shared.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver that sees every change of the membership.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }

    /// Claims an idle agent (oldest idle first) and hands it `assignment` as one JSON line on
    /// its stdin; confirmed by `assigned_pattern` within `assign_timeout`, else that agent is
    /// killed and another one is tried. Without an idle agent the claim waits up to
    /// `claim_timeout`, starting an agent if the pool is below `max`.
    pub async fn claim(&self, assignment: Value) -> Result<Claimed, ClaimError> {
        if self.is_worker() {
            return Err(ClaimError::Workers {
                pool: self.name().to_string(),
            });
        }
        let started = Instant::now();
        let deadline = started + self.settings().claim_timeout;
        let mut line = assignment.to_string();
        line.push('\n');
        let mut changed = self.subscribe();
        let mut waiting = None;
        loop {
            if Instant::now() >= deadline {
                return Err(ClaimError::Timeout {
                    pool: self.name().to_string(),
                    waited: started.elapsed(),
                });
            }
            changed.borrow_and_update();
            let taken = {
                let mut m = self.lock();
                if m.closed {
                    return Err(ClaimError::Closed {
                        pool: self.name().to_string(),
                    });
                }
                let oldest = m
                    .agents
                    .iter()
                    .filter(|(_, a)| a.state == AgentState::Idle)
                    .min_by_key(|(seq, a)| (a.idle_since, **seq))
                    .map(|(seq, _)| *seq);
                match oldest.and_then(|seq| m.agents.get_mut(&seq)) {
                    Some(agent) => {
                        agent.state = AgentState::Assigned;
                        agent.idle_since = None;
                        let taken = (agent.id.clone(), agent.pid, agent.commands.clone());
                        m.deferred += 1;
                        Some(taken)
                    }
                    None => {
                        if let Some(reason) = &m.fatal {
                            return Err(ClaimError::Fatal {
                                pool: self.name().to_string(),
                                reason: reason.clone(),
                            });
                        }
                        None
                    }
                }
            };
            if let Some((agent_id, pid, commands)) = taken {
                let deferred = Deferred(self.clone());
                // No longer waiting. The actor starts the replacement once the assignment is
                // confirmed (or failed): a replacement's interpreter starting up beside the
                // claimed agent would compete with it for the CPU while the claim waits.
                waiting = None;
                let (reply, confirmed) = oneshot::channel();
                let sent = commands.send(AgentCommand::Assign {
                    line: line.clone(),
                    reply,
                });
                let outcome = match sent {
                    Ok(()) => confirmed
                        .await
                        .unwrap_or_else(|_| Err("the agent ended".into())),
                    Err(_) => Err("the agent's monitor is gone".into()),
                };
                match outcome {
                    Ok(()) => {
                        self.lock().totals.claims += 1;
                        tokio::spawn(async move {
                            tokio::time::sleep(REPLACE_AFTER).await;
                            drop(deferred);
                        });
                        self.emit_agent(AgentState::Assigned, &agent_id, pid, None);
                        self.shared
                            .claim_latency
                            .observe(started.elapsed().as_secs_f64());
                        return Ok(Claimed { agent_id, pid });
                    }
                    Err(reason) => {
                        warn!(pool = %self.name(), agent = %agent_id, %reason, "assignment failed; trying another agent");
                        self.lock().totals.assign_failures += 1;
                        drop(deferred);
                        continue;
                    }
                }
            }
            if waiting.is_none() {
                self.lock().waiters += 1;
                waiting = Some(Waiting(self));
            }
            self.reconcile();
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(ClaimError::Timeout {
                    pool: self.name().to_string(),
                    waited: started.elapsed(),
                });
            }
        }
    }

    /// Ends `agent_id`'s session: `stop_signal` to its group, SIGKILL after `stop_timeout`;
    /// the pool replaces it.
    pub fn release(&self, agent_id: &str) -> Result<(), ReleaseError> {
        let found = {
            let mut m = self.lock();
            m.agents.values_mut().find(|a| a.id == agent_id).map(|a| {
                let first = a.state != AgentState::Draining;
                a.state = AgentState::Draining;
                (first, a.pid, a.commands.clone())
            })
        };
        match found {
            Some((first, pid, commands)) => {
                if first {
                    self.emit_agent(AgentState::Draining, agent_id, pid, Some("released"));
                    let _ = commands.send(AgentCommand::Stop {
                        reason: "released".into(),
                        failed: false,
                    });
                }
                self.touch();
                Ok(())
            }
            None => Err(ReleaseError::Unknown {
                pool: self.name().to_string(),
                agent_id: agent_id.to_string(),
            }),
        }
    }

    /// `Some("backoff: …")` or `Some("fatal: …")` while agents cannot be started; `None`
    /// when healthy.
    pub fn health(&self) -> Option<String> {
        self.health_of(&self.lock())
    }

    fn health_of(&self, m: &Membership) -> Option<String> {
        if let Some(reason) = &m.fatal {
            return Some(format!("fatal: {reason}"));
        }
        if m.consecutive_failures > 0 {
            let last = m.last_failure.as_deref().unwrap_or("?");
            return Some(format!(
                "backoff: {} consecutive startup failure(s) of {}; last: {last}",
                m.consecutive_failures,
                self.settings().startretries
            ));
        }
        None
    }

    /// Leaves `fatal`/`backoff` (an operator's action, once the cause is fixed): the failure
    /// count and the backoff deadline are cleared and the next reconcile starts agents again,
    /// as for a new pool. Agents started before the reset belong to the earlier round: if one
    /// of them still fails to start, it does not count against the new one. Returns what the
    /// pool's health was ([`Pool::health`]), or `None` — and does nothing — when it was
    /// healthy: live agents are never touched.
    pub fn reset(&self) -> Option<String> {
        let was = {
            let mut m = self.lock();
            let was = self.health_of(&m)?;
            m.fatal = None;
            m.consecutive_failures = 0;
            m.next_start_at = None;
            m.failure_generation += 1;
            was
        };
        info!(pool = %self.name(), was = %was, "pool reset: starting agents again");
        self.emit("pool_reset", json!({ "was": was }));
        self.touch();
        Some(was)
    }

    /// Live agents per state and startup failures, for `/metrics`.
    pub fn stats(&self) -> PoolStats {
        let m = self.lock();
        PoolStats {
            agents: [
                (
                    AgentState::Starting,
                    m.count(AgentState::Starting) + m.launching,
                ),
                (AgentState::Idle, m.count(AgentState::Idle)),
                (AgentState::Assigned, m.count(AgentState::Assigned)),
                (AgentState::Draining, m.count(AgentState::Draining)),
            ],
            startup_failures: m.totals.startup_failures,
            health: m.health(),
        }
    }

    /// How long successful claims took (seconds), for `/metrics`.
    pub fn claim_latency(&self) -> &Histogram {
        &self.shared.claim_latency
    }

    /// The pool at a glance: health, counts per state, each live agent (id, pid, state, age,
    /// RSS), the idle agents in claim order, the last ended ones with their reasons, totals.
    pub fn snapshot(&self) -> Value {
        let now = Instant::now();
        let health = self.health();
        let m = self.lock();
        let s = self.settings();
        let agents: Vec<Value> = m
            .agents
            .values()
            .map(|a| {
                json!({
                    "id": a.id,
                    "pid": a.pid,
                    "state": a.state.as_str(),
                    "age_secs": secs(now - a.started),
                    "rss_mb": a.rss_kb.map(|kb| kb / 1024),
                    "running": a.running,
                    "served": a.served,
                })
            })
            .collect();
        let mut queue: Vec<(Instant, u64, &str)> = m
            .agents
            .iter()
            .filter_map(|(seq, a)| Some((a.idle_since?, *seq, a.id.as_str())))
            .collect();
        queue.sort();
        let idle_queue: Vec<&str> = queue.into_iter().map(|(_, _, id)| id).collect();
        let recent: Vec<Value> = m
            .recent
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "pid": e.pid,
                    "state": e.state.as_str(),
                    "reason": e.reason,
                    "lived_secs": secs(e.lived),
                })
            })
            .collect();
        let t = &m.totals;
        let worker = s.worker.as_ref().map(|w| {
            json!({
                "modules": w.modules,
                "processes": w.processes,
                "concurrency": w.concurrency,
                "capacity": w.capacity(),
                "running": m.agents.values().map(|a| a.running.len()).sum::<usize>(),
                "max_tasks_per_process": w.max_tasks_per_process,
            })
        });
        json!({
            "pool": s.name,
            "kind": if worker.is_some() { "python" } else { "agent" },
            "worker": worker,
            "health": m.health().as_str(),
            "reason": health,
            "min_idle": s.min_idle,
            "max": s.max,
            "closed": m.closed,
            "counts": {
                "starting": m.count(AgentState::Starting) + m.launching,
                "idle": m.count(AgentState::Idle),
                "assigned": m.count(AgentState::Assigned),
                "draining": m.count(AgentState::Draining),
                "exited": t.exited,
                "failed": t.failed,
            },
            "idle_queue": idle_queue,
            "waiting_claims": m.waiters + m.pending.len(),
            "consecutive_startup_failures": m.consecutive_failures,
            "agents": agents,
            "recent": recent,
            "totals": {
                "spawned": t.spawned,
                "ready": t.ready,
                "claims": t.claims,
                "exited": t.exited,
                "failed": t.failed,
                "startup_failures": t.startup_failures,
                "assign_failures": t.assign_failures,
                "recycled": t.recycled,
                "reused": t.reused,
                "memory_kills": t.memory_kills,
                "sigkills": t.sigkills,
                "adopted": t.adopted,
                "tasks": t.tasks,
            },
        })
    }

    /// Starts agents until `idle + starting` (+ the replacements held back for just-claimed
    /// agents, [`Deferred`]) covers `min_idle` plus the waiting claims, never
    /// above `max`, and not while the pool is closed, fatal or backing off (one start at a time
    /// while startup failures are counted).
    pub(crate) fn reconcile(&self) {
        let s = self.settings();
        let now = Instant::now();
        let n = {
            let mut m = self.lock();
            if m.closed || m.fatal.is_some() {
                return;
            }
            let starting = m.count(AgentState::Starting) + m.launching;
            if m.consecutive_failures > 0
                && (starting > 0 || m.next_start_at.is_some_and(|t| now < t))
            {
                return;
            }
            let fresh_idle = m
                .agents
                .values()
                .filter(|a| a.state == AgentState::Idle && !self.expired(a, now))
                .count();
            let want = s.min_idle + m.waiters;
            let live = m.agents.len() + m.launching;
            let mut n = want
                .saturating_sub(fresh_idle + starting + m.deferred)
                .min(s.max.saturating_sub(live));
            if m.consecutive_failures > 0 {
                n = n.min(1);
            }
            m.launching += n;
            n
        };
        for _ in 0..n {
            self.launch();
        }
    }

    fn expired(&self, agent: &Member, now: Instant) -> bool {
        match (self.settings().max_idle_age, agent.idle_since) {
            (Some(age), Some(since)) => now.duration_since(since) >= age,
            _ => false,
        }
    }

    /// Spawns one agent (its slot was counted in `launching`) and its monitor task.
    fn launch(&self) {
        let seq = self.shared.next_seq.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{seq}", self.name());
        let generation = self.lock().failure_generation;
        match process::spawn(self.settings(), &id) {
            Ok((child, group, socket)) => {
                let pid = group.id();
                let (commands, receiver) = mpsc::unbounded_channel();
                {
                    let mut m = self.lock();
                    m.launching -= 1;
                    m.totals.spawned += 1;
                    m.agents.insert(
                        seq,
                        Member {
                            id: id.clone(),
                            pid,
                            state: AgentState::Starting,
                            started: Instant::now(),
                            idle_since: None,
                            rss_kb: None,
                            commands,
                            generation,
                            running: Vec::new(),
                            served: 0,
                            retiring: None,
                        },
                    );
                }
                info!(pool = %self.name(), agent = %id, pid, "agent spawned");
                self.emit_agent(AgentState::Starting, &id, pid, None);
                match socket {
                    Some(socket) => {
                        let process = (child, group, socket);
                        tokio::spawn(worker::run(self.clone(), seq, id, process, receiver));
                    }
                    None => {
                        tokio::spawn(agent::run(self.clone(), seq, id, (child, group), receiver));
                    }
                }
            }
            Err(err) => {
                self.lock().launching -= 1;
                let reason = format!("cannot run {}: {err}", self.settings().command);
                self.record_startup_failure(&id, reason, generation);
            }
        }
        self.touch();
    }

    /// An agent saw its ready pattern.
    fn agent_ready(&self, seq: u64) {
        let (id, pid) = {
            let mut m = self.lock();
            let Some(agent) = m.agents.get_mut(&seq) else {
                return;
            };
            let reused = match agent.state {
                AgentState::Starting => false,
                AgentState::Assigned if self.settings().reusable => true,
                _ => return,
            };
            agent.state = AgentState::Idle;
            agent.idle_since = Some(Instant::now());
            let ready = (agent.id.clone(), agent.pid);
            if reused {
                m.totals.reused += 1;
            } else {
                m.totals.ready += 1;
                m.consecutive_failures = 0;
                m.next_start_at = None;
            }
            ready
        };
        self.emit_agent(AgentState::Idle, &id, pid, None);
        self.touch();
    }

    /// An agent began draining on its own (startup timeout kill, stop).
    fn agent_draining(&self, seq: u64) {
        let draining = self.lock().agents.get_mut(&seq).and_then(|agent| {
            let first = agent.state != AgentState::Draining;
            agent.state = AgentState::Draining;
            first.then(|| (agent.id.clone(), agent.pid))
        });
        if let Some((id, pid)) = draining {
            self.emit_agent(AgentState::Draining, &id, pid, None);
        }
        self.touch();
    }

    /// Counts a startup failure towards `startretries` — once per round: agents started
    /// together before a counted failure (the initial `min_idle` burst) fail for the same
    /// reason and count once; after it, starts are single probes spaced by the backoff.
    fn record_startup_failure(&self, id: &str, reason: String, generation: u64) {
        let s = self.settings();
        let mut m = self.lock();
        m.totals.startup_failures += 1;
        m.last_failure = Some(format!("{id}: {reason}"));
        if generation != m.failure_generation || m.fatal.is_some() {
            warn!(pool = %self.name(), agent = %id, %reason, "agent of an earlier round failed to start too");
            return;
        }
        m.failure_generation += 1;
        m.consecutive_failures += 1;
        let n = m.consecutive_failures;
        if n >= s.startretries {
            let why = format!("{n} consecutive startup failures; last: {id}: {reason}");
            error!(pool = %self.name(), reason = %why, "pool is fatal: no more agents are started");
            self.emit("pool_fatal", json!({ "reason": why, "failures": n }));
            m.fatal = Some(why);
        } else {
            let delay = s.backoff.delay(n - 1);
            warn!(pool = %self.name(), agent = %id, %reason, failures = n, ?delay, "agent failed to start; backing off");
            self.emit(
                "pool_backoff",
                json!({
                    "agent": id, "reason": reason, "failures": n,
                    "delay_ms": delay.as_millis() as u64,
                }),
            );
            m.next_start_at = Some(Instant::now() + delay);
        }
    }

    /// An agent was reaped.
    fn agent_ended(&self, seq: u64, end: agent::End) {
        let now = Instant::now();
        let (id, pid, lived, generation) = {
            let mut m = self.lock();
            let Some(agent) = m.agents.remove(&seq) else {
                return;
            };
            match end.state {
                AgentState::Failed => m.totals.failed += 1,
                _ => m.totals.exited += 1,
            }
            if end.sigkilled {
                m.totals.sigkills += 1;
            }
            let lived = now - agent.started;
            if m.recent.len() == RECENT {
                m.recent.pop_front();
            }
            m.recent.push_back(Ended {
                id: agent.id.clone(),
                pid: agent.pid,
                state: end.state,
                reason: end.reason.clone(),
                lived,
            });
            (agent.id, agent.pid, lived, agent.generation)
        };
        info!(pool = %self.name(), agent = %id, pid, state = end.state.as_str(), reason = %end.reason, ?lived, "agent reaped");
        self.emit_agent(end.state, &id, pid, Some(&end.reason));
        if end.startup_failure {
            self.record_startup_failure(&id, end.reason, generation);
        }
        self.touch();
    }

    /// Liveness, RSS and idle age: stops agents above `memory_limit_mb`, recycles expired idle
    /// agents, kills the group of any agent whose monitor is gone. Reads `/proc` (a pass over
    /// every process, milliseconds) on a blocking thread, outside the lock: a claim in flight
    /// never waits for it.
    pub(crate) async fn check_health(&self) {
        let s = self.settings();
        let pids: Vec<(u64, u32)> = self
            .lock()
            .agents
            .iter()
            .map(|(seq, a)| (*seq, a.pid))
            .collect();
        let leaders: Vec<u32> = pids.iter().map(|(_, pid)| *pid).collect();
        let by_group = tokio::task::spawn_blocking(move || process::group_rss_kb(&leaders))
            .await
            .unwrap_or_default();
        let rss: Vec<(u64, Option<u64>)> = pids
            .into_iter()
            .map(|(seq, pid)| (seq, by_group.get(&pid).copied()))
            .collect();
        let now = Instant::now();
        let mut stops = Vec::new();
        let mut orphans = Vec::new();
        {
            let mut m = self.lock();
            for (seq, kb) in rss {
                let Some(agent) = m.agents.get_mut(&seq) else {
                    continue;
                };
                agent.rss_kb = kb;
                if agent.commands.is_closed() {
                    orphans.push(seq);
                    continue;
                }
                if let (Some(limit), Some(kb)) = (s.memory_limit_mb, kb)
                    && kb / 1024 > limit
                    && agent.state != AgentState::Draining
                {
                    agent.state = AgentState::Draining;
                    let reason = format!("RSS {} MB above memory_limit_mb {limit}", kb / 1024);
                    self.emit_agent(AgentState::Draining, &agent.id, agent.pid, Some(&reason));
                    stops.push((agent.commands.clone(), reason, true));
                    m.totals.memory_kills += 1;
                }
            }
            // Recycle expired idle agents once fresh ones cover min_idle (or the pool is
            // full, so a replacement can only start after one goes).
            let fresh_idle = m
                .agents
                .values()
                .filter(|a| a.state == AgentState::Idle && !self.expired(a, now))
                .count();
            let full = m.agents.len() + m.launching >= s.max;
            let expired: Vec<u64> = m
                .agents
                .iter()
                .filter(|(_, a)| a.state == AgentState::Idle && self.expired(a, now))
                .map(|(seq, _)| *seq)
                .collect();
            let allowed = if fresh_idle >= s.min_idle {
                expired.len()
            } else if full {
                1
            } else {
                0
            };
            for seq in expired.into_iter().take(allowed) {
                if let Some(agent) = m.agents.get_mut(&seq) {
                    agent.state = AgentState::Draining;
                    let reason = "recycled: max_idle_age";
                    self.emit_agent(AgentState::Draining, &agent.id, agent.pid, Some(reason));
                    stops.push((agent.commands.clone(), reason.into(), false));
                }
                m.totals.recycled += 1;
            }
            for seq in &orphans {
                if let Some(agent) = m.agents.remove(seq) {
                    error!(pool = %self.name(), agent = %agent.id, pid = agent.pid, "agent lost its monitor: killing its group");
                    let reason = Some("lost its monitor: group killed");
                    self.emit_agent(AgentState::Failed, &agent.id, agent.pid, reason);
                    process::signal_group(agent.pid, Signal::SIGKILL);
                }
            }
        }
        for (commands, reason, failed) in stops {
            warn!(pool = %self.name(), %reason, "stopping agent");
            let _ = commands.send(AgentCommand::Stop { reason, failed });
        }
        self.touch();
    }

    /// Called by a (re)started [`PoolActor`]: opens the pool and re-adopts the agents whose
    /// monitor still runs (killing the group of any that lost it). Returns how many were
    /// adopted.
    pub(crate) async fn adopt(&self) -> usize {
        let adopted = {
            let mut m = self.lock();
            m.closed = false;
            let n = m.agents.len();
            m.totals.adopted += n as u64;
            n
        };
        // Liveness check: orphaned groups are killed here.
        self.check_health().await;
        adopted
    }

    /// Stops every agent (`stop_signal`, SIGKILL after `stop_timeout`) and waits until all are
    /// reaped; no agent is started or claimed meanwhile. Returns the agents still alive after
    /// the deadline (their groups were SIGKILLed; zero unless the system is wedged).
    pub async fn shutdown(&self) -> usize {
        let deadline = Instant::now() + self.settings().stop_timeout + Duration::from_secs(2);
        let mut changed = self.subscribe();
        let stops: Vec<_> = {
            let mut m = self.lock();
            m.closed = true;
            m.agents
                .values_mut()
                .filter(|a| a.state != AgentState::Draining)
                .map(|a| {
                    a.state = AgentState::Draining;
                    self.emit_agent(AgentState::Draining, &a.id, a.pid, Some("pool stopping"));
                    a.commands.clone()
                })
                .collect()
        };
        for commands in stops {
            let _ = commands.send(AgentCommand::Stop {
                reason: "pool stopping".into(),
                failed: false,
            });
        }
        self.touch();
        loop {
            changed.borrow_and_update();
            let left = {
                let m = self.lock();
                m.agents.len() + m.launching
            };
            if left == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                let m = self.lock();
                for agent in m.agents.values() {
                    error!(pool = %self.name(), agent = %agent.id, pid = agent.pid, "agent not reaped at shutdown: SIGKILL to its group");
                    process::signal_group(agent.pid, Signal::SIGKILL);
                }
                return m.agents.len();
            }
        }
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}
