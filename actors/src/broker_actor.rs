//! `BrokerActor`: the node's broker housekeeping, as a permanent actor in the tree.
//!
//! It owns three loops over the configured queues, each rescheduled only after the previous
//! round finished (a slow or unreachable Redis delays rounds instead of piling up ticks):
//!
//! - **delayed mover** every `promote_every`: due delayed entries (eta, retry backoff) move to
//!   the ready queue;
//! - **lease renewal** every `lease / 3`: every entry in [`Leases`] is renewed for its owner;
//!   entries another node took over are marked lost;
//! - **recovery sweep** every `lease / 4`: entries whose lease expired (their node died) go
//!   back to the ready queue, or to the dead letters past `max_deliveries`.
//!
//! And a snapshot every second: a PING's round trip (also in `/metrics`); it also rewrites
//! this node's presence record ([`Presence`]: queues, entries held per queue, start time, and
//! whether it is running, draining or stopping — [`NodeStatus`]; kept for `ttl`), which
//! `GET /nodes` lists — a node that dies drops out of the list when its record expires. When
//! the node starts to stop, [`BrokerMessage::Announce`] writes the record at once.
//!
//! The snapshot: per queue ready / delayed / in flight / dead, the last sweep,
//! counters, the connection. A broker that cannot be reached marks the actor degraded (so
//! `/health` says 503 with the reason); nothing is dropped — the loops go on and catch up.
//!
//! The connection and the leases live outside the actor (`Arc`s in its arguments), so a
//! restart of the actor neither drops the connection nor forgets a lease.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::json;
use tracing::{info, warn};

use crate::broker::{
    Admin, AnyBroker, BrokerError, Coordination, Leases, NodeRecord, NodeState, QueueDepth,
    TaskQueue, rfc3339,
};
use crate::metrics::Metrics;
use crate::tree::TreeHandle;

/// How often the snapshot is refreshed.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(1);

/// Spawn arguments.
#[derive(Debug, Clone)]
pub struct BrokerArgs {
    /// Place in the tree.
    pub node: TreeHandle,
    /// The connection (shared with the consumers and the HTTP API).
    pub broker: Arc<AnyBroker>,
    /// Entries this node's consumers hold.
    pub leases: Arc<Leases>,
    /// Queues to look after.
    pub queues: Vec<String>,
    /// Lease of an in-flight entry.
    pub lease: Duration,
    /// Period of the delayed mover.
    pub promote_every: Duration,
    /// The node's metrics (round trip, poison messages).
    pub metrics: Arc<Metrics>,
    /// This node's presence record, written every snapshot round (none: not written).
    pub presence: Option<Presence>,
}

/// What a node says about itself in its presence record.
#[derive(Debug, Clone)]
pub struct Presence {
    /// The node's consumer name.
    pub node: String,
    /// When the node started.
    pub started_at: SystemTime,
    /// How long a record is kept unless written again.
    pub ttl: Duration,
    /// Running, draining or stopping: moved by the program as the node stops.
    pub status: Arc<NodeStatus>,
}

/// A node's [`NodeState`] and since when, shared by the program (which moves it when a
/// signal asks the node to stop) and the broker actor (which writes it in the presence
/// record, at once when told with [`BrokerMessage::Announce`]).
#[derive(Debug, Default)]
pub struct NodeStatus(Mutex<Option<(NodeState, SystemTime)>>);

impl NodeStatus {
    /// Moves the node to `state`, as of now.
    pub fn set(&self, state: NodeState) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some((state, SystemTime::now()));
    }

    /// The state and when it was entered (`None` for a node that is running as it started).
    pub fn get(&self) -> (NodeState, Option<SystemTime>) {
        match *self.0.lock().unwrap_or_else(PoisonError::into_inner) {
            Some((state, since)) => (state, Some(since)),
            None => (NodeState::Running, None),
        }
    }
}

