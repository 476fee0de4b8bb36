//! The supervision tree of a node, built from its validated config.
//!
//! ```text
//! root          SupervisorActor   [supervision] policy, stops within runtime.shutdown_grace
//! ├── broker    BrokerActor       permanent; delayed mover, lease renewal, recovery sweep
//! └── heartbeat HeartbeatActor    permanent; uptime and event-loop lag
//! ```
//!
//! Resources, pools, queues and the scheduler attach here, after the broker, as their issues
//! land (DESIGN.md §2). Children start in this order and stop in the reverse one.

use std::sync::Arc;
use std::time::Duration;

use actors::broker::{AnyBroker, BrokerActor, BrokerArgs, BrokerSettings, Leases};
use actors::heartbeat::{HeartbeatActor, HeartbeatArgs};
use actors::supervisor::{ChildSpec, Restart, SupervisorSpec};
use tokio::time::Instant;

use crate::config::Config;

/// Name of the root supervisor (and first segment of every path).
pub const ROOT: &str = "root";

/// How often the delayed mover runs: an eta or retry fires at most this late.
pub const PROMOTE_EVERY: Duration = Duration::from_millis(10);

/// What the actors of a node share, created before the tree and outliving every restart.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The broker connection.
    pub broker: Arc<AnyBroker>,
    /// Leases held by this node's consumers.
    pub leases: Arc<Leases>,
    /// This node's consumer name.
    pub node_name: String,
}

/// The broker tunables of `config`.
pub fn broker_settings(config: &Config) -> BrokerSettings {
    BrokerSettings {
        prefix: config.broker.prefix.clone(),
        max_deliveries: config.broker.max_deliveries.get(),
        result_ttl: config.broker.result_ttl,
        task_idempotency_ttl: config
            .tasks
            .iter()
            .filter_map(|(name, task)| task.idempotency.as_ref().map(|i| (name.clone(), i.ttl)))
            .collect(),
        ..BrokerSettings::default()
    }
}

/// This node's name: `runtime.node_name`, else `<host>-<pid>-<random>` (unique per process,
/// so a restarted node never inherits a dead one's leases by accident).
pub fn node_name(config: &Config) -> String {
    config.runtime.node_name.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".to_string());
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        format!("{host}-{}-{suffix}", std::process::id())
    })
}

/// The root supervisor's spec for `config`; `node_started` anchors the node's uptime.
pub fn root_spec(config: &Config, shared: &Shared, node_started: Instant) -> SupervisorSpec {
    let broker_args = {
        let shared = shared.clone();
        let queues: Vec<String> = config.queues.keys().cloned().collect();
        let lease = config.broker.lease;
        move |node| BrokerArgs {
            node,
            broker: Arc::clone(&shared.broker),
            leases: Arc::clone(&shared.leases),
            queues: queues.clone(),
            lease,
            promote_every: PROMOTE_EVERY,
        }
    };
    let broker = ChildSpec::new("broker", "broker", Restart::Permanent, move |node| {
        (BrokerActor, broker_args(node))
    });
    let interval = config.runtime.heartbeat_interval;
    let heartbeat = ChildSpec::new("heartbeat", "heartbeat", Restart::Permanent, move |node| {
        (
            HeartbeatActor,
            HeartbeatArgs {
                node,
                interval,
                node_started,
            },
        )
    });
    SupervisorSpec {
        strategy: config.supervision.strategy,
        intensity: config.supervision.intensity,
        backoff: config.supervision.backoff,
        shutdown_timeout: config.runtime.shutdown_grace,
        children: vec![broker, heartbeat],
    }
}
