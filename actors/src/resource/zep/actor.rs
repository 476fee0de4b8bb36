//! `ZepActor` (kind `zep`, permanent): the Zep resource's place in the tree.
//!
//! It holds nothing that matters across a crash: the [`ZepClient`] — breaker, replay head,
//! counters — lives in an `Arc` made by the node, so a killed or restarted actor neither closes
//! an open breaker (which would restart the retry storm) nor loses a buffered write.
//!
//! Three loops, each rescheduled only after its round finished (a slow Zep or Redis delays
//! rounds instead of piling them up):
//!
//! - **replay** every `replay_every` (at once again while a full batch was replayed): buffered
//!   writes go to Zep in order while the breaker admits calls ([`ZepClient::replay`]);
//! - **sweep** every [`REPLAY_LEASE`]` / 4`: replay entries held by a dead node come back;
//! - **snapshot** every second: the client's snapshot plus the replay queue's depth;
//! - **probe** while Zep refuses the key: one probe when it is due ([`ZepClient::probe`]),
//!   looked for every `auth_probe_every` (at most every second) — the probe time is kept in
//!   the client, so a restarted actor does not probe early.
//!
//! While Zep is misconfigured or the breaker is not closed the actor is marked degraded
//! (`/health` says why, the misconfiguration first).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::{Value, json};
use tracing::{info, warn};

use super::{REPLAY_LEASE, ZepClient};
use crate::broker::QueueDepth;
use crate::resource::breaker::BreakerState;
use crate::tree::TreeHandle;

/// Entries replayed per round at most (the next round follows at once when all were used).
const REPLAY_BATCH: usize = 64;
/// How often the snapshot is refreshed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);
/// The shortest replay period accepted (a zero period would spin).
const MIN_REPLAY_EVERY: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct ZepArgs {
    pub node: TreeHandle,
    /// The node's Zep client (shared with tasks, the egress proxy and the gate).
    pub client: Arc<ZepClient>,
    /// Pause between replay rounds (at least 10 ms).
    pub replay_every: Duration,
}

/// Messages (each a timer the actor sends itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZepMessage {
    /// Replay buffered writes.
    Replay,
    /// Recover replay entries of dead nodes.
    Sweep,
    /// Refresh the snapshot.
    Snapshot,
    /// Probe a misconfigured Zep when it is due.
    Probe,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct ZepActor;

/// What the actor remembers between rounds (nothing that must survive it).
#[derive(Debug)]
pub struct ZepState {
    args: ZepArgs,
    backlog: Option<QueueDepth>,
    recovered: u64,
    last_error: Option<String>,
}

impl Actor for ZepActor {
    type Msg = ZepMessage;
    type State = ZepState;
    type Arguments = ZepArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        mut args: ZepArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        args.replay_every = args.replay_every.max(MIN_REPLAY_EVERY);
        myself.cast(ZepMessage::Snapshot)?;
        myself.cast(ZepMessage::Replay)?;
        myself.cast(ZepMessage::Probe)?;
        myself.send_after(REPLAY_LEASE / 4, || ZepMessage::Sweep);
        Ok(ZepState {
            args,
            backlog: None,
            recovered: 0,
            last_error: None,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let client = Arc::clone(&state.args.client);
        let next = match message {
            ZepMessage::Replay => {
                let mut next = state.args.replay_every;
                match client.replay(REPLAY_BATCH).await {
                    Ok(round) => {
                        if round.replayed + round.dead_lettered > 0 {
                            info!(
                                resource = client.resource(),
                                replayed = round.replayed,
                                dead_lettered = round.dead_lettered,
                                "replayed buffered writes"
                            );
                        }
                        if (round.replayed + round.dead_lettered) as usize >= REPLAY_BATCH {
                            next = Duration::ZERO;
                        }
                    }
                    Err(err) => state.failed("replay", err.to_string()),
                }
                next
            }
            ZepMessage::Sweep => {
                match client.recover_replay().await {
                    Ok(recovered) => {
                        if recovered.requeued + recovered.dead > 0 {
                            warn!(
                                resource = client.resource(),
                                requeued = recovered.requeued,
                                dead_lettered = recovered.dead,
                                "recovered replay entries held by a replayer that died"
                            );
                        }
                        state.recovered += recovered.requeued;
                    }
                    Err(err) => state.failed("sweep", err.to_string()),
                }
                REPLAY_LEASE / 4
            }
            ZepMessage::Snapshot => {
                match client.backlog().await {
                    Ok(depth) => {
                        state.backlog = Some(depth);
                        state.last_error = None;
                    }
                    Err(err) => state.failed("snapshot", err.to_string()),
                }
                state.args.node.publish(state.snapshot());
                SNAPSHOT_EVERY
            }
            ZepMessage::Probe => {
                client.probe().await;
                client.auth().next_check()
            }
        };
        state.mark_degraded();
        if next.is_zero() {
            myself.cast(message)?;
        } else {
            myself.send_after(next, move || message);
        }
        Ok(())
    }
}

impl ZepState {
    fn failed(&mut self, round: &str, why: String) {
        if self.last_error.as_deref() != Some(why.as_str()) {
            warn!(actor = self.args.node.path(), round, error = %why, "zep round failed; will retry");
        }
        self.last_error = Some(why);
    }

    fn mark_degraded(&self) {
        let client = &self.args.client;
        let waiting = || {
            self.backlog
                .map_or_else(|| "unknown".to_string(), |d| backlog(&d).to_string())
        };
        if let Some(refusal) = client.auth().refused() {
            self.args.node.set_degraded(Some(format!(
                "{}; reads answer an empty context, writes are buffered for replay ({} \
                 waiting), tasks that use it fail until a probe is accepted",
                client.auth().describe(&refusal),
                waiting()
            )));
            return;
        }
        let reason = match client.breaker().state() {
            BreakerState::Closed => None,
            state => {
                let waiting = waiting();
                Some(format!(
                    "{} circuit breaker is {state}: reads answer an empty context, writes are \
                     buffered for replay ({waiting} waiting)",
                    client.resource()
                ))
            }
        };
        self.args.node.set_degraded(reason);
    }

    fn snapshot(&self) -> Value {
        let mut snapshot = self.args.client.snapshot();
        snapshot["replay"]["backlog"] = json!(self.backlog.as_ref().map(backlog));
        snapshot["replay"]["depth"] = json!(self.backlog);
        snapshot["replay"]["recovered_from_dead_nodes"] = json!(self.recovered);
        snapshot["last_error"] = json!(self.last_error);
        snapshot
    }
}

fn backlog(depth: &QueueDepth) -> u64 {
    depth.ready + depth.delayed + depth.in_flight
}