/// Messages (each a timer the actor sends itself).
#[derive(Debug, Clone, Copy)]
pub enum BrokerMessage {
    /// Move due delayed entries.
    Promote,
    /// Renew the leases held by this node.
    Renew,
    /// Recover expired leases.
    Sweep,
    /// Refresh the snapshot.
    Snapshot,
    /// Write the presence record now (the node's state changed); not a timer.
    Announce,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BrokerActor;

/// Counters and last results.
#[derive(Debug, Default)]
pub struct BrokerState {
    args: Option<BrokerArgs>,
    promoted: u64,
    renewed: u64,
    lost: u64,
    recovered: u64,
    poisoned: u64,
    last_sweep: Option<String>,
    last_error: Option<String>,
    depths: BTreeMap<String, QueueDepth>,
}

impl BrokerMessage {
    fn period(self, args: &BrokerArgs) -> Duration {
        match self {
            BrokerMessage::Promote => args.promote_every,
            BrokerMessage::Renew => args.lease / 3,
            BrokerMessage::Sweep => args.lease / 4,
            BrokerMessage::Snapshot | BrokerMessage::Announce => SNAPSHOT_EVERY,
        }
    }
}

impl Actor for BrokerActor {
    type Msg = BrokerMessage;
    type State = BrokerState;
    type Arguments = BrokerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: BrokerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        for msg in [
            BrokerMessage::Promote,
            BrokerMessage::Renew,
            BrokerMessage::Sweep,
        ] {
            myself.send_after(msg.period(&args), move || msg);
        }
        // A first snapshot right away, so the tree shows the queues from the start.
        myself.cast(BrokerMessage::Snapshot)?;
        Ok(BrokerState {
            args: Some(args),
            ..BrokerState::default()
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some(args) = state.args.clone() else {
            return Ok(());
        };
        let result = match message {
            BrokerMessage::Promote => state.promote(&args).await,
            BrokerMessage::Renew => state.renew(&args).await,
            BrokerMessage::Sweep => state.sweep(&args).await,
            BrokerMessage::Snapshot => state.snapshot(&args).await,
            BrokerMessage::Announce => announce(&args).await,
        };
        match result {
            Ok(()) => {
                if message_touches_everything(message) {
                    args.node.set_degraded(args.broker.degraded());
                }
            }
            Err(err) => {
                let why = err.to_string();
                if state.last_error.as_deref() != Some(why.as_str()) {
                    warn!(actor = args.node.path(), error = %why, ?message, "broker round failed; will retry");
                }
                args.node.set_degraded(Some(why.clone()));
                state.last_error = Some(why);
            }
        }
        if !matches!(message, BrokerMessage::Announce) {
            myself.send_after(message.period(&args), move || message);
        }
        Ok(())
    }
}

/// Writes this node's presence record (if it keeps one): queues, entries held, state.
async fn announce(args: &BrokerArgs) -> Result<(), BrokerError> {
    let Some(presence) = &args.presence else {
        return Ok(());
    };
    let mut in_flight: BTreeMap<String, u64> = args.queues.iter().map(|q| (q.clone(), 0)).collect();
    for held in args.leases.held() {
        if held.consumer == presence.node {
            *in_flight.entry(held.queue).or_default() += held.entries.len() as u64;
        }
    }
    let (state, since) = presence.status.get();
    let record = NodeRecord {
        name: presence.node.clone(),
        queues: args.queues.clone(),
        in_flight,
        started_at: rfc3339(presence.started_at),
        last_seen: rfc3339(SystemTime::now()),
        state,
        state_since: since.map(rfc3339),
    };
    args.broker.announce_node(&record, presence.ttl).await
}

/// The snapshot round reads every queue, so its success means the broker is reachable.
fn message_touches_everything(message: BrokerMessage) -> bool {
    matches!(message, BrokerMessage::Snapshot)
}

impl BrokerState {
    async fn promote(&mut self, args: &BrokerArgs) -> Result<(), BrokerError> {
        let now = SystemTime::now();
        for queue in &args.queues {
            self.promoted += args.broker.promote_due(queue, now).await?;
        }
        Ok(())
    }

    async fn renew(&mut self, args: &BrokerArgs) -> Result<(), BrokerError> {
        for held in args.leases.held() {
            let lost = args
                .broker
                .renew(&held.queue, &held.consumer, &held.entries)
                .await?;
            self.renewed += (held.entries.len() - lost.len()) as u64;
            if !lost.is_empty() {
                warn!(queue = %held.queue, consumer = %held.consumer, ?lost,
                    "leases lost: another node recovered these entries; their tasks may run twice");
                self.lost += lost.len() as u64;
                args.leases.mark_lost(&held.queue, &held.consumer, &lost);
            }
        }
        Ok(())
    }

    async fn sweep(&mut self, args: &BrokerArgs) -> Result<(), BrokerError> {
        for queue in &args.queues {
            let recovered = args.broker.recover(queue, args.lease).await?;
            if recovered.requeued + recovered.dead > 0 {
                info!(%queue, requeued = recovered.requeued, dead_lettered = recovered.dead,
                    "recovered entries whose lease expired");
            }
            self.recovered += recovered.requeued;
            self.poisoned += recovered.dead;
            args.metrics.poisoned(queue, &recovered.dead_tasks);
        }
        self.last_sweep = Some(rfc3339(SystemTime::now()));
        Ok(())
    }

