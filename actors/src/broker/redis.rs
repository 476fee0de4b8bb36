//! `RedisBroker`: the broker contract (DESIGN.md §4) on Redis Streams, shared by every node.
//!
//! # Key layout
//!
//! With the key prefix `p` (`BrokerSettings::prefix`, `rt` by default) and a queue `q`. The
//! queue name is a literal hash tag (`{q}`), so a queue's keys share one Redis Cluster slot and
//! the Lua scripts over them are legal there.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `p:{q}:stream` | stream, consumer group `p` | ready and in-flight entries |
//! | `p:{q}:delayed` | sorted set | score = due time (epoch ms), member = envelope JSON (eta, retries) |
//! | `p:{q}:dead` | stream | dead letters |
//! | `p:idem:<key>` | string, `PX` idempotency TTL | the first task id enqueued with that idempotency key |
//! | `p:result:<id>` | hash; no TTL while the task's entry exists, then `PEXPIRE` result TTL | the task's record, and the guard of a chosen id (below) |
//! | `p:revoked` | sorted set, members `r:<id>` / `t:<id>` (terminate), score = kept until (epoch ms) | the kept revocations |
//! | `p:revoked:seq` | string, a counter | changes of `p:revoked`, read with each `reserve` |
//! | `p:events` | stream, `MAXLEN ~ events_maxlen` | lifecycle events (below) |
//! | `p:{beat}:leader` | string, `PX` beat lease | the node that leads the beat scheduler |
//! | `p:{beat}:runs` | hash | per schedule: its last run, JSON `{"due_ms", "task_id", "node"}` |
//! | `p:{nodes}:node:<name>` | string, `PX` presence TTL | a node's presence record (JSON, `NodeRecord`) |
//! | `p:{nodes}:index` | sorted set | names of the nodes that wrote a presence record (score = last write, ms) |
//!
//! # Entry fields
//!
//! - **Stream entry** (`p:{q}:stream`): `e` = the envelope JSON (DESIGN.md §3); `d` =
//!   deliveries before this entry, absent = 0 (an entry recovered after an expired lease is
//!   re-added at the tail with `d` + 1). A producer in another language enqueues with
//!   `XADD p:{q}:stream * e '<envelope json>'` — the envelope needs `task` and `queue`, and
//!   must carry a unique `id` that passes `check_id` (the key of its record; an entry without
//!   one, or with a refused one, is dead-lettered as malformed). Such an entry bypasses the
//!   id check and has no record until a consumer takes it (its start marker, or a deferral to
//!   its eta, makes one). The consumer group is created at id `0` on first use, so entries
//!   added before any consumer existed are delivered too.
//! - **Dead letter** (`p:{q}:dead`): `e` = envelope JSON (or the raw text that could not be
//!   parsed), `reason`, `attempts`, `at` (RFC 3339), and `raw` = `1` when `e` is not a valid
//!   envelope.
//! - **Record** (`p:result:<id>`, a [`StoredRecord`]): `id`, `task`, `queue`, `state`
//!   (`queued` | `scheduled` | `retrying` | `succeeded` | `dead`; never `running`), `due`
//!   (epoch ms, the delayed-set score of a scheduled or retrying task), `result` (JSON;
//!   meaningful when succeeded), `error`, `attempts` (attempts that ran to a success or a
//!   retry), `started` / `started_at` / `node` / `lost` (the start marker of the latest
//!   attempt, and whether it was lost), `enqueued_at`, `updated_at` (RFC 3339). Written at
//!   enqueue (`HSET`, no TTL, in the step that writes the entry), by the start marker, by each
//!   outcome (`PEXPIRE` result TTL when the task ended, `PERSIST` otherwise), a deferral, a
//!   requeue, a revocation and a poisoning; deleted by a purge. It is also the guard of a chosen
//!   id: an enqueue (or a Celery message moved by the bridge) whose id has a record is a
//!   duplicate — one key per task, where issue 16 had a second one (`p:id:<id>`).
//! - **Event** (`p:events`): `kind`, `at`, optional `task_id`, `task`, `queue`, and `detail`
//!   (JSON).
//!
//! # How each operation maps onto Redis
//!
//! - `enqueue`: envelopes are all validated first (nothing is written if one is invalid; an
//!   envelope whose JSON is over `max_entry_bytes` fails the batch before any round trip). A
//!   batch of generated ids without idempotency keys — the hot path — is one pipeline of `XADD`
//!   (or `ZADD` for a future eta), the records' `HSET` and the `sent` events: nothing to claim.
//!   A batch where some envelope has an idempotency key or a chosen id is one call of
//!   `enqueue.lua`: per envelope, `SET p:idem:<key> <id> NX PX ttl` (taken, also by an earlier
//!   envelope of the batch → `duplicate` with the stored first id), then `EXISTS
//!   p:result:<id>` for a chosen id (there → `duplicate` with that id), then the write, its
//!   record and its event — claims and writes in one atomic step, so a claimed key always has
//!   its entry and an entry its record.
//! - `reserve`: `XREADGROUP GROUP p <consumer> COUNT max [BLOCK wait] STREAMS p:{q}:stream >`
//!   pipelined with `GET p:revoked:seq` (run after the read, in its round trip): when entries
//!   came and the counter moved since this node last looked, `p:revoked` is read again (one
//!   more round trip, only then), so a revocation made before the read is known when the
//!   consumer admits what it read ([`Broker::is_revoked`] is a local lookup).
//!   A blocking read holds up its connection, so each (queue, consumer) reserving with a wait
//!   gets its own connection (created lazily, no response timeout of its own: the call is
//!   bounded by `wait` + a margin; dropped and re-made after an error). Reads without a wait use
//!   the shared connection. Malformed entries are dead-lettered (`malformed entry: <error>`)
//!   with `XACK` + `XDEL` through `commit.lua` (one outcome each; one that cannot be written
//!   stays pending and comes back after the lease, the read's good entries are still returned),
//!   never returned — an `e` that is not valid UTF-8 among them (it is never decoded lossily
//!   into a task that would run on altered arguments).
//!   Each delivery carries the length of its `e` in bytes (`Delivery::size`): the consumer
//!   dead-letters one over `max_entry_bytes` unrun.
//! - `renew`: `XCLAIM … 0 <ids> JUSTID` by the owner — resets the idle time, not the delivery
//!   count. An id missing from the reply was recovered elsewhere.
//! - Outcomes, each one call of `commit.lua` (one round trip, all or nothing — see
//!   *Atomic outcomes* below): `ack` = record `HSET` + `PEXPIRE`, `XACK`, `XDEL`,
//!   `succeeded` event; `retry` = `ZADD` delayed (attempt + 1), `XACK`, `XDEL`, record
//!   (`due`) and `PERSIST`, `retried` event; `defer` = `ZADD` delayed (attempt unchanged),
//!   `XACK`, `XDEL`, record (`scheduled`, `due`, `lost`) and `PERSIST`, `deferred` event;
//!   `dead_letter` = `XADD` dead, `XACK`, `XDEL`, record and `PEXPIRE`, `dead` event. `ack_many` sends several
//!   outcomes in the same call, each committed on its own. The starts handed to `started`
//!   (record start marker `HSET` + `started` event, per attempt) travel in the same call,
//!   ahead, as an outcome of their own — or are written by a flusher within `EVENT_FLUSH`: an
//!   attempt's start costs no round trip of its own.
//! - `recover`: `recover.lua`, in batches: `XPENDING … IDLE lease`, each stale entry re-added
//!   at the tail with `d` + 1 and its record's attempt marked `lost` (or dead-lettered once
//!   `d` + 1 reaches `max_deliveries`, its record dead with the reason), the old id acked and
//!   deleted. Re-adding (rather than `XAUTOCLAIM`ing to the sweeping node) keeps the
//!   prefetch bound: whichever consumer has free slots picks the entry up.
//! - `promote_due`: `promote.lua`, in batches: due members of the delayed set → `XADD` → `ZREM`.
//! - `depth`: ready = `XLEN` − pending (acked entries are deleted), in flight = `XPENDING`
//!   count, delayed = `ZCARD`, dead = `XLEN` of the dead letters.
//! - `purge`: `purge.lua`, in batches: deletes entries after the group's last-delivered-id
//!   (never reserved) and the delayed set's members, and the records of both; in-flight
//!   entries finish.
//! - `requeue_dead`: dead letters are read, each parseable one rewritten with `attempt` = 0,
//!   and `requeue.lua` moves it only if it is still a dead letter (atomic per letter), giving
//!   it a fresh record (`queued`, no TTL: its entry exists again) and dropping a revocation of
//!   it (`ZREM`, the counter moves).
//! - `revoke`: `revoke.lua` (see it for each state): reads the record; unless the task ended,
//!   `ZADD p:revoked`, `INCR p:revoked:seq`, `PUBLISH p:revocations`; a task not started yet
//!   is recorded dead/revoked and its delayed entry (found by the record's `due`) moved to the
//!   stream. Each node listens on `p:revocations` (its own connection, subscribed again after
//!   a loss — then `p:revoked` is read again and every revocation in it told once more) and
//!   tells its consumers ([`Broker::revocations`]).
//!   `requeue_dead_entry` does the same for one letter (`XRANGE p:{q}:dead <entry> <entry>`,
//!   then `requeue.lua` with it).
//! - `dead_letters_after`: `XRANGE p:{q}:dead (<after> + COUNT n` (from `-` without `after`);
//!   `delete_dead`: `XDEL p:{q}:dead <entry>`; `purge_dead`: `XTRIM p:{q}:dead MAXLEN 0` (one
//!   command: it counts what it removes). Entry ids from outside are checked first
//!   (`check_entry`: `<ms>-<seq>`), so `-`, `+` or `$` never reach a range.
//! - `hand_back`: `hand_back.lua`: each entry still pending for the consumer is acked,
//!   deleted and re-added at the tail with the same fields (envelope, delivery count). Chosen
//!   over `XCLAIM … IDLE <huge>` (which would let the next recovery sweep take it): the
//!   handed-back entry is readable by `XREADGROUP >` at once instead of a quarter lease later,
//!   and it is not counted as a delivery (it never ran), so handing back cannot push an entry
//!   towards the poison cap. The price: it goes behind entries enqueued since.
//! - `claim_leadership`: `claim_leadership.lua`: `GET`; the holder renews with `PEXPIRE`
//!   (compare-and-pexpire), anyone takes a free lease with `SET NX PX`; the holder is returned.
//!   `resign_leadership`: compare-and-`DEL`.
//! - Presence: `SET p:{nodes}:node:<name> <json> PX ttl` + `ZADD p:{nodes}:index`; `nodes`
//!   reads the index, `MGET`s the records and drops the names whose record expired.
//!
//! # Atomic outcomes
//!
//! An outcome's record, the ack of its entry, the entry's next place and its events commit
//! together or not at all. A pipeline or `MULTI`/`EXEC` cannot promise that: a command that
//! fails at run time — `WRONGTYPE` from a key of another type in the runtime's namespace
//! (`SET p:result:<id> x`, a string at `p:events`) — fails alone, and the others (the ack
//! among them) go through; Redis has no rollback. A Lua script has none either, so
//! `commit.lua` checks first: every key an outcome writes must hold the type its command needs
//! (or nothing) before the first write, and past that nothing can fail (well-formed arguments,
//! `*` stream ids; Redis refuses a script's writes for `maxmemory` only before its first one).
//! An outcome that fails the check writes nothing and returns an error naming the key
//! (`WRONGTYPE p:result:<id> holds a string, not a hash (nothing of this outcome was
//! written)`): its entry stays pending, unacked, and comes back through lease recovery once
//! its task actor gave up (the log line names the key and Redis' error). `enqueue.lua`,
//! `requeue.lua`, `purge.lua` and the Celery bridge's `take.lua` check their keys the same way
//! before they write (or pop) anything. `recover.lua` and `promote.lua` need no check: each
//! entry's first write there is the one that can fail, and nothing of that entry is done
//! before it.
//!
//! # Known differences and limits
//!
//! - Redis ≥ 6.2 (`XPENDING … IDLE`, exclusive `(id` ranges); tested with 7.0.
//! - Delayed entries due at the same millisecond are promoted in the sorted set's member order
//!   (the JSON text), not in enqueue order as `memory://` does; entries due at different times
//!   come in due order, and ready entries are strictly FIFO.
//! - One Redis server, not Cluster: `commit.lua` and `enqueue.lua` write keys in several slots
//!   in one step (the queue's, the record's, the idempotency key's, the events stream's), as
//!   the outcome pipelines they replace already did. It is what makes an outcome atomic; on
//!   Cluster these keys would have to move into the queue's slot (or the step be split and
//!   lose that). `purge.lua` and `recover.lua` name the records they touch in their arguments
//!   rather than in `KEYS` (they learn the ids from the entries), and `revoke.lua` names the
//!   queue's keys it learns from the record.
//!
//! # Connection
//!
//! Ordinary commands go through a `redis::aio::ConnectionManager`, which reconnects by itself
//! with backoff. [`RedisBroker::connection_state`] turns degraded when a command fails with an
//! I/O error (the server went away) and back to connected when one succeeds; the broker actor
//! and `/health` show it. Commands are not retried here: a failed call returns
//! `BrokerError::Unreachable` and the caller (the broker actor, a consumer) decides when to try
//! again.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Client, Pipeline, RedisError, RedisResult, Script, Value};
use serde::Serialize;
use serde_json::json;

use super::memory::{Prepared, prepare_batch};
use super::revocations::Revocations;
use super::{
    Broker, BrokerError, BrokerSettings, DeadLetter, Delivery, EVENT_FLUSH, Enqueued, Envelope,
    Event, LastRun, NodeRecord, Purged, QueueDepth, Recovered, Revocation, Revoked, SentDetail,
    StoredRecord, TaskRecord, TaskState, due_ms, entry_arg, epoch_ms, malformed_letter, rfc3339,
};

