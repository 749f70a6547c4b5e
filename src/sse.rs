//! The SSE wire format and the response body that drains one client's queue.
//!
//! Every event is encoded once into a [`Bytes`] frame by the hub and shared by
//! every client that receives it; a client's [`ClientQueue`] only holds cheap
//! clones. The body coalesces whatever is queued into one chunk per poll, so a
//! burst costs one write per client rather than one per event.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};

/// A heartbeat: an SSE comment, ignored by EventSource but it keeps proxies
/// and NAT tables from timing the connection out.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// Largest chunk the body hands to hyper at once when coalescing frames.
const MAX_CHUNK: usize = 64 * 1024;

/// A queue keeps at most this many slots of capacity once it drains, so a
/// burst does not pin memory to an idle connection.
const IDLE_CAPACITY: usize = 16;

/// Encodes one event. `data` is split on CRLF, LF or CR into `data:` lines so
/// that EventSource reassembles exactly the payload (joined with LF; a CR or
/// CRLF in the payload arrives as LF, which is all the format can carry).
pub fn encode_event(id: u64, event: Option<&str>, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(data.len() + 32);
    buf.put_slice(b"id: ");
    buf.put_slice(itoa::Buffer::new().format(id).as_bytes());
    buf.put_u8(b'\n');
    if let Some(event) = event {
        buf.put_slice(b"event: ");
        // An event name cannot span lines; keep its first line only.
        let name = event.split(['\r', '\n']).next().unwrap_or_default();
        buf.put_slice(name.as_bytes());
        buf.put_u8(b'\n');
    }
    put_data_lines(&mut buf, data);
    buf.put_u8(b'\n');
    buf.freeze()
}

/// Encodes a named event without an id (relay control events such as
/// `relay.expired` and `relay.gap`); these never move a client's resume point.
pub fn encode_control(event: &str, data: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(event.len() + data.len() + 16);
    buf.put_slice(b"event: ");
    buf.put_slice(event.as_bytes());
    buf.put_u8(b'\n');
    put_data_lines(&mut buf, data.as_bytes());
    buf.put_u8(b'\n');
    buf.freeze()
}

/// `retry: <ms>` tells EventSource how long to wait before reconnecting.
pub fn encode_retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

