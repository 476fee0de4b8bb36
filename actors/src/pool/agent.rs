//! One agent's monitor: a task owned by the [`Pool`] that owns the agent's `Child`, drains
//! its stdout and stderr for its whole life (each line logged with the agent id, and matched
//! against the ready / assigned patterns), writes the assignment to its stdin, enforces
//! `startup_timeout`, `assign_timeout` and `stop_timeout`, and reaps it.
//!
//! Every path ends in a reap: the monitor's only exit is `child.wait()` returning. The group is
//! SIGKILLed after the reap too (grandchildren left in it) and unlisted from the watchdog by
//! dropping its [`ProcessGroup`]. If the monitor itself is dropped before the reap (runtime
//! shutdown), the same drop SIGKILLs the group and `kill_on_drop` hands the child to tokio's
//! orphan reaper. Lines are read with the shared capped reader: each is logged and matched on
//! at most [`LOG_LINE_BYTES`] bytes, however long the agent makes it.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use regex::Regex;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tracing::{debug, info, warn};

use super::{AgentState, Pool, process};
use crate::child::ProcessGroup;
use crate::child::lines::{LOG_LINE_BYTES, Lines};
/// How long the pipes of an agent that exited during its assignment are still read for the
/// `assigned_pattern` it may have printed just before.
const LEFTOVERS: Duration = Duration::from_millis(200);

