//! Resume scenarios: a reconnect storm served from the relay's memory, and a
//! cold start (relay spawned after the events were stored).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::Opts;
use crate::fleet::{Fleet, FleetSpec, latest_at, sum};
use crate::procs::{self, Relay};
use crate::publish;
use crate::report::{Report, r3};
use crate::setup::{Bench, Snap};

const STORM_EVENTS: u64 = 1_000;
const COLD_EVENTS: u64 = 100;
const COLD_BACK: u64 = 50;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

const METRICS: [(&str, &str); 4] = [
    (
        "resumes_memory",
        "sse_relay_resumes_total{source=\"memory\"}",
    ),
    (
        "resumes_jetstream",
        "sse_relay_resumes_total{source=\"jetstream\"}",
    ),
    ("jetstream_requests", "sse_relay_jetstream_requests_total"),
    (
        "replayed_events_memory",
        "sse_relay_replayed_events_total{source=\"memory\"}",
    ),
];

pub(crate) async fn storm(opts: &Opts) -> Result<bool, String> {
    let back = opts.back.min(STORM_EVENTS);
    let mut report = Report::default();
    report.set("scenario", "storm");
    report.set("clients", opts.clients as u64);
    report.set("relays", opts.relays as u64);
    report.set("pinned", opts.pin);
    report.set("workers", opts.workers as u64);
    report.set("back", back);
    let mut b = Bench::start(opts, opts.relays).await?;

    // One client keeps events.bench.0 subscribed, so the window fills.
    let mut keep_spec = FleetSpec::new(b.port(), &b.token, 1, 1);
    keep_spec.first = opts.clients;
    keep_spec.expect = STORM_EVENTS;
    let mut keeper = Fleet::spawn(&keep_spec).await?;
    keeper.send("go")?;
    keeper
        .wait_all("connected", Duration::from_secs(10))
        .await?;
    let last = publish::publish_acked(&b.js, STORM_EVENTS).await?;
    keeper.wait_all("done", Duration::from_secs(20)).await?;
    report.set("stored_last_seq", last);

    let mut spec = FleetSpec::new(b.port(), &b.token, opts.clients, opts.per_worker);
    spec.last_id = Some(last - back);
    spec.expect = back;
    spec.concurrency = opts.connect_concurrency_storm;
    // A stream the relay ends is resumed, as EventSource would.
    spec.retry = true;
    let mut fleet = Fleet::spawn(&spec).await?;
    report.set("client_processes", fleet.len() as u64);
    let m0 = b.metrics();
    let rss0 = b.relay_rss_kib();
    let s0 = Snap::take(&b, &fleet.pids());
    let t0 = now_ns();
    fleet.send("go")?;
    let limit = Duration::from_secs(60 + opts.clients as u64 / 200);
    let conn = fleet.wait_all("connected", limit).await?;
    let connected_ms = (latest_at(&conn).saturating_sub(t0)) as f64 / 1e6;
    let failed = sum(&conn, "failed");
    let done = if failed == 0 {
        fleet.wait_all("done", limit).await.ok()
    } else {
        None
    };
    let s1 = Snap::take(&b, &fleet.pids());
    // Anything beyond the `back` events would show up now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let totals = fleet.finish(back).await?;
    let _ = keeper.finish(STORM_EVENTS).await;
    let m1 = b.metrics();
    report.set("connections", sum(&conn, "ok"));
    report.set("connect_failures", failed);
    report.set("all_connected_ms", r3(connected_ms));
    match &done {
        Some(d) => report.set(
            "all_caught_up_ms",
            r3(latest_at(d).saturating_sub(t0) as f64 / 1e6),
        ),
        None => report.set("all_caught_up_ms", "never"),
    }
    report.set("replayed_received", totals.received);
    report.set("events_lost", totals.lost);
    report.set("events_duplicated_or_extra", totals.excess);
    report.set("gaps", totals.gaps);
    report.set("control_events", totals.control);
    report.set("reconnects", totals.reconnects);
    for (name, series) in METRICS {
        let d = procs::metric(&m1, series) - procs::metric(&m0, series);
        report.set(&format!("{name}_delta"), d);
    }
    if opts.relays > 1 {
        report.set(
            "metrics_note",
            "metrics come from whichever relay answered GET /metrics",
        );
    }
    report.set("relay_rss_before_kib", rss0);
    report.set("relay_rss_after_kib", b.relay_rss_kib());
    s0.report(&s1, &mut report);
    if !totals.errors.is_empty() {
        report.set("client_errors", json!(totals.errors));
    }
    b.note_relay_logs(&mut report);
    let pass =
        failed == 0 && done.is_some() && totals.lost == 0 && totals.excess == 0 && totals.gaps == 0;
    report.set("pass", pass);
    report.print();
    Ok(pass)
}

