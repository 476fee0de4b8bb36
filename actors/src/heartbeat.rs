//! `HeartbeatActor`: a small permanent actor that records the node's uptime and how late the
//! async runtime delivers its ticks (event-loop lag, the first sign of a blocked executor).
//!
//! It publishes `{ "beats", "interval_ms", "lag_ms", "max_lag_ms", "node_uptime_secs" }` as
//! its snapshot. `node_uptime_secs` is measured from `HeartbeatArgs::node_started`, so it keeps
//! counting across restarts of the actor.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;
use tokio::time::Instant;

use crate::tree::TreeHandle;

#[derive(Debug)]
pub struct HeartbeatArgs {
    pub node: TreeHandle,
    /// Time between beats.
    pub interval: Duration,
    /// When the node (not this actor) started.
    pub node_started: Instant,
}

#[derive(Debug)]
pub enum HeartbeatMessage {
    /// A tick, sent to itself every interval.
    Beat,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct HeartbeatActor;

#[derive(Debug)]
pub struct HeartbeatState {
    args: HeartbeatArgs,
    beats: u64,
    next_due: Instant,
    max_lag: Duration,
    timer: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for HeartbeatState {
    fn drop(&mut self) {
        // The ticker task must not outlive the actor (kill skips post_stop; Drop still runs).
        if let Some(timer) = self.timer.take() {
            timer.abort();
        }
    }
}

impl Actor for HeartbeatActor {
    type Msg = HeartbeatMessage;
    type State = HeartbeatState;
    type Arguments = HeartbeatArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: HeartbeatArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let timer = myself.send_interval(args.interval, || HeartbeatMessage::Beat);
        let state = HeartbeatState {
            next_due: Instant::now() + args.interval,
            args,
            beats: 0,
            max_lag: Duration::ZERO,
            timer: Some(timer),
        };
        state.publish(Duration::ZERO);
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            HeartbeatMessage::Beat => {
                let now = Instant::now();
                let lag = now.saturating_duration_since(state.next_due);
                state.next_due = now.max(state.next_due) + state.args.interval;
                state.beats += 1;
                state.max_lag = state.max_lag.max(lag);
                state.publish(lag);
            }
        }
        Ok(())
    }
}

impl HeartbeatState {
    fn publish(&self, lag: Duration) {
        self.args.node.publish(json!({
            "beats": self.beats,
            "interval_ms": self.args.interval.as_millis() as u64,
            "lag_ms": lag.as_secs_f64() * 1000.0,
            "max_lag_ms": self.max_lag.as_secs_f64() * 1000.0,
            "node_uptime_secs": self.args.node_started.elapsed().as_secs(),
        }));
    }
}
