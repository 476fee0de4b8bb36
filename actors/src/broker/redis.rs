//! `RedisBroker`: the broker contract (docs/architecture.md) on Redis Streams, shared by every node.
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
//! - **Stream entry** (`p:{q}:stream`): `e` = the envelope JSON; `d` =
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
//! - **Record** (`p:result:<id>`, a `StoredRecord`): `id`, `task`, `queue`, `state`
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
//!   consumer admits what it read ([`Records::is_revoked`] is a local lookup).
//!   A blocking read holds up its connection, so each (queue, consumer) reserving with a wait
//!   gets its own connection (created lazily, no response timeout of its own: the call is
//!   bounded by `wait` + a margin; dropped and re-made after an error). Reads without a wait use
//!   the shared connection. Malformed entries are dead-lettered (`malformed entry: <error>`)
//!   with `XACK` + `XDEL` through `commit.lua` (an outcome each; one that cannot be written
//!   stays pending and comes back after the lease, the read's good entries are still returned),
//!   never returned — an `e` that is not valid UTF-8 among them (it is never decoded lossily
//!   into a task that would run on altered arguments).
//!   Each delivery carries the length of its `e` in bytes (`Delivery::size`): the consumer
//!   dead-letters one over `max_entry_bytes` unrun.
//! - `renew`: `XCLAIM … 0 <ids> JUSTID` by the owner — resets the idle time, not the delivery
//!   count. An id missing from the reply was recovered elsewhere.
//! - Outcomes, each all or nothing in a call of `commit.lua` (see *Atomic outcomes* below):
//!   `ack` = record `HSET` + `PEXPIRE`, `XACK` + `XDEL`, `succeeded` event; `ack_unrecorded`
//!   (`store_result = false`) = `DEL` of the record, `XACK` + `XDEL`, `succeeded` event;
//!   `retry` = record (`due`) and `PERSIST`, `ZADD` delayed (attempt + 1), `XACK` + `XDEL`,
//!   `retried` event; `defer` = record (`scheduled`, `due`, `lost`) and `PERSIST`, `ZADD`
//!   delayed (attempt unchanged), `XACK` + `XDEL`, `deferred` event; `dead_letter` = record
//!   and `PEXPIRE`, `XADD` dead, `XACK` + `XDEL`, `dead` event. Every outcome of the node goes
//!   through one writer task (`commit.rs`): handed to it while it waits, an outcome goes out
//!   at once, alone; handed to it while calls are in flight (two at most, on one connection),
//!   it goes out with the others in the next call (512 outcomes and 8 MiB of arguments at
//!   most; a larger single outcome goes alone), whose answer is
//!   split back per outcome. In the script the `XACK` + `XDEL` of all of a call's entries are
//!   one of each per stream, and a key's type is asked once per call.
//!   The starts handed to `started` (record start marker + `started` event, per attempt) go
//!   to the same writer: when the attempt's outcome comes within `EVENT_FLUSH`, the marker's
//!   fields join the outcome's record `HSET` and its event joins the outcome's event `XADD`
//!   as the entry's first field (one entry, two events: see `events.rs`) — no command and
//!   no round trip of its own; otherwise the start is written on its own
//!   (`HSET` + event) once it has waited `EVENT_FLUSH`. One writer, one connection: a start is
//!   never written after its outcome.
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
//!   tells its consumers ([`Records::revocations`]).
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
//! The outcome's first command — its record's `HSET`, a key no other outcome of the call
//! writes — is its own check: it runs first (`pcall`), after every other key was found good,
//! so when it fails nothing of the outcome was written.
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
mod codec;
mod commit;
mod connection;
mod events;
mod keys;
mod revocations;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncConnectionConfig, Pipeline, RedisResult, Script, Value};

use super::memory::{Prepared, prepare_batch};
use super::revocations::Revocations;
use super::{
    Admin, BrokerError, BrokerSettings, Coordination, DeadLetter, Delivery, Enqueued, Envelope,
    Event, LastRun, NodeRecord, Purged, QueueDepth, Records, Recovered, Revocation, Revoked,
    StoredRecord, TaskQueue, TaskRecord, TaskState, entry_arg, epoch_ms, malformed_letter, rfc3339,
};

use self::revocations::listen_revocations;
use super::outcome::{
    Next, Outcome, RecordChange, Writes, malformed_event, sent_detail, sent_event, started_event,
};
use codec::{
    StreamEntry, dead_letter, int, pairs, record_fields, stored_record, stream_entries, text,
};
use commit::{Job, Write, Writer};
pub use connection::ConnectionState;
pub use connection::{CLUSTER_SCHEME, cluster_seeds};
use connection::{CONNECT_TIMEOUT, Conn, Endpoint, Health, Link, RESPONSE_TIMEOUT, lock};
use events::{Start, event_value, events_of_entry, xadd_whole};
use keys::Keys;
/// Entries one script call handles (recovery, promotion, purge); the caller loops.
const SCRIPT_BATCH: usize = 256;
/// How far behind the clock a live tail of the events reads on a cluster
/// ([`Records::events_settle`]): events of different streams get their ids from different
/// masters' clocks and in separate steps, so an event can come in below one already read.
const EVENTS_SETTLE: Duration = Duration::from_millis(250);
/// How long a read of an idle partitioned queue waits on one partition before the next
/// (`reserve`): a new entry in another partition waits at most this long per partition.
const PARTITION_WAIT: Duration = Duration::from_millis(50);
/// Queues a cluster's record lookup reads at most (`find_record`: one `HGETALL` each).
const MAX_QUEUES_LOOKED_UP: usize = 1000;
/// Dead letters read per page by `requeue_dead`.
const DEAD_PAGE: usize = 100;

/// `commit.lua`, called with [`evalsha`] (one copy of its arguments: it carries every outcome).
const COMMIT: &str = include_str!("redis/commit.lua");
/// `enqueue.lua`, sent directly ([`evalsha`]) with the enqueue's `WAIT` behind it.
const ENQUEUE: &str = include_str!("redis/enqueue.lua");

/// Runs `request` — an `EVALSHA` of the script whose source is `code`, alone or first in a
/// pipeline — loading the script first when Redis does not have it (after a restart or `SCRIPT
/// FLUSH`), as redis-rs' `ScriptInvocation` does; but a command built directly holds each
/// argument once, where an invocation copies each into a buffer of its own first (for the
/// outcomes of busy queues and the Celery bridge's moves, most of what is sent).
pub(crate) async fn evalsha<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    request: &impl Request,
    code: &str,
) -> RedisResult<T> {
    match request.send(conn).await {
        Err(err) if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(code)
                .query_async::<()>(conn)
                .await?;
            request.send(conn).await
        }
        answer => answer,
    }
}

