//! The outcome writer: one task per broker that writes every outcome (and every attempt's
//! start) through `commit.lua`, many per call.
//!
//! - **At once when idle, coalesced under load.** The writer has at most [`IN_FLIGHT`] calls
//!   out. An outcome handed to it while it waits goes out at once, alone; outcomes handed to it
//!   while calls are out wait and then go out together in the next one (up to
//!   [`MAX_OUTCOMES`] and [`MAX_CALL_BYTES`]). A single task at 200/s pays no extra latency; a backlog drained
//!   by hundreds of task actors costs Redis one script call per batch instead of one per task.
//! - **Starts travel with their outcome.** [`TaskQueue::started`](crate::broker::TaskQueue::started)
//!   hands the writer an attempt's start (the record's start marker, the `started` event). When
//!   the attempt's outcome comes within [`EVENT_FLUSH`], the marker's fields go into the
//!   outcome's own record `HSET` and its event just before the outcome's: one command and no
//!   round trip for the start. A start whose outcome has not come after `EVENT_FLUSH` is
//!   written on its own (with the next call, or when the writer has been idle that long).
//!   Everything goes through this one writer in order, so a start is never written after its
//!   outcome.
//! - Each outcome is still all or nothing (see `commit.lua`); the answer of a call is split
//!   back to the outcomes' callers. A failed call (Redis unreachable, a script error) fails
//!   every outcome in it: each caller retries its own.

use std::collections::HashMap;
use std::sync::Arc;

use redis::cluster_routing::Slot;
use redis::{Cmd, Pipeline, Value};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use super::codec::text;
use super::connection::{Conn, Link};
use super::events::{Start, XADD_FIELDS_AT, start_write};
use super::{COMMIT, evalsha, groups};
use crate::broker::{BrokerError, EVENT_FLUSH};

/// Callers' outcomes one call of `commit.lua` gathers at most (starts written on their own
/// come on top): a bound on how long one call holds Redis (about 20 µs each).
pub(super) const MAX_OUTCOMES: usize = 512;

/// Bytes of arguments one call carries at most (results can be large): past it, the outcomes
/// waiting go in the next call. A single outcome larger than this still goes, alone.
pub(super) const MAX_CALL_BYTES: usize = 8 << 20;

/// Calls of `commit.lua` out at once: while Redis runs one, the next is on its way (on one
/// connection, so they run in the order sent).
const IN_FLIGHT: usize = 2;

/// One outcome: its commands, the record's `HSET` first (`commit.lua` uses it as the
/// outcome's check).
#[derive(Debug)]
pub(super) struct Write {
    /// The attempt (task id, attempt) whose start may be merged into it.
    pub(super) attempt: Option<(String, u32)>,
    /// Whether its first command is its record's `HSET` (a start merged into it adds its
    /// marker fields there); else the start brings only its event.
    pub(super) record: bool,
    pub(super) pipe: Pipeline,
}

/// What the writer is handed.
#[derive(Debug)]
pub(super) enum Job {
    /// An attempt's start (best effort: a failure is logged).
    Start(Box<Start>),
    /// Outcomes of one caller, answered with one value per outcome (`1`: written; else the
    /// error, nothing of it written), or the error of the whole call.
    Commit { writes: Vec<Write>, reply: Reply },
}

/// The writer's end of the channel and what it writes with.
pub(super) struct Writer {
    pub(super) jobs: mpsc::UnboundedReceiver<Job>,
    pub(super) conn: Conn,
    pub(super) link: Arc<Link>,
    pub(super) sha: String,
    /// On a Redis Cluster: one call per slot.
    pub(super) cluster: bool,
    /// The events stream's `MAXLEN ~` (0: events off).
    pub(super) maxlen: usize,
}

/// A start waiting for its outcome.
struct Waiting {
    start: Box<Start>,
    since: Instant,
}

