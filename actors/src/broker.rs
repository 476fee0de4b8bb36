//! The broker contract (docs/architecture.md): at-least-once delivery with leases.
//!
//! Two implementations keep the same semantics and pass one contract suite
//! (`broker/contract.rs`): [`memory::MemoryBroker`] (`memory://`, single node, fast tests) and
//! the Redis Streams broker. [`AnyBroker`] picks one at run time.
//!
//! The contract comes in four traits, by concern: [`TaskQueue`] (enqueue, reserve, leases,
//! outcomes, recovery), [`Records`] (task records, the events stream, revocations),
//! [`Coordination`] (beat leadership, schedules' last runs, node presence) and [`Admin`]
//! (depth, dead letters, purge). [`Broker`] is all four, for generic code; a caller on a
//! concrete broker imports the traits whose methods it calls. What each outcome writes (the
//! entry's next place, the record's change, the event) is decided once, in `outcome.rs`, and
//! applied by both backends.
//!
//! The life of an entry:
//!
//! ```text
//! enqueue ──(eta in the future)──> delayed ──promote_due──┐
//!    │                                                    v
//!    └───────────────────────────────────────────────> ready ──reserve──> in flight (leased)
//!   in flight ──ack──> done (result recorded)                               │   ^ renew
//!   in flight ──retry──> delayed (attempt + 1)                              │
//!   in flight ──dead_letter──> dead ──requeue_dead(_entry)──> ready         │
//!   dead ──delete_dead / purge_dead──> gone (the task's record stays)       │
//!   in flight, lease expired ──recover──> ready (deliveries + 1) or dead (poison cap)
//! ```
//!
//! A node leaving cleanly hands back what it reserved but did not start (`hand_back`): the
//! entries are ready again at once, nobody waits for their lease to expire.
//!
//! Beside the queues, the broker keeps what several nodes must agree on: the beat leader lease
//! (`claim_leadership`, `resign_leadership`), each schedule's last run (`last_runs`,
//! `record_run`) and the nodes' presence records (`announce_node`, `nodes`, `forget_node`).
//!
//! Malformed entries met by `reserve` (not JSON, missing fields, an `id` that breaks
//! [`check_id`]) are moved to the dead letters with the parse error; they never reach a
//! consumer, never block the queue, never panic.
//!
//! Records: every task has one ([`TaskRecord`], kept as a `StoredRecord`), written in the
//! round trips the task's life already makes — at enqueue (`queued` or `scheduled`, in the
//! same step as the entry), at the start of an attempt (a start marker that rides with the
//! next outcome or the [`EVENT_FLUSH`] like the `started` event: `running`), and by every
//! outcome. It has no expiry while the task's entry exists (ready, delayed, in flight,
//! requeued) and lives `result_ttl` after the task ended (acked, dead-lettered, poisoned); a
//! purge deletes the records of what it removed. An entry another producer wrote to a stream
//! has none until a consumer takes it.
//!
//! Task ids: a producer may choose a task's id ([`check_id`] says which ids are accepted).
//! A chosen id is unique while its task has a record: enqueueing it again while the record
//! exists — the task is ready, delayed, in flight, retried, requeued from the dead letters, or
//! ended less than `result_ttl` ago — is a duplicate (answered with [`Enqueued::duplicate`],
//! not written). The record is the id's guard: one key per task. A task's own retries and
//! redeliveries are not enqueues, so they are never duplicates; a purge frees the ids of what
//! it removed. Generated ids (UUIDs) are not checked. With an idempotency key too, the key is
//! claimed first.
//!
//! Revocations ([`Records::revoke`]): kept `result_ttl` by the broker, learnt by every node
//! sharing it — by each `reserve` (in the read's own round trip: a node started later knows
//! every revocation still kept) and as they are made ([`Records::revocations`]: the node
//! running a revoked task stops it when asked to terminate). A revoked entry that reaches a
//! consumer is dead-lettered as `revoked` without running.
//!
//! Outcomes (`ack`, `retry`, `defer`, `dead_letter`, and the burial of a malformed entry)
//! commit whole: the record, the ack of the entry, its next place and its events are all
//! written or none is. An outcome that cannot be written (Redis refuses a key of the wrong
//! type) returns an error and leaves the entry pending: it comes back through lease recovery.
//!
//! Entry size: `enqueue` refuses an envelope whose JSON is over
//! [`BrokerSettings::max_entry_bytes`] ([`BrokerError::TooLarge`]). An oversized entry that
//! is in a queue anyway (another producer `XADD`ed it) is delivered with its [`Delivery::size`]
//! and the consumer dead-letters it without running it ([`BrokerSettings::too_large`] is the
//! reason): that way it gets a task record, metrics and, for a Celery message, Celery's
//! `FAILURE` result, like any other task that cannot run.

pub mod envelope;
pub mod leases;
pub mod memory;
mod outcome;
pub mod redis;
mod revocations;
pub mod sink;

#[cfg(test)]
mod contract;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use envelope::{Callback, Envelope, FieldError, MAX_ID_BYTES, Timestamp, check_id};
pub use leases::Leases;
pub use sink::EventSink;

/// What can go wrong talking to a broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached (at start: the URL is named).
    #[error("broker at {url} is unreachable: {reason}")]
    Unreachable {
        /// The URL, without credentials.
        url: String,
        /// What the connection attempt said.
        reason: String,
    },
    /// A command failed.
    #[error("broker command failed: {0}")]
    Command(String),
    /// Bad input from a caller (an envelope without a task name, a bad queue name).
    #[error("{0}")]
    Invalid(String),
    /// An envelope whose JSON is over [`BrokerSettings::max_entry_bytes`]: nothing of its
    /// batch was enqueued.
    #[error(
        "task `{task}`: the envelope is {size} bytes, over the broker's max_entry_bytes of {limit}"
    )]
    TooLarge {
        /// Its position in the batch.
        index: usize,
        /// Its task name.
        task: String,
        /// Bytes of its JSON as it would be stored.
        size: usize,
        /// The cap.
        limit: usize,
    },
}

/// How long what [`TaskQueue::started`] hands over may wait for an outcome to travel with.
pub const EVENT_FLUSH: Duration = Duration::from_millis(50);

