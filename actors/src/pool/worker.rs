//! Python worker processes (`[workers.NAME]`, docs/python.md): the monitor of one process and
//! the pool's side of running a task on one ([`Pool::run`]).
//!
//! A worker is an agent of a pool whose settings have a [`WorkerSettings`]: spawned the same
//! way (own process group, clean environment, watchdog, reaped by its monitor), but instead of
//! a stdin assignment and output patterns it speaks the worker protocol over a socket pair (its
//! fd [`CHILD_FD`]): JSON lines, `ready` / `fatal` / `done` from the worker, `run` to it. Its
//! stdout and stderr are logs only (each line tagged with the agent and the task it runs), so
//! `print()` in a task can never corrupt the channel.
//!
//! | event | what the monitor does |
//! |---|---|
//! | `ready` | the process becomes idle (counts as a successful start) |
//! | `fatal` (an import failed) | a startup failure whose reason is the error; the pool backs off, then goes `fatal` |
//! | `done` | the task's result or error goes to its caller; the process is recycled at `max_tasks_per_process` or above `memory_limit_mb` once its tasks are done |
//! | a line over `max_message_bytes`, not JSON, or of no known type | protocol error: the group is SIGKILLed, its tasks fail (retryable), a new process starts |
//! | an attempt dropped (hard time limit, terminate, node stop) | the group is SIGKILLed; the process's other tasks fail (retryable) |
//! | the process exits with tasks running (a crash, `os._exit`, a signal) | they fail (retryable, class `crashed`); a new process starts |

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::{error, info, warn};

use super::agent::{AgentCommand, End, describe};
use super::{AgentState, Pool, WorkerSettings, process};
use crate::broker::Envelope;
use crate::child::ProcessGroup;
use crate::child::lines::{LOG_LINE_BYTES, Line, Lines};
use crate::error::{ErrorClass, TaskError};