/// What [`evalsha`] sends: a command, or a pipeline (an enqueue's script and its `WAIT`).
pub(crate) trait Request: Sync {
    fn send<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
    ) -> impl Future<Output = RedisResult<T>> + Send;
}

impl Request for redis::Cmd {
    fn send<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
    ) -> impl Future<Output = RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

impl Request for Pipeline {
    fn send<T: redis::FromRedisValue, C: redis::aio::ConnectionLike + Send>(
        &self,
        conn: &mut C,
    ) -> impl Future<Output = RedisResult<T>> + Send {
        self.query_async(conn)
    }
}

/// The Lua scripts (`broker/redis/*.lua`), loaded on first use and again after a restart
/// (`NOSCRIPT` makes redis-rs, or [`evalsha`], load and retry).
struct Scripts {
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
    keys: Keys,
    /// The URL without credentials, and the connection state.
    link: Arc<Link>,
    endpoint: Endpoint,
    manager: Conn,
    /// Queues whose consumer group is known to exist.
    groups: Mutex<HashSet<String>>,
    /// Queues known to be in a cluster's registry (`Keys::queues`).
    registered: Mutex<HashSet<String>>,
    /// The partition the next enqueue without a key or chosen id goes to (`partition_for`).
    next_partition: std::sync::atomic::AtomicU64,
    /// The partition the next read of a partitioned queue starts at (`reserve`).
    next_read: std::sync::atomic::AtomicUsize,
    /// Idle dedicated connections for blocking reads, by (queue, consumer).
    blocking: Mutex<HashMap<(String, String), Conn>>,
    scripts: Scripts,
    /// `PEXPIRE` of records, in ms (at least 1).
    result_ttl_ms: u64,
    /// The outcome writer's channel: outcomes and starts (see [`commit`]).
    outbox: tokio::sync::mpsc::UnboundedSender<Job>,
    /// What this node knows of the kept revocations (shared with the subscriber task).
    revocations: Arc<Revocations>,
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
        let endpoint = Endpoint::open(url)
            .map_err(|e| BrokerError::Invalid(format!("broker url `{shown}`: {e}")))?;
        let manager = match &endpoint {
            Endpoint::Single(client) => {
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
                    Err(_) => {
                        return Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")));
                    }
                    Ok(Err(e)) => return Err(unreachable(e.to_string())),
                    Ok(Ok(_)) => {}
                }
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(4)
                    .set_max_delay(Duration::from_secs(2));
                Conn::Single(
                    ConnectionManager::new_with_config(client.clone(), config)
                        .await
                        .map_err(|e| unreachable(e.to_string()))?,
                )
            }
            Endpoint::Cluster { client, .. } => {
                // Connecting reads the slot map from a seed; a PING to a node proves one
                // answers.
                let connect = async {
                    let mut conn = client.get_async_connection().await?;
                    redis::cmd("PING").query_async::<String>(&mut conn).await?;
                    RedisResult::Ok(conn)
                };
                match tokio::time::timeout(CONNECT_TIMEOUT * 2, connect).await {
                    Err(_) => {
                        return Err(unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")));
                    }
                    Ok(Err(e)) => return Err(unreachable(e.to_string())),
                    Ok(Ok(conn)) => Conn::Cluster(conn),
                }
            }
        };
        let keys = Keys::new(&settings.prefix, endpoint.is_cluster());