/// Tunables shared by both implementations.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// Key prefix (`rt` → `rt:{chat}:stream`).
    pub prefix: String,
    /// Deliveries without an ack after which an entry is dead-lettered instead of redelivered.
    pub max_deliveries: u32,
    /// How long task records (results) are kept.
    pub result_ttl: Duration,
    /// How long an idempotency key remembers the first task's id, unless the task has its own.
    pub idempotency_ttl: Duration,
    /// Per-task idempotency TTLs (`tasks.NAME.idempotency.ttl`).
    pub task_idempotency_ttl: HashMap<String, Duration>,
    /// Approximate cap of the events stream; `0`: no events are written at all
    /// (`[events] enabled = false`).
    pub events_maxlen: usize,
    /// Largest envelope, in bytes of its JSON as stored, that `enqueue` accepts; a larger
    /// entry found in a queue (written by another producer) is dead-lettered unrun by the
    /// consumer (see [`BrokerSettings::too_large`]).
    pub max_entry_bytes: usize,
    /// Replicated acknowledgement (Redis): an enqueue is answered only once this many replicas
    /// of the master that took it have it (`WAIT`); `0` (the default): once the master has it.
    pub ack_replicas: u32,
    /// How long an enqueue waits for [`ack_replicas`](Self::ack_replicas) replicas before it
    /// fails (the entry may or may not be kept: retry it with an idempotency key).
    pub ack_replicas_timeout: Duration,
    /// Redis: queues made of several streams (`[queues.NAME] partitions`), by name; a queue
    /// not here has one.
    pub partitions: HashMap<String, u32>,
}

/// The default [`BrokerSettings::max_entry_bytes`]: 1 MiB.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 1024 * 1024;

impl Default for BrokerSettings {
    fn default() -> Self {
        Self {
            prefix: "rt".into(),
            max_deliveries: 5,
            result_ttl: Duration::from_secs(24 * 3600),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            task_idempotency_ttl: HashMap::new(),
            events_maxlen: 10_000,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            ack_replicas: 0,
            ack_replicas_timeout: Duration::from_secs(1),
            partitions: HashMap::new(),
        }
    }
}

impl BrokerSettings {
    /// How long `task`'s idempotency keys are remembered.
    pub fn idempotency_ttl_for(&self, task: &str) -> Duration {
        self.task_idempotency_ttl
            .get(task)
            .copied()
            .unwrap_or(self.idempotency_ttl)
    }

    /// The dead-letter reason for an entry of `size` bytes when it is over
    /// `max_entry_bytes`, else `None`.
    pub fn too_large(&self, size: usize) -> Option<String> {
        (size > self.max_entry_bytes).then(|| {
            format!(
                "entry too large: {size} bytes, over the broker's max_entry_bytes of {}",
                self.max_entry_bytes
            )
        })
    }
}

/// The answer to one enqueued envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Enqueued {
    /// The task id (for a duplicate: the id of the task it duplicates).
    pub id: String,
    /// True when nothing was enqueued because its idempotency key was already taken, or its
    /// chosen id is (a task with that id is queued, running, or ended less than `result_ttl`
    /// ago).
    pub duplicate: bool,
}

/// An entry handed to a consumer, leased until acked, retried or dead-lettered.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Queue it was reserved from.
    pub queue: String,
    /// Broker entry id (the stream id for Redis).
    pub entry: String,
    /// How many times it has been delivered, this time included.
    pub deliveries: u32,
    /// Bytes of the envelope's JSON as the entry holds it (what `max_entry_bytes` caps).
    pub size: usize,
    /// The task.
    pub envelope: Envelope,
}

/// Entries per state in one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct QueueDepth {
    /// Waiting to be reserved.
    pub ready: u64,
    /// Waiting for their time (eta, retry backoff).
    pub delayed: u64,
    /// Reserved by a consumer and leased.
    pub in_flight: u64,
    /// Dead letters.
    pub dead: u64,
}

/// Outcome of a recovery sweep.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Recovered {
    /// Entries whose lease had expired, back in the ready queue.
    pub requeued: u64,
    /// Entries that hit `max_deliveries` and were dead-lettered instead.
    pub dead: u64,
    /// The task names of those dead-lettered entries that were valid envelopes (for metrics).
    pub dead_tasks: Vec<String>,
}

/// The state of a task (`GET /tasks/{id}`, `runtime result`), from its record.
///
/// | state | meaning | Celery's name |
/// |---|---|---|
/// | `queued` | waiting to be taken (ready, or reserved by a consumer and not started yet) | `PENDING` |
/// | `scheduled` | waiting for a time: its eta, or a deferral (a resource it uses is closed) | `PENDING` |
/// | `running` | an attempt has started and has no outcome yet | `STARTED` |
/// | `retrying` | an attempt failed; the next one is due at `eta` | `RETRY` |
/// | `succeeded` | done: `result` holds the handler's value | `SUCCESS` |
/// | `dead` | failed for good, or revoked (`error` = `revoked`); in the dead letters | `FAILURE` (`REVOKED`) |
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting to be taken.
    Queued,
    /// Waiting for its eta or a deferral's end.
    Scheduled,
    /// An attempt runs (never stored: derived from the record's start marker).
    Running,
    /// Failed an attempt; another is scheduled.
    Retrying,
    /// Done; `result` holds the handler's value.
    Succeeded,
    /// Failed for good (permanent error, retries exhausted, poison, expired, revoked); in the
    /// dead letters.
    Dead,
}

impl TaskState {
    /// Its name in records and JSON (`queued`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
        }
    }

    /// The state named `name` (as [`TaskState::name`] writes it).
    pub fn from_name(name: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Scheduled,
            Self::Running,
            Self::Retrying,
            Self::Succeeded,
            Self::Dead,
        ]
        .into_iter()
        .find(|state| state.name() == name)
    }

    /// Whether the task has ended (succeeded or dead): its record then lives `result_ttl`.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead)
    }
}

/// The `error` of a task that was revoked (its record, its dead letter's reason).
pub const REVOKED: &str = "revoked";

