//! `BridgeActor`: takes over one kombu queue — moves its messages into the runtime's streams
//! (what a message becomes: [`crate::celery`]).
//!
//! # Movers
//!
//! A bridge runs `celery.movers` movers (default [`DEFAULT_MOVERS`](super::DEFAULT_MOVERS)),
//! each with its own holding list ([`Celery::held_list`]) and at most one script call in
//! flight. One call of `take.lua` *places* the messages the mover's previous call fetched —
//! each popped from the holding list and checked, byte for byte, against the message the node
//! decoded — and *fetches* the next batch: it tops the holding list up from the kombu lists
//! (`LMOVE`, oldest first, the queue itself before its priority sub-queues) and returns up to
//! `celery.batch` of its oldest messages. The node decodes them ([`placement`]: JSON, the
//! task id rule, the task mapping — in Rust, not in Redis' Lua) while the other movers' calls
//! run in Redis, and sends them back with the next call. Killing the bridge or the node at
//! any moment loses and duplicates nothing: a message is in a kombu list, a holding list, or
//! (placed whole by one script) a stream or the dead letters; a message fetched and not yet
//! placed is still in its holding list, and the next call (of this bridge after a restart, or
//! another node's) fetches it again.
//!
//! At start every mover fetches once (its holding list may keep messages from before a kill);
//! then mover 0 runs whenever there may be messages, the others join while its fetches come
//! back full, and each stops when a fetch comes back empty.
//!
//! # Waiting
//!
//! When every mover is idle the bridge waits with one `BLMOVE <list> <mover 0's holding
//! list> RIGHT LEFT <poll>` per kombu list — the queue and each priority sub-queue, each on
//! its own connection — so a message is moved at once (atomically, into Redis' own keeping)
//! whatever its priority; its raw text comes back with the reply and mover 0 places it with
//! its next call. Lua cannot block and `BRPOP`/`BLMPOP` hand the message to the client, where
//! a crash would lose it. A wait still blocked when the movers start again moves at most one
//! more message, which a fetch picks up from the holding list. `celery.poll` is the waits'
//! timeout; it paces only the housekeeping below while the queue is empty.
//!
//! # Holding lists of dead nodes
//!
//! Each holding list is registered in the queue's registry ([`Celery::holding_key`]) before
//! anything can be moved into it — by `take.lua` in the same script, by a wait in the same
//! round trip — as valid until the longest such move could end plus [`HOLD_GRACE`] (Redis'
//! clock). Every [`SWEEP`] (and at start) `sweep.lua` returns the lists whose registration ran
//! out and that still hold messages: their node died (or lost Redis for that long). The next
//! fetches move their messages into this bridge's holding list first. A live node's list is
//! never adopted while it is registered, so registering and sweeping cannot race; were one
//! adopted anyway, its mover's check of each message it places keeps every message whole.
//!
//! A message whose Celery task id is taken (its task is queued, running or ended less than
//! `broker.result_ttl` ago — the runtime's rule for chosen ids) is a duplicate: `take.lua`
//! drops it in the same step, and it is counted and logged here with its id. Counters live
//! outside the actor ([`BridgeCounters`]) and survive its restarts.
//!
//! Snapshot: `{kombu_queue, lists, movers, held_list, held_lists, moved, moved_per_s,
//! dead_lettered, duplicates, polls, blocks, take_ms: {p50, p99, max, samples}, errors,
//! last_error}`: `held_list` is mover 0's (where the waits move), `polls` counts `take.lua`
//! calls, `blocks` the waits; `moved_per_s` is the rate over the last second or more;
//! `take_ms` is the time from a wait's return with a message to the answer of the call that
//! placed it, over the last [`LATENCY_SAMPLES`] such calls.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use redis::Script;
use redis::aio::MultiplexedConnection;
use std::borrow::Cow;

use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Celery;
use super::lenient::{Lenient, Object, Text};
use crate::broker::redis::evalsha;
use crate::broker::{check_id, rfc3339};
use crate::metrics::BridgeSeries;
use crate::tree::TreeHandle;

/// How often a bridge looks for holding lists of dead nodes that hold messages.
pub const SWEEP: Duration = Duration::from_secs(10);
/// Calls after a wait kept for `take_ms` in the snapshot.
pub const LATENCY_SAMPLES: usize = 1000;
/// How long a holding list's registration outlives the longest move into it (a wait of
/// `poll`, a script): a node gone for longer has its holding lists adopted by the others.
pub const HOLD_GRACE: Duration = Duration::from_secs(5);
/// Pause before a mover or a wait tries again after a Redis error.
pub const RETRY: Duration = Duration::from_millis(500);
/// Calls a mover makes, at most, to empty its holding list when the bridge stops.
const STOP_CALLS: usize = 8;
/// How long a stopping bridge tries to empty its holding lists.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// What the waits run before their `BLMOVE`, in the same round trip: the holding list
/// (`ARGV[1]`) registered in the registry (`KEYS[1]`) until Redis' now + `ARGV[2]` ms.
const REGISTER: &str = "local t = redis.call('TIME') \
     redis.call('ZADD', KEYS[1], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) \
     + tonumber(ARGV[2]), ARGV[1]) return 1";

/// What a bridge did, kept across its restarts.
#[derive(Debug, Default)]
pub struct BridgeCounters {
    /// `rt_celery_moved` and `rt_celery_take_seconds` of its kombu queue, when metrics are on.
    metrics: Option<BridgeSeries>,
    moved: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates: AtomicU64,
    polls: AtomicU64,
    blocks: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Microseconds from a wait's return with a message to the answer of the call that placed
    /// it, newest last.
    take_us: Mutex<VecDeque<u64>>,
}

impl BridgeCounters {
    /// Counters at zero that also feed `metrics` (from [`Metrics::celery_bridge`]).
    ///
    /// [`Metrics::celery_bridge`]: crate::metrics::Metrics::celery_bridge
    pub fn new(metrics: Option<BridgeSeries>) -> Self {
        Self {
            metrics,
            ..Self::default()
        }
    }

    fn failed(&self, queue: &str, what: &str, err: &redis::RedisError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(queue = %queue, error = %err, "celery bridge: {what} failed; trying again");
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
    }

