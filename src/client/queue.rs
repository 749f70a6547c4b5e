//! One client's bounded queue of encoded frames: filled by the hub (live),
//! by a resume's replay (history), drained by the response body.
//!
//! The queue is where a client's ids are kept strictly increasing: it
//! refuses any sequence at or below the last one it took, so overlapping
//! subscriptions deliver once, and a resume's held live frames are released
//! after the replayed ones with no duplicate at the seam.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};

/// Largest chunk handed to the socket at once when coalescing frames.
const MAX_CHUNK: usize = 64 * 1024;

/// Queued frames in order. One frame, all a connection that keeps up ever
/// holds, is kept inline: queueing and taking it touch the queue's own
/// memory only (on a fan-out to 10,000 queues a separate buffer is a cache
/// miss on each side), and such a connection never allocates a buffer.
/// More frames go into a deque, given back once drained: a connection that
/// fell behind once (a burst, a slow round) goes back to the inline frame
/// instead of paying the deque's miss on every delivery after it.
#[derive(Debug)]
enum Frames {
    One(Bytes),
    Many(VecDeque<Bytes>),
}

impl Default for Frames {
    fn default() -> Self {
        Frames::Many(VecDeque::new())
    }
}

impl Frames {
    fn len(&self) -> usize {
        match self {
            Frames::One(_) => 1,
            Frames::Many(d) => d.len(),
        }
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_back(&mut self, frame: Bytes) {
        match self {
            Frames::Many(d) if d.capacity() > 0 => d.push_back(frame),
            Frames::Many(_) => *self = Frames::One(frame),
            Frames::One(first) => {
                let mut d = VecDeque::with_capacity(4);
                d.push_back(first.clone());
                d.push_back(frame);
                *self = Frames::Many(d);
            }
        }
    }

    fn pop_front(&mut self) -> Option<Bytes> {
        if let Frames::Many(d) = self {
            return d.pop_front();
        }
        let Frames::One(f) = std::mem::take(self) else {
            return None;
        };
        Some(f)
    }

    fn iter(&self) -> impl Iterator<Item = &Bytes> {
        let (one, many) = match self {
            Frames::One(f) => (Some(f), None),
            Frames::Many(d) => (None, Some(d.iter())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// Gives back the room a burst took, once drained.
    fn trim(&mut self) {
        if matches!(self, Frames::Many(d) if d.is_empty() && d.capacity() > 0) {
            *self = Frames::default();
        }
    }
}

/// Why a stream ends; the closing party, named in logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The queue was full: the client reads slower than events arrive.
    Slow,
    /// The token's `exp` (plus leeway) has passed.
    Expired,
    /// The relay is shutting down; the client should reconnect elsewhere.
    Shutdown,
    /// The relay could not keep the client's history whole (e.g. its NATS
    /// subscription failed); the client resumes by Last-Event-ID.
    Resync,
    /// The stream was deleted and created again: its sequences restarted,
    /// and the client starts over from the new stream's beginning.
    Reset,
    /// The stream reached `--max-stream-age`: it resumes (perhaps on
    /// another machine) so load rebalances.
    MaxAge,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Slow => "evicted: slow",
            EndReason::Expired => "token expired",
            EndReason::Shutdown => "shutdown",
            EndReason::Resync => "resync",
            EndReason::Reset => "stream reset",
            EndReason::MaxAge => "max stream age",
        }
    }

    /// The metric label: a snake_case token.
    pub fn label(self) -> &'static str {
        match self {
            EndReason::Slow => "evicted_slow",
            EndReason::Expired => "token_expired",
            EndReason::Shutdown => "shutdown",
            EndReason::Resync => "resync",
            EndReason::Reset => "stream_reset",
            EndReason::MaxAge => "max_stream_age",
        }
    }

    pub const ALL: [EndReason; 6] = [
        EndReason::Slow,
        EndReason::Expired,
        EndReason::Shutdown,
        EndReason::Resync,
        EndReason::Reset,
        EndReason::MaxAge,
    ];
}

