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
#[derive(Debug, Default)]
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
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("relay");
        r.register("connections", "Open SSE streams", self.connections.clone());
        r.register(
            "connections",
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
        r
    }

    /// A resume served from `source` ("memory" or "jetstream") with
    /// `events` replayed: the one place resumes are counted.
    pub fn count_resume(&self, source: &'static str, events: u64) {
        let source = Source { source };
        self.replay_requests.get_or_create(&source).inc();
        self.replayed.get_or_create(&source).inc_by(events);
    }

    /// Renders the text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}
