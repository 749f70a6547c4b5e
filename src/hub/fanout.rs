//! Fan-out: frames in sequence order to every client of their topic, each
//! event encoded once.

use std::task::{Context, Waker};

use super::dispatcher::{Delivery, Dispatcher};
use super::topics::TopicKey;
use super::{LiveMessage, Upstream};
use crate::client::{EndReason, Offer};

/// Events fanned out between two yields of the dispatcher.
const DISPATCH_CHUNK: usize = 64;

/// Clients offered their frames between two yields of the dispatcher. The
/// connections woken then write while what the hub touched of them (the
/// queue, the task) is still in cache: on a fan-out to 10,000 clients,
/// waking them all first left each to a cold start of its own.
pub(super) const OFFER_CHUNK: usize = 64;

/// Live frames held during a catch-up before the hub gives up and makes
/// every client resume on its own.
pub(super) const CATCH_UP_HOLD_LIMIT: usize = 1_000_000;

/// Where a fan-out stopped to yield. A turn is a run of consecutive
/// deliveries of one topic: `items[item..end]` goes on to its topic's
/// clients from `client` on (its bookkeeping done when `client` > 0), and
/// `hole` says a catch-up starts at `end` once it is offered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resume {
    item: usize,
    client: usize,
    end: usize,
    hole: bool,
}

impl Resume {
    const START: Resume = Resume::at(0);

    const fn at(item: usize) -> Resume {
        Resume {
            item,
            client: 0,
            end: 0,
            hole: false,
        }
    }
}

/// How much one call of [`Dispatcher::deliver_some`] may do.
#[derive(Clone, Copy)]
struct Limit {
    items: usize,
    clients: usize,
}

impl Limit {
    const NONE: Limit = Limit {
        items: usize::MAX,
        clients: usize::MAX,
    };
}

/// What one call counted, for the metrics.
#[derive(Default)]
struct Tally {
    received: u64,
    delivered: u64,
    evicted: usize,
    behind: bool,
    deepest: usize,
}

