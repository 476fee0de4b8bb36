//! `python` handler: runs the task's function on a process of a Python worker pool
//! (`[workers.NAME]`, [`crate::pool`]'s worker protocol; docs/python.md).
//!
//! | what happened | outcome |
//! |---|---|
//! | the function returned a JSON-serialisable value | success, with that value |
//! | it raised `taskrt.Retry(after=…)` or an exception its task retries (default: any) | retryable (class `python`), after `after` when given |
//! | `taskrt.Permanent`, an exception it marked permanent, an unknown task, arguments that do not fit, a result that is not JSON | permanent |
//! | `SoftTimeLimitExceeded` escaped it (raised at the soft limit) | retryable (class `soft_timeout`) |
//! | the hard limit: the process group is SIGKILLed | timeout (the consumer's) |
//! | the process died or broke the protocol | retryable (class `crashed`); a new process takes its place |
//! | no free process within `claim_timeout` | retryable (class `no_agent`) |

use std::sync::Arc;

use super::{Attempt, Handler, TaskContext};
use crate::pool::Pool;

/// Runs tasks on the processes of one worker pool.
#[derive(Debug, Clone)]
pub struct PythonHandler {
    pool: Pool,
    function: Arc<str>,
}

impl PythonHandler {
    /// A handler that runs `function` (the name its `@task` registered) on `pool`'s workers.
    pub fn new(pool: Pool, function: impl Into<Arc<str>>) -> Self {
        Self {
            pool,
            function: function.into(),
        }
    }
}

impl Handler for PythonHandler {
    fn call(&self, ctx: TaskContext) -> Attempt {
        let pool = self.pool.clone();
        let function = Arc::clone(&self.function);
        Box::pin(async move {
            pool.run(ctx.envelope, function, ctx.soft_deadline, ctx.deadline)
                .await
        })
    }

    fn kind(&self) -> &'static str {
        "python"
    }
}
