//! The drain scenario: two relays share the port, every client on
//! events.bench.0 with reconnects on; one relay gets SIGTERM. Its clients
//! come back (to the other relay: the drained one no longer listens) over
//! the drain period, resume by Last-Event-ID and lose nothing. Reports the
//! reconnects per 100 ms after the signal and the largest share any
//! one-second window holds.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::Opts;
use crate::fleet::{Fleet, FleetSpec, sum};
use crate::publish::{self, PubCtl};
use crate::report::{Report, r3};
use crate::setup::Bench;

/// The relay's default `--drain-seconds` (the harness does not change it).
const DRAIN: Duration = Duration::from_secs(sse_relay::config::DEFAULT_DRAIN_SECS);
/// Most of the reconnects any one second may hold.
const MAX_SHARE: f64 = 0.40;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) async fn drain(opts: &Opts) -> Result<bool, String> {
    let mut report = Report::default();
    report.set("scenario", "drain");
    report.set("clients", opts.clients as u64);
    report.set("relays", 2u64);
    report.set("workers", opts.workers as u64);
    report.set("drain_s", DRAIN.as_secs());
    let mut b = Bench::start(opts, 2).await?;

    let mut spec = FleetSpec::new(b.port(), &b.token, opts.clients, opts.per_worker);
    spec.retry = true;
    spec.concurrency = opts.connect_concurrency;
    let mut fleet = Fleet::spawn(&spec).await?;
    fleet.send("go")?;
    let limit = Duration::from_secs(60 + opts.clients as u64 / 500);
    let conn = fleet.wait_all("connected", limit).await?;
    let (ok, failed) = (sum(&conn, "ok"), sum(&conn, "failed"));
    report.set("connections", ok);
    report.set("connect_failures", failed);

    let rate = opts.rate.unwrap_or(10.0);
    report.set("rate", rate);
    let ctl = PubCtl::new(rate);
    let js = opts.acked.then(|| b.js.clone());
    let task = tokio::spawn(publish::run(b.client.clone(), js, 1, ctl.clone()));
    tokio::time::sleep(Duration::from_secs(2)).await;

    // SIGTERM the first relay; the second keeps the port.
    let drained = b.relays[0].proc.pid();
    let term_ms = now_ms();
    let t = Instant::now();
    let st = std::process::Command::new("kill")
        .args(["-TERM", &drained.to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("kill -TERM {drained} failed"));
    }
    let exit = loop {
        if let Some(st) = b.relays[0].proc.exited() {
            break Some(st);
        }
        if t.elapsed() > DRAIN + Duration::from_secs(10) {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    report.set("drained_relay_exit_s", r3(t.elapsed().as_secs_f64()));
    report.set(
        "drained_relay_exit",
        exit.map_or("still running".to_string(), |s| s.to_string()),
    );
    // Every client back (retry of up to 1.5 x 2 s after the last close),
    // then a little more live traffic.
    tokio::time::sleep(Duration::from_secs(5)).await;
    ctl.stop.store(true, Ordering::Relaxed);
    let rounds = task.await.map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let (received, _, _) = fleet.stats().await?;
        if received >= rounds * ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = b.metrics();
    let pick: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && [
                    "connections ",
                    "resumes_total",
                    "refusals_total",
                    "disconnects_total{reason=\"evicted",
                    "jetstream_requests",
                    "catchups",
                    "gaps_total",
                ]
                .iter()
                .any(|k| l.contains(k))
        })
        .collect();
    report.set("remaining_relay_metrics", json!(pick));
    let totals = fleet.finish(rounds).await?;

    // Reconnects per 100 ms after the signal.
    let mut bins = vec![0u64; 0];
    for &at in &totals.reconnect_ms {
        let bin = (at.saturating_sub(term_ms) / 100) as usize;
        if bins.len() <= bin {
            bins.resize(bin + 1, 0);
        }
        bins[bin] += 1;
    }
    let total: u64 = bins.iter().sum();
    let max_second = (0..bins.len())
        .map(|i| bins[i..(i + 10).min(bins.len())].iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    let share = max_second as f64 / total.max(1) as f64;
    let first = bins.iter().position(|&n| n > 0).unwrap_or(0);
    let last = bins.iter().rposition(|&n| n > 0).unwrap_or(0);
    report.set("reconnects", total);
    report.set("reconnects_first_s", r3(first as f64 / 10.0));
    report.set("reconnects_last_s", r3(last as f64 / 10.0));
    report.set("reconnects_max_1s_share", r3(share));
    report.set("reconnects_per_100ms", json!(bins));
    report.set("expected_per_client", rounds);
    report.set(
        "last_id_min_max",
        json!([totals.min_last_id, totals.max_last_id]),
    );
    report.set("stored_last_seq", b.last_seq().await);
    report.set("events_lost", totals.lost);
    report.set("events_duplicated_or_extra", totals.excess);
    report.set("gaps", totals.gaps);
    let pass = failed == 0
        && totals.lost == 0
        && totals.excess == 0
        && totals.gaps == 0
        && total > 0
        && share <= MAX_SHARE
        && exit.is_some_and(|s| s.success());
    b.note_relay_logs(&mut report);
    if let Ok(keep) = std::env::var("LOAD_KEEP_LOGS") {
        for (i, r) in b.relays.iter().enumerate() {
            let _ = std::fs::copy(&r.log, format!("{keep}/relay-{i}.log"));
        }
    }
    report.set("pass", pass);
    report.print();
    Ok(pass)
}