impl<U: Upstream> Dispatcher<U> {
    /// Fans out deliveries (sorted by sequence) to every client of their
    /// topic, a turn (a run of one topic's deliveries, at most
    /// [`DISPATCH_CHUNK`]) at a time, client by client: each client takes
    /// all of a turn's frames at once. Every [`DISPATCH_CHUNK`] deliveries
    /// and every [`OFFER_CHUNK`] clients the task yields so the connections
    /// it woke can write: a burst larger than a client queue must not evict
    /// a client that only lacked a turn on the CPU, a connection behind by
    /// several events writes them all at once, and it writes while it is
    /// still in cache. (Outside the co-op budget nothing else would make
    /// this task yield.) Nothing else of the hub runs while it waits, so
    /// the topics and their clients are as it left them.
    pub(super) async fn deliver(&mut self, items: &[Delivery]) {
        let limit = Limit {
            items: DISPATCH_CHUNK,
            clients: OFFER_CHUNK,
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
        let rest = self.deliver_some(items, Resume::START, Limit::NONE);
        debug_assert!(rest.is_none(), "no limit, no pause");
    }

    /// [`Self::deliver_now`] from `from` on, until `limit`: then where to
    /// go on from.
    fn deliver_some(&mut self, items: &[Delivery], from: Resume, limit: Limit) -> Option<Resume> {
        // Held or not, the stream has reached these sequences.
        if let Some(last) = items.last() {
            self.note_seen(last.seq);
        }
        if self.catch_up.is_some() {
            // (A turn paused in the middle goes on before anything else of
            // the hub runs, and a catch-up starts only after its turn:
            // nothing is ever held half-delivered.)
            self.hold(items.get(from.item..).unwrap_or_default());
            return None;
        }
        let mut tally = Tally::default();
        let mut clients_left = limit.clients;
        let mut taken = 0;
        let mut at = from;
        let paused = loop {
            if at.item >= items.len() {
                break None;
            }
            if at.client == 0 {
                if taken >= limit.items || clients_left == 0 {
                    break Some(Resume::at(at.item));
                }
                let room = (limit.items - taken).min(items.len() - at.item);
                (at.end, at.hole) = self.begin_turn(&items[at.item..at.item + room], &mut tally);
                at.end += at.item;
                taken += at.end - at.item;
            }
            let turn = &items[at.item..at.end];
            let Some(topic) = turn.first().and_then(|d| self.topics.get(d.topic)) else {
                // A hole at the turn's first delivery, or a topic gone.
                at = self.end_turn(items, at, &mut tally)?;
                continue;
            };
            let clients = topic.clients.get(at.client..).unwrap_or_default();
            let n = clients.len().min(clients_left);
            for (_, q) in &clients[..n] {
                for d in turn {
                    match q.offer_live(d.seq, &d.frame, d.stored_us, &mut tally.deepest) {
                        Offer::Queued => tally.delivered += 1,
                        Offer::Duplicate | Offer::Closed => {}
                        Offer::Full => {
                            q.close(EndReason::Slow, None);
                            tally.evicted += 1;
                            break;
                        }
                    }
                }
            }
            clients_left -= n;
            if n < clients.len() {
                at.client += n;
                break Some(at);
            }
            at = self.end_turn(items, at, &mut tally)?;
        };
        self.count(tally);
        paused
    }

    /// The bookkeeping of a turn: the first deliveries of `items`' first
    /// topic, up to a hole. Returns how many, and whether a hole ends them.
    fn begin_turn(&mut self, items: &[Delivery], tally: &mut Tally) -> (usize, bool) {
        let Some(key) = items.first().map(|d| d.topic) else {
            return (0, false);
        };
        let Some(topic) = self.topics.get_mut(key) else {
            // Gone: nothing to offer these to.
            let n = items.iter().take_while(|d| d.topic == key).count();
            tally.received += n as u64;
            return (n, false);
        };
        for (i, d) in items.iter().enumerate() {
            if d.topic != key {
                return (i, false);
            }
            if topic.since.is_none() && d.previous.is_some() {
                // The stream's position was not known when the subscription
                // became active (JetStream did not answer): holes are
                // looked for from this first live event on, not never.
                topic.since = Some(d.seq.saturating_sub(1));
            }
            if topic.skipped(d) {
                // An event of this topic was stored but never reached it
                // (a leader change between storing and republishing): fill
                // the hole from the stream before delivering past it.
                return (i, true);
            }
            tally.received += 1;
            tally.behind |= d.previous.is_some() && d.seq < topic.last_seq;
            topic.last_seq = topic.last_seq.max(d.seq);
            self.window.push(d.topic, d.seq, &d.frame);
        }
        (items.len(), false)
    }

    /// After a turn is offered: the next turn, or (a hole) a catch-up that
    /// holds everything from the hole on.
    fn end_turn(&mut self, items: &[Delivery], at: Resume, tally: &mut Tally) -> Option<Resume> {
        if !at.hole {
            return Some(Resume::at(at.end));
        }
        self.count(std::mem::take(tally));
        self.start_catch_up("hole in the republished sequence");
        self.hold(items.get(at.end..).unwrap_or_default());
        None
    }

    /// Keeps live deliveries for the catch-up under way, or gives up on it
    /// when too many wait.
    fn hold(&mut self, items: &[Delivery]) {
        let Some(c) = &mut self.catch_up else {
            return;
        };
        c.held.extend_from_slice(items);
        if c.held.len() > CATCH_UP_HOLD_LIMIT {
            tracing::warn!("catch-up too slow; every client resumes on its own");
            self.catch_up = None;
            self.end_streams(self.clients.queues(), EndReason::Resync);
        }
    }

    fn count(&mut self, t: Tally) {
        self.metrics.events_received.inc_by(t.received);
        self.metrics.deliveries.inc_by(t.delivered);
        if t.deepest > 0 {
            self.metrics.queue_depth.observe(t.deepest as f64);
        }
        self.count_evicted(t.evicted);
        if t.behind {
            // A live sequence below what its subscription delivered: usual
            // right after subscribing, or the stream was recreated.
            self.check_stream("a live sequence went back", false);
        }
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