    async fn snapshot(&mut self, args: &BrokerArgs) -> Result<(), BrokerError> {
        let rtt = args.broker.ping().await?;
        args.metrics.broker_round_trip(rtt);
        for queue in &args.queues {
            let depth = args.broker.depth(queue).await?;
            self.depths.insert(queue.clone(), depth);
        }
        self.last_error = None;
        announce(args).await?;
        args.node.publish(json!({
            "broker": args.broker.describe(),
            "queues": self.depths,
            "round_trip_ms": rtt.as_secs_f64() * 1000.0,
            "leases_held": args.leases.count(),
            "lease_ms": args.lease.as_millis() as u64,
            "last_sweep": self.last_sweep,
            "promoted": self.promoted,
            "renewed": self.renewed,
            "leases_lost": self.lost,
            "recovered": self.recovered,
            "dead_lettered_by_sweep": self.poisoned,
        }));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::{BrokerSettings, Envelope};
    use crate::supervisor::{ChildSpec, Restart, start_root};
    use crate::tree::Tree;
    use tokio::time::Instant;

    const LEASE: Duration = Duration::from_millis(300);

    async fn start(
        broker: Arc<AnyBroker>,
        leases: Arc<Leases>,
        status: Arc<NodeStatus>,
    ) -> (
        Arc<Tree>,
        ractor::ActorRef<crate::supervisor::SupervisorMessage>,
    ) {
        let tree = Tree::new();
        let child = ChildSpec::new("broker", "broker", Restart::Permanent, move |node| {
            let args = BrokerArgs {
                node,
                broker: Arc::clone(&broker),
                leases: Arc::clone(&leases),
                queues: vec!["chat".into(), "default".into()],
                lease: LEASE,
                promote_every: Duration::from_millis(10),
                metrics: Arc::default(),
                presence: Some(Presence {
                    node: "node-a".into(),
                    started_at: SystemTime::now(),
                    ttl: Duration::from_secs(5),
                    status: Arc::clone(&status),
                }),
            };
            (BrokerActor, args)
        });
        let spec = crate::supervisor::quick_restarts(vec![child]);
        let (root, _) = start_root(&tree, "root", spec).await.unwrap();
        (tree, root)
    }

    fn memory() -> Arc<AnyBroker> {
        Arc::new(AnyBroker::Memory(MemoryBroker::new(
            BrokerSettings::default(),
        )))
    }

    async fn eventually(what: &str, limit: Duration, mut cond: impl AsyncFnMut() -> bool) {
        let end = Instant::now() + limit;
        while !cond().await {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn moves_due_delayed_entries_and_publishes_depths() {
        let broker = memory();
        let status: Arc<NodeStatus> = Arc::default();
        let (tree, root) = start(Arc::clone(&broker), Arc::default(), Arc::clone(&status)).await;
        let mut env = Envelope::new("send_whatsapp_message_task", "default");
        env.eta = Some(crate::broker::Timestamp::at(
            SystemTime::now() + Duration::from_millis(100),
        ));
        broker.enqueue(vec![env]).await.unwrap();
        assert_eq!(broker.depth("default").await.unwrap().delayed, 1);
        eventually("promotion", Duration::from_secs(2), async || {
            broker.depth("default").await.unwrap().ready == 1
        })
        .await;
        eventually("snapshot", Duration::from_secs(3), async || {
            tree.get("root/broker").unwrap().snapshot["queues"]["default"]["ready"] == 1
        })
        .await;
        let snapshot = tree.get("root/broker").unwrap().snapshot;
        assert_eq!(snapshot["broker"]["kind"], "memory");
        let nodes = broker.nodes().await.unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0].name, "node-a");
        assert_eq!(nodes[0].queues, ["chat", "default"]);
        assert_eq!(nodes[0].state, NodeState::Running);
        assert_eq!(nodes[0].state_since, None);
        assert_eq!(snapshot["queues"]["chat"]["ready"], 0);

        // The node starts to stop: its record says so at once, not at the next round.
        status.set(NodeState::Stopping);
        tree.cell("root/broker")
            .unwrap()
            .send_message(BrokerMessage::Announce)
            .unwrap();
        eventually(
            "the stopping state",
            Duration::from_millis(500),
            async || broker.nodes().await.unwrap()[0].state == NodeState::Stopping,
        )
        .await;
        assert!(broker.nodes().await.unwrap()[0].state_since.is_some());
        root.stop(None);
    }

    #[tokio::test]
    async fn held_leases_are_renewed_even_across_a_restart_and_unheld_ones_recovered() {
        let broker = memory();
        let leases: Arc<Leases> = Arc::default();
        let (tree, root) = start(Arc::clone(&broker), Arc::clone(&leases), Arc::default()).await;
        broker
            .enqueue(vec![Envelope::new("process_chat_message", "chat"); 2])
            .await
            .unwrap();
        let got = broker
            .reserve("chat", "node-a", 2, Duration::ZERO)
            .await
            .unwrap();
        // node-a runs the first task (holds its lease); the second's owner "died".
        leases.hold("node-a", &Arc::new(got[0].clone()));

        tokio::time::sleep(LEASE).await;
        tree.cell("root/broker").unwrap().kill();
        eventually("broker restarted", Duration::from_secs(2), async || {
            tree.get("root/broker")
                .is_some_and(|b| b.restarts == 1 && b.status == crate::tree::Status::Running)
        })
        .await;
        // Three leases later the held entry is still in flight; the other came back.
        tokio::time::sleep(LEASE * 3).await;
        let depth = broker.depth("chat").await.unwrap();
        assert_eq!((depth.in_flight, depth.ready), (1, 1), "{depth:?}");
        let again = broker
            .reserve("chat", "node-b", 5, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].envelope.id, got[1].envelope.id);
        assert!(!leases.is_lost(&got[0].entry));
        root.stop(None);
    }
}
