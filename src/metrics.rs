//! Prometheus metrics: names live here, values are plain atomics updated on
//! the hot paths (the hub adds per batch, not per delivery).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
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
    /// Stream bytes handed to the socket.
    pub bytes_written: Counter,
    /// From the stream storing an event to its frame being handed to the
    /// socket, per write (the oldest live event in it), in seconds.
    pub write_latency: Histogram,
    /// The deepest client queue each delivery batch left, in frames.
    pub queue_depth: Histogram,
    /// How long streams lasted, in seconds, observed when they end.
    pub stream_duration: Histogram,
    pub nats_reconnects: Counter,
    /// Highest stream sequence any shard delivered or saw.
    pub last_sequence_seen: std::sync::atomic::AtomicU64,
    /// The last [`Scrape`] and when it was read: `/metrics` answers anyone,
    /// so what it costs (a directory listing of every socket, a JetStream
    /// request) is paid at most once per [`SCRAPE_REUSE`], whoever asks.
    pub(crate) scrape: tokio::sync::Mutex<Option<(std::time::Instant, Scrape)>>,
}

/// How long one scrape's reading of the process and the stream is reused.
pub(crate) const SCRAPE_REUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Buckets of the publish-to-write latency: 1 ms to 30 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets of stream durations: 1 s to a day.
const DURATION_BUCKETS: [f64; 10] = [
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 10800.0, 43200.0, 86400.0,
];

/// What `/metrics` reads when it is scraped rather than as it happens.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scrape {
    /// The stream's last sequence (None: NATS did not answer).
    pub stream_last: Option<u64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
}

impl Scrape {
    /// The process' resident memory and open file descriptors, from
    /// `/proc/self` (None elsewhere). Counting descriptors lists a
    /// directory of every open socket: call it off the event loop.
    pub fn process() -> Scrape {
        // `VmRSS:   123456 kB` (kB are KiB there).
        let resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map(|kib| kib * 1024);
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64);
        Scrape {
            stream_last: None,
            resident_bytes,
            open_fds,
        }
    }
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
            bytes_written: Counter::default(),
            write_latency: Histogram::new(LATENCY_BUCKETS),
            queue_depth: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            stream_duration: Histogram::new(DURATION_BUCKETS),
            nats_reconnects: Counter::default(),
            last_sequence_seen: Default::default(),
            scrape: Default::default(),
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
    pub fn registry(&self, scrape: &Scrape) -> Registry {
        let mut r = Registry::with_prefix("sse_relay");
        r.register(
            "build",
            "The relay's version",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
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
        r.register(
            "bytes_written",
            "Stream bytes handed to the socket",
            self.bytes_written.clone(),
        );
        r.register_with_unit(
            "publish_to_write",
            "From the stream storing an event (Nats-Time-Stamp) to its frame being handed to the socket",
            prometheus_client::registry::Unit::Seconds,
            self.write_latency.clone(),
        );
        r.register(
            "queue_depth",
            "Deepest client queue after each delivery batch, in frames",
            self.queue_depth.clone(),
        );
        r.register_with_unit(
            "stream_duration",
            "How long SSE streams lasted",
            prometheus_client::registry::Unit::Seconds,
            self.stream_duration.clone(),
        );
        r.register(
            "nats_reconnects",
            "NATS connections re-established after a loss (one per shard)",
            self.nats_reconnects.clone(),
        );
        let seen = self
            .last_sequence_seen
            .load(std::sync::atomic::Ordering::Relaxed);
        r.register(
            "last_sequence_seen",
            "Highest stream sequence the relay delivered or saw",
            Gauge::<i64>::default().tap(seen as i64),
        );
        if let Some(last) = scrape.stream_last {
            r.register(
                "stream_last_sequence",
                "The stream's last sequence, read at scrape time",
                Gauge::<i64>::default().tap(last as i64),
            );
            r.register(
                "stream_lag_events",
                "Events the stream holds beyond the highest sequence the relay has seen",
                Gauge::<i64>::default().tap(last.saturating_sub(seen) as i64),
            );
        }
        if let Some(bytes) = scrape.resident_bytes {
            r.register_with_unit(
                "process_resident_memory",
                "Resident memory of the relay process",
                prometheus_client::registry::Unit::Bytes,
                Gauge::<i64>::default().tap(bytes as i64),
            );
        }
        if let Some(fds) = scrape.open_fds {
            r.register(
                "process_open_fds",
                "Open file descriptors (sockets included) of the relay process",
                Gauge::<i64>::default().tap(fds as i64),
            );
        }
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
    pub fn render(&self, scrape: &Scrape) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry(scrape));
        out
    }
}

/// A gauge set to a value in one expression.
trait Tap {
    fn tap(self, v: i64) -> Self;
}

impl Tap for Gauge<i64> {
    fn tap(self, v: i64) -> Self {
        self.set(v);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family is declared once, and every sample belongs to a declared
    /// family: what `promtool check metrics` and Prometheus' parser hold.
    #[test]
    fn labelled_series_exist_at_zero_with_snake_case_labels() {
        let text = Metrics::default().render(&Scrape::default());
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
        let text = m.render(&Scrape::default());
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
                    || sample.strip_prefix(f.as_str()).is_some_and(|s| [
                        "_total", "_created", "_bucket", "_sum", "_count", "_info"
                    ]
                    .contains(&s))),
                "sample {sample} of no declared family:\n{text}"
            );
        }
    }
}
