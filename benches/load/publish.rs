//! The publisher: `events.bench.<k>` at a fixed (changeable) rate, each
//! payload `{"t": <unix nanos>, "n": <count>, "pad": "..."}` padded to ~100
//! bytes, `n` counting the subject's messages from 1 (the peers' event id);
//! core publishes, or JetStream publishes whose acks are counted (`--acked`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use bytes::Bytes;

pub(crate) const PAYLOAD_LEN: usize = 100;

/// `{"t":<nanos>,"n":<n>,"pad":"xxx..."}` of [`PAYLOAD_LEN`] bytes; `n` is
/// the message's number on its subject, from 1.
pub(crate) fn payload(n: u64) -> Bytes {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let head = format!("{{\"t\":{t},\"n\":{n},\"pad\":\"");
    let mut s = String::with_capacity(PAYLOAD_LEN);
    s.push_str(&head);
    while s.len() < PAYLOAD_LEN - 2 {
        s.push('x');
    }
    s.push_str("\"}");
    Bytes::from(s)
}

/// Shared controls and counters of a running publisher.
#[derive(Default)]
pub(crate) struct PubCtl {
    /// Messages per second in total (over all subjects), times 1000.
    pub(crate) milli_rate: AtomicU64,
    pub(crate) stop: AtomicBool,
    pub(crate) sent: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) ack_errors: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
}

impl PubCtl {
    pub(crate) fn new(rate: f64) -> Arc<PubCtl> {
        let c = PubCtl::default();
        c.set_rate(rate);
        Arc::new(c)
    }

    pub(crate) fn set_rate(&self, rate: f64) {
        self.milli_rate
            .store((rate * 1000.0).round() as u64, Ordering::Relaxed);
    }

    pub(crate) fn rate(&self) -> f64 {
        self.milli_rate.load(Ordering::Relaxed) as f64 / 1000.0
    }

    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
}

async fn publish_one(
    client: &async_nats::Client,
    js: Option<&jetstream::Context>,
    ctl: &Arc<PubCtl>,
    k: u64,
    n: u64,
) {
    let subject = subject(k);
    match js {
        None => {
            if client.publish(subject, payload(n)).await.is_err() {
                ctl.publish_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(js) => match js.publish(subject, payload(n)).await {
            Ok(ack) => {
                let ctl = ctl.clone();
                tokio::spawn(async move {
                    match ack.await {
                        Ok(_) => ctl.acked.fetch_add(1, Ordering::Relaxed),
                        Err(_) => ctl.ack_errors.fetch_add(1, Ordering::Relaxed),
                    };
                });
            }
            Err(_) => {
                ctl.publish_errors.fetch_add(1, Ordering::Relaxed);
            }
        },
    }
    ctl.sent.fetch_add(1, Ordering::Relaxed);
}

/// Publishes round-robin over `subjects` subjects at `ctl`'s rate until
/// `ctl.stop`, then completes the current round (so every subject got the
/// same number) at the same rate, and flushes. Returns the number of
/// rounds. (Finishing the round in one go would be a burst of up to one
/// message per subject, measured as the relay's tail latency.)
pub(crate) async fn run(
    client: async_nats::Client,
    js: Option<jetstream::Context>,
    subjects: usize,
    ctl: Arc<PubCtl>,
) -> u64 {
    let subjects = subjects.max(1) as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut base = tokio::time::Instant::now();
    let mut base_sent = 0u64;
    let mut rate = ctl.rate();
    let mut sent = 0u64;
    // After the stop: where the round ends, and when it must have ended
    // (at the rate, plus a second; bounded, whatever the rate).
    let mut round_end: Option<(u64, tokio::time::Instant)> = None;
    loop {
        tick.tick().await;
        if round_end.is_none() && ctl.stop.load(Ordering::Relaxed) {
            let end = sent.div_ceil(subjects) * subjects;
            let left = (end - sent) as f64 / ctl.rate().max(1.0);
            let by = tokio::time::Instant::now() + Duration::from_secs_f64(left.min(10.0) + 1.0);
            round_end = Some((end, by));
        }
        if round_end.is_some_and(|(end, _)| end == sent) {
            break;
        }
        let now = tokio::time::Instant::now();
        if ctl.rate() != rate {
            rate = ctl.rate();
            base = now;
            base_sent = sent;
        }
        let due = base_sent + (now.duration_since(base).as_secs_f64() * rate) as u64;
        // Bounded burst per tick, so a stall does not turn into a flood.
        let target = match round_end {
            None => due.min(sent + 20_000),
            Some((end, by)) if now >= by => end,
            Some((end, _)) => due.min(sent + 20_000).min(end),
        };
        while sent < target {
            let (k, n) = (sent % subjects, sent / subjects + 1);
            publish_one(&client, js.as_ref(), &ctl, k, n).await;
            sent += 1;
        }
    }
    let _ = client.flush().await;
    if js.is_some() {
        wait_acks(&ctl, Duration::from_secs(10)).await;
    }
    sent / subjects
}

pub(crate) fn subject(k: u64) -> String {
    format!("events.bench.{k}")
}

/// Waits until every JetStream publish was acked or failed (bounded).
pub(crate) async fn wait_acks(ctl: &PubCtl, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while ctl.acked.load(Ordering::Relaxed)
        + ctl.ack_errors.load(Ordering::Relaxed)
        + ctl.publish_errors.load(Ordering::Relaxed)
        < ctl.sent()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Publishes `n` events to `events.bench.0` through JetStream, awaiting
/// every ack; returns the last stored sequence.
pub(crate) async fn publish_acked(js: &jetstream::Context, n: u64) -> Result<u64, String> {
    let mut acks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let ack = js
            .publish(subject(0), payload(i + 1))
            .await
            .map_err(|e| format!("publish: {e}"))?;
        acks.push(ack);
    }
    let mut last = 0;
    for ack in acks {
        let a = ack.await.map_err(|e| format!("publish ack: {e}"))?;
        last = last.max(a.sequence);
    }
    Ok(last)
}