/// What `GET /tasks/{id}` shows: a task's record, from its enqueue until `result_ttl` after
/// its outcome (see [`TaskState`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Task id.
    pub id: String,
    /// Task name.
    pub task: String,
    /// Queue.
    pub queue: String,
    /// State.
    pub state: TaskState,
    /// The handler's result (succeeded; else `null`).
    pub result: Option<Value>,
    /// The last error (retrying, dead; and scheduled or running after a failed attempt; else
    /// `null`). `revoked` for a revoked task.
    pub error: Option<String>,
    /// How many attempts have started, the running one included: 0 while none has, and for
    /// a task dead-lettered before it could run (unknown task, expired, revoked before it
    /// started). (A dead letter's own `attempts` counts such an entry as one.)
    pub attempts: u32,
    /// The index of the latest attempt (0 = the first run), the number the envelope, the
    /// task's events (`detail.attempt`) and its log lines (`attempt`) carry; `null` while
    /// `attempts` is 0. Always `attempts - 1`.
    pub attempt: Option<u32>,
    /// When it is due (scheduled: its eta or the deferral's end; retrying: the next attempt);
    /// RFC 3339, else `null`.
    pub eta: Option<String>,
    /// When it was enqueued (`null` for an entry another producer wrote to the stream).
    pub enqueued_at: Option<String>,
    /// When its latest attempt started, if one did.
    pub started_at: Option<String>,
    /// The node (consumer name) that ran its latest attempt, if one did.
    pub node: Option<String>,
    /// When the record was last written (RFC 3339).
    pub updated_at: String,
}

/// A task's record as a broker stores it; [`StoredRecord::view`] derives what
/// [`TaskRecord`] shows. Written whole or in parts by every step of the task's life, each in
/// the round trip it already had: the enqueue (`queued`/`scheduled`), the start of an
/// attempt (the start marker, through [`TaskQueue::started`]), each outcome, a deferral, a
/// requeue, a revocation. `running` is never stored: an attempt runs while its start marker
/// (`started`, an attempt index) is at least the number of attempts with an outcome
/// (`attempts`) and was not lost since (lease recovery, a deferral), so a start marker written
/// late (it travels within [`EVENT_FLUSH`]) can never hide the outcome that followed it.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct StoredRecord {
    pub(crate) id: String,
    pub(crate) task: String,
    pub(crate) queue: String,
    /// `None` for a record that only a start marker wrote (an entry another producer `XADD`ed).
    pub(crate) state: Option<TaskState>,
    /// Due time of a scheduled or retrying task (the delayed set's score, epoch ms).
    pub(crate) due_ms: Option<u64>,
    pub(crate) result: Option<Value>,
    pub(crate) error: Option<String>,
    /// Attempts that ran to an outcome of their own (the envelope's `attempt` + 1 of the
    /// latest success or retry; a dead letter leaves it: the start marker counts that one).
    pub(crate) attempts: u32,
    /// Index of the latest attempt that started.
    pub(crate) started: Option<u32>,
    /// That attempt was lost (its node's lease expired, or the entry was deferred before it
    /// started again): it no longer runs, but it counts.
    pub(crate) lost: bool,
    pub(crate) started_at: Option<String>,
    pub(crate) node: Option<String>,
    pub(crate) enqueued_at: Option<String>,
    pub(crate) updated_at: String,
}

impl StoredRecord {
    /// The record a task gets when it is enqueued (or requeued): `queued`, or `scheduled`
    /// until `due_ms`.
    pub(crate) fn enqueued(envelope: &Envelope, due_ms: Option<u64>, at: &str) -> Self {
        Self {
            id: envelope.id.clone(),
            task: envelope.task.clone(),
            queue: envelope.queue.clone(),
            state: Some(match due_ms {
                Some(_) => TaskState::Scheduled,
                None => TaskState::Queued,
            }),
            due_ms,
            enqueued_at: (!envelope.enqueued_at.is_empty()).then(|| envelope.enqueued_at.clone()),
            updated_at: at.to_string(),
            ..Self::default()
        }
    }

    /// Whether an attempt runs: the latest start is of an attempt without an outcome yet, it
    /// was not lost, and the task has not ended.
    pub(crate) fn runs(&self) -> bool {
        !self.state.unwrap_or(TaskState::Queued).is_final()
            && !self.lost
            && self.started.is_some_and(|s| s >= self.attempts)
    }

    /// What `GET /tasks/{id}` shows at `now_ms` (epoch ms).
    pub(crate) fn view(self, now_ms: u64) -> TaskRecord {
        let stored = self.state.unwrap_or(TaskState::Queued);
        let state = if self.runs() {
            TaskState::Running
        } else if stored == TaskState::Scheduled && self.due_ms.is_none_or(|due| due <= now_ms) {
            // Due: promoted to the ready queue (within the mover's 10 ms), waiting to be taken.
            TaskState::Queued
        } else {
            stored
        };
        let attempts = self
            .started
            .map_or(0, |s| s.saturating_add(1))
            .max(self.attempts);
        let eta = matches!(state, TaskState::Scheduled | TaskState::Retrying)
            .then(|| {
                self.due_ms
                    .map(|due| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(due)))
            })
            .flatten();
        TaskRecord {
            id: self.id,
            task: self.task,
            queue: self.queue,
            state,
            result: (state == TaskState::Succeeded)
                .then_some(self.result)
                .flatten(),
            error: (state != TaskState::Succeeded)
                .then_some(self.error)
                .flatten()
                .filter(|e| !e.is_empty()),
            attempts,
            attempt: attempts.checked_sub(1),
            eta,
            enqueued_at: self.enqueued_at,
            started_at: self.started_at,
            node: self.node,
            updated_at: self.updated_at,
        }
    }
}

/// A revocation as every node sharing the broker learns it ([`Records::revocations`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The task id.
    pub id: String,
    /// Whether a running attempt is to be stopped (soft, then hard after a grace).
    pub terminate: bool,
}

/// What [`Records::revoke`] found, and so what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Revoked {
    /// No record: unknown, or expired. The revocation is kept `result_ttl`, so a task with
    /// that id met later (enqueued by a slow producer, written to a stream by another program)
    /// does not run.
    Unknown,
    /// It had not started (`queued`, `scheduled`, `retrying`): it never runs. Its record says
    /// dead/revoked at once; a delayed entry is made ready at once, and the consumer that
    /// meets it dead-letters it as `revoked` and runs its `link_error` callbacks.
    Pending(TaskState),
    /// An attempt runs: with `terminate` the node running it stops it (soft, then hard) and
    /// records it revoked; without, it finishes, and a retry it schedules is revoked.
    Running,
    /// It was revoked already: nothing more was done.
    AlreadyRevoked,
    /// It had ended (`succeeded`, or dead for another reason): nothing was done.
    Ended(TaskState),
}