impl Writer {
    /// Runs until every sender is gone (the broker was dropped), then writes the starts left.
    pub(super) async fn run(mut self) {
        let mut starts: Vec<Waiting> = Vec::new();
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
        loop {
            let mut commits = Vec::new();
            let (mut flush, mut closed) = (false, false);
            // Wait for work; with starts waiting, no longer than the oldest may wait.
            let first = match starts.first() {
                None => self.jobs.recv().await,
                Some(oldest) => {
                    let due = oldest.since + EVENT_FLUSH;
                    tokio::time::timeout_at(due, self.jobs.recv())
                        .await
                        .unwrap_or_else(|_| {
                            flush = true;
                            None
                        })
                }
            };
            let (mut outcomes, mut bytes) = (0, 0);
            match first {
                Some(job) => take(job, &mut starts, &mut commits, &mut outcomes, &mut bytes),
                None => closed = !flush,
            }
            while outcomes < MAX_OUTCOMES && bytes < MAX_CALL_BYTES {
                match self.jobs.try_recv() {
                    Ok(job) => take(job, &mut starts, &mut commits, &mut outcomes, &mut bytes),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            // With IN_FLIGHT calls out, wait for one to finish (more outcomes gather
            // meanwhile for the call after).
            let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
                return;
            };
            if let Some(call) = self.prepare(&mut starts, commits, flush || closed) {
                let (conn, link) = (self.conn.clone(), Arc::clone(&self.link));
                tokio::spawn(async move {
                    call.send(conn, &link).await;
                    drop(permit);
                });
            }
            if closed {
                return;
            }
        }
    }

    /// One call of `commit.lua`: the outcomes of `commits` (each with its attempt's start
    /// merged in when it waits here), then the starts that waited `EVENT_FLUSH` (all of them
    /// when `flush`); the others keep waiting. `None` when there is nothing to write.
    fn prepare(
        &self,
        starts: &mut Vec<Waiting>,
        commits: Vec<Commit>,
        flush: bool,
    ) -> Option<Call> {
        // The start each outcome takes along, as its writes (the marker `HSET`, the event).
        let mut merged = vec![false; starts.len()];
        let markers: Vec<Option<Pipeline>> = {
            let waiting: HashMap<&str, usize> = starts
                .iter()
                .enumerate()
                .map(|(n, w)| (w.start.id(), n))
                .collect();
            commits
                .iter()
                .flat_map(|(writes, _)| writes)
                .map(|write| {
                    let (id, attempt) = write.attempt.as_ref()?;
                    let n = *waiting.get(id.as_str())?;
                    let start = &starts[n].start;
                    if merged[n] || start.attempt != *attempt {
                        return None;
                    }
                    merged[n] = true;
                    Some(start_write(start, self.maxlen, true))
                })
                .collect()
        };
        let now = Instant::now();
        let mut own = Vec::new();
        let mut kept = Vec::new();
        for (w, merged) in std::mem::take(starts).into_iter().zip(merged) {
            if merged {
                continue;
            }
            if flush || now.duration_since(w.since) >= EVENT_FLUSH {
                own.push(start_write(&w.start, self.maxlen, false));
            } else {
                kept.push(w);
            }
        }
        *starts = kept;
        let cluster = self.cluster;
        let outcomes: Vec<Outcome<'_>> = commits
            .iter()
            .flat_map(|(writes, _)| writes)
            .zip(&markers)
            .map(|(write, marker)| {
                let mut marks = marker.iter().flat_map(Pipeline::cmd_iter);
                let (hset, event) = (marks.next(), marks.next());
                Outcome {
                    pipe: &write.pipe,
                    // Without a record, the start brings only its event.
                    marker: hset.filter(|_| write.record),
                    event,
                }
            })
            .chain(own.iter().map(|pipe| Outcome {
                pipe,
                marker: None,
                event: None,
            }))
            .collect();
        if outcomes.is_empty() {
            return None;
        }
        // One call per slot on a cluster (each outcome's keys are in its queue's slot).
        let slots = groups(outcomes.iter().map(|outcome| {
            let first = outcome
                .pipe
                .cmd_iter()
                .next()
                .and_then(|c| simple(c).nth(1));
            first.filter(|_| cluster).map(Slot::for_key)
        }));
        let invocations = slots
            .into_iter()
            .map(|members| {
                let mine: Vec<&Outcome<'_>> = members.iter().map(|&n| &outcomes[n]).collect();
                (invocation(&self.sha, &mine), members)
            })
            .collect();
        let count = outcomes.len();
        drop(outcomes);
        let replies = commits
            .into_iter()
            .map(|(writes, reply)| (writes.len(), reply))
            .collect();
        Some(Call {
            invocations,
            count,
            replies,
        })
    }
}

/// One outcome of a call: its writes (`pipe`), and the start merged into it (the marker
/// `HSET`, whose fields go into the outcome's first command — its record's `HSET` —, and the
/// `started` event, which joins the outcome's own event `XADD` as its first field: one stream
/// entry, two events).
struct Outcome<'a> {
    pipe: &'a Pipeline,
    marker: Option<&'a Cmd>,
    event: Option<&'a Cmd>,
}

