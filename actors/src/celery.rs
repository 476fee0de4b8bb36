//! The Celery bridge: Python code keeps calling `.delay()` and `AsyncResult(id).get()` while
//! the runtime runs the task (Celery protocol v2 over kombu's Redis transport, Redis result
//! backend; checked against Celery 5.7).
//!
//! # The path of a message
//!
//! 1. **Taken over** — a [`bridge::BridgeActor`] per kombu queue runs `celery.movers`
//!    movers. A mover's call of `celery/take.lua` moves the oldest messages of the kombu lists
//!    (`q`, then the priority sub-queues `q\x06\x163`, `\x06\x166`, `\x06\x169`: lower number
//!    first) into the mover's holding list and returns them; the node decodes their headers
//!    ([`bridge::placement`]) and the mover's next call places them — checking each against
//!    the holding list byte for byte — `XADD`ing each into the stream of the runtime queue its
//!    task is mapped to, in **one script**: a crash at any moment cannot lose or duplicate a
//!    message (it is in a kombu list, a holding list, or one stream). When the queue is empty
//!    the bridge waits on each of its lists with `BLMOVE` into a holding list, so a message of
//!    any priority is taken at once. Messages that are not kombu JSON, lack `id`/`task`, or
//!    name an unmapped task go to the dead letters of [`CelerySettings::dead_letter_queue`]
//!    with the reason, in the same script. Celery's task id is kept and follows the runtime's
//!    rule for chosen ids ([`crate::broker::check_id`]: refused ids are dead-lettered; a
//!    taken id — its task queued, running, or ended less than `broker.result_ttl` ago — makes
//!    the message a duplicate, dropped in the same script, so a message published twice runs
//!    once). Its task record (`queued`) is written in the step that adds the message, so a
//!    message is never mistaken for a duplicate of itself.
//! 2. **Expanded** — the stream entry carries the raw kombu message in `celery_raw`; the
//!    consumer turns it into a full envelope ([`expand`]) before admission: the body
//!    (base64 JSON `[args, kwargs, embed]`), `eta` (a future one is deferred, not run),
//!    `expires`, `retries` → `attempt`, `timelimit` `[hard, soft]` → limits (each at most
//!    [`MAX_TIME_LIMIT`]), `root_id`, `parent_id`. The consumer then checks the times and
//!    limits as it checks any entry's: one out of range dead-letters the message, naming it. Decoding happens in Rust, not Lua, because Redis' Lua has no base64 and
//!    its cjson re-encodes `[]` as `{}`: doing it in the script would corrupt arguments. The
//!    raw message is kept in the stream entry until the task settles, so a message that
//!    cannot be decoded is dead-lettered with the reason (and the raw text), never dropped.
//!    The Celery side of the envelope (`celery`: task name, callbacks, errbacks, chain) stays
//!    in the envelope's extra fields.
//! 3. **Results** — for an envelope with `celery` origin, the task actor writes
//!    `celery-task-meta-<id>` (SUCCESS / FAILURE / RETRY / REVOKED, STARTED when `track_started`)
//!    with the result TTL and `PUBLISH`es it on the channel of that name: that wakes `.get()`.
//!    Under load results are written in batches (one pipeline for whatever is queued, up to
//!    [`RESULT_BATCH`]; one written while no other is goes at once); each task's outcome is
//!    recorded only once its own result is written.
//!    Tasks without Celery origin pay one map lookup.
//! 4. **Callbacks** — Celery's `link` (callbacks), `link_error` (errbacks) and chains are
//!    settled here, not through the runtime's `link`: a signature whose task is mapped to a
//!    runtime task is enqueued on the runtime (with the id Celery froze into it, so its
//!    `AsyncResult` works, and with Celery origin so its result is written too); any other
//!    is sent to Celery workers as a protocol v2 message (`LPUSH` onto the kombu list of its
//!    `queue` option, else [`CelerySettings::default_queue`]) — the reverse direction, also
//!    open to native handlers through [`Celery::send_task`]. Callbacks get the result as first
//!    argument (unless immutable); errbacks get the failed task's id (Celery's remote-errback
//!    convention); a chain's next step gets the result and the rest of the chain.
//!
//! # Limits
//!
//! The kombu lists must live on the runtime broker's Redis (one script touches both), a
//! single Redis (not Cluster — kombu's lists have no hash tags either). Groups run (each
//! member is an ordinary message; `GroupResult.get()` reads each member's result); **chords
//! are not supported**: a message with a chord is dead-lettered with that reason. Only the
//! JSON serializer is supported. Reverse sends are at least once (a send retried after a
//! Redis error may repeat).

pub mod bridge;
mod lenient;

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::broker::{
    AnyBroker, BrokerError, BrokerSettings, Envelope, TaskQueue, parse_time, rfc3339,
};
use crate::caps::{self, MAX_TIME_LIMIT, Unit};
use crate::handler::TaskError;
use crate::task::settle::BoxFuture;
use crate::task::{Origin, Settled};

/// The envelope field holding the raw kombu message until [`expand`] decodes it.
pub const RAW_FIELD: &str = "celery_raw";
/// The envelope field marking Celery origin: `{task, callbacks, errbacks, chain}`.
pub const ORIGIN_FIELD: &str = "celery";
/// kombu's priority separator: sub-queue `n` of `q` is `q\x06\x16n`.
pub const PRIORITY_SEP: &str = "\x06\x16";
/// kombu's priority steps besides 0 (the queue itself), lower first.
pub const PRIORITY_STEPS: [u8; 3] = [3, 6, 9];

/// `celery.batch` when not set: messages a mover fetches per script call.
pub const DEFAULT_BATCH: usize = 100;
/// The largest `celery.batch` (a fetch returns that many messages to the node at once).
pub const MAX_BATCH: usize = 10_000;
/// `celery.movers` when not set: movers per kombu queue on a node (each its own holding list
/// and script calls, so one's calls run in Redis while another decodes).
pub const DEFAULT_MOVERS: usize = 2;
/// The largest `celery.movers`.
pub const MAX_MOVERS: usize = 32;
/// `celery.poll` when not set: the timeout of a bridge's blocking waits on an empty kombu queue
/// (every list of the queue is waited on, so a message is moved at once whatever its
/// priority; the timeout only paces the bridge's housekeeping while the queue is empty).
pub const DEFAULT_POLL: Duration = Duration::from_secs(1);
/// The longest `celery.poll`: a holding list's registration outlives its wait by
/// [`bridge::HOLD_GRACE`], so this bounds how late a dead node's holding list is adopted.
pub const MAX_POLL: Duration = Duration::from_secs(300);
/// Results (`celery-task-meta-*` SET + PUBLISH) written in one pipeline at most.
pub const RESULT_BATCH: usize = 256;
/// `celery.result_ttl` when not set: Celery's own `result_expires` default (one day).
pub const DEFAULT_RESULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// `celery.default_queue` when not set: Celery's default queue.
pub const DEFAULT_QUEUE: &str = "celery";