/// How long connecting (and the start-up PING) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Response timeout of the shared connection (scripts over big queues included).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time a blocking read gets beyond its `BLOCK` before its connection is given up.
const BLOCK_MARGIN: Duration = Duration::from_secs(3);
/// Entries one script call handles (recovery, promotion, purge); the caller loops.
const SCRIPT_BATCH: usize = 256;
/// Dead letters read per page by `requeue_dead`.
const DEAD_PAGE: usize = 100;

/// Whether the broker can talk to Redis (shown by the broker actor and `/health`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ConnectionState {
    /// The last command got an answer.
    Connected,
    /// Commands fail with I/O errors; the connection manager is reconnecting with backoff.
    Reconnecting {
        /// When the first failure of this outage was seen.
        #[serde(serialize_with = "serialize_time")]
        since: SystemTime,
        /// The most recent failure.
        last_error: String,
    },
}

impl ConnectionState {
    /// True when connected.
    pub fn is_connected(&self) -> bool {
        matches!(self, Self::Connected)
    }
}

impl std::fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connected => f.write_str("connected"),
            Self::Reconnecting { since, last_error } => {
                write!(f, "reconnecting since {}: {last_error}", rfc3339(*since))
            }
        }
    }
}

fn serialize_time<S: serde::Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*at))
}

/// The connection state, updated by every command's outcome.
#[derive(Debug, Default)]
struct Health {
    /// Fast path: false while connected, so a success costs one atomic load.
    down: AtomicBool,
    /// Since when and why, while down.
    outage: Mutex<Option<(SystemTime, String)>>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(SystemTime, String)>> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn up(&self, url: &str) {
        if self.down.load(Ordering::Acquire) {
            let mut outage = self.lock();
            if let Some((since, _)) = outage.take() {
                let down_for = SystemTime::now().duration_since(since).unwrap_or_default();
                tracing::info!(url, ?down_for, "redis broker reconnected");
            }
            self.down.store(false, Ordering::Release);
        }
    }

    fn failed(&self, url: &str, error: &str) {
        let mut outage = self.lock();
        match outage.as_mut() {
            Some((_, last)) => error.clone_into(last),
            None => {
                tracing::warn!(url, error, "redis broker connection lost; reconnecting");
                *outage = Some((SystemTime::now(), error.to_string()));
            }
        }
        self.down.store(true, Ordering::Release);
    }

    fn state(&self) -> ConnectionState {
        match self.lock().as_ref() {
            None => ConnectionState::Connected,
            Some((since, last_error)) => ConnectionState::Reconnecting {
                since: *since,
                last_error: last_error.clone(),
            },
        }
    }
}

/// The Lua scripts (`broker/redis/*.lua`), loaded on first use and again after a restart
/// (`NOSCRIPT` makes redis-rs load and retry).
struct Scripts {
    commit: Script,
    enqueue: Script,
    recover: Script,
    promote: Script,
    purge: Script,
    requeue: Script,
    hand_back: Script,
    revoke: Script,
    claim_leadership: Script,
    resign_leadership: Script,
}

impl std::fmt::Debug for Scripts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scripts")
    }
}

/// The Redis Streams broker. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct RedisBroker {
    settings: BrokerSettings,
    /// The URL without credentials, for errors and logs.
    url: String,
    client: Client,
    manager: ConnectionManager,
    /// Queues whose consumer group is known to exist.
    groups: Mutex<HashSet<String>>,
    /// Idle dedicated connections for blocking reads, by (queue, consumer).
    blocking: Mutex<HashMap<(String, String), MultiplexedConnection>>,
    health: Health,
    scripts: Scripts,
    /// `p:events`.
    events_key: String,
    /// `PEXPIRE` of records, in ms (at least 1).
    result_ttl_ms: u64,
    /// Starts handed to `started`, written with the next outcome or by the flusher.
    soon: Arc<Mutex<Vec<Start>>>,
    /// What this node knows of the kept revocations (shared with the subscriber task).
    revocations: Arc<Revocations>,
}

/// An attempt's start, handed to [`Broker::started`]: its record's start marker and its
/// `started` event, written later in one go ([`soon_pipeline`]).
#[derive(Debug)]
struct Start {
    /// `p:result:<id>`.
    record: String,
    /// The `started` event (its `at` is the marker's time).
    event: Event,
    attempt: u32,
    consumer: String,
}

impl RedisBroker {
    /// Connects to `url` (`redis://[user:password@]host:port[/db]`), failing fast with
    /// [`BrokerError::Unreachable`] (naming the URL without its password) when Redis does not
    /// answer a PING within two seconds. After that, lost connections are re-made in the
    /// background.
    pub async fn connect(url: &str, settings: BrokerSettings) -> Result<Self, BrokerError> {
        let shown = crate::shown::url(url);
        let unreachable = |reason: String| BrokerError::Unreachable {
            url: shown.clone(),
            reason,
        };
        let client = Client::open(url)
            .map_err(|e| BrokerError::Invalid(format!("broker url `{shown}`: {e}")))?;

        let probe = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(CONNECT_TIMEOUT));
        let ping = async {
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&probe)
                .await?;
            redis::cmd("PING").query_async::<String>(&mut conn).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, ping).await {
            Err(_) => return Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}"))),
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Ok(Ok(_)) => {}
        }

        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(4)
            .set_max_delay(Duration::from_secs(2));
        let manager = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| unreachable(e.to_string()))?;

        let ms = |d: Duration| (d.as_millis() as u64).max(1);
        let soon = Arc::default();
        let events_key = format!("{}:events", settings.prefix);
        tokio::spawn(flush_soon(
            Arc::downgrade(&soon),
            manager.clone(),
            events_key.clone(),
            settings.events_maxlen,
        ));
        let revocations = Arc::new(Revocations::default());
        tokio::spawn(listen_revocations(
            Arc::downgrade(&revocations),
            client.clone(),
            manager.clone(),
            settings.prefix.clone(),
        ));
        Ok(Self {
            soon,
            revocations,
            events_key,
            result_ttl_ms: ms(settings.result_ttl),
            settings,
            url: shown,
            client,
            manager,
            groups: Mutex::new(HashSet::new()),
            blocking: Mutex::new(HashMap::new()),
            health: Health::default(),
            scripts: Scripts {
                commit: Script::new(include_str!("redis/commit.lua")),
                enqueue: Script::new(include_str!("redis/enqueue.lua")),
                recover: Script::new(include_str!("redis/recover.lua")),
                promote: Script::new(include_str!("redis/promote.lua")),
                purge: Script::new(include_str!("redis/purge.lua")),
                requeue: Script::new(include_str!("redis/requeue.lua")),
                hand_back: Script::new(include_str!("redis/hand_back.lua")),
                revoke: Script::new(include_str!("redis/revoke.lua")),
                claim_leadership: Script::new(include_str!("redis/claim_leadership.lua")),
                resign_leadership: Script::new(include_str!("redis/resign_leadership.lua")),
            },
        })
    }

    /// Connected, or reconnecting since when and why.
    pub fn connection_state(&self) -> ConnectionState {
        self.health.state()
    }

    /// The tunables it runs with.
    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// The URL it talks to, without credentials.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Sends a PING on the shared connection; the round trip it took.
    pub async fn ping(&self) -> Result<Duration, BrokerError> {
        let started = tokio::time::Instant::now();
        let mut conn = self.manager.clone();
        let pong: RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        self.observe(pong)?;
        Ok(started.elapsed())
    }

    // ----- keys -------------------------------------------------------------------------

    fn stream_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:stream", self.settings.prefix)
    }

    fn delayed_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:delayed", self.settings.prefix)
    }

    fn dead_key(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:dead", self.settings.prefix)
    }

    fn idempotency_key(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.settings.prefix)
    }

    fn result_key(&self, id: &str) -> String {
        format!("{}:result:{id}", self.settings.prefix)
    }

    /// `p:result:` — the record of task `id` is this prefix followed by the id.
    fn result_prefix(&self) -> String {
        format!("{}:result:", self.settings.prefix)
    }

    fn leader_key(&self) -> String {
        format!("{}:{{beat}}:leader", self.settings.prefix)
    }

    fn runs_key(&self) -> String {
        format!("{}:{{beat}}:runs", self.settings.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}:{{nodes}}:index", self.settings.prefix)
    }

    fn node_key(&self, name: &str) -> String {
        format!("{}:{{nodes}}:node:{name}", self.settings.prefix)
    }

    fn group(&self) -> &str {
        &self.settings.prefix
    }

    // ----- plumbing ---------------------------------------------------------------------

    /// Notes a command's outcome in the connection state and converts its error.
    fn observe<T>(&self, result: RedisResult<T>) -> Result<T, BrokerError> {
        match result {
            Ok(value) => {
                self.health.up(&self.url);
                Ok(value)
            }
            Err(e) => Err(self.error(e)),
        }
    }

    fn error(&self, e: RedisError) -> BrokerError {
        if is_connection_error(&e) {
            let reason = e.to_string();
            self.health.failed(&self.url, &reason);
            BrokerError::Unreachable {
                url: self.url.clone(),
                reason,
            }
        } else {
            // The server answered: the connection is fine.
            self.health.up(&self.url);
            BrokerError::Command(e.to_string())
        }
    }

    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> Result<T, BrokerError> {
        let mut conn = self.manager.clone();
        self.observe(pipe.query_async(&mut conn).await)
    }

    /// Writes outcomes with `commit.lua`, in one round trip: each pipeline's commands are one
    /// outcome, written whole or not at all (its keys are type-checked first). The starts
    /// handed to `started` go first, as an outcome of their own (best effort: their failure
    /// is logged, not returned). `Err` when the call failed, or naming every outcome
    /// that was not written — with the key and Redis' error — while the others were.
    async fn write_outcomes(&self, outcomes: Vec<Pipeline>) -> Result<(), BrokerError> {
        let soon = self.take_soon();
        let all: Vec<&Pipeline> = soon.iter().chain(&outcomes).collect();
        let mut invocation = self.scripts.commit.prepare_invoke();
        let mut keys: Vec<&[u8]> = Vec::new();
        for pipe in &all {
            invocation.arg(pipe.len());
            for cmd in pipe.cmd_iter() {
                let args: Vec<&[u8]> = cmd
                    .args_iter()
                    .filter_map(|arg| match arg {
                        redis::Arg::Simple(bytes) => Some(bytes),
                        // No cursor command is ever built here.
                        _ => None,
                    })
                    .collect();
                keys.extend(args.get(1));
                invocation.arg(args.len()).arg(args);
            }
        }
        keys.sort_unstable();
        keys.dedup();
        invocation.key(keys);
        let mut conn = self.manager.clone();
        let answers: Vec<Value> = self.observe(invocation.invoke_async(&mut conn).await)?;
        let mut answers = answers.into_iter();
        if soon.is_some()
            && let Some(answer) = answers.next()
            && !matches!(answer, Value::Int(1))
        {
            tracing::warn!(error = %text(&answer), "starts of tasks (records, events) not written");
        }
        let failed: Vec<String> = answers
            .filter(|answer| !matches!(answer, Value::Int(1)))
            .map(|answer| text(&answer))
            .collect();
        match failed.len() {
            0 => Ok(()),
            1 if outcomes.len() == 1 => Err(BrokerError::Command(failed.concat())),
            n => Err(BrokerError::Command(format!(
                "{n} of {} outcomes not written (the others were): {}",
                outcomes.len(),
                failed.join("; ")
            ))),
        }
    }

    /// Creates the queue's consumer group (at id 0, with the stream) unless known to exist.
    async fn ensure_group(&self, queue: &str) -> Result<(), BrokerError> {
        if lock(&self.groups).contains(queue) {
            return Ok(());
        }
        let mut conn = self.manager.clone();
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.stream_key(queue))
            .arg(self.group())
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => self.health.up(&self.url),
            other => self.observe(other)?,
        }
        lock(&self.groups).insert(queue.to_string());
        Ok(())
    }

    /// Runs `op` after making sure the group exists; if Redis says `NOGROUP` anyway (it
    /// restarted without its data), creates the group again and retries once.
    async fn grouped<T, F, Fut>(&self, queue: &str, op: F) -> Result<T, BrokerError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        self.ensure_group(queue).await?;
        match op().await {
            Err(e) if is_nogroup(&e) => {
                lock(&self.groups).remove(queue);
                self.ensure_group(queue).await?;
                self.observe(op().await)
            }
            other => self.observe(other),
        }
    }

    /// Whether events are written (`[events] enabled`).
    fn events_on(&self) -> bool {
        self.settings.events_maxlen > 0
    }

    /// Appends an event `XADD` about `about` (or just its `queue`) to `pipe` (reply ignored).
    fn add_event(
        &self,
        pipe: &mut Pipeline,
        kind: &str,
        at: &str,
        about: Option<&Envelope>,
        queue: Option<&str>,
        detail: &str,
    ) {
        let (task_id, task, queue) = match about {
            Some(envelope) => (
                Some(envelope.id.as_str()),
                Some(envelope.task.as_str()),
                Some(envelope.queue.as_str()),
            ),
            None => (None, None, queue),
        };
        self.add_event_fields(
            pipe,
            kind,
            at,
            [("task_id", task_id), ("task", task), ("queue", queue)],
            detail,
        );
    }

    /// Appends an event's `XADD` ([`xadd_event`]) to `pipe`, unless events are off.
    fn add_event_fields(
        &self,
        pipe: &mut Pipeline,
        kind: &str,
        at: &str,
        optional: [(&str, Option<&str>); 3],
        detail: &str,
    ) {
        if !self.events_on() {
            return;
        }
        xadd_event(
            pipe,
            &self.events_key,
            self.settings.events_maxlen,
            kind,
            at,
            optional,
            detail,
        );
    }

    /// The starts handed to `started`, taken out of the buffer as one pipeline
    /// ([`soon_pipeline`]; `None` when there are none).
    fn take_soon(&self) -> Option<Pipeline> {
        let soon = std::mem::take(&mut *lock(&self.soon));
        if soon.is_empty() {
            return None;
        }
        Some(soon_pipeline(
            &soon,
            &self.events_key,
            self.settings.events_maxlen,
        ))
    }
}

