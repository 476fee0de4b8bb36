//! The Redis keys of one prefix (the key layout is in the module documentation of
//! [`super`]).

/// Key names under a prefix (`BrokerSettings::prefix`); a queue's keys carry it as a hash
/// tag (`p:{q}:…`).
#[derive(Clone, Debug)]
pub(super) struct Keys {
    prefix: String,
}

impl Keys {
    pub(super) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
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

    pub(super) fn idempotency(&self, key: &str) -> String {
        format!("{}:idem:{key}", self.prefix)
    }

    pub(super) fn result(&self, id: &str) -> String {
        format!("{}:result:{id}", self.prefix)
    }

    /// `p:result:` — the record of task `id` is this prefix followed by the id.
    pub(super) fn result_prefix(&self) -> String {
        format!("{}:result:", self.prefix)
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

/// `p:revoked`: the kept revocations (members `r:<id>`, `t:<id>` to terminate; score = until
/// when, epoch ms).
pub(super) fn revoked_key(prefix: &str) -> String {
    format!("{prefix}:revoked")
}

/// `p:revoked:seq`: counts the changes of `p:revoked` (revocations, and requeues that drop
/// one).
pub(super) fn revoked_seq_key(prefix: &str) -> String {
    format!("{prefix}:revoked:seq")
}

/// The pub/sub channel each revocation is published on (`{"id", "terminate", "until"}`).
pub(super) fn revocations_channel(prefix: &str) -> String {
    format!("{prefix}:revocations")
}