/// The bridge's settings (`[celery]`): defaults from [`CelerySettings::new`], rules in
/// [`CelerySettings::check`]. What a node adds when it starts (its broker's URL, key prefix
/// and events cap, its own name) is given to [`Celery::connect`].
#[derive(Clone)]
pub struct CelerySettings {
    /// Redis of Celery's result backend; `None`: the runtime broker's Redis.
    pub backend_url: Option<String>,
    /// Prefix of kombu list names and result keys (kombu's `global_keyprefix`).
    pub key_prefix: String,
    /// The kombu queues taken over, one bridge actor each.
    pub queues: Vec<String>,
    /// Celery task name → (runtime task, runtime queue).
    pub tasks: HashMap<String, (String, String)>,
    /// Runtime tasks whose `STARTED` state is written.
    pub track_started: HashSet<String>,
    /// Runtime queue whose dead letters take malformed messages.
    pub dead_letter_queue: String,
    /// kombu queue for reverse sends without a `queue` option.
    pub default_queue: String,
    /// TTL of `celery-task-meta-<id>`.
    pub result_ttl: Duration,
    /// Timeout of a bridge's blocking waits on an empty kombu queue (every list of the queue,
    /// priority sub-queues too, is waited on: a message is moved at once).
    pub poll: Duration,
    /// Messages a mover fetches per script call.
    pub batch: usize,
    /// Movers per kombu queue on this node.
    pub movers: usize,
}

impl std::fmt::Debug for CelerySettings {
    /// The backend URL without its password (see [`crate::shown::url`]).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelerySettings")
            .field(
                "backend_url",
                &self.backend_url.as_deref().map(crate::shown::url),
            )
            .field("key_prefix", &self.key_prefix)
            .field("queues", &self.queues)
            .field("tasks", &self.tasks)
            .field("track_started", &self.track_started)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("default_queue", &self.default_queue)
            .field("result_ttl", &self.result_ttl)
            .field("poll", &self.poll)
            .field("batch", &self.batch)
            .field("movers", &self.movers)
            .finish()
    }
}

/// One broken rule of [`CelerySettings::check`]: the field (`batch`, `queues[2]`) and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidCelery {
    /// The field, as the `[celery]` key that sets it.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl CelerySettings {
    /// No queue taken over, no task mapped, malformed messages dead-lettered on
    /// `dead_letter_queue`; every other field its `DEFAULT_*`.
    pub fn new(dead_letter_queue: impl Into<String>) -> Self {
        Self {
            backend_url: None,
            key_prefix: String::new(),
            queues: Vec::new(),
            tasks: HashMap::new(),
            track_started: HashSet::new(),
            dead_letter_queue: dead_letter_queue.into(),
            default_queue: DEFAULT_QUEUE.to_string(),
            result_ttl: DEFAULT_RESULT_TTL,
            poll: DEFAULT_POLL,
            batch: DEFAULT_BATCH,
            movers: DEFAULT_MOVERS,
        }
    }

    /// Every broken rule: a backend that is not Redis, an empty or repeated queue name, a
    /// `batch` outside 1..=[`MAX_BATCH`], `movers` outside 1..=[`MAX_MOVERS`], a zero
    /// `result_ttl` or `poll`, a `poll` over [`MAX_POLL`]. [`Celery::connect`] refuses
    /// settings with any.
    pub fn check(&self) -> Vec<InvalidCelery> {
        let mut errors = Vec::new();
        let mut bad = |field: String, reason: String| errors.push(InvalidCelery { field, reason });
        if let Some(url) = &self.backend_url
            && !url.starts_with("redis")
        {
            bad(
                "backend_url".into(),
                "expected a redis:// or rediss:// URL".into(),
            );
        }
        let mut seen = HashSet::new();
        for queue in &self.queues {
            if !seen.insert(queue) {
                bad(
                    "queues".into(),
                    format!("\"{queue}\" is listed more than once"),
                );
            }
        }
        for (i, queue) in self.queues.iter().enumerate() {
            if queue.is_empty() {
                bad(format!("queues[{i}]"), "empty queue name".into());
            }
        }
        for (field, value, max) in [
            ("batch", self.batch, MAX_BATCH),
            ("movers", self.movers, MAX_MOVERS),
        ] {
            if value == 0 {
                bad(field.into(), "must be at least 1, got 0".into());
            } else if value > max {
                bad(field.into(), format!("must be at most {max}, got {value}"));
            }
        }
        for (field, value) in [("result_ttl", self.result_ttl), ("poll", self.poll)] {
            if value.is_zero() {
                bad(field.into(), "must be longer than zero".into());
            }
        }
        if self.poll > MAX_POLL {
            bad(
                "poll".into(),
                format!(
                    "must be at most {}, got {}",
                    humantime::format_duration(MAX_POLL),
                    humantime::format_duration(self.poll)
                ),
            );
        }
        errors
    }
}

/// The bridge's shared half: settings and the two Redis connections. One per node.
#[derive(Clone)]
pub struct Celery {
    settings: CelerySettings,
    broker: ConnectionManager,
    /// The runtime broker's Redis, for each bridge's own blocking connection.
    broker_client: redis::Client,
    /// Writes results in batches (over the backend connection).
    results: ResultWriter,
    runtime_of: HashMap<String, String>,
    /// The runtime broker's key prefix (`rt`).
    runtime_prefix: String,
    /// Cap of the runtime's events stream (`0`: no events).
    events_maxlen: usize,
    /// This node's name (the `origin` header of reverse sends, `hostname` of `STARTED`).
    node: String,
}

impl std::fmt::Debug for Celery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Celery")
            .field("queues", &self.settings.queues)
            .finish_non_exhaustive()
    }
}

async fn manager(url: &str) -> Result<ConnectionManager, BrokerError> {
    let shown = crate::shown::url(url);
    let client = redis::Client::open(url)
        .map_err(|e| BrokerError::Invalid(format!("celery redis url `{shown}`: {e}")))?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(5)))
        .set_number_of_retries(4)
        .set_max_delay(Duration::from_secs(2));
    tokio::time::timeout(
        Duration::from_secs(5),
        ConnectionManager::new_with_config(client, config),
    )
    .await
    .map_err(|_| BrokerError::Unreachable {
        url: shown.clone(),
        reason: "no answer within 5s".into(),
    })?
    .map_err(|e| BrokerError::Unreachable {
        url: shown,
        reason: e.to_string(),
    })
}

