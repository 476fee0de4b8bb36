//! `pool` handler: claims an idle agent of a process pool ([`crate::pool`]) and hands it the
//! task's envelope as its assignment. The task's result is the agent it went to
//! (`{"agent_id", "pid"}`); the session itself runs on in the agent, outside the task.
//!
//! | claim | outcome |
//! |---|---|
//! | an agent took the assignment | success |
//! | no idle agent within `claim_timeout`, or the pool is stopping | retryable ([`ErrorClass::NoAgent`]) |
//! | the pool gave up (`fatal`) | permanent |

use super::{Attempt, ErrorClass, Handler, TaskContext, TaskError};
use crate::pool::{ClaimError, Pool};

/// Hands tasks to the agents of one pool.
#[derive(Debug, Clone)]
pub struct PoolHandler {
    pool: Pool,
}

impl PoolHandler {
    /// A handler that claims agents of `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }
}

impl Handler for PoolHandler {
    fn call(&self, ctx: TaskContext) -> Attempt {
        let pool = self.pool.clone();
        Box::pin(async move {
            let assignment = serde_json::to_value(&*ctx.envelope).unwrap_or_default();
            match pool.claim(assignment).await {
                Ok(claimed) => {
                    Ok(serde_json::json!({ "agent_id": claimed.agent_id, "pid": claimed.pid }))
                }
                Err(err @ ClaimError::Fatal { .. }) => Err(TaskError::Permanent(err.to_string())),
                Err(err) => Err(TaskError::retry_as(ErrorClass::NoAgent, err.to_string())),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "pool"
    }
}
