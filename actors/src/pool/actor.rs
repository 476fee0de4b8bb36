//! `PoolActor` (kind `pool`, permanent): the pool's place in the tree and its driver.
//!
//! It holds nothing that must survive it: membership, agents and their monitors live in the
//! [`Pool`]. On (re)start it re-adopts the agents the pool has (killing the group of any that
//! lost its monitor); then it reconciles — keeps `min_idle` warm, never above `max` — whenever
//! the membership changes and every `TICK` (backoff deadlines), and checks liveness, RSS and
//! idle age every `health_every`. Each round publishes the pool's snapshot and marks the actor
//! degraded while the pool is in `backoff` or `fatal`.
//!
//! An orderly stop (`post_stop`) stops and reaps every agent before the actor ends. A kill or
//! a failure runs no `post_stop` (ractor): the agents keep running and the restarted actor
//! re-adopts them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;
use tracing::{error, info};

use super::Pool;
use crate::tree::TreeHandle;

/// How often the pool is reconciled without a change (a backoff deadline may have passed).
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct PoolArgs {
    pub node: TreeHandle,
    /// The pool (made by the node; shared with claimers).
    pub pool: Pool,
}

/// Messages (timers and wake-ups the actor sends itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMessage {
    /// The membership changed: reconcile.
    Reconcile,
    /// Periodic reconcile.
    Tick,
    /// Liveness, RSS, idle age.
    Health,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct PoolActor;

/// What the actor keeps between rounds (nothing that must survive it).
#[derive(Debug)]
pub struct PoolState {
    args: PoolArgs,
    /// A `Reconcile` is queued (the watcher sends at most one at a time).
    pending: Arc<AtomicBool>,
    watcher: JoinHandle<()>,
}

impl PoolState {
    fn publish(&self) {
        self.args.node.publish(self.args.pool.snapshot());
        self.args.node.set_degraded(self.args.pool.health());
    }
}

impl Actor for PoolActor {
    type Msg = PoolMessage;
    type State = PoolState;
    type Arguments = PoolArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: PoolArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let adopted = args.pool.adopt().await;
        if adopted > 0 {
            info!(pool = %args.pool.name(), adopted, "re-adopted the pool's agents");
        }
        let pending = Arc::new(AtomicBool::new(false));
        let watcher = {
            let mut changed = args.pool.subscribe();
            let pending = Arc::clone(&pending);
            let myself = myself.clone();
            tokio::spawn(async move {
                while changed.changed().await.is_ok() {
                    if !pending.swap(true, Ordering::AcqRel)
                        && myself.cast(PoolMessage::Reconcile).is_err()
                    {
                        break;
                    }
                }
            })
        };
        myself.cast(PoolMessage::Reconcile)?;
        myself.send_after(TICK, || PoolMessage::Tick);
        myself.send_after(args.pool.settings().health_every, || PoolMessage::Health);
        let state = PoolState {
            args,
            pending,
            watcher,
        };
        state.publish();
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let pool = &state.args.pool;
        match message {
            PoolMessage::Reconcile => {
                state.pending.store(false, Ordering::Release);
                pool.reconcile();
            }
            PoolMessage::Tick => {
                pool.reconcile();
                myself.send_after(TICK, || PoolMessage::Tick);
            }
            PoolMessage::Health => {
                pool.check_health().await;
                pool.reconcile();
                myself.send_after(pool.settings().health_every, || PoolMessage::Health);
            }
        }
        state.publish();
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.watcher.abort();
        let pool = &state.args.pool;
        let left = pool.shutdown().await;
        if left > 0 {
            error!(pool = %pool.name(), left, "agents still alive after the stop deadline (SIGKILLed)");
        } else {
            info!(pool = %pool.name(), "all agents stopped and reaped");
        }
        state.publish();
        Ok(())
    }
}
