//! What runs a task: the [`Handler`] trait, the error taxonomy ([`TaskError`]), the context a
//! handler gets ([`TaskContext`]) and the task definitions a consumer runs ([`TaskDef`]).
//!
//! Handler kinds (docs/tasks.md, "Running tasks"): [`native`] (Rust async fns registered through the library
//! API), [`http`] (POST the envelope to the app), [`exec`] (a command, no shell, envelope on
//! stdin, own process group), [`pool`] (an idle agent of a process pool takes the envelope),
//! [`python`] (a process of a Python worker pool runs the task's function).

#![warn(missing_docs)]

pub mod exec;
pub mod http;
pub mod native;
pub mod pool;
pub mod python;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::Envelope;
pub use crate::error::{ErrorClass, TaskError};
use crate::policy::Backoff;

/// What a handler gets for one attempt.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The task.
    pub envelope: Arc<Envelope>,
    /// Fires at the soft time limit: finish up and return (native handlers watch it; `exec`
    /// sends SIGTERM to the process group; `http` sends the deadline in a header).
    pub soft: CancellationToken,
    /// When the soft limit fires, if there is one.
    pub soft_deadline: Option<Instant>,
    /// When the hard limit stops the attempt.
    pub deadline: Instant,
}

/// The future of one attempt.
pub type Attempt = Pin<Box<dyn Future<Output = Result<Value, TaskError>> + Send>>;

/// Runs attempts of one task.
pub trait Handler: Send + Sync + fmt::Debug {
    /// Starts an attempt. Dropping the future aborts it (the hard limit does that): a handler
    /// must release what it holds on drop (an HTTP request is aborted, a process group killed).
    fn call(&self, ctx: TaskContext) -> Attempt;

    /// `native`, `http`, `exec`, `pool`, `python`.
    fn kind(&self) -> &'static str;
}

/// The retry policy of a task: `max_retries` retries after the first attempt, each waiting
/// `backoff.delay(attempt)` (or the server's Retry-After when larger). The retry is scheduled
/// at most [`crate::caps::MAX_DELAY`] ahead, whatever the delay says.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Delay schedule.
    pub backoff: Backoff,
    /// Whether an attempt stopped at the hard limit is retried.
    pub retry_on_timeout: bool,
}

impl RetryPolicy {
    /// Whether `err` may be retried at all under this policy.
    pub fn retries(&self, err: &TaskError) -> bool {
        match err {
            TaskError::Timeout(_) => self.retry_on_timeout,
            other => other.is_retryable(),
        }
    }

    /// The delay before the retry that follows attempt number `attempt` (0-based) failing with
    /// `err`, or `None` when the task must not be retried.
    pub fn next_delay(&self, attempt: u32, err: &TaskError) -> Option<Duration> {
        if !self.retries(err) || attempt >= self.max_retries {
            return None;
        }
        let delay = self.backoff.delay(attempt);
        Some(match err {
            TaskError::Retry {
                after: Some(after), ..
            } => delay.max(*after),
            _ => delay,
        })
    }
}

/// One task definition (`[tasks.NAME]` after compilation), as a consumer runs it.
#[derive(Clone, Debug)]
pub struct TaskDef {
    /// Task name.
    pub name: String,
    /// Its queue.
    pub queue: String,
    /// What runs it.
    pub handler: Arc<dyn Handler>,
    /// Effective hard time limit (task → queue → runtime already resolved).
    pub time_limit: Duration,
    /// Effective soft time limit.
    pub soft_time_limit: Option<Duration>,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Resources it declares, each with how much it needs it (for the resource gate:
    /// deferral, degraded run, or permanent failure — [`crate::gate`]).
    pub uses: Vec<crate::gate::Use>,
    /// Tasks enqueued with its result on success.
    pub link: Vec<String>,
    /// Tasks enqueued with its error when it fails for good.
    pub link_error: Vec<String>,
    /// Whether a success writes its record with the result (`store_result`); false removes
    /// the record instead ([`TaskQueue::ack_unrecorded`](crate::broker::TaskQueue::ack_unrecorded)).
    pub store_result: bool,
}

/// Every task definition of a node, by name.
#[derive(Clone, Debug, Default)]
pub struct TaskDefs {
    by_name: HashMap<String, Arc<TaskDef>>,
}

impl TaskDefs {
    /// The definitions.
    pub fn new(defs: impl IntoIterator<Item = TaskDef>) -> Self {
        Self {
            by_name: defs
                .into_iter()
                .map(|def| (def.name.clone(), Arc::new(def)))
                .collect(),
        }
    }

    /// The definition of `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<TaskDef>> {
        self.by_name.get(name)
    }

    /// The queue `name` runs on.
    pub fn queue_of(&self, name: &str) -> Option<&str> {
        self.by_name.get(name).map(|def| def.queue.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classes_are_listed_in_declaration_order() {
        // `TaskSeries::retried` indexes its counters by `class as usize`.
        for (i, class) in ErrorClass::RETRYABLE.iter().enumerate() {
            assert_eq!(*class as usize, i, "{class}");
        }
        assert_eq!(ErrorClass::Permanent as usize, ErrorClass::RETRYABLE.len());
        assert_eq!(
            TaskError::Permanent("x".into()).class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            TaskError::Timeout(Duration::from_secs(1)).class(),
            ErrorClass::Timeout
        );
        assert_eq!(
            TaskError::Cancelled("soft".into()).class(),
            ErrorClass::SoftTimeout
        );
        assert_eq!(TaskError::retry("x").class(), ErrorClass::Native);
    }

    #[test]
    fn retry_policy_follows_backoff_and_honours_a_larger_retry_after() {
        let policy = RetryPolicy {
            max_retries: 3,
            backoff: Backoff::try_new(Duration::from_secs(1), Duration::from_secs(60), 0.0)
                .unwrap(),
            retry_on_timeout: true,
        };
        let err = TaskError::retry("zep_call_error");
        assert_eq!(policy.next_delay(0, &err), Some(Duration::from_secs(1)));
        assert_eq!(policy.next_delay(2, &err), Some(Duration::from_secs(4)));
        assert_eq!(policy.next_delay(3, &err), None, "retries exhausted");
        let later = TaskError::Retry {
            reason: "429".into(),
            after: Some(Duration::from_secs(30)),
            class: ErrorClass::Http429,
        };
        assert_eq!(policy.next_delay(0, &later), Some(Duration::from_secs(30)));
        let sooner = TaskError::Retry {
            reason: "429".into(),
            after: Some(Duration::from_millis(10)),
            class: ErrorClass::Http429,
        };
        assert_eq!(policy.next_delay(1, &sooner), Some(Duration::from_secs(2)));
        assert_eq!(
            policy.next_delay(0, &TaskError::Permanent("400".into())),
            None
        );
        let timeout = TaskError::Timeout(Duration::from_secs(1));
        assert_eq!(policy.next_delay(0, &timeout), Some(Duration::from_secs(1)));
        let strict = RetryPolicy {
            retry_on_timeout: false,
            ..policy
        };
        assert_eq!(strict.next_delay(0, &timeout), None);
        assert_eq!(strict.next_delay(0, &err), Some(Duration::from_secs(1)));
    }
}