/// Outcome of offering a frame to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Queued,
    /// The client already has this sequence (overlapping subjects).
    Duplicate,
    /// The queue is full; the caller must end this client.
    Full,
    /// The stream has already ended.
    Closed,
}

/// One client's bounded queue of encoded frames, filled by the hub and drained
/// by the response body. A std `Mutex` is right here: it is never held across
/// an await and the critical sections are a few pointer moves.
#[derive(Debug)]
pub struct ClientQueue {
    state: Mutex<QueueState>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct QueueState {
    frames: Frames,
    /// Highest event id queued so far: ids must strictly increase.
    last_seq: u64,
    /// Set when the stream must end after `tail` (if any) is written.
    end: Option<EndReason>,
    tail: Option<Bytes>,
    waker: Option<Waker>,
    /// While a resume replays history, live frames wait here (bounded by
    /// the capacity) and are released after the replayed ones.
    /// Each with when the stream stored it (see `stored_us`).
    held: Option<VecDeque<(u64, Bytes, u64)>>,
    /// The replay writer waiting for room in `frames`.
    space_waker: Option<Waker>,
    /// Something was queued since the heartbeat sweep last looked.
    wrote: bool,
    /// When the stream stored the oldest live event not yet taken by the
    /// body (µs since the Unix epoch; 0: none or unknown).
    stored_us: u64,
    /// Events queued so far (replayed or live).
    events: u64,
    /// The body that drained the queue is gone (the client left): nothing
    /// will take frames again, so nothing may wait for room or add more.
    abandoned: bool,
}

impl ClientQueue {
    pub fn new(capacity: usize, last_seq: u64) -> Self {
        ClientQueue {
            state: Mutex::new(QueueState {
                last_seq,
                ..QueueState::default()
            }),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the queue inconsistent
        // (every critical section is a single push/pop), so poison is ignored.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A queue that holds live frames until [`ClientQueue::release`]: for a
    /// client resuming after `last_seq`.
    pub fn held(capacity: usize, last_seq: u64) -> Self {
        let q = ClientQueue::new(capacity, last_seq);
        q.lock().held = Some(VecDeque::new());
        q
    }

    /// Queues an event frame with sequence `seq` unless the client already has it.
    pub fn offer(&self, seq: u64, frame: &Bytes) -> Offer {
        self.offer_live(seq, frame, 0, &mut 0)
    }

    /// [`ClientQueue::offer`] for a live event the stream stored at
    /// `stored_us` (µs since the Unix epoch; 0: unknown), so the body can
    /// measure how long it took to reach the socket. Raises `deepest` to
    /// the queue's length once the frame is queued.
    pub fn offer_live(
        &self,
        seq: u64,
        frame: &Bytes,
        stored_us: u64,
        deepest: &mut usize,
    ) -> Offer {
        let mut st = self.lock();
        if st.end.is_some() || st.abandoned {
            return Offer::Closed;
        }
        if seq <= st.last_seq {
            return Offer::Duplicate;
        }
        let capacity = self.capacity;
        if let Some(held) = &mut st.held {
            if held.back().is_some_and(|(s, ..)| *s >= seq) {
                return Offer::Duplicate;
            }
            if held.len() >= capacity {
                return Offer::Full;
            }
            held.push_back((seq, frame.clone(), stored_us));
            return Offer::Queued;
        }
        if st.frames.len() >= self.capacity {
            return Offer::Full;
        }
        st.last_seq = seq;
        st.events += 1;
        if st.stored_us == 0 {
            st.stored_us = stored_us;
        }
        *deepest = (*deepest).max(st.frames.len() + 1);
        push_and_wake(st, frame);
        Offer::Queued
    }

    /// Replays a historical frame, bypassing the hold; `false` when the
    /// stream has ended. Callers bound the amount (see `poll_space`).
    pub fn replay(&self, seq: u64, frame: &Bytes) -> bool {
        let mut st = self.lock();
        if st.end.is_some() || st.abandoned {
            return false;
        }
        if seq > st.last_seq {
            st.last_seq = seq;
            st.events += 1;
            push_and_wake(st, frame);
        }
        true
    }

    /// The sequence of the first live frame held during a resume, if any.
    pub fn first_held(&self) -> Option<u64> {
        self.lock()
            .held
            .as_ref()
            .and_then(|h| h.front().map(|(seq, ..)| *seq))
    }

    /// Events queued so far, and why the stream ended (None: still open).
    pub fn summary(&self) -> (u64, Option<EndReason>) {
        let st = self.lock();
        (st.events, st.end)
    }

    /// Ready when the replay writer may queue more (or the stream ended,
    /// or its body is gone: then [`ClientQueue::replay`] says stop).
    pub fn poll_space(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.lock();
        if st.end.is_some() || st.abandoned || st.frames.len() < self.capacity / 2 + 1 {
            return Poll::Ready(());
        }
        st.space_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ends the hold: live frames that arrived during the replay follow the
    /// replayed ones, minus any the replay already delivered.
    ///
    /// `relay.live` goes in at the seam: after the last replayed event,
    /// before the first live one, naming the last id the client has.
    pub fn release(&self) {
        let mut st = self.lock();
        let Some(held) = st.held.take() else { return };
        let marker = crate::sse::encode_live(Some(st.last_seq));
        st.frames.push_back(marker);
        for (seq, f, stored_us) in held {
            if seq > st.last_seq {
                st.last_seq = seq;
                st.events += 1;
                st.frames.push_back(f);
                if st.stored_us == 0 {
                    st.stored_us = stored_us;
                }
            }
        }
        st.wrote = true;
        let waker = st.waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Queues a frame that carries no event id (comments, control events).
    /// Returns false when the queue is full or ended.
    pub fn offer_unsequenced(&self, frame: &Bytes) -> bool {
        let st = self.lock();
        if st.end.is_some() || st.abandoned || st.frames.len() >= self.capacity {
            return false;
        }
        push_and_wake(st, frame);
        true
    }

    /// A heartbeat is only worth sending to a stream that wrote nothing
    /// since the sweep last looked (one heartbeat interval): true when one
    /// was queued.
    pub fn heartbeat(&self, frame: &Bytes) -> bool {
        let mut st = self.lock();
        let wrote = std::mem::take(&mut st.wrote);
        if st.end.is_some() || st.abandoned || wrote || !st.frames.is_empty() {
            return false;
        }
        // The heartbeat itself is not writing: the next look decides anew.
        queue_and_wake(st, frame, false);
        true
    }

    /// Ends the stream: after what is queued (or immediately for a slow
    /// client, whose backlog is dropped) the body writes `tail` and
    /// finishes. False when it had already ended.
    pub fn close(&self, reason: EndReason, tail: Option<Bytes>) -> bool {
        let mut st = self.lock();
        if st.end.is_some() {
            return false;
        }
        if reason == EndReason::Slow {
            st.frames = Frames::default();
            st.held = None;
        }
        st.end = Some(reason);
        st.tail = tail;
        let waker = st.waker.take();
        let space = st.space_waker.take();
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        if let Some(w) = space {
            w.wake();
        }
        true
    }

    /// The body that drained this queue was dropped (the client left):
    /// frees what is queued and held, and wakes a replay waiting for room,
    /// which then stops. Without this a replay of a client that hung up
    /// would wait forever, keeping its JetStream read permit.
    pub fn abandon(&self) {
        let mut st = self.lock();
        st.abandoned = true;
        st.frames = Frames::default();
        st.held = None;
        st.tail = None;
        let space = st.space_waker.take();
        drop(st);
        if let Some(w) = space {
            w.wake();
        }
    }

    /// Takes everything queued as one chunk, or registers the waker.
    #[cfg(test)]
    pub(crate) fn poll_chunk(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        self.poll_chunk_stored(cx)
            .map(|c| c.map(|(chunk, _)| chunk))
    }

    /// [`ClientQueue::poll_chunk`], with when the stream stored the oldest
    /// live event in the chunk (µs since the Unix epoch; 0: none known).
    pub(crate) fn poll_chunk_stored(&self, cx: &mut Context<'_>) -> Poll<Option<(Bytes, u64)>> {
        let mut st = self.lock();
        let chunk = match st.frames.len() {
            0 => None,
            1 => st.frames.pop_front(),
            _ => {
                let mut size = 0;
                let n = st
                    .frames
                    .iter()
                    .take_while(|f| {
                        let fits = size == 0 || size + f.len() <= MAX_CHUNK;
                        size += f.len();
                        fits
                    })
                    .count();
                let mut buf = BytesMut::with_capacity(size.min(MAX_CHUNK.max(size)));
                for _ in 0..n {
                    if let Some(f) = st.frames.pop_front() {
                        buf.put_slice(&f);
                    }
                }
                Some(buf.freeze())
            }
        };
        st.frames.trim();
        if chunk.is_some() {
            if let Some(w) = st.space_waker.take() {
                w.wake();
            }
        }
        if let Some(chunk) = chunk {
            // What is left (a chunk is capped) is newer: keep the older
            // time, an upper bound for it.
            let stored = if st.frames.is_empty() {
                std::mem::take(&mut st.stored_us)
            } else {
                st.stored_us
            };
            return Poll::Ready(Some((chunk, stored)));
        }
        if st.end.is_some() {
            return Poll::Ready(st.tail.take().map(|t| (t, 0)));
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Queues `frame` and wakes the body, outside the lock.
fn push_and_wake(st: std::sync::MutexGuard<'_, QueueState>, frame: &Bytes) {
    queue_and_wake(st, frame, true);
}

/// Queues `frame`, noting whether it counts as the stream writing (a
/// heartbeat does not), and wakes the body outside the lock.
fn queue_and_wake(mut st: std::sync::MutexGuard<'_, QueueState>, frame: &Bytes, writing: bool) {
    st.frames.push_back(frame.clone());
    st.wrote |= writing;
    let waker = st.waker.take();
    drop(st);
    if let Some(w) = waker {
        w.wake();
    }
}

#[cfg(test)]
impl ClientQueue {
    fn is_held(&self) -> bool {
        self.lock().held.is_some()
    }

    fn is_empty(&self) -> bool {
        self.lock().frames.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sse::{encode_control, encode_event};

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn frames_keep_their_order_and_one_at_a_time_needs_no_buffer() {
        let mut f = Frames::default();
        let b = |n: u8| Bytes::from(vec![n]);
        for n in 1..=3 {
            f.push_back(b(n));
        }
        assert_eq!(f.pop_front(), Some(b(1)));
        f.push_back(b(4));
        assert_eq!(f.len(), 3);
        assert_eq!(f.iter().map(|x| x[0]).collect::<Vec<_>>(), vec![2, 3, 4]);
        let drained: Vec<u8> = std::iter::from_fn(|| f.pop_front()).map(|x| x[0]).collect();
        assert_eq!(drained, vec![2, 3, 4]);
        assert!(f.is_empty());
        assert_eq!(f.iter().count(), 0);
        for n in 0..100 {
            f.push_back(b(n));
        }
        while f.pop_front().is_some() {}
        f.trim();
        assert!(
            matches!(&f, Frames::Many(d) if d.capacity() == 0),
            "a drained burst gives its room back"
        );
        // One frame at a time: never a buffer.
        f.push_back(b(1));
        assert!(matches!(f, Frames::One(_)));
        assert_eq!(f.pop_front(), Some(b(1)));
        f.push_back(b(2));
        assert_eq!(f.iter().map(|x| x[0]).collect::<Vec<_>>(), vec![2]);
        assert!(matches!(f, Frames::One(_)));
        // A small burst too: once drained, one frame at a time is inline
        // again.
        f.push_back(b(3));
        assert!(matches!(&f, Frames::Many(d) if d.capacity() > 0));
        while f.pop_front().is_some() {}
        f.trim();
        f.push_back(b(4));
        assert!(matches!(f, Frames::One(_)), "the burst's deque is not kept");
    }

    #[test]
    fn queue_drops_duplicates_and_bounds_length() {
        let q = ClientQueue::new(2, 5);
        let f = Bytes::from_static(b"x");
        assert_eq!(q.offer(5, &f), Offer::Duplicate);
        assert_eq!(q.offer(6, &f), Offer::Queued);
        assert_eq!(q.offer(6, &f), Offer::Duplicate);
        assert_eq!(q.offer(7, &f), Offer::Queued);
        assert_eq!(q.offer(8, &f), Offer::Full);
        q.close(EndReason::Slow, None);
        assert!(q.is_empty());
        assert_eq!(q.offer(9, &f), Offer::Closed);
    }

    #[test]
    fn held_live_frames_follow_the_replay_without_duplicates() {
        let q = ClientQueue::held(8, 10);
        let f = |n: u64| Bytes::from(format!("{n};"));
        // Live frames arrive while the replay runs...
        assert_eq!(q.offer(14, &f(14)), Offer::Queued);
        assert_eq!(q.offer(15, &f(15)), Offer::Queued);
        // ...the replay covers up to 14...
        for n in [11, 12, 14] {
            assert!(q.replay(n, &f(n)));
        }
        q.release();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let Poll::Ready(Some(chunk)) = q.poll_chunk(&mut cx) else {
            panic!("expected a chunk")
        };
        // relay.live marks the seam, naming the last replayed id.
        let live = "event: relay.live\ndata: {\"last_event_id\":14}\n\n";
        assert_eq!(text(&chunk), format!("11;12;14;{live}15;"));
        assert!(!q.is_held());
    }

    /// The body learns when the stream stored the oldest live event of each
    /// chunk it takes, held or not; replayed events carry no time.
    #[test]
    fn chunks_carry_the_oldest_store_time_of_their_live_events() {
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let f = Bytes::from_static(b"x");
        let q = ClientQueue::new(8, 0);
        let mut deepest = 0;
        assert_eq!(q.offer_live(1, &f, 100, &mut deepest), Offer::Queued);
        assert_eq!(q.offer_live(2, &f, 200, &mut deepest), Offer::Queued);
        assert_eq!(deepest, 2, "the queue's length after the last offer");
        assert!(matches!(
            q.poll_chunk_stored(&mut cx),
            Poll::Ready(Some((_, 100)))
        ));
        assert!(q.replay(3, &f));
        assert!(matches!(
            q.poll_chunk_stored(&mut cx),
            Poll::Ready(Some((_, 0)))
        ));

        let q = ClientQueue::held(8, 0);
        assert_eq!(q.offer_live(5, &f, 500, &mut deepest), Offer::Queued);
        assert!(q.replay(4, &f));
        q.release();
        assert!(matches!(
            q.poll_chunk_stored(&mut cx),
            Poll::Ready(Some((_, 500)))
        ));
        assert_eq!(q.summary(), (2, None), "two events queued, still open");
    }

    #[test]
    fn a_full_hold_counts_as_slow() {
        let q = ClientQueue::held(2, 0);
        let f = Bytes::from_static(b"x");
        assert_eq!(q.offer(1, &f), Offer::Queued);
        assert_eq!(q.offer(2, &f), Offer::Queued);
        assert_eq!(q.offer(3, &f), Offer::Full);
    }

    #[test]
    fn body_coalesces_queued_frames_then_ends_with_tail() {
        let q = ClientQueue::new(8, 0);
        q.offer(1, &encode_event(1, None, b"a"));
        q.offer(2, &encode_event(2, None, b"b"));
        q.close(
            EndReason::Expired,
            Some(encode_control("relay.expired", "{}")),
        );
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        let Poll::Ready(Some(chunk)) = q.poll_chunk(&mut cx) else {
            panic!("expected a chunk")
        };
        assert_eq!(text(&chunk), "id: 1\ndata: a\n\nid: 2\ndata: b\n\n");
        let Poll::Ready(Some(tail)) = q.poll_chunk(&mut cx) else {
            panic!("expected the tail")
        };
        assert_eq!(text(&tail), "event: relay.expired\ndata: {}\n\n");
        assert_eq!(q.poll_chunk(&mut cx), Poll::Ready(None));
    }
}