/// The protocol channel's fd number in the worker.
pub(super) const CHILD_FD: i32 = 3;
/// Default cap of one line from a worker (a task's result): 16 MiB.
pub(super) const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Variables the pool sets in a worker (a config's `env` cannot name them).
pub(super) const RESERVED_ENV: [&str; 6] = [
    "RT_WORKER_FD",
    "RT_WORKER_MODULES",
    "RT_WORKER_CONCURRENCY",
    "RT_WORKER_DB_CLOSE",
    "RT_WORKER_MAX_MESSAGE_BYTES",
    "PYTHONUNBUFFERED",
];
/// How long a worker that closed its channel (after `fatal`, say) has to exit before SIGKILL.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// From the stack-dump signal to the SIGKILL of a worker whose attempt was stopped.
const DUMP_GRACE: Duration = Duration::from_millis(100);
/// How long writing one `run` line may take before the worker counts as wedged.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the channel of a worker that exited is still read for its last messages.
const LEFTOVERS: Duration = Duration::from_millis(200);
/// Longest traceback kept in a task's error (its end: where it was raised).
const TRACEBACK_BYTES: usize = 8 * 1024;

/// The worker's own variables.
/// (The worker fails a task whose `done` would be over `max_message_bytes` itself, naming
/// the size, rather than send a line the node would take for a protocol error.)
pub(super) fn env(w: &WorkerSettings) -> [(&'static str, String); 6] {
    [
        ("RT_WORKER_FD", CHILD_FD.to_string()),
        ("RT_WORKER_MODULES", w.modules.join(",")),
        ("RT_WORKER_CONCURRENCY", w.concurrency.to_string()),
        ("RT_WORKER_DB_CLOSE", w.db_close.clone()),
        (
            "RT_WORKER_MAX_MESSAGE_BYTES",
            w.max_message_bytes.to_string(),
        ),
        ("PYTHONUNBUFFERED", "1".to_string()),
    ]
}

type Reply = oneshot::Sender<Result<Value, TaskError>>;

/// A message from a worker.
#[derive(Debug, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum FromWorker {
    Ready {
        #[serde(default)]
        python: String,
        #[serde(default)]
        tasks: Vec<String>,
    },
    Fatal {
        error: PyError,
    },
    Done {
        id: String,
        ok: bool,
        #[serde(default)]
        result: Value,
        error: Option<PyError>,
    },
}

/// An exception as a worker reports it.
#[derive(Debug, Deserialize)]
struct PyError {
    #[serde(default)]
    kind: String,
    #[serde(default, rename = "type")]
    type_name: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    traceback: String,
    retry_after_ms: Option<u64>,
}

impl PyError {
    /// `ValueError: bad input`.
    fn headline(&self) -> String {
        match (self.type_name.is_empty(), self.message.is_empty()) {
            (true, _) => self.message.clone(),
            (false, true) => self.type_name.clone(),
            (false, false) => format!("{}: {}", self.type_name, self.message),
        }
    }

    /// The headline, then the traceback's last [`TRACEBACK_BYTES`].
    fn described(&self) -> String {
        let headline = self.headline();
        let tb = self.traceback.trim_end();
        if tb.is_empty() {
            return headline;
        }
        let mut start = tb.len().saturating_sub(TRACEBACK_BYTES);
        while !tb.is_char_boundary(start) {
            start += 1;
        }
        let cut = if start > 0 { "…" } else { "" };
        format!("{headline}\n{cut}{}", &tb[start..])
    }

    /// What the runtime does next.
    fn into_task_error(self) -> TaskError {
        let described = self.described();
        match self.kind.as_str() {
            "permanent" => TaskError::Permanent(described),
            "soft_timeout" => TaskError::Cancelled(format!("soft time limit: {described}")),
            _ => TaskError::Retry {
                reason: described,
                after: self.retry_after_ms.map(Duration::from_millis),
                class: ErrorClass::Python,
            },
        }
    }
}

/// A retryable failure of an attempt whose process went away.
fn lost(reason: String) -> TaskError {
    TaskError::retry_as(ErrorClass::Crashed, reason)
}

impl Pool {
    /// Whether this is a worker pool (its agents run tasks: [`Pool::run`]).
    pub fn is_worker(&self) -> bool {
        self.settings().worker.is_some()
    }

    /// Runs `envelope` as `function` on a process of this worker pool and returns its result.
    /// With no process free it waits — in line, oldest first: the process that frees up takes
    /// the first waiting task itself, in the same wake-up as its last `done` — up to
    /// `claim_timeout` (then retryable, class `no_agent`). The worker is told both limits and
    /// arms the soft one itself; the hard one is the node's: dropping the future (the hard
    /// limit, a terminate) has the process's stacks dumped (SIGUSR2) and its group SIGKILLed.
    pub async fn run(
        &self,
        envelope: Arc<Envelope>,
        function: Arc<str>,
        soft: Option<Instant>,
        hard: Instant,
    ) -> Result<Value, TaskError> {
        let no_agent = |why: String| TaskError::retry_as(ErrorClass::NoAgent, why);
        if !self.is_worker() {
            return Err(TaskError::Permanent(format!(
                "pool {} is not a worker pool",
                self.name()
            )));
        }
        let deadline = Instant::now() + self.settings().claim_timeout;
        let (reply, mut result) = oneshot::channel();
        let task_id = envelope.id.clone();
        let run = Run {
            envelope,
            function,
            soft,
            hard,
            reply,
        };
        let seq = self.shared.next_run.fetch_add(1, Ordering::Relaxed);
        let mut changed = self.subscribe();
        let taken = {
            let mut m = self.lock();
            let taken = if m.closed {
                None
            } else {
                self.take_worker(&mut m, &task_id)
            };
            match taken {
                Some(commands) => Some((commands, run)),
                None => {
                    if let Some(why) = self.refusal(&m) {
                        return Err(no_agent(why));
                    }
                    m.pending.push_back(Pending { seq, run });
                    None
                }
            }
        };
        // From here on, dropping this future stops the task wherever it is.
        let mut guard = InFlight {
            pool: self,
            seq,
            task_id: Some(task_id),
        };
        let mut waiting = taken.is_none();
        if let Some((commands, run)) = taken {
            let task_id = run.envelope.id.clone();
            let (line, reply) = run.line(Instant::now());
            if let Err(unsent) = commands.send(AgentCommand::Run {
                task_id,
                line,
                reply,
            }) && let AgentCommand::Run { reply, .. } = unsent.0
            {
                let _ = reply.send(Err(lost("the worker's monitor is gone".into())));
            }
        } else {
            self.reconcile();
        }
        let outcome = loop {
            tokio::select! {
                outcome = &mut result => {
                    break outcome.unwrap_or_else(|_| Err(lost("the worker's monitor ended".into())));
                }
                () = sleep_until(deadline), if waiting => {
                    waiting = false;
                    if self.unqueue(seq) {
                        guard.task_id = None;
                        return Err(no_agent(format!(
                            "pool {}: no idle worker process within claim_timeout ({:?})",
                            self.name(),
                            self.settings().claim_timeout
                        )));
                    }
                }
                Ok(()) = changed.changed(), if waiting => {
                    // A change of the pool (not of a task): stopping or fatal ends the wait.
                    let why = self.refusal(&self.lock());
                    if let Some(why) = why
                        && self.unqueue(seq)
                    {
                        guard.task_id = None;
                        return Err(no_agent(why));
                    }
                }
            }
        };
        guard.task_id = None;
        outcome
    }

    /// Why no task can wait for a process of this pool: it is stopping, or fatal.
    fn refusal(&self, m: &super::Membership) -> Option<String> {
        match (m.closed, &m.fatal) {
            (true, _) => Some(format!("pool {} is stopping", self.name())),
            (false, Some(reason)) => Some(format!("pool {} is fatal: {reason}", self.name())),
            (false, None) => None,
        }
    }

    /// Removes the run `seq` from the line; `false` when a process took it already.
    fn unqueue(&self, seq: u64) -> bool {
        let mut m = self.lock();
        let before = m.pending.len();
        m.pending.retain(|p| p.seq != seq);
        m.pending.len() < before
    }

    /// For worker `seq`, which can take a task now: the first task waiting for a process,
    /// counted on it (see [`Pool::take_worker`]); `None` when nothing waits, or the worker is
    /// not idle (busy, retiring, stopping).
    fn next_run(&self, seq: u64) -> Option<Run> {
        let concurrency = self.settings().worker.as_ref()?.concurrency;
        let mut m = self.lock();
        if m.pending.is_empty() {
            return None;
        }
        let agent = m.agents.get(&seq)?;
        if agent.state != AgentState::Idle
            || agent.retiring.is_some()
            || agent.running.len() >= concurrency
        {
            return None;
        }
        let run = m.pending.pop_front()?.run;
        let agent = m.agents.get_mut(&seq)?;
        agent.running.push(run.envelope.id.clone());
        if agent.running.len() >= concurrency {
            agent.state = AgentState::Assigned;
            agent.idle_since = None;
        }
        Some(run)
    }

    /// Picks the idle worker with the fewest running tasks (the longest idle among them) and
    /// counts `task_id` on it; a worker at `concurrency` is `assigned` (busy).
    fn take_worker(
        &self,
        m: &mut super::Membership,
        task_id: &str,
    ) -> Option<mpsc::UnboundedSender<AgentCommand>> {
        let concurrency = self.settings().worker.as_ref()?.concurrency;
        let seq = m
            .agents
            .iter()
            .filter(|(_, a)| {
                a.state == AgentState::Idle && a.retiring.is_none() && a.running.len() < concurrency
            })
            .min_by_key(|(seq, a)| (a.running.len(), a.idle_since, **seq))
            .map(|(seq, _)| *seq)?;
        let agent = m.agents.get_mut(&seq)?;
        agent.running.push(task_id.to_string());
        if agent.running.len() >= concurrency {
            agent.state = AgentState::Assigned;
            agent.idle_since = None;
        }
        Some(agent.commands.clone())
    }

    /// Worker `seq` finished `task_id` (its monitor says so before it hands the outcome on):
    /// free again, or retired — at `max_tasks_per_process`, or when `over_memory` says its RSS
    /// was above the limit — and stopped once nothing else runs on it.
    fn worker_done(&self, seq: u64, task_id: &str, over_memory: Option<String>) {
        let max = self
            .settings()
            .worker
            .as_ref()
            .and_then(|w| w.max_tasks_per_process);
        let stop = {
            let mut m = self.lock();
            m.totals.tasks += 1;
            let Some(agent) = m.agents.get_mut(&seq) else {
                return;
            };
            agent.running.retain(|id| id != task_id);
            agent.served += 1;
            if agent.state == AgentState::Assigned {
                agent.state = AgentState::Idle;
                agent.idle_since = Some(Instant::now());
            }
            let mut memory = false;
            if agent.retiring.is_none() {
                if max.is_some_and(|max| agent.served >= max) {
                    agent.retiring = Some(format!(
                        "recycled after {} tasks (max_tasks_per_process)",
                        agent.served
                    ));
                } else if let Some(reason) = over_memory {
                    agent.retiring = Some(reason);
                    memory = true;
                }
            }
            let stop = match &agent.retiring {
                Some(reason) if agent.running.is_empty() && agent.state != AgentState::Draining => {
                    agent.state = AgentState::Draining;
                    Some((
                        agent.commands.clone(),
                        reason.clone(),
                        agent.id.clone(),
                        agent.pid,
                    ))
                }
                _ => None,
            };
            if stop.is_some() {
                if memory {
                    m.totals.memory_kills += 1;
                } else {
                    m.totals.recycled += 1;
                }
            }
            stop
        };
        // No change per task: nothing waits on the change channel for a free process (the
        // monitor hands the next waiting task out itself), and the actor would rebuild its
        // snapshot thousands of times a second. A process stopped is a change.
        if let Some((commands, reason, id, pid)) = stop {
            self.emit_agent(AgentState::Draining, &id, pid, Some(&reason));
            let _ = commands.send(AgentCommand::Stop {
                reason,
                failed: false,
            });
            self.touch();
        }
    }
}

/// A task waiting for a free process ([`Pool::run`]).
#[derive(Debug)]
pub(super) struct Pending {
    seq: u64,
    run: Run,
}

/// What a process needs to run one task: its `run` line is made when a process takes it (the
/// limits it carries are counted from then on the worker's side).
#[derive(Debug)]
pub(super) struct Run {
    envelope: Arc<Envelope>,
    function: Arc<str>,
    soft: Option<Instant>,
    hard: Instant,
    reply: Reply,
}

impl Run {
    fn line(self, now: Instant) -> (String, Reply) {
        let line = run_line(&self.envelope, &self.function, self.soft, self.hard, now);
        (line, self.reply)
    }
}

/// Stops the task if its attempt is dropped before its result came (see [`Pool::run`]):
/// takes it out of the line while it waits, else has its worker's group killed.
struct InFlight<'a> {
    pool: &'a Pool,
    seq: u64,
    task_id: Option<String>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let Some(task_id) = self.task_id.take() else {
            return;
        };
        if self.pool.unqueue(self.seq) {
            return;
        }
        let commands = self
            .pool
            .lock()
            .agents
            .values()
            .find(|a| a.running.contains(&task_id))
            .map(|a| a.commands.clone());
        if let Some(commands) = commands {
            let _ = commands.send(AgentCommand::Abort { task_id });
        }
    }
}

