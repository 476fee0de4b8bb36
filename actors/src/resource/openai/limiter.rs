//! The rate limiters of the OpenAI client: [`Limit`] (a validated per-minute quota with its
//! burst) and [`RateGate`] (a governor GCRA limiter that waits on **tokio's** clock).
//!
//! # Why tokio's clock
//!
//! governor's own `until_n_ready` sleeps with `futures-timer` on the real clock, so
//! `tokio::time::pause()` does not move it, and its `FakeRelativeClock` only moves when a test
//! advances it by hand — which does not compose with hundreds of concurrent waiters. Instead
//! the limiter reads a clock made from [`tokio::time::Instant`] ([`TokioClock`]) and the wait
//! loop sleeps with [`tokio::time::sleep`]: in production that is the monotonic clock; under
//! `tokio::time::pause()` the whole limiter runs on paused time, so "600 calls at 300/min take
//! two minutes" is a test that runs in milliseconds and is exact.
//!
//! # The window guarantee
//!
//! A GCRA limiter with burst `b` and emission interval `T` lets through at most
//! `b + ⌈W / T⌉ − 1` cells in any window of length `W`. With `T = 60 s / (n − b + 1)` that is
//! exactly `n` in any 60 s window, so [`Limit`] replenishes at `n − b + 1` cells per minute:
//! the configured quota is never exceeded in any minute, whatever the burst — at the price of
//! a steady rate `b − 1` cells/min below `n` (the default burst is `n / 10`, so about 10 %;
//! a burst of 1 gives the full rate with no burst at all).
//!
//! governor cannot give cells back: a call that used fewer tokens than estimated has still
//! spent the estimate. The client corrects from the server's headers instead (a hold until the
//! server's reset when it reports nothing left).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tokio::time::Instant;

use super::OpenAiError;

const MINUTE: Duration = Duration::from_secs(60);

/// A per-minute quota: at most `per_minute` cells in any 60 s window, of which up to `burst`
/// may go at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    per_minute: NonZeroU32,
    burst: NonZeroU32,
}

impl Limit {
    /// `per_minute` with the default burst, `per_minute / 10` (at least 1).
    pub fn per_minute(per_minute: u32) -> Result<Self, OpenAiError> {
        Self::try_new(per_minute, (per_minute / 10).max(1))
    }

    /// `per_minute` with `burst` cells allowed at once; `1 ≤ burst ≤ per_minute`.
    pub fn try_new(per_minute: u32, burst: u32) -> Result<Self, OpenAiError> {
        let per_minute = NonZeroU32::new(per_minute)
            .ok_or_else(|| OpenAiError::Invalid("must be at least 1, got 0".into()))?;
        let burst = NonZeroU32::new(burst)
            .filter(|b| *b <= per_minute)
            .ok_or_else(|| {
                OpenAiError::Invalid(format!(
                    "burst must be between 1 and the per-minute limit ({per_minute}), got {burst}"
                ))
            })?;
        Ok(Self { per_minute, burst })
    }

    /// Cells per minute.
    pub fn per_minute_limit(&self) -> u32 {
        self.per_minute.get()
    }

    /// Cells allowed at once.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// The governor quota that keeps every 60 s window within `per_minute` (module docs).
    fn quota(&self) -> Quota {
        let replenished = u64::from(self.per_minute.get() - self.burst.get() + 1);
        // Rounded up to the nanosecond, so `replenished` periods are never shorter than a
        // minute (rounding down would let one cell too many into some window).
        let period = Duration::from_nanos((MINUTE.as_nanos() as u64).div_ceil(replenished));
        Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_minute(self.per_minute))
            .allow_burst(self.burst)
    }
}

/// governor's clock read from tokio's [`Instant`] (module docs): nanoseconds since the
/// limiter was made.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.start.elapsed())
    }
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// One limiter (requests or tokens) and its limit.
#[derive(Debug)]
pub(crate) struct RateGate {
    limit: Limit,
    gcra: Gcra,
    clock: TokioClock,
}

impl RateGate {
    /// A full limiter for `limit`, on tokio's clock from now.
    pub(crate) fn new(limit: Limit) -> Self {
        let clock = TokioClock {
            start: Instant::now(),
        };
        Self {
            limit,
            gcra: RateLimiter::direct_with_clock(limit.quota(), clock),
            clock,
        }
    }