/// [`xadd_event`] for a whole [`Event`].
fn xadd_whole(pipe: &mut Pipeline, key: &str, maxlen: usize, event: &Event) {
    xadd_event(
        pipe,
        key,
        maxlen,
        &event.kind,
        &event.at,
        [
            ("task_id", event.task_id.as_deref()),
            ("task", event.task.as_deref()),
            ("queue", event.queue.as_deref()),
        ],
        &event.detail.to_string(),
    );
}

/// The writes of attempts' starts: per start, its record's start marker (`HSET` of `id`,
/// `task`, `queue`, `started` = the attempt, `started_at`, `node`, `lost` = 0, `updated_at`: a record
/// this makes — an entry another producer wrote — has no state, read as `running`) and its
/// `started` event (unless events are off: `maxlen` 0).
fn soon_pipeline(starts: &[Start], events_key: &str, maxlen: usize) -> Pipeline {
    let mut pipe = redis::pipe();
    for start in starts {
        let event = &start.event;
        pipe.cmd("HSET")
            .arg(&start.record)
            .arg("id")
            .arg(event.task_id.as_deref().unwrap_or_default())
            .arg("task")
            .arg(event.task.as_deref().unwrap_or_default())
            .arg("queue")
            .arg(event.queue.as_deref().unwrap_or_default())
            .arg("started")
            .arg(start.attempt)
            .arg("started_at")
            .arg(&event.at)
            .arg("node")
            .arg(&start.consumer)
            .arg("lost")
            .arg("0")
            .arg("updated_at")
            .arg(&event.at)
            .ignore();
        if maxlen > 0 {
            xadd_whole(&mut pipe, events_key, maxlen, event);
        }
    }
    pipe
}

/// Writes the starts handed to `started` that no outcome took along, every
/// [`EVENT_FLUSH`], until the broker is dropped.
async fn flush_soon(
    soon: Weak<Mutex<Vec<Start>>>,
    mut conn: ConnectionManager,
    key: String,
    maxlen: usize,
) {
    loop {
        tokio::time::sleep(EVENT_FLUSH).await;
        let Some(soon) = soon.upgrade() else { return };
        let starts = std::mem::take(&mut *lock(&soon));
        drop(soon);
        if starts.is_empty() {
            continue;
        }
        let pipe = soon_pipeline(&starts, &key, maxlen);
        if let Err(err) = pipe.query_async::<()>(&mut conn).await {
            tracing::debug!(error = %err, starts = starts.len(), "starts (records, events) not written");
        }
    }
}

/// The one place that writes the events stream: `XADD p:events MAXLEN ~ n * kind … at …
/// [task_id …] [task …] [queue …] detail …` (reply ignored).
fn xadd_event(
    pipe: &mut Pipeline,
    key: &str,
    maxlen: usize,
    kind: &str,
    at: &str,
    optional: [(&str, Option<&str>); 3],
    detail: &str,
) {
    let cmd = pipe
        .cmd("XADD")
        .arg(key)
        .arg("MAXLEN")
        .arg("~")
        .arg(maxlen)
        .arg("*")
        .arg("kind")
        .arg(kind)
        .arg("at")
        .arg(at);
    for (name, value) in optional {
        if let Some(value) = value {
            cmd.arg(name).arg(value);
        }
    }
    cmd.arg("detail").arg(detail).ignore();
}

impl RedisBroker {
    /// Appends an outcome's record write to `pipe`: `HSET` of the state, result, error,
    /// attempts (the envelope's `attempt` + 1, for an outcome of an attempt that ran: a
    /// success or a retry; a dead letter leaves it, since the entry may never have run),
    /// due time (`due_ms` of a retry, else empty) and time — with the id, task and queue, for
    /// a record that an enqueue did not make — then `PEXPIRE` result TTL when the task ended,
    /// else `PERSIST` (its entry lives on).
    #[allow(clippy::too_many_arguments)]
    fn add_record(
        &self,
        pipe: &mut Pipeline,
        envelope: &Envelope,
        state: TaskState,
        result: Option<&serde_json::Value>,
        error: &str,
        due_ms: Option<u64>,
        at: &str,
    ) {
        let key = self.result_key(&envelope.id);
        let result = result.map(|v| v.to_string()).unwrap_or_default();
        let cmd = pipe.cmd("HSET");
        if matches!(state, TaskState::Succeeded | TaskState::Retrying) {
            cmd.arg(&key)
                .arg("attempts")
                .arg(envelope.attempt.saturating_add(1));
        } else {
            cmd.arg(&key);
        }
        cmd.arg("id")
            .arg(&envelope.id)
            .arg("task")
            .arg(&envelope.task)
            .arg("queue")
            .arg(&envelope.queue)
            .arg("state")
            .arg(state.name())
            .arg("result")
            .arg(result)
            .arg("error")
            .arg(error)
            .arg("due")
            .arg(due_ms.map(|due| due.to_string()).unwrap_or_default())
            .arg("updated_at")
            .arg(at)
            .ignore();
        if state.is_final() {
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(self.result_ttl_ms)
                .ignore();
        } else {
            pipe.cmd("PERSIST").arg(&key).ignore();
        }
    }

    /// The record of an enqueued envelope ([`enqueued_fields`]: `queued`, or `scheduled` until
    /// `due_ms`). A new key has no TTL: it lives while its entry does.
    fn add_enqueued_record(&self, pipe: &mut Pipeline, envelope: &Envelope, due_ms: Option<u64>) {
        let fields = enqueued_fields(envelope, due_ms);
        let cmd = pipe.cmd("HSET").arg(self.result_key(&envelope.id));
        for (name, value) in &fields {
            cmd.arg(*name).arg(value.as_ref());
        }
        cmd.ignore();
    }

    /// Ends a delivery and puts `next` in the delayed set, due at `at` (`ZADD`, `XACK`,
    /// `XDEL`).
    fn add_reschedule(
        &self,
        pipe: &mut Pipeline,
        delivery: &Delivery,
        next: &Envelope,
        at: SystemTime,
    ) {
        pipe.cmd("ZADD")
            .arg(self.delayed_key(&delivery.queue))
            .arg(due_ms(at))
            .arg(next.to_json())
            .ignore();
        self.add_release(pipe, &self.stream_key(&delivery.queue), &delivery.entry);
    }

    /// The task `id` ended without an outcome of its own (a malformed entry): its record, if
    /// it has one, lives `result_ttl` more, then the id is free (`PEXPIRE`).
    fn add_record_end(&self, pipe: &mut Pipeline, id: &str) {
        pipe.cmd("PEXPIRE")
            .arg(self.result_key(id))
            .arg(self.result_ttl_ms)
            .ignore();
    }

    /// An ack's commands: record (with its TTL), `XACK` + `XDEL`, `succeeded` event.
    fn add_ack(
        &self,
        pipe: &mut Pipeline,
        delivery: &Delivery,
        result: &serde_json::Value,
        at: &str,
    ) {
        let envelope = &delivery.envelope;
        self.add_record(
            pipe,
            envelope,
            TaskState::Succeeded,
            Some(result),
            "",
            None,
            at,
        );
        self.add_release(pipe, &self.stream_key(&delivery.queue), &delivery.entry);
        let detail = format!(r#"{{"attempt":{},"error":null}}"#, envelope.attempt);
        self.add_event(pipe, "succeeded", at, Some(envelope), None, &detail);
    }

    /// `XACK` + `XDEL` of an entry.
    fn add_release(&self, pipe: &mut Pipeline, stream: &str, entry: &str) {
        pipe.cmd("XACK")
            .arg(stream)
            .arg(self.group())
            .arg(entry)
            .ignore();
        pipe.cmd("XDEL").arg(stream).arg(entry).ignore();
    }

    /// Events for what `recover.lua` did (`kind, e, deliveries, consumer` per entry).
    async fn recovery_events(&self, queue: &str, moved: &[Value]) -> Result<(), BrokerError> {
        if moved.is_empty() || !self.events_on() {
            return Ok(());
        }
        let at = rfc3339(SystemTime::now());
        let mut pipe = redis::pipe();
        for entry in moved.chunks(4) {
            let [kind, e, deliveries, consumer] = entry else {
                continue;
            };
            let (kind, e) = (text(kind), text(e));
            let detail =
                json!({ "deliveries": int(deliveries), "consumer": text(consumer) }).to_string();
            match Envelope::from_json(&e) {
                Ok(envelope) => {
                    self.add_event(&mut pipe, &kind, &at, Some(&envelope), None, &detail)
                }
                Err(_) => self.add_event(&mut pipe, &kind, &at, None, Some(queue), &detail),
            }
        }
        self.query_pipe::<()>(&pipe).await
    }

    /// Dead-letters malformed entries met by `reserve` (one round trip for all of them, each
    /// an outcome of its own). One that cannot be written stays pending and comes back after
    /// the lease: that is logged, not returned, so the good entries of the read still run.
    async fn bury_malformed(
        &self,
        queue: &str,
        stream: &str,
        malformed: Vec<(String, String, String)>,
    ) {
        let at = rfc3339(SystemTime::now());
        let dead = self.dead_key(queue);
        let mut outcomes = Vec::with_capacity(malformed.len());
        for (id, raw, reason) in &malformed {
            tracing::warn!(queue, entry = %id, %reason, "malformed entry dead-lettered");
            let mut pipe = redis::pipe();
            pipe.cmd("XADD")
                .arg(&dead)
                .arg("*")
                .arg("e")
                .arg(raw)
                .arg("reason")
                .arg(reason)
                .arg("attempts")
                .arg(0)
                .arg("at")
                .arg(&at)
                .arg("raw")
                .arg("1")
                .ignore();
            self.add_release(&mut pipe, stream, id);
            // A task id that can still be read from it: its record ends with it.
            if let Some(task_id) = Envelope::id_in(raw) {
                self.add_record_end(&mut pipe, &task_id);
            }
            let detail = json!({ "reason": reason, "entry": id }).to_string();
            self.add_event(&mut pipe, "dead", &at, None, Some(queue), &detail);
            outcomes.push(pipe);
        }
        if let Err(err) = self.write_outcomes(outcomes).await {
            tracing::warn!(queue, error = %err,
                "malformed entries not dead-lettered; they stay pending and come back after the lease");
        }
    }

    /// Turns read entries into deliveries, burying the malformed ones.
    async fn deliveries(
        &self,
        queue: &str,
        stream: &str,
        entries: Vec<StreamEntry>,
    ) -> Result<(Vec<Delivery>, bool), BrokerError> {
        let mut out = Vec::with_capacity(entries.len());
        let mut malformed = Vec::new();
        for entry in entries {
            let StreamEntry {
                id,
                fields,
                not_utf8,
            } = entry;
            let mut e = None;
            let mut d = 0u32;
            for (name, value) in &fields {
                match name.as_str() {
                    "e" => e = Some(value),
                    "d" => d = value.parse().unwrap_or(0),
                    _ => {}
                }
            }
            if e.is_some() && not_utf8.iter().any(|name| name == "e") {
                let raw = e.cloned().unwrap_or_default();
                malformed.push((
                    id,
                    raw,
                    "malformed entry: `e` is not valid UTF-8".to_string(),
                ));
                continue;
            }
            match e.map(|raw| Envelope::from_json(raw)) {
                Some(Ok(envelope)) => out.push(Delivery {
                    queue: queue.to_string(),
                    entry: id,
                    deliveries: d.saturating_add(1),
                    size: e.map_or(0, String::len),
                    envelope,
                }),
                Some(Err(err)) => {
                    let raw = e.cloned().unwrap_or_default();
                    malformed.push((id, raw, format!("malformed entry: {err}")));
                }
                None => {
                    let raw = serde_json::to_string(&fields.into_iter().collect::<HashMap<_, _>>())
                        .unwrap_or_default();
                    malformed.push((id, raw, "malformed entry: no field `e`".to_string()));
                }
            }
        }
        let buried = !malformed.is_empty();
        if buried {
            self.bury_malformed(queue, stream, malformed).await;
        }
        Ok((out, buried))
    }

    /// One `XREADGROUP` (blocking on a dedicated connection when `block` is set), and in the
    /// same round trip — after it — the revocation counter (`GET p:revoked:seq`, `None` while
    /// nothing was ever revoked): any revocation made before the read returned is counted.
    async fn read_group(
        &self,
        queue: &str,
        consumer: &str,
        stream: &str,
        max: usize,
        block: Option<Duration>,
    ) -> Result<(Vec<StreamEntry>, Option<i64>), BrokerError> {
        let mut pipe = redis::pipe();
        let cmd = pipe.cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(self.group())
            .arg(consumer)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg((block.as_millis() as u64).max(1));
        }
        cmd.arg("STREAMS").arg(stream).arg(">");
        pipe.cmd("GET").arg(revoked_seq_key(&self.settings.prefix));
        let (reply, seq) = match block {
            None => {
                self.grouped(queue, || {
                    let mut conn = self.manager.clone();
                    let pipe = &pipe;
                    async move { pipe.query_async::<(Value, Option<i64>)>(&mut conn).await }
                })
                .await?
            }
            Some(block) => {
                self.grouped(queue, || self.blocking_read(queue, consumer, &pipe, block))
                    .await?
            }
        };
        Ok((read_reply(reply), seq))
    }