/// The `run` line of one task.
fn run_line(
    envelope: &Envelope,
    function: &str,
    soft: Option<Instant>,
    hard: Instant,
    now: Instant,
) -> String {
    let ms = |at: Instant| {
        u64::try_from(at.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX)
    };
    // Serialised from borrows: no copy of the arguments per task.
    #[derive(serde::Serialize)]
    struct Run<'a> {
        t: &'static str,
        id: &'a str,
        task: &'a str,
        queue: &'a str,
        attempt: u32,
        args: &'a [Value],
        kwargs: &'a Map<String, Value>,
        soft_ms: Option<u64>,
        hard_ms: u64,
    }
    let run = Run {
        t: "run",
        id: &envelope.id,
        task: function,
        queue: &envelope.queue,
        attempt: envelope.attempt,
        args: &envelope.args,
        kwargs: &envelope.kwargs,
        soft_ms: soft.map(ms),
        hard_ms: ms(hard),
    };
    // Serialising JSON values into a String cannot fail.
    let mut line = serde_json::to_string(&run).unwrap_or_default();
    line.push('\n');
    line
}

/// What the monitor of one worker keeps besides its phase.
struct Monitor {
    pool: Pool,
    seq: u64,
    id: String,
    pid: u32,
    max_message_bytes: usize,
    memory_limit_mb: Option<u64>,
    /// What the log lines of the worker's output are tagged with.
    current: Arc<Mutex<Shown>>,
    inflight: HashMap<String, Reply>,
    channel_open: bool,
    sigkilled_by_us: bool,
}