    pub(crate) fn limit(&self) -> Limit {
        self.limit
    }

    /// `n` clamped to `1..=burst`: a larger call debits the whole burst (it could never pass
    /// otherwise — governor answers `InsufficientCapacity`).
    pub(crate) fn clamp(&self, n: u64) -> NonZeroU32 {
        let n = n.clamp(1, u64::from(self.limit.burst.get()));
        NonZeroU32::new(n as u32).unwrap_or(self.limit.burst)
    }

    /// Waits until `n` cells (clamped) are available and takes them.
    pub(crate) async fn take(&self, n: u64) {
        let n = self.clamp(n);
        loop {
            match self.gcra.check_n(n) {
                Ok(Ok(())) => return,
                Ok(Err(not_until)) => {
                    tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
                }
                // `clamp` keeps `n` within the burst, so this cannot happen; taking one cell
                // is the closest safe answer if it ever did.
                Err(_) => return self.take_one().await,
            }
        }
    }

    async fn take_one(&self) {
        while let Err(not_until) = self.gcra.check() {
            tokio::time::sleep(not_until.wait_time_from(self.clock.now())).await;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn limits_are_validated() {
        assert!(Limit::per_minute(0).is_err());
        assert!(Limit::try_new(10, 0).is_err());
        assert!(Limit::try_new(10, 11).is_err());
        assert_eq!(Limit::per_minute(300).unwrap().burst(), 30);
        assert_eq!(Limit::per_minute(5).unwrap().burst(), 1);
        let limit = Limit::try_new(300, 30).unwrap();
        assert_eq!(limit.quota().burst_size().get(), 30);
        let period = limit.quota().replenish_interval();
        assert!(period * 271 >= MINUTE && period * 271 < MINUTE + Duration::from_micros(1));
    }

    /// The largest number of `times` (sorted) in any half-open window `[t, t + width)`.
    pub(crate) fn busiest_window(times: &[(Duration, u64)], width: Duration) -> u64 {
        let mut best = 0;
        let mut sum = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            sum += times[hi].1;
            while times[hi].0 - times[lo].0 >= width {
                sum -= times[lo].1;
                lo += 1;
            }
            best = best.max(sum);
        }
        best
    }

    #[test]
    fn busiest_window_counts_half_open_windows() {
        let s = Duration::from_secs;
        let times = [(s(0), 2), (s(30), 1), (s(59), 1), (s(60), 5)];
        assert_eq!(busiest_window(&times, s(60)), 7, "[30, 90) holds 1 + 1 + 5");
        assert_eq!(busiest_window(&times[..3], s(60)), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_replenish_rate_and_never_more_than_the_limit_per_minute() {
        let gate = Arc::new(RateGate::new(Limit::try_new(60, 10).unwrap()));
        let start = Instant::now();
        let granted = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (gate, granted) = (Arc::clone(&gate), Arc::clone(&granted));
            tasks.push(tokio::spawn(async move {
                gate.take(1).await;
                granted.lock().unwrap().push((start.elapsed(), 1));
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut times = granted.lock().unwrap().clone();
        times.sort();
        assert_eq!(
            times.iter().filter(|(t, _)| t.is_zero()).count(),
            10,
            "burst"
        );
        assert_eq!(busiest_window(&times, MINUTE), 60);
        // 190 cells after the burst at 51 per minute (tokio's timer rounds up to the ms).
        let last = times.last().unwrap().0;
        let expected = MINUTE * 190 / 51;
        assert!(
            last >= expected && last <= expected + Duration::from_millis(2),
            "{last:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_larger_than_the_burst_is_clamped_instead_of_failing() {
        let gate = RateGate::new(Limit::try_new(1000, 100).unwrap());
        assert_eq!(gate.clamp(0).get(), 1);
        assert_eq!(gate.clamp(5000).get(), 100);
        let start = Instant::now();
        gate.take(5000).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        gate.take(5000).await;
        // A second full burst takes 100 cells at 901/min.
        let expected = MINUTE * 100 / 901;
        let took = start.elapsed();
        assert!(
            took >= expected && took <= expected + Duration::from_millis(2),
            "{took:?}"
        );
    }
}
