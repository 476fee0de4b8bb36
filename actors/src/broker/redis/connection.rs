//! The connections to Redis: the shared `ConnectionManager` (commands, scripts), the
//! dedicated connections of blocking reads, and the connection state `/health` shows.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use redis::{AsyncConnectionConfig, Pipeline, RedisError, RedisResult, Value};
use serde::Serialize;

use super::RedisBroker;
use super::codec::{StreamEntry, read_reply};
use super::keys::revoked_seq_key;
use crate::broker::{BrokerError, rfc3339};

/// How long connecting (and the start-up PING) may take.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Response timeout of the shared connection (scripts over big queues included).
pub(super) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time a blocking read gets beyond its `BLOCK` before its connection is given up.
pub(super) const BLOCK_MARGIN: Duration = Duration::from_secs(3);
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

    /// One `XREADGROUP` (blocking on a dedicated connection when `block` is set), and in the
    /// same round trip — after it — the revocation counter (`GET p:revoked:seq`, `None` while
    /// nothing was ever revoked): any revocation made before the read returned is counted.
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
    /// A blocking `XREADGROUP` on the dedicated connection of (queue, consumer): taken out of
    /// the idle map for the call, put back after an answer (an error answer included), dropped
    /// after a connection failure so the next call connects afresh.
    pub(super) async fn blocking_read(
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