fn put_data_lines(buf: &mut BytesMut, data: &[u8]) {
    let mut rest = data;
    loop {
        buf.put_slice(b"data: ");
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                buf.put_slice(&rest[..i]);
                buf.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                buf.put_slice(rest);
                buf.put_u8(b'\n');
                return;
            }
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
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Slow => "evicted: slow",
            EndReason::Expired => "token expired",
            EndReason::Shutdown => "shutdown",
            EndReason::Resync => "resync",
        }
    }
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
    frames: VecDeque<Bytes>,
    /// Highest event id queued so far: ids must strictly increase.
    last_seq: u64,
    /// Set when the stream must end after `tail` (if any) is written.
    end: Option<EndReason>,
    tail: Option<Bytes>,
    waker: Option<Waker>,
    /// While a resume replays history, live frames wait here (bounded by
    /// the capacity) and are released after the replayed ones.
    held: Option<VecDeque<(u64, Bytes)>>,
    /// The replay writer waiting for room in `frames`.
    space_waker: Option<Waker>,
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
        let mut st = self.lock();
        if st.end.is_some() {
            return Offer::Closed;
        }
        if seq <= st.last_seq {
            return Offer::Duplicate;
        }
        let capacity = self.capacity;
        if let Some(held) = &mut st.held {
            if held.back().is_some_and(|(s, _)| *s >= seq) {
                return Offer::Duplicate;
            }
            if held.len() >= capacity {
                return Offer::Full;
            }
            held.push_back((seq, frame.clone()));
            return Offer::Queued;
        }
        if st.frames.len() >= self.capacity {
            return Offer::Full;
        }
        st.last_seq = seq;
        push_and_wake(st, frame);
        Offer::Queued
    }

    /// Replays a historical frame, bypassing the hold; `false` when the
    /// stream has ended. Callers bound the amount (see `poll_space`).
    pub fn replay(&self, seq: u64, frame: &Bytes) -> bool {
        let mut st = self.lock();
        if st.end.is_some() {
            return false;
        }
        if seq > st.last_seq {
            st.last_seq = seq;
            push_and_wake(st, frame);
        }
        true
    }

    /// Ready when the replay writer may queue more (or the stream ended).
    pub fn poll_space(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut st = self.lock();
        if st.end.is_some() || st.frames.len() < self.capacity / 2 + 1 {
            return Poll::Ready(());
        }
        st.space_waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Ends the hold: live frames that arrived during the replay follow the
    /// replayed ones, minus any the replay already delivered.
    pub fn release(&self) {
        let mut st = self.lock();
        let Some(held) = st.held.take() else { return };
        for (seq, f) in held {
            if seq > st.last_seq {
                st.last_seq = seq;
                st.frames.push_back(f);
            }
        }
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
        if st.end.is_some() || st.frames.len() >= self.capacity {
            return false;
        }
        push_and_wake(st, frame);
        true
    }

    /// A heartbeat is only worth sending to a connection with nothing queued.
    pub fn heartbeat(&self, frame: &Bytes) -> bool {
        let st = self.lock();
        if st.end.is_some() || !st.frames.is_empty() {
            return true;
        }
        push_and_wake(st, frame);
        true
    }

    /// Ends the stream: after what is queued (or immediately for a slow
    /// client, whose backlog is dropped) the body writes `tail` and finishes.
    pub fn close(&self, reason: EndReason, tail: Option<Bytes>) {
        let mut st = self.lock();
        if st.end.is_some() {
            return;
        }
        if reason == EndReason::Slow {
            st.frames = VecDeque::new();
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
    }

    /// Takes everything queued as one chunk, or registers the waker.
    fn poll_chunk(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
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
                for f in st.frames.drain(..n) {
                    buf.put_slice(&f);
                }
                Some(buf.freeze())
            }
        };
        if st.frames.is_empty() && st.frames.capacity() > IDLE_CAPACITY {
            st.frames = VecDeque::new();
        }
        if chunk.is_some() {
            if let Some(w) = st.space_waker.take() {
                w.wake();
            }
        }
        if let Some(chunk) = chunk {
            return Poll::Ready(Some(chunk));
        }
        if st.end.is_some() {
            return Poll::Ready(st.tail.take());
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// Queues `frame` and wakes the body, outside the lock.
fn push_and_wake(mut st: std::sync::MutexGuard<'_, QueueState>, frame: &Bytes) {
    st.frames.push_back(frame.clone());
    let waker = st.waker.take();
    drop(st);
    if let Some(w) = waker {
        w.wake();
    }
}

/// Called when a streaming body is dropped (the client went away or the
/// stream ended), so the hub can forget the client.
pub trait Departure: Send + Sync + 'static {
    fn depart(&self, client: u64);
}

/// The response body of every `/events` response.
pub struct SseBody {
    kind: BodyKind,
}

enum BodyKind {
    /// A fixed body (errors, transient refusals).
    Full(Option<Bytes>),
    /// A live stream fed by the hub.
    Stream {
        queue: Arc<ClientQueue>,
        client: u64,
        hub: Arc<dyn Departure>,
        done: bool,
    },
}

impl SseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let b: Bytes = bytes.into();
        SseBody {
            kind: BodyKind::Full(if b.is_empty() { None } else { Some(b) }),
        }
    }

    pub fn empty() -> Self {
        SseBody {
            kind: BodyKind::Full(None),
        }
    }

    pub fn stream(queue: Arc<ClientQueue>, client: u64, hub: Arc<dyn Departure>) -> Self {
        SseBody {
            kind: BodyKind::Stream {
                queue,
                client,
                hub,
                done: false,
            },
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            BodyKind::Stream { queue, done, .. } => {
                if *done {
                    return Poll::Ready(None);
                }
                match queue.poll_chunk(cx) {
                    Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                    Poll::Ready(None) => {
                        *done = true;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Full(b) => b.is_none(),
            BodyKind::Stream { done, .. } => *done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            BodyKind::Full(None) => SizeHint::with_exact(0),
            BodyKind::Stream { .. } => SizeHint::default(),
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        if let BodyKind::Stream { client, hub, .. } = &self.kind {
            hub.depart(*client);
        }
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

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn encodes_id_event_and_data() {
        let f = encode_event(42, Some("order.shipped"), b"{\"a\":1}");
        assert_eq!(
            text(&f),
            "id: 42\nevent: order.shipped\ndata: {\"a\":1}\n\n"
        );
    }

    #[test]
    fn splits_every_line_ending() {
        let f = encode_event(1, None, b"a\r\nb\rc\nd");
        assert_eq!(text(&f), "id: 1\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
        let f = encode_event(2, None, b"x\n");
        assert_eq!(text(&f), "id: 2\ndata: x\ndata: \n\n");
        let f = encode_event(3, None, b"");
        assert_eq!(text(&f), "id: 3\ndata: \n\n");
    }

    #[test]
    fn event_name_cannot_inject_lines() {
        let f = encode_event(7, Some("a\ndata: evil"), b"x");
        assert_eq!(text(&f), "id: 7\nevent: a\ndata: x\n\n");
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
        assert_eq!(text(&chunk), "11;12;14;15;");
        assert!(!q.is_held());
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
        let q = Arc::new(ClientQueue::new(8, 0));
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
