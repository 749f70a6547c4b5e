//! Fan-out: frames in sequence order to every client of their topic, each
//! event encoded once.

use std::sync::atomic::Ordering;
use std::task::{Context, Waker};

use bytes::Bytes;

use super::{CATCH_UP_HOLD_LIMIT, DISPATCH_CHUNK, Dispatcher};
use crate::sse::{self, EndReason, Offer};

impl Dispatcher {
    /// Fans out frames (sorted by sequence) to every client of their topic.
    /// Between chunks the task yields so the connections it woke can write:
    /// a burst larger than a client queue must not evict a client that only
    /// lacked a turn on the CPU. (Outside the co-op budget nothing else
    /// would make this task yield.)
    pub(super) async fn deliver(&mut self, items: Vec<(u64, usize, Bytes)>) {
        for (i, chunk) in items.chunks(DISPATCH_CHUNK).enumerate() {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            self.deliver_now(chunk);
        }
    }

    /// Offers frames (sorted by sequence) to the clients of their topics.
    pub(super) fn deliver_now(&mut self, items: &[(u64, usize, Bytes)]) {
        if let Some(c) = &mut self.catch_up {
            c.held.extend_from_slice(items);
            if c.held.len() > CATCH_UP_HOLD_LIMIT {
                tracing::warn!("catch-up too slow; every client resumes on its own");
                self.catch_up = None;
                let tail = sse::encode_retry(self.cfg.retry_ms);
                for c in self.clients.values() {
                    c.queue.close(EndReason::Resync, Some(tail.clone()));
                }
            }
            return;
        }
        let mut delivered = 0u64;
        let mut evicted = 0usize;
        let mut max_seq = 0;
        for (seq, t, frame) in items {
            let Some(topic) = self.topics[*t].as_mut() else {
                continue;
            };
            topic.last_seq = topic.last_seq.max(*seq);
            max_seq = max_seq.max(*seq);
            self.window.push(*t, *seq, frame);
            for (_, q) in &topic.clients {
                match q.offer(*seq, frame) {
                    Offer::Queued => delivered += 1,
                    Offer::Duplicate | Offer::Closed => {}
                    Offer::Full => {
                        q.close(EndReason::Slow, None);
                        evicted += 1;
                    }
                }
            }
        }
        self.max_seen.fetch_max(max_seq, Ordering::AcqRel);
        self.metrics.events_received.inc_by(items.len() as u64);
        self.metrics.deliveries.inc_by(delivered);
        if evicted > 0 {
            self.count_ends(EndReason::Slow, evicted);
            tracing::info!(clients = evicted, "evicted: slow");
        }
    }

    /// Delivers whatever the subscriptions hold right now. Called when a
    /// subscription joins the merge: its channel may hold events older than
    /// ones other topics already delivered, and they must be out of the way
    /// before a client on both topics is added (it would refuse them as
    /// duplicates of a lower sequence). Anything NATS delivers after this is
    /// newer than all of it (socket order).
    pub(super) fn drain_merge(&mut self) {
        let mut batch = Vec::new();
        let mut ended = Vec::new();
        // A noop waker is fine: the run loop polls the merge set again (with
        // its real waker) before it next waits, and the ready list keeps
        // every slot woken meanwhile.
        let mut cx = Context::from_waker(Waker::noop());
        while self
            .merge
            .poll_batch(&mut cx, &mut batch, &mut ended)
            .is_ready()
        {
            let items = encode_batch(&mut batch);
            self.deliver_now(&items);
            for topic in ended.drain(..) {
                self.subscription_ended(topic);
            }
        }
    }
}

/// Turns a merged batch into (seq, topic, frame), sorted by sequence, each
/// event encoded once even when overlapping topics both received it.
pub(super) fn encode_batch(
    batch: &mut Vec<(usize, async_nats::Message)>,
) -> Vec<(u64, usize, Bytes)> {
    let mut msgs: Vec<(u64, usize, async_nats::Message)> = batch
        .drain(..)
        .filter_map(|(t, m)| sequence(&m).map(|seq| (seq, t, m)))
        .collect();
    // Stable: copies of one event from overlapping topics stay adjacent.
    msgs.sort_by_key(|(seq, _, _)| *seq);
    let mut out: Vec<(u64, usize, Bytes)> = Vec::with_capacity(msgs.len());
    for (seq, t, m) in msgs {
        let frame = match out.last() {
            Some((s, _, f)) if *s == seq => f.clone(),
            _ => sse::encode_event(seq, event_name(&m), &m.payload),
        };
        out.push((seq, t, frame));
    }
    out
}

/// The JetStream sequence RePublish puts in `Nats-Sequence`. A message
/// without it was not republished by the stream and has no resumable id.
fn sequence(msg: &async_nats::Message) -> Option<u64> {
    let seq = msg
        .headers
        .as_ref()?
        .get("Nats-Sequence")?
        .as_str()
        .parse()
        .ok();
    if seq.is_none() {
        tracing::warn!(subject = %msg.subject, "message without a valid Nats-Sequence ignored");
    }
    seq
}

fn event_name(msg: &async_nats::Message) -> Option<&str> {
    msg.headers
        .as_ref()?
        .get("Sse-Event")
        .map(|v| v.as_str())
        .filter(|s| !s.is_empty())
}
