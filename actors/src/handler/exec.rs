//! `exec` handler: run a command (never through a shell) in its own process group, the
//! envelope as JSON on stdin, the result as the last non-empty stdout line (JSON, else a
//! string).
//!
//! | exit | outcome |
//! |---|---|
//! | 0 | success |
//! | 0, but the result line is longer than `max_result_bytes` | permanent, naming the cap |
//! | 75 (`EX_TEMPFAIL`) | retryable |
//! | killed after the soft limit's SIGTERM | cancelled (retryable) |
//! | killed by another signal | retryable |
//! | any other code | permanent, with the last stderr line |
//!
//! **Environment.** The child gets only its handler's environment (built by
//! [`crate::child::environment`] from `env` and `pass_env`; `PATH` alone by default) plus
//! `RT_TASK_ID`, `RT_TASK` and `RT_QUEUE` of the attempt — never the runtime's own variables.
//!
//! **Output.** stdout and stderr are drained for the whole life of the process (a full pipe
//! would block it) and logged with the task id, each line cut at
//! [`LOG_LINE_BYTES`] with a marker. Of stdout only the
//! last non-empty line is kept, up to `max_result_bytes` (the broker's `max_entry_bytes`); of
//! stderr the last non-empty line, up to `LOG_LINE_BYTES`, for the error. Whatever the child
//! prints, an attempt holds at most twice each cap.
//!
//! **Limits.** At the soft limit the group gets SIGTERM; when the attempt is dropped (hard
//! limit, shutdown) the group gets SIGKILL and the child is reaped; after a normal exit the
//! group is SIGKILLed too (grandchildren left in it). The group is listed with the
//! [`watchdog`](crate::child::watchdog) while it runs, so it dies with the node. Task payloads
//! go to stdin only — never to argv.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;

use nix::sys::signal::Signal;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::{Child, Command};
use tracing::{Instrument, debug, info};

use super::{Attempt, ErrorClass, Handler, TaskContext, TaskError};
use crate::broker::DEFAULT_MAX_ENTRY_BYTES;
use crate::child::lines::{LOG_LINE_BYTES, Line, Lines};
use crate::child::{self, ProcessGroup};

/// Runs one command per attempt.
#[derive(Clone)]
pub struct ExecHandler {
    command: String,
    args: Vec<String>,
    cwd: Option<PathBuf>,
    env: Arc<BTreeMap<String, String>>,
    max_result_bytes: usize,
}

impl ExecHandler {
    /// A handler running `command args…` in `cwd`, with only `PATH` in its environment (see
    /// [`ExecHandler::with_env`]) and results up to the broker's default `max_entry_bytes`.
    pub fn new(command: &str, args: &[String], cwd: Option<PathBuf>) -> Self {
        Self {
            command: command.to_string(),
            args: args.to_vec(),
            cwd,
            env: Arc::new(child::environment([], &[])),
            max_result_bytes: DEFAULT_MAX_ENTRY_BYTES,
        }
    }

    /// The child's whole environment (e.g. from [`child::environment`]); `RT_TASK_ID`,
    /// `RT_TASK` and `RT_QUEUE` are added to it for each attempt.
    pub fn with_env(mut self, env: BTreeMap<String, String>) -> Self {
        self.env = Arc::new(env);
        self
    }

    /// The longest result line kept (the broker's `max_entry_bytes`): a longer one fails the
    /// attempt permanently.
    pub fn with_max_result_bytes(mut self, bytes: usize) -> Self {
        self.max_result_bytes = bytes;
        self
    }
}

/// The environment's names only: its values may be secrets (`pass_env`, the egress token).
impl fmt::Debug for ExecHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecHandler")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("cwd", &self.cwd)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("max_result_bytes", &self.max_result_bytes)
            .finish()
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
    group: ProcessGroup,
}

impl Drop for Group {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        self.group.signal(Signal::SIGKILL);
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
            .stderr(Stdio::piped());
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd);
        }
        let envelope = &ctx.envelope;
        let own = [
            ("RT_TASK_ID", envelope.id.as_str()),
            ("RT_TASK", envelope.task.as_str()),
            ("RT_QUEUE", envelope.queue.as_str()),
        ];
        let (mut child, group) = child::spawn(&mut command, &self.env, &own)
            .map_err(|err| TaskError::Permanent(format!("cannot run {}: {err}", self.command)))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut group = Group {
            child: Some(child),
            group,
        };

        // The drains log in the task's span (task id, name, queue, attempt, trace id).
        let out_task =
            tokio::spawn(drain(stdout, "stdout", self.max_result_bytes).in_current_span());
        let err_task = tokio::spawn(drain(stderr, "stderr", LOG_LINE_BYTES).in_current_span());
        if let Some(mut stdin) = stdin {
            let payload = ctx.envelope.to_json();
            // Written beside the wait: a child that reads nothing while its stdin pipe is
            // full must not hold up the soft limit. One that does not read stdin closes it:
            // that is not an error.
            tokio::spawn(async move {
                let _ = stdin.write_all(payload.as_bytes()).await;
                let _ = stdin.write_all(b"\n").await;
            });
        }

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
                        group.group.signal(Signal::SIGTERM);
                    }
                }
            }
        };
        // Exited and reaped: nothing left for Drop to kill (its group may still hold
        // grandchildren, which the SIGKILL below takes down).
        group.child = None;
        drop(group);
        let status = status.map_err(|err| {
            TaskError::retry_as(
                ErrorClass::Crashed,
                format!("waiting for {}: {err}", self.command),
            )
        })?;
        let last_out = out_task.await.ok().flatten();
        let last_err = err_task.await.ok().flatten();

        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(0), _) => match last_out {
                None => Ok(Value::Null),
                Some(line) => match line.whole() {
                    Some(text) => Ok(serde_json::from_str(&text)
                        .unwrap_or_else(|_| Value::String(text.into_owned()))),
                    None => Err(TaskError::Permanent(format!(
                        "{}: result line of {} bytes, over the broker's max_entry_bytes of {}",
                        self.command,
                        line.len(),
                        self.max_result_bytes
                    ))),
                },
            },
            (Some(75), _) => Err(TaskError::retry_as(
                ErrorClass::ExitCode,
                format!(
                    "{} exited 75 (EX_TEMPFAIL){}",
                    self.command,
                    suffix(&last_err)
                ),
            )),
            (Some(code), _) => Err(TaskError::Permanent(format!(
                "{} exited {code}{}",
                self.command,
                suffix(&last_err)
            ))),
            (None, Some(signal)) if softened => Err(TaskError::Cancelled(format!(
                "soft time limit: {} ended by signal {signal}",
                self.command
            ))),
            (None, signal) => Err(TaskError::retry_as(
                ErrorClass::Signal,
                format!(
                    "{} killed by signal {}",
                    self.command,
                    signal.unwrap_or_default()
                ),
            )),
        }
    }
}

