//! Supervision (in progress).

mod policy;

pub use policy::{Backoff, Intensity, Restart, Strategy};

/// An invalid restart policy value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    /// `within` must be longer than zero.
    #[error("restart window must be longer than zero")]
    ZeroWindow,
    /// The backoff cap is below its base.
    #[error("backoff_max ({max:?}) is below backoff ({base:?})")]
    BackoffCapBelowBase {
        /// The base delay.
        base: std::time::Duration,
        /// The cap.
        max: std::time::Duration,
    },
    /// Jitter outside 0..=1.
    #[error("jitter must be between 0.0 and 1.0, got {0}")]
    Jitter(f64),
}