    /// Brings this node's copy of the kept revocations up to date when the broker's counter
    /// says there were revocations it has not seen (`seq` from the read): one round trip, only
    /// then. A failure leaves the copy as it was (the next read tries again).
    async fn catch_up_revocations(&self, seq: Option<i64>) {
        let seq = seq.unwrap_or(0);
        if seq == self.revocations.seq() {
            return;
        }
        match load_revocations(&mut self.manager.clone(), &self.settings.prefix).await {
            Ok((kept, seq)) => self.revocations.replace(kept, seq, false),
            Err(err) => {
                tracing::warn!(error = %err, "revocations not read; tasks revoked since the last read may run")
            }
        }
    }

    /// A blocking `XREADGROUP` on the dedicated connection of (queue, consumer): taken out of
    /// the idle map for the call, put back after an answer (an error answer included), dropped
    /// after a connection failure so the next call connects afresh.
    async fn blocking_read(
        &self,
        queue: &str,
        consumer: &str,
        pipe: &Pipeline,
        block: Duration,
    ) -> RedisResult<(Value, Option<i64>)> {
        let slot = (queue.to_string(), consumer.to_string());
        let taken = lock(&self.blocking).remove(&slot);
        let mut conn = match taken {
            Some(conn) => conn,
            None => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                self.client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?
            }
        };
        let read = tokio::time::timeout(
            block + BLOCK_MARGIN,
            pipe.query_async::<(Value, Option<i64>)>(&mut conn),
        );
        match read.await {
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to a blocking read of {block:?}"),
            )
            .into()),
            Ok(Err(e)) if is_connection_error(&e) => Err(e),
            Ok(answer) => {
                lock(&self.blocking).insert(slot, conn);
                answer
            }
        }
    }
}

impl RedisBroker {
    /// Enqueues a batch with idempotency keys or chosen ids through `enqueue.lua`: per
    /// envelope, claim its key and check its id (its record), then write it and its record —
    /// or answer the id it duplicates — in one atomic step and one round trip.
    async fn enqueue_claiming(
        &self,
        prepared: Vec<Prepared>,
        at: &str,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let maxlen = if self.events_on() {
            self.settings.events_maxlen
        } else {
            0
        };
        let mut invocation = self.scripts.enqueue.prepare_invoke();
        invocation.arg(&self.events_key).arg(maxlen).arg(at);
        let mut keys = Vec::with_capacity(prepared.len() * 3 + 1);
        if maxlen > 0 {
            keys.push(self.events_key.clone());
        }
        for p in &prepared {
            let envelope = &p.envelope;
            let target = match p.due {
                Some(_) => self.delayed_key(&envelope.queue),
                None => self.stream_key(&envelope.queue),
            };
            let record = self.result_key(&envelope.id);
            let (idem, ttl) = match &envelope.idempotency_key {
                Some(key) => {
                    let ttl = self.settings.idempotency_ttl_for(&envelope.task);
                    (self.idempotency_key(key), (ttl.as_millis() as u64).max(1))
                }
                None => (String::new(), 0),
            };
            invocation
                .arg(&target)
                .arg(p.due.map(|due| due.to_string()).unwrap_or_default())
                .arg(&p.json)
                .arg(&envelope.id)
                .arg(&record)
                .arg(if p.chosen { "1" } else { "" })
                .arg(&idem)
                .arg(ttl)
                .arg(&envelope.task)
                .arg(&envelope.queue)
                .arg(sent_detail(envelope))
                .arg(&envelope.enqueued_at);
            keys.push(target);
            keys.push(record);
            keys.extend((!idem.is_empty()).then_some(idem));
        }
        keys.sort_unstable();
        keys.dedup();
        invocation.key(keys);
        let mut conn = self.manager.clone();
        let answers: Vec<String> = self.observe(invocation.invoke_async(&mut conn).await)?;
        if answers.len() != prepared.len() {
            return Err(BrokerError::Command("enqueue.lua: unexpected reply".into()));
        }
        Ok(prepared
            .into_iter()
            .zip(answers)
            .map(|(p, first)| match first.is_empty() {
                true => Enqueued {
                    id: p.envelope.id,
                    duplicate: false,
                },
                false => Enqueued {
                    id: first,
                    duplicate: true,
                },
            })
            .collect())
    }
}

/// The fields of an enqueued task's record ([`RedisBroker::add_enqueued_record`]; `enqueue.lua`
/// writes the same): `task`, `queue`, `state`, `enqueued_at`, and `due` for a scheduled task.
/// Kept to what cannot be read elsewhere — the id is the key's, and `updated_at` reads as
/// `enqueued_at` until something else writes the record — because every enqueue pays for it.
fn enqueued_fields(envelope: &Envelope, due_ms: Option<u64>) -> Vec<(&'static str, Cow<'_, str>)> {
    let state = match due_ms {
        Some(_) => TaskState::Scheduled,
        None => TaskState::Queued,
    };
    let mut fields = vec![
        ("task", Cow::Borrowed(envelope.task.as_str())),
        ("queue", Cow::Borrowed(envelope.queue.as_str())),
        ("state", Cow::Borrowed(state.name())),
        ("enqueued_at", Cow::Borrowed(envelope.enqueued_at.as_str())),
    ];
    if let Some(due) = due_ms {
        fields.push(("due", Cow::Owned(due.to_string())));
    }
    fields
}

/// The `detail` of a `sent` event ([`SentDetail`]).
fn sent_detail(envelope: &Envelope) -> String {
    serde_json::to_string(&SentDetail::of(envelope)).unwrap_or_else(|_| "{}".to_string())
}

impl RedisBroker {
    /// Moves `letters` (dead entry id, envelope) of `queue` back to its stream in one
    /// `requeue.lua` call, each with its attempts reset and a fresh record; how many moved (a
    /// letter another caller requeued or deleted meanwhile does not).
    async fn requeue_letters(
        &self,
        queue: &str,
        letters: Vec<(String, Envelope)>,
    ) -> Result<u64, BrokerError> {
        if letters.is_empty() {
            return Ok(0);
        }
        let prefix = &self.settings.prefix;
        let mut invocation = self.scripts.requeue.prepare_invoke();
        invocation
            .key(self.dead_key(queue))
            .key(self.stream_key(queue))
            .key(revoked_key(prefix))
            .key(revoked_seq_key(prefix))
            .arg(rfc3339(SystemTime::now()));
        for (entry, mut envelope) in letters {
            envelope.attempt = 0;
            let record = self.result_key(&envelope.id);
            invocation.key(&record);
            invocation
                .arg(entry)
                .arg(envelope.to_json())
                .arg(record)
                .arg(&envelope.id)
                .arg(&envelope.task)
                .arg(&envelope.queue)
                .arg(&envelope.enqueued_at);
        }
        let mut conn = self.manager.clone();
        self.observe(invocation.invoke_async(&mut conn).await)
    }
}

impl Broker for RedisBroker {
    async fn enqueue(&self, batch: Vec<Envelope>) -> Result<Vec<Enqueued>, BrokerError> {
        let now = SystemTime::now();
        let prepared = prepare_batch(batch, now, &self.settings)?;
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let at = rfc3339(now);
        // Something to claim (an idempotency key, a chosen id): claims and writes in one script.
        if prepared
            .iter()
            .any(|p| p.chosen || p.envelope.idempotency_key.is_some())
        {
            return self.enqueue_claiming(prepared, &at).await;
        }
        // Generated ids only, no keys: nothing can be a duplicate, one pipeline.
        let mut pipe = redis::pipe();
        let mut out = Vec::with_capacity(prepared.len());
        for Prepared {
            envelope,
            json,
            due,
            ..
        } in prepared
        {
            self.add_enqueued_record(&mut pipe, &envelope, due);
            match due {
                Some(due_ms) => pipe
                    .cmd("ZADD")
                    .arg(self.delayed_key(&envelope.queue))
                    .arg(due_ms)
                    .arg(json)
                    .ignore(),
                None => pipe
                    .cmd("XADD")
                    .arg(self.stream_key(&envelope.queue))
                    .arg("*")
                    .arg("e")
                    .arg(json)
                    .ignore(),
            };
            if self.events_on() {
                let detail = sent_detail(&envelope);
                self.add_event(&mut pipe, "sent", &at, Some(&envelope), None, &detail);
            }
            out.push(Enqueued {
                id: envelope.id,
                duplicate: false,
            });
        }
        self.query_pipe::<()>(&pipe).await?;
        Ok(out)
    }

