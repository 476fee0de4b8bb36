//! The replay backlog: writes buffered on the broker queue `replay_queue(resource)` while Zep
//! is unavailable, replayed in order through the broker's own reserve, renew, ack, dead
//! letter and recovery; the only state kept here is the held head (module docs of [`super`]).

use std::sync::MutexGuard;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::Method;
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderValue};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::warn;

use super::api::{Call, Sent};
use super::{RENEW_EVERY, REPLAY_LEASE, ReplayRound, ZepClient, ZepError, bump};
use crate::broker::{
    Admin, BrokerError, Delivery, Envelope, QueueDepth, Recovered, TaskQueue, rfc3339,
};
use crate::resource::auth::refuses;
use crate::resource::breaker::BreakerState;

/// Where new writes go: straight to Zep, or behind a backlog.
#[derive(Debug)]
pub(super) struct Drain {
    /// `None` until the backlog has been looked at once.
    pub(super) backlog: Option<bool>,
    /// Bumped by every buffered write, so a replay round that found the queue empty only
    /// clears the flag when nothing was buffered since it looked.
    pub(super) seq: u64,
}
/// The entry being replayed, held until Zep accepts or refuses it.
#[derive(Debug, Clone)]
pub(super) struct Head {
    pub(super) delivery: Delivery,
    pub(super) renewed: Instant,
}

impl Call {
    /// The replay envelope's kwargs; `None` when the body is neither JSON nor UTF-8 text.
    pub(super) fn to_kwargs(&self) -> Option<Map<String, Value>> {
        let content_type = self
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut kwargs = Map::new();
        kwargs.insert("method".into(), json!(self.method.as_str()));
        kwargs.insert("path".into(), json!(self.path));
        kwargs.insert("content_type".into(), json!(content_type));
        if self.body.is_empty() {
        } else if let Ok(value) = serde_json::from_slice::<Value>(&self.body) {
            kwargs.insert("body_json".into(), value);
        } else {
            let text = std::str::from_utf8(&self.body).ok()?;
            kwargs.insert("body_text".into(), json!(text));
        }
        kwargs.insert("buffered_at".into(), json!(rfc3339(SystemTime::now())));
        Some(kwargs)
    }

    pub(super) fn from_kwargs(kwargs: &Map<String, Value>) -> Result<Self, String> {
        let text = |key: &str| kwargs.get(key).and_then(Value::as_str);
        let method = text("method")
            .ok_or("missing `method`")?
            .parse::<Method>()
            .map_err(|e| format!("bad `method`: {e}"))?;
        let path = text("path").ok_or("missing `path`")?.to_string();
        if !path.starts_with('/') {
            return Err(format!("bad `path`: `{path}` does not start with /"));
        }
        let mut headers = HeaderMap::new();
        if let Some(content_type) = text("content_type") {
            let value = HeaderValue::from_str(content_type)
                .map_err(|e| format!("bad `content_type`: {e}"))?;
            headers.insert(CONTENT_TYPE, value);
        }
        let body = match (kwargs.get("body_json"), text("body_text")) {
            (Some(value), _) => Bytes::from(value.to_string()),
            (None, Some(text)) => Bytes::from(text.to_string()),
            (None, None) => Bytes::new(),
        };
        Ok(Self {
            method,
            path,
            headers,
            body,
        })
    }
}

impl ZepClient {
    /// Whether writes must queue behind a backlog. Looked up in the broker once (a backlog
    /// left by a previous run); after that the flag follows buffering and replay.
    pub(super) async fn has_backlog(&self) -> bool {
        let (known, seq) = {
            let drain = self.drain();
            (drain.backlog, drain.seq)
        };
        if let Some(backlog) = known {
            return backlog;
        }
        let backlog = match self.broker.depth(&self.queue).await {
            Ok(depth) => depth.ready + depth.delayed + depth.in_flight > 0,
            // Cannot tell (the broker is unreachable, so no replay can run either): send
            // the write rather than fail it, and look again next time.
            Err(_) => return false,
        };
        let mut drain = self.drain();
        if drain.seq == seq && drain.backlog.is_none() {
            drain.backlog = Some(backlog);
        }
        drain.backlog.unwrap_or(true)
    }

    pub(super) fn drain(&self) -> MutexGuard<'_, Drain> {
        self.drain.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn head(&self) -> MutexGuard<'_, Option<Head>> {
        self.head.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `call` to the replay queue.
    pub(super) async fn buffer(&self, call: &Call) -> Result<(), ZepError> {
        let Some(kwargs) = call.to_kwargs() else {
            return Err(ZepError::Buffer {
                resource: self.resource.clone(),
                source: BrokerError::Invalid("a body that is neither JSON nor text".into()),
            });
        };
        {
            let mut drain = self.drain();
            drain.backlog = Some(true);
            drain.seq += 1;
        }
        let mut envelope = Envelope::new(format!("{}.replay", self.resource), &self.queue);
        envelope.kwargs = kwargs;
        self.broker
            .enqueue(vec![envelope])
            .await
            .map_err(|source| ZepError::Buffer {
                resource: self.resource.clone(),
                source,
            })?;
        bump(&self.counters.buffered);
        Ok(())
    }

