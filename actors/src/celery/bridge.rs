//! `BridgeActor`: takes over one kombu queue — moves its messages into the runtime's streams
//! with `take.lua` (atomic pop + `XADD`, see [`crate::celery`]).
//!
//! It polls: one script call moves up to `batch` messages; a full batch polls again at once,
//! a partial one after `poll` (Lua cannot block, and a `BRPOP` outside the script would break
//! the atomicity). Killing it at any point loses nothing: a script either ran whole or not at
//! all. Counters live outside the actor ([`BridgeCounters`]) and survive its restarts.
//!
//! A message whose Celery task id is taken (its task is queued, running or ended less than
//! `broker.result_ttl` ago — the runtime's rule for chosen ids) is a duplicate: `take.lua`
//! drops it in the same step, and it is counted and logged here with its id.
//!
//! Snapshot: `{kombu_queue, lists, moved, dead_lettered, duplicates, polls, errors,
//! last_error}`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use redis::Script;
use serde_json::json;

use super::Celery;
use crate::broker::{MAX_ID_BYTES, rfc3339};
use crate::tree::TreeHandle;

/// What a bridge did, kept across its restarts.
#[derive(Debug, Default)]
pub struct BridgeCounters {
    moved: AtomicU64,
    dead_lettered: AtomicU64,
    duplicates: AtomicU64,
    polls: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
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
#[derive(Debug)]
pub enum BridgeMessage {
    /// Move one batch.
    Poll,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BridgeActor;

/// Bridge state.
#[derive(Debug)]
pub struct BridgeState {
    args: BridgeArgs,
    lists: Vec<String>,
    script: Script,
    mapping: String,
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
        let settings = args.celery.settings();
        let mapping = serde_json::to_string(&settings.tasks)?;
        let state = BridgeState {
            lists: args.celery.lists(&args.queue),
            script: Script::new(include_str!("take.lua")),
            mapping,
            args,
        };
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
        match message {
            BridgeMessage::Poll => {
                let settings = state.args.celery.settings();
                let batch = settings.batch.max(1);
                let counters = &state.args.counters;
                counters.polls.fetch_add(1, Ordering::Relaxed);
                let next = match state.take(batch).await {
                    Ok((moved, dead, rejected, duplicates)) => {
                        counters.moved.fetch_add(moved, Ordering::Relaxed);
                        counters.dead_lettered.fetch_add(dead, Ordering::Relaxed);
                        let dropped = duplicates.len() as u64;
                        counters.duplicates.fetch_add(dropped, Ordering::Relaxed);
                        for id in &duplicates {
                            tracing::warn!(queue = %state.args.queue, task_id = %id,
                                "celery message dropped: a task with its id exists (a duplicate)");
                        }
                        if dead > 0 {
                            tracing::warn!(queue = %state.args.queue, dead,
                                "malformed celery messages dead-lettered");
                        }
                        // Unmapped tasks: FAILURE in Celery's backend, so `.get()` raises.
                        for pair in rejected.chunks_exact(2) {
                            if let Err(err) = state.args.celery.rejected(&pair[0], &pair[1]).await {
                                tracing::warn!(task_id = %pair[0], error = %err,
                                    "celery FAILURE result not written");
                            }
                        }
                        if moved + dead + dropped >= batch as u64 {
                            Duration::ZERO
                        } else {
                            settings.poll
                        }
                    }
                    Err(err) => {
                        counters.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(queue = %state.args.queue, error = %err,
                            "celery bridge: moving messages failed; trying again");
                        *counters
                            .last_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner()) = Some(err.to_string());
                        settings.poll.max(Duration::from_millis(500))
                    }
                };
                state.publish();
                if next.is_zero() {
                    myself.send_message(BridgeMessage::Poll)?;
                } else {
                    myself.send_after(next, || BridgeMessage::Poll);
                }
            }
        }
        Ok(())
    }
}

impl BridgeState {
    async fn take(&self, batch: usize) -> redis::RedisResult<(u64, u64, Vec<String>, Vec<String>)> {
        let settings = self.args.celery.settings();
        let mut invocation = self.script.prepare_invoke();
        for list in &self.lists {
            invocation.key(list);
        }
        invocation
            .arg(&self.args.celery.runtime_prefix)
            .arg(batch)
            .arg(&self.mapping)
            .arg(&settings.dead_letter_queue)
            .arg(rfc3339(SystemTime::now()))
            .arg(self.args.celery.events_maxlen)
            .arg(MAX_ID_BYTES);
        let mut conn = self.args.celery.broker.clone();
        invocation.invoke_async(&mut conn).await
    }

    fn publish(&self) {
        let c = &self.args.counters;
        self.args.node.publish(json!({
            "kombu_queue": self.args.queue,
            "lists": self.lists.len(),
            "moved": c.moved.load(Ordering::Relaxed),
            "dead_lettered": c.dead_lettered.load(Ordering::Relaxed),
            "duplicates": c.duplicates.load(Ordering::Relaxed),
            "polls": c.polls.load(Ordering::Relaxed),
            "errors": c.errors.load(Ordering::Relaxed),
            "last_error": *c.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        }));
    }
}
