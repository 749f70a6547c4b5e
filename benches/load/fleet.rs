//! The parent's side of the client processes: spawn `client-worker`
//! re-executions of this binary, send them commands on stdin, collect their
//! JSON lines from stdout.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::procs::{Proc, command};

/// What every worker of a fleet is told (see `client::Params`).
#[derive(Clone)]
pub(crate) struct FleetSpec {
    pub(crate) port: u16,
    pub(crate) token: String,
    pub(crate) clients: usize,
    /// Global index of the fleet's first client (source address, subject).
    pub(crate) first: usize,
    pub(crate) per_worker: usize,
    pub(crate) subject_each: bool,
    pub(crate) last_id: Option<u64>,
    pub(crate) stride: u64,
    pub(crate) expect: u64,
    pub(crate) retry: bool,
    pub(crate) concurrency: usize,
    /// Every how many clients record their arrivals (0: none).
    pub(crate) sample_every: usize,
}

impl FleetSpec {
    pub(crate) fn new(port: u16, token: &str, clients: usize, per_worker: usize) -> FleetSpec {
        FleetSpec {
            port,
            token: token.to_string(),
            clients,
            first: 0,
            per_worker: per_worker.max(1),
            subject_each: false,
            last_id: None,
            stride: 1,
            expect: 0,
            retry: false,
            concurrency: 256,
            sample_every: 0,
        }
    }
}

struct Worker {
    proc: Proc,
    stdin: ChildStdin,
}

/// A set of worker processes and the messages they sent, latest per type.
pub(crate) struct Fleet {
    workers: Vec<Worker>,
    rx: mpsc::UnboundedReceiver<(usize, Value)>,
    inbox: Vec<HashMap<String, Value>>,
}