    fn took(&self, latency: Duration) {
        if let Some(metrics) = &self.metrics {
            metrics.took(latency);
        }
        let mut samples = self.take_us.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() == LATENCY_SAMPLES {
            samples.pop_front();
        }
        samples.push_back(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// `{p50, p99, max, samples}` of the kept take latencies, in milliseconds.
    fn take_ms(&self) -> Value {
        let mut samples: Vec<u64> = self
            .take_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1)))
                .map(|us| *us as f64 / 1000.0)
        };
        json!({
            "p50": at(0.5),
            "p99": at(0.99),
            "max": samples.last().map(|us| *us as f64 / 1000.0),
            "samples": samples.len(),
        })
    }
}

/// Where a fetched message goes, decided from its bytes alone ([`placement`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Into the stream of runtime queue `queue` as `envelope` — unless a task with its id
    /// exists (then it is a duplicate, dropped).
    Move {
        /// Celery's task id, kept.
        id: String,
        /// The runtime task it runs.
        task: String,
        /// The runtime queue.
        queue: String,
        /// The stream entry's envelope JSON: `id`, `task`, `queue`, `enqueued_at` and the raw
        /// message in `celery_raw`.
        envelope: String,
    },
    /// Into the dead letters of `celery.dead_letter_queue`, with `reason`.
    Bury {
        /// Why it cannot run.
        reason: String,
        /// Its task id when it has a usable one: its result becomes FAILURE with the reason.
        rejected: Option<String>,
    },
}

/// Why a message that is not kombu JSON is dead-lettered.
const NOT_KOMBU: &str = "celery: not a kombu message (JSON with `headers`)";

/// The stream entry of a moved message.
#[derive(Serialize)]
struct Entry<'a> {
    id: &'a str,
    task: &'a str,
    queue: &'a str,
    enqueued_at: &'a str,
    celery_raw: &'a str,
}

/// Where the raw kombu message `raw` goes: moved as the runtime task its Celery task is mapped
/// to in `tasks` (Celery name → (runtime task, runtime queue)), enqueued at `at` — or
/// dead-lettered when it is not UTF-8 kombu JSON with a `headers` object, has no `headers.id`
/// string or one the runtime refuses ([`check_id`]), has no `headers.task` string, or names a
/// task mapped to nothing. Only `headers.id` and `headers.task` are read here (the rest is
/// skipped, not built); the consumer decodes the body ([`expand`](super::expand)).
pub fn placement(raw: &[u8], tasks: &HashMap<String, (String, String)>, at: &str) -> Placement {
    let bury = |reason: String| Placement::Bury {
        reason,
        rejected: None,
    };
    let Ok(text) = std::str::from_utf8(raw) else {
        return bury(NOT_KOMBU.into());
    };
    let Ok(Message(Some(headers))) = serde_json::from_str::<Message<'_>>(text) else {
        return bury(NOT_KOMBU.into());
    };
    let id = match headers.id {
        Some(id) if !id.is_empty() => id,
        _ => return bury("celery: message without `headers.id`".into()),
    };
    if let Err(why) = check_id(&id) {
        return bury(format!("celery: `headers.id` {why}"));
    }
    let Some(task) = headers.task else {
        return bury(
            "celery: message without `headers.task` (only protocol v2 is supported)".into(),
        );
    };
    let Some((runtime, queue)) = tasks.get(task.as_ref()) else {
        return Placement::Bury {
            reason: format!("celery: task `{task}` is not mapped to a runtime task"),
            rejected: Some(id.into_owned()),
        };
    };
    let entry = Entry {
        id: &id,
        task: runtime,
        queue,
        enqueued_at: at,
        celery_raw: text,
    };
    match serde_json::to_string(&entry) {
        Ok(envelope) => Placement::Move {
            id: id.into_owned(),
            task: runtime.clone(),
            queue: queue.clone(),
            envelope,
        },
        Err(err) => bury(format!("celery: message not re-encoded: {err}")),
    }
}

/// A kombu message as [`placement`] reads it: a JSON object whose `headers` (the last one, as
/// a JSON object parser keeps it) is `Some` when it is an object. Everything else is skipped
/// without being built.
struct Message<'a>(Option<Headers<'a>>);

/// `headers.id` and `headers.task` when they are strings (the last of each).
#[derive(Default)]
struct Headers<'a> {
    id: Option<Cow<'a, str>>,
    task: Option<Cow<'a, str>>,
}

impl<'de> Deserialize<'de> for Message<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Top;
        impl<'de> Visitor<'de> for Top {
            type Value = Message<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut headers = None;
                while let Some(Text(key)) = map.next_key()? {
                    if key == "headers" {
                        headers = map.next_value::<Object<Headers<'de>>>()?.0;
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Message(headers))
            }
        }
        deserializer.deserialize_map(Top)
    }
}