impl Celery {
    /// Connects to the kombu lists on the runtime broker's Redis (`broker_url`, whose key
    /// prefix and events cap are `broker`'s) and to the result backend, for node `node`.
    /// Settings that break a rule of [`CelerySettings::check`] are refused.
    pub async fn connect(
        settings: CelerySettings,
        broker_url: &str,
        broker: &BrokerSettings,
        node: &str,
    ) -> Result<Self, BrokerError> {
        if let Some(err) = settings.check().into_iter().next() {
            return Err(BrokerError::Invalid(format!(
                "celery.{}: {}",
                err.field, err.reason
            )));
        }
        let broker_conn = manager(broker_url).await?;
        let broker_client = redis::Client::open(broker_url).map_err(|e| {
            BrokerError::Invalid(format!(
                "celery redis url `{}`: {e}",
                crate::shown::url(broker_url)
            ))
        })?;
        let backend = match &settings.backend_url {
            Some(url) if url != broker_url => manager(url).await?,
            _ => broker_conn.clone(),
        };
        let results = ResultWriter::spawn(backend);
        let runtime_of = settings
            .tasks
            .iter()
            .map(|(celery, (runtime, _))| (celery.clone(), runtime.clone()))
            .collect();
        Ok(Self {
            settings,
            broker: broker_conn,
            broker_client,
            results,
            runtime_of,
            runtime_prefix: broker.prefix.clone(),
            events_maxlen: broker.events_maxlen,
            node: node.to_string(),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &CelerySettings {
        &self.settings
    }

    /// The kombu lists of `queue`, in the order they are consumed.
    pub fn lists(&self, queue: &str) -> Vec<String> {
        let base = format!("{}{queue}", self.settings.key_prefix);
        std::iter::once(base.clone())
            .chain(
                PRIORITY_STEPS
                    .iter()
                    .map(|n| format!("{base}{PRIORITY_SEP}{n}")),
            )
            .collect()
    }

    /// The holding list of mover `mover` of this node's bridge of `queue`:
    /// `<prefix>:celery:held:<node>:<queue>` for mover 0 (the blocking waits move into it too),
    /// `<prefix>:celery:held:<node>#<mover>:<queue>` for the others (`#` is in no node name,
    /// so no other node's or queue's list has the name). A fetch moves messages there and the
    /// next `take.lua` call places them.
    pub fn held_list(&self, queue: &str, mover: usize) -> String {
        match mover {
            0 => format!("{}:celery:held:{}:{queue}", self.runtime_prefix, self.node),
            n => format!(
                "{}:celery:held:{}#{n}:{queue}",
                self.runtime_prefix, self.node
            ),
        }
    }

    /// The registry of the holding lists of `queue`: `<prefix>:celery:holding:<queue>`, a sorted
    /// set of list keys, each scored with the time (Redis' clock, epoch ms) until which its
    /// mover may still move messages into it. A list past its time that holds messages is an
    /// orphan (its node died): another node's bridge adopts its messages.
    pub fn holding_key(&self, queue: &str) -> String {
        format!("{}:celery:holding:{queue}", self.runtime_prefix)
    }

    /// The set of node names an earlier version registered holding lists in:
    /// `<prefix>:celery:holders:<queue>`; read by the sweep, never written.
    pub fn legacy_holders_key(&self, queue: &str) -> String {
        format!("{}:celery:holders:{queue}", self.runtime_prefix)
    }

    /// The runtime broker's key prefix (`rt`).
    pub fn runtime_prefix(&self) -> &str {
        &self.runtime_prefix
    }

    fn meta_key(&self, id: &str) -> String {
        format!("{}celery-task-meta-{id}", self.settings.key_prefix)
    }

    /// Writes `celery-task-meta-<id>` and publishes it (what wakes `.get()`).
    async fn store(
        &self,
        id: &str,
        status: &str,
        result: Value,
        traceback: Option<&str>,
    ) -> Result<(), BrokerError> {
        let done = matches!(status, "SUCCESS" | "FAILURE" | "REVOKED");
        let meta = json!({
            "status": status,
            "result": result,
            "traceback": traceback,
            "children": [],
            "date_done": done.then(|| rfc3339(SystemTime::now())),
            "task_id": id,
        })
        .to_string();
        let key = self.meta_key(id);
        let ttl = u64::try_from(self.settings.result_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.results.write(key, meta, ttl).await
    }

    /// Writes `STARTED` for a Celery-origin task whose runtime task has `track_started`.
    pub async fn started(&self, envelope: &Envelope) -> Result<(), BrokerError> {
        if !envelope.extra.contains_key(ORIGIN_FIELD)
            || !self.settings.track_started.contains(&envelope.task)
        {
            return Ok(());
        }
        let started = json!({ "pid": std::process::id(), "hostname": self.node });
        self.store(&envelope.id, "STARTED", started, None).await
    }

    /// Writes a Celery-origin task's result and sends its callbacks, errbacks or next chain
    /// step. Called before the runtime records the outcome (a crash in between re-runs the
    /// task, whose result is then written again).
    pub async fn settled(
        &self,
        broker: &AnyBroker,
        envelope: &Envelope,
        settled: Settled<'_>,
    ) -> Result<(), BrokerError> {
        if let Settled::Rejected(reason) = settled {
            return self.rejected(&envelope.id, reason).await;
        }
        let Some(origin) = envelope.extra.get(ORIGIN_FIELD) else {
            return Ok(());
        };
        let ignore_result = origin["ignore_result"].as_bool() == Some(true);
        let list = |name: &str| origin[name].as_array().cloned().unwrap_or_default();
        match settled {
            Settled::Succeeded(value) => {
                if !ignore_result {
                    self.store(&envelope.id, "SUCCESS", value.clone(), None)
                        .await?;
                }
                for callback in list("callbacks") {
                    self.send_signature(broker, envelope, &callback, Some(value), None)
                        .await?;
                }
                let mut chain = list("chain");
                if let Some(next) = chain.pop() {
                    self.send_signature(broker, envelope, &next, Some(value), Some(chain))
                        .await?;
                }
            }
            Settled::Retrying(error) => {
                if !ignore_result {
                    let exc = exception(Some(error), &error.to_string());
                    self.store(&envelope.id, "RETRY", exc, Some(&error.to_string()))
                        .await?;
                }
            }
            Settled::Rejected(_) => {}
            Settled::Failed { error, reason } => {
                // A revoked task is Celery's REVOKED (`.get()` raises TaskRevokedError).
                let status = match error {
                    Some(TaskError::Revoked) => "REVOKED",
                    _ => "FAILURE",
                };
                self.store(&envelope.id, status, exception(error, reason), Some(reason))
                    .await?;
                let id = Value::String(envelope.id.clone());
                for errback in list("errbacks") {
                    self.send_signature(broker, envelope, &errback, Some(&id), None)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Writes `FAILURE` for a Celery message the runtime could not run (malformed body,
    /// chord), so `.get()` raises instead of waiting.
    pub async fn rejected(&self, id: &str, reason: &str) -> Result<(), BrokerError> {
        let exc = json!({ "exc_type": "RuntimeError", "exc_message": [reason], "exc_module": "builtins" });
        self.store(id, "FAILURE", exc, Some(reason)).await
    }

    /// Sends one signature (`{task, args, kwargs, options, immutable}`) on: to the runtime
    /// when its task is mapped, else to Celery workers.
    async fn send_signature(
        &self,
        broker: &AnyBroker,
        parent: &Envelope,
        signature: &Value,
        first: Option<&Value>,
        chain: Option<Vec<Value>>,
    ) -> Result<(), BrokerError> {
        let Some(name) = signature["task"].as_str() else {
            tracing::warn!(%signature, "celery signature without a task name; not sent");
            return Ok(());
        };
        let options = signature["options"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let immutable = signature["immutable"].as_bool() == Some(true);
        let mut args: Vec<Value> = match (first, immutable) {
            (Some(first), false) => vec![first.clone()],
            _ => Vec::new(),
        };
        args.extend(signature["args"].as_array().cloned().unwrap_or_default());
        let kwargs = signature["kwargs"].as_object().cloned().unwrap_or_default();
        let id = options
            .get("task_id")
            .and_then(Value::as_str)
            .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
        let root = parent.root_id.clone().unwrap_or_else(|| parent.id.clone());
        let embed = json!({
            "callbacks": options.get("link").cloned().map(one_or_many),
            "errbacks": options.get("link_error").cloned().map(one_or_many),
            "chain": chain,
            "chord": null,
        });
        match self.settings.tasks.get(name) {
            Some((task, queue)) => {
                let mut envelope = Envelope::new(task.clone(), queue.clone());
                envelope.id = id.clone();
                envelope.args = args;
                envelope.kwargs = kwargs;
                envelope.parent_id = Some(parent.id.clone());
                envelope.root_id = Some(root);
                envelope.trace_id = Some(parent.trace().to_string());
                envelope.idempotency_key = Some(format!("celery:{}:{id}", parent.id));
                let mut origin = embed.as_object().cloned().unwrap_or_default();
                origin.insert("task".into(), name.into());
                envelope
                    .extra
                    .insert(ORIGIN_FIELD.into(), Value::Object(origin));
                match broker.enqueue(vec![envelope]).await {
                    Ok(_) => {}
                    // It can never be enqueued (a large result as its first argument): its
                    // result says so, rather than the parent being recorded again and again.
                    Err(err @ BrokerError::TooLarge { .. }) => {
                        let reason = err.to_string();
                        tracing::warn!(callback = %id, %reason, "celery callback not enqueued; its result is FAILURE");
                        self.rejected(&id, &reason).await?;
                    }
                    // Its frozen `task_id` breaks the id rule (it would be refused every time
                    // the parent is recorded again); no result can be written under it either.
                    Err(err @ BrokerError::Invalid(_)) => {
                        tracing::warn!(parent = %parent.id, error = %err,
                            "celery callback not enqueued: its task id is refused");
                    }
                    Err(err) => return Err(err),
                }
            }
            None => {
                let queue = options
                    .get("queue")
                    .and_then(queue_name)
                    .or_else(|| options.get("routing_key").and_then(Value::as_str))
                    .unwrap_or(&self.settings.default_queue)
                    .to_string();
                let message = OutMessage {
                    id: &id,
                    task: name,
                    queue: &queue,
                    args: &args,
                    kwargs: &kwargs,
                    embed,
                    parent_id: Some(&parent.id),
                    root_id: Some(&root),
                    origin: &self.node,
                };
                self.lpush(&queue, &message.to_json()).await?;
            }
        }
        Ok(())
    }

    async fn lpush(&self, queue: &str, message: &str) -> Result<(), BrokerError> {
        let mut conn = self.broker.clone();
        redis::cmd("LPUSH")
            .arg(format!("{}{queue}", self.settings.key_prefix))
            .arg(message)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| BrokerError::Command(format!("celery broker: {e}")))
    }

    /// Sends task `task` to Celery workers on kombu queue `queue` (protocol v2, as
    /// `send_task` would); returns its id, for `AsyncResult(id)` in Python.
    pub async fn send_task(
        &self,
        task: &str,
        queue: &str,
        args: &[Value],
        kwargs: &Map<String, Value>,
    ) -> Result<String, BrokerError> {
        let id = uuid::Uuid::new_v4().to_string();
        let message = OutMessage {
            id: &id,
            task,
            queue,
            args,
            kwargs,
            embed: json!({ "callbacks": null, "errbacks": null, "chain": null, "chord": null }),
            parent_id: None,
            root_id: None,
            origin: &self.node,
        };
        self.lpush(queue, &message.to_json()).await?;
        Ok(id)
    }

    /// The runtime task a Celery task name maps to, if any.
    pub fn runtime_task(&self, celery: &str) -> Option<&str> {
        self.runtime_of.get(celery).map(String::as_str)
    }
}

/// One result to write (`SET key meta PX ttl` + `PUBLISH key meta`) and who waits for it.
struct PendingResult {
    key: String,
    meta: String,
    ttl_ms: u64,
    done: oneshot::Sender<Result<(), String>>,
}

/// Writes results, in batches under load: a result written while no other is being written
/// goes at once, on its own (a trickle pays no extra hop); one written meanwhile is queued,
/// and one task sends whatever is queued as one pipeline (up to [`RESULT_BATCH`]), so many
/// results share a round trip. Each caller learns whether its own result was written: the
/// runtime records a task's outcome only after (a crash in between re-runs the task and
/// writes the result again, never loses it).
#[derive(Clone)]
struct ResultWriter {
    queue: mpsc::Sender<PendingResult>,
    conn: ConnectionManager,
    /// Results being written now, either way.
    writing: Arc<AtomicUsize>,
    /// Pipelines sent, either way.
    pipelines: Arc<AtomicUsize>,
}

/// One result being written: counted in [`ResultWriter::writing`] until dropped (also when
/// its caller is cancelled).
struct Writing<'a>(&'a AtomicUsize);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ResultWriter {
    /// The writer of queued results (a task on the current tokio runtime, ending when the last
    /// handle is dropped) and its handle.
    fn spawn(conn: ConnectionManager) -> Self {
        let (queue, mut pending) = mpsc::channel::<PendingResult>(RESULT_BATCH * 4);
        let mut batch_conn = conn.clone();
        let pipelines = Arc::new(AtomicUsize::new(0));
        let sent = Arc::clone(&pipelines);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(RESULT_BATCH);
            while pending.recv_many(&mut batch, RESULT_BATCH).await > 0 {
                sent.fetch_add(1, Ordering::Relaxed);
                let written = result_pipeline(&batch)
                    .query_async::<()>(&mut batch_conn)
                    .await
                    .map_err(|e| e.to_string());
                for result in batch.drain(..) {
                    let _ = result.done.send(written.clone());
                }
            }
        });
        Self {
            queue,
            conn,
            writing: Arc::default(),
            pipelines,
        }
    }

    /// Writes one result — at once when it is the only one being written, else with the next
    /// batch — and waits until the pipeline carrying it has been answered.
    async fn write(&self, key: String, meta: String, ttl_ms: u64) -> Result<(), BrokerError> {
        let failed = |e: String| BrokerError::Command(format!("celery backend: {e}"));
        let alone = self.writing.fetch_add(1, Ordering::Relaxed) == 0;
        let _writing = Writing(&self.writing);
        let (done, written) = oneshot::channel();
        let result = PendingResult {
            key,
            meta,
            ttl_ms,
            done,
        };
        if alone {
            self.pipelines.fetch_add(1, Ordering::Relaxed);
            let mut conn = self.conn.clone();
            return result_pipeline(std::slice::from_ref(&result))
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| failed(e.to_string()));
        }
        let stopped = || failed("the result writer stopped".into());
        self.queue.send(result).await.map_err(|_| stopped())?;
        written.await.map_err(|_| stopped())?.map_err(failed)
    }
}

/// The pipeline of a batch of results: per result its `SET … PX` then its `PUBLISH` (a `.get()`
/// woken by the message finds the value stored).
fn result_pipeline(batch: &[PendingResult]) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    for result in batch {
        pipe.cmd("SET")
            .arg(&result.key)
            .arg(&result.meta)
            .arg("PX")
            .arg(result.ttl_ms)
            .ignore();
        pipe.cmd("PUBLISH")
            .arg(&result.key)
            .arg(&result.meta)
            .ignore();
    }
    pipe
}

/// The bridge as the consumer sees it ([`Origin`]): envelopes carrying `celery_raw` or
/// `celery` are its own. Installed on every node, with or without `[celery]`: a node without
/// the bridge still decodes the raw messages another node moved (it writes no results then).
#[derive(Debug, Default)]
pub struct CeleryOrigin {
    celery: Option<Arc<Celery>>,
}

impl CeleryOrigin {
    /// The origin writing results through `celery`, when the bridge is configured.
    pub fn new(celery: Option<Arc<Celery>>) -> Self {
        Self { celery }
    }
}

impl Origin for CeleryOrigin {
    fn owns(&self, envelope: &Envelope) -> bool {
        envelope.extra.contains_key(ORIGIN_FIELD) || envelope.extra.contains_key(RAW_FIELD)
    }

    fn decode(&self, envelope: &Envelope) -> Result<Option<Envelope>, String> {
        if !envelope.extra.contains_key(RAW_FIELD) {
            return Ok(None);
        }
        let mut expanded = envelope.clone();
        expand(&mut expanded)?;
        Ok(Some(expanded))
    }

    fn started(&self, envelope: &Envelope) -> Option<BoxFuture<'static, ()>> {
        let celery = self.celery.as_ref()?;
        // Nothing to write (most tasks): no copy of the envelope, no task spawned for it.
        if !envelope.extra.contains_key(ORIGIN_FIELD)
            || !celery.settings.track_started.contains(&envelope.task)
        {
            return None;
        }
        let celery = Arc::clone(celery);
        let envelope = envelope.clone();
        Some(Box::pin(async move {
            if let Err(err) = celery.started(&envelope).await {
                tracing::debug!(error = %err, "celery STARTED state not written");
            }
        }))
    }

    fn settled<'a>(
        &'a self,
        broker: &'a AnyBroker,
        envelope: &'a Envelope,
        settled: Settled<'a>,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            match &self.celery {
                Some(celery) => celery.settled(broker, envelope, settled).await,
                None => Ok(()),
            }
        })
    }
}