/// One dead letter.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetter {
    /// Entry id in the dead-letter stream.
    pub entry: String,
    /// Why it is dead.
    pub reason: String,
    /// Attempts made.
    pub attempts: u32,
    /// When it died (RFC 3339).
    pub at: String,
    /// The envelope, when the entry could be parsed.
    pub envelope: Option<Envelope>,
    /// The raw entry, when it could not.
    pub raw: Option<String>,
}

/// An event of the capped events stream: task lifecycle (`sent`, `started`, `succeeded`,
/// `retried`, `deferred`, `dead`, `recovered`), supervision (`actor_exited`,
/// `actor_restarted`, `actor_start_failed`, `actor_gave_up`), breakers (`breaker_opened`,
/// `breaker_half_opened`, `breaker_closed`), resource credentials (`resource_misconfigured`,
/// `resource_restored`) and pools (`pool_agent_<state>`, `pool_backoff`,
/// `pool_fatal`, `pool_reset`). Task events name the task; the others say what they are about
/// in `detail` (`path`, `resource`, `pool`, …).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the events stream (assigned by the broker; empty when publishing).
    #[serde(default)]
    pub id: String,
    /// What happened.
    pub kind: EventKind,
    /// When (RFC 3339).
    pub at: String,
    /// The task concerned, if any.
    #[serde(default)]
    pub task_id: Option<String>,
    /// Its name.
    #[serde(default)]
    pub task: Option<String>,
    #[serde(default)]
    pub queue: Option<String>,
    /// Anything else (error, attempt, actor path).
    #[serde(default)]
    pub detail: Value,
}

impl Event {
    /// An event of `kind` about no task (an actor, a breaker, a pool), now.
    pub fn new(kind: impl Into<EventKind>, detail: Value) -> Self {
        Self {
            id: String::new(),
            kind: kind.into(),
            at: rfc3339(SystemTime::now()),
            task_id: None,
            task: None,
            queue: None,
            detail,
        }
    }

    /// An event of `kind` about `envelope`, now.
    pub fn about(kind: impl Into<EventKind>, envelope: &Envelope, detail: Value) -> Self {
        Self {
            id: String::new(),
            kind: kind.into(),
            at: rfc3339(SystemTime::now()),
            task_id: Some(envelope.id.clone()),
            task: Some(envelope.task.clone()),
            queue: Some(envelope.queue.clone()),
            detail,
        }
    }
}

/// The kind of an event. The brokers write the task lifecycle kinds; supervision, breakers,
/// resources and pools write their own (`actor_exited`, `breaker_opened`, `pool_agent_<state>`,
/// …), kept as [`EventKind::Other`]. On the wire (the events stream, JSON) a kind is its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// Enqueued (`detail`: eta, trace).
    Sent,
    /// An attempt started (`detail`: attempt, consumer).
    Started,
    /// An attempt failed and the next is scheduled (`detail`: attempt, error).
    Retried,
    /// Put back unrun until a time (`detail`: reason, until).
    Deferred,
    /// Back in the ready queue after its lease expired (`detail`: deliveries, consumer).
    Recovered,
    /// Done (`detail`: attempt).
    Succeeded,
    /// Dead-lettered: failed for good, poisoned, malformed, revoked (`detail`: attempt and
    /// error, or deliveries, or reason and entry).
    Dead,
    /// Any other kind, by name.
    Other(String),
}

impl EventKind {
    const TASK: [EventKind; 7] = [
        Self::Sent,
        Self::Started,
        Self::Retried,
        Self::Deferred,
        Self::Recovered,
        Self::Succeeded,
        Self::Dead,
    ];

    /// Its name on the wire (`sent`, …, or the other kind's own).
    pub fn as_str(&self) -> &str {
        match self {
            Self::Sent => "sent",
            Self::Started => "started",
            Self::Retried => "retried",
            Self::Deferred => "deferred",
            Self::Recovered => "recovered",
            Self::Succeeded => "succeeded",
            Self::Dead => "dead",
            Self::Other(name) => name,
        }
    }
}

impl From<&str> for EventKind {
    fn from(name: &str) -> Self {
        Self::TASK
            .into_iter()
            .find(|kind| kind.as_str() == name)
            .unwrap_or_else(|| Self::Other(name.to_string()))
    }
}

impl From<String> for EventKind {
    fn from(name: String) -> Self {
        match Self::from(name.as_str()) {
            Self::Other(_) => Self::Other(name),
            kind => kind,
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A kind reads as its name where text is expected (`&event.kind` as a `&str`).
impl std::ops::Deref for EventKind {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for EventKind {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq<str> for EventKind {
    fn eq(&self, name: &str) -> bool {
        self.as_str() == name
    }
}

impl PartialEq<&str> for EventKind {
    fn eq(&self, name: &&str) -> bool {
        self.as_str() == *name
    }
}

impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self::from)
    }
}

/// Removed by a purge.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Purged {
    /// Ready entries removed.
    pub ready: u64,
    /// Delayed entries removed.
    pub delayed: u64,
}

/// One node's presence record (`GET /nodes`), rewritten by the node every second and kept
/// for a TTL: a node that stops writing it (killed, partitioned) drops out of the list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's consumer name.
    pub name: String,
    /// The queues it consumes.
    pub queues: Vec<String>,
    /// Entries it holds (running or waiting to run), per queue.
    pub in_flight: BTreeMap<String, u64>,
    /// When the node started (RFC 3339).
    pub started_at: String,
    /// When it last wrote this record (RFC 3339).
    pub last_seen: String,
    /// Whether it takes tasks or is on its way out (a record without one, from an older
    /// node, reads as running).
    #[serde(default)]
    pub state: NodeState,
    /// When it entered `state` (RFC 3339); `None` while running.
    #[serde(default)]
    pub state_since: Option<String>,
}

/// What a node is doing, as its presence record says (`GET /nodes`, `runtime nodes`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// It takes tasks.
    #[default]
    Running,
    /// Asked to stop, it keeps taking the ready tasks until its queues are empty or the grace
    /// runs out (`memory://` with `drain_on_shutdown`), then stops.
    Draining,
    /// Asked to stop: it takes no new task; the running ones finish within the grace, then
    /// the node leaves the list.
    Stopping,
}

impl NodeState {
    /// `running`, `draining` or `stopping`.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Running => "running",
            NodeState::Draining => "draining",
            NodeState::Stopping => "stopping",
        }
    }
}

