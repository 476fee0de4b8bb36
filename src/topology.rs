//! The supervision tree of a node, built from its validated config.
//!
//! ```text
//! root          SupervisorActor   [supervision] policy, stops within runtime.shutdown_grace
//! └── heartbeat HeartbeatActor    permanent; uptime and event-loop lag
//! ```
//!
//! The broker, resources, pools, queues and scheduler subtrees attach here, in that start
//! order, as their issues land (DESIGN.md §2).

use actors::heartbeat::{HeartbeatActor, HeartbeatArgs};
use actors::supervisor::{ChildSpec, Restart, SupervisorSpec};
use tokio::time::Instant;

use crate::config::Config;

/// Name of the root supervisor (and first segment of every path).
pub const ROOT: &str = "root";

/// The root supervisor's spec for `config`; `node_started` anchors the node's uptime.
pub fn root_spec(config: &Config, node_started: Instant) -> SupervisorSpec {
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
        children: vec![heartbeat],
    }
}