impl Monitor {
    /// Handles one line of the channel (or its end) in `phase`; returns the next phase.
    fn on_line(&mut self, line: std::io::Result<Option<Line>>, phase: Phase) -> Phase {
        let parsed = match line {
            Ok(Some(line)) if line.is_truncated() => Err(format!(
                "a message over max_message_bytes ({} bytes)",
                self.max_message_bytes
            )),
            Ok(Some(line)) => serde_json::from_str::<FromWorker>(&line.kept()).map_err(|err| {
                format!(
                    "not a worker message ({err}): {}",
                    line.shown(200).trim_end()
                )
            }),
            Ok(None) | Err(_) => {
                self.channel_open = false;
                return match phase {
                    Phase::Stopping { .. } | Phase::Ending { .. } => phase,
                    _ => Phase::Ending {
                        deadline: Some(Instant::now() + EXIT_GRACE),
                        reason: "closed its protocol channel".into(),
                        startup_failure: matches!(phase, Phase::Starting { .. }),
                    },
                };
            }
        };
        let (id, pid) = (self.id.as_str(), self.pid);
        match (parsed, phase) {
            (Err(problem), phase) => {
                let reason = format!("protocol error: {problem}");
                self.kill(&reason);
                // Nothing more is read from a channel that carried garbage.
                self.channel_open = false;
                Phase::Ending {
                    deadline: None,
                    reason,
                    startup_failure: matches!(phase, Phase::Starting { .. }),
                }
            }
            (Ok(FromWorker::Ready { python, tasks }), Phase::Starting { .. }) => {
                info!(agent = %id, pid, %python, tasks = tasks.len(), "worker ready");
                self.pool.agent_ready(self.seq);
                Phase::Running
            }
            (Ok(FromWorker::Ready { .. }), phase) => {
                warn!(agent = %id, pid, "worker said ready twice");
                phase
            }
            (Ok(FromWorker::Fatal { error }), phase) => {
                let reason = format!("cannot start: {}", error.headline());
                error!(agent = %id, pid, %reason, traceback = %error.traceback.trim_end(), "worker failed to start");
                Phase::Ending {
                    deadline: Some(Instant::now() + EXIT_GRACE),
                    reason,
                    startup_failure: matches!(
                        phase,
                        Phase::Starting { .. }
                            | Phase::Ending {
                                startup_failure: true,
                                ..
                            }
                    ),
                }
            }
            (
                Ok(FromWorker::Done {
                    id: task_id,
                    ok,
                    result,
                    error,
                }),
                phase,
            ) => {
                match self.inflight.remove(&task_id) {
                    Some(reply) => {
                        let outcome = match (ok, error) {
                            (true, _) => Ok(result),
                            (false, Some(error)) => Err(error.into_task_error()),
                            (false, None) => Err(TaskError::Permanent(
                                "the worker reported a failure without an error".into(),
                            )),
                        };
                        let memory = over_memory(pid, self.memory_limit_mb);
                        self.pool.worker_done(self.seq, &task_id, memory);
                        let _ = reply.send(outcome);
                        self.show_running(Some(&task_id));
                    }
                    None => {
                        warn!(agent = %id, pid, task_id = %task_id, "worker finished a task it was not running")
                    }
                }
                phase
            }
        }
    }

