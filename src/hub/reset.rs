//! A recreated stream: deleted and created again under the same name, its
//! sequences restart at 1, below everything the shard has delivered. Left
//! alone, every queue would refuse the new stream's events as duplicates
//! until it passed the old last sequence. The dispatcher checks the
//! stream's creation time whenever something hints at a reset (a creation
//! advisory, a reconnect, a sequence below what a subscription delivered,
//! a last sequence below what the shard has seen), and on a new one resets
//! the shard and ends every stream with `relay.reset` (`id: 0`), so each
//! client comes back and replays the new stream from its beginning.

use std::time::Duration;

use tokio::time::Instant;

use super::Upstream;
use super::dispatcher::{Dispatcher, Done};
use crate::client::EndReason;
use crate::nats::Bounds;
use crate::sse;

/// Hints that are common without a reset (a sequence below a subscription's
/// last right after it subscribed) cost at most one check per interval.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The stream the shard serves, as far as checked.
#[derive(Default)]
pub(super) struct StreamCheck {
    /// Creation time of the stream whose sequences the shard holds.
    created: Option<i128>,
    running: bool,
    /// A hint arrived while a check ran: check again after it.
    again: bool,
    last_started: Option<Instant>,
}

impl<U: Upstream> Dispatcher<U> {
    /// Checks the stream's creation time (single flight). `urgent` hints
    /// (an advisory, a reconnect) are never skipped; others at most once
    /// per [`CHECK_INTERVAL`].
    pub(super) fn check_stream(&mut self, why: &'static str, urgent: bool) {
        let c = &mut self.stream_check;
        if c.running {
            c.again |= urgent;
            return;
        }
        if !urgent && c.last_started.is_some_and(|t| t.elapsed() < CHECK_INTERVAL) {
            return;
        }
        c.running = true;
        c.last_started = Some(Instant::now());
        tracing::debug!(reason = why, "checking the stream's identity");
        let upstream = self.upstream.clone();
        let done = self.done.clone();
        tokio::spawn(async move {
            let result = upstream.bounds().await;
            let _ = done.send(Done::Checked(result.ok()));
        });
    }

    pub(super) fn checked(&mut self, bounds: Option<Bounds>) {
        self.stream_check.running = false;
        if let Some(b) = bounds {
            match self.stream_check.created {
                None => self.stream_check.created = Some(b.created),
                Some(c) if c == b.created => {}
                Some(_) => self.reset(b),
            }
        }
        if std::mem::take(&mut self.stream_check.again) {
            self.check_stream("hinted again during a check", true);
        }
    }

    /// The stream was recreated: forget every sequence of the old one and
    /// make every client start over from the new one's beginning.
    fn reset(&mut self, b: Bounds) {
        tracing::warn!(
            last = b.last,
            "the stream was deleted and created again: every stream restarts from the new stream's beginning"
        );
        self.stream_check.created = Some(b.created);
        self.metrics.stream_resets.inc();
        // A catch-up or fill of the old stream answers for nothing now.
        self.epoch += 1;
        self.catch_up = None;
        self.catch_up_again = false;
        self.window.stop_all();
        self.max_seen
            .store(b.last, std::sync::atomic::Ordering::Release);
        self.metrics
            .last_sequence_seen
            .store(b.last, std::sync::atomic::Ordering::Relaxed);
        let whole = self.live_is_whole();
        let keys: Vec<_> = self.topics.active().map(|(k, _)| k).collect();
        // Resumes parked behind a fill of the old stream: their streams end
        // with the others below, and their joins are answered then.
        let mut parked = Vec::new();
        for key in keys {
            if let Some(t) = self.topics.get_mut(key) {
                t.last_seq = b.last;
                t.since = Some(b.last);
                if let Some(f) = t.fill.take() {
                    parked.extend(f.waiters);
                }
            }
            if whole {
                self.window.start(key, b.last);
            }
        }
        let mut tail = bytes::BytesMut::from(&sse::encode_reset()[..]);
        tail.extend_from_slice(&self.retry);
        let tail = tail.freeze();
        let mut n = 0;
        for q in self.clients.queues() {
            q.close(EndReason::Reset, Some(tail.clone()));
            n += 1;
        }
        self.count_ends(EndReason::Reset, n);
        for id in parked {
            if let Some(r) = self.clients.get_mut(id).and_then(|c| c.reply.take()) {
                let _ = r.send(Ok(super::Backfill::Done));
            }
        }
    }
}
