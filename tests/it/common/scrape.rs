//! `GET /metrics` parsed: every sample by name and label set, and the label names each metric
//! carries — for tests that check numbers, and for the ones that check that dashboards and
//! alert rules only use what a node serves.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::Node;

/// One sample: the metric name and its labels.
pub type Key = (String, BTreeMap<String, String>);

/// A parsed exposition.
pub struct Scrape {
    pub samples: HashMap<Key, f64>,
    pub text: String,
}

impl Scrape {
    /// Parses the Prometheus text format (the subset the runtime writes: no escaped quotes
    /// or commas in label values, no timestamps).
    pub fn parse(text: String) -> Scrape {
        let mut samples = HashMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                other => other
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in `{line}`")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let labels = body
                        .split(',')
                        .filter(|pair| !pair.is_empty())
                        .map(|pair| {
                            let (k, v) = pair.split_once('=').expect("k=v");
                            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"'));
                            (k.to_string(), v.expect("quoted value").to_string())
                        })
                        .collect();
                    (name.to_string(), labels)
                }
            };
            let previous = samples.insert((name, labels), value);
            assert!(previous.is_none(), "sample listed twice: {line}");
        }
        Scrape { samples, text }
    }

    /// `GET /metrics` of `node` (asserting a 200 in the text format).
    pub async fn of(node: &Node) -> Scrape {
        let response = node.get("/metrics").await;
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Scrape::parse(response.text().await.unwrap())
    }

    /// The sample `name` with exactly `labels`, if present.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples.get(&(name.to_string(), labels)).copied()
    }

    /// The sample `name` of `task` on `queue` (0 when absent).
    pub fn task(&self, name: &str, task: &str, queue: &str) -> f64 {
        self.get(name, &[("task", task), ("queue", queue)])
            .unwrap_or(0.0)
    }

    /// The sum of every `name` sample whose labels include `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, labels), _)| {
                n == name
                    && filter
                        .iter()
                        .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Every metric name sampled, with the label names its samples carry.
    pub fn labels_by_name(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (name, labels) in self.samples.keys() {
            out.entry(name.clone())
                .or_default()
                .extend(labels.keys().cloned());
        }
        out
    }
}