/// The last run of a schedule, as the beat leader recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRun {
    /// The due time it ran for, in ms since the epoch (the same on every node).
    pub due_ms: u64,
    /// The enqueued task's id (the first one's, if the enqueue was a duplicate).
    pub task_id: String,
    /// The node that enqueued it.
    pub node: String,
}

/// The life of a delivery: enqueue, reserve and lease, the outcomes (ack, retry, defer, dead
/// letter), and what moves entries between places (recovery, promotion, hand back).
#[warn(missing_docs)]
pub trait TaskQueue: Send + Sync + 'static {
    /// Enqueues a batch (ids and `enqueued_at` filled in when empty; a future `eta` goes to
    /// the delayed set; a taken idempotency key returns the first id; a chosen id that is
    /// taken is a duplicate of itself). All or nothing per envelope, answers in order. An invalid envelope, or one whose JSON is over
    /// `max_entry_bytes` ([`BrokerError::TooLarge`]), fails the whole batch before anything
    /// is written.
    fn enqueue(
        &self,
        batch: Vec<Envelope>,
    ) -> impl Future<Output = Result<Vec<Enqueued>, BrokerError>> + Send;

    /// Reserves up to `max` ready entries of `queue` for `consumer`, waiting up to `wait`
    /// for the first one. Malformed entries are dead-lettered, not returned.
    fn reserve(
        &self,
        queue: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> impl Future<Output = Result<Vec<Delivery>, BrokerError>> + Send;

    /// Renews the leases `consumer` holds on `entries`; returns the entries it no longer
    /// holds (recovered elsewhere after an expired lease).
    fn renew(
        &self,
        queue: &str,
        consumer: &str,
        entries: &[String],
    ) -> impl Future<Output = Result<Vec<String>, BrokerError>> + Send;

    /// Acknowledges a delivery and records its result.
    fn ack(
        &self,
        delivery: &Delivery,
        result: Value,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Acknowledges a delivery of a task that keeps no result (`store_result = false`): as
    /// [`ack`](Self::ack) — the `succeeded` event included — but the task's record is removed
    /// instead of written (its id is then unknown: a chosen id may be used again).
    fn ack_unrecorded(
        &self,
        delivery: &Delivery,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Acknowledges several deliveries with their results in one round trip. Each is its
    /// own outcome: an `Err` names those that were not written; the others were.
    fn ack_many(
        &self,
        done: &[(Delivery, Value)],
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Ends this attempt and schedules the next one (attempt + 1) at `at`.
    fn retry(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        error: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Puts the entry back as a delayed one due at `at`, attempt unchanged (a deferral: the
    /// task did not run, e.g. its resource's breaker is open).
    fn defer(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        reason: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Ends the delivery as a dead letter with `reason`.
    fn dead_letter(
        &self,
        delivery: &Delivery,
        reason: &str,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Returns entries whose lease is older than `lease` to the ready queue (or to the dead
    /// letters past `max_deliveries`). Safe to run on every node at once.
    fn recover(
        &self,
        queue: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Recovered, BrokerError>> + Send;

    /// Moves delayed entries due at `now` to the ready queue; returns how many.
    fn promote_due(
        &self,
        queue: &str,
        now: SystemTime,
    ) -> impl Future<Output = Result<u64, BrokerError>> + Send;

    /// Records that an attempt of `envelope` started on `consumer` — its record's start
    /// marker (so it shows `running`) and the `started` event — without a round trip of its
    /// own: both travel with the attempt's own outcome (`ack`, `retry`, `defer`,
    /// `dead_letter`) when it comes within [`EVENT_FLUSH`] — ahead of it, so a task's
    /// `started` stays before its outcome in the stream — or are written on their own after
    /// `EVENT_FLUSH` (Redis; `memory://` writes them at once). Best effort.
    fn started(&self, delivery: &Delivery, consumer: &str);

    /// Hands back entries `consumer` reserved but did not start (a node leaving cleanly):
    /// each one still held by `consumer` is ready again at once for any consumer, its delivery
    /// count unchanged; entries it no longer holds are left alone. Returns how many moved.
    fn hand_back(
        &self,
        queue: &str,
        consumer: &str,
        entries: &[String],
    ) -> impl Future<Output = Result<u64, BrokerError>> + Send;
}

/// What the broker remembers about tasks beside their entries: records, the events stream and
/// the kept revocations.
#[warn(missing_docs)]
pub trait Records: Send + Sync + 'static {
    /// Appends an event to the capped events stream (`enqueue`, `started`, `ack`, `retry`,
    /// `dead_letter` and `recover` write their own).
    fn publish(&self, event: Event) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Up to `limit` events after the event id `after` (from the oldest kept when `None`),
    /// oldest first.
    fn events(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Event>, BrokerError>> + Send;

    /// Up to `limit` events just before the event id `before` (the newest ones when `None`),
    /// oldest first: `events_before(None, 1)` is the newest event.
    fn events_before(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<Event>, BrokerError>> + Send;

    /// How far behind now a live tail of [`events`](Self::events) should stay: events that
    /// are newer may still be joined by ones with a smaller id (several streams, as on a Redis
    /// Cluster). Zero where ids follow the order of the writes (one stream).
    fn events_settle(&self) -> Duration {
        Duration::ZERO
    }

    /// The record of task `id` (see [`TaskRecord`]): from its enqueue until `result_ttl`
    /// after its outcome. `None` for an unknown id, an expired record, or an entry another
    /// producer wrote to a stream that no consumer has taken yet.
    fn record(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<TaskRecord>, BrokerError>> + Send;

    /// Revokes task `id` (see [`Revoked`] for what happens in each state). The revocation is
    /// kept `result_ttl` and reaches every node sharing the broker ([`Records::revocations`]);
    /// `terminate` asks the node running it to stop a running attempt.
    fn revoke(
        &self,
        id: &str,
        terminate: bool,
    ) -> impl Future<Output = Result<Revoked, BrokerError>> + Send;

    /// Whether task `id` is revoked, as far as this node knows — from what it learnt at its
    /// last `reserve` (which catches up with every revocation made before its read, in the
    /// read's own round trip) and since (each revocation as it is made). No round trip.
    fn is_revoked(&self, id: &str) -> bool;

    /// Revocations as they are made, by any node sharing the broker (and, after a lost
    /// connection, every revocation still kept, again).
    fn revocations(&self) -> tokio::sync::broadcast::Receiver<Revocation>;
}

/// What several nodes sharing the broker agree on: the beat leader lease, each schedule's last
/// run, and the nodes' presence records.
#[warn(missing_docs)]
pub trait Coordination: Send + Sync + 'static {
    /// The beat leader lease: renews it when `node` holds it, takes it (for `lease`) when
    /// nobody does; returns the holder after the call (`node` when it leads).
    fn claim_leadership(
        &self,
        node: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<String, BrokerError>> + Send;

    /// Gives the beat leader lease up if `node` holds it (a clean stop), so another node
    /// takes over at its next round instead of after the lease; true if it held it.
    fn resign_leadership(
        &self,
        node: &str,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// The last recorded run of every schedule.
    fn last_runs(
        &self,
    ) -> impl Future<Output = Result<HashMap<String, LastRun>, BrokerError>> + Send;

    /// Records `run` as the last run of `schedule`.
    fn record_run(
        &self,
        schedule: &str,
        run: &LastRun,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// Writes this node's presence record, kept for `ttl` unless written again.
    fn announce_node(
        &self,
        record: &NodeRecord,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), BrokerError>> + Send;

    /// The presence records not yet expired, by name.
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeRecord>, BrokerError>> + Send;

    /// Removes `name`'s presence record (a clean stop).
    fn forget_node(&self, name: &str) -> impl Future<Output = Result<(), BrokerError>> + Send;
}

/// Inspection and operator actions on a queue: depth, dead letters (list, requeue, delete,
/// purge) and purge.
#[warn(missing_docs)]
pub trait Admin: Send + Sync + 'static {
    /// Entries per state.
    fn depth(&self, queue: &str) -> impl Future<Output = Result<QueueDepth, BrokerError>> + Send;

    /// The oldest `limit` dead letters.
    fn dead_letters(
        &self,
        queue: &str,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, BrokerError>> + Send {
        self.dead_letters_after(queue, None, limit)
    }

    /// Up to `limit` dead letters after the entry id `after` (from the oldest when `None`),
    /// oldest first: the next page of a listing starts after the last entry of the previous
    /// one. `after` is an entry id ([`check_entry`]); it need not exist any more.
    fn dead_letters_after(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadLetter>, BrokerError>> + Send;

    /// Moves up to `limit` dead letters back to the ready queue (attempts reset); malformed
    /// ones stay. Returns how many moved.
    fn requeue_dead(
        &self,
        queue: &str,
        limit: usize,
    ) -> impl Future<Output = Result<u64, BrokerError>> + Send;

    /// Moves the one dead letter `entry` back to the ready queue (attempt reset, id guard
    /// taken again), as [`requeue_dead`](Admin::requeue_dead) does for many: its task id,
    /// or `None` when there is no such dead letter (requeued or deleted meanwhile — also by
    /// another node). A malformed letter stays: [`BrokerError::Invalid`].
    fn requeue_dead_entry(
        &self,
        queue: &str,
        entry: &str,
    ) -> impl Future<Output = Result<Option<String>, BrokerError>> + Send;

    /// Deletes the one dead letter `entry`; false when there is none.
    fn delete_dead(
        &self,
        queue: &str,
        entry: &str,
    ) -> impl Future<Output = Result<bool, BrokerError>> + Send;

    /// Deletes every dead letter of `queue`; returns how many.
    fn purge_dead(&self, queue: &str) -> impl Future<Output = Result<u64, BrokerError>> + Send;

    /// Removes every ready and delayed entry (in-flight ones finish).
    fn purge(&self, queue: &str) -> impl Future<Output = Result<Purged, BrokerError>> + Send;
}

/// Every concern of the broker contract, implemented by [`memory::MemoryBroker`],
/// [`redis::RedisBroker`] and [`AnyBroker`]: what generic code (the contract suite, the event
/// sink) asks for.
#[warn(missing_docs)]
pub trait Broker: TaskQueue + Records + Coordination + Admin {}

impl<B: TaskQueue + Records + Coordination + Admin> Broker for B {}

/// Checks an entry id from outside (a dead letter to requeue or delete, a page's start): the
/// `<ms>-<seq>` form of a Redis stream id — two decimal numbers that fit a `u64`, joined by
/// `-` — which `memory://` uses too. Anything else (`-`, `+`, `$`, `>`: Redis' special ids; an
/// incomplete id; text) is refused before it reaches a command. `Err` says why.
pub fn check_entry(entry: &str) -> Result<(), String> {
    let fits = |part: &str| {
        !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) && part.parse::<u64>().is_ok()
    };
    // A dead letter of a queue's partition p ≥ 1 is named `<entry>@p`.
    let (id, partition) = match entry.split_once('@') {
        Some((id, p)) => (id, Some(p)),
        None => (entry, None),
    };
    let partition_ok = partition.is_none_or(|p| {
        fits(p)
            && p.parse::<u32>()
                .is_ok_and(|p| (1..=MAX_PARTITIONS).contains(&p))
    });
    match id.split_once('-') {
        Some((ms, seq)) if fits(ms) && fits(seq) && partition_ok => Ok(()),
        _ => Err(format!(
            "`{}` is not an entry id (expected two numbers joined by `-`, as `1732374000123-0`, \
             and for a dead letter of a partition `@` and its number, as `1732374000123-0@2`)",
            entry.chars().take(64).collect::<String>()
        )),
    }
}

/// The most streams a queue may be made of (`[queues.NAME] partitions`).
pub const MAX_PARTITIONS: u32 = 64;

/// True when `stream` is `queue`'s own stream or one of its partitions (`queue:1`, …): what
/// a delivery's `queue` names is the stream it was read from.
pub fn is_stream_of(stream: &str, queue: &str) -> bool {
    match stream.strip_prefix(queue) {
        Some("") => true,
        Some(rest) => rest
            .strip_prefix(':')
            .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())),
        None => false,
    }
}

/// [`check_entry`] as a [`BrokerError::Invalid`] naming the field.
fn entry_arg(entry: &str) -> Result<(), BrokerError> {
    check_entry(entry).map_err(|why| BrokerError::Invalid(format!("entry: {why}")))
}

/// The error of a requeue of a malformed dead letter (it stays for inspection).
fn malformed_letter(queue: &str, entry: &str) -> BrokerError {
    BrokerError::Invalid(format!(
        "dead letter {entry} of `{queue}` is not a valid envelope: it cannot be requeued (it \
         stays for inspection; delete it when done)"
    ))
}

/// The latest time [`rfc3339`] writes: RFC 3339 has four-digit years.
const LAST_RFC3339_MS: u64 = 253_402_300_799_999;

/// RFC 3339 for `at` (UTC, milliseconds). Total: a time before 1970 is written as the epoch and
/// one after the year 9999 as `9999-12-31T23:59:59.999Z` (times from outside are kept in range
/// by [`parse_time`] and the caps of [`crate::caps`]; this only keeps formatting from panicking).
pub fn rfc3339(at: SystemTime) -> String {
    let latest = SystemTime::UNIX_EPOCH + Duration::from_millis(LAST_RFC3339_MS);
    humantime::format_rfc3339_millis(at.clamp(SystemTime::UNIX_EPOCH, latest)).to_string()
}

/// Milliseconds since the Unix epoch (0 before it, saturating far after it).
pub fn epoch_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The delayed-set score of a due time: milliseconds since the epoch, rounded up, so an entry
/// is never promoted before its time (the mover compares with `epoch_ms(now)`). Saturating: a
/// far due time never wraps round to an early one.
pub fn due_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| {
        u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
    })
}

/// Parses an RFC 3339 time such as `2026-11-23T15:00:00Z` or `…+01:00` (Python's
/// `isoformat()` with a zone): every time RFC 3339 can write, `0000-01-01T00:00:00Z` to
/// `9999-12-31T23:59:59.999999999Z` and beyond it by an offset. (`jiff` stops a day short of
/// the year's end, 9999-12-30T22:00Z, so the last day is computed here.)
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    match text.parse::<jiff::Timestamp>() {
        Ok(ts) => Ok(SystemTime::from(ts)),
        Err(e) => {
            last_day_of_9999(text).ok_or_else(|| format!("`{text}` is not an RFC 3339 time: {e}"))
        }
    }
}

/// A time of the year 9999 past `jiff`'s range, from its date, time and offset.
fn last_day_of_9999(text: &str) -> Option<SystemTime> {
    use jiff::civil::date;
    let pieces = jiff::fmt::temporal::Pieces::parse(text).ok()?;
    let offset = pieces.offset()?.to_numeric_offset();
    let local = pieces.date().to_datetime(pieces.time()?);
    if local.year() != 9999 {
        return None;
    }
    let since_epoch = local.duration_since(date(1970, 1, 1).at(0, 0, 0, 0))
        - jiff::SignedDuration::from_secs(i64::from(offset.seconds()));
    let since_epoch = Duration::try_from(since_epoch).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(since_epoch)
}

/// The broker a node runs with, chosen by URL: `memory://` or `redis://…`.
// One per node, behind an `Arc`: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum AnyBroker {
    /// The embedded broker.
    Memory(memory::MemoryBroker),
    /// Redis Streams.
    Redis(redis::RedisBroker),
}

impl AnyBroker {
    /// Connects to the broker at `url` (`memory://` needs no connection). Fails with a message
    /// naming the URL when the broker cannot be reached.
    pub async fn connect(url: &str, settings: BrokerSettings) -> Result<Self, BrokerError> {
        match url.split_once("://").map(|(scheme, _)| scheme) {
            Some("memory") => Ok(Self::Memory(memory::MemoryBroker::new(settings))),
            Some("redis" | "rediss" | redis::CLUSTER_SCHEME) => Ok(Self::Redis(
                redis::RedisBroker::connect(url, settings).await?,
            )),
            _ => Err(BrokerError::Invalid(format!(
                "broker URL: expected memory://, redis:// or redis+cluster://, got `{}`",
                url.split("://").next().unwrap_or(url)
            ))),
        }
    }

    /// The tunables it runs with.
    pub fn settings(&self) -> &BrokerSettings {
        match self {
            Self::Memory(memory) => memory.settings(),
            Self::Redis(redis) => redis.settings(),
        }
    }

    /// Why the broker cannot serve right now (a lost connection), if it cannot.
    pub fn degraded(&self) -> Option<String> {
        match self {
            Self::Memory(_) => None,
            Self::Redis(redis) => {
                let state = redis.connection_state();
                (!state.is_connected()).then(|| format!("redis at {}: {state}", redis.url()))
            }
        }
    }

    /// The round trip of a PING to the broker (zero for `memory://`).
    pub async fn ping(&self) -> Result<Duration, BrokerError> {
        match self {
            Self::Memory(_) => Ok(Duration::ZERO),
            Self::Redis(redis) => redis.ping().await,
        }
    }

    /// Connection facts for snapshots.
    pub fn describe(&self) -> Value {
        match self {
            Self::Memory(_) => serde_json::json!({ "kind": "memory", "connection": "in process" }),
            Self::Redis(redis) => serde_json::json!({
                "kind": "redis",
                "url": redis.url(),
                "connection": redis.connection_state(),
            }),
        }
    }
}

/// Implements a broker trait for [`AnyBroker`] by handing each call to the backend it holds.
macro_rules! dispatch {
    ($trait:ident {
        $(async fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*
        $(fn $sync:ident(&self $(, $sarg:ident: $sty:ty)*) -> $sret:ty;)*
    }) => {
        impl $trait for AnyBroker {
            $(async fn $name(&self $(, $arg: $ty)*) -> $ret {
                match self {
                    AnyBroker::Memory(b) => b.$name($($arg),*).await,
                    AnyBroker::Redis(b) => b.$name($($arg),*).await,
                }
            })*
            $(fn $sync(&self $(, $sarg: $sty)*) -> $sret {
                match self {
                    AnyBroker::Memory(b) => b.$sync($($sarg),*),
                    AnyBroker::Redis(b) => b.$sync($($sarg),*),
                }
            })*
        }
    };
}

type Done<T> = Result<T, BrokerError>;

dispatch!(TaskQueue {
    async fn enqueue(&self, batch: Vec<Envelope>) -> Done<Vec<Enqueued>>;
    async fn reserve(&self, queue: &str, consumer: &str, max: usize, wait: Duration) -> Done<Vec<Delivery>>;
    async fn renew(&self, queue: &str, consumer: &str, entries: &[String]) -> Done<Vec<String>>;
    async fn ack(&self, delivery: &Delivery, result: Value) -> Done<()>;
    async fn ack_unrecorded(&self, delivery: &Delivery) -> Done<()>;
    async fn ack_many(&self, done: &[(Delivery, Value)]) -> Done<()>;
    async fn retry(&self, delivery: &Delivery, at: SystemTime, error: &str) -> Done<()>;
    async fn defer(&self, delivery: &Delivery, at: SystemTime, reason: &str) -> Done<()>;
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Done<()>;
    async fn recover(&self, queue: &str, lease: Duration) -> Done<Recovered>;
    async fn promote_due(&self, queue: &str, now: SystemTime) -> Done<u64>;
    async fn hand_back(&self, queue: &str, consumer: &str, entries: &[String]) -> Done<u64>;
    fn started(&self, delivery: &Delivery, consumer: &str) -> ();
});

dispatch!(Records {
    async fn record(&self, id: &str) -> Done<Option<TaskRecord>>;
    async fn publish(&self, event: Event) -> Done<()>;
    async fn events(&self, after: Option<&str>, limit: usize) -> Done<Vec<Event>>;
    async fn events_before(&self, before: Option<&str>, limit: usize) -> Done<Vec<Event>>;
    async fn revoke(&self, id: &str, terminate: bool) -> Done<Revoked>;
    fn events_settle(&self) -> Duration;
    fn is_revoked(&self, id: &str) -> bool;
    fn revocations(&self) -> tokio::sync::broadcast::Receiver<Revocation>;
});

dispatch!(Coordination {
    async fn claim_leadership(&self, node: &str, lease: Duration) -> Done<String>;
    async fn resign_leadership(&self, node: &str) -> Done<bool>;
    async fn last_runs(&self) -> Done<HashMap<String, LastRun>>;
    async fn record_run(&self, schedule: &str, run: &LastRun) -> Done<()>;
    async fn announce_node(&self, record: &NodeRecord, ttl: Duration) -> Done<()>;
    async fn nodes(&self) -> Done<Vec<NodeRecord>>;
    async fn forget_node(&self, name: &str) -> Done<()>;
});

dispatch!(Admin {
    async fn depth(&self, queue: &str) -> Done<QueueDepth>;
    async fn dead_letters_after(&self, queue: &str, after: Option<&str>, limit: usize) -> Done<Vec<DeadLetter>>;
    async fn requeue_dead(&self, queue: &str, limit: usize) -> Done<u64>;
    async fn requeue_dead_entry(&self, queue: &str, entry: &str) -> Done<Option<String>>;
    async fn delete_dead(&self, queue: &str, entry: &str) -> Done<bool>;
    async fn purge_dead(&self, queue: &str) -> Done<u64>;
    async fn purge(&self, queue: &str) -> Done<Purged>;
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_and_partition_names() {
        for good in ["1732374000123-0", "0-0", "1732374000123-7@2", "1-0@64"] {
            assert!(check_entry(good).is_ok(), "{good}");
        }
        for bad in [
            "", "-", "1-", "1-0@", "1-0@0", "1-0@65", "1-0@x", "1-0@2@3", "@2", "1-0 @2",
        ] {
            assert!(check_entry(bad).is_err(), "{bad}");
        }
        assert!(is_stream_of("chat", "chat"));
        assert!(is_stream_of("chat:2", "chat"));
        assert!(!is_stream_of("chat:", "chat"));
        assert!(!is_stream_of("chat:x", "chat"));
        assert!(!is_stream_of("chatter", "chat"));
        assert!(!is_stream_of("chat", "chat:1"));
    }

    #[test]
    fn event_kinds_are_written_and_read_by_their_names() {
        for name in [
            "sent",
            "started",
            "retried",
            "deferred",
            "recovered",
            "succeeded",
            "dead",
            "actor_exited",
        ] {
            let kind = EventKind::from(name);
            assert_eq!(kind.as_str(), name);
            assert_eq!(serde_json::to_value(&kind).unwrap(), name);
            assert_eq!(
                serde_json::from_value::<EventKind>(name.into()).unwrap(),
                kind
            );
        }
        assert_eq!(EventKind::from("dead"), EventKind::Dead);
        assert_eq!(
            EventKind::from("pool_agent_ready".to_string()),
            EventKind::Other("pool_agent_ready".into())
        );
    }

    #[test]
    fn a_presence_record_without_a_state_reads_as_running() {
        let older = r#"{"name":"w1","queues":["chat"],"in_flight":{"chat":0},
            "started_at":"2026-11-23T15:00:00.000Z","last_seen":"2026-11-23T15:00:01.000Z"}"#;
        let record: NodeRecord = serde_json::from_str(older).unwrap();
        assert_eq!(record.state, NodeState::Running);
        assert_eq!(record.state_since, None);
        let written = serde_json::to_value(NodeRecord {
            state: NodeState::Draining,
            ..record
        })
        .unwrap();
        assert_eq!(written["state"], "draining");
    }

    #[test]
    fn times_far_from_now_are_written_and_scored_without_a_panic_or_a_wrap() {
        let epoch = SystemTime::UNIX_EPOCH;
        // 19e15 s after the epoch: more milliseconds than a u64 holds.
        let far = epoch + Duration::from_secs(19_000_000_000_000_000);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59.999Z");
        assert_eq!(
            due_ms(far),
            u64::MAX,
            "saturated, not wrapped round to an early time"
        );
        assert_eq!(epoch_ms(far), u64::MAX);
        let before = epoch - Duration::from_secs(86_400);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00.000Z");
        assert_eq!((due_ms(before), epoch_ms(before)), (0, 0));
        // RFC 3339's last second, in UTC and through an offset; one past it is no time.
        let last = parse_time("9999-12-31T23:59:59.999Z").unwrap();
        assert_eq!(rfc3339(last), "9999-12-31T23:59:59.999Z");
        assert_eq!(epoch_ms(last), 253_402_300_799_999);
        let west = parse_time("9999-12-31T23:59:59-01:00").unwrap();
        assert_eq!(epoch_ms(west), 253_402_304_399_000);
        assert!(parse_time("9999-12-31T23:59:59").is_err(), "no offset");
        assert!(parse_time("9999-12-32T00:00:00Z").is_err());
        assert!(parse_time("10000-01-01T00:00:00Z").is_err());
        assert_eq!(
            parse_time("2026-11-23T16:00:00+01:00").unwrap(),
            parse_time("2026-11-23T15:00:00Z").unwrap()
        );
    }
}