    async fn reserve(
        &self,
        queue: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        if max == 0 {
            // `COUNT 0` would mean "no limit".
            return Ok(Vec::new());
        }
        let stream = self.stream_key(queue);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let block = (!left.is_zero()).then_some(left);
            let (entries, seq) = self
                .read_group(queue, consumer, &stream, max, block)
                .await?;
            if entries.is_empty() {
                return Ok(Vec::new());
            }
            self.catch_up_revocations(seq).await;
            let (deliveries, buried) = self.deliveries(queue, &stream, entries).await?;
            // Only malformed entries came: look again rather than answer empty-handed while
            // well-formed ones may wait behind them.
            if deliveries.is_empty() && buried {
                continue;
            }
            return Ok(deliveries);
        }
    }

    async fn renew(
        &self,
        queue: &str,
        consumer: &str,
        entries: &[String],
    ) -> Result<Vec<String>, BrokerError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(self.stream_key(queue))
            .arg(self.group())
            .arg(consumer)
            .arg(0)
            .arg(entries)
            .arg("JUSTID");
        let held: Vec<String> = self
            .grouped(queue, || {
                let mut conn = self.manager.clone();
                let cmd = &cmd;
                async move { cmd.query_async(&mut conn).await }
            })
            .await?;
        let held: HashSet<&str> = held.iter().map(String::as_str).collect();
        Ok(entries
            .iter()
            .filter(|id| !held.contains(id.as_str()))
            .cloned()
            .collect())
    }

    async fn ack(&self, delivery: &Delivery, result: serde_json::Value) -> Result<(), BrokerError> {
        let at = rfc3339(SystemTime::now());
        let mut pipe = redis::pipe();
        self.add_ack(&mut pipe, delivery, &result, &at);
        self.write_outcomes(vec![pipe]).await
    }

    async fn ack_many(&self, done: &[(Delivery, serde_json::Value)]) -> Result<(), BrokerError> {
        if done.is_empty() {
            return Ok(());
        }
        let at = rfc3339(SystemTime::now());
        let outcomes = done
            .iter()
            .map(|(delivery, result)| {
                let mut pipe = redis::pipe();
                self.add_ack(&mut pipe, delivery, result, &at);
                pipe
            })
            .collect();
        self.write_outcomes(outcomes).await
    }

    async fn retry(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        error: &str,
    ) -> Result<(), BrokerError> {
        let envelope = &delivery.envelope;
        let mut next = envelope.clone();
        next.attempt = next.attempt.saturating_add(1);
        let now = rfc3339(SystemTime::now());
        let mut pipe = redis::pipe();
        self.add_reschedule(&mut pipe, delivery, &next, at);
        let due = Some(due_ms(at));
        self.add_record(
            &mut pipe,
            envelope,
            TaskState::Retrying,
            None,
            error,
            due,
            &now,
        );
        let detail = json!({ "attempt": envelope.attempt, "error": error }).to_string();
        self.add_event(&mut pipe, "retried", &now, Some(envelope), None, &detail);
        self.write_outcomes(vec![pipe]).await
    }

    async fn defer(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        reason: &str,
    ) -> Result<(), BrokerError> {
        let envelope = &delivery.envelope;
        let now = rfc3339(SystemTime::now());
        let mut pipe = redis::pipe();
        self.add_reschedule(&mut pipe, delivery, envelope, at);
        // Its record: scheduled until then (not running: it did not start).
        let record = self.result_key(&envelope.id);
        pipe.cmd("HSET")
            .arg(&record)
            .arg("id")
            .arg(&envelope.id)
            .arg("task")
            .arg(&envelope.task)
            .arg("queue")
            .arg(&envelope.queue)
            .arg("state")
            .arg(TaskState::Scheduled.name())
            .arg("due")
            .arg(due_ms(at))
            .arg("lost")
            .arg("1")
            .arg("updated_at")
            .arg(&now)
            .ignore();
        pipe.cmd("PERSIST").arg(&record).ignore();
        let detail = json!({ "reason": reason, "until": rfc3339(at) }).to_string();
        self.add_event(&mut pipe, "deferred", &now, Some(envelope), None, &detail);
        self.write_outcomes(vec![pipe]).await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        let envelope = &delivery.envelope;
        let now = rfc3339(SystemTime::now());
        let mut pipe = redis::pipe();
        pipe.cmd("XADD")
            .arg(self.dead_key(&delivery.queue))
            .arg("*")
            .arg("e")
            .arg(envelope.to_json())
            .arg("reason")
            .arg(reason)
            .arg("attempts")
            .arg(envelope.attempt.saturating_add(1))
            .arg("at")
            .arg(&now)
            .ignore();
        self.add_release(
            &mut pipe,
            &self.stream_key(&delivery.queue),
            &delivery.entry,
        );
        self.add_record(
            &mut pipe,
            envelope,
            TaskState::Dead,
            None,
            reason,
            None,
            &now,
        );
        let detail = json!({ "attempt": envelope.attempt, "error": reason }).to_string();
        self.add_event(&mut pipe, "dead", &now, Some(envelope), None, &detail);
        self.write_outcomes(vec![pipe]).await
    }

    async fn recover(&self, queue: &str, lease: Duration) -> Result<Recovered, BrokerError> {
        let (stream, dead) = (self.stream_key(queue), self.dead_key(queue));
        let lease_ms = lease.as_millis() as u64;
        let mut out = Recovered::default();
        loop {
            let now = rfc3339(SystemTime::now());
            let mut invocation = self.scripts.recover.prepare_invoke();
            invocation
                .key(&stream)
                .key(&dead)
                .arg(self.group())
                .arg(lease_ms)
                .arg(self.settings.max_deliveries)
                .arg(now)
                .arg(SCRIPT_BATCH)
                .arg(self.result_prefix())
                .arg(self.result_ttl_ms);
            let reply: Vec<Value> = self
                .grouped(queue, || {
                    let mut conn = self.manager.clone();
                    let invocation = &invocation;
                    async move { invocation.invoke_async(&mut conn).await }
                })
                .await?;
            let [requeued, died, more, moved @ ..] = reply.as_slice() else {
                return Err(BrokerError::Command("recover.lua: unexpected reply".into()));
            };
            out.requeued += int(requeued) as u64;
            out.dead += int(died) as u64;
            for entry in moved.chunks(4) {
                if let [kind, e, ..] = entry
                    && text(kind) == "dead"
                    && let Ok(envelope) = Envelope::from_json(&text(e))
                {
                    out.dead_tasks.push(envelope.task);
                }
            }
            // The entries have moved (atomically); a lost event must not hide that.
            if let Err(e) = self.recovery_events(queue, moved).await {
                tracing::warn!(queue, error = %e, "recovery events not written");
            }
            if int(more) == 0 {
                return Ok(out);
            }
        }
    }

    async fn promote_due(&self, queue: &str, now: SystemTime) -> Result<u64, BrokerError> {
        let (delayed, stream) = (self.delayed_key(queue), self.stream_key(queue));
        let now_ms = epoch_ms(now);
        let mut moved = 0;
        loop {
            let mut invocation = self.scripts.promote.prepare_invoke();
            invocation
                .key(&delayed)
                .key(&stream)
                .arg(now_ms)
                .arg(SCRIPT_BATCH);
            let mut conn = self.manager.clone();
            let n: u64 = self.observe(invocation.invoke_async(&mut conn).await)?;
            moved += n;
            if n < SCRIPT_BATCH as u64 {
                return Ok(moved);
            }
        }
    }

    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let stream = self.stream_key(queue);
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&stream);
        pipe.cmd("XPENDING").arg(&stream).arg(self.group());
        pipe.cmd("ZCARD").arg(self.delayed_key(queue));
        pipe.cmd("XLEN").arg(self.dead_key(queue));
        let (length, pending, delayed, dead): (u64, Value, u64, u64) = self
            .grouped(queue, || {
                let mut conn = self.manager.clone();
                let pipe = &pipe;
                async move { pipe.query_async(&mut conn).await }
            })
            .await?;
        let in_flight = match pending {
            Value::Array(summary) => summary.first().map_or(0, int) as u64,
            _ => 0,
        };
        Ok(QueueDepth {
            ready: length.saturating_sub(in_flight),
            delayed,
            in_flight,
            dead,
        })
    }

    async fn dead_letters_after(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        let start = match after {
            Some(after) => {
                entry_arg(after)?;
                format!("({after}")
            }
            None => "-".to_string(),
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(self.dead_key(queue))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let (reply,): (Value,) = self.query_pipe(&pipe).await?;
        Ok(stream_entries(reply).into_iter().map(dead_letter).collect())
    }

    async fn requeue_dead(&self, queue: &str, limit: usize) -> Result<u64, BrokerError> {
        let dead = self.dead_key(queue);
        let mut moved = 0u64;
        let mut start = "-".to_string();
        while moved < limit as u64 {
            let mut pipe = redis::pipe();
            pipe.cmd("XRANGE")
                .arg(&dead)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(DEAD_PAGE);
            let (reply,): (Value,) = self.query_pipe(&pipe).await?;
            let page = stream_entries(reply);
            let full = page.len() >= DEAD_PAGE;
            let Some(last) = page.last() else {
                break;
            };
            start = format!("({}", last.id);
            let room = usize::try_from(limit as u64 - moved).unwrap_or(usize::MAX);
            let letters: Vec<(String, Envelope)> = page
                .into_iter()
                .map(dead_letter)
                .filter_map(|letter| Some((letter.entry, letter.envelope?)))
                .take(room)
                .collect();
            moved += self.requeue_letters(queue, letters).await?;
            if !full {
                break;
            }
        }
        Ok(moved)
    }

    async fn requeue_dead_entry(
        &self,
        queue: &str,
        entry: &str,
    ) -> Result<Option<String>, BrokerError> {
        entry_arg(entry)?;
        let dead = self.dead_key(queue);
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE").arg(&dead).arg(entry).arg(entry);
        let (reply,): (Value,) = self.query_pipe(&pipe).await?;
        let Some(found) = stream_entries(reply).into_iter().next() else {
            return Ok(None);
        };
        let Some(envelope) = dead_letter(found).envelope else {
            return Err(malformed_letter(queue, entry));
        };
        let id = envelope.id.clone();
        let moved = self
            .requeue_letters(queue, vec![(entry.to_string(), envelope)])
            .await?;
        // Not moved: another caller requeued or deleted it between the read and the script.
        Ok((moved == 1).then_some(id))
    }

    async fn delete_dead(&self, queue: &str, entry: &str) -> Result<bool, BrokerError> {
        entry_arg(entry)?;
        let mut pipe = redis::pipe();
        pipe.cmd("XDEL").arg(self.dead_key(queue)).arg(entry);
        let (deleted,): (u64,) = self.query_pipe(&pipe).await?;
        Ok(deleted == 1)
    }

    async fn purge_dead(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XTRIM")
            .arg(self.dead_key(queue))
            .arg("MAXLEN")
            .arg(0);
        let (deleted,): (u64,) = self.query_pipe(&pipe).await?;
        Ok(deleted)
    }

    async fn purge(&self, queue: &str) -> Result<Purged, BrokerError> {
        let (stream, delayed) = (self.stream_key(queue), self.delayed_key(queue));
        let mut out = Purged::default();
        loop {
            let mut invocation = self.scripts.purge.prepare_invoke();
            invocation
                .key(&stream)
                .key(&delayed)
                .arg(self.group())
                .arg(SCRIPT_BATCH)
                .arg(self.result_prefix());
            let (ready, removed, more): (u64, u64, u64) = self
                .grouped(queue, || {
                    let mut conn = self.manager.clone();
                    let invocation = &invocation;
                    async move { invocation.invoke_async(&mut conn).await }
                })
                .await?;
            out.ready += ready;
            out.delayed += removed;
            if more == 0 {
                return Ok(out);
            }
        }
    }

    async fn publish(&self, event: Event) -> Result<(), BrokerError> {
        if !self.events_on() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        xadd_whole(
            &mut pipe,
            &self.events_key,
            self.settings.events_maxlen,
            &event,
        );
        self.query_pipe::<()>(&pipe).await
    }

    fn started(&self, envelope: &Envelope, consumer: &str) {
        let detail = json!({ "attempt": envelope.attempt, "consumer": consumer });
        lock(&self.soon).push(Start {
            record: self.result_key(&envelope.id),
            event: Event::about("started", envelope, detail),
            attempt: envelope.attempt,
            consumer: consumer.to_string(),
        });
    }

    async fn events(&self, after: Option<&str>, limit: usize) -> Result<Vec<Event>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let start = after.map_or_else(|| "-".to_string(), |id| format!("({id}"));
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(&self.events_key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let (reply,): (Value,) = self.query_pipe(&pipe).await?;
        Ok(stream_entries(reply).into_iter().map(event).collect())
    }

    async fn events_before(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let end = before.map_or_else(|| "+".to_string(), |id| format!("({id}"));
        let mut pipe = redis::pipe();
        pipe.cmd("XREVRANGE")
            .arg(&self.events_key)
            .arg(end)
            .arg("-")
            .arg("COUNT")
            .arg(limit);
        let (reply,): (Value,) = self.query_pipe(&pipe).await?;
        let mut events: Vec<Event> = stream_entries(reply).into_iter().map(event).collect();
        events.reverse();
        Ok(events)
    }

    async fn record(&self, id: &str) -> Result<Option<TaskRecord>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(self.result_key(id));
        let (reply,): (Value,) = self.query_pipe(&pipe).await?;
        let fields = pairs(reply);
        if fields.is_empty() {
            return Ok(None);
        }
        let stored = stored_record(id, &fields).map_err(BrokerError::Command)?;
        Ok(Some(stored.view(epoch_ms(SystemTime::now()))))
    }

    async fn revoke(&self, id: &str, terminate: bool) -> Result<Revoked, BrokerError> {
        let now = SystemTime::now();
        let now_ms = epoch_ms(now);
        let until = now_ms.saturating_add(self.result_ttl_ms);
        let prefix = &self.settings.prefix;
        let mut invocation = self.scripts.revoke.prepare_invoke();
        invocation
            .key(self.result_key(id))
            .key(revoked_key(prefix))
            .key(revoked_seq_key(prefix))
            .arg(id)
            .arg(if terminate { "1" } else { "0" })
            .arg(now_ms)
            .arg(until)
            .arg(revocations_channel(prefix))
            .arg(prefix)
            .arg(rfc3339(now));
        let mut conn = self.manager.clone();
        let reply: Vec<String> = self.observe(invocation.invoke_async(&mut conn).await)?;
        let state = |at: usize| reply.get(at).and_then(|name| TaskState::from_name(name));
        let answer = match reply.first().map(String::as_str) {
            Some("unknown") => Revoked::Unknown,
            Some("running") => Revoked::Running,
            Some("revoked") => Revoked::AlreadyRevoked,
            Some("pending") => Revoked::Pending(state(1).unwrap_or(TaskState::Queued)),
            Some("ended") => Revoked::Ended(state(1).unwrap_or(TaskState::Dead)),
            _ => return Err(BrokerError::Command("revoke.lua: unexpected reply".into())),
        };
        if !matches!(answer, Revoked::AlreadyRevoked | Revoked::Ended(_)) {
            // This node knows at once (its subscription tells it again, harmlessly).
            let revocation = Revocation {
                id: id.to_string(),
                terminate,
            };
            self.revocations.add(revocation, until);
        }
        Ok(answer)
    }

    fn is_revoked(&self, id: &str) -> bool {
        self.revocations.contains(id, epoch_ms(SystemTime::now()))
    }

    fn revocations(&self) -> tokio::sync::broadcast::Receiver<Revocation> {
        self.revocations.subscribe()
    }

    async fn hand_back(
        &self,
        queue: &str,
        consumer: &str,
        entries: &[String],
    ) -> Result<u64, BrokerError> {
        if entries.is_empty() {
            return Ok(0);
        }
        let mut invocation = self.scripts.hand_back.prepare_invoke();
        invocation
            .key(self.stream_key(queue))
            .arg(self.group())
            .arg(consumer);
        for entry in entries {
            invocation.arg(entry);
        }
        self.grouped(queue, || {
            let mut conn = self.manager.clone();
            let invocation = &invocation;
            async move { invocation.invoke_async(&mut conn).await }
        })
        .await
    }

    async fn claim_leadership(&self, node: &str, lease: Duration) -> Result<String, BrokerError> {
        let mut invocation = self.scripts.claim_leadership.prepare_invoke();
        invocation
            .key(self.leader_key())
            .arg(node)
            .arg((lease.as_millis() as u64).max(1));
        let mut conn = self.manager.clone();
        self.observe(invocation.invoke_async(&mut conn).await)
    }

    async fn resign_leadership(&self, node: &str) -> Result<bool, BrokerError> {
        let mut invocation = self.scripts.resign_leadership.prepare_invoke();
        invocation.key(self.leader_key()).arg(node);
        let mut conn = self.manager.clone();
        let held: u64 = self.observe(invocation.invoke_async(&mut conn).await)?;
        Ok(held == 1)
    }

    async fn last_runs(&self) -> Result<HashMap<String, LastRun>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(self.runs_key());
        let (reply,): (Value,) = self.query_pipe(&pipe).await?;
        Ok(pairs(reply)
            .into_iter()
            .filter_map(|(name, run)| Some((name, serde_json::from_str(&run).ok()?)))
            .collect())
    }

    async fn record_run(&self, schedule: &str, run: &LastRun) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        let json = serde_json::to_string(run).unwrap_or_default();
        pipe.cmd("HSET")
            .arg(self.runs_key())
            .arg(schedule)
            .arg(json)
            .ignore();
        self.query_pipe::<()>(&pipe).await
    }

    async fn announce_node(&self, record: &NodeRecord, ttl: Duration) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        let json = serde_json::to_string(record).unwrap_or_default();
        pipe.cmd("SET")
            .arg(self.node_key(&record.name))
            .arg(json)
            .arg("PX")
            .arg((ttl.as_millis() as u64).max(1))
            .ignore();
        pipe.cmd("ZADD")
            .arg(self.nodes_key())
            .arg(epoch_ms(SystemTime::now()))
            .arg(&record.name)
            .ignore();
        self.query_pipe::<()>(&pipe).await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE").arg(self.nodes_key()).arg(0).arg(-1);
        let (names,): (Vec<String>,) = self.query_pipe(&pipe).await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let keys: Vec<String> = names.iter().map(|n| self.node_key(n)).collect();
        pipe.cmd("MGET").arg(&keys);
        let (records,): (Vec<Option<String>>,) = self.query_pipe(&pipe).await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (name, record) in names.into_iter().zip(records) {
            match record.and_then(|r| serde_json::from_str::<NodeRecord>(&r).ok()) {
                Some(record) => out.push(record),
                None => gone.push(name),
            }
        }
        // Expired records leave the index too (a node that wrote again meanwhile is re-added
        // by its next write, within a second).
        if !gone.is_empty() {
            let mut pipe = redis::pipe();
            pipe.cmd("ZREM").arg(self.nodes_key()).arg(&gone).ignore();
            self.query_pipe::<()>(&pipe).await?;
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn forget_node(&self, name: &str) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.node_key(name)).ignore();
        pipe.cmd("ZREM").arg(self.nodes_key()).arg(name).ignore();
        self.query_pipe::<()>(&pipe).await
    }
}

