//! Samples out of the relay's `/metrics` text exposition, parsed with
//! prometheus-parse.

use super::Relay;

/// The value of the sample `name` whose labels are exactly `labels` (in
/// any order). A sample that is not there reads as 0: a labelled counter
/// appears only once incremented, and its whole family is omitted until
/// then. Tests that rely on a 0 should also see the same family move
/// elsewhere, so a misspelt name cannot pass.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("lines from memory");
    let sample = scrape.samples.iter().find(|s| {
        s.metric == name
            && s.labels.len() == labels.len()
            && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
    });
    match sample.map(|s| &s.value) {
        None => 0.0,
        Some(
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v),
        ) => *v,
        Some(other) => panic!("{name}{labels:?} is not a single number: {other:?}"),
    }
}

impl Relay {
    /// The `GET /metrics` text exposition.
    pub async fn metrics_text(&self) -> String {
        let r = self.get("/metrics", &[]).await;
        assert_eq!(r.status, 200, "GET /metrics: {} {:?}", r.status, r.body);
        r.body
    }

    /// One sample of `/metrics` (see [`metric_value`]), e.g.
    /// `relay.metric("relay_resumes_total", &[("source", "memory")])`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics_text().await, name, labels)
    }
}