/// A `queue` option is a name or a kombu `Queue` serialised as a dict with a `name`.
fn queue_name(value: &Value) -> Option<&str> {
    value
        .as_str()
        .or_else(|| value.get("name").and_then(Value::as_str))
}

/// `link` options hold one signature or a list of them.
fn one_or_many(value: Value) -> Value {
    match value {
        Value::Array(_) | Value::Null => value,
        one => Value::Array(vec![one]),
    }
}

/// Celery's serialised exception for a failure.
fn exception(error: Option<&TaskError>, reason: &str) -> Value {
    let (exc_type, module, message) = match error {
        Some(TaskError::Timeout(limit)) => (
            "TimeLimitExceeded",
            "celery.exceptions",
            format!("{:?}", limit.as_secs_f64()),
        ),
        Some(TaskError::Revoked) => ("TaskRevokedError", "celery.exceptions", reason.to_string()),
        Some(error) => ("RuntimeError", "builtins", error.to_string()),
        None => ("RuntimeError", "builtins", reason.to_string()),
    };
    json!({ "exc_type": exc_type, "exc_message": [message], "exc_module": module })
}

/// A protocol v2 message to Celery workers.
struct OutMessage<'a> {
    id: &'a str,
    task: &'a str,
    queue: &'a str,
    args: &'a [Value],
    kwargs: &'a Map<String, Value>,
    embed: Value,
    parent_id: Option<&'a str>,
    root_id: Option<&'a str>,
    origin: &'a str,
}

