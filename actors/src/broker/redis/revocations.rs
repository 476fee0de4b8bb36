//! What this node knows of the kept revocations (`p:revoked`): read again when the counter
//! moved (with a `reserve`), and kept current by a subscription to `p:revocations`.

use std::sync::Weak;
use std::time::{Duration, SystemTime};

use redis::{Client, RedisResult};

use super::RedisBroker;
use super::connection::{CONNECT_TIMEOUT, Conn};
use super::keys::Keys;
use crate::broker::revocations::Revocations;
use crate::broker::{Revocation, epoch_ms};

impl RedisBroker {
    /// Brings this node's copy of the kept revocations up to date when the broker's counter
    /// says there were revocations it has not seen (`seq` from the read): one round trip, only
    /// then. A failure leaves the copy as it was (the next read tries again).
    pub(super) async fn catch_up_revocations(&self, seq: Option<i64>) {
        let seq = seq.unwrap_or(0);
        if seq == self.revocations.seq() {
            return;
        }
        match load_revocations(&mut self.manager.clone(), &self.keys).await {
            Ok((kept, seq)) => self.revocations.replace(kept, seq, false),
            Err(err) => {
                tracing::warn!(error = %err, "revocations not read; tasks revoked since the last read may run")
            }
        }
    }
}

/// Reads the kept revocations: `(id, until ms, terminate)` of each member of `p:revoked` not
/// expired, and the counter they reflect (read first: a revocation made between the two reads
/// is seen at the next catch-up again, never missed).
pub(super) async fn load_revocations(
    conn: &mut Conn,
    keys: &Keys,
) -> RedisResult<(Vec<(String, u64, bool)>, i64)> {
    let now = epoch_ms(SystemTime::now());
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(keys.revoked_seq());
    pipe.cmd("ZRANGEBYSCORE")
        .arg(keys.revoked())
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
pub(super) const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Keeps this node's copy of the revocations current as they are made: subscribed to the
/// revocations channel, it adds each one (and tells the consumers). After (re)subscribing it
/// reads the whole set again and tells the consumers of every revocation in it, so a running
/// task revoked while the connection was down is still stopped. Ends when the broker is
/// dropped.
pub(super) async fn listen_revocations(
    revocations: Weak<Revocations>,
    clients: Vec<Client>,
    mut manager: Conn,
    keys: Keys,
) {
    use futures_util::StreamExt;
    let channel = keys.revocations_channel();
    // On a cluster, any node hears every PUBLISH: the seeds are tried in turn.
    let mut clients = clients.into_iter().cycle();
    loop {
        if revocations.strong_count() == 0 {
            return;
        }
        let Some(client) = clients.next() else {
            return;
        };
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
        match load_revocations(&mut manager, &keys).await {
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
