//! `exec` handler: run a command (never through a shell) in its own process group, the
//! envelope as JSON on stdin, the result as the last stdout line (JSON, else a string).
//!
//! | exit | outcome |
//! |---|---|
//! | 0 | success |
//! | 75 (`EX_TEMPFAIL`) | retryable |
//! | killed after the soft limit's SIGTERM | cancelled (retryable) |
//! | killed by another signal | retryable |
//! | any other code | permanent, with the last stderr line |
//!
//! stdout and stderr are drained for the whole life of the process (a full pipe would block
//! it) and logged with the task id. At the soft limit the group gets SIGTERM; when the
//! attempt is dropped (hard limit, shutdown) the group gets SIGKILL and the child is reaped.
//! Task payloads go to stdin only — never to argv.

use std::path::PathBuf;
use std::process::Stdio;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{debug, info};

use super::{Attempt, Handler, TaskContext, TaskError};

/// Runs one command per attempt.
#[derive(Debug, Clone)]
pub struct ExecHandler {
    command: String,
    args: Vec<String>,
    cwd: Option<PathBuf>,
}

impl ExecHandler {
    /// A handler running `command args…` in `cwd`.
    pub fn new(command: &str, args: &[String], cwd: Option<PathBuf>) -> Self {
        Self {
            command: command.to_string(),
            args: args.to_vec(),
            cwd,
        }
    }
}

impl Handler for ExecHandler {
    fn call(&self, ctx: TaskContext) -> Attempt {
        let this = self.clone();
        Box::pin(async move { this.run(ctx).await })
    }

    fn kind(&self) -> &'static str {
        "exec"
    }
}

/// Kills the process group and reaps the child when the attempt ends early.
struct Group {
    child: Option<Child>,
    pgid: Option<Pid>,
}

impl Group {
    fn signal(&self, signal: Signal) {
        if let Some(pgid) = self.pgid {
            let _ = killpg(pgid, signal);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        self.signal(Signal::SIGKILL);
        let _ = child.start_kill();
        // Reap it so no zombie is left; without a runtime tokio's orphan queue does it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = child.wait().await;
            });
        }
    }
}

impl ExecHandler {
    async fn run(self, ctx: TaskContext) -> Result<Value, TaskError> {
        let task_id = ctx.envelope.id.clone();
        let mut command = Command::new(&self.command);
        command
            .args(&self.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .spawn()
            .map_err(|err| TaskError::Permanent(format!("cannot run {}: {err}", self.command)))?;
        let pgid = child.id().map(|pid| Pid::from_raw(pid as i32));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut group = Group {
            child: Some(child),
            pgid,
        };

        if let Some(mut stdin) = stdin {
            let payload = ctx.envelope.to_json();
            // A command that does not read stdin closes it: that is not an error.
            let _ = stdin.write_all(payload.as_bytes()).await;
            let _ = stdin.write_all(b"\n").await;
        }
        let out_task = tokio::spawn(drain(stdout, task_id.clone(), "stdout"));
        let err_task = tokio::spawn(drain(stderr, task_id.clone(), "stderr"));

        let mut softened = false;
        let status = {
            let Some(child) = group.child.as_mut() else {
                return Err(TaskError::Permanent("child vanished".into()));
            };
            let wait = child.wait();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    status = &mut wait => break status,
                    () = ctx.soft.cancelled(), if !softened => {
                        softened = true;
                        info!(task_id = %task_id, "soft time limit: SIGTERM to the process group");
                        group_signal(pgid, Signal::SIGTERM);
                    }
                }
            }
        };
        // Exited and reaped: nothing left for Drop to kill (its group may still hold
        // grandchildren, which the SIGKILL below takes down).
        group.child = None;
        group_signal(pgid, Signal::SIGKILL);
        let status = status
            .map_err(|err| TaskError::retry(format!("waiting for {}: {err}", self.command)))?;
        let last_out = out_task.await.ok().flatten();
        let last_err = err_task.await.ok().flatten();

        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(0), _) => Ok(last_out.map_or(Value::Null, |line| {
                serde_json::from_str(&line).unwrap_or(Value::String(line))
            })),
            (Some(75), _) => Err(TaskError::retry(format!(
                "{} exited 75 (EX_TEMPFAIL){}",
                self.command,
                suffix(&last_err)
            ))),
            (Some(code), _) => Err(TaskError::Permanent(format!(
                "{} exited {code}{}",
                self.command,
                suffix(&last_err)
            ))),
            (None, Some(signal)) if softened => Err(TaskError::Cancelled(format!(
                "soft time limit: {} ended by signal {signal}",
                self.command
            ))),
            (None, signal) => Err(TaskError::retry(format!(
                "{} killed by signal {}",
                self.command,
                signal.unwrap_or_default()
            ))),
        }
    }
}

fn group_signal(pgid: Option<Pid>, signal: Signal) {
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, signal);
    }
}

fn suffix(line: &Option<String>) -> String {
    line.as_ref().map(|l| format!(": {l}")).unwrap_or_default()
}

/// Reads a pipe to its end, logging each line with the task id; returns the last non-empty
/// line.
async fn drain(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    task_id: String,
    stream: &'static str,
) -> Option<String> {
    let mut lines = BufReader::new(pipe?).lines();
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if stream == "stderr" {
            info!(task_id = %task_id, stream, "{line}");
        } else {
            debug!(task_id = %task_id, stream, "{line}");
        }
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    last
}