impl OutMessage<'_> {
    fn to_json(&self) -> String {
        let body = json!([self.args, self.kwargs, self.embed]).to_string();
        let body = base64::engine::general_purpose::STANDARD.encode(body);
        json!({
            "body": body,
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {
                "lang": "py",
                "task": self.task,
                "id": self.id,
                "shadow": null,
                "eta": null,
                "expires": null,
                "group": null,
                "group_index": null,
                "retries": 0,
                "timelimit": [null, null],
                "root_id": self.root_id.unwrap_or(self.id),
                "parent_id": self.parent_id,
                "argsrepr": Value::from(self.args.to_vec()).to_string(),
                "kwargsrepr": Value::from(self.kwargs.clone()).to_string(),
                "origin": format!("runtime@{}", self.origin),
                "ignore_result": false,
                "replaced_task_nesting": 0,
                "stamped_headers": null,
                "stamps": {},
            },
            "properties": {
                "correlation_id": self.id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": { "exchange": "", "routing_key": self.queue },
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": uuid::Uuid::new_v4().to_string(),
            },
        })
        .to_string()
    }
}

/// A Celery time (`isoformat()`, with or without a zone; naive = UTC) as RFC 3339.
fn celery_time(value: &Value, what: &str) -> Result<Option<String>, String> {
    let Some(text) = value.as_str() else {
        return match value {
            Value::Null => Ok(None),
            other => Err(format!("celery: `{what}` is not a time: {other}")),
        };
    };
    let zoned = parse_time(text)
        .or_else(|_| parse_time(&format!("{text}Z")))
        .map_err(|e| format!("celery: `{what}`: {e}"))?;
    Ok(Some(rfc3339(zoned)))
}