/// A poison-tolerant lock (the guarded maps stay consistent whatever panicked).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// True when Redis answered `NOGROUP` (to a command, or to every failing command of a
/// pipeline): the queue's consumer group is gone.
fn is_nogroup(e: &RedisError) -> bool {
    e.clone().into_server_errors().is_some_and(|errors| {
        !errors.is_empty() && errors.iter().all(|(_, error)| error.code() == "NOGROUP")
    })
}

/// True for failures of the connection itself (as opposed to an answer from the server).
fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// `p:revoked`: the kept revocations (members `r:<id>`, `t:<id>` to terminate; score = until
/// when, epoch ms).
fn revoked_key(prefix: &str) -> String {
    format!("{prefix}:revoked")
}

/// `p:revoked:seq`: counts the changes of `p:revoked` (revocations, and requeues that drop
/// one).
fn revoked_seq_key(prefix: &str) -> String {
    format!("{prefix}:revoked:seq")
}

/// The pub/sub channel each revocation is published on (`{"id", "terminate", "until"}`).
fn revocations_channel(prefix: &str) -> String {
    format!("{prefix}:revocations")
}

/// A record as read from its hash (`HGETALL p:result:<id>`). Fields a careless writer left
/// out or garbled read as absent; only a `state` that is no state is an error.
fn stored_record(id: &str, fields: &[(String, String)]) -> Result<StoredRecord, String> {
    let get = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let state = match get("state") {
        None => None,
        Some(name) => match TaskState::from_name(name).filter(|s| *s != TaskState::Running) {
            Some(state) => Some(state),
            None => return Err(format!("record {id}: unknown state `{name}`")),
        },
    };
    let owned = |name: &str| get(name).map(str::to_string);
    Ok(StoredRecord {
        id: get("id").unwrap_or(id).to_string(),
        task: owned("task").unwrap_or_default(),
        queue: owned("queue").unwrap_or_default(),
        state,
        due_ms: get("due").and_then(|due| due.parse().ok()),
        result: get("result").and_then(|result| serde_json::from_str(result).ok()),
        error: owned("error"),
        attempts: get("attempts").and_then(|n| n.parse().ok()).unwrap_or(0),
        started: get("started").and_then(|n| n.parse().ok()),
        lost: get("lost") == Some("1"),
        started_at: owned("started_at"),
        node: owned("node"),
        enqueued_at: owned("enqueued_at"),
        updated_at: owned("updated_at")
            .or_else(|| owned("enqueued_at"))
            .unwrap_or_default(),
    })
}

/// Reads the kept revocations: `(id, until ms, terminate)` of each member of `p:revoked` not
/// expired, and the counter they reflect (read first: a revocation made between the two reads
/// is seen at the next catch-up again, never missed).
async fn load_revocations(
    conn: &mut ConnectionManager,
    prefix: &str,
) -> RedisResult<(Vec<(String, u64, bool)>, i64)> {
    let now = epoch_ms(SystemTime::now());
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(revoked_seq_key(prefix));
    pipe.cmd("ZRANGEBYSCORE")
        .arg(revoked_key(prefix))
        .arg(format!("({now}"))
        .arg("+inf")
        .arg("WITHSCORES");
    let (seq, members): (Option<i64>, Vec<(String, f64)>) = pipe.query_async(conn).await?;
    let kept = members
        .into_iter()
        .filter_map(|(member, until)| {
            let (kind, id) = member.split_at_checked(2)?;
            let terminate = match kind {
                "t:" => true,
                "r:" => false,
                _ => return None,
            };
            // Scores are whole milliseconds, far below 2^53.
            Some((id.to_string(), until.max(0.0) as u64, terminate))
        })
        .collect();
    Ok((kept, seq.unwrap_or(0)))
}

/// How long the revocation listener waits before subscribing again after losing its
/// connection, and how often it looks whether its broker is gone.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Keeps this node's copy of the revocations current as they are made: subscribed to the
/// revocations channel, it adds each one (and tells the consumers). After (re)subscribing it
/// reads the whole set again and tells the consumers of every revocation in it, so a running
/// task revoked while the connection was down is still stopped. Ends when the broker is
/// dropped.
async fn listen_revocations(
    revocations: Weak<Revocations>,
    client: Client,
    mut manager: ConnectionManager,
    prefix: String,
) {
    use futures_util::StreamExt;
    let channel = revocations_channel(&prefix);
    loop {
        if revocations.strong_count() == 0 {
            return;
        }
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            RedisResult::Ok(pubsub)
        };
        let mut pubsub = match tokio::time::timeout(CONNECT_TIMEOUT * 2, subscribed).await {
            Ok(Ok(pubsub)) => pubsub,
            _ => {
                tokio::time::sleep(LISTEN_RETRY).await;
                continue;
            }
        };
        match load_revocations(&mut manager, &prefix).await {
            Ok((kept, seq)) => match revocations.upgrade() {
                Some(revocations) => revocations.replace(kept, seq, true),
                None => return,
            },
            Err(err) => tracing::debug!(error = %err, "revocations not read after subscribing"),
        }
        let mut messages = pubsub.on_message();
        loop {
            let message = tokio::select! {
                message = messages.next() => message,
                () = tokio::time::sleep(LISTEN_RETRY) => {
                    if revocations.strong_count() == 0 {
                        return;
                    }
                    continue;
                }
            };
            let Some(message) = message else {
                // The connection is gone: subscribe again.
                break;
            };
            let Some(revocations) = revocations.upgrade() else {
                return;
            };
            let payload: Vec<u8> = message.get_payload_bytes().to_vec();
            #[derive(serde::Deserialize)]
            struct Published {
                id: String,
                terminate: bool,
                until: String,
            }
            match serde_json::from_slice::<Published>(&payload) {
                Ok(published) => revocations.add(
                    Revocation {
                        id: published.id,
                        terminate: published.terminate,
                    },
                    published.until.parse().unwrap_or(0),
                ),
                Err(err) => tracing::debug!(error = %err, "a revocation message not understood"),
            }
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}

/// One stream entry as read: id and fields in order.
#[derive(Debug)]
struct StreamEntry {
    id: String,
    fields: Vec<(String, String)>,
    /// Names of the fields whose value was not valid UTF-8 (decoded lossily in `fields`).
    not_utf8: Vec<String>,
}

/// Text of a reply value (bulk strings that are not UTF-8 are decoded lossily).
fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::VerbatimString { text, .. } => text.clone(),
        Value::Int(n) => n.to_string(),
        Value::Okay => "OK".to_string(),
        _ => String::new(),
    }
}

fn into_text(value: Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()),
        Value::SimpleString(s) => s,
        other => text(&other),
    }
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        other => text(other).parse().unwrap_or(0),
    }
}