impl<'a> Outcome<'a> {
    /// Its commands in `commit.lua`'s order, each with what the merged start adds to it.
    fn pieces(&self) -> Vec<Piece<'a>> {
        let mut cmds = self.pipe.cmd_iter();
        let mut pieces = Vec::with_capacity(6);
        if let Some(first) = cmds.next() {
            // The record `HSET`: the marker's fields after its key (its own, later, win).
            let extra = self.marker.map(|marker| (2, marker, 2));
            pieces.push(Piece { cmd: first, extra });
        }
        // The outcome's event: an `XADD` to the stream the start's event goes to.
        let joined = self.event.and_then(|event| {
            let stream = simple(event).nth(1);
            self.pipe.cmd_iter().skip(1).position(|cmd| {
                let mut args = simple(cmd);
                args.next() == Some(b"XADD".as_slice()) && args.next() == stream
            })
        });
        if let (Some(event), None) = (self.event, joined) {
            pieces.push(Piece {
                cmd: event,
                extra: None,
            });
        }
        for (n, cmd) in cmds.enumerate() {
            // The start's `<kind> <rest>` just after the `*` of both `XADD`s.
            let extra = self
                .event
                .filter(|_| joined == Some(n))
                .map(|event| (XADD_FIELDS_AT, event, XADD_FIELDS_AT));
            pieces.push(Piece { cmd, extra });
        }
        pieces
    }
}

/// A command of an outcome as sent: `cmd` with, when `extra` is `(at, from, skip)`, the
/// arguments of `from` after its first `skip` inserted before `cmd`'s argument `at`.
struct Piece<'a> {
    cmd: &'a Cmd,
    extra: Option<(usize, &'a Cmd, usize)>,
}

impl<'a> Piece<'a> {
    fn args(&self) -> impl Iterator<Item = &'a [u8]> + use<'a> {
        let (at, from, skip) = match self.extra {
            Some((at, from, skip)) => (at, Some(from), skip),
            None => (usize::MAX, None, 0),
        };
        let inserted = from
            .into_iter()
            .flat_map(move |from| simple(from).skip(skip));
        let cmd = simple(self.cmd);
        cmd.clone().take(at).chain(inserted).chain(cmd.skip(at))
    }

    fn len(&self) -> usize {
        let extra = self
            .extra
            .map_or(0, |(_, from, skip)| simple(from).len().saturating_sub(skip));
        simple(self.cmd).len() + extra
    }
}

/// Takes a job handed to the writer: a start waits; outcomes join the call being gathered
/// (counted in `outcomes`, their arguments' size in `bytes`).
fn take(
    job: Job,
    starts: &mut Vec<Waiting>,
    commits: &mut Vec<Commit>,
    outcomes: &mut usize,
    bytes: &mut usize,
) {
    match job {
        Job::Start(start) => starts.push(Waiting {
            start,
            since: Instant::now(),
        }),
        Job::Commit { writes, reply } => {
            *outcomes += writes.len();
            *bytes += writes
                .iter()
                .flat_map(|write| write.pipe.cmd_iter())
                .flat_map(simple)
                .map(<[u8]>::len)
                .sum::<usize>();
            commits.push((writes, reply));
        }
    }
}

/// The `commit.lua` calls of one batch (one per slot on a cluster, else one), and where their
/// answers go.
struct Call {
    /// Each call and the positions of its outcomes in the batch.
    invocations: Vec<(Cmd, Vec<usize>)>,
    /// Outcomes in it.
    count: usize,
    /// Each caller's number of outcomes and its reply, in the order of the outcomes (the
    /// starts written on their own come after them).
    replies: Vec<(usize, Reply)>,
}

