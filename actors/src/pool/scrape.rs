//! The pools' series in `GET /metrics` (agents, health, startup failures, claim latency),
//! read from their own state at every scrape.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::metrics::Metrics;

use super::{Pool, PoolHealth};

impl Metrics {
    /// Adds the process pools, read at every scrape.
    pub fn watch_pools(&mut self, pools: Vec<Pool>) {
        if !pools.is_empty() {
            self.watch(Box::new(PoolCollector(pools)));
        }
    }
}

/// Process pools, read at scrape time.
#[derive(Debug)]
struct PoolCollector(Vec<Pool>);

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let stats: Vec<_> = self.0.iter().map(|pool| (pool, pool.stats())).collect();
        let mut m = encoder.encode_descriptor(
            "rt_pool_agents",
            "Live agents per pool and state (starting, idle, assigned, draining)",
            None,
            MetricType::Gauge,
        )?;
        for (pool, stats) in &stats {
            for (state, n) in stats.agents {
                let labels = [("pool", pool.name()), ("state", state.as_str())];
                ConstGauge::new(i64::try_from(n).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "rt_pool_health",
            "1 for the pool's current health (ok, backoff, fatal), 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for (pool, stats) in &stats {
            for health in PoolHealth::ALL {
                let labels = [("pool", pool.name()), ("state", health.as_str())];
                ConstGauge::new(i64::from(stats.health == health))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        let mut m = encoder.encode_descriptor(
            "rt_pool_startup_failures",
            "Agents that failed to start (spawn error, exit before ready, startup_timeout)",
            None,
            MetricType::Counter,
        )?;
        for (pool, stats) in &stats {
            ConstCounter::new(stats.startup_failures)
                .encode(m.encode_family(&[("pool", pool.name())])?)?;
        }
        let mut m = encoder.encode_descriptor(
            "rt_pool_claim_seconds",
            "Time from a claim to a confirmed assignment (successful claims)",
            None,
            MetricType::Histogram,
        )?;
        for (pool, _) in &stats {
            pool.claim_latency()
                .encode(m.encode_family(&[("pool", pool.name())])?)?;
        }
        Ok(())
    }
}