    /// Writes the `run` line of `task_id` to the worker; a line not written (in
    /// [`WRITE_TIMEOUT`]) fails the task and kills the worker.
    async fn send_run(
        &mut self,
        write: &mut OwnedWriteHalf,
        task_id: String,
        line: &str,
        reply: Reply,
    ) -> Phase {
        // Counted (and shown on its output) before the worker can start it.
        self.inflight.insert(task_id.clone(), reply);
        self.show_running(None);
        match timeout(WRITE_TIMEOUT, write_line(write, line)).await {
            Ok(Ok(())) => Phase::Running,
            failed => {
                let why = match failed {
                    Ok(Err(err)) => err.to_string(),
                    _ => format!("not written within {WRITE_TIMEOUT:?}"),
                };
                let reason = format!("cannot send a task: {why}");
                if let Some(reply) = self.inflight.remove(&task_id) {
                    let id = &self.id;
                    let _ = reply.send(Err(lost(format!("worker {id}: {reason}"))));
                }
                self.kill(&reason);
                Phase::Ending {
                    deadline: None,
                    reason,
                    startup_failure: false,
                }
            }
        }
    }

    /// Tags the worker's output with the running tasks; `ended`: a task that just finished.
    fn show_running(&self, ended: Option<&str>) {
        let mut ids: Vec<&str> = self.inflight.keys().map(String::as_str).collect();
        ids.sort_unstable();
        let mut shown = self.current.lock().unwrap_or_else(|p| p.into_inner());
        shown.running = ids.join(",");
        if let Some(ended) = ended {
            shown.ended = Some((ended.to_string(), Instant::now()));
        }
    }

