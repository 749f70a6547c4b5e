//! Fan-out: frames in sequence order to every client of their topic, each
//! event encoded once.

use std::task::{Context, Waker};

use super::dispatcher::{Delivery, Dispatcher};
use super::topics::TopicKey;
use super::{LiveMessage, Upstream};
use crate::client::{EndReason, Offer};

/// Events fanned out between two yields of the dispatcher.
const DISPATCH_CHUNK: usize = 64;

/// Clients offered a frame between two yields of the dispatcher. The
/// connections woken then write while what the hub touched of them (the
/// queue, the task) is still in cache: on a fan-out to 10,000 clients,
/// waking them all first left each to a cold start of its own.
pub(super) const OFFER_CHUNK: usize = 64;

/// Live frames held during a catch-up before the hub gives up and makes
/// every client resume on its own.
pub(super) const CATCH_UP_HOLD_LIMIT: usize = 1_000_000;

/// Where a fan-out stopped to yield: `items[item]` goes on to its clients
/// from `client` on (its own bookkeeping is done when `client` > 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Resume {
    item: usize,
    client: usize,
}

impl Resume {
    const START: Resume = Resume { item: 0, client: 0 };
}

/// How much one call of [`Dispatcher::deliver_some`] may do.
#[derive(Clone, Copy)]
struct Limit {
    items: usize,
    offers: usize,
}

impl<U: Upstream> Dispatcher<U> {
    /// Fans out deliveries (sorted by sequence) to every client of their
    /// topic. Every [`DISPATCH_CHUNK`] events, and every [`OFFER_CHUNK`]
    /// clients of a batch that is one event, the task yields so the
    /// connections it woke can write: a burst larger than a client queue
    /// must not evict a client that only lacked a turn on the CPU, and a
    /// connection writes while it is still in cache. (Outside the co-op
    /// budget nothing else would make this task yield.) Nothing else of the
    /// hub runs while it waits, so the topics and their clients are as it
    /// left them.
    pub(super) async fn deliver(&mut self, items: &[Delivery]) {
        let limit = Limit {
            items: DISPATCH_CHUNK,
            offers: OFFER_CHUNK,
        };
        let mut from = Resume::START;
        while let Some(next) = self.deliver_some(items, from, limit) {
            tokio::task::yield_now().await;
            from = next;
        }
    }

    /// Offers deliveries (sorted by sequence) to the clients of their
    /// topics, or holds them while a catch-up runs, all at once.
    pub(super) fn deliver_now(&mut self, items: &[Delivery]) {
        let limit = Limit {
            items: usize::MAX,
            offers: usize::MAX,
        };
        let rest = self.deliver_some(items, Resume::START, limit);
        debug_assert!(rest.is_none(), "no limit, no pause");
    }

    /// [`Self::deliver_now`] from `from` on, until `limit`: then where to
    /// go on from.
    fn deliver_some(&mut self, items: &[Delivery], from: Resume, limit: Limit) -> Option<Resume> {
        let items = items.get(from.item..).unwrap_or_default();
        let rel = |r: Resume| Resume {
            item: from.item + r.item,
            ..r
        };
        // Held or not, the stream has reached these sequences.
        if let Some(last) = items.last() {
            self.note_seen(last.seq);
        }
        if let Some(c) = &mut self.catch_up {
            // (A fan-out paused in the middle of an event goes on before
            // anything else of the hub runs, and a catch-up started below
            // holds from the event it starts at: no event is ever held
            // half-delivered.)
            c.held.extend_from_slice(items);
            if c.held.len() > CATCH_UP_HOLD_LIMIT {
                tracing::warn!("catch-up too slow; every client resumes on its own");
                self.catch_up = None;
                self.end_streams(self.clients.queues(), EndReason::Resync);
            }
            return None;
        }
        let mut received = 0u64;
        let mut delivered = 0u64;
        let mut offers = 0usize;
        let mut evicted = 0usize;
        let mut behind = false;
        let mut deepest = 0;
        let mut paused = None;
        // Only a batch of one event is offered a chunk of clients at a
        // time. When events queue up, every event of the turn is in every
        // queue before any connection runs, so a connection behind by
        // several writes them all at once: a turn per chunk of clients
        // would make that one write per event (measured: saturation fell
        // from 3.7 M to 0.14 M deliveries/s).
        let by_chunks = items.len() == 1;
        'items: for (i, d) in items.iter().enumerate() {
            if i >= limit.items {
                paused = Some(rel(Resume { item: i, client: 0 }));
                break;
            }
            let first_client = if i == 0 { from.client } else { 0 };
            let Some(topic) = self.topics.get_mut(d.topic) else {
                received += 1;
                continue;
            };
            if first_client == 0 {
                if topic.since.is_none() && d.previous.is_some() {
                    // The stream's position was not known when the
                    // subscription became active (JetStream did not
                    // answer): holes are looked for from this first live
                    // event on, not never.
                    topic.since = Some(d.seq.saturating_sub(1));
                }
                if topic.skipped(d) {
                    // An event of this topic was stored but never reached
                    // it (a leader change between storing and
                    // republishing): fill the hole from the stream before
                    // delivering past it.
                    self.metrics.events_received.inc_by(received);
                    self.metrics.deliveries.inc_by(delivered);
                    self.count_evicted(evicted);
                    self.start_catch_up("hole in the republished sequence");
                    let rest = self.deliver_some(&items[i..], Resume::START, limit);
                    return rest.map(|r| {
                        rel(Resume {
                            item: i + r.item,
                            ..r
                        })
                    });
                }
                received += 1;
                behind |= d.previous.is_some() && d.seq < topic.last_seq;
                topic.last_seq = topic.last_seq.max(d.seq);
                self.window.push(d.topic, d.seq, &d.frame);
            }
            let clients = topic.clients.get(first_client..).unwrap_or_default();
            for (k, (_, q)) in clients.iter().enumerate() {
                if by_chunks && offers >= limit.offers {
                    // k > 0 (offers counts this one event's clients), so
                    // the event's own bookkeeping is done.
                    paused = Some(rel(Resume {
                        item: i,
                        client: first_client + k,
                    }));
                    break 'items;
                }
                offers += 1;
                match q.offer_live(d.seq, &d.frame, d.stored_us, &mut deepest) {
                    Offer::Queued => delivered += 1,
                    Offer::Duplicate | Offer::Closed => {}
                    Offer::Full => {
                        q.close(EndReason::Slow, None);
                        evicted += 1;
                    }
                }
            }
        }
        self.metrics.events_received.inc_by(received);
        self.metrics.deliveries.inc_by(delivered);
        if deepest > 0 {
            self.metrics.queue_depth.observe(deepest as f64);
        }
        self.count_evicted(evicted);
        if behind {
            // A live sequence below what its subscription delivered: usual
            // right after subscribing, or the stream was recreated.
            self.check_stream("a live sequence went back", false);
        }
        paused
    }

    fn count_evicted(&self, evicted: usize) {
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
        let mut bufs = BatchBuffers::default();
        // A noop waker is fine: the run loop polls the merge set again (with
        // its real waker) before it next waits, and the ready list keeps
        // every slot woken meanwhile.
        let mut cx = Context::from_waker(Waker::noop());
        while self
            .merge
            .poll_batch(&mut cx, &mut batch, &mut ended)
            .is_ready()
        {
            encode_batch(&mut batch, &mut bufs);
            self.deliver_now(&bufs.deliveries);
            bufs.done();
            for topic in ended.drain(..) {
                self.subscription_ended(topic);
            }
        }
    }
}

