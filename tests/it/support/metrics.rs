//! Samples out of the relay's `/metrics` text exposition, parsed with
//! prometheus-parse.

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