    /// SIGKILL to the worker's group (it is reaped by the monitor's wait).
    fn kill(&mut self, reason: &str) {
        warn!(agent = %self.id, pid = self.pid, %reason, "SIGKILL to the worker's process group");
        process::signal_group(self.pid, Signal::SIGKILL);
        self.sigkilled_by_us = true;
        self.pool.agent_draining(self.seq);
    }
}

/// The tasks a worker's output lines are tagged with.
#[derive(Debug, Default)]
struct Shown {
    /// The running tasks' ids, comma-separated.
    running: String,
    /// The task that ended last, and when: its output may be read just after its `done` (the
    /// pipes and the channel are read independently).
    ended: Option<(String, Instant)>,
}

impl Shown {
    /// The running tasks, else the one that ended within [`LEFTOVERS`].
    fn tag(&self) -> String {
        match &self.ended {
            Some((id, at)) if self.running.is_empty() && at.elapsed() < LEFTOVERS => id.clone(),
            _ => self.running.clone(),
        }
    }
}

/// What a worker's monitor is doing.
enum Phase {
    /// Spawned, no `ready` yet.
    Starting { deadline: Instant },
    /// Ready: takes tasks.
    Running,
    /// `stop_signal` sent (recycled, pool stopping): SIGKILL at the deadline.
    Stopping {
        deadline: Instant,
        reason: String,
        failed: bool,
    },
    /// SIGKILLed, or its channel closed: waiting for the reap.
    Ending {
        deadline: Option<Instant>,
        reason: String,
        startup_failure: bool,
    },
}

impl Phase {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Self::Starting { deadline } | Self::Stopping { deadline, .. } => Some(*deadline),
            Self::Ending { deadline, .. } => *deadline,
            Self::Running => None,
        }
    }
}

