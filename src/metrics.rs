//! Prometheus metrics: names live here, values are plain atomics updated on
//! the hot paths (the hub adds per batch, not per delivery).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Source {
    pub source: &'static str,
}

/// Every metric the relay exposes on `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_total: Counter,
    pub disconnects: Family<Reason, Counter>,
    pub refusals: Family<Reason, Counter>,
    pub subscriptions: Gauge,
    pub events_received: Counter,
    pub deliveries: Counter,
    pub replayed: Family<Source, Counter>,
    pub replay_requests: Family<Source, Counter>,
    pub jetstream_requests: Counter,
    pub gaps: Counter,
    pub nats_connected: Gauge,
    pub catchups: Counter,
    pub stream_resets: Counter,
}

impl Default for Metrics {
    /// Every labelled series exists from the start, at zero, so a
    /// dashboard's rate() has a series before the first event.
    fn default() -> Self {
        let m = Metrics {
            connections: Gauge::default(),
            connections_total: Counter::default(),
            disconnects: Family::default(),
            refusals: Family::default(),
            subscriptions: Gauge::default(),
            events_received: Counter::default(),
            deliveries: Counter::default(),
            replayed: Family::default(),
            replay_requests: Family::default(),
            jetstream_requests: Counter::default(),
            gaps: Counter::default(),
            nats_connected: Gauge::default(),
            catchups: Counter::default(),
            stream_resets: Counter::default(),
        };
        for reason in crate::client::EndReason::ALL {
            let _ = m.disconnects.get_or_create(&Reason {
                reason: reason.label(),
            });
        }
        for source in ["memory", "jetstream"] {
            let _ = m.replayed.get_or_create(&Source { source });
            let _ = m.replay_requests.get_or_create(&Source { source });
        }
        m
    }
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("sse_relay");
        r.register("connections", "Open SSE streams", self.connections.clone());
        r.register(
            "connections_opened",
            "SSE streams opened",
            self.connections_total.clone(),
        );
        r.register(
            "disconnects",
            "SSE streams ended by the relay, by reason",
            self.disconnects.clone(),
        );
        r.register(
            "refusals",
            "Requests refused, by reason",
            self.refusals.clone(),
        );
        r.register(
            "subscriptions",
            "Shared NATS subscriptions held",
            self.subscriptions.clone(),
        );
        r.register(
            "events_received",
            "Live events received from NATS",
            self.events_received.clone(),
        );
        r.register(
            "deliveries",
            "Live events queued to clients",
            self.deliveries.clone(),
        );
        r.register(
            "replayed_events",
            "Events replayed to resuming clients, by source (memory or jetstream)",
            self.replayed.clone(),
        );
        r.register(
            "resumes",
            "Resumes served, by source (memory or jetstream)",
            self.replay_requests.clone(),
        );
        r.register(
            "jetstream_requests",
            "JetStream API requests made for replay and catch-up",
            self.jetstream_requests.clone(),
        );
        r.register(
            "gaps",
            "Resumes whose history was partly gone from the stream",
            self.gaps.clone(),
        );
        r.register(
            "nats_connected",
            "NATS connections up (one per shard)",
            self.nats_connected.clone(),
        );
        r.register(
            "catchups",
            "Catch-ups of shared subscriptions after a NATS reconnect or a detected hole",
            self.catchups.clone(),
        );
        r.register(
            "stream_resets",
            "Times the stream was found deleted and created again (sequences restarted)",
            self.stream_resets.clone(),
        );
        r
    }

    /// A resume served from `source` ("memory" or "jetstream") with
    /// `events` replayed: the one place resumes are counted.
    pub fn count_resume(&self, source: &'static str, events: u64) {
        let source = Source { source };
        self.replay_requests.get_or_create(&source).inc();
        self.replayed.get_or_create(&source).inc_by(events);
    }

    /// The content type of [`Metrics::render`]'s output.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Renders the OpenMetrics text exposition (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family is declared once, and every sample belongs to a declared
    /// family: what `promtool check metrics` and Prometheus' parser hold.
    #[test]
    fn labelled_series_exist_at_zero_with_snake_case_labels() {
        let text = Metrics::default().render();
        for series in [
            r#"sse_relay_disconnects_total{reason="evicted_slow"} 0"#,
            r#"sse_relay_disconnects_total{reason="token_expired"} 0"#,
            r#"sse_relay_disconnects_total{reason="shutdown"} 0"#,
            r#"sse_relay_disconnects_total{reason="resync"} 0"#,
            r#"sse_relay_resumes_total{source="memory"} 0"#,
            r#"sse_relay_resumes_total{source="jetstream"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
    }

    #[test]
    fn the_exposition_declares_each_family_once() {
        let m = Metrics::default();
        m.connections.inc();
        m.connections_total.inc();
        m.count_resume("memory", 3);
        m.refusals.get_or_create(&Reason { reason: "x" }).inc();
        let text = m.render();
        assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
        let mut families = std::collections::HashSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let name = line.split_whitespace().nth(2).unwrap();
            assert!(
                families.insert(name.to_string()),
                "{name} declared twice:\n{text}"
            );
        }
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let sample = line.split(['{', ' ']).next().unwrap();
            assert!(
                families.iter().any(|f| sample == f
                    || sample
                        .strip_prefix(f.as_str())
                        .is_some_and(
                            |s| ["_total", "_created", "_bucket", "_sum", "_count"].contains(&s)
                        )),
                "sample {sample} of no declared family:\n{text}"
            );
        }
    }
}
