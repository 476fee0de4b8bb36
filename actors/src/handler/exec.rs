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
use tracing::{Instrument, debug, info};

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
        // The drains log in the task's span (task id, name, queue, attempt, trace id).
        let out_task = tokio::spawn(drain(stdout, "stdout").in_current_span());
        let err_task = tokio::spawn(drain(stderr, "stderr").in_current_span());

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
                        info!("soft time limit: SIGTERM to the process group");
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

/// Reads a pipe to its end, logging each line (in the caller's span); returns the last
/// non-empty line.
async fn drain(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    stream: &'static str,
) -> Option<String> {
    let mut lines = BufReader::new(pipe?).lines();
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if stream == "stderr" {
            info!(stream, "{line}");
        } else {
            debug!(stream, "{line}");
        }
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    last
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::broker::Envelope;

    fn script(body: &str) -> ExecHandler {
        ExecHandler::new("/bin/sh", &["-c".to_string(), body.to_string()], None)
    }

    fn ctx(hard: Duration) -> TaskContext {
        let mut envelope = Envelope::new("process_incoming_media_task", "background");
        envelope.id = "task-1".into();
        envelope.args = vec![json!("s3://bucket/photo.jpg")];
        TaskContext {
            envelope: Arc::new(envelope),
            soft: CancellationToken::new(),
            soft_deadline: None,
            deadline: Instant::now() + hard,
        }
    }

    /// State letter of a process, `None` once it is gone (reaped).
    fn proc_state(pid: u32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(") ")
            .and_then(|(_, rest)| rest.chars().next())
    }

    async fn gone(pid: u32) -> bool {
        for _ in 0..200 {
            if proc_state(pid).is_none() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn envelope_on_stdin_result_from_the_last_stdout_line() {
        let handler = script(
            r#"read envelope; echo "working"; echo "$envelope" | grep -q 'photo.jpg' && echo '{"thumbnails": 3}'"#,
        );
        let result = handler.call(ctx(Duration::from_secs(10))).await.unwrap();
        assert_eq!(result, json!({"thumbnails": 3}));
        let text = script("echo plain text")
            .call(ctx(Duration::from_secs(10)))
            .await
            .unwrap();
        assert_eq!(text, json!("plain text"));
    }

    #[tokio::test]
    async fn exit_codes_are_classified() {
        let err = script("exit 75")
            .call(ctx(Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(matches!(err, TaskError::Retry { .. }), "{err:?}");
        let err = script("echo 'bad input: no such media' >&2; exit 3")
            .call(ctx(Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            TaskError::Permanent("/bin/sh exited 3: bad input: no such media".into())
        );
        let err = ExecHandler::new("/nonexistent/worker", &[], None)
            .call(ctx(Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TaskError::Permanent(ref m) if m.starts_with("cannot run /nonexistent/worker")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn soft_limit_sends_sigterm_to_the_group() {
        let context = ctx(Duration::from_secs(10));
        let token = context.soft.clone();
        let attempt = script("sleep 30").call(context);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            token.cancel();
        });
        let started = Instant::now();
        let err = attempt.await.unwrap_err();
        assert!(matches!(err, TaskError::Cancelled(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn dropping_the_attempt_kills_the_whole_group_and_reaps_it() {
        // A worker that ignores SIGTERM and has a grandchild in its group.
        let dir = std::env::temp_dir().join(format!("rt-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pids = dir.join("pids");
        let body = format!(
            "trap '' TERM; sleep 30 & echo $$ $! > {}; wait",
            pids.display()
        );
        let context = ctx(Duration::from_secs(10));
        let token = context.soft.clone();
        let attempt = script(&body).call(context);
        let hard = tokio::time::timeout(Duration::from_millis(500), async {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                token.cancel(); // SIGTERM: ignored by the shell
            });
            attempt.await
        })
        .await;
        assert!(
            hard.is_err(),
            "the attempt should still run at the hard limit"
        );
        let text = std::fs::read_to_string(&pids).unwrap();
        let ids: Vec<u32> = text
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        for pid in ids {
            assert!(
                gone(pid).await,
                "process {pid} left behind (state {:?})",
                proc_state(pid)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
