//! Restart policy values: strategy, restart type, restart intensity and restart backoff —
//! plain values with no actor behind them, so the tree, the handlers' retry policy and the
//! pools use them without depending on the supervisor (which re-exports them).
//!
//! Constructors validate (`try_new`): an intensity of zero restarts over a zero window or a
//! backoff whose cap is below its base cannot be built, so it never reaches a supervisor.

#![warn(missing_docs)]

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

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
        base: Duration,
        /// The cap.
        max: Duration,
    },
    /// Jitter outside 0..=1.
    #[error("jitter must be between 0.0 and 1.0, got {0}")]
    Jitter(f64),
}

/// Which children a supervisor restarts when one of them has to be restarted (OTP names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Restart only the child that exited.
    #[default]
    OneForOne,
    /// Stop every other child (in reverse start order), then start all of them again in order.
    OneForAll,
    /// Stop the children started after the one that exited, then restart it and them in order.
    RestForOne,
}

impl Strategy {
    /// The config spelling of this strategy.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::OneForOne => "one_for_one",
            Strategy::OneForAll => "one_for_all",
            Strategy::RestForOne => "rest_for_one",
        }
    }
}

/// When a child is restarted after it exits (OTP names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// Always restarted: consumers, resources, pools, the scheduler.
    Permanent,
    /// Restarted only after an abnormal exit (a failure, a panic or a kill).
    Transient,
    /// Never restarted: task actors (a failed task is the broker's business).
    Temporary,
}

impl Restart {
    /// The config spelling of this restart type.
    pub fn as_str(self) -> &'static str {
        match self {
            Restart::Permanent => "permanent",
            Restart::Transient => "transient",
            Restart::Temporary => "temporary",
        }
    }

    /// Whether a child of this type is restarted after an exit that was `abnormal` or not.
    pub fn restarts_after(self, abnormal: bool) -> bool {
        match self {
            Restart::Permanent => true,
            Restart::Transient => abnormal,
            Restart::Temporary => false,
        }
    }
}

/// Restart intensity: more than `max_restarts` restarts within `within` and the supervisor
/// gives up and fails, escalating to its parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Intensity {
    max_restarts: u32,
    within: Duration,
}

impl Intensity {
    /// An intensity that allows `max_restarts` restarts in any window of length `within`.
    /// `max_restarts = 0` is legal (the first restart escalates); a zero window is not.
    pub fn try_new(max_restarts: u32, within: Duration) -> Result<Self, PolicyError> {
        if within.is_zero() {
            return Err(PolicyError::ZeroWindow);
        }
        Ok(Self {
            max_restarts,
            within,
        })
    }

    /// Restarts allowed within the window.
    pub fn max_restarts(&self) -> u32 {
        self.max_restarts
    }

    /// Length of the sliding window.
    pub fn within(&self) -> Duration {
        self.within
    }
}

impl Default for Intensity {
    /// OTP's default is 1 restart in 5 s; a runtime of long-lived actors is better served by
    /// a little more room: 5 restarts in 10 s.
    fn default() -> Self {
        Self {
            max_restarts: 5,
            within: Duration::from_secs(10),
        }
    }
}

/// The restart history of one supervisor: timestamps of the restarts still inside the
/// intensity window.
#[derive(Debug)]
pub(crate) struct RestartWindow {
    intensity: Intensity,
    restarts: std::collections::VecDeque<Instant>,
}

impl RestartWindow {
    pub(crate) fn new(intensity: Intensity) -> Self {
        Self {
            intensity,
            restarts: std::collections::VecDeque::new(),
        }
    }

    /// Records a restart at `now`; returns `false` when it exceeds the intensity.
    pub(crate) fn record(&mut self, now: Instant) -> bool {
        while let Some(&oldest) = self.restarts.front() {
            if now.duration_since(oldest) >= self.intensity.within {
                self.restarts.pop_front();
            } else {
                break;
            }
        }
        self.restarts.push_back(now);
        self.restarts.len() <= self.intensity.max_restarts as usize
    }

    /// Restarts inside the window ending at `now` (before recording a new one).
    pub(crate) fn recent(&self, now: Instant) -> u32 {
        self.restarts
            .iter()
            .filter(|&&at| now.duration_since(at) < self.intensity.within)
            .count() as u32
    }
}

/// Restart backoff: the n-th consecutive restart of a child waits `min(max, base · 2ⁿ)`,
/// reduced by up to `jitter` (a fraction) at random so that siblings do not restart in step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: f64,
}

impl Backoff {
    /// A backoff starting at `base`, capped at `max`, with `jitter` in `0.0..=1.0`.
    pub fn try_new(base: Duration, max: Duration, jitter: f64) -> Result<Self, PolicyError> {
        if max < base {
            return Err(PolicyError::BackoffCapBelowBase { base, max });
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(PolicyError::Jitter(jitter));
        }
        Ok(Self { base, max, jitter })
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap of the delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The largest fraction cut from a delay at random.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }

    /// The delay before the restart that follows `consecutive` earlier restarts, with jitter.
    pub fn delay(&self, consecutive: u32) -> Duration {
        let full = self.ceiling(consecutive);
        if self.jitter == 0.0 || full.is_zero() {
            return full;
        }
        let cut = rand::rng().random_range(0.0..=self.jitter);
        full.mul_f64(1.0 - cut)
    }

    /// The delay without jitter: `min(max, base · 2ⁿ)`.
    pub fn ceiling(&self, consecutive: u32) -> Duration {
        let factor = 2u32.saturating_pow(consecutive.min(31));
        self.base.saturating_mul(factor).min(self.max)
    }
}

impl Default for Backoff {
    /// 20 ms, doubling up to 5 s, with 20 % jitter: a single crash is repaired at once, a
    /// crash loop settles at one attempt every few seconds.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(20),
            max: Duration::from_secs(5),
            jitter: 0.2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors_refuse_invalid_values() {
        assert_eq!(
            Intensity::try_new(3, Duration::ZERO),
            Err(PolicyError::ZeroWindow)
        );
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1), 0.1).is_err());
        assert!(Backoff::try_new(Duration::from_secs(1), Duration::from_secs(2), 1.5).is_err());
        assert!(Backoff::try_new(Duration::from_secs(1), Duration::from_secs(2), -0.1).is_err());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitter_only_shortens() {
        let b = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1), 0.5).unwrap();
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(1), Duration::from_millis(200));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(4), Duration::from_secs(1));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(1));
        for n in 0..10 {
            let d = b.delay(n);
            assert!(d <= b.ceiling(n) && d >= b.ceiling(n) / 2, "{d:?} for {n}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn window_forgets_restarts_older_than_within() {
        let mut w = RestartWindow::new(Intensity::try_new(2, Duration::from_secs(10)).unwrap());
        let t0 = Instant::now();
        assert!(w.record(t0));
        assert!(w.record(t0 + Duration::from_secs(1)));
        assert!(
            !w.record(t0 + Duration::from_secs(2)),
            "third restart in 10 s"
        );
        let later = t0 + Duration::from_secs(13);
        assert_eq!(w.recent(later), 0);
        assert!(w.record(later));
    }
}
