//! The connections to Redis: the shared connection of commands and scripts ([`Conn`]: a
//! standalone server's `ConnectionManager` or a Redis Cluster's `ClusterConnection`), the
//! dedicated connections of blocking reads ([`Endpoint`]), and the connection state `/health`
//! shows.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value,
};
use serde::Serialize;

use super::RedisBroker;
use super::codec::{StreamEntry, read_reply};
use crate::broker::{BrokerError, rfc3339};

/// How long connecting (and the start-up PING) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Response timeout of the shared connection (scripts over big queues included).
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time a blocking read gets beyond its `BLOCK` before its connection is given up.
pub(super) const BLOCK_MARGIN: Duration = Duration::from_secs(3);
/// The scheme of a Redis Cluster URL: `redis+cluster://[user:password@]host:port,host:port…`.
pub const CLUSTER_SCHEME: &str = "redis+cluster";

/// Seed nodes a cluster URL may list at most.
const MAX_SEEDS: usize = 64;

/// The seed nodes of a Redis Cluster URL, each as a standalone `redis://` URL carrying the
/// same credentials (`redis+cluster://u:p@h1:1,h2:2` → `redis://u:p@h1:1`, `redis://u:p@h2:2`);
/// `Ok(None)` for any other scheme. A cluster has only database 0: a path other than `/` or
/// `/0` is refused, as are a missing host or port, query strings and more than 64 (`MAX_SEEDS`)
/// nodes. Errors never repeat the password.
pub fn cluster_seeds(url: &str) -> Result<Option<Vec<String>>, String> {
    let Some(rest) = url
        .strip_prefix(CLUSTER_SCHEME)
        .and_then(|r| r.strip_prefix("://"))
    else {
        return Ok(None);
    };
    if rest.contains(['?', '#']) {
        return Err(format!(
            "{CLUSTER_SCHEME}:// URL: no query or fragment is allowed"
        ));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !matches!(path, "" | "0") {
        return Err(format!(
            "{CLUSTER_SCHEME}:// URL: a cluster has only database 0 (the path must be empty or /0)"
        ));
    }
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((credentials, hosts)) => (Some(credentials), hosts),
        None => (None, authority),
    };
    let mut seeds = Vec::new();
    for host in hosts.split(',') {
        let (name, port) = host.rsplit_once(':').unwrap_or((host, ""));
        if name.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!(
                "{CLUSTER_SCHEME}:// URL: node `{}` is not HOST:PORT",
                host.chars().take(80).collect::<String>()
            ));
        }
        if seeds.len() == MAX_SEEDS {
            return Err(format!(
                "{CLUSTER_SCHEME}:// URL: more than {MAX_SEEDS} nodes"
            ));
        }
        seeds.push(match credentials {
            Some(credentials) => format!("redis://{credentials}@{host}"),
            None => format!("redis://{host}"),
        });
    }
    Ok(Some(seeds))
}

/// Where the broker's connections go: one server, or a cluster (its seed nodes).
#[derive(Clone)]
pub(super) enum Endpoint {
    Single(Client),
    Cluster {
        client: Box<ClusterClient>,
        /// The seed nodes, for the revocations subscription (a PUBLISH reaches the subscribers
        /// of every node of a cluster).
        seeds: Vec<Client>,
    },
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Endpoint::Single",
            Self::Cluster { .. } => "Endpoint::Cluster",
        })
    }
}

impl Endpoint {
    /// Opens `url` (a `redis://` URL or a cluster URL, see [`cluster_seeds`]) without
    /// connecting.
    pub(super) fn open(url: &str) -> Result<Self, String> {
        match cluster_seeds(url)? {
            None => Client::open(url)
                .map(Self::Single)
                .map_err(|e| e.to_string()),
            Some(seeds) => {
                let clients = seeds
                    .iter()
                    .map(|seed| Client::open(seed.as_str()))
                    .collect::<RedisResult<Vec<Client>>>()
                    .map_err(|e| e.to_string())?;
                let client = ClusterClient::builder(seeds)
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()
                    .map_err(|e| e.to_string())?;
                Ok(Self::Cluster {
                    client: Box::new(client),
                    seeds: clients,
                })
            }
        }
    }

