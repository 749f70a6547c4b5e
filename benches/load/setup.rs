//! One run's environment: temp dir, nats-server, the EVENTS stream, relays,
//! a token; and CPU/RSS snapshots of the processes involved.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde_json::json;
use tempfile::TempDir;

use crate::Opts;
use crate::procs::{self, Nats, Proc, Relay, RelaySpec};
use crate::report::{Report, r3};

pub(crate) const SECRET: &str = "load-bench-secret-0123456789abcdef";

pub(crate) struct Bench {
    pub(crate) dir: TempDir,
    pub(crate) nats: Nats,
    pub(crate) relays: Vec<Relay>,
    /// A peer server run instead of the relays (`--peers`).
    pub(crate) peer: Option<Proc>,
    pub(crate) spec: RelaySpec,
    pub(crate) token: String,
    pub(crate) client: async_nats::Client,
    pub(crate) js: jetstream::Context,
}

impl Bench {
    /// nats-server, the stream and (unless `relays` is 0) the relays, ready.
    pub(crate) async fn start(opts: &Opts, relays: usize) -> Result<Bench, String> {
        if relays > 0 {
            procs::relay_binary()?;
        }
        let dir = tempfile::Builder::new()
            .prefix("sse-relay-load-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let nats = Nats::start(opts.pin.then_some(1))?;
        let client = async_nats::connect(&nats.url)
            .await
            .map_err(|e| format!("connect to {}: {e}", nats.url))?;
        let js = jetstream::new(client.clone());
        js.get_or_create_stream(sse_relay::default_stream_config("EVENTS"))
            .await
            .map_err(|e| format!("create stream: {e}"))?;
        let token = sse_relay::auth::sign_hs256(
            SECRET.as_bytes(),
            vec!["events.bench.>".into()],
            Duration::from_secs(3 * 3600),
            Some("load".into()),
        )
        .map_err(|e| e.to_string())?;
        let spec = RelaySpec {
            port: procs::free_port()?,
            nats_url: nats.url.clone(),
            secret: SECRET.into(),
            client_queue: opts.client_queue,
            workers: opts.workers,
            cpu: opts.pin.then_some(0),
        };
        let mut b = Bench {
            dir,
            nats,
            relays: Vec::new(),
            peer: None,
            spec,
            token,
            client,
            js,
        };
        for _ in 0..relays {
            b.add_relay()?;
        }
        Ok(b)
    }

    pub(crate) fn add_relay(&mut self) -> Result<(), String> {
        let i = self.relays.len();
        let mut r = Relay::spawn(&self.spec, i, self.dir.path())?;
        r.wait_ready(self.spec.workers, Duration::from_secs(20))?;
        self.relays.push(r);
        Ok(())
    }

    pub(crate) fn port(&self) -> u16 {
        self.spec.port
    }

    pub(crate) fn relay_pids(&self) -> Vec<u32> {
        self.relays.iter().map(|r| r.proc.pid()).collect()
    }

    /// The server processes under test: the relays, or the peer.
    pub(crate) fn server_pids(&self) -> Vec<u32> {
        let mut pids = self.relay_pids();
        pids.extend(self.peer.as_ref().map(Proc::pid));
        pids
    }

    /// Summed VmRSS of the servers under test (the relays), KiB.
    pub(crate) fn relay_rss_kib(&self) -> u64 {
        self.server_pids().into_iter().map(procs::rss_kib).sum()
    }

    /// VmRSS of each relay, KiB.
    pub(crate) fn relay_rss_each(&self) -> Vec<u64> {
        self.relay_pids().into_iter().map(procs::rss_kib).collect()
    }

    pub(crate) fn metrics(&self) -> String {
        procs::http_get(self.port(), "/metrics").unwrap_or_default()
    }

    /// Stream's last sequence (a fresh server: the number stored).
    pub(crate) async fn last_seq(&self) -> u64 {
        match self.js.get_stream("EVENTS").await {
            Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
            Err(_) => 0,
        }
    }

    pub(crate) fn note_relay_logs(&mut self, report: &mut Report) {
        let mut exits = Vec::new();
        for r in &mut self.relays {
            if let Some(st) = r.proc.exited() {
                exits.push(st.to_string());
                eprintln!("relay {} exited ({st}); log tail:", r.proc.pid());
                let text = std::fs::read_to_string(&r.log).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                for l in &lines[lines.len().saturating_sub(20)..] {
                    eprintln!("  {l}");
                }
            }
        }
        if !exits.is_empty() {
            report.set("relay_exits", json!(exits));
        }
        let lines: Vec<String> = self
            .relays
            .iter()
            .flat_map(|r| r.notable_log_lines())
            .take(5)
            .collect();
        if !lines.is_empty() {
            report.set("relay_log_notes", json!(lines));
        }
    }
}

/// CPU ticks of every process that matters, at one instant.
pub(crate) struct Snap {
    at: Instant,
    relays: Vec<(u64, u64)>,
    workers: Vec<(u64, u64)>,
    me: (u64, u64),
    nats: (u64, u64),
}

impl Snap {
    pub(crate) fn take(b: &Bench, workers: &[u32]) -> Snap {
        Snap {
            at: Instant::now(),
            relays: b.server_pids().into_iter().map(procs::cpu_ticks).collect(),
            workers: workers.iter().map(|p| procs::cpu_ticks(*p)).collect(),
            me: procs::cpu_ticks(std::process::id()),
            nats: procs::cpu_ticks(b.nats.server.pid().unwrap_or(0)),
        }
    }

    /// (relay, clients) CPU in % of one core between `self` and `later`.
    pub(crate) fn pct(&self, later: &Snap) -> (f64, f64) {
        let hz = procs::clk_tck();
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let total = |a: &[(u64, u64)], b: &[(u64, u64)]| -> u64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| (y.0 + y.1).saturating_sub(x.0 + x.1))
                .sum()
        };
        let pct = |t: u64| r3(t as f64 / hz / secs * 100.0);
        (
            pct(total(&self.relays, &later.relays)),
            pct(total(&self.workers, &later.workers)),
        )
    }

    /// Adds CPU seconds between `self` and `later` to the report.
    pub(crate) fn report(&self, later: &Snap, report: &mut Report) {
        let hz = procs::clk_tck();
        let secs = later.at.duration_since(self.at).as_secs_f64();
        let diff = |a: &[(u64, u64)], b: &[(u64, u64)]| {
            a.iter().zip(b).fold((0u64, 0u64), |acc, (x, y)| {
                (
                    acc.0 + y.0.saturating_sub(x.0),
                    acc.1 + y.1.saturating_sub(x.1),
                )
            })
        };
        let (ru, rs) = diff(&self.relays, &later.relays);
        let (wu, ws) = diff(&self.workers, &later.workers);
        let (mu, ms) = diff(&[self.me], &[later.me]);
        let (nu, ns) = diff(&[self.nats], &[later.nats]);
        let s = |t: u64| r3(t as f64 / hz);
        report.set("measured_s", r3(secs));
        report.set("relay_cpu_user_s", s(ru));
        report.set("relay_cpu_sys_s", s(rs));
        report.set("relay_cpu_pct", r3((ru + rs) as f64 / hz / secs * 100.0));
        report.set("clients_cpu_s", s(wu + ws));
        report.set("clients_cpu_pct", r3((wu + ws) as f64 / hz / secs * 100.0));
        report.set("harness_cpu_s", s(mu + ms));
        report.set("nats_cpu_s", s(nu + ns));
    }
}
