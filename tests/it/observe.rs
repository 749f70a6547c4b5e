//! What an operator sees: `/metrics` read by Prometheus' own OpenMetrics
//! parser (the Python client's, strict), with the families an SSE relay's
//! operator needs; and the line logged when a stream ends, as JSON, with no
//! token in any line.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// A family's type and its samples as (name, labels, value).
type Family = (String, Vec<(String, Value, f64)>);

/// Parses an OpenMetrics exposition with `prometheus_client`'s parser
/// (`make test` installs it): family name -> (type, samples as
/// (name, labels, value)).
fn parse_openmetrics(text: &str) -> HashMap<String, Family> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = [f.type, [[s.name, s.labels, s.value] for s in f.samples]]
print(json.dumps(out))
"#;
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused /metrics (is prometheus-client installed? `make test` installs it):\n{}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(name, f)| {
            let samples = f[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s[0].as_str().unwrap().to_string(),
                        s[1].clone(),
                        s[2].as_f64().unwrap(),
                    )
                })
                .collect();
            (name.clone(), (f[0].as_str().unwrap().to_string(), samples))
        })
        .collect()
}

/// The value of the sample `name` with no labels (or the `_count` /
/// `_sum` of a histogram).
fn sample(families: &HashMap<String, Family>, name: &str) -> f64 {
    families
        .values()
        .flat_map(|(_, samples)| samples)
        .find(|(n, labels, _)| n == name && labels.as_object().is_none_or(|l| l.is_empty()))
        .unwrap_or_else(|| panic!("no sample {name}"))
        .2
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_openmetrics_and_carry_what_operators_need() {
    within(
        Duration::from_secs(60),
        "metrics_parse_as_openmetrics_and_carry_what_operators_need",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(
                &nats.url(),
                &["--log-format", "json"],
                &[("RUST_LOG", "info,sse_relay::stream=debug")],
            )
            .await;
            let js = async_nats::jetstream::new(nats.client().await);
            let tok = token(SECRET, &["events.obs.>"], 300);
            let first = js_publish(&js, "events.obs.1", Bytes::from("before")).await;
            // A fresh stream, and one that resumes (and ends before the
            // scrape: its end is logged and counted).
            let mut fresh = relay.open_stream(&nats, &tok, &["events.obs.>"]).await;
            let mut c = SseClient::connect(
                relay.addr(),
                &events_path(&["events.obs.>"]),
                &[
                    ("Authorization", &bearer(&tok)),
                    ("Last-Event-ID", &first.to_string()),
                ],
            )
            .await;
            assert_eq!(c.status, 200);
            let mut last = 0;
            for i in 0..5 {
                last = js_publish(&js, "events.obs.1", Bytes::from(format!("e{i}"))).await;
            }
            c.collect_data_events(5, WAIT, "resumed events").await;
            drop(c);
            // One write in 16 is timed: one event at a time, so each is a
            // write of its own.
            for i in 0..(5 + 3 * sse_relay::client::LATENCY_SAMPLE) {
                if i >= 5 {
                    last = js_publish(&js, "events.obs.1", Bytes::from(format!("e{i}"))).await;
                }
                fresh.expect_data_event(WAIT, "live events").await;
            }
            // The stream's end is observed when the relay notices the EOF.
            wait_until(WAIT, "the stream's end is counted", || async {
                relay
                    .metric("sse_relay_stream_duration_seconds_count", &[])
                    .await
                    >= 1.0
            })
            .await;

            let text = relay.get("/metrics", &[]).await.body;
            let f = parse_openmetrics(&text);
            for (family, kind) in [
                ("sse_relay_build", "info"),
                ("sse_relay_bytes_written", "counter"),
                ("sse_relay_publish_to_write_seconds", "histogram"),
                ("sse_relay_queue_depth", "histogram"),
                ("sse_relay_stream_duration_seconds", "histogram"),
                ("sse_relay_nats_reconnects", "counter"),
                ("sse_relay_last_sequence_seen", "gauge"),
                ("sse_relay_stream_last_sequence", "gauge"),
                ("sse_relay_stream_lag_events", "gauge"),
                ("sse_relay_process_resident_memory_bytes", "gauge"),
                ("sse_relay_process_open_fds", "gauge"),
                ("sse_relay_disconnects", "counter"),
            ] {
                let (got, _) = f
                    .get(family)
                    .unwrap_or_else(|| panic!("no family {family} in:\n{text}"));
                assert_eq!(got, kind, "{family}");
            }
            let build = &f["sse_relay_build"].1[0].1;
            assert_eq!(build["version"], env!("CARGO_PKG_VERSION"));
            // 53 writes or more (the resumed stream's coalesce), one in 16
            // timed.
            let timed = sample(&f, "sse_relay_publish_to_write_seconds_count");
            assert!((3.0..=4.0).contains(&timed), "{timed} writes timed");
            let latency = sample(&f, "sse_relay_publish_to_write_seconds_sum");
            assert!(
                latency > 0.0 && latency < 4.0,
                "{timed} loopback deliveries took {latency} s in all"
            );
            assert!(sample(&f, "sse_relay_queue_depth_count") >= 1.0);
            assert!(sample(&f, "sse_relay_bytes_written_total") > 53.0 * 20.0);
            assert_eq!(sample(&f, "sse_relay_last_sequence_seen"), last as f64);
            assert_eq!(sample(&f, "sse_relay_stream_last_sequence"), last as f64);
            assert_eq!(sample(&f, "sse_relay_stream_lag_events"), 0.0);
            assert_eq!(sample(&f, "sse_relay_nats_reconnects_total"), 0.0);
            assert!(sample(&f, "sse_relay_process_resident_memory_bytes") > 1e6);
            assert!(sample(&f, "sse_relay_process_open_fds") > 3.0);
            // Bounded cardinality: no label names a subject, a user or a token.
            for (_, samples) in f.values() {
                for (name, labels, _) in samples {
                    for (k, v) in labels.as_object().unwrap() {
                        let v = v.as_str().unwrap();
                        assert!(
                            !v.contains("events.") && !v.contains(&tok) && v != "test",
                            "{name}{{{k}={v:?}}} carries a subject, token or user"
                        );
                    }
                }
            }

            // One JSON line for the stream's end; no token anywhere.
            let log = relay.log();
            let mut ended = Vec::new();
            for line in log.lines().filter(|l| !l.trim().is_empty()) {
                assert!(!line.contains(&tok), "a token in the log: {line}");
                let v: Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
                if v["fields"]["message"] == "stream ended" {
                    ended.push(v);
                }
            }
            assert_eq!(ended.len(), 1, "one end line:\n{log}");
            let e = &ended[0];
            assert_eq!(e["target"], "sse_relay::stream");
            assert_eq!(e["level"], "DEBUG");
            let fields = &e["fields"];
            assert_eq!(fields["peer"], "127.0.0.1");
            assert_eq!(fields["sub"], "\"test\"");
            assert_eq!(fields["subjects"], "[\"events.obs.>\"]");
            assert_eq!(fields["start"], format!("after {first}"));
            assert_eq!(fields["events"], 5);
            assert!(fields["bytes"].as_u64().unwrap() > 5 * 20);
            assert!(fields["seconds"].as_f64().unwrap() > 0.0);
            assert_eq!(fields["ended"], "client left");
        },
    )
    .await
}