/// What the pool asks of an agent's monitor.
#[derive(Debug)]
pub(super) enum AgentCommand {
    /// Write `line` to stdin and confirm with `assigned_pattern`.
    Assign {
        line: String,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// `stop_signal` to the group, SIGKILL after `stop_timeout`; `failed` marks the end as a
    /// failure (memory limit) rather than an orderly exit.
    Stop { reason: String, failed: bool },
    /// Worker pools: send the `run` line of `task_id` and answer with its outcome.
    Run {
        task_id: String,
        line: String,
        reply: oneshot::Sender<Result<serde_json::Value, crate::error::TaskError>>,
    },
    /// Worker pools: the attempt of `task_id` was dropped: SIGKILL the group.
    Abort { task_id: String },
}

/// How an agent ended, reported to the pool after the reap.
#[derive(Debug)]
pub(super) struct End {
    pub(super) state: AgentState,
    pub(super) reason: String,
    pub(super) startup_failure: bool,
    pub(super) sigkilled: bool,
}

/// A pattern seen on one of the pipes.
#[derive(Debug, Clone, Copy)]
enum Event {
    Ready,
    Assigned,
}

enum Phase {
    Starting {
        deadline: Instant,
    },
    Idle,
    Assigning {
        deadline: Instant,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Assigned,
    Stopping {
        deadline: Instant,
        reason: String,
        failed: bool,
    },
    Killed {
        reason: String,
        startup_failure: bool,
    },
}

impl Phase {
    fn deadline(&self) -> Option<Instant> {
        match self {
            Self::Starting { deadline }
            | Self::Assigning { deadline, .. }
            | Self::Stopping { deadline, .. } => Some(*deadline),
            _ => None,
        }
    }
}

/// Monitors agent `id` (its child and process group, whose id is its pid) until it is reaped,
/// then reports to `pool`.
pub(super) async fn run(
    pool: Pool,
    seq: u64,
    id: String,
    (mut child, group): (Child, ProcessGroup),
    mut commands: mpsc::UnboundedReceiver<AgentCommand>,
) {
    let settings = pool.settings().clone();
    let pid = group.id();
    let mut stdin = child.stdin.take();
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let patterns = (
        settings.ready_pattern.clone(),
        settings.assigned_pattern.clone(),
    );
    tokio::spawn(drain(
        child.stdout.take(),
        id.clone(),
        "stdout",
        patterns.clone(),
        events_tx.clone(),
    ));
    tokio::spawn(drain(
        child.stderr.take(),
        id.clone(),
        "stderr",
        patterns,
        events_tx,
    ));

    let mut phase = Phase::Starting {
        deadline: Instant::now() + settings.startup_timeout,
    };
    let mut sigkilled_by_us = false;
    let wait = child.wait();
    tokio::pin!(wait);
    let status = loop {
        let deadline = phase.deadline();
        tokio::select! {
            status = &mut wait => break status,
            Some(event) = events.recv() => {
                phase = match (event, phase) {
                    (Event::Ready, Phase::Starting { .. }) => {
                        info!(agent = %id, pid, "agent ready");
                        pool.agent_ready(seq);
                        Phase::Idle
                    }
                    (Event::Ready, Phase::Assigned) if settings.reusable => {
                        info!(agent = %id, pid, "session ended; agent idle again (reusable)");
                        pool.agent_ready(seq);
                        Phase::Idle
                    }
                    (Event::Assigned, Phase::Assigning { reply, .. }) => {
                        debug!(agent = %id, pid, "assignment confirmed");
                        let _ = reply.send(Ok(()));
                        Phase::Assigned
                    }
                    (_, phase) => phase,
                };
            }
            Some(command) = commands.recv() => {
                phase = match (command, phase) {
                    (AgentCommand::Assign { line, reply }, Phase::Idle) => {
                        match write_line(&mut stdin, &line, settings.assign_timeout).await {
                            Ok(()) if settings.assigned_pattern.is_none() => {
                                let _ = reply.send(Ok(()));
                                Phase::Assigned
                            }
                            Ok(()) => {
                                debug!(agent = %id, pid, "assignment written");
                                Phase::Assigning {
                                    deadline: Instant::now() + settings.assign_timeout,
                                    reply,
                                }
                            }
                            Err(err) => {
                                let reason = format!("cannot write the assignment: {err}");
                                let _ = reply.send(Err(reason.clone()));
                                kill(&pool, seq, pid, &id, &reason, &mut sigkilled_by_us);
                                Phase::Killed { reason, startup_failure: false }
                            }
                        }
                    }
                    (AgentCommand::Assign { reply, .. }, phase) => {
                        let _ = reply.send(Err("the agent is not idle".into()));
                        phase
                    }
                    (AgentCommand::Run { reply, .. }, phase) => {
                        let _ = reply.send(Err(crate::error::TaskError::Permanent(
                            "an agent takes assignments, not tasks".into(),
                        )));
                        phase
                    }
                    (AgentCommand::Abort { .. }, phase) => phase,
                    (AgentCommand::Stop { .. }, phase @ (Phase::Stopping { .. } | Phase::Killed { .. })) => phase,
                    (AgentCommand::Stop { reason, failed }, phase) => {
                        if let Phase::Assigning { reply, .. } = phase {
                            let _ = reply.send(Err(format!("stopped: {reason}")));
                        }
                        info!(agent = %id, pid, %reason, signal = %settings.stop_signal, "stopping agent");
                        process::signal_group(pid, settings.stop_signal);
                        pool.agent_draining(seq);
                        Phase::Stopping {
                            deadline: Instant::now() + settings.stop_timeout,
                            reason,
                            failed,
                        }
                    }
                };
            }
            () = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                phase = match phase {
                    Phase::Starting { .. } => {
                        let reason = format!(
                            "no ready_pattern within startup_timeout ({:?})",
                            settings.startup_timeout
                        );
                        // Still a start until reaped: no replacement starts meanwhile.
                        warn!(agent = %id, pid, %reason, "SIGKILL to the agent's process group");
                        process::signal_group(pid, Signal::SIGKILL);
                        sigkilled_by_us = true;
                        Phase::Killed { reason, startup_failure: true }
                    }
                    Phase::Assigning { reply, .. } => {
                        let reason = format!(
                            "no assigned_pattern within assign_timeout ({:?})",
                            settings.assign_timeout
                        );
                        let _ = reply.send(Err(reason.clone()));
                        kill(&pool, seq, pid, &id, &reason, &mut sigkilled_by_us);
                        Phase::Killed { reason, startup_failure: false }
                    }
                    Phase::Stopping { reason, failed, .. } => {
                        let reason = format!("{reason}; SIGKILL after stop_timeout ({:?})", settings.stop_timeout);
                        kill(&pool, seq, pid, &id, &reason, &mut sigkilled_by_us);
                        if failed {
                            Phase::Killed { reason, startup_failure: false }
                        } else {
                            Phase::Stopping { deadline: far_future(), reason, failed: false }
                        }
                    }
                    phase => phase,
                };
            }
        }
    };
    if matches!(phase, Phase::Assigning { .. }) {
        phase = leftovers(phase, &mut events).await;
    }
    // Grandchildren left in the group go with it; then it is unlisted from the watchdog.
    drop(group);
    let exit = describe(&status);
    let sigkilled = matches!(&status, Ok(s) if s.signal() == Some(Signal::SIGKILL as i32));
    let end = match phase {
        Phase::Starting { .. } => End {
            state: AgentState::Failed,
            reason: format!("exited before ready ({exit})"),
            startup_failure: true,
            sigkilled,
        },
        Phase::Idle => End {
            state: AgentState::Failed,
            reason: format!("exited while idle ({exit})"),
            startup_failure: false,
            sigkilled,
        },
        Phase::Assigning { reply, .. } => {
            let reason = format!("exited during the assignment ({exit})");
            let _ = reply.send(Err(reason.clone()));
            End {
                state: AgentState::Failed,
                reason,
                startup_failure: false,
                sigkilled,
            }
        }
        Phase::Assigned => End {
            state: AgentState::Exited,
            reason: format!("session ended ({exit})"),
            startup_failure: false,
            sigkilled,
        },
        Phase::Stopping { reason, failed, .. } => End {
            state: if failed {
                AgentState::Failed
            } else {
                AgentState::Exited
            },
            reason: format!("{reason} ({exit})"),
            startup_failure: false,
            sigkilled,
        },
        Phase::Killed {
            reason,
            startup_failure,
        } => End {
            state: AgentState::Failed,
            reason: format!("{reason} ({exit})"),
            startup_failure,
            sigkilled: sigkilled || sigkilled_by_us,
        },
    };
    pool.agent_ended(seq, end);
}

/// SIGKILL to the agent's group (it is reaped by the monitor's wait).
fn kill(pool: &Pool, seq: u64, pid: u32, id: &str, reason: &str, sigkilled: &mut bool) {
    warn!(agent = %id, pid, %reason, "SIGKILL to the agent's process group");
    process::signal_group(pid, Signal::SIGKILL);
    *sigkilled = true;
    pool.agent_draining(seq);
}

/// An agent that exits right after its `assigned_pattern` (a short session) is often reaped
/// before its drain task has read that line: what its pipes still hold decides. Taking the
/// exit for a failed assignment would retry the claim with another agent — the same
/// assignment served twice.
async fn leftovers(phase: Phase, events: &mut mpsc::UnboundedReceiver<Event>) -> Phase {
    let Phase::Assigning { deadline, reply } = phase else {
        return phase;
    };
    let until = Instant::now() + LEFTOVERS;
    loop {
        // `None`: both pipes are closed and read to their end.
        match timeout_at(until, events.recv()).await {
            Ok(Some(Event::Assigned)) => {
                let _ = reply.send(Ok(()));
                return Phase::Assigned;
            }
            Ok(Some(Event::Ready)) => {}
            Ok(None) | Err(_) => return Phase::Assigning { deadline, reply },
        }
    }
}

pub(super) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

async fn write_line(
    stdin: &mut Option<ChildStdin>,
    line: &str,
    limit: Duration,
) -> std::io::Result<()> {
    let Some(stdin) = stdin.as_mut() else {
        return Err(std::io::Error::other("stdin already closed"));
    };
    timeout(limit, async {
        stdin.write_all(line.as_bytes()).await?;
        stdin.flush().await
    })
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("stdin write timed out")))
}

pub(super) fn describe(status: &std::io::Result<ExitStatus>) -> String {
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit {code}"),
            (None, Some(sig)) => Signal::try_from(sig)
                .map(|s| format!("signal {s}"))
                .unwrap_or_else(|_| format!("signal {sig}")),
            _ => s.to_string(),
        },
        Err(err) => format!("wait failed: {err}"),
    }
}

/// Reads a pipe to its end: each line logged with the agent id and matched against the
/// patterns.
async fn drain(
    pipe: Option<impl AsyncRead + Unpin>,
    id: String,
    stream: &'static str,
    (ready, assigned): (Regex, Option<Regex>),
    events: mpsc::UnboundedSender<Event>,
) {
    let Some(pipe) = pipe else { return };
    let mut lines = Lines::new(pipe, LOG_LINE_BYTES);
    while let Ok(Some(line)) = lines.next_line().await {
        info!(agent = %id, stream, "{}", line.shown(LOG_LINE_BYTES).trim_end());
        let kept = line.kept();
        let text = kept.trim_end();
        if ready.is_match(text) {
            let _ = events.send(Event::Ready);
        }
        if assigned.as_ref().is_some_and(|p| p.is_match(text)) {
            let _ = events.send(Event::Assigned);
        }
    }
}