/// A time limit in seconds (a JSON number; null, 0 or absent: none) as milliseconds, at most
/// [`MAX_TIME_LIMIT`]; `what` names it in the error.
fn seconds_ms(value: Option<&Value>, what: &str) -> Result<Option<u64>, String> {
    let Some(secs) = value.and_then(Value::as_f64).filter(|s| *s != 0.0) else {
        return Ok(None);
    };
    let limit = caps::checked(secs, Unit::Seconds, MAX_TIME_LIMIT)
        .map_err(|e| format!("celery: `{what}`: {e}"))?;
    // Rounded up: a limit of a fraction of a millisecond is 1 ms, not none.
    Ok(Some(
        u64::try_from(limit.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX),
    ))
}

/// Decodes the raw kombu message of a bridged envelope (`celery_raw`) into the envelope:
/// arguments, eta, expires, attempt, limits, ids, and the Celery origin (`celery`: task
/// name, callbacks, errbacks, chain). `Err` is the reason to dead-letter it.
pub fn expand(envelope: &mut Envelope) -> Result<(), String> {
    let Some(Value::String(raw)) = envelope.extra.remove(RAW_FIELD) else {
        return Err("celery: `celery_raw` is not the raw message text".into());
    };
    let message = serde_json::from_str::<lenient::Object<Kombu<'_>>>(&raw)
        .map_err(|e| format!("celery: message is not JSON: {e}"))?
        .0
        .unwrap_or_default();
    let header = |name: &str| -> Value {
        HEADERS
            .iter()
            .position(|field| *field == name)
            .and_then(|at| message.headers.get(at).cloned().flatten())
            .unwrap_or(Value::Null)
    };
    let content_type = message
        .content_type
        .as_deref()
        .unwrap_or("application/json");
    if content_type != "application/json" {
        return Err(format!(
            "celery: content-type `{content_type}` is not supported (only json)"
        ));
    }
    let body = message
        .body
        .as_deref()
        .ok_or("celery: message without a `body` string")?;
    let body = match message.body_encoding.as_ref().and_then(Value::as_str) {
        Some("base64") => base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| format!("celery: body is not base64: {e}"))?,
        _ => body.as_bytes().to_vec(),
    };
    let body: Value =
        serde_json::from_slice(&body).map_err(|e| format!("celery: body is not JSON: {e}"))?;
    let Value::Array(mut parts) = body else {
        return Err("celery: body is not [args, kwargs, embed] (protocol v2)".into());
    };
    parts.resize(3, Value::Null);
    let mut embed = parts.pop().unwrap_or_default();
    envelope.kwargs = match parts.pop() {
        Some(Value::Object(kwargs)) => kwargs,
        Some(Value::Null) | None => Map::new(),
        Some(other) => return Err(format!("celery: kwargs is not an object: {other}")),
    };
    envelope.args = match parts.pop() {
        Some(Value::Array(args)) => args,
        Some(Value::Null) | None => Vec::new(),
        Some(other) => return Err(format!("celery: args is not a list: {other}")),
    };
    if !embed["chord"].is_null() {
        return Err("celery: chords are not supported by the runtime".into());
    }
    envelope.eta = celery_time(&header("eta"), "eta")?.map(Into::into);
    envelope.expires = celery_time(&header("expires"), "expires")?.map(Into::into);
    // A count past u32 is as good as exhausted: never wrapped round to a first attempt.
    envelope.attempt = header("retries")
        .as_u64()
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
    if let Some(limits) = header("timelimit").as_array() {
        // Celery sends [hard, soft].
        envelope.time_limit_ms = seconds_ms(limits.first(), "timelimit[0]")?;
        envelope.soft_time_limit_ms = seconds_ms(limits.get(1), "timelimit[1]")?;
    }
    envelope.root_id = header("root_id").as_str().map(str::to_string);
    envelope.parent_id = header("parent_id").as_str().map(str::to_string);
    let mut take = |name: &str| embed.get_mut(name).map(Value::take).unwrap_or_default();
    let origin = json!({
        "task": header("task"),
        "callbacks": take("callbacks"),
        "errbacks": take("errbacks"),
        "chain": take("chain"),
        "ignore_result": header("ignore_result"),
    });
    envelope.extra.insert(ORIGIN_FIELD.into(), origin);
    Ok(())
}

/// The fields of a message's `headers` that [`expand`] reads.
const HEADERS: [&str; 8] = [
    "eta",
    "expires",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "task",
    "ignore_result",
];

/// A kombu message as [`expand`] reads it: `body` and `content-type` when strings, the
/// [`HEADERS`] of `headers` and `properties.body_encoding` (the rest skipped unbuilt; a
/// repeated key's last value kept, as parsing into a `Value` keeps it).
#[derive(Default)]
struct Kombu<'a> {
    body: Option<Cow<'a, str>>,
    content_type: Option<Cow<'a, str>>,
    /// [`HEADERS`], in order (empty when `headers` is absent).
    headers: Vec<Option<Value>>,
    body_encoding: Option<Value>,
}

