//! The Redis keys of one prefix (the key layout is in the module documentation of
//! [`super`]).

use std::sync::Arc;

/// Key names under a prefix (`BrokerSettings::prefix`); a queue's keys carry it as a hash
/// tag (`p:{q}:…`).
///
/// On a Redis Cluster (`cluster`), every key a step writes together must be in one slot: a
/// task's record and an idempotency key go into their queue's slot (`p:{q}:result:<id>`,
/// `p:{q}:idem:<key>`) and so do their tasks' events (`p:{q}:events`: the events of no task in
/// `p:{meta}:events`), the revocations into one slot of their own (`p:{revoked}`,
/// `p:{revoked}:seq`), and a registry of the queues (`p:{meta}:queues`) is what a record is
/// looked up through and what the events are read from. On one server the names stay as they always were.
#[derive(Clone, Debug)]
pub(super) struct Keys {
    prefix: String,
    cluster: bool,
    /// `p:events` (a cluster: `p:{meta}:events`), made once: every outcome names it on one
    /// server.
    events: Arc<str>,
}

impl Keys {
    pub(super) fn new(prefix: &str, cluster: bool) -> Self {
        let events = if cluster {
            format!("{prefix}:{{meta}}:events")
        } else {
            format!("{prefix}:events")
        };
        Self {
            prefix: prefix.to_string(),
            cluster,
            events: events.into(),
        }
    }

    /// True on a Redis Cluster.
    pub(super) fn cluster(&self) -> bool {
        self.cluster
    }

    pub(super) fn stream(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:stream", self.prefix)
    }

    pub(super) fn delayed(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:delayed", self.prefix)
    }

    pub(super) fn dead(&self, queue: &str) -> String {
        format!("{}:{{{queue}}}:dead", self.prefix)
    }

    /// `p:idem:<key>` (a cluster: `p:{q}:idem:<key>`, keys are per queue there).
    pub(super) fn idempotency(&self, queue: &str, key: &str) -> String {
        format!("{}{key}", self.idempotency_prefix(queue))
    }

    fn idempotency_prefix(&self, queue: &str) -> String {
        if self.cluster {
            format!("{}:{{{queue}}}:idem:", self.prefix)
        } else {
            format!("{}:idem:", self.prefix)
        }
    }

    /// The record of task `id` of `queue`: `p:result:<id>` (a cluster: `p:{q}:result:<id>`).
    pub(super) fn result(&self, queue: &str, id: &str) -> String {
        format!("{}{id}", self.result_prefix(queue))
    }

    /// `p:result:` (a cluster: `p:{q}:result:`) — a record's key is this prefix followed by
    /// the id.
    pub(super) fn result_prefix(&self, queue: &str) -> String {
        if self.cluster {
            format!("{}:{{{queue}}}:result:", self.prefix)
        } else {
            format!("{}:result:", self.prefix)
        }
    }

    /// The events stream: `p:events` (a cluster: `p:{meta}:events`, the events of no task).
    pub(super) fn events(&self) -> Arc<str> {
        Arc::clone(&self.events)
    }

    /// The events stream of the tasks of `stream` (a queue, or a partition): `p:events`, shared
    /// (a cluster: `p:{q}:events`, in the queue's slot).
    pub(super) fn events_of(&self, stream: &str) -> Arc<str> {
        if self.cluster {
            format!("{}:{{{stream}}}:events", self.prefix).into()
        } else {
            self.events()
        }
    }

    /// A cluster's registry of queues (a set), through which records are looked up by id.
    pub(super) fn queues(&self) -> String {
        format!("{}:{{meta}}:queues", self.prefix)
    }

    /// `p:revoked` (a cluster: `p:{revoked}`): the kept revocations (members `r:<id>`,
    /// `t:<id>` to terminate; score = until when, epoch ms).
    pub(super) fn revoked(&self) -> String {
        if self.cluster {
            format!("{}:{{revoked}}", self.prefix)
        } else {
            format!("{}:revoked", self.prefix)
        }
    }

    /// `p:revoked:seq` (a cluster: `p:{revoked}:seq`): counts the changes of the revocations
    /// (revocations, and requeues that drop one).
    pub(super) fn revoked_seq(&self) -> String {
        format!("{}:seq", self.revoked())
    }

    /// The pub/sub channel each revocation is published on (`{"id", "terminate", "until"}`).
    pub(super) fn revocations_channel(&self) -> String {
        format!("{}:revocations", self.prefix)
    }

    pub(super) fn leader(&self) -> String {
        format!("{}:{{beat}}:leader", self.prefix)
    }

    pub(super) fn runs(&self) -> String {
        format!("{}:{{beat}}:runs", self.prefix)
    }

    pub(super) fn nodes_index(&self) -> String {
        format!("{}:{{nodes}}:index", self.prefix)
    }

    pub(super) fn node(&self, name: &str) -> String {
        format!("{}:{{nodes}}:node:{name}", self.prefix)
    }

    pub(super) fn group(&self) -> &str {
        &self.prefix
    }
}
