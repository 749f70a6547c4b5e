//! fanout and many-subjects, once per server under test (`--peers`): the
//! relay, `peer-axum` (also on the republished copies,
//! `peer-axum-republished`), `peer-epoll`. Each run gets a fresh nats-server and
//! stream, the same clients, rate, duration and publisher, a NATS-path
//! probe (`probe.rs`) and per-second latency; the results are one row per
//! server, one JSON object per server and, with `--svg`, one chart.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::peers::{self, Peer};
use crate::probe::{self, Probe};
use crate::procs::RELAY_HEARTBEAT_S;
use crate::publish::{self, PubCtl};
use crate::report::{PerSecond, Report, added_latency, r3};
use crate::scenarios::{connect_clients, drain, note_publish, run_report};
use crate::setup::{Bench, Snap};
use crate::svg::{Series, line_chart};
use crate::{Opts, Scenario};

/// One server's run.
struct Run {
    peer: Peer,
    report: Report,
    per_second: PerSecond,
    /// The NATS-path probe's latency by second.
    probe_per_second: PerSecond,
    pass: bool,
}

/// Runs fanout or many-subjects against every `--peers` server in turn;
/// Ok(true) when none lost an event.
pub(crate) async fn live(opts: &Opts) -> Result<bool, String> {
    let mut runs = Vec::new();
    for &peer in &opts.peers {
        runs.push(run_one(opts, peer).await?);
    }
    let mut report = run_report(opts);
    if let [run] = &runs[..] {
        // One server: the flat layout the harness always printed.
        report.extend(&run.report);
    } else {
        for run in &runs {
            println!("\n{}:", run.peer.name());
            run.report.print_table();
        }
    }
    let pass = runs.iter().all(|r| r.pass);
    if let Some(path) = &opts.svg {
        let title = format!(
            "{}: {} clients, {} msg/s per subject, p99 of each second",
            opts.scenario.name(),
            opts.clients,
            opts.rate.unwrap_or(10.0)
        );
        let p99s: Vec<_> = runs.iter().map(|r| r.per_second.p99_ms()).collect();
        let probes: Vec<_> = runs.iter().map(|r| r.probe_per_second.p99_ms()).collect();
        let names: Vec<_> = runs
            .iter()
            .map(|r| format!("{}: NATS path", r.peer.name()))
            .collect();
        let servers = runs
            .iter()
            .zip(&p99s)
            .enumerate()
            .map(|(i, (r, v))| Series {
                name: r.peer.name(),
                values: v,
                color: i,
                dashed: false,
            });
        let paths = names
            .iter()
            .zip(&probes)
            .enumerate()
            .map(|(i, (n, v))| Series {
                name: n,
                values: v,
                color: i,
                dashed: true,
            });
        let series: Vec<_> = servers.chain(paths).collect();
        std::fs::write(path, line_chart(&title, &series))
            .map_err(|e| format!("--svg {path}: {e}"))?;
        report.set("svg", path.as_str());
    }
    report.set("pass", pass);
    if runs.len() == 1 {
        report.print_table();
    }
    // The JSON line only: one object per server.
    report.set(
        "peers",
        Value::Array(runs.iter().map(|r| r.report.to_json()).collect()),
    );
    print_rows(&runs);
    println!("{}", report.to_json());
    Ok(pass)
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

async fn run_one(opts: &Opts, peer: Peer) -> Result<Run, String> {
    let many = opts.scenario == Scenario::ManySubjects;
    let mut report = Report::default();
    report.set("server", peer.name());
    let relays = if peer == Peer::Relay { opts.relays } else { 0 };
    let mut b = Bench::start(opts, relays).await?;
    let prefix = peer.subject_prefix();
    if peer != Peer::Relay {
        let lifetime = opts.warmup + opts.duration + Duration::from_secs(120);
        let cpu = opts.pin.then_some(0);
        let proc = peers::spawn(
            peer,
            b.port(),
            &b.nats.url,
            RELAY_HEARTBEAT_S,
            lifetime,
            cpu,
        )?;
        b.peer = Some(proc);
    }
    // The relay's ids are stream sequences (round-robin over the subjects);
    // the peers' are the per-subject count.
    let stride = if peer == Peer::Relay && many {
        opts.clients as u64
    } else {
        1
    };
    let rate = opts.rate.unwrap_or(10.0);
    // Every client receives `rate` events a second: time about
    // PROBE_RATE of them (in many-subjects, the probed subjects' clients).
    let timed = probe::sample_step(rate * opts.clients as f64);
    let (mut fleet, ok, failed) = connect_clients(opts, &b, stride, timed, &mut report).await?;
    let subjects = if many { opts.clients } else { 1 };
    let total_rate = rate * subjects as f64;
    let sampled = probe::sampled_subjects(&prefix, subjects, total_rate);
    report.set("rate_per_subject", rate);
    report.set("warmup_s", opts.warmup.as_secs_f64());
    report.set("subjects", subjects as u64);
    report.set("probe_subjects", sampled.len() as u64);
    let probe = Probe::start(&b.nats.url, sampled).await?;

    let s0 = Snap::take(&b, &fleet.pids());
    let ctl = PubCtl::new(total_rate);
    let js = opts.acked.then(|| b.js.clone());
    // The measured window starts after the warm-up: latency counts events
    // published from then on (`report::measured`), seconds count from it.
    let epoch = now_ns() + opts.warmup.as_nanos() as u64;
    fleet.send(&format!("epoch {epoch}"))?;
    probe.set_epoch(epoch);
    let task = tokio::spawn(publish::run(b.client.clone(), js, subjects, ctl.clone()));
    let t0 = Instant::now();
    tokio::time::sleep(opts.warmup + opts.duration).await;
    ctl.stop.store(true, Ordering::Relaxed);
    let rounds = task.await.map_err(|e| e.to_string())?;
    let pub_secs = t0.elapsed().as_secs_f64();
    drain(&mut fleet, rounds * ok, Duration::from_secs(5)).await?;
    let s1 = Snap::take(&b, &fleet.pids());
    let seen = probe.finish().await;
    let totals = fleet.finish(rounds).await?;
    note_publish(&b, &ctl, opts, &mut report).await;
    report.set("expected_per_client", rounds);
    report.set("deliveries", totals.received);
    report.set("deliveries_per_s", r3(totals.received as f64 / pub_secs));
    report.set("latency", totals.hist.summary_ms());
    report.set("probe_latency", seen.hist.summary_ms());
    let added = added_latency(&totals.arrivals, &seen.arrivals, epoch);
    report.set("added_latency", added.hist.summary_ms());
    report.set("added_p99_per_s_ms", json!(added.per_second.p99_ms()));
    report.set("added_unpaired", added.unpaired);
    // The figure given before arrivals were paired, for comparison.
    let apart = (totals.hist.quantile(0.99) as f64 - seen.hist.quantile(0.99) as f64) / 1000.0;
    report.set("p99_minus_probe_p99_ms", r3(apart));
    report.set("events_lost", totals.lost);
    report.set("events_duplicated_or_extra", totals.excess);
    report.set("gaps", totals.gaps);
    report.set("connections_dropped", totals.closed);
    let pass = failed == 0 && totals.lost == 0 && totals.gaps == 0;
    s0.report(&s1, &mut report);
    let p99s = totals.per_second.p99_ms();
    report.set("p99_per_s_ms", json!(p99s));
    report.set("probe_p99_per_s_ms", json!(seen.per_second.p99_ms()));
    report.set("relay_rss_end_kib", b.relay_rss_kib());
    b.note_relay_logs(&mut report);
    if let Some(st) = b.peer.as_mut().and_then(|p| p.exited()) {
        report.set("server_exit", st.to_string());
    }
    if peer != Peer::Relay {
        // Same keys, named for what they measure here.
        report.rename_prefix("relay_", "server_");
    }
    Ok(Run {
        peer,
        report,
        per_second: totals.per_second,
        probe_per_second: seen.per_second,
        pass,
    })
}

/// The side-by-side table: one row per server.
fn print_rows(runs: &[Run]) {
    println!();
    println!(
        "{:<11} {:>10} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>6}",
        "server",
        "deliv/s",
        "p50 ms",
        "p99",
        "p99.9",
        "max",
        "probe50",
        "probe99",
        "added50",
        "added99",
        "user us",
        "sys us",
        "harn s",
        "lost"
    );
    for r in runs {
        let g = |k: &str| r.report.get(k).cloned().unwrap_or(Value::Null);
        let f = |v: Value| v.as_f64().unwrap_or(0.0);
        let (lat, probe, added) = (g("latency"), g("probe_latency"), g("added_latency"));
        let deliveries = f(g("deliveries")).max(1.0);
        let cpu = |k: &str| {
            let v = f(g(&format!("relay_{k}"))).max(f(g(&format!("server_{k}"))));
            v * 1e6 / deliveries
        };
        println!(
            "{:<11} {:>10.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>8.2} {:>8.2} {:>8.2} {:>8.2} | {:>8.2} {:>8.2} {:>8.2} | {:>6}",
            r.peer.name(),
            f(g("deliveries_per_s")),
            f(lat["p50_ms"].clone()),
            f(lat["p99_ms"].clone()),
            f(lat["p999_ms"].clone()),
            f(lat["max_ms"].clone()),
            f(probe["p50_ms"].clone()),
            f(probe["p99_ms"].clone()),
            f(added["p50_ms"].clone()),
            f(added["p99_ms"].clone()),
            cpu("cpu_user_s"),
            cpu("cpu_sys_s"),
            f(g("harness_cpu_s")),
            g("events_lost"),
        );
    }
}