impl<'de> Deserialize<'de> for Headers<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Headers<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut headers = Headers::default();
                while let Some(Text(key)) = map.next_key()? {
                    match key.as_ref() {
                        "id" => headers.id = map.next_value::<Lenient<'de>>()?.0,
                        "task" => headers.task = map.next_value::<Lenient<'de>>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(headers)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A fetched message and where it goes.
#[derive(Debug)]
pub struct Planned {
    raw: Vec<u8>,
    placement: Placement,
}

/// What a mover's next call places: the messages its last call fetched, oldest first,
/// decided at `at` (their `enqueued_at`).
#[derive(Debug)]
pub struct Plan {
    at: String,
    items: Vec<Planned>,
}

impl Plan {
    fn empty() -> Self {
        Self {
            at: rfc3339(SystemTime::now()),
            items: Vec::new(),
        }
    }

    /// `fetched` as `take.lua` returns it (newest first) decoded, oldest first.
    fn of(fetched: Vec<Vec<u8>>, tasks: &HashMap<String, (String, String)>) -> Self {
        let at = rfc3339(SystemTime::now());
        let items = fetched
            .into_iter()
            .rev()
            .map(|raw| Planned {
                placement: placement(&raw, tasks, &at),
                raw,
            })
            .collect();
        Self { at, items }
    }
}

/// `take.lua`'s answer: placed, codes, stopped, fetched.
type TakeReply = (usize, String, u8, Vec<Vec<u8>>);

/// The call a wait made to place the message it moved: its plan, Redis' answer, how long
/// after the wait returned it was answered, and the orphans' generation it fetched from.
pub struct Placed {
    plan: Plan,
    reply: redis::RedisResult<TakeReply>,
    after: Duration,
    orphans: u64,
}

/// `take.lua`.
const TAKE: &str = include_str!("take.lua");

/// One call of `take.lua`, owning what it needs (it runs in a task of its own).
#[derive(Clone)]
struct Call {
    script: Arc<Script>,
    conn: redis::aio::ConnectionManager,
    /// The holding list, the registry, then the lists a fetch moves from.
    keys: Vec<String>,
    prefix: String,
    dead_letter_queue: String,
    events_maxlen: usize,
    hold_ms: u64,
    fetch: usize,
}

impl Call {
    /// `EVALSHA` built directly ([`evalsha`]: each message's bytes are copied once on their
    /// way out; the script is loaded first if Redis does not have it).
    async fn run(mut self, plan: &Plan) -> redis::RedisResult<TakeReply> {
        let mut invocation = redis::cmd("EVALSHA");
        invocation
            .arg(self.script.get_hash())
            .arg(self.keys.len())
            .arg(&self.keys)
            .arg(&self.prefix)
            .arg(&self.dead_letter_queue)
            .arg(&plan.at)
            .arg(self.events_maxlen)
            .arg(self.hold_ms)
            .arg(self.fetch)
            .arg(plan.items.len());
        for item in &plan.items {
            match &item.placement {
                Placement::Move {
                    id,
                    task,
                    queue,
                    envelope,
                } => invocation
                    .arg("m")
                    .arg(&item.raw)
                    .arg(id)
                    .arg(task)
                    .arg(queue)
                    .arg(envelope),
                Placement::Bury { reason, .. } => invocation
                    .arg("d")
                    .arg(&item.raw)
                    .arg(reason)
                    .arg(json!({ "reason": reason }).to_string()),
            };
        }
        evalsha(&mut self.conn, &invocation, TAKE).await
    }
}

/// A spawned task, aborted when dropped — with the actor's state, also when the actor is
/// killed (`post_stop` does not run then).
struct Owned(JoinHandle<()>);

impl Drop for Owned {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A mover: its holding list and its call in flight.
struct Mover {
    held: String,
    busy: bool,
    /// Waiting [`RETRY`] after an error.
    cooling: bool,
    call: Option<Owned>,
}

/// The blocking wait on one kombu list.
struct Waiter {
    list: String,
    /// Its own connection (a blocked command holds a connection up), kept between waits.
    conn: Option<MultiplexedConnection>,
    armed: bool,
    /// Waiting [`RETRY`] after an error.
    cooling: bool,
    task: Option<Owned>,
}

/// Spawn arguments.
#[derive(Debug, Clone)]
pub struct BridgeArgs {
    /// Place in the tree.
    pub node: TreeHandle,
    /// The shared half of the bridge.
    pub celery: Arc<Celery>,
    /// The kombu queue taken over.
    pub queue: String,
    /// Counters (outlive restarts).
    pub counters: Arc<BridgeCounters>,
}

/// Messages.
pub enum BridgeMessage {
    /// Fetch with every idle mover (sent once, at start).
    Poll,
    /// A mover's call answered; `orphans` is the generation of the orphans it fetched from.
    Took {
        mover: usize,
        plan: Plan,
        orphans: u64,
        reply: redis::RedisResult<TakeReply>,
    },
    /// The wait on kombu list `list` ended: `Ok(true)` moved a message into mover 0's holding
    /// list (and `placed` is the call that placed it at once, from the wait's own task),
    /// `Ok(false)` timed out; `conn` is its connection back, unless it failed.
    Woken {
        list: usize,
        conn: Option<MultiplexedConnection>,
        moved: redis::RedisResult<bool>,
        placed: Option<Placed>,
    },
    /// A mover tries again after an error.
    Resume(usize),
    /// A wait tries again after an error.
    Rewait(usize),
}

impl std::fmt::Debug for BridgeMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Poll => write!(f, "Poll"),
            Self::Took { mover, plan, .. } => {
                write!(f, "Took(mover {mover}, {} placed)", plan.items.len())
            }
            Self::Woken { list, .. } => write!(f, "Woken(list {list})"),
            Self::Resume(mover) => write!(f, "Resume({mover})"),
            Self::Rewait(list) => write!(f, "Rewait({list})"),
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BridgeActor;

/// Bridge state.
pub struct BridgeState {
    args: BridgeArgs,
    /// The kombu lists, in the order they are consumed.
    lists: Vec<String>,
    registry: String,
    legacy: String,
    movers: Vec<Mover>,
    waiters: Vec<Waiter>,
    /// Holding lists of dead nodes found holding messages, drained by the next fetches.
    orphans: Vec<String>,
    /// Bumped each time `orphans` is set: a fetch that came back short empties them only if
    /// it fetched from these.
    orphan_generation: u64,
    last_sweep: Instant,
    script: Arc<Script>,
    sweep: Script,
    /// A wait moved a message while mover 0 was busy: fetch once more when it is done.
    wake_pending: bool,
    /// Start of the `moved_per_s` window and `moved` then.
    window: (Instant, u64),
    moved_per_s: f64,
}

impl std::fmt::Debug for BridgeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BridgeState")
            .field("queue", &self.args.queue)
            .field("movers", &self.movers.len())
            .finish_non_exhaustive()
    }
}

impl Actor for BridgeActor {
    type Msg = BridgeMessage;
    type State = BridgeState;
    type Arguments = BridgeArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: BridgeArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let celery = &args.celery;
        let lists = celery.lists(&args.queue);
        let movers = (0..celery.settings().movers.max(1))
            .map(|n| Mover {
                held: celery.held_list(&args.queue, n),
                busy: false,
                cooling: false,
                call: None,
            })
            .collect();
        let waiters = lists
            .iter()
            .map(|list| Waiter {
                list: list.clone(),
                conn: None,
                armed: false,
                cooling: false,
                task: None,
            })
            .collect();
        let moved = args.counters.moved.load(Ordering::Relaxed);
        let mut state = BridgeState {
            registry: celery.holding_key(&args.queue),
            legacy: celery.legacy_holders_key(&args.queue),
            lists,
            movers,
            waiters,
            orphans: Vec::new(),
            orphan_generation: 0,
            last_sweep: Instant::now(),
            script: Arc::new(Script::new(TAKE)),
            sweep: Script::new(include_str!("sweep.lua")),
            wake_pending: false,
            window: (Instant::now(), moved),
            moved_per_s: 0.0,
            args,
        };
        state.find_orphans().await;
        state.publish();
        myself.send_message(BridgeMessage::Poll)?;
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if state.last_sweep.elapsed() >= SWEEP {
            state.find_orphans().await;
            if !state.orphans.is_empty() {
                state.start(0, &myself);
            }
        }
        match message {
            // Every mover at start: each places what its holding list kept from before (a
            // kill, a crash of a node of the same name), and the ones that find nothing stop.
            BridgeMessage::Poll => {
                for mover in 0..state.movers.len() {
                    state.start(mover, &myself);
                }
            }
            BridgeMessage::Took {
                mover,
                plan,
                orphans,
                reply,
            } => state.took(mover, plan, orphans, reply, &myself),
            BridgeMessage::Woken {
                list,
                conn,
                moved,
                placed,
            } => state.woken(list, conn, moved, placed, &myself),
            BridgeMessage::Resume(mover) => {
                if let Some(m) = state.movers.get_mut(mover) {
                    m.cooling = false;
                }
                state.start(mover, &myself);
            }
            BridgeMessage::Rewait(list) => {
                if let Some(w) = state.waiters.get_mut(list) {
                    w.cooling = false;
                }
            }
        }
        state.wait(&myself);
        state.publish();
        Ok(())
    }

    /// Messages in this bridge's holding lists — moved by a wait, or fetched and not placed
    /// yet — are placed before it stops (else they would wait there for this node's next
    /// start, or another node's sweep once the registration runs out).
    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        for waiter in &mut state.waiters {
            waiter.task = None;
        }
        for mover in &mut state.movers {
            mover.call = None;
        }
        let flush = async {
            for mover in 0..state.movers.len() {
                state.flush(mover).await;
            }
        };
        if tokio::time::timeout(STOP_WITHIN, flush).await.is_err() {
            tracing::warn!(queue = %state.args.queue,
                "celery bridge: its holding lists were not emptied before it stopped; \
                 they are placed at its next start or adopted by another node");
        }
        Ok(())
    }
}