        let ms = |d: Duration| (d.as_millis() as u64).max(1);
        let link = Arc::new(Link {
            url: shown,
            health: Health::default(),
        });
        let (outbox, jobs) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(
            Writer {
                jobs,
                conn: manager.clone(),
                link: Arc::clone(&link),
                sha: Script::new(COMMIT).get_hash().to_string(),
                cluster: keys.cluster(),
                maxlen: settings.events_maxlen,
            }
            .run(),
        );
        let revocations = Arc::new(Revocations::default());
        tokio::spawn(listen_revocations(
            Arc::downgrade(&revocations),
            endpoint.subscribers(),
            manager.clone(),
            keys.clone(),
        ));
        Ok(Self {
            keys,
            outbox,
            revocations,
            result_ttl_ms: ms(settings.result_ttl),
            settings,
            link,
            endpoint,
            manager,
            groups: Mutex::new(HashSet::new()),
            registered: Mutex::new(HashSet::new()),
            next_partition: std::sync::atomic::AtomicU64::new(0),
            next_read: std::sync::atomic::AtomicUsize::new(0),
            blocking: Mutex::new(HashMap::new()),
            scripts: Scripts {
                enqueue: Script::new(ENQUEUE),
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
        self.link.health.state()
    }

    /// The tunables it runs with.
    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// The URL it talks to, without credentials.
    pub fn url(&self) -> &str {
        &self.link.url
    }

    /// Sends a PING on the shared connection; the round trip it took.
    pub async fn ping(&self) -> Result<Duration, BrokerError> {
        let started = tokio::time::Instant::now();
        let mut conn = self.manager.clone();
        let pong: RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
        self.observe(pong)?;
        Ok(started.elapsed())
    }

    /// Writes outcomes through the outcome writer ([`commit`]): each is written whole or not
    /// at all (its keys are type-checked first), in one round trip with whatever else is
    /// being written. `Err` when the call failed, or naming every outcome that was not
    /// written — with the key and Redis' error — while the others were.
    async fn write_outcomes(&self, writes: Vec<Write>) -> Result<(), BrokerError> {
        let count = writes.len();
        let (reply, answer) = tokio::sync::oneshot::channel();
        let gone = || BrokerError::Command("the outcome writer has stopped".into());
        self.outbox
            .send(Job::Commit { writes, reply })
            .map_err(|_| gone())?;
        let answers = answer.await.map_err(|_| gone())??;
        let failed: Vec<String> = answers
            .iter()
            .filter(|answer| !matches!(answer, Value::Int(1)))
            .map(text)
            .collect();
        match failed.len() {
            0 => Ok(()),
            1 if count == 1 => Err(BrokerError::Command(failed.concat())),
            n => Err(BrokerError::Command(format!(
                "{n} of {count} outcomes not written (the others were): {}",
                failed.join("; ")
            ))),
        }
    }
}

impl RedisBroker {
    /// What an outcome writes ([`Writes`]), as one [`Write`]: its record first (the
    /// outcome's check in `commit.lua`; without `record`, a `DEL` of it instead), the
    /// entry's next place (`ZADD` delayed, or `XADD` dead), the release of its entry and its
    /// event.
    fn outcome_write(
        &self,
        delivery: &Delivery,
        writes: &Writes<'_>,
        at: &str,
        record: bool,
    ) -> Write {
        let envelope = &delivery.envelope;
        let mut pipe = redis::pipe();
        if record {
            self.add_record(&mut pipe, &delivery.queue, envelope, &writes.record, at);
        } else {
            pipe.cmd("DEL")
                .arg(self.keys.result(&delivery.queue, &envelope.id))
                .ignore();
        }
        match &writes.next {
            Next::Gone => {}
            Next::Delayed { due_ms, json } => {
                pipe.cmd("ZADD")
                    .arg(self.keys.delayed(&delivery.queue))
                    .arg(*due_ms)
                    .arg(json)
                    .ignore();
            }
            Next::Dead { reason, attempts } => {
                pipe.cmd("XADD")
                    .arg(self.keys.dead(&delivery.queue))
                    .arg("*")
                    .arg("e")
                    .arg(envelope.to_json())
                    .arg("reason")
                    .arg(reason)
                    .arg("attempts")
                    .arg(*attempts)
                    .arg("at")
                    .arg(at)
                    .ignore();
            }
        }
        self.add_release(
            &mut pipe,
            &self.keys.stream(&delivery.queue),
            &delivery.entry,
        );
        self.add_whole_event(&mut pipe, Some(&delivery.queue), &writes.event);
        Write {
            attempt: Some((envelope.id.clone(), envelope.attempt)),
            record,
            pipe,
        }
    }

    /// Appends a record change ([`RecordChange`]) to `pipe`: `HSET` of the id, task and queue
    /// (for a record that an enqueue did not make), the state, the verdict (result, error), the
    /// attempts, the due time (empty when none), `lost` and the time — then `PEXPIRE` result
    /// TTL when the task ended, else `PERSIST` (its entry lives on).
    fn add_record(
        &self,
        pipe: &mut Pipeline,
        queue: &str,
        envelope: &Envelope,
        change: &RecordChange<'_>,
        at: &str,
    ) {
        let key = self.keys.result(queue, &envelope.id);
        // Sized once: no buffer grows per argument on the hot path.
        let size = change.verdict.map_or(0, |(result, error)| {
            result.map_or(0, |_| 64) + error.map_or(0, str::len)
        });
        let mut hset = redis::Cmd::with_capacity(24, 320 + size);
        let cmd = hset.arg("HSET");
        cmd.arg(&key)
            .arg("id")
            .arg(&envelope.id)
            .arg("task")
            .arg(&envelope.task)
            .arg("queue")
            .arg(&envelope.queue)
            .arg("state")
            .arg(change.state.name());
        if let Some((result, error)) = change.verdict {
            cmd.arg("result")
                .arg(result.map(|v| v.to_string()).unwrap_or_default())
                .arg("error")
                .arg(error.unwrap_or_default());
        }
        if let Some(attempts) = change.attempts {
            cmd.arg("attempts").arg(attempts);
        }
        cmd.arg("due")
            .arg(change.due_ms.map(|due| due.to_string()).unwrap_or_default());
        if change.lost {
            cmd.arg("lost").arg("1");
        }
        cmd.arg("updated_at").arg(at);
        pipe.add_command(hset).ignore();
        if change.ends() {
            pipe.cmd("PEXPIRE")
                .arg(&key)
                .arg(self.result_ttl_ms)
                .ignore();
        } else {
            pipe.cmd("PERSIST").arg(&key).ignore();
        }
    }

    /// The record of an enqueued envelope ([`StoredRecord::enqueued`]: `queued`, or
    /// `scheduled` until `due_ms`). A new key has no TTL: it lives while its entry does.
    fn add_enqueued_record(
        &self,
        pipe: &mut Pipeline,
        stream: &str,
        envelope: &Envelope,
        due_ms: Option<u64>,
    ) {
        let record = StoredRecord::enqueued(envelope, due_ms, &envelope.enqueued_at);
        let cmd = pipe.cmd("HSET").arg(self.keys.result(stream, &envelope.id));
        for (name, value) in &record_fields(&record) {
            cmd.arg(*name).arg(value.as_ref());
        }
        cmd.ignore();
    }

    /// The task `id` ended without an outcome of its own (a malformed entry): its record, if
    /// it has one, lives `result_ttl` more, then the id is free (`PEXPIRE`).
    fn add_record_end(&self, pipe: &mut Pipeline, queue: &str, id: &str) {
        pipe.cmd("PEXPIRE")
            .arg(self.keys.result(queue, id))
            .arg(self.result_ttl_ms)
            .ignore();
    }

    /// Writes one outcome of `delivery` in one `commit.lua` call.
    async fn settle(&self, delivery: &Delivery, outcome: Outcome<'_>) -> Result<(), BrokerError> {
        let at = rfc3339(SystemTime::now());
        let writes = outcome.writes(&delivery.envelope, &at);
        let write = self.outcome_write(delivery, &writes, &at, true);
        self.write_outcomes(vec![write]).await
    }

    /// The release of an entry: `XACK`, which `commit.lua` turns into `XACK` + `XDEL` (one
    /// of each per stream for all the entries of a call).
    fn add_release(&self, pipe: &mut Pipeline, stream: &str, entry: &str) {
        pipe.cmd("XACK")
            .arg(stream)
            .arg(self.keys.group())
            .arg(entry)
            .ignore();
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
        let dead = self.keys.dead(queue);
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
                self.add_record_end(&mut pipe, queue, &task_id);
            }
            self.add_whole_event(
                &mut pipe,
                Some(queue),
                &malformed_event(queue, id, reason, &at),
            );
            outcomes.push(Write {
                attempt: None,
                record: false,
                pipe,
            });
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
}
/// The positions of `keys` grouped by equal key, each group in the order its first member came.
pub(super) fn groups<K: PartialEq>(keys: impl Iterator<Item = K>) -> Vec<Vec<usize>> {
    let mut groups: Vec<(K, Vec<usize>)> = Vec::new();
    for (n, key) in keys.enumerate() {
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(n),
            None => groups.push((key, vec![n])),
        }
    }
    groups.into_iter().map(|(_, members)| members).collect()
}

/// `envelope`'s record at enqueue ([`StoredRecord::enqueued`]) as `enqueue.lua` takes it: its
/// hash fields ([`record_fields`]) as one JSON array, name, value, name, value, ….
fn enqueued_record_json(envelope: &Envelope, due_ms: Option<u64>) -> String {
    let record = StoredRecord::enqueued(envelope, due_ms, &envelope.enqueued_at);
    let fields = record_fields(&record);
    let flat: Vec<&str> = fields
        .iter()
        .flat_map(|(name, value)| [*name, value.as_ref()])
        .collect();
    serde_json::to_string(&flat).unwrap_or_else(|_| "[]".to_string())
}

impl RedisBroker {
    /// The positions of `queues` grouped by slot: on a cluster one group per queue (its keys
    /// share its slot), in the order first met; on one server a single group.
    fn by_queue<'a>(&self, queues: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
        let cluster = self.keys.cluster();
        groups(queues.map(|queue| if cluster { queue } else { "" }))
    }

