//! The live scenarios idle and saturate, and what they share with fanout
//! and many-subjects (`compare.rs`): the set-up (N connections, the
//! server's RSS before/after), draining, the publisher's figures.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fleet::{Fleet, FleetSpec, sum};
use crate::publish::{self, PubCtl};
use crate::report::{Hist, Report, r3};
use crate::setup::{Bench, Snap};
use crate::{Opts, Scenario};

/// The keys every live scenario's report starts with.
pub(crate) fn run_report(opts: &Opts) -> Report {
    let mut report = Report::default();
    report.set("scenario", opts.scenario.name());
    report.set("clients", opts.clients as u64);
    report.set("relays", opts.relays as u64);
    report.set("pinned", opts.pin);
    report.set("client_queue", opts.client_queue as u64);
    report.set("workers", opts.workers as u64);
    report
}

/// Runs idle or saturate; Ok(true) when nothing was lost. (fanout and
/// many-subjects run per server under test: `compare::live`.)
pub(crate) async fn live(opts: &Opts) -> Result<bool, String> {
    let mut report = run_report(opts);
    let mut b = Bench::start(opts, opts.relays).await?;
    let (mut fleet, ok, failed) = connect_clients(opts, &b, 1, 0, &mut report).await?;
    let s0 = Snap::take(&b, &fleet.pids());
    let mut pass = failed == 0;
    match opts.scenario {
        Scenario::Idle => {
            tokio::time::sleep(opts.duration).await;
            let s1 = Snap::take(&b, &fleet.pids());
            let totals = fleet.finish(0).await?;
            report.set("connections_dropped", totals.closed);
            pass &= totals.closed == 0;
            s0.report(&s1, &mut report);
        }
        Scenario::Saturate => {
            saturate(opts, &b, &mut fleet, ok, &mut report).await?;
            let s1 = Snap::take(&b, &fleet.pids());
            s0.report(&s1, &mut report);
            pass = true;
        }
        _ => unreachable!("not idle or saturate"),
    }
    report.set("relay_rss_end_kib", b.relay_rss_kib());
    b.note_relay_logs(&mut report);
    report.set("pass", pass);
    report.print();
    Ok(pass)
}

/// Opens `--clients` connections to `b`'s port (client i on
/// events.bench.<i> in many-subjects, else all on events.bench.0; ids
/// expected `stride` apart; every `sample_every`-th recording its
/// arrivals, 0: none) and
/// reports the connects and the server's RSS before and after.
pub(crate) async fn connect_clients(
    opts: &Opts,
    b: &Bench,
    stride: u64,
    sample_every: usize,
    report: &mut Report,
) -> Result<(Fleet, u64, u64), String> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss0 = b.relay_rss_kib();

    let mut spec = FleetSpec::new(b.port(), &b.token, opts.clients, opts.per_worker);
    spec.subject_each = opts.scenario == Scenario::ManySubjects;
    spec.stride = stride;
    spec.concurrency = opts.connect_concurrency;
    spec.sample_every = sample_every;
    let mut fleet = Fleet::spawn(&spec).await?;
    report.set("client_processes", fleet.len() as u64);
    let t = Instant::now();
    fleet.send("go")?;
    let limit = Duration::from_secs(60 + opts.clients as u64 / 500);
    let conn = fleet.wait_all("connected", limit).await?;
    let (ok, failed) = (sum(&conn, "ok"), sum(&conn, "failed"));
    report.set("connect_s", r3(t.elapsed().as_secs_f64()));
    report.set("connections", ok);
    report.set("connect_failures", failed);
    if failed > 0 {
        let errs: Vec<_> = conn
            .iter()
            .flat_map(|v| v["errors"].clone().as_array().cloned().unwrap_or_default())
            .take(5)
            .collect();
        report.set("connect_errors", json!(errs));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = b.relay_rss_kib();
    report.set("relay_rss_before_kib", rss0);
    report.set("relay_rss_after_connect_kib", rss1);
    if opts.relays > 1 {
        report.set("relay_rss_each_kib", json!(b.relay_rss_each()));
    }
    let per_conn = (rss1.saturating_sub(rss0) * 1024) as f64 / ok.max(1) as f64;
    report.set("relay_rss_per_conn_bytes", r3(per_conn));

    Ok((fleet, ok, failed))
}

