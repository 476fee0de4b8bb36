//! The resources' series in `GET /metrics` (misconfiguration, breakers, rate limiters), read
//! from their own state at every scrape.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::metrics::Metrics;

use super::Resources;
use super::breaker::BreakerState;

impl Metrics {
    /// Adds breakers and rate limiters of `resources`, read at every scrape.
    pub fn watch_resources(&mut self, resources: Arc<Resources>) {
        self.watch(Box::new(ResourceCollector(resources)));
    }
}

/// Misconfiguration, breakers and rate limiters, read at scrape time.
#[derive(Debug)]
struct ResourceCollector(Arc<Resources>);

impl Collector for ResourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let resources: Vec<_> = self
            .0
            .names()
            .into_iter()
            .filter_map(|name| Some((name, self.0.get(name)?)))
            .collect();
        let auths: Vec<_> = resources
            .iter()
            .filter_map(|(name, r)| Some((*name, r.auth()?.refused().is_some())))
            .collect();
        if !auths.is_empty() {
            let mut m = encoder.encode_descriptor(
                "rt_resource_misconfigured",
                "1 while the resource refuses the node's credentials (it answered 401/403 and no \
                 probe has been accepted since), else 0",
                None,
                MetricType::Gauge,
            )?;
            for (name, refused) in &auths {
                ConstGauge::new(i64::from(*refused))
                    .encode(m.encode_family(&[("resource", *name)])?)?;
            }
        }
        let breakers: Vec<_> = resources
            .iter()
            .filter_map(|(name, r)| Some((*name, r.breaker()?.stats())))
            .collect();
        if !breakers.is_empty() {
            let mut m = encoder.encode_descriptor(
                "rt_breaker_state",
                "1 for the breaker's current state (closed, open, half_open), 0 for the others",
                None,
                MetricType::Gauge,
            )?;
            for (name, stats) in &breakers {
                for state in BreakerState::ALL {
                    let labels = [("resource", *name), ("state", state.as_str())];
                    ConstGauge::new(i64::from(stats.state == state))
                        .encode(m.encode_family(&labels)?)?;
                }
            }
            let mut m = encoder.encode_descriptor(
                "rt_breaker_transitions",
                "Breaker transitions, by the state entered",
                None,
                MetricType::Counter,
            )?;
            for (name, stats) in &breakers {
                for (state, n) in stats.transitions {
                    let labels = [("resource", *name), ("to", state.as_str())];
                    ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
                }
            }
            let mut m = encoder.encode_descriptor(
                "rt_breaker_rejected",
                "Calls refused by the breaker (open, or half-open with every probe slot taken)",
                None,
                MetricType::Counter,
            )?;
            for (name, stats) in &breakers {
                ConstCounter::new(stats.rejected)
                    .encode(m.encode_family(&[("resource", *name)])?)?;
            }
        }
        let limiters: Vec<_> = resources
            .iter()
            .filter_map(|(name, r)| Some((*name, r.limiter()?)))
            .collect();
        if !limiters.is_empty() {
            let mut m = encoder.encode_descriptor(
                "rt_limiter_waiting",
                "Calls waiting for the resource's rate limiters or concurrency cap now",
                None,
                MetricType::Gauge,
            )?;
            for (name, limiter) in &limiters {
                ConstGauge::new(i64::try_from(limiter.waiting).unwrap_or(i64::MAX))
                    .encode(m.encode_family(&[("resource", *name)])?)?;
            }
            let mut m = encoder.encode_descriptor(
                "rt_limiter_wait_seconds",
                "Time calls waited for the rate limiters, the concurrency cap and server holds",
                None,
                MetricType::Histogram,
            )?;
            for (name, limiter) in &limiters {
                limiter
                    .waits
                    .encode(m.encode_family(&[("resource", *name)])?)?;
            }
        }
        Ok(())
    }
}