/// Messages the relay's NATS connection has sent (NATS' `/connz`).
async fn relay_in_msgs(nats: &NatsServer) -> u64 {
    let r = http_get(&nats.monitor_addr(), "/connz?limit=100", &[]).await;
    let v: Value = serde_json::from_str(&r.body).expect("/connz is JSON");
    v["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("sse-relay/"))
        })
        .map(|c| c["in_msgs"].as_u64().unwrap_or(0))
        .sum()
}

/// `/metrics` answers anyone: a flood of scrapes costs the stream one
/// request (and the process one descriptor listing) per second, not one
/// each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_scrapes_asks_the_stream_once_a_second() {
    within(
        Duration::from_secs(60),
        "a_flood_of_scrapes_asks_the_stream_once_a_second",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let before = relay_in_msgs(&nats).await;
            let t = std::time::Instant::now();
            for _ in 0..30 {
                let r = relay.get("/metrics", &[]).await;
                assert_eq!(r.status, 200);
                assert!(r.body.contains("sse_relay_stream_last_sequence"));
            }
            let seconds = t.elapsed().as_secs() + 1;
            let asked = relay_in_msgs(&nats).await - before;
            assert!(
                asked <= seconds,
                "30 scrapes in {:?} asked the stream {asked} times",
                t.elapsed()
            );
        },
    )
    .await
}