impl Call {
    /// Sends the calls and hands each caller its answers.
    async fn send(self, conn: Conn, link: &Link) {
        let calls = self.invocations.iter().map(|(invocation, members)| {
            let mut conn = conn.clone();
            async move {
                let answers: Result<Vec<Value>, BrokerError> =
                    link.observe(evalsha(&mut conn, invocation, COMMIT).await);
                answers.and_then(|answers| {
                    if answers.len() == members.len() {
                        Ok(answers)
                    } else {
                        Err(BrokerError::Command(format!(
                            "commit.lua answered {} values for {} outcomes",
                            answers.len(),
                            members.len()
                        )))
                    }
                })
            }
        });
        let results = futures_util::future::join_all(calls).await;
        // Each outcome's answer, or the index of its call's error in `errors`.
        let mut answers: Vec<Result<Value, usize>> = vec![Ok(Value::Nil); self.count];
        let mut errors = Vec::new();
        for ((_, members), result) in self.invocations.into_iter().zip(results) {
            match result {
                Ok(values) => {
                    for (n, value) in members.into_iter().zip(values) {
                        answers[n] = Ok(value);
                    }
                }
                Err(err) => {
                    for n in members {
                        answers[n] = Err(errors.len());
                    }
                    errors.push(err);
                }
            }
        }
        let mut answers = answers.into_iter();
        for (count, reply) in self.replies {
            let mine: Vec<Result<Value, usize>> = answers.by_ref().take(count).collect();
            let answer = match mine.iter().find_map(|a| a.as_ref().err()) {
                Some(&err) => Err(clone_error(&errors[err])),
                None => Ok(mine.into_iter().filter_map(Result::ok).collect()),
            };
            let _ = reply.send(answer);
        }
        // What is left are the starts written on their own.
        let failed: Vec<String> = answers
            .filter(|answer| !matches!(answer, Ok(Value::Int(1))))
            .map(|answer| match answer {
                Ok(value) => text(&value),
                Err(err) => errors[err].to_string(),
            })
            .collect();
        if let Some(first) = failed.first() {
            tracing::warn!(error = %first, starts = failed.len(), "starts of tasks (records, events) not written");
        }
    }
}

/// The `EVALSHA` of `outcomes` (each its commands, and the marker of a start merged into it),
/// built in place: the keys first (borrowed, sorted, deduplicated), then each outcome in
/// `commit.lua`'s format — every byte copied once into the command.
fn invocation(sha: &str, outcomes: &[&Outcome<'_>]) -> Cmd {
    let pieces: Vec<Vec<Piece<'_>>> = outcomes.iter().map(|outcome| outcome.pieces()).collect();
    let mut keys: Vec<&[u8]> = Vec::new();
    let (mut args, mut bytes) = (0, 0);
    for piece in pieces.iter().flatten() {
        for (n, arg) in piece.args().enumerate() {
            if n == 1 {
                keys.push(arg);
            }
            args += 1;
            bytes += arg.len();
        }
        args += 1;
        bytes += 4;
    }
    args += pieces.len();
    bytes += 4 * pieces.len();
    keys.sort_unstable();
    keys.dedup();
    let size = bytes + keys.iter().map(|key| key.len()).sum::<usize>() + 64;
    let mut invocation = Cmd::with_capacity(args + keys.len() + 3, size);
    invocation
        .arg("EVALSHA")
        .arg(sha)
        .arg(keys.len())
        .arg(&keys);
    for outcome in &pieces {
        invocation.arg(outcome.len());
        for piece in outcome {
            invocation.arg(piece.len());
            for arg in piece.args() {
                invocation.arg(arg);
            }
        }
    }
    invocation
}

/// Where a caller's answers go: one value per outcome, or the error of the whole call.
pub(super) type Reply = oneshot::Sender<Result<Vec<Value>, BrokerError>>;

/// A caller's outcomes and where their answers go.
type Commit = (Vec<Write>, Reply);

/// The arguments of a command built here (every one is simple: no cursor command is built).
fn simple(cmd: &Cmd) -> impl Clone + ExactSizeIterator<Item = &[u8]> {
    cmd.args_iter().map(|arg| match arg {
        redis::Arg::Simple(bytes) => bytes,
        _ => &[],
    })
}

/// A copy of `err` for each outcome of a failed call.
fn clone_error(err: &BrokerError) -> BrokerError {
    match err {
        BrokerError::Unreachable { url, reason } => BrokerError::Unreachable {
            url: url.clone(),
            reason: reason.clone(),
        },
        other => BrokerError::Command(other.to_string()),
    }
}