fn suffix(line: &Option<Line>) -> String {
    line.as_ref()
        .map(|l| format!(": {}", l.shown(LOG_LINE_BYTES)))
        .unwrap_or_default()
}

/// Reads a pipe to its end, logging each line (in the caller's span, cut at
/// [`LOG_LINE_BYTES`]); returns the last non-empty line, of which at most `keep` bytes are
/// kept.
async fn drain(
    pipe: Option<impl AsyncRead + Unpin>,
    stream: &'static str,
    keep: usize,
) -> Option<Line> {
    let mut lines = Lines::new(pipe?, keep);
    let mut last = None;
    while let Ok(Some(line)) = lines.next_line().await {
        let shown = line.shown(LOG_LINE_BYTES);
        if stream == "stderr" {
            info!(stream, "{shown}");
        } else {
            debug!(stream, "{shown}");
        }
        if !line.is_blank() {
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
    async fn the_child_gets_only_its_environment_and_the_attempts_variables() {
        // Every variable on one line (the result), sorted.
        let handler = script("env | sort | tr '\\n' ' '").with_env(child::environment(
            [("GREETING", "merhaba")],
            &["HOME".to_string()],
        ));
        let text = handler.call(ctx(Duration::from_secs(10))).await.unwrap();
        let text = text.as_str().unwrap();
        let names: Vec<&str> = text
            .split_whitespace()
            .filter_map(|pair| pair.split_once('=').map(|(name, _)| name))
            .filter(|name| *name != "PWD") // the shell's own
            .collect();
        let mut expected = vec!["GREETING", "PATH", "RT_QUEUE", "RT_TASK", "RT_TASK_ID"];
        if std::env::var("HOME").is_ok() {
            expected.insert(1, "HOME");
        }
        assert_eq!(names, expected, "{text}");
        assert!(text.contains("GREETING=merhaba") && text.contains("RT_TASK_ID=task-1"));
        assert!(text.contains("RT_QUEUE=background RT_TASK=process_incoming_media_task"));
    }

    #[test]
    fn debug_shows_the_environments_names_not_its_values() {
        let handler = script("true").with_env(child::environment([("API_KEY", "sk-secret")], &[]));
        let text = format!("{handler:?}");
        assert!(
            text.contains("API_KEY") && !text.contains("sk-secret"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_result_line_over_the_cap_fails_permanently_and_output_is_not_kept() {
        let err = script("head -c 100000 /dev/zero | tr '\\0' x; echo")
            .with_max_result_bytes(1024)
            .call(ctx(Duration::from_secs(10)))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            TaskError::Permanent(
                "/bin/sh: result line of 100000 bytes, over the broker's max_entry_bytes of 1024"
                    .into()
            )
        );
        // A long log line before the result, a long stderr line: the result is intact.
        let ok = script(
            "head -c 100000 /dev/zero | tr '\\0' x; echo; head -c 100000 /dev/zero | tr '\\0' y >&2; echo '[1, 2]'",
        )
        .with_max_result_bytes(1024)
        .call(ctx(Duration::from_secs(10)))
        .await
        .unwrap();
        assert_eq!(ok, json!([1, 2]));
        // The last stderr line in the error is cut with a marker.
        let err = script("head -c 100000 /dev/zero | tr '\\0' z >&2; exit 4")
            .call(ctx(Duration::from_secs(10)))
            .await
            .unwrap_err();
        let TaskError::Permanent(message) = err else {
            panic!("{err:?}")
        };
        assert!(message.starts_with("/bin/sh exited 4: zzz"), "{message}");
        assert!(message.ends_with("… [truncated: 100000 bytes in all]"));
        assert!(message.len() < LOG_LINE_BYTES + 100);
    }

    #[tokio::test]
    async fn a_child_that_never_reads_a_large_envelope_still_gets_its_soft_limit() {
        let mut context = ctx(Duration::from_secs(10));
        let mut envelope = (*context.envelope).clone();
        envelope.args = vec![json!("x".repeat(1024 * 1024))];
        context.envelope = Arc::new(envelope);
        let token = context.soft.clone();
        let attempt = script("sleep 30").call(context);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            token.cancel();
        });
        let started = Instant::now();
        let err = attempt.await.unwrap_err();
        assert!(matches!(err, TaskError::Cancelled(_)), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
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