/// Buffers kept from one batch to the next: a batch allocates nothing of
/// its own (a large allocation per batch made glibc's malloc consolidate
/// its free lists, then split chunks for every small allocation after it).
#[derive(Default)]
pub(super) struct BatchBuffers {
    sorting: Vec<(TopicKey, LiveMessage)>,
    pub(super) deliveries: Vec<Delivery>,
}

/// Items a [`BatchBuffers`] keeps room for after a burst made it larger.
const KEPT_BATCH: usize = 1024;

impl BatchBuffers {
    /// Lets go of the delivered frames, and of the room a burst took.
    pub(super) fn done(&mut self) {
        self.deliveries.clear();
        self.deliveries.shrink_to(KEPT_BATCH);
        self.sorting.shrink_to(KEPT_BATCH);
    }
}

/// Turns a merged batch into deliveries sorted by sequence (in
/// `bufs.deliveries`, cleared first; `batch` is left empty), the copies of
/// one event that overlapping topics received sharing one frame.
pub(super) fn encode_batch(batch: &mut Vec<(TopicKey, LiveMessage)>, bufs: &mut BatchBuffers) {
    let BatchBuffers {
        sorting,
        deliveries: out,
    } = bufs;
    out.clear();
    sorting.append(batch);
    // Stable: copies of one event from overlapping topics stay adjacent.
    sorting.sort_by_key(|(_, m)| m.id.seq);
    for (topic, m) in sorting.drain(..) {
        let r = m.id;
        // Overlapping topics each received a copy: one frame for all.
        let frame = match out.last() {
            Some(d) if d.seq == r.seq => d.frame.clone(),
            _ => m.frame,
        };
        out.push(Delivery {
            seq: r.seq,
            topic,
            frame,
            previous: Some(r.previous),
            stored_us: r.stored_us,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{BatchBuffers, KEPT_BATCH, encode_batch};
    use crate::hub::bench::LiveBatch;

    #[test]
    fn batch_buffers_are_kept_between_batches_up_to_a_bound() {
        let live = LiveBatch::new(4, 1 << 20, 10);
        let mut bufs = BatchBuffers::default();
        let mut batch = Vec::new();
        live.parse(&live.messages(1, 64), &mut batch);
        encode_batch(&mut batch, &mut bufs);
        assert_eq!(bufs.deliveries.len(), 64);
        assert!(bufs.deliveries.windows(2).all(|w| w[0].seq < w[1].seq));
        bufs.done();
        assert!(bufs.deliveries.is_empty(), "delivered frames are let go");
        let room = bufs.deliveries.capacity();
        assert!(room >= 64, "the next batch reuses the room: {room}");
        // A burst's room is given back down to the bound.
        let mut burst = Vec::new();
        live.parse(&live.messages(100, 5 * KEPT_BATCH), &mut burst);
        encode_batch(&mut burst, &mut bufs);
        bufs.done();
        assert!(bufs.deliveries.capacity() <= KEPT_BATCH);
        assert!(bufs.sorting.capacity() <= KEPT_BATCH);
    }
}