/// Polls the workers until they hold `total` events or `limit` passes.
pub(crate) async fn drain(fleet: &mut Fleet, total: u64, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        let (received, _, _) = fleet.stats().await?;
        if received >= total || Instant::now() >= deadline {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn note_publish(b: &Bench, ctl: &Arc<PubCtl>, opts: &Opts, report: &mut Report) {
    report.set("published", ctl.sent());
    report.set("stored_last_seq", b.last_seq().await);
    report.set(
        "publish_errors",
        ctl.publish_errors.load(Ordering::Relaxed) + ctl.ack_errors.load(Ordering::Relaxed),
    );
    if opts.acked {
        report.set("acked", ctl.acked.load(Ordering::Relaxed));
    }
}

/// Allowance for the fan-out of the newest events when judging a step.
const LAG: Duration = Duration::from_millis(500);

/// Steps the rate up x1.5 every 3 s until deliveries fall behind (received
/// < 90 % of expected in a step, median latency over 200 ms, or evictions).
async fn saturate(
    opts: &Opts,
    b: &Bench,
    fleet: &mut Fleet,
    clients: u64,
    report: &mut Report,
) -> Result<(), String> {
    let step = Duration::from_secs(3);
    let mut rate = opts
        .rate
        .unwrap_or_else(|| (20_000.0 / clients.max(1) as f64).max(1.0));
    let ctl = PubCtl::new(rate);
    let js = opts.acked.then(|| b.js.clone());
    let task = tokio::spawn(publish::run(b.client.clone(), js, 1, ctl.clone()));
    let start = Instant::now();
    let (mut prev_recv, mut prev_sent, mut prev_t) = (0u64, 0u64, Instant::now());
    let mut prev_snap = Snap::take(b, &fleet.pids());
    let mut steps = Vec::new();
    let (mut best, mut best_rate) = (0.0f64, 0.0f64);
    let mut limit_reason = "duration reached before falling behind".to_string();
    loop {
        // Events published in the last LAG are still being fanned out; the
        // step is judged on what was published up to LAG before its end.
        let mut samples = Vec::new();
        let step_end = Instant::now() + step;
        while Instant::now() < step_end {
            samples.push((Instant::now(), ctl.sent()));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (recv, closed, hist): (u64, u64, Hist) = fleet.stats().await?;
        let cutoff = Instant::now() - LAG;
        let sent = samples
            .iter()
            .rev()
            .find(|(t, _)| *t <= cutoff)
            .map_or(prev_sent, |(_, n)| *n);
        let secs = prev_t.elapsed().as_secs_f64();
        prev_t = Instant::now();
        let expected = sent.saturating_sub(prev_sent) * clients;
        let got = recv - prev_recv;
        let (exp_s, got_s) = (expected as f64 / secs, got as f64 / secs);
        let p50 = hist.quantile(0.5);
        let snap = Snap::take(b, &fleet.pids());
        let (relay_pct, clients_pct) = prev_snap.pct(&snap);
        prev_snap = snap;
        steps.push(
            json!({"rate": r3(rate), "published_per_s": r3(sent.saturating_sub(prev_sent) as f64 / secs),
            "expected_per_s": r3(exp_s), "received_per_s": r3(got_s),
            "p50_ms": r3(p50 as f64 / 1000.0), "p99_ms": r3(hist.quantile(0.99) as f64 / 1000.0),
            "dropped_connections": closed}),
        );
        println!(
            "step rate {rate:>8.1}/s  expected {exp_s:>9.0}/s  received {got_s:>9.0}/s  p50 {:>7.2} ms  dropped {closed}  cpu relay {relay_pct:.0}% clients {clients_pct:.0}%",
            p50 as f64 / 1000.0
        );
        (prev_recv, prev_sent) = (recv, sent.max(prev_sent));
        // Judged cumulatively: a step that receives late events of the step
        // before is not penalised twice.
        if (recv as f64) < 0.9 * (sent * clients) as f64 {
            limit_reason = format!("received {got_s:.0}/s < 90% of expected {exp_s:.0}/s");
            break;
        }
        if p50 > 200_000 {
            limit_reason = format!("median latency {} ms > 200 ms", p50 / 1000);
            break;
        }
        if closed > 0 {
            limit_reason = format!("{closed} slow clients dropped");
            break;
        }
        if got_s > best {
            (best, best_rate) = (got_s, rate);
        }
        if start.elapsed() + step > opts.duration {
            break;
        }
        rate *= 1.5;
        ctl.set_rate(rate);
    }
    ctl.stop.store(true, Ordering::Relaxed);
    let rounds = task.await.map_err(|e| e.to_string())?;
    drain(fleet, rounds * clients, Duration::from_secs(3)).await?;
    let totals = fleet.finish(rounds).await?;
    report.set("steps", json!(steps));
    report.set("limit", limit_reason);
    report.set("best_sustained_deliveries_per_s", r3(best));
    report.set("best_sustained_rate_msgs_per_s", r3(best_rate));
    report.set("latency_all_steps", totals.hist.summary_ms());
    report.set("events_lost", totals.lost);
    report.set("connections_dropped", totals.closed);
    note_publish(b, &ctl, opts, report).await;
    Ok(())
}