impl<'de> Deserialize<'de> for Kombu<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Kombu<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a kombu message")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut message = Kombu::default();
                while let Some(lenient::Text(key)) = map.next_key()? {
                    match key.as_ref() {
                        "body" => message.body = map.next_value::<lenient::Lenient<'de>>()?.0,
                        "content-type" => {
                            message.content_type = map.next_value::<lenient::Lenient<'de>>()?.0;
                        }
                        "headers" => {
                            message.headers = map.next_value_seed(lenient::Pick(&HEADERS))?
                        }
                        "properties" => {
                            message.body_encoding = map
                                .next_value_seed(lenient::Pick(&["body_encoding"]))?
                                .pop()
                                .flatten();
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(message)
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::test_util::fuzz_cases;

    /// [`expand`] as it was written first, parsing the whole message into a `Value`: the lean
    /// reader must decide every message as it did.
    fn expand_whole(envelope: &mut Envelope) -> Result<(), String> {
        let Some(Value::String(raw)) = envelope.extra.remove(RAW_FIELD) else {
            return Err("celery: `celery_raw` is not the raw message text".into());
        };
        let message: Value =
            serde_json::from_str(&raw).map_err(|e| format!("celery: message is not JSON: {e}"))?;
        let headers = &message["headers"];
        let properties = &message["properties"];
        let content_type = message["content-type"]
            .as_str()
            .unwrap_or("application/json");
        if content_type != "application/json" {
            return Err(format!(
                "celery: content-type `{content_type}` is not supported (only json)"
            ));
        }
        let body = message["body"]
            .as_str()
            .ok_or("celery: message without a `body` string")?;
        let body = match properties["body_encoding"].as_str() {
            Some("base64") => base64::engine::general_purpose::STANDARD
                .decode(body)
                .map_err(|e| format!("celery: body is not base64: {e}"))?,
            _ => body.as_bytes().to_vec(),
        };
        let body: Value =
            serde_json::from_slice(&body).map_err(|e| format!("celery: body is not JSON: {e}"))?;
        let Value::Array(mut parts) = body else {
            return Err("celery: body is not [args, kwargs, embed] (protocol v2)".into());
        };
        parts.resize(3, Value::Null);
        let embed = parts.pop().unwrap_or_default();
        envelope.kwargs = match parts.pop() {
            Some(Value::Object(kwargs)) => kwargs,
            Some(Value::Null) | None => Map::new(),
            Some(other) => return Err(format!("celery: kwargs is not an object: {other}")),
        };
        envelope.args = match parts.pop() {
            Some(Value::Array(args)) => args,
            Some(Value::Null) | None => Vec::new(),
            Some(other) => return Err(format!("celery: args is not a list: {other}")),
        };
        if !embed["chord"].is_null() {
            return Err("celery: chords are not supported by the runtime".into());
        }
        envelope.eta = celery_time(&headers["eta"], "eta")?.map(Into::into);
        envelope.expires = celery_time(&headers["expires"], "expires")?.map(Into::into);
        envelope.attempt = headers["retries"]
            .as_u64()
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        if let Some(limits) = headers["timelimit"].as_array() {
            envelope.time_limit_ms = seconds_ms(limits.first(), "timelimit[0]")?;
            envelope.soft_time_limit_ms = seconds_ms(limits.get(1), "timelimit[1]")?;
        }
        envelope.root_id = headers["root_id"].as_str().map(str::to_string);
        envelope.parent_id = headers["parent_id"].as_str().map(str::to_string);
        let origin = json!({
            "task": headers["task"],
            "callbacks": embed["callbacks"],
            "errbacks": embed["errbacks"],
            "chain": embed["chain"],
            "ignore_result": headers["ignore_result"],
        });
        envelope.extra.insert(ORIGIN_FIELD.into(), origin);
        Ok(())
    }

    /// A JSON value for a header: mostly plausible ones, some hostile.
    fn header_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(json!("2026-01-01T00:00:00")),
            Just(json!("not a time")),
            Just(json!([3, 1.5])),
            Just(json!([1e300, null])),
            Just(json!({"a": [1, {"b": null}]})),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            "\\PC{0,6}".prop_map(Value::from),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzz_cases(2000)))]

        /// Hostile messages — headers of any type, repeated keys, bodies that are not base64
        /// or not protocol v2 — expand exactly as parsing the whole message did.
        #[test]
        fn the_lean_reader_expands_as_the_whole_message_did(
            fields in prop::collection::vec(
                (prop::sample::select(HEADERS.to_vec()), header_value()), 0..10),
            headers_kind in 0..4u8,
            body_kind in 0..6u8,
            encoding in prop_oneof![Just(json!("base64")), Just(json!("utf-8")), Just(json!(7))],
            content_type in prop_oneof![
                Just(None), Just(Some(json!("application/json"))),
                Just(Some(json!("application/x-python-serialize"))), Just(Some(json!(1)))],
            repeat in any::<bool>(),
        ) {
            // Headers written by hand, so keys can repeat.
            let pairs: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}:{v}", json!(k)))
                .collect();
            let headers = match headers_kind {
                0 => format!("{{{}}}", pairs.join(",")),
                1 => "[1,2]".to_string(),
                2 => "null".to_string(),
                _ => format!("{{\"argsrepr\":\"(1,)\",{}}}", pairs.join(",")),
            };
            let body = match body_kind {
                0 => json!([[1, "a"], {"k": [1]}, {"callbacks": [{"task": "t"}], "chain": null, "chord": null}]),
                1 => json!([[], {}, {"chord": {"task": "x"}}]),
                2 => json!({"not": "v2"}),
                3 => json!([{"x": 1}, {}, {}]),
                4 => json!([[], [1], "embed"]),
                _ => json!([]),
            }
            .to_string();
            let body = if encoding == json!("base64") && body_kind != 5 {
                json!(base64::engine::general_purpose::STANDARD.encode(&body))
            } else if body_kind == 5 {
                json!("%%% not base64")
            } else {
                json!(body)
            };
            let mut top = vec![
                format!("\"body\":{body}"),
                format!("\"headers\":{headers}"),
                format!("\"properties\":{{\"body_encoding\":{encoding},\"delivery_tag\":\"x\"}}"),
            ];
            if let Some(content_type) = &content_type {
                top.push(format!("\"content-type\":{content_type}"));
            }
            if repeat {
                top.push("\"headers\":{\"retries\":2}".to_string());
                top.push("\"properties\":{}".to_string());
            }
            let raw = format!("{{{}}}", top.join(","));
            for raw in [raw.clone(), format!("{raw} x"), "[1]".to_string(), "7".to_string()] {
                let mut lean = Envelope::new("rt_add", "default");
                lean.extra.insert(RAW_FIELD.into(), raw.clone().into());
                let mut whole = lean.clone();
                let (a, b) = (expand(&mut lean), expand_whole(&mut whole));
                prop_assert_eq!(&a, &b, "{}", raw);
                if a.is_ok() {
                    prop_assert_eq!(&lean, &whole, "{}", raw);
                }
            }
        }
    }

    fn raw(body: &Value, headers: Value) -> String {
        let body = base64::engine::general_purpose::STANDARD.encode(body.to_string());
        json!({ "body": body, "content-type": "application/json", "content-encoding": "utf-8",
                "headers": headers, "properties": { "body_encoding": "base64" } })
        .to_string()
    }

    fn bridged(raw: String) -> Envelope {
        let mut envelope = Envelope::new("rt_add", "default");
        envelope.id = "c-1".into();
        envelope.extra.insert(RAW_FIELD.into(), raw.into());
        envelope
    }

    #[test]
    fn a_protocol_v2_message_expands_into_the_envelope() {
        let body = json!([[2, 3], {"x": 1}, {"callbacks": null, "errbacks": [{"task": "t"}], "chain": null, "chord": null}]);
        let headers = json!({ "id": "c-1", "task": "tasks.add", "eta": "2026-01-01T00:00:00.5+00:00",
            "expires": "2026-01-02T00:00:00", "retries": 2, "timelimit": [3, 1.5], "root_id": "r", "parent_id": null });
        let mut envelope = bridged(raw(&body, headers));
        expand(&mut envelope).unwrap();
        assert_eq!(envelope.args, vec![json!(2), json!(3)]);
        assert_eq!(envelope.kwargs["x"], 1);
        assert_eq!(envelope.attempt, 2);
        assert_eq!(envelope.time_limit_ms, Some(3000));
        assert_eq!(envelope.soft_time_limit_ms, Some(1500));
        assert_eq!(envelope.eta.as_deref(), Some("2026-01-01T00:00:00.500Z"));
        assert_eq!(
            envelope.expires.as_deref(),
            Some("2026-01-02T00:00:00.000Z")
        );
        assert_eq!(envelope.root_id.as_deref(), Some("r"));
        assert!(!envelope.extra.contains_key(RAW_FIELD));
        assert_eq!(envelope.extra[ORIGIN_FIELD]["task"], "tasks.add");
        assert_eq!(envelope.extra[ORIGIN_FIELD]["errbacks"][0]["task"], "t");
    }

    #[test]
    fn undecodable_messages_and_chords_are_named() {
        let mut envelope = bridged(
            json!({"body": "%%%", "headers": {}, "properties": {"body_encoding": "base64"}})
                .to_string(),
        );
        assert!(expand(&mut envelope).unwrap_err().contains("not base64"));
        let body = json!([[], {}, {"chord": {"task": "x"}}]);
        let mut envelope = bridged(raw(&body, json!({"id": "c-1", "task": "t"})));
        assert!(expand(&mut envelope).unwrap_err().contains("chords"));
        let mut envelope = bridged(raw(&json!({"a": 1}), json!({"id": "c-1", "task": "t"})));
        assert!(expand(&mut envelope).unwrap_err().contains("protocol v2"));
    }

    #[test]
    fn numbers_out_of_range_are_named_never_wrapped_or_panicked_on() {
        let body = json!([[], {}, {}]);
        let message = |headers: Value| bridged(raw(&body, headers));
        for (limits, expected) in [
            (
                json!([1e300, null]),
                "celery: `timelimit[0]`: 1e300 seconds is over the limit of 604800 seconds (7 days)",
            ),
            (
                json!([10, 18446744073709551615u64]),
                "celery: `timelimit[1]`: 1.8446744073709552e19 seconds is over the limit of \
                 604800 seconds (7 days)",
            ),
            (
                json!([-1, null]),
                "celery: `timelimit[0]`: must be ≥ 0 seconds, got -1",
            ),
        ] {
            let mut envelope = message(json!({ "id": "c-1", "task": "t", "timelimit": limits }));
            assert_eq!(expand(&mut envelope).unwrap_err(), expected);
        }
        let mut envelope = message(json!({ "id": "c-1", "task": "t", "timelimit": [0.0001, 0],
            "retries": 1u64 << 40, "eta": "9999-12-31T23:59:59", "expires": "1960-01-01T00:00:00" }));
        expand(&mut envelope).unwrap();
        assert_eq!(envelope.time_limit_ms, Some(1));
        assert_eq!(envelope.soft_time_limit_ms, None);
        assert_eq!(
            envelope.attempt,
            u32::MAX,
            "never wrapped round to a first attempt"
        );
        // A far eta is a time (the consumer refuses it as too far ahead, naming `eta`); a
        // time before 1970 is written as the epoch: as past as it was.
        assert_eq!(envelope.eta.as_deref(), Some("9999-12-31T23:59:59.000Z"));
        assert_eq!(
            envelope.expires.as_deref(),
            Some("1970-01-01T00:00:00.000Z")
        );
        let err = envelope.due(std::time::SystemTime::now()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("eta: `9999-12-31T23:59:59.000Z` is more than 365 days ahead"),
            "{err}"
        );
    }

    #[test]
    fn outgoing_messages_are_protocol_v2() {
        let kwargs = Map::new();
        let message = OutMessage {
            id: "i",
            task: "tasks.mul",
            queue: "py",
            args: &[json!(5)],
            kwargs: &kwargs,
            embed: json!({"callbacks": null, "errbacks": null, "chain": [], "chord": null}),
            parent_id: Some("p"),
            root_id: Some("r"),
            origin: "n",
        };
        let mut envelope = bridged(message.to_json());
        expand(&mut envelope).unwrap();
        assert_eq!(envelope.args, vec![json!(5)]);
        assert_eq!(envelope.parent_id.as_deref(), Some("p"));
        assert_eq!(envelope.extra[ORIGIN_FIELD]["task"], "tasks.mul");
    }

    /// Results written concurrently share pipelines, and each caller learns when its own is
    /// stored and published — or that it was not.
    #[tokio::test]
    async fn results_are_written_in_batches_and_each_caller_is_answered() {
        let mut server = crate::test_util::RedisServer::start();
        let client = redis::Client::open(server.url()).unwrap();
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(100))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .unwrap();
        let writer = ResultWriter::spawn(conn.clone());
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.psubscribe("celery-task-meta-*").await.unwrap();
        let writes = (0..600).map(|n| {
            let writer = writer.clone();
            async move {
                let key = format!("celery-task-meta-{n}");
                writer.write(key, format!("{{\"n\":{n}}}"), 60_000).await
            }
        });
        for written in futures_util::future::join_all(writes).await {
            written.unwrap();
        }
        let pipelines = writer.pipelines.load(Ordering::Relaxed);
        assert!(pipelines < 100, "600 results in {pipelines} pipelines");
        let mut check = conn.clone();
        let keys: Vec<String> = (0..600).map(|n| format!("celery-task-meta-{n}")).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut check)
            .await
            .unwrap();
        for (n, value) in values.iter().enumerate() {
            assert_eq!(value.as_deref(), Some(format!("{{\"n\":{n}}}").as_str()));
        }
        let ttl: i64 = redis::cmd("PTTL")
            .arg(&keys[0])
            .query_async(&mut check)
            .await
            .unwrap();
        assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");
        use futures_util::StreamExt;
        let mut messages = pubsub.on_message();
        for _ in 0..600 {
            let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await
                .unwrap()
                .unwrap();
            assert!(message.get_channel_name().starts_with("celery-task-meta-"));
        }
        drop(messages);
        // Redis gone: the caller is told its result was not written (the runtime then retries
        // recording the outcome), not left waiting.
        server.stop();
        let err = tokio::time::timeout(
            Duration::from_secs(20),
            writer.write("celery-task-meta-x".into(), "{}".into(), 1000),
        )
        .await
        .expect("an answer")
        .unwrap_err();
        assert!(err.to_string().contains("celery backend: "), "{err}");
    }
}
