//! [`TaskError`], why an attempt did not succeed, and its [`ErrorClass`]: plain values the
//! handlers return and the metrics count by, kept apart from the handlers (which run pools)
//! so the metrics can name them without depending on what runs a task. `handler` re-exports
//! both, where the library's users find them.

use std::fmt;
use std::time::Duration;

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
    /// A Python task raised an exception its policy retries (`taskrt.Retry` or any other
    /// retryable exception), in a `python` worker pool.
    Python,
    /// A permanent error: never retried, so never on the retry counter.
    Permanent,
}

impl ErrorClass {
    /// Every class an attempt can be retried for, in label order ([`Permanent`] is not one).
    ///
    /// [`Permanent`]: ErrorClass::Permanent
    pub const RETRYABLE: [ErrorClass; 13] = [
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
        ErrorClass::Python,
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
            ErrorClass::Python => "python",
            ErrorClass::Permanent => "permanent",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