impl BridgeState {
    /// A call of mover `mover`: placing `plan`, then fetching `fetch` messages from its
    /// holding list topped up from `sources`.
    fn call(&self, mover: usize, sources: &[String], fetch: usize) -> Call {
        let celery = &self.args.celery;
        let hold = celery.settings().poll + HOLD_GRACE;
        let mut keys = vec![self.movers[mover].held.clone(), self.registry.clone()];
        keys.extend(sources.iter().cloned());
        Call {
            script: Arc::clone(&self.script),
            conn: celery.broker.clone(),
            keys,
            prefix: celery.runtime_prefix.clone(),
            dead_letter_queue: celery.settings().dead_letter_queue.clone(),
            events_maxlen: celery.events_maxlen,
            hold_ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            fetch,
        }
    }

    /// Starts mover `mover` with an empty plan (a fetch), unless it is busy or cooling.
    fn start(&mut self, mover: usize, myself: &ActorRef<BridgeMessage>) {
        if self
            .movers
            .get(mover)
            .is_some_and(|m| !m.busy && !m.cooling)
        {
            self.launch(mover, Plan::empty(), myself);
        }
    }

    /// Spawns mover `mover`'s next call: placing `plan`, fetching the next batch.
    fn launch(&mut self, mover: usize, plan: Plan, myself: &ActorRef<BridgeMessage>) {
        let sources: Vec<String> = self.orphans.iter().chain(&self.lists).cloned().collect();
        let call = self.call(mover, &sources, self.args.celery.settings().batch);
        let orphans = self.orphan_generation;
        self.args.counters.polls.fetch_add(1, Ordering::Relaxed);
        let myself = myself.clone();
        let task = tokio::spawn(async move {
            let reply = call.run(&plan).await;
            let _ = myself.send_message(BridgeMessage::Took {
                mover,
                plan,
                orphans,
                reply,
            });
        });
        let m = &mut self.movers[mover];
        m.busy = true;
        m.call = Some(Owned(task));
    }

    /// A mover's call answered: count what it placed, decode what it fetched and go on — or
    /// stop the mover when it fetched nothing.
    fn took(
        &mut self,
        mover: usize,
        plan: Plan,
        orphans: u64,
        reply: redis::RedisResult<TakeReply>,
        myself: &ActorRef<BridgeMessage>,
    ) {
        let Some(m) = self.movers.get_mut(mover) else {
            return;
        };
        m.busy = false;
        m.call = None;
        let (placed, codes, stopped, fetched) = match reply {
            Ok(reply) => reply,
            Err(err) => {
                m.cooling = true;
                self.args
                    .counters
                    .failed(&self.args.queue, "moving messages", &err);
                myself.send_after(RETRY, move || BridgeMessage::Resume(mover));
                return;
            }
        };
        if stopped != 0 {
            tracing::debug!(queue = %self.args.queue, mover,
                "celery bridge: a holding list changed under its mover; reading it again");
        }
        self.count(&plan, placed, &codes);
        let batch = self.args.celery.settings().batch;
        let full = fetched.len() >= batch;
        if !full && orphans == self.orphan_generation {
            // Every list it fetched from, the orphans too, was empty.
            self.orphans.clear();
        }
        if fetched.is_empty() {
            if mover == 0 && std::mem::take(&mut self.wake_pending) {
                self.start(0, myself);
            }
            return;
        }
        let next = Plan::of(fetched, &self.args.celery.settings().tasks);
        self.launch(mover, next, myself);
        if full {
            for other in 0..self.movers.len() {
                self.start(other, myself);
            }
        }
    }

    /// Counts and logs what a call placed (the first `placed` messages of `plan`, `codes` one
    /// letter each); writes FAILURE for the dead-lettered ones that have an id.
    fn count(&self, plan: &Plan, placed: usize, codes: &str) {
        let counters = &self.args.counters;
        let (mut moved, mut dead, mut duplicates) = (0u64, 0u64, 0u64);
        let mut rejected = Vec::new();
        for (item, code) in plan.items.iter().zip(codes.bytes()).take(placed) {
            match (code, &item.placement) {
                (b'm', _) => moved += 1,
                (b'u', Placement::Move { id, .. }) => {
                    duplicates += 1;
                    tracing::warn!(queue = %self.args.queue, task_id = %id,
                        "celery message dropped: a task with its id exists (a duplicate)");
                }
                (
                    b'd',
                    Placement::Bury {
                        reason,
                        rejected: id,
                    },
                ) => {
                    dead += 1;
                    if let Some(id) = id {
                        rejected.push((id.clone(), reason.clone()));
                    }
                }
                _ => {}
            }
        }
        counters.moved.fetch_add(moved, Ordering::Relaxed);
        if let Some(metrics) = &counters.metrics {
            metrics.moved(moved);
        }
        counters.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        counters.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        if dead > 0 {
            tracing::warn!(queue = %self.args.queue, dead,
                "malformed celery messages dead-lettered");
        }
        // Unmapped tasks: FAILURE in Celery's backend, so `.get()` raises.
        if !rejected.is_empty() {
            let celery = Arc::clone(&self.args.celery);
            tokio::spawn(async move {
                for (id, reason) in rejected {
                    if let Err(err) = celery.rejected(&id, &reason).await {
                        tracing::warn!(task_id = %id, error = %err,
                            "celery FAILURE result not written");
                    }
                }
            });
        }
    }

