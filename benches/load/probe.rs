//! The NATS-path probe: a plain subscriber on its own connection that
//! receives what the server under test reads (the republished
//! `relay.events.bench.<k>` for the relay, the plain `events.bench.<k>`
//! for the peers) and records publish-to-receive latency from the
//! payload's `"t"`, and when each message arrived: a sampled client's
//! receipt of the same message minus the probe's is what the server added
//! to it (`report::added_latency`). It shares CPU 1 with the clients, so it
//! reads a sample of the subjects, and a sample of the clients is timed:
//! about [`PROBE_RATE`] messages a second each.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::report::{Hist, PerSecond, measured};

/// Messages a second the probe aims to read, at most.
pub(crate) const PROBE_RATE: f64 = 1000.0;

/// The prefix the stream's RePublish puts before `events.>` (`relay.`).
pub(crate) fn republish_prefix() -> String {
    let cfg = sse_relay::default_stream_config("EVENTS");
    cfg.republish
        .and_then(|r| {
            let src = r.source.trim_end_matches('>');
            let dest = r.destination.trim_end_matches('>');
            dest.strip_suffix(src).map(str::to_string)
        })
        .unwrap_or_default()
}

/// Of things that together see `per_s` messages a second, spread evenly,
/// every how many to sample for about [`PROBE_RATE`] a second.
pub(crate) fn sample_step(per_s: f64) -> usize {
    (per_s / PROBE_RATE).ceil().max(1.0) as usize
}

/// Every `step`-th of `subjects` subjects ([`sample_step`] of
/// `total_rate`). With one subject per client and every client timed at
/// the same step, the timed clients are the probed subjects'.
pub(crate) fn sampled_subjects(prefix: &str, subjects: usize, total_rate: f64) -> Vec<String> {
    let step = sample_step(total_rate);
    (0..subjects.max(1))
        .step_by(step)
        .map(|k| format!("{prefix}events.bench.{k}"))
        .collect()
}

/// What a probe saw: latency, by second, and when each measured message
/// arrived, by (subject index, `"t"`).
#[derive(Default)]
pub(crate) struct Seen {
    pub(crate) hist: Hist,
    pub(crate) per_second: PerSecond,
    pub(crate) arrivals: HashMap<(u64, u64), u64>,
}

/// A running probe; [`Probe::finish`] stops it and returns its histograms.
pub(crate) struct Probe {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Seen>,
    /// The clients' `epoch` (unix ns; 0: not yet), so the probe's seconds
    /// are theirs.
    epoch: Arc<AtomicU64>,
}

impl Probe {
    /// Subscribes to `subjects` on a connection of its own; returns once
    /// the server has the subscriptions.
    pub(crate) async fn start(url: &str, subjects: Vec<String>) -> Result<Probe, String> {
        let client = async_nats::connect(url)
            .await
            .map_err(|e| format!("probe: connect: {e}"))?;
        let mut subs = Vec::with_capacity(subjects.len());
        for s in subjects {
            let sub = client
                .subscribe(s)
                .await
                .map_err(|e| format!("probe: subscribe: {e}"))?;
            subs.push(sub);
        }
        client
            .flush()
            .await
            .map_err(|e| format!("probe: flush: {e}"))?;
        let (stop, mut stopped) = oneshot::channel();
        let epoch = Arc::new(AtomicU64::new(0));
        let clock = epoch.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            let mut all = futures_util::stream::select_all(subs);
            let mut seen = Seen::default();
            loop {
                tokio::select! {
                    m = all.next() => match m {
                        Some(m) => {
                            let e = clock.load(Ordering::Relaxed);
                            let start = (e > 0).then_some(e);
                            if let Some(t) = payload_t(&m.payload).filter(|&t| measured(t, start)) {
                                let now = now_ns();
                                let us = now.saturating_sub(t) / 1000;
                                seen.hist.record(us);
                                if e > 0 && now >= e {
                                    seen.per_second.record(((now - e) / 1_000_000_000) as usize, us);
                                }
                                if let Some(k) = subject_index(&m.subject) {
                                    seen.arrivals.insert((k, t), now);
                                }
                            }
                        }
                        None => break,
                    },
                    _ = &mut stopped => break,
                }
            }
            seen
        });
        Ok(Probe { stop, task, epoch })
    }

    /// Counts seconds from `epoch_ns`, as the clients do.
    pub(crate) fn set_epoch(&self, epoch_ns: u64) {
        self.epoch.store(epoch_ns, Ordering::Relaxed);
    }

    pub(crate) async fn finish(self) -> Seen {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `k` of `…events.bench.<k>`.
fn subject_index(subject: &str) -> Option<u64> {
    subject.rsplit('.').next()?.parse().ok()
}

/// The publish time `"t":<unix nanos>` of a payload.
fn payload_t(p: &[u8]) -> Option<u64> {
    let at = p.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits = p[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&p[at..at + digits]).ok()?.parse().ok()
}
