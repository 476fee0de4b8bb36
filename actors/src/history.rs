//! `History`: this node's throughput, wait and run time over the last minutes — a ring buffer
//! the node samples every [`EVERY`] and the live page draws (`GET /stats/history`).
//!
//! # Where the numbers come from
//!
//! Each queue's [`Outcomes`](crate::consumer::Outcomes) on this node — kept by the node across
//! restarts of the queue's consumer, counted by its task actors — holds running totals:
//! outcomes (succeeded, retried, dead) and two [`Timings`], the wait of first attempts (from
//! enqueue, or from the eta when later, to the start: [`Envelope::first_wait`]) and the run
//! time of attempts. A sample is the difference between two readings of those totals, plus
//! the queue's depth read from the broker at the sample (all nodes' entries, not only this
//! node's; `null` when it could not be read within [`DEPTH_TIMEOUT`]).
//!
//! Why not read the Prometheus registry ([`crate::metrics`])? It holds the same observations
//! per task, but the client library does not let the process read its histograms back (their
//! sum and count are test-only there), and the page's history must work with `[metrics]
//! enabled = false` too. The totals here are a few relaxed atomic adds per task.
//!
//! # Wait and run time
//!
//! Each [`Timings`] counts observations in fixed buckets — the bounds of the Prometheus
//! histograms, 1 ms to 5 min (`metrics::SECONDS`) — beside their count and sum. A
//! sample gives the mean and an estimated 95th percentile of what was observed during its
//! interval: the p95 is interpolated inside the bucket that holds it, as Prometheus'
//! `histogram_quantile` does (an estimate, exact to a bucket; past the last bound it is
//! 300 s).
//!
//! # Bounds
//!
//! [`KEEP`] samples (15 minutes at one every 5 s) per node, each with one entry per
//! configured queue: the buffer's size is fixed by the config, never by traffic. A sample
//! costs one `depth` read per queue (Redis: four short commands), nothing per task.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::Serialize;

#[cfg(doc)]
use crate::broker::Envelope;
use crate::broker::{Admin, AnyBroker, QueueDepth, rfc3339};
use crate::metrics::SECONDS;

/// How often the node samples.
pub const EVERY: Duration = Duration::from_secs(5);
/// Samples kept: 15 minutes at [`EVERY`].
pub const KEEP: usize = 180;
/// How long a sample waits for the queue depths before it leaves them out.
pub const DEPTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Buckets of a [`Timings`]: one per bound of [`SECONDS`], and one above the last.
const BUCKETS: usize = SECONDS.len() + 1;

/// Durations observed in fixed buckets (see the module docs), with their count and sum.
#[derive(Debug, Default)]
pub struct Timings {
    count: AtomicU64,
    sum_us: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Timings {
    pub fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let secs = took.as_secs_f64();
        let bucket = SECONDS.iter().position(|bound| secs <= *bound);
        self.count.fetch_add(1, Ordering::Relaxed);
        // Saturating, never wrapping (a u64 of microseconds lasts 584,000 years of run time).
        let _ = (self.sum_us).fetch_update(Ordering::Relaxed, Ordering::Relaxed, |sum| {
            Some(sum.saturating_add(us))
        });
        self.buckets[bucket.unwrap_or(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn totals(&self) -> TimingTotals {
        TimingTotals {
            count: self.count.load(Ordering::Relaxed),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            buckets: std::array::from_fn(|n| self.buckets[n].load(Ordering::Relaxed)),
        }
    }
}

/// A reading of a [`Timings`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimingTotals {
    pub count: u64,
    /// Their sum, in microseconds.
    pub sum_us: u64,
    /// Observations per bucket (not cumulative).
    pub buckets: [u64; BUCKETS],
}

impl TimingTotals {
    /// What was observed between `earlier` and this reading. Totals only grow; a smaller one
    /// (which cannot happen) counts as zero rather than wrapping.
    fn since(&self, earlier: &TimingTotals) -> TimingTotals {
        TimingTotals {
            count: self.count.saturating_sub(earlier.count),
            sum_us: self.sum_us.saturating_sub(earlier.sum_us),
            buckets: std::array::from_fn(|n| self.buckets[n].saturating_sub(earlier.buckets[n])),
        }
    }

    /// The observations of both.
    fn plus(&self, other: &TimingTotals) -> TimingTotals {
        TimingTotals {
            count: self.count.saturating_add(other.count),
            sum_us: self.sum_us.saturating_add(other.sum_us),
            buckets: std::array::from_fn(|n| self.buckets[n].saturating_add(other.buckets[n])),
        }
    }

    /// Count, mean and estimated 95th percentile, in milliseconds.
    fn summary(&self) -> TimingSample {
        let mean_ms = (self.count > 0).then(|| self.sum_us as f64 / self.count as f64 / 1000.0);
        TimingSample {
            count: self.count,
            mean_ms,
            p95_ms: quantile(&self.buckets, 0.95).map(|secs| secs * 1000.0),
        }
    }
}

/// The `q` quantile (0–1) of the observations in `buckets`, in seconds, interpolated inside
/// its bucket as Prometheus' `histogram_quantile` does; `None` without observations. In the
/// bucket above the last bound it is that bound.
fn quantile(buckets: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (n, count) in buckets.iter().enumerate() {
        let through = below + count;
        if *count > 0 && through as f64 >= rank {
            let Some(upper) = SECONDS.get(n) else {
                return SECONDS.last().copied();
            };
            let lower = if n == 0 { 0.0 } else { SECONDS[n - 1] };
            let fraction = (rank - below as f64) / *count as f64;
            return Some(lower + (upper - lower) * fraction.clamp(0.0, 1.0));
        }
        below = through;
    }
    SECONDS.last().copied()
}

/// A reading of one queue's outcome counters on this node
/// ([`Outcomes::totals`](crate::consumer::Outcomes::totals)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Attempts that succeeded.
    pub succeeded: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Tasks dead-lettered.
    pub dead: u64,
    /// Waits of first attempts.
    pub waits: TimingTotals,
    /// Run times of attempts.
    pub runs: TimingTotals,
}

/// Count, mean and estimated p95 of the durations of one interval.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct TimingSample {
    /// Observations in the interval.
    pub count: u64,
    /// Their mean (none without observations).
    pub mean_ms: Option<f64>,
    /// Their estimated 95th percentile (see the module docs).
    pub p95_ms: Option<f64>,
}

