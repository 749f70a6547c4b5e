//! An ordered merge of many NATS subscriptions into one sequence of batches.
//!
//! async-nats routes each incoming message into its subscription's own
//! channel, in the order the socket delivered them. Republished JetStream
//! messages arrive on the socket in stream-sequence order, so the per-channel
//! order is right but the order *across* channels is lost: a client reading
//! `a.*` and `b.*` through two channels could see seq 11 before seq 10.
//!
//! [`MergeSet`] restores the socket order. Every channel gets its own waker
//! that records "this slot has something" in a ready list. A batch is
//! collected by draining every ready slot, then looking at the ready list
//! again, until it is empty; the batch is then sorted by sequence.
//!
//! Why that is enough: the connection task pushes message m into its channel
//! and wakes the slot before it pushes any later message m'. So if a batch
//! holds m', then m was either drained already or its slot was in the ready
//! list before m' could be seen, and the final "ready list is empty" check
//! comes after m' was taken. Hence every message in a batch has a lower
//! sequence than every message in any later batch, and sorting each batch
//! yields the global order. Unlike `SelectAll`, nothing here yields early on
//! a budget, which would break that argument. For the same reason the task
//! that polls a `MergeSet` must run outside tokio's co-op budget
//! (`tokio::task::unconstrained`): a budget-exhausted channel answers Pending
//! and defers its wake-up, which would end a batch early.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::Stream;
use futures_util::task::AtomicWaker;
use slab::Slab;

/// Upper bound on one batch, so a flood cannot grow a batch without end.
/// Reached only when the connection task outruns the dispatcher for this
/// many messages; ordering then holds per batch boundary in practice since
/// the dispatcher drains much faster than a socket parses.
pub(crate) const MAX_BATCH: usize = 65_536;

#[derive(Default)]
struct ReadyList {
    slots: Mutex<Vec<usize>>,
    dispatcher: AtomicWaker,
}

struct SlotWaker {
    slot: usize,
    queued: AtomicBool,
    list: Arc<ReadyList>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.list
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.slot);
            self.list.dispatcher.wake();
        }
    }
}

struct Slot<S, K> {
    stream: S,
    key: K,
    waker: Arc<SlotWaker>,
}

/// A set of streams merged into ordered batches; `K` tags each item with the
/// slot's key (the hub uses the topic id).
pub(crate) struct MergeSet<S, K> {
    slots: Slab<Slot<S, K>>,
    list: Arc<ReadyList>,
    taken: Vec<usize>,
}

impl<S, K> Default for MergeSet<S, K> {
    fn default() -> Self {
        MergeSet {
            slots: Slab::new(),
            list: Arc::default(),
            taken: Vec::new(),
        }
    }
}

impl<S: Stream + Unpin, K: Copy> MergeSet<S, K> {
    /// Adds a stream; it is polled in the next batch.
    pub(crate) fn insert(&mut self, key: K, stream: S) -> usize {
        let slot = self.slots.vacant_key();
        let waker = Arc::new(SlotWaker {
            slot,
            queued: AtomicBool::new(false),
            list: self.list.clone(),
        });
        // Queue it once so that anything already in its channel is drained.
        waker.wake_by_ref();
        self.slots.insert(Slot { stream, key, waker })
    }

    /// Removes and returns the stream in `slot`.
    pub(crate) fn remove(&mut self, slot: usize) -> Option<S> {
        self.slots.try_remove(slot).map(|s| s.stream)
    }

    /// Collects every ready item into `out` (unsorted) and returns Ready when
    /// at least one item or an ended stream was found. Ended streams are
    /// reported in `ended` by key and removed.
    pub(crate) fn poll_batch(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<(K, S::Item)>,
        ended: &mut Vec<K>,
    ) -> Poll<()> {
        self.list.dispatcher.register(cx.waker());
        loop {
            if out.len() >= MAX_BATCH {
                // Leave the rest for the next batch, and make sure there is one.
                cx.waker().wake_by_ref();
                break;
            }
            {
                let mut slots = self.list.slots.lock().unwrap_or_else(|e| e.into_inner());
                std::mem::swap(&mut *slots, &mut self.taken);
            }
            if self.taken.is_empty() {
                break;
            }
            let mut taken = std::mem::take(&mut self.taken);
            for &idx in &taken {
                let Some(slot) = self.slots.get_mut(idx) else {
                    continue;
                };
                // Clear before polling: a message pushed while we drain
                // re-queues the slot instead of being missed.
                slot.waker.queued.store(false, Ordering::Release);
                let waker = Waker::from(slot.waker.clone());
                let mut scx = Context::from_waker(&waker);
                loop {
                    match std::pin::Pin::new(&mut slot.stream).poll_next(&mut scx) {
                        Poll::Ready(Some(item)) => out.push((slot.key, item)),
                        Poll::Ready(None) => {
                            ended.push(slot.key);
                            self.slots.remove(idx);
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
            }
            taken.clear();
            self.taken = taken;
        }
        if out.is_empty() && ended.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;
    use tokio_stream_shim::ReceiverStream;

    /// A tiny stand-in for tokio-stream's wrapper, to avoid a dependency.
    mod tokio_stream_shim {
        use super::*;
        pub(super) struct ReceiverStream(pub(super) mpsc::UnboundedReceiver<u64>);
        impl Stream for ReceiverStream {
            type Item = u64;
            fn poll_next(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<u64>> {
                self.0.poll_recv(cx)
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_are_globally_ordered_across_channels() {
        const N: u64 = 200_000;
        let mut set: MergeSet<ReceiverStream, usize> = MergeSet::default();
        let mut senders = Vec::new();
        for k in 0..4 {
            let (tx, rx) = mpsc::unbounded_channel();
            senders.push(tx);
            set.insert(k, ReceiverStream(rx));
        }
        // One producer pushes increasing numbers into pseudo-random channels,
        // as the NATS connection task does with sequences.
        let producer = std::thread::spawn(move || {
            let mut x: u64 = 0x9E3779B97F4A7C15;
            for seq in 1..=N {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                senders[(x % 4) as usize].send(seq).unwrap();
            }
        });
        // Let the channels fill so that batches are large: a batch that
        // stops early (e.g. on tokio's co-op budget) would show up as
        // disorder here.
        producer.join().unwrap();
        let mut last = 0;
        let mut seen = 0;
        let mut out = Vec::new();
        let mut ended = Vec::new();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        while seen < N {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            out.clear();
            let batch = std::future::poll_fn(|cx| set.poll_batch(cx, &mut out, &mut ended));
            tokio::task::unconstrained(batch).await;
            out.sort_by_key(|(_, s)| *s);
            for (_, s) in &out {
                assert!(*s > last, "{s} after {last}");
                last = *s;
                seen += 1;
            }
        }
    }
}
