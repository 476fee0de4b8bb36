//! What runs a task: the [`Handler`] trait, the error taxonomy ([`TaskError`]), the context a
//! handler gets ([`TaskContext`]) and the task definitions a consumer runs ([`TaskDef`]).
//!
//! Handler kinds (DESIGN.md §3): [`native`] (Rust async fns registered through the library
//! API), [`http`] (POST the envelope to the app), [`exec`] (a command, no shell, envelope on
//! stdin, own process group), [`pool`] (an idle agent of a process pool takes the envelope).

#![warn(missing_docs)]

pub mod exec;
pub mod http;
pub mod native;
pub mod pool;

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
use crate::supervisor::Backoff;

/// Why an attempt did not succeed — typed by what happens next.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TaskError {
    /// Try again (after `after` when the server said so, e.g. Retry-After), within the retry
    /// policy.
    #[error("{reason}")]
    Retry {
        /// Why.
        reason: String,
        /// The earliest time to try again, when known (it wins over the backoff when larger).
        after: Option<Duration>,
        /// What kind of failure it was (the `class` label of `rt_tasks_retried_total`); a
        /// native function says [`ErrorClass::Native`].
        class: ErrorClass,
    },
    /// Do not try again: the task is dead-lettered and its `link_error` callbacks run.
    #[error("{0}")]
    Permanent(String),
    /// The hard time limit stopped it (retryable).
    #[error("hard time limit of {0:?} exceeded")]
    Timeout(Duration),
    /// It stopped at its soft time limit (a handler returns this after the token fired; retryable).
    #[error("cancelled: {0}")]
    Cancelled(String),
    /// It was revoked (`POST /tasks/{id}/revoke`): dead-lettered with the reason `revoked`,
    /// never retried; its `link_error` callbacks run.
    #[error("revoked")]
    Revoked,
}

impl TaskError {
    /// A retryable error without a server-given delay, as a native function returns it
    /// ([`ErrorClass::Native`]).
    pub fn retry(reason: impl Into<String>) -> Self {
        Self::retry_as(ErrorClass::Native, reason)
    }

    /// A retryable error of `class` without a server-given delay (the handlers' own).
    pub fn retry_as(class: ErrorClass, reason: impl Into<String>) -> Self {
        TaskError::Retry {
            reason: reason.into(),
            after: None,
            class,
        }
    }

    /// What kind of failure this is: the class a [`Retry`](TaskError::Retry) carries,
    /// [`ErrorClass::Timeout`] for the hard limit, [`ErrorClass::SoftTimeout`] for the soft
    /// one, [`ErrorClass::Permanent`] for a permanent error or a revocation (never retried).
    pub fn class(&self) -> ErrorClass {
        match self {
            TaskError::Retry { class, .. } => *class,
            TaskError::Permanent(_) | TaskError::Revoked => ErrorClass::Permanent,
            TaskError::Timeout(_) => ErrorClass::Timeout,
            TaskError::Cancelled(_) => ErrorClass::SoftTimeout,
        }
    }

    /// Whether the retry policy may try again.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, TaskError::Permanent(_) | TaskError::Revoked)
    }
}

/// What kind of failure ended an attempt, in a few fixed classes: the `class` label of
/// `rt_tasks_retried_total`, so an operator sees *why* tasks are retried (an upstream answering
/// 503, a worker that cannot be reached, tasks running into their limits) without the error's
/// text — which is free, unbounded and may carry data — ever becoming a label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The hard time limit stopped the attempt.
    Timeout,
    /// The attempt stopped at its soft time limit.
    SoftTimeout,
    /// No connection could be made (the `http` handler's URL, an OpenAI call).
    Connect,
    /// An HTTP request ran out of its own `timeout`, or the server answered `408`.
    RequestTimeout,
    /// The server answered `429 Too Many Requests`.
    Http429,
    /// The server answered a `5xx`.
    Http5xx,
    /// An HTTP request or its answer broke off otherwise (a reset connection, a corrupt body).
    Transport,
    /// An `exec` command exited 75 (`EX_TEMPFAIL`).
    ExitCode,
    /// An `exec` command was killed by a signal (not at its soft limit).
    Signal,
    /// A `pool` task got no idle agent within `claim_timeout` (or the pool was stopping).
    NoAgent,
    /// The task actor crashed or was killed (a panic in a native function, a chaos kill), or
    /// an `exec` command could not be waited for.
    Crashed,
    /// A native function asked for a retry ([`TaskError::retry`], `Retry` with this class).
    Native,
    /// A permanent error: never retried, so never on the retry counter.
    Permanent,
}

impl ErrorClass {
    /// Every class an attempt can be retried for, in label order ([`Permanent`] is not one).
    ///
    /// [`Permanent`]: ErrorClass::Permanent
    pub const RETRYABLE: [ErrorClass; 12] = [
        ErrorClass::Timeout,
        ErrorClass::SoftTimeout,
        ErrorClass::Connect,
        ErrorClass::RequestTimeout,
        ErrorClass::Http429,
        ErrorClass::Http5xx,
        ErrorClass::Transport,
        ErrorClass::ExitCode,
        ErrorClass::Signal,
        ErrorClass::NoAgent,
        ErrorClass::Crashed,
        ErrorClass::Native,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Timeout => "timeout",
            ErrorClass::SoftTimeout => "soft_timeout",
            ErrorClass::Connect => "connect",
            ErrorClass::RequestTimeout => "request_timeout",
            ErrorClass::Http429 => "http_429",
            ErrorClass::Http5xx => "http_5xx",
            ErrorClass::Transport => "transport",
            ErrorClass::ExitCode => "exit_code",
            ErrorClass::Signal => "signal",
            ErrorClass::NoAgent => "no_agent",
            ErrorClass::Crashed => "crashed",
            ErrorClass::Native => "native",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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

    /// `native`, `http`, `exec`, `pool`.
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