pub(crate) async fn cold_start(opts: &Opts) -> Result<bool, String> {
    let mut report = Report::default();
    report.set("scenario", "cold-start");
    report.set("pinned", opts.pin);
    report.set("workers", opts.workers as u64);
    let mut b = Bench::start(opts, 0).await?;
    let last = publish::publish_acked(&b.js, COLD_EVENTS).await?;
    report.set("stored_last_seq", last);

    let mut spec = FleetSpec::new(b.port(), &b.token, 1, 1);
    spec.last_id = Some(last - COLD_BACK);
    spec.expect = COLD_BACK;
    spec.retry = true;
    let mut fleet = Fleet::spawn(&spec).await?;
    fleet.send("go")?;
    // Let the client start knocking on the closed port.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let t0 = now_ns();
    let spawned = Instant::now();
    let relay = Relay::spawn(&b.spec, 0, b.dir.path())?;
    b.relays.push(relay);
    let done = fleet.wait_all("done", Duration::from_secs(30)).await;
    let elapsed_ms = match &done {
        Ok(d) => r3(latest_at(d).saturating_sub(t0) as f64 / 1e6),
        Err(_) => -1.0,
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let totals = fleet.finish(COLD_BACK).await?;
    report.set("spawn_to_events_ms", elapsed_ms);
    report.set(
        "wall_since_spawn_ms",
        r3(spawned.elapsed().as_secs_f64() * 1e3),
    );
    report.set("received", totals.received);
    report.set("events_lost", totals.lost);
    report.set("events_duplicated_or_extra", totals.excess);
    report.set("gaps", totals.gaps);
    report.set("relay_rss_kib", b.relay_rss_kib());
    // Where the start-up time goes, from the relay's log timestamps.
    let log = std::fs::read_to_string(&b.relays[0].log).unwrap_or_default();
    for (key, needle) in [
        ("log_listening_ms", "listening"),
        ("log_nats_connected_ms", "nats connected"),
        ("log_stream_ready_ms", "stream ready"),
    ] {
        if let Some(at) = log_time_ns(&log, needle) {
            // Log times are UTC time of day; t0 is unix time.
            let day = 86_400 * 1_000_000_000u64;
            let ms = (at + day - t0 % day) % day;
            report.set(key, r3(ms as f64 / 1e6));
        }
    }
    let m = b.metrics();
    for (name, series) in METRICS {
        report.set(name, procs::metric(&m, series));
    }
    b.note_relay_logs(&mut report);
    let pass = done.is_ok() && totals.lost == 0 && totals.excess == 0 && totals.gaps == 0;
    report.set("pass", pass);
    report.print();
    Ok(pass)
}

/// Time of day (nanos, UTC) of the first log line containing `needle`; the
/// line starts like `2026-11-25T02:04:00.044077Z`.
fn log_time_ns(log: &str, needle: &str) -> Option<u64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: u64 = parts.next()?.parse().ok()?;
    let m: u64 = parts.next()?.parse().ok()?;
    let secs: f64 = parts.next()?.parse().ok()?;
    Some((h * 3600 + m * 60) * 1_000_000_000 + (secs * 1e9) as u64)
}