    /// Replays up to `max` buffered writes in order (see the module docs). Also renews the
    /// head's lease when due, even while the breaker is open. One round at a time.
    pub async fn replay(&self, max: usize) -> Result<ReplayRound, BrokerError> {
        let _single = self.replaying.lock().await;
        let result = self.replay_round(max).await;
        *self
            .last_replay_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = result.as_ref().err().map(ToString::to_string);
        result
    }

    pub(super) async fn replay_round(&self, max: usize) -> Result<ReplayRound, BrokerError> {
        let mut round = ReplayRound::default();
        self.renew_head().await?;
        if self.api_key.is_none() {
            round.stopped = self.unusable();
            return Ok(round);
        }
        while ((round.replayed + round.dead_lettered) as usize) < max {
            if let Some(refusal) = self.auth.refused() {
                round.stopped = Some(self.auth.describe(&refusal));
                break;
            }
            if self.breaker.state() == BreakerState::Open {
                round.stopped = Some(format!("{} circuit breaker is open", self.resource));
                break;
            }
            let seq = self.drain().seq;
            let Some(delivery) = self.head_or_reserve().await? else {
                let mut drain = self.drain();
                if drain.seq == seq {
                    drain.backlog = Some(false);
                }
                round.drained = true;
                break;
            };
            let call = match Call::from_kwargs(&delivery.envelope.kwargs) {
                Ok(call) => call,
                Err(why) => {
                    self.bury(&delivery, &format!("not a replayable write: {why}"))
                        .await?;
                    round.dead_lettered += 1;
                    continue;
                }
            };
            let Ok(permit) = self.breaker.try_acquire() else {
                round.stopped = Some(format!(
                    "{} circuit breaker is not admitting calls",
                    self.resource
                ));
                break;
            };
            match self.send(&call, permit).await {
                Sent::Answered(upstream)
                    if upstream.status.is_success()
                        || (call.is_ensure() && upstream.already_exists()) =>
                {
                    let result = json!({ "status": upstream.status.as_u16() });
                    self.broker.ack(&delivery, result).await?;
                    self.head().take();
                    bump(&self.counters.replayed);
                    round.replayed += 1;
                }
                Sent::Answered(upstream) if upstream.transient() || refuses(upstream.status) => {
                    // A refused key is the node's fault, not the write's: it stays the head.
                    round.stopped = Some(format!("{} answered {}", self.resource, upstream.status));
                    break;
                }
                Sent::Answered(upstream) => {
                    let reason = format!(
                        "{} refused {}: {} {}",
                        self.resource,
                        call.operation(),
                        upstream.status,
                        self.scrub(&upstream.snippet())
                    );
                    warn!(resource = %self.resource, entry = %delivery.entry, %reason,
                        "replayed write refused; dead-lettered");
                    self.bury(&delivery, &reason).await?;
                    round.dead_lettered += 1;
                }
                Sent::Unreachable(why) => {
                    round.stopped = Some(format!("{}: {why}", self.resource));
                    break;
                }
            }
        }
        Ok(round)
    }

    pub(super) async fn bury(&self, delivery: &Delivery, reason: &str) -> Result<(), BrokerError> {
        self.broker.dead_letter(delivery, reason).await?;
        self.head().take();
        bump(&self.counters.replay_dead_lettered);
        Ok(())
    }

    /// The held head, or the next entry reserved (and held) from the queue.
    pub(super) async fn head_or_reserve(&self) -> Result<Option<Delivery>, BrokerError> {
        if let Some(head) = self.head().as_ref() {
            return Ok(Some(head.delivery.clone()));
        }
        let got = self
            .broker
            .reserve(&self.queue, &self.consumer, 1, Duration::ZERO)
            .await?;
        let Some(delivery) = got.into_iter().next() else {
            return Ok(None);
        };
        *self.head() = Some(Head {
            delivery: delivery.clone(),
            renewed: Instant::now(),
        });
        Ok(Some(delivery))
    }

    /// Renews the head's lease when due; forgets it when another node took it over.
    pub(super) async fn renew_head(&self) -> Result<(), BrokerError> {
        let due = self
            .head()
            .as_ref()
            .filter(|head| head.renewed.elapsed() >= RENEW_EVERY)
            .map(|head| head.delivery.entry.clone());
        let Some(entry) = due else {
            return Ok(());
        };
        let lost = self
            .broker
            .renew(&self.queue, &self.consumer, std::slice::from_ref(&entry))
            .await?;
        let mut head = self.head();
        if head.as_ref().is_some_and(|h| h.delivery.entry == entry) {
            if lost.is_empty() {
                if let Some(h) = head.as_mut() {
                    h.renewed = Instant::now();
                }
            } else {
                warn!(resource = %self.resource, %entry,
                    "replay head was recovered by another node; it may be replayed twice");
                *head = None;
            }
        }
        Ok(())
    }

    /// Returns entries held longer than [`REPLAY_LEASE`] by a replayer that died.
    pub async fn recover_replay(&self) -> Result<Recovered, BrokerError> {
        self.broker.recover(&self.queue, REPLAY_LEASE).await
    }

    /// The replay queue's depth.
    pub async fn backlog(&self) -> Result<QueueDepth, BrokerError> {
        self.broker.depth(&self.queue).await
    }
}