impl Fleet {
    /// Spawns the workers and waits until each says it is ready.
    pub(crate) async fn spawn(spec: &FleetSpec) -> Result<Fleet, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut workers = Vec::new();
        let n = spec.clients.div_ceil(spec.per_worker);
        for w in 0..n {
            let first = w * spec.per_worker;
            let conns = spec.per_worker.min(spec.clients - first);
            let mut cmd = command(&exe, None);
            cmd.arg("client-worker")
                .env("LOAD_PORT", spec.port.to_string())
                .env("LOAD_FIRST", (spec.first + first).to_string())
                .env("LOAD_CONNS", conns.to_string())
                .env(
                    "LOAD_SUBJECT",
                    if spec.subject_each { "each" } else { "single" },
                )
                .env("LOAD_TOKEN", &spec.token)
                .env("LOAD_STRIDE", spec.stride.to_string())
                .env("LOAD_EXPECT", spec.expect.to_string())
                .env("LOAD_RETRY", if spec.retry { "1" } else { "0" })
                .env("LOAD_CONCURRENCY", spec.concurrency.to_string())
                .env("LOAD_SAMPLE_EVERY", spec.sample_every.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit());
            if let Some(id) = spec.last_id {
                cmd.env("LOAD_LAST_ID", id.to_string());
            }
            let mut proc = Proc::spawn(cmd, "client-worker")?;
            let stdin = proc.child.stdin.take().ok_or("worker stdin")?;
            let stdout = proc.child.stdout.take().ok_or("worker stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        let _ = tx.send((w, v));
                    }
                }
            });
            workers.push(Worker { proc, stdin });
        }
        let mut fleet = Fleet {
            inbox: vec![HashMap::new(); workers.len()],
            workers,
            rx,
        };
        fleet.wait_all("ready", Duration::from_secs(20)).await?;
        Ok(fleet)
    }

    pub(crate) fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.proc.pid()).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.workers.len()
    }

    /// Sends one command line to every worker.
    pub(crate) fn send(&mut self, cmd: &str) -> Result<(), String> {
        for w in &mut self.workers {
            writeln!(w.stdin, "{cmd}").map_err(|e| format!("worker stdin: {e}"))?;
            w.stdin.flush().map_err(|e| format!("worker stdin: {e}"))?;
        }
        Ok(())
    }

    /// Waits until every worker has sent a message of type `kind`; returns
    /// them (one per worker) and forgets them.
    pub(crate) async fn wait_all(
        &mut self,
        kind: &str,
        limit: Duration,
    ) -> Result<Vec<Value>, String> {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.inbox.iter().all(|m| m.contains_key(kind)) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((w, v))) => {
                    let t = v["type"].as_str().unwrap_or("").to_string();
                    self.inbox[w].insert(t, v);
                }
                Ok(None) => return Err("every client worker exited".into()),
                Err(_) => {
                    let have = self.inbox.iter().filter(|m| m.contains_key(kind)).count();
                    return Err(format!(
                        "timed out after {limit:?} waiting for `{kind}` from client workers ({have}/{} answered)",
                        self.inbox.len()
                    ));
                }
            }
        }
        Ok(self
            .inbox
            .iter_mut()
            .map(|m| m.remove(kind).unwrap_or(Value::Null))
            .collect())
    }

    /// `stats` from every worker: (received total, closed total, step histogram).
    pub(crate) async fn stats(&mut self) -> Result<(u64, u64, crate::report::Hist), String> {
        self.send("stats")?;
        let all = self.wait_all("stats", Duration::from_secs(10)).await?;
        let mut hist = crate::report::Hist::default();
        let (mut received, mut closed) = (0, 0);
        for v in &all {
            received += v["received"].as_u64().unwrap_or(0);
            closed += v["closed"].as_u64().unwrap_or(0);
            hist.merge(&crate::report::Hist::from_json(&v["hist"]));
        }
        Ok((received, closed, hist))
    }

    /// The final report of every worker, summed; `expect` is the number of
    /// events each client should hold.
    pub(crate) async fn finish(&mut self, expect: u64) -> Result<Totals, String> {
        self.send(&format!("final {expect}"))?;
        let all = self.wait_all("final", Duration::from_secs(20)).await?;
        let mut t = Totals {
            min_last_id: u64::MAX,
            ..Totals::default()
        };
        for v in &all {
            let g = |k: &str| v[k].as_u64().unwrap_or(0);
            t.received += g("received");
            t.lost += g("lost");
            t.excess += g("excess");
            t.gaps += g("gaps");
            t.closed += g("closed");
            t.reconnects += g("reconnects");
            t.min_last_id = t.min_last_id.min(g("min_last_id"));
            if !v["short"].as_array().is_none_or(|a| a.is_empty()) {
                eprintln!(
                    "clients short of events (index, last id, count): {}",
                    v["short"]
                );
            }
            t.max_last_id = t.max_last_id.max(g("max_last_id"));
            t.reconnect_ms.extend(
                v["reconnect_ms"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x.as_u64()),
            );
            t.control += g("control");
            t.ok += g("ok");
            t.failed += g("failed");
            t.hist.merge(&crate::report::Hist::from_json(&v["hist"]));
            t.per_second
                .merge(&crate::report::PerSecond::from_json(&v["per_second"]));
            t.arrivals.extend(
                v["arrivals"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| {
                        serde_json::from_value::<crate::report::Arrival>(a.clone()).ok()
                    }),
            );
            for e in v["errors"].as_array().into_iter().flatten() {
                if t.errors.len() < 5 {
                    t.errors.push(e.as_str().unwrap_or("").to_string());
                }
            }
        }
        Ok(t)
    }
}

/// Sum of the workers' final reports.
#[derive(Default)]
pub(crate) struct Totals {
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) excess: u64,
    pub(crate) gaps: u64,
    pub(crate) closed: u64,
    pub(crate) reconnects: u64,
    /// When each reconnect was made (ms since the Unix epoch).
    pub(crate) reconnect_ms: Vec<u64>,
    /// The lowest and highest last id any client holds.
    pub(crate) min_last_id: u64,
    pub(crate) max_last_id: u64,
    pub(crate) control: u64,
    pub(crate) ok: u64,
    pub(crate) failed: u64,
    pub(crate) hist: crate::report::Hist,
    /// Latency by second since the `epoch` command (if one was sent).
    pub(crate) per_second: crate::report::PerSecond,
    /// The sampled clients' arrivals (`FleetSpec::sample_every`).
    pub(crate) arrivals: Vec<crate::report::Arrival>,
    pub(crate) errors: Vec<String>,
}

/// Sums a field of `connected` messages.
pub(crate) fn sum(msgs: &[Value], key: &str) -> u64 {
    msgs.iter().map(|v| v[key].as_u64().unwrap_or(0)).sum()
}

/// The latest `at_ns` among messages.
pub(crate) fn latest_at(msgs: &[Value]) -> u64 {
    msgs.iter()
        .map(|v| v["at_ns"].as_u64().unwrap_or(0))
        .max()
        .unwrap_or(0)
}