/// One queue in one sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QueueSample {
    /// Attempts that succeeded on this node during the interval.
    pub succeeded: u64,
    /// Attempts that failed and were retried.
    pub retried: u64,
    /// Tasks dead-lettered.
    pub dead: u64,
    /// Wait of the first attempts that started.
    pub wait: TimingSample,
    /// Run time of the attempts that ended.
    pub run: TimingSample,
    /// The queue's depth in the broker at the sample (every node's entries); `None` when it
    /// could not be read.
    pub depth: Option<QueueDepth>,
}

impl QueueSample {
    /// What `grown` (the totals' growth over an interval) and `depth` say.
    fn of(grown: &Totals, depth: Option<QueueDepth>) -> Self {
        Self {
            succeeded: grown.succeeded,
            retried: grown.retried,
            dead: grown.dead,
            wait: grown.waits.summary(),
            run: grown.runs.summary(),
            depth,
        }
    }
}

/// One sample: what each queue did since the previous one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// When it was taken (RFC 3339).
    pub at: String,
    /// How long it covers, in milliseconds (the first one: since the node started sampling).
    pub interval_ms: u64,
    /// Every queue together: counts summed, wait and run time over all their observations,
    /// depths summed over the queues whose depth was read (`None` when none was).
    pub all: QueueSample,
    /// By queue name.
    pub queues: BTreeMap<String, QueueSample>,
}

/// What a sampler reads for one queue: its running totals.
pub type Source = Box<dyn Fn() -> Totals + Send + Sync>;

/// The ring buffer of [`Sample`]s; see the module docs.
#[derive(Debug)]
pub struct History {
    keep: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The totals of the previous sample, by queue.
    last: HashMap<String, Totals>,
    /// When the previous sample was taken.
    last_at: Option<SystemTime>,
    samples: VecDeque<Sample>,
}

impl Default for History {
    fn default() -> Self {
        Self::new(KEEP)
    }
}

impl History {
    /// A history that keeps the newest `keep` samples (at least one).
    pub fn new(keep: usize) -> Self {
        Self {
            keep: keep.max(1),
            state: Mutex::default(),
        }
    }