/// The monitor of worker `id`: owns its child, process group and channel until the reap, then
/// reports to `pool`.
pub(super) async fn run(
    pool: Pool,
    seq: u64,
    id: String,
    (mut child, group, socket): (Child, ProcessGroup, UnixStream),
    mut commands: mpsc::UnboundedReceiver<AgentCommand>,
) {
    let settings = pool.settings().clone();
    let Some(worker) = settings.worker.clone() else {
        return;
    };
    let pid = group.id();
    let current: Arc<Mutex<Shown>> = Arc::default();
    for (pipe, stream) in [
        (child.stdout.take().map(Pipe::Out), "stdout"),
        (child.stderr.take().map(Pipe::Err), "stderr"),
    ] {
        tokio::spawn(log_lines(pipe, id.clone(), stream, current.clone()));
    }
    let (read, mut write) = socket.into_split();
    let mut messages = Lines::new(BufReader::new(read), worker.max_message_bytes);
    let mut m = Monitor {
        pool: pool.clone(),
        seq,
        id: id.clone(),
        pid,
        max_message_bytes: worker.max_message_bytes,
        memory_limit_mb: settings.memory_limit_mb,
        current,
        inflight: HashMap::new(),
        channel_open: true,
        sigkilled_by_us: false,
    };
    let mut phase = Phase::Starting {
        deadline: Instant::now() + settings.startup_timeout,
    };
    let wait = child.wait();
    tokio::pin!(wait);
    let status = loop {
        let deadline = phase.deadline();
        tokio::select! {
            status = &mut wait => break status,
            line = messages.next_line(), if m.channel_open => {
                phase = m.on_line(line, phase);
                // A task that waits for a process goes out now, in this same wake-up (its
                // `done` or `ready` freed this one).
                while matches!(phase, Phase::Running)
                    && let Some(run) = pool.next_run(seq)
                {
                    let task_id = run.envelope.id.clone();
                    let (line, reply) = run.line(Instant::now());
                    phase = m.send_run(&mut write, task_id, &line, reply).await;
                }
            }
            Some(command) = commands.recv() => {
                phase = match (command, phase) {
                    (AgentCommand::Run { task_id, line, reply }, Phase::Running) => {
                        m.send_run(&mut write, task_id, &line, reply).await
                    }
                    (AgentCommand::Run { reply, .. }, phase) => {
                        let _ = reply.send(Err(lost(format!("worker {id} is not running"))));
                        phase
                    }
                    (AgentCommand::Abort { task_id }, phase) => {
                        if m.inflight.remove(&task_id).is_some() && !matches!(phase, Phase::Ending { .. }) {
                            let reason = format!("attempt of task {task_id} stopped (time limit or terminate)");
                            // Its stacks to its stderr first (the worker's faulthandler), then
                            // SIGKILL to the group when the deadline below passes.
                            warn!(agent = %id, pid, %reason, "SIGUSR2 (stack dump), then SIGKILL in {DUMP_GRACE:?}");
                            process::signal_pid(pid, Signal::SIGUSR2);
                            pool.agent_draining(seq);
                            Phase::Ending { deadline: Some(Instant::now() + DUMP_GRACE), reason, startup_failure: false }
                        } else {
                            phase
                        }
                    }
                    (AgentCommand::Stop { .. }, phase @ (Phase::Stopping { .. } | Phase::Ending { .. })) => phase,
                    (AgentCommand::Stop { reason, failed }, _) => {
                        info!(agent = %id, pid, %reason, signal = %settings.stop_signal, "stopping worker");
                        process::signal_group(pid, settings.stop_signal);
                        pool.agent_draining(seq);
                        Phase::Stopping { deadline: Instant::now() + settings.stop_timeout, reason, failed }
                    }
                    (AgentCommand::Assign { reply, .. }, phase) => {
                        let _ = reply.send(Err("a worker process takes tasks, not assignments".into()));
                        phase
                    }
                };
            }
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                phase = match phase {
                    Phase::Starting { .. } => {
                        let reason = format!("not ready within startup_timeout ({:?})", settings.startup_timeout);
                        m.kill(&reason);
                        Phase::Ending { deadline: None, reason, startup_failure: true }
                    }
                    Phase::Stopping { reason, failed, .. } => {
                        let reason = format!("{reason}; SIGKILL after stop_timeout ({:?})", settings.stop_timeout);
                        m.kill(&reason);
                        if failed {
                            Phase::Ending { deadline: None, reason, startup_failure: false }
                        } else {
                            Phase::Stopping { deadline: super::agent::far_future(), reason, failed }
                        }
                    }
                    Phase::Ending { reason, startup_failure, .. } => {
                        m.kill(&reason);
                        Phase::Ending { deadline: None, reason, startup_failure }
                    }
                    Phase::Running => Phase::Running,
                };
            }
        }
    };
    // What the worker wrote just before it exited (a `fatal`, a task's `done`) may still be
    // unread: the reap can win the race against the channel.
    let until = Instant::now() + LEFTOVERS;
    while m.channel_open
        && let Ok(line) = timeout_at(until, messages.next_line()).await
    {
        phase = m.on_line(line, phase);
    }
    drop(group);
    let exit = describe(&status);
    let sigkilled = matches!(&status, Ok(s) if s.signal() == Some(Signal::SIGKILL as i32));
    let (state, reason, startup_failure) = match phase {
        Phase::Starting { .. } => (
            AgentState::Failed,
            format!("exited before ready ({exit})"),
            true,
        ),
        Phase::Running if m.inflight.is_empty() => (
            AgentState::Failed,
            format!("exited while idle ({exit})"),
            false,
        ),
        Phase::Running => (
            AgentState::Failed,
            format!("exited during a task ({exit})"),
            false,
        ),
        Phase::Stopping { reason, failed, .. } => (
            if failed {
                AgentState::Failed
            } else {
                AgentState::Exited
            },
            format!("{reason} ({exit})"),
            false,
        ),
        Phase::Ending {
            reason,
            startup_failure,
            ..
        } => (
            AgentState::Failed,
            format!("{reason} ({exit})"),
            startup_failure,
        ),
    };
    for (task_id, reply) in m.inflight {
        warn!(agent = %id, pid, task_id = %task_id, %reason, "worker ended with the task running");
        let _ = reply.send(Err(lost(format!("worker {id} {reason}"))));
    }
    pool.agent_ended(
        seq,
        End {
            state,
            reason,
            startup_failure,
            sigkilled: sigkilled || m.sigkilled_by_us,
        },
    );
}

/// `Some(reason)` when the worker led by `pid` (with its descendants) is above `limit` MB.
fn over_memory(pid: u32, limit: Option<u64>) -> Option<String> {
    let limit = limit?;
    let kb = process::group_rss_kb(&[pid]).get(&pid).copied()?;
    (kb / 1024 > limit).then(|| {
        format!(
            "RSS {} MB above memory_limit_mb {limit} after a task",
            kb / 1024
        )
    })
}

async fn write_line(write: &mut OwnedWriteHalf, line: &str) -> std::io::Result<()> {
    write.write_all(line.as_bytes()).await?;
    write.flush().await
}