/// Field/value pairs of a hash or stream entry reply (a flat array in RESP2, a map in RESP3).
fn pairs(value: Value) -> Vec<(String, String)> {
    match value {
        Value::Map(map) => map
            .into_iter()
            .map(|(k, v)| (into_text(k), into_text(v)))
            .collect(),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut items = items.into_iter();
            while let (Some(k), Some(v)) = (items.next(), items.next()) {
                out.push((into_text(k), into_text(v)));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// Names of the fields of a stream entry reply whose value is a bulk string that is not UTF-8.
fn not_utf8_fields(value: &Value) -> Vec<String> {
    let bad =
        |v: &Value| matches!(v, Value::BulkString(bytes) if std::str::from_utf8(bytes).is_err());
    match value {
        Value::Map(map) => map
            .iter()
            .filter(|(_, v)| bad(v))
            .map(|(k, _)| text(k))
            .collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter(|pair| pair.len() == 2 && bad(&pair[1]))
            .map(|pair| text(&pair[0]))
            .collect(),
        _ => Vec::new(),
    }
}

/// Entries of an `XRANGE` reply (or of one stream in an `XREADGROUP` reply).
fn stream_entries(value: Value) -> Vec<StreamEntry> {
    let Value::Array(entries) = value else {
        return Vec::new();
    };
    entries
        .into_iter()
        .filter_map(|entry| {
            let Value::Array(parts) = entry else {
                return None;
            };
            let mut parts = parts.into_iter();
            let id = into_text(parts.next()?);
            let raw = parts.next();
            let not_utf8 = raw.as_ref().map(not_utf8_fields).unwrap_or_default();
            let fields = raw.map(pairs).unwrap_or_default();
            Some(StreamEntry {
                id,
                fields,
                not_utf8,
            })
        })
        .collect()
}

/// Entries of an `XREADGROUP` reply for one stream (nil when the block timed out).
fn read_reply(value: Value) -> Vec<StreamEntry> {
    match value {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|stream| match stream {
                Value::Array(parts) => parts
                    .into_iter()
                    .nth(1)
                    .map(stream_entries)
                    .unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(streams) => streams
            .into_iter()
            .flat_map(|(_, entries)| stream_entries(entries))
            .collect(),
        _ => Vec::new(),
    }
}

/// A dead letter from its stream entry (`raw` when `e` is not a valid envelope).
fn dead_letter(entry: StreamEntry) -> DeadLetter {
    let mut letter = DeadLetter {
        entry: entry.id,
        reason: String::new(),
        attempts: 0,
        at: String::new(),
        envelope: None,
        raw: None,
    };
    let mut e = String::new();
    let mut raw = false;
    for (name, value) in entry.fields {
        match name.as_str() {
            "e" => e = value,
            "reason" => letter.reason = value,
            "attempts" => letter.attempts = value.parse().unwrap_or(0),
            "at" => letter.at = value,
            "raw" => raw = value == "1",
            _ => {}
        }
    }
    if !raw {
        letter.envelope = Envelope::from_json(&e).ok();
    }
    if letter.envelope.is_none() {
        letter.raw = Some(e);
    }
    letter
}

/// An event from its stream entry.
fn event(entry: StreamEntry) -> Event {
    let mut event = Event {
        id: entry.id,
        kind: String::new(),
        at: String::new(),
        task_id: None,
        task: None,
        queue: None,
        detail: serde_json::Value::Null,
    };
    for (name, value) in entry.fields {
        match name.as_str() {
            "kind" => event.kind = value,
            "at" => event.at = value,
            "task_id" => event.task_id = Some(value),
            "task" => event.task = Some(value),
            "queue" => event.queue = Some(value),
            "detail" => {
                event.detail =
                    serde_json::from_str(&value).unwrap_or(serde_json::Value::String(value))
            }
            _ => {}
        }
    }
    event
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use serde_json::{Value, json};

    use super::RedisBroker;
    use crate::broker::contract::{RawProducer, contract_suite, settings};
    use crate::broker::{
        Broker, BrokerError, BrokerSettings, DeadLetter, Delivery, Enqueued, Envelope, Event,
        Purged, QueueDepth, Recovered, TaskRecord, TaskState,
    };
    use crate::test_util::RedisServer;

    /// A broker with its own redis-server, killed when the test ends.
    struct Harness {
        broker: RedisBroker,
        server: RedisServer,
    }

    impl Harness {
        async fn start(settings: BrokerSettings) -> Self {
            Self::on(RedisServer::start(), settings).await
        }

        async fn on(server: RedisServer, settings: BrokerSettings) -> Self {
            let broker = RedisBroker::connect(&server.url(), settings).await.unwrap();
            Self { broker, server }
        }

        /// A plain connection, as another program (a Python producer) would have.
        async fn outsider(&self) -> redis::aio::MultiplexedConnection {
            redis::Client::open(self.server.url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }
    }

    impl RawProducer for Harness {
        async fn push_raw(&self, queue: &str, raw: &str) {
            let mut conn = self.outsider().await;
            redis::cmd("XADD")
                .arg(format!("rt:{{{queue}}}:stream"))
                .arg("*")
                .arg("e")
                .arg(raw)
                .query_async::<String>(&mut conn)
                .await
                .unwrap();
        }
    }

    /// The suite is written against `Broker`; the harness passes every call through.
    impl Broker for Harness {
        async fn enqueue(&self, batch: Vec<Envelope>) -> Result<Vec<Enqueued>, BrokerError> {
            self.broker.enqueue(batch).await
        }
        async fn reserve(
            &self,
            queue: &str,
            consumer: &str,
            max: usize,
            wait: Duration,
        ) -> Result<Vec<Delivery>, BrokerError> {
            self.broker.reserve(queue, consumer, max, wait).await
        }
        async fn renew(
            &self,
            queue: &str,
            consumer: &str,
            entries: &[String],
        ) -> Result<Vec<String>, BrokerError> {
            self.broker.renew(queue, consumer, entries).await
        }
        async fn ack(&self, delivery: &Delivery, result: Value) -> Result<(), BrokerError> {
            self.broker.ack(delivery, result).await
        }
        async fn ack_many(&self, done: &[(Delivery, Value)]) -> Result<(), BrokerError> {
            self.broker.ack_many(done).await
        }
        async fn retry(
            &self,
            delivery: &Delivery,
            at: SystemTime,
            error: &str,
        ) -> Result<(), BrokerError> {
            self.broker.retry(delivery, at, error).await
        }
        async fn defer(
            &self,
            delivery: &Delivery,
            at: SystemTime,
            reason: &str,
        ) -> Result<(), BrokerError> {
            self.broker.defer(delivery, at, reason).await
        }
        async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
            self.broker.dead_letter(delivery, reason).await
        }
        async fn recover(&self, queue: &str, lease: Duration) -> Result<Recovered, BrokerError> {
            self.broker.recover(queue, lease).await
        }
        async fn promote_due(&self, queue: &str, now: SystemTime) -> Result<u64, BrokerError> {
            self.broker.promote_due(queue, now).await
        }
        async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
            self.broker.depth(queue).await
        }
        async fn dead_letters_after(
            &self,
            queue: &str,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<DeadLetter>, BrokerError> {
            self.broker.dead_letters_after(queue, after, limit).await
        }
        async fn requeue_dead(&self, queue: &str, limit: usize) -> Result<u64, BrokerError> {
            self.broker.requeue_dead(queue, limit).await
        }
        async fn requeue_dead_entry(
            &self,
            queue: &str,
            entry: &str,
        ) -> Result<Option<String>, BrokerError> {
            self.broker.requeue_dead_entry(queue, entry).await
        }
        async fn delete_dead(&self, queue: &str, entry: &str) -> Result<bool, BrokerError> {
            self.broker.delete_dead(queue, entry).await
        }
        async fn purge_dead(&self, queue: &str) -> Result<u64, BrokerError> {
            self.broker.purge_dead(queue).await
        }
        async fn purge(&self, queue: &str) -> Result<Purged, BrokerError> {
            self.broker.purge(queue).await
        }
        async fn publish(&self, event: Event) -> Result<(), BrokerError> {
            self.broker.publish(event).await
        }
        fn started(&self, envelope: &Envelope, consumer: &str) {
            self.broker.started(envelope, consumer);
        }
        async fn events(
            &self,
            after: Option<&str>,
            limit: usize,
        ) -> Result<Vec<Event>, BrokerError> {
            self.broker.events(after, limit).await
        }
        async fn events_before(
            &self,
            before: Option<&str>,
            limit: usize,
        ) -> Result<Vec<Event>, BrokerError> {
            self.broker.events_before(before, limit).await
        }
        async fn record(&self, id: &str) -> Result<Option<TaskRecord>, BrokerError> {
            self.broker.record(id).await
        }
        async fn revoke(
            &self,
            id: &str,
            terminate: bool,
        ) -> Result<crate::broker::Revoked, BrokerError> {
            self.broker.revoke(id, terminate).await
        }
        fn is_revoked(&self, id: &str) -> bool {
            self.broker.is_revoked(id)
        }
        fn revocations(&self) -> tokio::sync::broadcast::Receiver<crate::broker::Revocation> {
            self.broker.revocations()
        }
        async fn hand_back(
            &self,
            queue: &str,
            consumer: &str,
            entries: &[String],
        ) -> Result<u64, BrokerError> {
            self.broker.hand_back(queue, consumer, entries).await
        }
        async fn claim_leadership(
            &self,
            node: &str,
            lease: Duration,
        ) -> Result<String, BrokerError> {
            self.broker.claim_leadership(node, lease).await
        }
        async fn resign_leadership(&self, node: &str) -> Result<bool, BrokerError> {
            self.broker.resign_leadership(node).await
        }
        async fn last_runs(
            &self,
        ) -> Result<std::collections::HashMap<String, crate::broker::LastRun>, BrokerError>
        {
            self.broker.last_runs().await
        }
        async fn record_run(
            &self,
            schedule: &str,
            run: &crate::broker::LastRun,
        ) -> Result<(), BrokerError> {
            self.broker.record_run(schedule, run).await
        }
        async fn announce_node(
            &self,
            record: &crate::broker::NodeRecord,
            ttl: Duration,
        ) -> Result<(), BrokerError> {
            self.broker.announce_node(record, ttl).await
        }
        async fn nodes(&self) -> Result<Vec<crate::broker::NodeRecord>, BrokerError> {
            self.broker.nodes().await
        }
        async fn forget_node(&self, name: &str) -> Result<(), BrokerError> {
            self.broker.forget_node(name).await
        }
    }

    contract_suite!(Harness::start(settings()));

    #[tokio::test]
    async fn events_off_write_nothing() {
        let h = Harness::start(BrokerSettings {
            events_maxlen: 0,
            ..settings()
        })
        .await;
        crate::broker::contract::events_off_write_nothing(&h, "chat").await;
        let mut conn = h.outsider().await;
        let exists: bool = redis::cmd("EXISTS")
            .arg("rt:events")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!exists, "rt:events written with events off");
    }

    fn task(queue: &str, n: u32) -> Envelope {
        let mut env = Envelope::new("send_whatsapp_message_task", queue);
        env.args = vec![json!(n)];
        env
    }

    #[tokio::test]
    async fn a_closed_port_is_unreachable_and_named_without_the_password() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("redis://app:hunter2@127.0.0.1:{port}/0");
        let started = tokio::time::Instant::now();
        let err = RedisBroker::connect(&url, BrokerSettings::default())
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5), "not fast");
        match &err {
            BrokerError::Unreachable { url, .. } => {
                assert_eq!(url, &format!("redis://app@127.0.0.1:{port}/0"));
            }
            other => panic!("expected Unreachable, got {other:?}"),
        }
        let shown = err.to_string();
        assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_raw_xadd_from_another_producer_is_delivered() {
        let h = Harness::start(settings()).await;
        let mut conn = h.outsider().await;
        // Added before any consumer (or group) exists, the way a Python producer would.
        let json = r#"{"id":"py-1","task":"process_chat_message","queue":"chat","args":["hi"],"kwargs":{"user":7},"celery_origin":"web-1"}"#;
        let _: String = redis::cmd("XADD")
            .arg("rt:{chat}:stream")
            .arg("*")
            .arg("e")
            .arg(json)
            .query_async(&mut conn)
            .await
            .unwrap();
        let got = h
            .broker
            .reserve("chat", "node-1", 10, Duration::from_millis(200))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.id, "py-1");
        assert_eq!(got[0].envelope.kwargs["user"], 7);
        assert_eq!(got[0].envelope.extra["celery_origin"], "web-1");
        assert_eq!(got[0].deliveries, 1);
        h.broker.ack(&got[0], json!({"ok": true})).await.unwrap();
        // The record is a plain hash a Python reader can HGETALL.
        let state: String = redis::cmd("HGET")
            .arg("rt:result:py-1")
            .arg("state")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(state, "succeeded");
        assert_eq!(h.broker.depth("chat").await.unwrap(), QueueDepth::default());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn duplicates_inside_one_batch_return_the_first_id() {
        let h = Harness::start(settings()).await;
        let q = "dedupe";
        let mut batch: Vec<Envelope> = (0..4).map(|n| task(q, n)).collect();
        batch[0].idempotency_key = Some("k1".into());
        batch[2].idempotency_key = Some("k1".into());
        batch[3].idempotency_key = Some("k2".into());
        let sent = h.broker.enqueue(batch).await.unwrap();
        let flags: Vec<bool> = sent.iter().map(|e| e.duplicate).collect();
        assert_eq!(flags, [false, false, true, false]);
        assert_eq!(sent[2].id, sent[0].id);
        assert_eq!(h.broker.depth(q).await.unwrap().ready, 3);
        // Re-sending the very same envelope (same id, same key) is a duplicate too.
        let mut again = task(q, 9);
        again.id = sent[3].id.clone();
        again.idempotency_key = Some("k2".into());
        let second = h.broker.enqueue(vec![again]).await.unwrap();
        assert!(second[0].duplicate);
        assert_eq!(h.broker.depth(q).await.unwrap().ready, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_blocked_reserve_does_not_hold_up_other_commands() {
        let h = Harness::start(settings()).await;
        let started = tokio::time::Instant::now();
        let (got, _) = tokio::join!(
            h.broker
                .reserve("idle", "c", 1, Duration::from_millis(1500)),
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                for n in 0..20 {
                    h.broker.enqueue(vec![task("other", n)]).await.unwrap();
                    h.broker.depth("other").await.unwrap();
                }
                assert!(
                    started.elapsed() < Duration::from_millis(1000),
                    "commands waited for the blocking read"
                );
            }
        );
        assert!(got.unwrap().is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_restart_loses_no_acknowledged_result_and_no_task() {
        let settings = BrokerSettings {
            result_ttl: Duration::from_secs(600),
            ..settings()
        };
        let mut h = Harness::on(RedisServer::start_with_aof(), settings).await;
        let q = "restart";
        let sent = h
            .broker
            .enqueue((0..20).map(|n| task(q, n)).collect())
            .await
            .unwrap();
        let got = h.broker.reserve(q, "c1", 10, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 10);
        for d in &got[..5] {
            h.broker.ack(d, json!(d.envelope.args[0])).await.unwrap();
        }
        // A consumer blocked on the queue while the server dies.
        let blocked = h.broker.reserve("empty", "c1", 1, Duration::from_secs(2));
        let kill = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            h.server.stop();
        };
        let (blocked, ()) = tokio::join!(blocked, kill);
        assert!(
            matches!(blocked, Err(BrokerError::Unreachable { .. })),
            "{blocked:?}"
        );
        let err = h.broker.depth(q).await.unwrap_err();
        assert!(matches!(err, BrokerError::Unreachable { .. }), "{err:?}");
        let state = h.broker.connection_state();
        assert!(!state.is_connected(), "{state}");
        assert!(
            state.to_string().starts_with("reconnecting since "),
            "{state}"
        );

        h.server.restart();
        // The broker reconnects by itself; callers just try again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let depth = loop {
            match h.broker.depth(q).await {
                Ok(depth) => break depth,
                Err(e) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "never reconnected: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert!(h.broker.connection_state().is_connected());
        assert_eq!((depth.ready, depth.in_flight), (10, 5));
        for d in &got[..5] {
            let record = h.broker.record(&d.envelope.id).await.unwrap();
            let record = record.expect("acknowledged result lost in the restart");
            assert_eq!(record.state, TaskState::Succeeded);
            assert_eq!(record.result, Some(d.envelope.args[0].clone()));
        }
        // The unacknowledged five come back when their lease expires; with the rest, every
        // task that was not acknowledged is delivered.
        let recovered = h.broker.recover(q, Duration::ZERO).await.unwrap();
        assert_eq!(recovered.requeued, 5);
        let mut rest = Vec::new();
        loop {
            let more = h
                .broker
                .reserve(q, "c2", 7, Duration::from_millis(200))
                .await
                .unwrap();
            if more.is_empty() {
                break;
            }
            rest.extend(more);
        }
        let mut ids: Vec<String> = rest.iter().map(|d| d.envelope.id.clone()).collect();
        ids.sort();
        let mut expected: Vec<String> = sent[5..].iter().map(|e| e.id.clone()).collect();
        expected.sort();
        assert_eq!(ids, expected);
        // The blocking consumer works again too.
        h.broker.enqueue(vec![task("empty", 1)]).await.unwrap();
        let got = h
            .broker
            .reserve("empty", "c1", 1, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_letter_entries_have_the_documented_fields() {
        let h = Harness::start(settings()).await;
        let q = "fields";
        h.broker.enqueue(vec![task(q, 1)]).await.unwrap();
        let got = h.broker.reserve(q, "c", 1, Duration::ZERO).await.unwrap();
        h.broker
            .dead_letter(&got[0], "permanent: 400")
            .await
            .unwrap();
        let mut conn = h.outsider().await;
        let reply: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg("rt:{fields}:dead")
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let names: Vec<&str> = reply[0].1.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["e", "reason", "attempts", "at"]);
        let depth = h.broker.depth(q).await.unwrap();
        assert_eq!((depth.in_flight, depth.dead), (0, 1));
    }

    /// Sizes above one script batch (256) and one dead-letter page (100) take several calls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn big_queues_are_moved_in_batches() {
        let h = Harness::start(settings()).await;
        let q = "big";
        let n = 700u32;
        let due = crate::broker::rfc3339(SystemTime::now() + Duration::from_millis(100));
        let batch: Vec<Envelope> = (0..n)
            .map(|i| {
                let mut env = task(q, i);
                env.eta = Some(due.clone());
                env
            })
            .collect();
        h.broker.enqueue(batch).await.unwrap();
        assert_eq!(h.broker.depth(q).await.unwrap().delayed, u64::from(n));
        let later = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(h.broker.promote_due(q, later).await.unwrap(), u64::from(n));
        let got = h
            .broker
            .reserve(q, "c", 1000, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(got.len(), n as usize);
        let first_order: Vec<u64> = got
            .iter()
            .map(|d| d.envelope.args[0].as_u64().unwrap())
            .collect();
        let recovered = h.broker.recover(q, Duration::ZERO).await.unwrap();
        assert_eq!(recovered.requeued, u64::from(n));
        // Recovered entries keep their order. (Entries due at the same millisecond are
        // promoted in member order, not enqueue order: see the module docs.)
        let again = h
            .broker
            .reserve(q, "c", 1000, Duration::ZERO)
            .await
            .unwrap();
        let order: Vec<u64> = again
            .iter()
            .map(|d| d.envelope.args[0].as_u64().unwrap())
            .collect();
        assert_eq!(order, first_order);
        for d in &again {
            h.broker.dead_letter(d, "permanent").await.unwrap();
        }
        assert_eq!(h.broker.requeue_dead(q, 650).await.unwrap(), 650);
        assert_eq!(h.broker.depth(q).await.unwrap().dead, 50);
        assert_eq!(h.broker.purge(q).await.unwrap().ready, 650);
        assert_eq!(
            h.broker.depth(q).await.unwrap(),
            QueueDepth {
                dead: 50,
                ..QueueDepth::default()
            }
        );
    }

    /// A Redis that comes back empty (no persistence) loses its consumer groups: the broker
    /// creates them again instead of failing on NOGROUP forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_that_lost_its_data_gets_its_groups_back() {
        let mut h = Harness::start(settings()).await;
        let q = "amnesia";
        h.broker.enqueue(vec![task(q, 1)]).await.unwrap();
        let got = h.broker.reserve(q, "c", 1, Duration::ZERO).await.unwrap();
        // Started without AOF and with `--save ""`: it comes back empty.
        h.server.restart();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while h.broker.depth(q).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never reconnected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The lost delivery can still be settled; new work flows, blocking reads included.
        h.broker.ack(&got[0], json!(1)).await.unwrap();
        h.broker.enqueue(vec![task(q, 2)]).await.unwrap();
        let got = h
            .broker
            .reserve(q, "c", 1, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(
            h.broker
                .renew(q, "c", &[got[0].entry.clone()])
                .await
                .unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            h.broker.recover(q, Duration::from_secs(60)).await.unwrap(),
            Recovered::default()
        );
    }

    /// Runs `cmd` on another connection (a careless tool or program writing into the
    /// runtime's namespace).
    async fn redis_cli(h: &Harness, cmd: &[&str]) -> redis::Value {
        let mut conn = h.outsider().await;
        redis::cmd(cmd[0])
            .arg(&cmd[1..])
            .query_async(&mut conn)
            .await
            .unwrap()
    }

    /// Entries of `queue` reserved and not settled (`XPENDING`), from outside the broker.
    async fn pending(h: &Harness, queue: &str) -> i64 {
        let stream = format!("rt:{{{queue}}}:stream");
        match redis_cli(h, &["XPENDING", &stream, "rt"]).await {
            redis::Value::Array(summary) => super::int(&summary[0]),
            other => panic!("XPENDING: {other:?}"),
        }
    }

    /// Event kinds written about task `id`.
    async fn kinds(h: &Harness, id: &str) -> Vec<String> {
        let events = h.broker.events(None, 10_000).await.unwrap();
        events
            .into_iter()
            .filter(|e| e.task_id.as_deref() == Some(id))
            .map(|e| e.kind)
            .collect()
    }

    /// A key of the wrong type where an outcome writes (`SET rt:result:<id> x`, a string at
    /// the delayed set, the dead letters or the events stream) fails that outcome whole: the
    /// error names the key, the entry stays pending (it comes back after its lease — it was
    /// not acked), no record, no event, nothing moved. With the key fixed, the entry comes back
    /// and its outcome is written. (Before: the record write failed, the ack went through, and
    /// the task was gone with no record.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outcome_that_cannot_be_written_is_not_written_at_all() {
        let h = Harness::start(settings()).await;
        let q = "wrongtype";
        let sent = h
            .broker
            .enqueue((0..4).map(|n| task(q, n)).collect())
            .await
            .unwrap();
        let got = h.broker.reserve(q, "c", 4, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 4);
        let id = |n: usize| sent[n].id.as_str();

        // The record key holds a string.
        let record_key = format!("rt:result:{}", id(0));
        redis_cli(&h, &["SET", &record_key, "x"]).await;
        let err = h.broker.ack(&got[0], json!("r")).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "broker command failed: WRONGTYPE {record_key} holds a string, not a hash \
                 (nothing of this outcome was written)"
            )
        );
        // The delayed set is a string: neither a retry nor a deferral is written.
        redis_cli(&h, &["SET", "rt:{wrongtype}:delayed", "x"]).await;
        let at = SystemTime::now();
        let err = h.broker.retry(&got[1], at, "timeout").await.unwrap_err();
        assert!(
            err.to_string()
                .contains("rt:{wrongtype}:delayed holds a string, not a zset"),
            "{err}"
        );
        let err = h.broker.defer(&got[1], at, "breaker").await.unwrap_err();
        assert!(
            err.to_string()
                .contains("rt:{wrongtype}:delayed holds a string"),
            "{err}"
        );
        // The dead letters are a list.
        redis_cli(&h, &["LPUSH", "rt:{wrongtype}:dead", "x"]).await;
        let err = h
            .broker
            .dead_letter(&got[2], "permanent")
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("rt:{wrongtype}:dead holds a list, not a stream"),
            "{err}"
        );
        // Several acks at once: the good one is written, the bad one named.
        let err = h
            .broker
            .ack_many(&[(got[0].clone(), json!("r")), (got[3].clone(), json!("ok"))])
            .await
            .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "broker command failed: 1 of 2 outcomes not written (the others were): WRONGTYPE"
            ),
            "{err}"
        );
        assert_eq!(
            h.broker.record(id(3)).await.unwrap().unwrap().state,
            TaskState::Succeeded
        );

        // Nothing of the three failed outcomes was written.
        assert_eq!(pending(&h, q).await, 3, "their entries were not acked");
        for n in 0..3 {
            assert_eq!(
                kinds(&h, id(n)).await,
                ["sent"],
                "task {n}: no outcome event"
            );
        }
        assert_eq!(
            redis_cli(&h, &["GET", &record_key]).await,
            redis::Value::BulkString(b"x".to_vec())
        );
        for n in 1..3 {
            let record = h.broker.record(id(n)).await.unwrap().unwrap();
            assert_eq!(record.state, TaskState::Queued, "task {n}: as enqueued");
        }
        let dead = redis_cli(&h, &["LLEN", "rt:{wrongtype}:dead"]).await;
        assert_eq!(dead, redis::Value::Int(1), "the list is as it was");

        // Fixed: the entries come back through lease recovery and their outcomes are written.
        for key in [
            record_key.as_str(),
            "rt:{wrongtype}:delayed",
            "rt:{wrongtype}:dead",
        ] {
            redis_cli(&h, &["DEL", key]).await;
        }
        assert_eq!(
            h.broker.recover(q, Duration::ZERO).await.unwrap().requeued,
            3
        );
        let again = h.broker.reserve(q, "c", 4, Duration::ZERO).await.unwrap();
        let ids: Vec<&str> = again.iter().map(|d| d.envelope.id.as_str()).collect();
        assert_eq!(ids, [id(0), id(1), id(2)]);
        h.broker.ack(&again[0], json!("r")).await.unwrap();
        h.broker.retry(&again[1], at, "timeout").await.unwrap();
        h.broker.dead_letter(&again[2], "permanent").await.unwrap();
        for (n, state) in [TaskState::Succeeded, TaskState::Retrying, TaskState::Dead]
            .into_iter()
            .enumerate()
        {
            let record = h.broker.record(id(n)).await.unwrap().unwrap();
            assert_eq!(record.state, state, "task {n}");
        }
        assert_eq!(kinds(&h, id(0)).await, ["sent", "recovered", "succeeded"]);
        assert_eq!(
            h.broker.depth(q).await.unwrap(),
            QueueDepth {
                delayed: 1,
                dead: 1,
                ..QueueDepth::default()
            }
        );
    }

    /// The events stream is part of every outcome: a string there fails the outcome whole
    /// (the task stays pending), and the `started` events waiting to travel with it are
    /// reported, not written half.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_wrong_type_events_stream_fails_the_outcome_whole() {
        let h = Harness::start(settings()).await;
        let q = "events-wrongtype";
        let sent = h.broker.enqueue(vec![task(q, 1)]).await.unwrap();
        let got = h.broker.reserve(q, "c", 1, Duration::ZERO).await.unwrap();
        h.broker.started(&got[0].envelope, "c");
        redis_cli(&h, &["DEL", "rt:events"]).await;
        redis_cli(&h, &["SET", "rt:events", "x"]).await;
        let err = h.broker.ack(&got[0], json!(1)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("rt:events holds a string, not a stream"),
            "{err}"
        );
        assert_eq!(pending(&h, q).await, 1);
        let record = h.broker.record(&sent[0].id).await.unwrap().unwrap();
        assert_eq!(record.state, TaskState::Queued, "neither started nor acked");
        redis_cli(&h, &["DEL", "rt:events"]).await;
        h.broker.ack(&got[0], json!(1)).await.unwrap();
        assert_eq!(pending(&h, q).await, 0);
        assert_eq!(kinds(&h, &sent[0].id).await, ["succeeded"]);
    }

    /// Requeuing dead letters, purging, enqueueing with ids or keys, and a malformed entry's
    /// burial check their keys before writing: a wrong-type stream loses no dead letter, a
    /// wrong-type idempotency key enqueues nothing, a malformed entry whose dead letters
    /// cannot be written stays pending (and the good entries read with it still run).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_other_scripts_check_their_keys_before_writing() {
        let h = Harness::start(settings()).await;
        let q = "scripts-wrongtype";
        h.broker.enqueue(vec![task(q, 1)]).await.unwrap();
        let got = h.broker.reserve(q, "c", 1, Duration::ZERO).await.unwrap();
        h.broker.dead_letter(&got[0], "permanent").await.unwrap();
        let stream = format!("rt:{{{q}}}:stream");
        redis_cli(&h, &["DEL", &stream]).await;
        redis_cli(&h, &["SET", &stream, "x"]).await;
        let err = h.broker.requeue_dead(q, 10).await.unwrap_err();
        assert!(
            err.to_string().contains("holds a string, not a stream"),
            "{err}"
        );
        assert_eq!(
            h.broker.dead_letters(q, 10).await.unwrap().len(),
            1,
            "not lost"
        );
        // One letter by its entry: the same script, the same check.
        let entry = h.broker.dead_letters(q, 1).await.unwrap()[0].entry.clone();
        let err = h.broker.requeue_dead_entry(q, &entry).await.unwrap_err();
        assert!(
            err.to_string().contains("holds a string, not a stream"),
            "{err}"
        );
        assert_eq!(h.broker.dead_letters(q, 10).await.unwrap().len(), 1);
        let err = h.broker.purge(q).await.unwrap_err();
        assert!(
            err.to_string().contains("holds a string, not a stream"),
            "{err}"
        );
        redis_cli(&h, &["DEL", &stream]).await;

        redis_cli(&h, &["HSET", "rt:idem:k", "f", "v"]).await;
        let mut keyed = task(q, 2);
        keyed.idempotency_key = Some("k".into());
        let mut chosen = task(q, 3);
        chosen.id = "chosen-1".into();
        let err = h
            .broker
            .enqueue(vec![chosen.clone(), keyed])
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("rt:idem:k holds a hash, not a string"),
            "{err}"
        );
        assert_eq!(h.broker.depth(q).await.unwrap().ready, 0);
        // Its id was not taken either (no record written): it enqueues once the key is fixed.
        assert!(!h.broker.enqueue(vec![chosen]).await.unwrap()[0].duplicate);

        let dead = format!("rt:{{{q}}}:dead");
        redis_cli(&h, &["DEL", &dead]).await;
        redis_cli(&h, &["SET", &dead, "x"]).await;
        h.push_raw(q, "not json").await;
        h.broker.enqueue(vec![task(q, 4)]).await.unwrap();
        let got = h.broker.reserve(q, "c", 10, Duration::ZERO).await.unwrap();
        let ns: Vec<u64> = got
            .iter()
            .map(|d| d.envelope.args[0].as_u64().unwrap())
            .collect();
        assert_eq!(ns, [3, 4], "the good entries run");
        assert_eq!(
            pending(&h, q).await,
            3,
            "the malformed one is pending, not lost"
        );
    }

    /// Revocations reach every node sharing the Redis: one listening hears it as it is made
    /// (the node running the task acts on it), and one that starts later knows it from its
    /// first read (its consumers refuse the task at admission).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn revocations_reach_other_nodes_and_nodes_started_later() {
        let a = Harness::start(settings()).await;
        let b = RedisBroker::connect(&a.server.url(), settings())
            .await
            .unwrap();
        let mut heard = b.revocations();
        let q = "revoke-nodes";
        let sent = a
            .broker
            .enqueue(vec![task(q, 1), task(q, 2)])
            .await
            .unwrap();
        let got = b.reserve(q, "node-b", 1, Duration::ZERO).await.unwrap();
        b.started(&got[0].envelope, "node-b");
        // The start travels within EVENT_FLUSH.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while a.broker.record(&sent[0].id).await.unwrap().unwrap().state != TaskState::Running {
            assert!(tokio::time::Instant::now() < deadline, "never running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            a.broker.revoke(&sent[0].id, true).await.unwrap(),
            crate::broker::Revoked::Running
        );
        let told = tokio::time::timeout(Duration::from_secs(5), heard.recv())
            .await
            .expect("node b never heard of it")
            .unwrap();
        assert_eq!(
            told,
            crate::broker::Revocation {
                id: sent[0].id.clone(),
                terminate: true
            }
        );
        assert!(b.is_revoked(&sent[0].id));
        a.broker.revoke(&sent[1].id, false).await.unwrap();
        // A node that starts now: it knows both once it reads (in the read's round trip).
        let c = RedisBroker::connect(&a.server.url(), settings())
            .await
            .unwrap();
        let got = c.reserve(q, "node-c", 5, Duration::ZERO).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].envelope.id, sent[1].id);
        assert!(c.is_revoked(&sent[1].id));
        assert!(c.is_revoked(&sent[0].id));
        assert!(!c.is_revoked("someone-else"));
    }

    /// Throughput probe (`cargo test -p actors throughput -- --ignored --nocapture`): a
    /// debug build is several times slower than release; the targets (≥ 50k enqueues/s
    /// batched, ≥ 45k/s drained with acks) are for release builds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a test"]
    async fn enqueue_and_drain_throughput() {
        let server = RedisServer::start();
        let broker = std::sync::Arc::new(
            RedisBroker::connect(&server.url(), settings())
                .await
                .unwrap(),
        );
        let q = "bench";
        let total = 50_000u32;
        let started = tokio::time::Instant::now();
        for chunk in 0..total / 500 {
            let batch = (0..500).map(|i| task(q, chunk * 500 + i)).collect();
            broker.enqueue(batch).await.unwrap();
        }
        let took = started.elapsed();
        println!(
            "enqueue (batches of 500): {total} in {took:?} = {:.0}/s",
            f64::from(total) / took.as_secs_f64()
        );
        let started = tokio::time::Instant::now();
        let mut done = 0;
        while done < total as usize {
            let got = broker.reserve(q, "c", 256, Duration::ZERO).await.unwrap();
            done += got.len();
            let mut acks = tokio::task::JoinSet::new();
            for d in got {
                let broker = broker.clone();
                acks.spawn(async move { broker.ack(&d, Value::Null).await });
            }
            while let Some(r) = acks.join_next().await {
                r.unwrap().unwrap();
            }
        }
        let took = started.elapsed();
        println!(
            "drain (reserve 256, acks concurrent): {total} in {took:?} = {:.0}/s",
            f64::from(total) / took.as_secs_f64()
        );
    }
}