    /// The wait on list `list` ended.
    fn woken(
        &mut self,
        list: usize,
        conn: Option<MultiplexedConnection>,
        moved: redis::RedisResult<bool>,
        placed: Option<Placed>,
        myself: &ActorRef<BridgeMessage>,
    ) {
        let Some(w) = self.waiters.get_mut(list) else {
            return;
        };
        w.armed = false;
        w.task = None;
        w.conn = conn;
        if let Err(err) = moved {
            w.cooling = true;
            self.args
                .counters
                .failed(&self.args.queue, "waiting for messages", &err);
            myself.send_after(RETRY, move || BridgeMessage::Rewait(list));
            // A wait that failed may have moved a message before: look.
            self.wake_pending = true;
            self.start(0, myself);
            return;
        }
        let Some(Placed {
            plan,
            reply,
            after,
            orphans,
        }) = placed
        else {
            return;
        };
        if let Ok((placed, ..)) = &reply
            && *placed > 0
        {
            self.args.counters.took(after);
        }
        let m = &self.movers[0];
        if m.busy || m.cooling {
            // Mover 0 fetches what this call did not place (the wait's message if it is
            // still there), once its own call is answered.
            match &reply {
                Ok((placed, codes, ..)) => self.count(&plan, *placed, codes),
                Err(err) => {
                    self.args
                        .counters
                        .failed(&self.args.queue, "moving messages", err);
                }
            }
            self.wake_pending = true;
        } else {
            // As if mover 0 had made the call: it goes on with what the call fetched.
            self.took(0, plan, orphans, reply, myself);
        }
    }

    /// When every mover is idle, starts a wait on each kombu list that has none. A wait that
    /// moves a message places it at once, from its own task, with a call of mover 0 (the
    /// shortest way from `.delay()` to the stream).
    fn wait(&mut self, myself: &ActorRef<BridgeMessage>) {
        if self.movers.iter().any(|m| m.busy || m.cooling) {
            return;
        }
        let celery = &self.args.celery;
        let poll = celery.settings().poll;
        let hold = u64::try_from((poll + HOLD_GRACE).as_millis()).unwrap_or(u64::MAX);
        let held = self.movers[0].held.clone();
        let sources: Vec<String> = self.orphans.iter().chain(&self.lists).cloned().collect();
        let call = self.call(0, &sources, celery.settings().batch);
        let orphans = self.orphan_generation;
        for (list, w) in self.waiters.iter_mut().enumerate() {
            if w.armed || w.cooling {
                continue;
            }
            self.args.counters.blocks.fetch_add(1, Ordering::Relaxed);
            let client = celery.broker_client.clone();
            let conn = w.conn.take();
            let (source, held, registry) = (w.list.clone(), held.clone(), self.registry.clone());
            let (celery, counters, call) = (
                Arc::clone(celery),
                Arc::clone(&self.args.counters),
                call.clone(),
            );
            let myself = myself.clone();
            let task = tokio::spawn(async move {
                let (conn, moved) =
                    wait_once(client, conn, poll, &source, &held, &registry, hold).await;
                let placed = match &moved {
                    Ok(Some(raw)) => {
                        let returned = Instant::now();
                        let plan = Plan::of(vec![raw.clone()], &celery.settings().tasks);
                        counters.polls.fetch_add(1, Ordering::Relaxed);
                        let reply = call.run(&plan).await;
                        Some(Placed {
                            plan,
                            reply,
                            after: returned.elapsed(),
                            orphans,
                        })
                    }
                    _ => None,
                };
                let moved = moved.map(|raw| raw.is_some());
                let _ = myself.send_message(BridgeMessage::Woken {
                    list,
                    conn,
                    moved,
                    placed,
                });
            });
            w.armed = true;
            w.task = Some(Owned(task));
        }
    }

    /// Places what is in mover `mover`'s holding list, without taking more from the kombu
    /// lists (the bridge is stopping).
    async fn flush(&mut self, mover: usize) {
        let batch = self.args.celery.settings().batch;
        let mut plan = Plan::empty();
        for _ in 0..STOP_CALLS {
            let reply = self.call(mover, &[], batch).run(&plan).await;
            match reply {
                Ok((placed, codes, _, fetched)) => {
                    self.count(&plan, placed, &codes);
                    if fetched.is_empty() {
                        return;
                    }
                    plan = Plan::of(fetched, &self.args.celery.settings().tasks);
                }
                Err(err) => {
                    self.args
                        .counters
                        .failed(&self.args.queue, "moving messages", &err);
                    return;
                }
            }
        }
    }

    /// Looks for holding lists of dead nodes that hold messages (`sweep.lua`).
    async fn find_orphans(&mut self) {
        self.last_sweep = Instant::now();
        let celery = &self.args.celery;
        let mut conn = celery.broker.clone();
        let found: redis::RedisResult<Vec<String>> = self
            .sweep
            .key(&self.registry)
            .key(&self.legacy)
            .arg(&celery.runtime_prefix)
            .arg(&self.args.queue)
            .invoke_async(&mut conn)
            .await;
        let mut found = match found {
            Ok(found) => found,
            Err(err) => {
                self.args
                    .counters
                    .failed(&self.args.queue, "looking for holding lists", &err);
                return;
            }
        };
        found.retain(|list| !self.movers.iter().any(|m| &m.held == list));
        found.sort_unstable();
        found.dedup();
        if !found.is_empty() {
            tracing::warn!(queue = %self.args.queue, lists = ?found,
                "celery bridge: moving messages left in holding lists of dead nodes");
            self.orphans = found;
            self.orphan_generation += 1;
        }
    }