    /// The samples kept, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.lock().samples.iter().cloned().collect()
    }

    /// Appends a sample taken `at` from each queue's `(name, totals, depth)`: the totals'
    /// growth since the previous sample (since zero for the first one). Drops the oldest
    /// sample past `keep`.
    pub fn record(&self, at: SystemTime, readings: Vec<(String, Totals, Option<QueueDepth>)>) {
        let mut state = self.lock();
        let interval = state
            .last_at
            .and_then(|last| at.duration_since(last).ok())
            .unwrap_or(EVERY);
        let mut queues = BTreeMap::new();
        let (mut all, mut all_depth) = (Totals::default(), None::<QueueDepth>);
        for (queue, totals, depth) in readings {
            let last = state.last.get(&queue).copied().unwrap_or_default();
            let grown = Totals {
                succeeded: totals.succeeded.saturating_sub(last.succeeded),
                retried: totals.retried.saturating_sub(last.retried),
                dead: totals.dead.saturating_sub(last.dead),
                waits: totals.waits.since(&last.waits),
                runs: totals.runs.since(&last.runs),
            };
            all = Totals {
                succeeded: all.succeeded.saturating_add(grown.succeeded),
                retried: all.retried.saturating_add(grown.retried),
                dead: all.dead.saturating_add(grown.dead),
                waits: all.waits.plus(&grown.waits),
                runs: all.runs.plus(&grown.runs),
            };
            if let Some(depth) = depth {
                let sum = all_depth.unwrap_or_default();
                all_depth = Some(QueueDepth {
                    ready: sum.ready.saturating_add(depth.ready),
                    delayed: sum.delayed.saturating_add(depth.delayed),
                    in_flight: sum.in_flight.saturating_add(depth.in_flight),
                    dead: sum.dead.saturating_add(depth.dead),
                });
            }
            queues.insert(queue.clone(), QueueSample::of(&grown, depth));
            state.last.insert(queue, totals);
        }
        state.last_at = Some(at);
        if state.samples.len() >= self.keep {
            state.samples.pop_front();
        }
        state.samples.push_back(Sample {
            at: rfc3339(at),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            all: QueueSample::of(&all, all_depth),
            queues,
        });
    }

    /// Samples every `every` until `stop` resolves: each queue's totals from `sources`, its
    /// depth from `broker` (left out when the broker does not answer within
    /// [`DEPTH_TIMEOUT`]). The first sample is taken one period after the start.
    pub async fn run(
        self: Arc<Self>,
        sources: Vec<(String, Source)>,
        broker: Arc<AnyBroker>,
        every: Duration,
        stop: impl Future<Output = ()> + Send,
    ) {
        self.lock().last_at = Some(SystemTime::now());
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticks.tick() => {}
            }
            let depths = tokio::time::timeout(DEPTH_TIMEOUT, async {
                let mut depths = HashMap::new();
                for (queue, _) in &sources {
                    if let Ok(depth) = broker.depth(queue).await {
                        depths.insert(queue.clone(), depth);
                    }
                }
                depths
            })
            .await
            .unwrap_or_default();
            let readings = sources
                .iter()
                .map(|(queue, totals)| (queue.clone(), totals(), depths.get(queue).copied()))
                .collect();
            self.record(SystemTime::now(), readings);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain data: a panic elsewhere while holding the lock leaves nothing half-written
        // that matters more than the history.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::TaskQueue;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn timings_bucket_count_and_sum_what_they_observe() {
        let timings = Timings::default();
        for took in [ms(0), ms(1), ms(3), ms(40), Duration::from_secs(400)] {
            timings.observe(took);
        }
        let totals = timings.totals();
        assert_eq!(totals.count, 5);
        assert_eq!(totals.sum_us, 400_044_000);
        // ≤1 ms: 0 and 1 ms; ≤5 ms: 3 ms; ≤50 ms: 40 ms; above 300 s: 400 s.
        assert_eq!(totals.buckets[0], 2);
        assert_eq!(totals.buckets[2], 1);
        assert_eq!(totals.buckets[5], 1);
        assert_eq!(totals.buckets[BUCKETS - 1], 1);
        // A duration too long for a u64 of microseconds saturates, no panic.
        timings.observe(Duration::MAX);
        assert_eq!(timings.totals().sum_us, u64::MAX);
    }

    #[test]
    fn the_p95_is_interpolated_inside_its_bucket() {
        let mut buckets = [0u64; BUCKETS];
        assert_eq!(quantile(&buckets, 0.95), None);
        // 100 observations between 100 and 250 ms: p95 is 95% of the way through that bucket.
        buckets[7] = 100;
        let p95 = quantile(&buckets, 0.95).unwrap();
        assert!((p95 - (0.1 + 0.15 * 0.95)).abs() < 1e-9, "{p95}");
        // 90 fast ones and 10 slow ones: the p95 is in the slow bucket (1–2.5 s).
        let mut buckets = [0u64; BUCKETS];
        buckets[0] = 90;
        buckets[10] = 10;
        let p95 = quantile(&buckets, 0.95).unwrap();
        assert!((1.0..=2.5).contains(&p95), "{p95}");
        // Above the last bound: the last bound.
        let mut buckets = [0u64; BUCKETS];
        buckets[BUCKETS - 1] = 3;
        assert_eq!(quantile(&buckets, 0.95), Some(300.0));
    }

    #[test]
    fn samples_are_the_growth_since_the_previous_one_and_the_oldest_go() {
        let history = History::new(2);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let waits = Timings::default();
        let mut totals = Totals {
            succeeded: 10,
            retried: 1,
            ..Totals::default()
        };
        waits.observe(ms(20));
        waits.observe(ms(40));
        totals.waits = waits.totals();
        let depth = QueueDepth {
            ready: 7,
            ..QueueDepth::default()
        };
        history.record(t0, vec![("chat".into(), totals, Some(depth))]);
        totals.succeeded = 25;
        totals.dead = 2;
        waits.observe(ms(100));
        totals.waits = waits.totals();
        history.record(t0 + EVERY, vec![("chat".into(), totals, None)]);
        let samples = history.samples();
        assert_eq!(samples.len(), 2);
        let first = &samples[0].queues["chat"];
        assert_eq!((first.succeeded, first.retried, first.dead), (10, 1, 0));
        assert_eq!(first.wait.count, 2);
        assert_eq!(first.wait.mean_ms, Some(30.0));
        assert_eq!(first.depth.map(|d| d.ready), Some(7));
        assert_eq!(first.run.count, 0);
        assert_eq!(first.run.mean_ms, None);
        let second = &samples[1].queues["chat"];
        assert_eq!((second.succeeded, second.retried, second.dead), (15, 0, 2));
        assert_eq!(second.wait.count, 1);
        assert_eq!(second.wait.mean_ms, Some(100.0));
        assert_eq!(second.depth, None);
        assert_eq!(samples[1].interval_ms, 5000);
        assert_eq!(samples[0].all, *first, "one queue: all is that queue");
        assert_eq!(samples[1].at, "2027-01-15T08:00:05.000Z");
        // A third sample pushes the first out.
        history.record(t0 + EVERY * 2, vec![("chat".into(), totals, None)]);
        let samples = history.samples();
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].queues["chat"].succeeded, 15);
        assert_eq!(samples[1].queues["chat"].succeeded, 0);
    }

    #[test]
    fn all_queues_together_sum_counts_and_depths_and_merge_timings() {
        let history = History::new(5);
        let (fast, slow) = (Timings::default(), Timings::default());
        for _ in 0..19 {
            fast.observe(ms(2));
        }
        slow.observe(Duration::from_secs(20));
        let reading = |succeeded, runs: &Timings| Totals {
            succeeded,
            runs: runs.totals(),
            ..Totals::default()
        };
        let depth = |ready| {
            Some(QueueDepth {
                ready,
                ..QueueDepth::default()
            })
        };
        history.record(
            SystemTime::now(),
            vec![
                ("chat".into(), reading(19, &fast), depth(4)),
                ("default".into(), reading(1, &slow), depth(6)),
                ("notes".into(), Totals::default(), None),
            ],
        );
        let all = history.samples()[0].all.clone();
        assert_eq!(all.succeeded, 20);
        assert_eq!(all.run.count, 20);
        assert_eq!(all.run.mean_ms, Some((19.0 * 2.0 + 20_000.0) / 20.0));
        // 19 of 20 at 2 ms: the p95 (rank 19) is still in the fast bucket (≤ 2.5 ms).
        assert!(all.run.p95_ms.unwrap() <= 2.5, "{:?}", all.run);
        assert_eq!(
            all.depth.map(|d| d.ready),
            Some(10),
            "the depths that were read"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_sampler_reads_every_queue_each_period_until_stopped() {
        let broker = Arc::new(AnyBroker::Memory(crate::broker::memory::MemoryBroker::new(
            crate::broker::BrokerSettings::default(),
        )));
        broker
            .enqueue(vec![crate::broker::Envelope::new("t", "chat"); 3])
            .await
            .unwrap();
        let history = Arc::new(History::new(10));
        let count = Arc::new(AtomicU64::new(0));
        let seen = Arc::clone(&count);
        let source: Source = Box::new(move || Totals {
            succeeded: seen.fetch_add(4, Ordering::Relaxed) + 4,
            ..Totals::default()
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let sampler = tokio::spawn(Arc::clone(&history).run(
            vec![("chat".into(), source)],
            Arc::clone(&broker),
            EVERY,
            async {
                let _ = stopped.await;
            },
        ));
        tokio::time::sleep(EVERY * 3 + ms(10)).await;
        drop(stop);
        sampler.await.unwrap();
        let samples = history.samples();
        assert_eq!(samples.len(), 3);
        assert!(samples.iter().all(|s| s.queues["chat"].succeeded == 4));
        assert_eq!(samples[2].queues["chat"].depth.map(|d| d.ready), Some(3));
    }
}