    /// True for a cluster.
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }

    /// The clients a subscription may use, in the order to try them.
    pub(super) fn subscribers(&self) -> Vec<Client> {
        match self {
            Self::Single(client) => vec![client.clone()],
            Self::Cluster { seeds, .. } => seeds.clone(),
        }
    }

    /// A dedicated connection without a response timeout (blocking reads bound their own
    /// wait): a multiplexed connection to the server, or a cluster connection of its own (a
    /// blocking read would stall every other command to its node on a shared one).
    pub(super) async fn dedicated(&self) -> RedisResult<Conn> {
        match self {
            Self::Single(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(None);
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                Ok(Conn::Dedicated(conn))
            }
            Self::Cluster { client, .. } => {
                let config =
                    redis::cluster::ClusterConfig::new().set_connection_timeout(CONNECT_TIMEOUT);
                let conn = client.get_async_connection_with_config(config).await?;
                Ok(Conn::Cluster(conn))
            }
        }
    }
}

/// A connection for commands and scripts; cheap to clone (clones share it).
#[derive(Clone)]
pub(crate) enum Conn {
    /// A standalone server's shared connection (reconnects by itself).
    Single(ConnectionManager),
    /// A blocking reader's own connection to a standalone server.
    Dedicated(redis::aio::MultiplexedConnection),
    /// A cluster: one connection per node, routed by key slot, following MOVED / ASK and
    /// reconnecting by itself.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "Conn::Single",
            Self::Dedicated(_) => "Conn::Dedicated",
            Self::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(conn) => conn.req_packed_command(cmd),
            Self::Dedicated(conn) => conn.req_packed_command(cmd),
            Self::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Dedicated(conn) => conn.req_packed_commands(pipeline, offset, count),
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(conn) => conn.get_db(),
            Self::Dedicated(conn) => conn.get_db(),
            Self::Cluster(conn) => conn.get_db(),
        }
    }
}

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

pub(super) fn serialize_time<S: serde::Serializer>(
    at: &SystemTime,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&rfc3339(*at))
}

/// The connection state, updated by every command's outcome.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// Fast path: false while connected, so a success costs one atomic load.
    down: AtomicBool,
    /// Since when and why, while down.
    outage: Mutex<Option<(SystemTime, String)>>,
}

impl Health {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Option<(SystemTime, String)>> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn up(&self, url: &str) {
        if self.down.load(Ordering::Acquire) {
            let mut outage = self.lock();
            if let Some((since, _)) = outage.take() {
                let down_for = SystemTime::now().duration_since(since).unwrap_or_default();
                tracing::info!(url, ?down_for, "redis broker reconnected");
            }
            self.down.store(false, Ordering::Release);
        }
    }

    pub(super) fn failed(&self, url: &str, error: &str) {
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

    pub(super) fn state(&self) -> ConnectionState {
        match self.lock().as_ref() {
            None => ConnectionState::Connected,
            Some((since, last_error)) => ConnectionState::Reconnecting {
                since: *since,
                last_error: last_error.clone(),
            },
        }
    }
}

/// The URL a broker talks to and its connection state: what turns a command's result into
/// the broker's (shared by the broker and its outcome writer).
#[derive(Debug)]
pub(super) struct Link {
    /// The URL without credentials, for errors and logs.
    pub(super) url: String,
    pub(super) health: Health,
}

impl Link {
    /// Notes a command's outcome in the connection state and converts its error.
    pub(super) fn observe<T>(&self, result: RedisResult<T>) -> Result<T, BrokerError> {
        match result {
            Ok(value) => {
                self.health.up(&self.url);
                Ok(value)
            }
            Err(e) => Err(self.error(e)),
        }
    }

    pub(super) fn error(&self, e: RedisError) -> BrokerError {
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
}

impl RedisBroker {
    // ----- plumbing ---------------------------------------------------------------------

    /// Notes a command's outcome in the connection state and converts its error.
    pub(super) fn observe<T>(&self, result: RedisResult<T>) -> Result<T, BrokerError> {
        self.link.observe(result)
    }