    /// Enqueues a batch with idempotency keys or chosen ids through `enqueue.lua`: per
    /// envelope, claim its key and check its id (its record), then write it and its record —
    /// or answer the id it duplicates — in one atomic step and one round trip (on a cluster,
    /// one per queue).
    async fn enqueue_claiming(
        &self,
        prepared: Vec<Prepared>,
        streams: &[String],
        at: &str,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let mut answers = vec![String::new(); prepared.len()];
        for group in self.by_queue(streams.iter().map(String::as_str)) {
            let mine: Vec<(&Prepared, &str)> = group
                .iter()
                .map(|&n| (&prepared[n], streams[n].as_str()))
                .collect();
            let got = self.enqueue_script(&mine, at).await?;
            for (n, answer) in group.into_iter().zip(got) {
                answers[n] = answer;
            }
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

    /// One `enqueue.lua` call (every key in one slot on a cluster, where the events come
    /// after it): per envelope `''` (written) or the id it duplicates.
    async fn enqueue_script(
        &self,
        prepared: &[(&Prepared, &str)],
        at: &str,
    ) -> Result<Vec<String>, BrokerError> {
        let maxlen = if self.events_on() {
            self.settings.events_maxlen
        } else {
            0
        };
        // One stream per call on a cluster (one slot), so one events stream.
        let events_key = self
            .keys
            .events_of(prepared.first().map_or("", |(_, stream)| stream))
            .to_string();
        let mut args = redis::Cmd::new();
        args.arg(&events_key).arg(maxlen);
        let mut keys = Vec::with_capacity(prepared.len() * 3 + 1);
        if maxlen > 0 {
            keys.push(events_key);
        }
        for &(p, stream) in prepared {
            let envelope = &p.envelope;
            let target = match p.due {
                Some(_) => self.keys.delayed(stream),
                None => self.keys.stream(stream),
            };
            let record = self.keys.result(stream, &envelope.id);
            let (idem, ttl) = match &envelope.idempotency_key {
                Some(key) => {
                    let ttl = self.settings.idempotency_ttl_for(&envelope.task);
                    (
                        self.keys.idempotency(stream, key),
                        (ttl.as_millis() as u64).max(1),
                    )
                }
                None => (String::new(), 0),
            };
            args.arg(&target)
                .arg(p.due.map(|due| due.to_string()).unwrap_or_default())
                .arg(&p.json)
                .arg(&envelope.id)
                .arg(&record)
                .arg(if p.chosen { "1" } else { "" })
                .arg(&idem)
                .arg(ttl)
                .arg(event_value(
                    at,
                    [
                        ("task_id", Some(&envelope.id)),
                        ("task", Some(&envelope.task)),
                        ("queue", Some(&envelope.queue)),
                    ],
                    &sent_detail(envelope).to_string(),
                ))
                .arg(enqueued_record_json(envelope, p.due));
            keys.push(target);
            keys.push(record);
            keys.extend((!idem.is_empty()).then_some(idem));
        }
        keys.sort_unstable();
        keys.dedup();
        let mut script = redis::cmd("EVALSHA");
        script
            .arg(self.scripts.enqueue.get_hash())
            .arg(keys.len())
            .arg(&keys);
        for arg in args.args_iter() {
            if let redis::Arg::Simple(bytes) = arg {
                script.arg(bytes);
            }
        }
        let mut pipe = redis::pipe();
        pipe.add_command(script);
        let wait = self.add_wait(&mut pipe);
        let mut conn = self.manager.clone();
        let replies: Vec<Value> = self.observe(evalsha(&mut conn, &pipe, ENQUEUE).await)?;
        let mut replies = replies.into_iter();
        let answers: Vec<String> = replies
            .next()
            .and_then(|answers| redis::from_redis_value(answers).ok())
            .unwrap_or_default();
        if answers.len() != prepared.len() {
            return Err(BrokerError::Command("enqueue.lua: unexpected reply".into()));
        }
        if wait {
            self.check_wait(replies.next())?;
        }
        Ok(answers)
    }
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
        let cluster = self.keys.cluster();
        if cluster {
            // The revocations are in a slot of their own: dropped first, in a step of their own
            // (a letter that then does not move loses only a revocation of a dead task).
            let mut pipe = redis::pipe();
            let zrem = pipe.cmd("ZREM").arg(self.keys.revoked());
            for (_, envelope) in &letters {
                zrem.arg(format!("r:{}", envelope.id))
                    .arg(format!("t:{}", envelope.id));
            }
            zrem.ignore();
            pipe.cmd("INCR").arg(self.keys.revoked_seq()).ignore();
            self.query_pipe::<()>(&pipe).await?;
        }
        let mut invocation = self.scripts.requeue.prepare_invoke();
        invocation
            .key(self.keys.dead(queue))
            .key(self.keys.stream(queue));
        if !cluster {
            invocation
                .key(self.keys.revoked())
                .key(self.keys.revoked_seq());
        }
        invocation
            .arg(rfc3339(SystemTime::now()))
            .arg(if cluster { "0" } else { "1" });
        for (entry, mut envelope) in letters {
            envelope.attempt = 0;
            let record = self.keys.result(queue, &envelope.id);
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

impl RedisBroker {
    /// Appends `WAIT ack_replicas timeout` to an enqueue's pipeline when replicated
    /// acknowledgement is on (`broker.ack_replicas`): sent on the write's own connection (on a
    /// cluster, to the master that took the write), it answers once that many replicas have
    /// everything written before it. True when appended.
    fn add_wait(&self, pipe: &mut Pipeline) -> bool {
        let replicas = self.settings.ack_replicas;
        if replicas == 0 {
            return false;
        }
        let timeout = (self.settings.ack_replicas_timeout.as_millis() as u64).max(1);
        pipe.cmd("WAIT").arg(replicas).arg(timeout);
        true
    }

    /// What `WAIT` answered: fewer replicas than asked within the timeout fails the enqueue
    /// (the entry is on the master and may or may not survive its failure).
    fn check_wait(&self, answer: Option<Value>) -> Result<(), BrokerError> {
        let got = answer.map_or(0, |answer| int(&answer));
        let want = self.settings.ack_replicas;
        if got >= i64::from(want) {
            return Ok(());
        }
        Err(BrokerError::Unreachable {
            url: self.link.url.clone(),
            reason: format!(
                "the enqueue reached {got} of the {want} replicas broker.ack_replicas asks for \
                 within {:?}: it may or may not be kept (retry it with an idempotency key)",
                self.settings.ack_replicas_timeout
            ),
        })
    }

    /// Notes `queue` in a cluster's registry of queues (`Keys::queues`), once per process:
    /// records are looked up by id through it. Nothing on one server.
    pub(super) async fn register(&self, queue: &str) -> Result<(), BrokerError> {
        if !self.keys.cluster() || lock(&self.registered).contains(queue) {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg(self.keys.queues()).arg(queue).ignore();
        self.query_pipe::<()>(&pipe).await?;
        lock(&self.registered).insert(queue.to_string());
        Ok(())
    }

    /// The record of task `id` (the stream whose slot holds it — empty on one server — and the
    /// record), if it has one. On one server one `HGETALL`; on a cluster, where a record is in
    /// its stream's slot, one per registered stream ([`MAX_QUEUES_LOOKED_UP`] at most), at once.
    async fn find_record(&self, id: &str) -> Result<Option<(String, StoredRecord)>, BrokerError> {
        let queues: Vec<String> = if self.keys.cluster() {
            self.registered().await?
        } else {
            vec![String::new()]
        };
        let reads = queues.iter().map(|queue| async move {
            let mut pipe = redis::pipe();
            pipe.cmd("HGETALL").arg(self.keys.result(queue, id));
            let (reply,): (Value,) = self.query_pipe(&pipe).await?;
            Ok::<_, BrokerError>(pairs(reply))
        });
        let found = futures_util::future::join_all(reads).await;
        for (queue, fields) in queues.into_iter().zip(found) {
            let fields = fields?;
            if !fields.is_empty() {
                let stored = stored_record(id, &fields).map_err(BrokerError::Command)?;
                return Ok(Some((queue, stored)));
            }
        }
        Ok(None)
    }
}

impl RedisBroker {
    /// Reserves from one stream: a queue's, or one partition's (its deliveries carry the
    /// stream's queue name, so their acks, retries and renewals go to that stream).
    async fn reserve_stream(
        &self,
        queue: &str,
        consumer: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Delivery>, BrokerError> {
        let stream = self.keys.stream(queue);
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

    /// The number of streams of `queue` (`[queues.NAME] partitions`, 1 by default).
    fn partition_count(&self, queue: &str) -> u32 {
        self.settings
            .partitions
            .get(queue)
            .copied()
            .unwrap_or(1)
            .max(1)
    }

    /// The streams `queue` is made of: itself, then `queue:1` … `queue:N-1` (each its own hash
    /// tag, so on a cluster its own slot).
    fn partitions(&self, queue: &str) -> Vec<String> {
        (0..self.partition_count(queue))
            .map(|p| partition_name(queue, p))
            .collect()
    }

    /// The stream an envelope goes to: its queue's; on a partitioned queue the partition its
    /// idempotency key picks, else its chosen id (so a repeat meets its first), else the next
    /// one in turn.
    fn partition_for(&self, envelope: &Envelope, chosen: bool) -> String {
        let n = self.partition_count(&envelope.queue);
        if n == 1 {
            return envelope.queue.clone();
        }
        let p = match (&envelope.idempotency_key, chosen) {
            (Some(key), _) => fnv1a(key),
            (None, true) => fnv1a(&envelope.id),
            (None, false) => self
                .next_partition
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        } % u64::from(n);
        partition_name(&envelope.queue, p as u32)
    }
}

/// Partition `p` of `queue`: the queue's own stream for 0, else `queue:p`.
fn partition_name(queue: &str, p: u32) -> String {
    if p == 0 {
        queue.to_string()
    } else {
        format!("{queue}:{p}")
    }
}

/// 64-bit FNV-1a of `text`: the same partition for the same key on every node and version.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl RedisBroker {
    /// One stream's part of the partition-wide operations below (a queue's, or one partition's).
    async fn recover_stream(&self, queue: &str, lease: Duration) -> Result<Recovered, BrokerError> {
        let (stream, dead) = (self.keys.stream(queue), self.keys.dead(queue));
        let lease_ms = lease.as_millis() as u64;
        let mut out = Recovered::default();
        loop {
            let now = rfc3339(SystemTime::now());
            let mut invocation = self.scripts.recover.prepare_invoke();
            invocation
                .key(&stream)
                .key(&dead)
                .arg(self.keys.group())
                .arg(lease_ms)
                .arg(self.settings.max_deliveries)
                .arg(now)
                .arg(SCRIPT_BATCH)
                .arg(self.keys.result_prefix(queue))
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

    async fn promote_stream(&self, queue: &str, now: SystemTime) -> Result<u64, BrokerError> {
        let (delayed, stream) = (self.keys.delayed(queue), self.keys.stream(queue));
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

    async fn depth_stream(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let stream = self.keys.stream(queue);
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&stream);
        pipe.cmd("XPENDING").arg(&stream).arg(self.keys.group());
        pipe.cmd("ZCARD").arg(self.keys.delayed(queue));
        pipe.cmd("XLEN").arg(self.keys.dead(queue));
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

    async fn purge_stream(&self, queue: &str) -> Result<Purged, BrokerError> {
        let (stream, delayed) = (self.keys.stream(queue), self.keys.delayed(queue));
        let mut out = Purged::default();
        loop {
            let mut invocation = self.scripts.purge.prepare_invoke();
            invocation
                .key(&stream)
                .key(&delayed)
                .arg(self.keys.group())
                .arg(SCRIPT_BATCH)
                .arg(self.keys.result_prefix(queue));
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
}

impl RedisBroker {
    async fn dead_letters_stream(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        // `after` was checked by the caller (`split_entry`), so were the entries below.
        let start = after.map_or_else(|| "-".to_string(), |after| format!("({after}"));
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(self.keys.dead(queue))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let (reply,): (Value,) = self.query_pipe(&pipe).await?;
        Ok(stream_entries(reply).into_iter().map(dead_letter).collect())
    }

    async fn requeue_dead_stream(&self, queue: &str, limit: usize) -> Result<u64, BrokerError> {
        let dead = self.keys.dead(queue);
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

    async fn requeue_dead_entry_stream(
        &self,
        queue: &str,
        entry: &str,
    ) -> Result<Option<String>, BrokerError> {
        let dead = self.keys.dead(queue);
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

    async fn delete_dead_stream(&self, queue: &str, entry: &str) -> Result<bool, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XDEL").arg(self.keys.dead(queue)).arg(entry);
        let (deleted,): (u64,) = self.query_pipe(&pipe).await?;
        Ok(deleted == 1)
    }

    async fn purge_dead_stream(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("XTRIM")
            .arg(self.keys.dead(queue))
            .arg("MAXLEN")
            .arg(0);
        let (deleted,): (u64,) = self.query_pipe(&pipe).await?;
        Ok(deleted)
    }
}

/// A dead letter's name as the API shows it: its entry id, with `@p` for partition p ≥ 1.
fn entry_name(entry: &str, p: u32) -> String {
    if p == 0 {
        entry.to_string()
    } else {
        format!("{entry}@{p}")
    }
}

/// The partition and the entry id of a dead letter's name ([`entry_name`]), checked.
fn split_entry(name: &str) -> Result<(u32, &str), BrokerError> {
    entry_arg(name)?;
    Ok(match name.split_once('@') {
        Some((entry, p)) => (p.parse().unwrap_or(u32::MAX), entry),
        None => (0, name),
    })
}

impl RedisBroker {
    /// The events streams read (name, key): the one stream on one server; on a cluster the
    /// events of no task (name ``) and each registered stream's.
    async fn event_streams(&self) -> Result<Vec<(String, String)>, BrokerError> {
        let mut streams = vec![(String::new(), self.keys.events().to_string())];
        if self.keys.cluster() {
            for stream in self.registered().await? {
                let key = self.keys.events_of(&stream).to_string();
                streams.push((stream, key));
            }
        }
        Ok(streams)
    }

    /// Up to `limit` events after the cursor `at` (or before it, `backwards`), oldest first,
    /// merged from every events stream in the order (entry id, stream name, place in the
    /// entry); on a cluster an event's id names its stream (`<entry>@<stream>`) so that it is
    /// a cursor of its own.
    async fn merged_events(
        &self,
        at: Option<&str>,
        limit: usize,
        backwards: bool,
    ) -> Result<Vec<Event>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cursor = at.map(event_cursor);
        let streams = self.event_streams().await?;
        let reads = streams.iter().map(|(_, key)| {
            // The cursor's entry id is read too (an entry holds up to two events, and on a
            // cluster other streams' entries of the same id come after it or before it):
            // what is not past the cursor is dropped below — hence one entry more.
            let bound = cursor.map(|(entry, _, _)| format!("{}-{}", entry.0, entry.1));
            let mut pipe = redis::pipe();
            if backwards {
                pipe.cmd("XREVRANGE")
                    .arg(key)
                    .arg(bound.unwrap_or_else(|| "+".into()))
                    .arg("-");
            } else {
                pipe.cmd("XRANGE")
                    .arg(key)
                    .arg(bound.unwrap_or_else(|| "-".into()))
                    .arg("+");
            }
            pipe.arg("COUNT").arg(limit.saturating_add(1));
            async move {
                let (reply,): (Value,) = self.query_pipe(&pipe).await?;
                Ok::<_, BrokerError>(stream_entries(reply))
            }
        });
        let read = futures_util::future::join_all(reads).await;
        let mut merged: Vec<(EventOrder<'_>, Event)> = Vec::new();
        for ((name, _), entries) in streams.iter().zip(read) {
            for entry in entries? {
                let (position, _, _) = event_cursor(&entry.id);
                for (n, mut event) in events_of_entry(entry).into_iter().enumerate() {
                    let order = (position, name.as_str(), n as u64);
                    let past = cursor.is_none_or(|(c_entry, c_place, c_stream)| {
                        let at = (c_entry, c_stream, c_place);
                        if backwards { order < at } else { order > at }
                    });
                    if past {
                        if self.keys.cluster() {
                            event.id = format!("{}@{name}", event.id);
                        }
                        merged.push((order, event));
                    }
                }
            }
        }
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        if backwards {
            let skip = merged.len().saturating_sub(limit);
            merged.drain(..skip);
        } else {
            merged.truncate(limit);
        }
        Ok(merged.into_iter().map(|(_, event)| event).collect())
    }

    /// The streams registered on a cluster (`Keys::queues`, at most [`MAX_QUEUES_LOOKED_UP`]).
    async fn registered(&self) -> Result<Vec<String>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SRANDMEMBER")
            .arg(self.keys.queues())
            .arg(MAX_QUEUES_LOOKED_UP);
        let (streams,): (Vec<String>,) = self.query_pipe(&pipe).await?;
        Ok(streams)
    }
}

/// Where an event is in the merged read: (entry id, stream name, place in the entry).
type EventOrder<'a> = ((u64, u64), &'a str, u64);

/// An event id as a cursor: its entry id's two numbers, its place in the entry and the stream
/// it names (`` for none): `0`, `1732374000123`, `1732374000123-5`, `1732374000123-5.1`,
/// `1732374000123-5.1@chat`.
fn event_cursor(id: &str) -> ((u64, u64), u64, &str) {
    let (entry, stream) = id.split_once('@').unwrap_or((id, ""));
    let (entry, place) = entry.split_once('.').unwrap_or((entry, "0"));
    let (ms, seq) = entry.split_once('-').unwrap_or((entry, "0"));
    let number = |text: &str| text.parse().unwrap_or(0);
    ((number(ms), number(seq)), number(place), stream)
}

impl TaskQueue for RedisBroker {
    async fn enqueue(&self, batch: Vec<Envelope>) -> Result<Vec<Enqueued>, BrokerError> {
        let now = SystemTime::now();
        let prepared = prepare_batch(batch, now, &self.settings)?;
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        let at = rfc3339(now);
        // The stream each goes to: its queue's, or one of its partitions'.
        let streams: Vec<String> = prepared
            .iter()
            .map(|p| self.partition_for(&p.envelope, p.chosen))
            .collect();
        for stream in &streams {
            self.register(stream).await?;
        }
        // Something to claim (an idempotency key, a chosen id): claims and writes in one script.
        if prepared
            .iter()
            .any(|p| p.chosen || p.envelope.idempotency_key.is_some())
        {
            return self.enqueue_claiming(prepared, &streams, &at).await;
        }
        // Generated ids only, no keys: nothing can be a duplicate, one pipeline (on a
        // cluster one per stream).
        for group in self.by_queue(streams.iter().map(String::as_str)) {
            let mut pipe = redis::pipe();
            for &n in &group {
                let Prepared {
                    envelope,
                    json,
                    due,
                    ..
                } = &prepared[n];
                let stream = &streams[n];
                self.add_enqueued_record(&mut pipe, stream, envelope, *due);
                match due {
                    Some(due_ms) => pipe
                        .cmd("ZADD")
                        .arg(self.keys.delayed(stream))
                        .arg(*due_ms)
                        .arg(json)
                        .ignore(),
                    None => pipe
                        .cmd("XADD")
                        .arg(self.keys.stream(stream))
                        .arg("*")
                        .arg("e")
                        .arg(json)
                        .ignore(),
                };
                self.add_whole_event(&mut pipe, Some(stream), &sent_event(envelope, &at));
            }
            if self.add_wait(&mut pipe) {
                let (replicas,): (Value,) = self.query_pipe(&pipe).await?;
                self.check_wait(Some(replicas))?;
            } else {
                self.query_pipe::<()>(&pipe).await?;
            }
        }
        Ok(prepared
            .into_iter()
            .map(|p| Enqueued {
                id: p.envelope.id,
                duplicate: false,
            })
            .collect())
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
        if self.partition_count(queue) == 1 {
            return self.reserve_stream(queue, consumer, max, wait).await;
        }
        let partitions = self.partitions(queue);
        // Fair: each call starts at the next partition, takes what is ready from each in turn,
        // and when none has anything waits on each in turn for a short while.
        let n = partitions.len();
        let start = self
            .next_read
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            % n;
        let mut out = Vec::new();
        for k in 0..n {
            let room = max - out.len();
            if room == 0 {
                break;
            }
            let partition = &partitions[(start + k) % n];
            out.extend(
                self.reserve_stream(partition, consumer, room, Duration::ZERO)
                    .await?,
            );
        }
        if !out.is_empty() || wait.is_zero() {
            return Ok(out);
        }
        let deadline = tokio::time::Instant::now() + wait;
        for k in 0.. {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            let partition = &partitions[(start + k) % n];
            let got = self
                .reserve_stream(partition, consumer, max, left.min(PARTITION_WAIT))
                .await?;
            if !got.is_empty() {
                return Ok(got);
            }
        }
        Ok(out)
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
        cmd.arg(self.keys.stream(queue))
            .arg(self.keys.group())
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
        self.settle(delivery, Outcome::Succeeded(&result)).await
    }

    async fn ack_unrecorded(&self, delivery: &Delivery) -> Result<(), BrokerError> {
        let at = rfc3339(SystemTime::now());
        let null = serde_json::Value::Null;
        let writes = Outcome::Succeeded(&null).writes(&delivery.envelope, &at);
        let write = self.outcome_write(delivery, &writes, &at, false);
        self.write_outcomes(vec![write]).await
    }

    async fn ack_many(&self, done: &[(Delivery, serde_json::Value)]) -> Result<(), BrokerError> {
        if done.is_empty() {
            return Ok(());
        }
        let at = rfc3339(SystemTime::now());
        let outcomes = done
            .iter()
            .map(|(delivery, result)| {
                let writes = Outcome::Succeeded(result).writes(&delivery.envelope, &at);
                self.outcome_write(delivery, &writes, &at, true)
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
        self.settle(delivery, Outcome::Retried { at, error }).await
    }

    async fn defer(
        &self,
        delivery: &Delivery,
        at: SystemTime,
        reason: &str,
    ) -> Result<(), BrokerError> {
        self.settle(delivery, Outcome::Deferred { at, reason })
            .await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        self.settle(delivery, Outcome::Dead(reason)).await
    }

    async fn recover(&self, queue: &str, lease: Duration) -> Result<Recovered, BrokerError> {
        let mut out = Recovered::default();
        for partition in self.partitions(queue) {
            let one = self.recover_stream(&partition, lease).await?;
            out.requeued += one.requeued;
            out.dead += one.dead;
            out.dead_tasks.extend(one.dead_tasks);
        }
        Ok(out)
    }

    async fn promote_due(&self, queue: &str, now: SystemTime) -> Result<u64, BrokerError> {
        let mut moved = 0;
        for partition in self.partitions(queue) {
            moved += self.promote_stream(&partition, now).await?;
        }
        Ok(moved)
    }

    fn started(&self, delivery: &Delivery, consumer: &str) {
        let envelope = &delivery.envelope;
        // The writer is gone only when the broker is being dropped.
        let _ = self.outbox.send(Job::Start(Box::new(Start {
            // The record is where the outcome writes it: in the slot of the stream the entry
            // came from; so is its events stream.
            record: self.keys.result(&delivery.queue, &envelope.id),
            events: self.keys.events_of(&delivery.queue),
            event: started_event(envelope, consumer),
            attempt: envelope.attempt,
            consumer: consumer.to_string(),
        })));
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
            .key(self.keys.stream(queue))
            .arg(self.keys.group())
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
}

impl Records for RedisBroker {
    async fn publish(&self, event: Event) -> Result<(), BrokerError> {
        if !self.events_on() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        xadd_whole(
            &mut pipe,
            &self.keys.events(),
            self.settings.events_maxlen,
            &event,
        );
        self.query_pipe::<()>(&pipe).await
    }

    async fn events(&self, after: Option<&str>, limit: usize) -> Result<Vec<Event>, BrokerError> {
        self.merged_events(after, limit, false).await
    }

    async fn events_before(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Event>, BrokerError> {
        self.merged_events(before, limit, true).await
    }

    fn events_settle(&self) -> Duration {
        if self.keys.cluster() {
            EVENTS_SETTLE
        } else {
            Duration::ZERO
        }
    }

    async fn record(&self, id: &str) -> Result<Option<TaskRecord>, BrokerError> {
        let Some((_, stored)) = self.find_record(id).await? else {
            return Ok(None);
        };
        Ok(Some(stored.view(epoch_ms(SystemTime::now()))))
    }

    async fn revoke(&self, id: &str, terminate: bool) -> Result<Revoked, BrokerError> {
        let now = SystemTime::now();
        let now_ms = epoch_ms(now);
        let until = now_ms.saturating_add(self.result_ttl_ms);
        let prefix = &self.settings.prefix;
        let cluster = self.keys.cluster();
        let mut invocation = self.scripts.revoke.prepare_invoke();
        let published =
            serde_json::json!({ "id": id, "terminate": terminate, "until": until.to_string() });
        // On a cluster, what the task was when read (see below).
        let mut before = None;
        // The stream the record belongs to, when known (a cluster: where it was found).
        let mut stream_queue = String::new();
        if cluster {
            // The record and the revocations are in different slots: the task is looked up;
            // one that ended is answered without a write (as the script does); else the
            // revocation is kept first (consumers skip the task from then on), then the
            // script does the record's part. Both steps can be repeated.
            let found = self.find_record(id).await?;
            if let Some((_, stored)) = &found {
                match stored.state.unwrap_or(TaskState::Queued) {
                    TaskState::Dead if stored.error.as_deref() == Some("revoked") => {
                        return Ok(Revoked::AlreadyRevoked);
                    }
                    state @ (TaskState::Succeeded | TaskState::Dead) => {
                        return Ok(Revoked::Ended(state));
                    }
                    _ if stored.runs() => before = Some(Revoked::Running),
                    state => before = Some(Revoked::Pending(state)),
                }
            }
            let mut keep = redis::pipe();
            keep.atomic()
                .cmd("ZADD")
                .arg(self.keys.revoked())
                .arg(until)
                .arg(format!("{}{id}", if terminate { "t:" } else { "r:" }))
                .ignore()
                .cmd("ZREMRANGEBYSCORE")
                .arg(self.keys.revoked())
                .arg("-inf")
                .arg(now_ms)
                .ignore()
                .cmd("INCR")
                .arg(self.keys.revoked_seq())
                .ignore();
            self.query_pipe::<()>(&keep).await?;
            let mut publish = redis::pipe();
            publish
                .cmd("PUBLISH")
                .arg(self.keys.revocations_channel())
                .arg(published.to_string())
                .ignore();
            self.query_pipe::<()>(&publish).await?;
            let revocation = Revocation {
                id: id.to_string(),
                terminate,
            };
            self.revocations.add(revocation, until);
            let Some((queue, _)) = found else {
                return Ok(Revoked::Unknown);
            };
            // A running task is the node's to stop (the script would write nothing); one that
            // ended since it was read ended because of this revocation or on its own: the
            // answer is what it was when read.
            if let Some(Revoked::Running) = before {
                return Ok(Revoked::Running);
            }
            invocation.key(self.keys.result(&queue, id));
            stream_queue = queue;
        } else {
            invocation
                .key(self.keys.result("", id))
                .key(self.keys.revoked())
                .key(self.keys.revoked_seq());
            // A task of a partitioned queue: its delayed entry may be in any partition.
            if !self.settings.partitions.is_empty()
                && let Some((_, stored)) = self.find_record(id).await?
                && self.partition_count(&stored.queue) > 1
            {
                stream_queue = self.partitions(&stored.queue).join(",");
            }
        }
        invocation
            .arg(id)
            .arg(if terminate { "1" } else { "0" })
            .arg(now_ms)
            .arg(until)
            .arg(self.keys.revocations_channel())
            .arg(prefix)
            .arg(rfc3339(now))
            .arg(if cluster { "0" } else { "1" })
            .arg(&stream_queue);
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
        if let (Some(before), Revoked::AlreadyRevoked | Revoked::Ended(_)) = (before, &answer) {
            return Ok(before);
        }
        if !cluster && !matches!(answer, Revoked::AlreadyRevoked | Revoked::Ended(_)) {
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
}

impl Coordination for RedisBroker {
    async fn claim_leadership(&self, node: &str, lease: Duration) -> Result<String, BrokerError> {
        let mut invocation = self.scripts.claim_leadership.prepare_invoke();
        invocation
            .key(self.keys.leader())
            .arg(node)
            .arg((lease.as_millis() as u64).max(1));
        let mut conn = self.manager.clone();
        self.observe(invocation.invoke_async(&mut conn).await)
    }

    async fn resign_leadership(&self, node: &str) -> Result<bool, BrokerError> {
        let mut invocation = self.scripts.resign_leadership.prepare_invoke();
        invocation.key(self.keys.leader()).arg(node);
        let mut conn = self.manager.clone();
        let held: u64 = self.observe(invocation.invoke_async(&mut conn).await)?;
        Ok(held == 1)
    }

    async fn last_runs(&self) -> Result<HashMap<String, LastRun>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL").arg(self.keys.runs());
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
            .arg(self.keys.runs())
            .arg(schedule)
            .arg(json)
            .ignore();
        self.query_pipe::<()>(&pipe).await
    }

    async fn announce_node(&self, record: &NodeRecord, ttl: Duration) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        let json = serde_json::to_string(record).unwrap_or_default();
        pipe.cmd("SET")
            .arg(self.keys.node(&record.name))
            .arg(json)
            .arg("PX")
            .arg((ttl.as_millis() as u64).max(1))
            .ignore();
        pipe.cmd("ZADD")
            .arg(self.keys.nodes_index())
            .arg(epoch_ms(SystemTime::now()))
            .arg(&record.name)
            .ignore();
        self.query_pipe::<()>(&pipe).await
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGE")
            .arg(self.keys.nodes_index())
            .arg(0)
            .arg(-1);
        let (names,): (Vec<String>,) = self.query_pipe(&pipe).await?;
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        let keys: Vec<String> = names.iter().map(|n| self.keys.node(n)).collect();
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
            pipe.cmd("ZREM")
                .arg(self.keys.nodes_index())
                .arg(&gone)
                .ignore();
            self.query_pipe::<()>(&pipe).await?;
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn forget_node(&self, name: &str) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(self.keys.node(name)).ignore();
        pipe.cmd("ZREM")
            .arg(self.keys.nodes_index())
            .arg(name)
            .ignore();
        self.query_pipe::<()>(&pipe).await
    }
}

impl Admin for RedisBroker {
    async fn depth(&self, queue: &str) -> Result<QueueDepth, BrokerError> {
        let mut out = QueueDepth::default();
        for partition in self.partitions(queue) {
            let one = self.depth_stream(&partition).await?;
            out.ready += one.ready;
            out.delayed += one.delayed;
            out.in_flight += one.in_flight;
            out.dead += one.dead;
        }
        Ok(out)
    }

    async fn dead_letters_after(
        &self,
        queue: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        // Partition by partition, in order; a letter of partition p ≥ 1 is named `<entry>@p`.
        let (mut from, mut after) = (0, after.map(str::to_string));
        if let Some(cursor) = &after {
            let (p, raw) = split_entry(cursor)?;
            (from, after) = (p, Some(raw.to_string()));
        }
        let mut out = Vec::new();
        for p in from..self.partition_count(queue) {
            if out.len() >= limit {
                break;
            }
            let partition = partition_name(queue, p);
            let start = if p == from { after.as_deref() } else { None };
            let letters = self
                .dead_letters_stream(&partition, start, limit - out.len())
                .await?;
            out.extend(letters.into_iter().map(|mut letter| {
                letter.entry = entry_name(&letter.entry, p);
                letter
            }));
        }
        Ok(out)
    }

    async fn requeue_dead(&self, queue: &str, limit: usize) -> Result<u64, BrokerError> {
        let mut moved = 0u64;
        for partition in self.partitions(queue) {
            let room = usize::try_from((limit as u64).saturating_sub(moved)).unwrap_or(usize::MAX);
            if room == 0 {
                break;
            }
            moved += self.requeue_dead_stream(&partition, room).await?;
        }
        Ok(moved)
    }

    async fn requeue_dead_entry(
        &self,
        queue: &str,
        entry: &str,
    ) -> Result<Option<String>, BrokerError> {
        let (p, raw) = split_entry(entry)?;
        if p >= self.partition_count(queue) {
            return Ok(None);
        }
        self.requeue_dead_entry_stream(&partition_name(queue, p), raw)
            .await
    }

    async fn delete_dead(&self, queue: &str, entry: &str) -> Result<bool, BrokerError> {
        let (p, raw) = split_entry(entry)?;
        if p >= self.partition_count(queue) {
            return Ok(false);
        }
        self.delete_dead_stream(&partition_name(queue, p), raw)
            .await
    }

    async fn purge_dead(&self, queue: &str) -> Result<u64, BrokerError> {
        let mut deleted = 0;
        for partition in self.partitions(queue) {
            deleted += self.purge_dead_stream(&partition).await?;
        }
        Ok(deleted)
    }

    async fn purge(&self, queue: &str) -> Result<Purged, BrokerError> {
        let mut out = Purged::default();
        for partition in self.partitions(queue) {
            let one = self.purge_stream(&partition).await?;
            out.ready += one.ready;
            out.delayed += one.delayed;
        }
        Ok(out)
    }
}