enum Pipe {
    Out(tokio::process::ChildStdout),
    Err(tokio::process::ChildStderr),
}

/// Logs each line of a worker's stdout or stderr with its agent id and the tasks it runs.
async fn log_lines(
    pipe: Option<Pipe>,
    id: String,
    stream: &'static str,
    current: Arc<Mutex<Shown>>,
) {
    async fn each(
        pipe: impl tokio::io::AsyncRead + Unpin,
        id: &str,
        stream: &'static str,
        current: &Mutex<Shown>,
    ) {
        let mut lines = Lines::new(pipe, LOG_LINE_BYTES);
        while let Ok(Some(line)) = lines.next_line().await {
            let tasks = current.lock().unwrap_or_else(|p| p.into_inner()).tag();
            info!(agent = %id, task_id = %tasks, stream, "{}", line.shown(LOG_LINE_BYTES).trim_end());
        }
    }
    match pipe {
        Some(Pipe::Out(out)) => each(out, &id, stream, &current).await,
        Some(Pipe::Err(err)) => each(err, &id, stream, &current).await,
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn error(kind: &str, traceback: &str) -> PyError {
        PyError {
            kind: kind.to_string(),
            type_name: "ValueError".into(),
            message: "bad input".into(),
            traceback: traceback.into(),
            retry_after_ms: Some(1500),
        }
    }

    #[test]
    fn a_workers_error_kind_decides_what_happens_next() {
        match error("retry", "").into_task_error() {
            TaskError::Retry {
                reason,
                after,
                class,
            } => {
                assert_eq!(reason, "ValueError: bad input");
                assert_eq!(after, Some(Duration::from_millis(1500)));
                assert_eq!(class, ErrorClass::Python);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            error("permanent", "").into_task_error(),
            TaskError::Permanent(reason) if reason == "ValueError: bad input"
        ));
        assert!(matches!(
            error("soft_timeout", "").into_task_error(),
            TaskError::Cancelled(reason) if reason.starts_with("soft time limit: ")
        ));
        // An unknown kind from a newer or broken worker is retried, not trusted as permanent.
        assert!(matches!(
            error("whatever", "").into_task_error(),
            TaskError::Retry { .. }
        ));
    }

    #[test]
    fn a_long_traceback_keeps_its_end_on_a_char_boundary() {
        let traceback = format!("{}é raise ValueError", "é".repeat(TRACEBACK_BYTES));
        let described = error("retry", &traceback).described();
        assert!(
            described.starts_with("ValueError: bad input\n…"),
            "{described}"
        );
        assert!(described.ends_with("raise ValueError"));
        assert!(described.len() <= "ValueError: bad input\n…".len() + TRACEBACK_BYTES + 1);
    }

    #[test]
    fn the_run_line_carries_the_limits_as_milliseconds_from_now() {
        let envelope: Envelope = serde_json::from_value(json!({
            "id": "t-1", "task": "process_chat_message", "queue": "chat", "attempt": 2,
            "args": ["c-42"], "kwargs": {"text": "hi"},
        }))
        .unwrap();
        let now = Instant::now();
        let line = run_line(
            &envelope,
            "chat.process",
            Some(now + Duration::from_secs(120)),
            now + Duration::from_secs(150),
            now,
        );
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let run: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            run,
            json!({"t": "run", "id": "t-1", "task": "chat.process", "queue": "chat",
                   "attempt": 2, "args": ["c-42"], "kwargs": {"text": "hi"},
                   "soft_ms": 120_000, "hard_ms": 150_000})
        );
        let late = run_line(&envelope, "f", None, now, now + Duration::from_secs(1));
        let late: Value = serde_json::from_str(&late).unwrap();
        assert_eq!(
            (late["soft_ms"].clone(), late["hard_ms"].clone()),
            (Value::Null, json!(0))
        );
    }

    #[test]
    fn output_is_tagged_with_the_running_task_or_the_one_that_just_ended() {
        let mut shown = Shown::default();
        assert_eq!(shown.tag(), "");
        shown.running = "a".into();
        assert_eq!(shown.tag(), "a");
        shown.running.clear();
        shown.ended = Some(("a".into(), Instant::now()));
        assert_eq!(shown.tag(), "a");
        shown.ended = Some(("a".into(), Instant::now() - LEFTOVERS));
        assert_eq!(shown.tag(), "");
    }
}