    pub(super) async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &Pipeline,
    ) -> Result<T, BrokerError> {
        let mut conn = self.manager.clone();
        self.observe(pipe.query_async(&mut conn).await)
    }

    /// Creates the queue's consumer group (at id 0, with the stream) unless known to exist.
    pub(super) async fn ensure_group(&self, queue: &str) -> Result<(), BrokerError> {
        if lock(&self.groups).contains(queue) {
            return Ok(());
        }
        let mut conn = self.manager.clone();
        let created = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys.stream(queue))
            .arg(self.keys.group())
            .arg("0")
            .arg("MKSTREAM")
            .query_async::<()>(&mut conn)
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => self.link.health.up(&self.link.url),
            other => self.observe(other)?,
        }
        self.register(queue).await?;
        lock(&self.groups).insert(queue.to_string());
        Ok(())
    }

    /// Runs `op` after making sure the group exists; if Redis says `NOGROUP` anyway (it
    /// restarted without its data), creates the group again and retries once.
    pub(super) async fn grouped<T, F, Fut>(&self, queue: &str, op: F) -> Result<T, BrokerError>
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

    /// One `XREADGROUP` (blocking on a dedicated connection when `block` is set), and after
    /// it the revocation counter (`GET p:revoked:seq`, `None` while nothing was ever revoked):
    /// any revocation made before the read returned is counted. On one server the counter
    /// comes in the read's round trip; on a cluster (another slot) in a request of its own.
    pub(super) async fn read_group(
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
            .arg(self.keys.group())
            .arg(consumer)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg((block.as_millis() as u64).max(1));
        }
        cmd.arg("STREAMS").arg(stream).arg(">");
        let cluster = self.keys.cluster();
        if !cluster {
            pipe.cmd("GET").arg(self.keys.revoked_seq());
        }
        let mut replies = match block {
            None => {
                self.grouped(queue, || {
                    let mut conn = self.manager.clone();
                    let pipe = &pipe;
                    async move { pipe.query_async::<Vec<Value>>(&mut conn).await }
                })
                .await?
            }
            Some(block) => {
                self.grouped(queue, || self.blocking_read(queue, consumer, &pipe, block))
                    .await?
            }
        }
        .into_iter();
        let reply = replies.next().unwrap_or(Value::Nil);
        let seq = if cluster {
            let mut seq_pipe = redis::pipe();
            seq_pipe.cmd("GET").arg(self.keys.revoked_seq());
            let (seq,): (Option<i64>,) = self.query_pipe(&seq_pipe).await?;
            seq
        } else {
            replies
                .next()
                .and_then(|seq| redis::from_redis_value(seq).ok())
        };
        Ok((read_reply(reply), seq))
    }

    /// A blocking `XREADGROUP` on the dedicated connection of (queue, consumer): taken out of
    /// the idle map for the call, put back after an answer (an error answer included), dropped
    /// after a connection failure so the next call connects afresh.
    pub(super) async fn blocking_read(
        &self,
        queue: &str,
        consumer: &str,
        pipe: &Pipeline,
        block: Duration,
    ) -> RedisResult<Vec<Value>> {
        let slot = (queue.to_string(), consumer.to_string());
        let taken = lock(&self.blocking).remove(&slot);
        let mut conn = match taken {
            Some(conn) => conn,
            None => self.endpoint.dedicated().await?,
        };
        let read = tokio::time::timeout(
            block + BLOCK_MARGIN,
            pipe.query_async::<Vec<Value>>(&mut conn),
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

/// A poison-tolerant lock (the guarded maps stay consistent whatever panicked).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// True when Redis answered `NOGROUP` (to a command, or to every failing command of a
/// pipeline): the queue's consumer group is gone.
pub(super) fn is_nogroup(e: &RedisError) -> bool {
    e.clone().into_server_errors().is_some_and(|errors| {
        !errors.is_empty() && errors.iter().all(|(_, error)| error.code() == "NOGROUP")
    })
}

/// True for failures of the connection itself (as opposed to an answer from the server).
pub(super) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}