    fn publish(&mut self) {
        let c = &self.args.counters;
        let moved = c.moved.load(Ordering::Relaxed);
        let elapsed = self.window.0.elapsed();
        if elapsed >= Duration::from_secs(1) {
            self.moved_per_s =
                ((moved.saturating_sub(self.window.1)) as f64 / elapsed.as_secs_f64() * 10.0)
                    .round()
                    / 10.0;
            self.window = (Instant::now(), moved);
        }
        let held: Vec<&str> = self.movers.iter().map(|m| m.held.as_str()).collect();
        self.args.node.publish(json!({
            "kombu_queue": self.args.queue,
            "lists": self.lists.len(),
            "movers": self.movers.len(),
            "held_list": held.first(),
            "held_lists": held,
            "moved": moved,
            "moved_per_s": self.moved_per_s,
            "dead_lettered": c.dead_lettered.load(Ordering::Relaxed),
            "duplicates": c.duplicates.load(Ordering::Relaxed),
            "polls": c.polls.load(Ordering::Relaxed),
            "blocks": c.blocks.load(Ordering::Relaxed),
            "take_ms": c.take_ms(),
            "errors": c.errors.load(Ordering::Relaxed),
            "last_error": *c.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        }));
    }
}

/// One wait: registers `held` in `registry` (valid `hold_ms` from Redis' now), then
/// `BLMOVE source held RIGHT LEFT poll`, in one round trip on the wait's own connection
/// (made when `conn` is `None`). Returns the connection (unless it failed) and the moved
/// message, if any.
async fn wait_once(
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    poll: Duration,
    source: &str,
    held: &str,
    registry: &str,
    hold_ms: u64,
) -> (
    Option<MultiplexedConnection>,
    redis::RedisResult<Option<Vec<u8>>>,
) {
    let mut conn = match conn {
        Some(conn) => conn,
        None => {
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(poll + Duration::from_secs(5)));
            match client
                .get_multiplexed_async_connection_with_config(&config)
                .await
            {
                Ok(conn) => conn,
                Err(err) => return (None, Err(err)),
            }
        }
    };
    let timeout = format!("{:.3}", poll.max(Duration::from_millis(1)).as_secs_f64());
    let mut pipe = redis::pipe();
    pipe.cmd("EVAL")
        .arg(REGISTER)
        .arg(1)
        .arg(registry)
        .arg(held)
        .arg(hold_ms)
        .ignore();
    pipe.cmd("BLMOVE")
        .arg(source)
        .arg(held)
        .arg("RIGHT")
        .arg("LEFT")
        .arg(timeout);
    match pipe.query_async::<(Option<Vec<u8>>,)>(&mut conn).await {
        Ok((moved,)) => (Some(conn), Ok(moved)),
        Err(err) => (None, Err(err)),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::test_util::fuzz_cases;

    /// What [`placement`] decides, read the plain way (the whole message as a `Value`): the
    /// lean reader must agree with it on every input.
    fn oracle(raw: &[u8], tasks: &HashMap<String, (String, String)>) -> Result<String, String> {
        let not_kombu = || Err(NOT_KOMBU.to_string());
        let Ok(text) = std::str::from_utf8(raw) else {
            return not_kombu();
        };
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return not_kombu();
        };
        let Some(headers) = message.get("headers").and_then(Value::as_object) else {
            return not_kombu();
        };
        let id = match headers.get("id") {
            Some(Value::String(id)) if !id.is_empty() => id,
            _ => return Err("celery: message without `headers.id`".into()),
        };
        if let Err(why) = check_id(id) {
            return Err(format!("celery: `headers.id` {why}"));
        }
        let Some(task) = headers.get("task").and_then(Value::as_str) else {
            return Err(
                "celery: message without `headers.task` (only protocol v2 is supported)".into(),
            );
        };
        match tasks.get(task) {
            Some(_) => Ok(id.clone()),
            None => Err(format!(
                "celery: task `{task}` is not mapped to a runtime task"
            )),
        }
    }

    fn decided(placement: Placement) -> Result<String, String> {
        match placement {
            Placement::Move { id, .. } => Ok(id),
            Placement::Bury { reason, .. } => Err(reason),
        }
    }

    /// Any JSON value, a few levels deep, with strings that need escapes.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            prop_oneof![
                Just("tasks.add".to_string()),
                Just("c-1".to_string()),
                Just(String::new()),
                ".{0,6}",
                "\\PC{0,4}",
            ]
            .prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::vec(
                    (
                        prop_oneof![Just("id"), Just("task"), Just("headers"), Just("x")],
                        inner
                    ),
                    0..4
                )
                .prop_map(|fields| {
                    Value::Object(
                        fields
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), v))
                            .collect(),
                    )
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases(2000)))]

        /// Hostile messages — any shape, repeated keys, escapes, junk bytes — are decided as
        /// reading the whole message would decide them, and never panic.
        #[test]
        fn the_lean_reader_decides_as_the_whole_message_would(
            top in json_value(),
            headers in json_value(),
            id in json_value(),
            task in json_value(),
            repeat in any::<bool>(),
            junk in prop::collection::vec(any::<u8>(), 0..8),
        ) {
            let tasks = tasks();
            // A kombu-like message built by hand (so keys can repeat, as raw JSON allows).
            let mut headers_text = match &headers {
                Value::Object(_) => headers.to_string(),
                _ => json!({ "id": id, "task": task }).to_string(),
            };
            if repeat {
                headers_text = format!(
                    "{{\"id\":{},\"task\":{},\"id\":{id},\"task\":{task}}}",
                    json!("first"), json!("tasks.add"));
            }
            let raw = format!("{{\"body\":{top},\"headers\":{headers_text},\"properties\":{{}}}}");
            for message in [raw.as_bytes().to_vec(), [raw.as_bytes(), &junk].concat(),
                            top.to_string().into_bytes(), junk.clone()] {
                prop_assert_eq!(
                    decided(placement(&message, &tasks, "t")),
                    oracle(&message, &tasks),
                    "{}", String::from_utf8_lossy(&message)
                );
            }
        }
    }

    fn tasks() -> HashMap<String, (String, String)> {
        [(
            "tasks.add".to_string(),
            ("rt_add".to_string(), "default".to_string()),
        )]
        .into()
    }

    fn raw(headers: Value) -> Vec<u8> {
        json!({ "body": "W1tdLCB7fSwge31d", "content-type": "application/json",
                "headers": headers, "properties": { "body_encoding": "base64" } })
        .to_string()
        .into_bytes()
    }

    fn buried(placement: Placement) -> (String, Option<String>) {
        match placement {
            Placement::Bury { reason, rejected } => (reason, rejected),
            other => panic!("not dead-lettered: {other:?}"),
        }
    }

    #[test]
    fn a_mapped_message_becomes_its_stream_entry_with_the_raw_text_kept() {
        let message = raw(json!({ "id": "c-1", "task": "tasks.add", "lang": "py" }));
        let at = "2026-01-01T00:00:00.000Z";
        let Placement::Move {
            id,
            task,
            queue,
            envelope,
        } = placement(&message, &tasks(), at)
        else {
            panic!("not moved");
        };
        assert_eq!(
            (id.as_str(), task.as_str(), queue.as_str()),
            ("c-1", "rt_add", "default")
        );
        let entry: Value = serde_json::from_str(&envelope).unwrap();
        assert_eq!(entry["id"], "c-1");
        assert_eq!(entry["task"], "rt_add");
        assert_eq!(entry["queue"], "default");
        assert_eq!(entry["enqueued_at"], at);
        assert_eq!(
            entry["celery_raw"].as_str().unwrap().as_bytes(),
            message.as_slice(),
            "the raw message is kept byte for byte"
        );
        // The consumer reads it back as an envelope and expands it.
        let mut envelope = crate::broker::Envelope::from_json(&envelope).unwrap();
        crate::celery::expand(&mut envelope).unwrap();
        assert_eq!(envelope.extra["celery"]["task"], "tasks.add");
    }

    #[test]
    fn each_malformed_message_is_dead_lettered_with_its_reason() {
        let not_kombu = "celery: not a kombu message (JSON with `headers`)";
        for message in [
            b"not json at all".to_vec(),
            b"\xff\xfe{}".to_vec(),
            b"[1, 2]".to_vec(),
            br#"{"headers": "x"}"#.to_vec(),
            br#"{"headers": [1]}"#.to_vec(),
        ] {
            assert_eq!(
                buried(placement(&message, &tasks(), "t")),
                (not_kombu.to_string(), None),
                "{}",
                String::from_utf8_lossy(&message)
            );
        }
        for (headers, reason) in [
            (
                json!({ "task": "tasks.add" }),
                "celery: message without `headers.id`",
            ),
            (
                json!({ "id": "", "task": "tasks.add" }),
                "celery: message without `headers.id`",
            ),
            (
                json!({ "id": 7, "task": "tasks.add" }),
                "celery: message without `headers.id`",
            ),
            (
                json!({ "id": "bad\u{1}id", "task": "tasks.add" }),
                "celery: `headers.id` holds a control character (U+0001 at byte 3)",
            ),
            (
                json!({ "id": "..", "task": "tasks.add" }),
                "celery: `headers.id` `..` cannot be read back at GET /tasks/{id} (HTTP clients resolve it away)",
            ),
            (
                json!({ "id": "x".repeat(300), "task": "tasks.add" }),
                "celery: `headers.id` is 300 bytes, over the limit of 256",
            ),
            (
                json!({ "id": "c-1", "task": ["tasks.add"] }),
                "celery: message without `headers.task` (only protocol v2 is supported)",
            ),
        ] {
            assert_eq!(
                buried(placement(&raw(headers.clone()), &tasks(), "t")),
                (reason.to_string(), None),
                "{headers}"
            );
        }
        // An unmapped task has a usable id: its result says why.
        let unmapped = raw(json!({ "id": "c-2", "task": "tasks.nope" }));
        assert_eq!(
            buried(placement(&unmapped, &tasks(), "t")),
            (
                "celery: task `tasks.nope` is not mapped to a runtime task".to_string(),
                Some("c-2".to_string())
            )
        );
    }

    #[test]
    fn a_plan_is_the_fetched_messages_oldest_first() {
        // take.lua answers with the holding list's order: newest first.
        let fetched = vec![
            raw(json!({ "id": "new", "task": "tasks.add" })),
            b"junk".to_vec(),
            raw(json!({ "id": "old", "task": "tasks.add" })),
        ];
        let plan = Plan::of(fetched, &tasks());
        let ids: Vec<&str> = plan
            .items
            .iter()
            .map(|item| match &item.placement {
                Placement::Move { id, .. } => id.as_str(),
                Placement::Bury { .. } => "dead",
            })
            .collect();
        assert_eq!(ids, ["old", "dead", "new"]);
        assert_eq!(plan.items[1].raw, b"junk");
    }

    /// `take.lua` against a real Redis: the calls of one mover on `held`, fetching from `celery`.
    struct Rig {
        _server: crate::test_util::RedisServer,
        conn: redis::aio::ConnectionManager,
        script: Arc<Script>,
    }

    impl Rig {
        async fn start() -> Self {
            let server = crate::test_util::RedisServer::start();
            let client = redis::Client::open(server.url()).unwrap();
            // The node's own timeouts (a loaded test machine can pause for a while).
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(2)))
                .set_response_timeout(Some(Duration::from_secs(5)));
            let conn = redis::aio::ConnectionManager::new_with_config(client, config)
                .await
                .unwrap();
            Self {
                _server: server,
                conn,
                script: Arc::new(Script::new(TAKE)),
            }
        }

        async fn call(&self, plan: &Plan, fetch: usize) -> TakeReply {
            let call = Call {
                script: Arc::clone(&self.script),
                conn: self.conn.clone(),
                keys: ["held", "rt:celery:holding:celery", "celery"]
                    .map(String::from)
                    .to_vec(),
                prefix: "rt".into(),
                dead_letter_queue: "default".into(),
                events_maxlen: 100,
                hold_ms: 6000,
                fetch,
            };
            call.run(plan).await.unwrap()
        }

        async fn list(&self, key: &str) -> Vec<Vec<u8>> {
            let mut conn = self.conn.clone();
            redis::cmd("LRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap()
        }

        async fn push(&self, key: &str, messages: &[Vec<u8>]) {
            let mut conn = self.conn.clone();
            let _: () = redis::cmd("LPUSH")
                .arg(key)
                .arg(messages)
                .query_async(&mut conn)
                .await
                .unwrap();
        }

        async fn stream_ids(&self) -> Vec<String> {
            let mut conn = self.conn.clone();
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg("rt:{default}:stream")
                .arg("-")
                .arg("+")
                .query_async(&mut conn)
                .await
                .unwrap();
            entries
                .iter()
                .map(|(_, fields)| {
                    let e: Value = serde_json::from_str(&fields[0].1).unwrap();
                    e["id"].as_str().unwrap().to_string()
                })
                .collect()
        }
    }

    fn message(id: &str) -> Vec<u8> {
        raw(json!({ "id": id, "task": "tasks.add" }))
    }

    /// A fetch moves the oldest messages into the holding list and returns them; the next call
    /// places exactly those, in order, and fetches the rest.
    #[tokio::test]
    async fn a_call_places_what_the_last_one_fetched_and_fetches_the_next() {
        let rig = Rig::start().await;
        // LPUSH: m1 is the oldest (rightmost).
        rig.push("celery", &["m1", "m2", "m3"].map(message)).await;
        let (placed, _, stopped, fetched) = rig.call(&Plan::empty(), 2).await;
        assert_eq!((placed, stopped), (0, 0));
        assert_eq!(fetched, [message("m2"), message("m1")], "newest first");
        assert_eq!(rig.list("celery").await, [message("m3")]);
        assert_eq!(
            rig.list("held").await,
            fetched,
            "fetched = held, not popped"
        );
        // Redis lost the script (a restart, `SCRIPT FLUSH`): it is loaded again.
        let mut conn = rig.conn.clone();
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let plan = Plan::of(fetched, &tasks());
        let (placed, codes, stopped, fetched) = rig.call(&plan, 2).await;
        assert_eq!((placed, codes.as_str(), stopped), (2, "mm", 0));
        assert_eq!(fetched, [message("m3")]);
        assert_eq!(rig.stream_ids().await, ["m1", "m2"]);
        let plan = Plan::of(fetched, &tasks());
        let (placed, codes, _, fetched) = rig.call(&plan, 2).await;
        assert_eq!((placed, codes.as_str(), fetched.len()), (1, "m", 0));
        assert_eq!(rig.stream_ids().await, ["m1", "m2", "m3"]);
        assert!(rig.list("held").await.is_empty());
        // The list was registered until Redis' now + hold_ms.
        let mut conn = rig.conn.clone();
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg("rt:celery:holding:celery")
            .arg("held")
            .query_async(&mut conn)
            .await
            .unwrap();
        let now_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis() as f64;
        assert!(
            score.is_some_and(|s| s > now_ms + 4000.0 && s < now_ms + 8000.0),
            "{score:?}"
        );
    }

    /// When the holding list is not what the plan expects (another node adopted its messages,
    /// a wait moved one in between), the call places the matching prefix only, takes nothing
    /// else off the list, and fetches the list as it is: every message is placed once.
    #[tokio::test]
    async fn a_plan_that_no_longer_matches_the_holding_list_places_nothing_twice() {
        let rig = Rig::start().await;
        rig.push("held", &["a", "b", "c"].map(message)).await;
        let (_, _, _, fetched) = rig.call(&Plan::empty(), 3).await;
        let plan = Plan::of(fetched, &tasks()); // a, b, c
        // Meanwhile someone else took `a` and `b` and placed them; `d` was moved in.
        let mut conn = rig.conn.clone();
        let _: () = redis::cmd("RPOP")
            .arg("held")
            .arg(2)
            .query_async(&mut conn)
            .await
            .unwrap();
        rig.push("held", &[message("d")]).await;
        let (placed, codes, stopped, fetched) = rig.call(&plan, 3).await;
        assert_eq!((placed, codes.as_str(), stopped), (0, "", 1));
        assert_eq!(fetched, [message("d"), message("c")], "the list as it is");
        assert!(rig.stream_ids().await.is_empty());
        // A plan whose prefix matches: that prefix is placed, the rest stays.
        let stale = Plan::of(vec![message("x"), message("c")], &tasks()); // c, then x
        let (placed, codes, stopped, fetched) = rig.call(&stale, 3).await;
        assert_eq!((placed, codes.as_str(), stopped), (1, "m", 1));
        assert_eq!(fetched, [message("d")]);
        assert_eq!(rig.stream_ids().await, ["c"]);
        // The same message twice (published twice): the second is a duplicate, dropped.
        rig.push("held", &[message("c")]).await;
        let (_, _, _, fetched) = rig.call(&Plan::empty(), 3).await;
        let (placed, codes, _, _) = rig.call(&Plan::of(fetched, &tasks()), 3).await;
        assert_eq!((placed, codes.as_str()), (2, "mu"));
        assert_eq!(rig.stream_ids().await, ["c", "d"]);
    }

    /// Dead-lettered messages go to the dead letters with their reason and raw text; a
    /// wrong-typed key fails the call before anything moves.
    #[tokio::test]
    async fn malformed_messages_are_buried_and_a_wrong_type_moves_nothing() {
        let rig = Rig::start().await;
        rig.push("celery", &[b"junk".to_vec(), message("ok")]).await;
        let (_, _, _, fetched) = rig.call(&Plan::empty(), 10).await;
        let plan = Plan::of(fetched, &tasks());
        let mut conn = rig.conn.clone();
        let _: () = redis::cmd("SET")
            .arg("rt:{default}:stream")
            .arg("x")
            .query_async(&mut conn)
            .await
            .unwrap();
        let call = Call {
            script: Arc::clone(&rig.script),
            conn: rig.conn.clone(),
            keys: ["held", "rt:celery:holding:celery", "celery"]
                .map(String::from)
                .to_vec(),
            prefix: "rt".into(),
            dead_letter_queue: "default".into(),
            events_maxlen: 100,
            hold_ms: 6000,
            fetch: 10,
        };
        let err = call.run(&plan).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("rt:{default}:stream holds a string, not a stream"),
            "{err}"
        );
        assert_eq!(rig.list("held").await.len(), 2, "nothing moved");
        let _: () = redis::cmd("DEL")
            .arg("rt:{default}:stream")
            .query_async(&mut conn)
            .await
            .unwrap();
        let (placed, codes, _, _) = rig.call(&plan, 10).await;
        assert_eq!((placed, codes.as_str()), (2, "dm"), "junk is the oldest");
        let dead: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg("rt:{default}:dead")
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let fields = &dead[0].1;
        assert!(fields.contains(&("e".into(), "junk".into())), "{fields:?}");
        assert!(
            fields.contains(&("reason".into(), NOT_KOMBU.into())),
            "{fields:?}"
        );
    }
}
