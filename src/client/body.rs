//! The response body of every `/events` response: a fixed body (refusals)
//! or a live stream that drains one client's [`ClientQueue`], coalescing
//! whatever is queued into one chunk per poll, so a burst costs one write
//! per client rather than one per event.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::{ClientId, ClientQueue};
use crate::limits::StreamPermit;
use crate::metrics::Metrics;

/// What the line logged when a stream ends says of it; kept only while
/// that line is enabled (`RUST_LOG=sse_relay::stream=debug`), so streams
/// carry nothing for it otherwise.
#[derive(Debug)]
pub struct StreamLog {
    pub peer: std::net::IpAddr,
    /// The token's `sub` ("-" without one).
    pub sub: String,
    pub subjects: Vec<String>,
    /// Where the stream started: `fresh`, `after <id>`, `initial`, `reset`.
    pub start: String,
    pub bytes: u64,
}

/// The target of the per-stream end line.
pub const STREAM_LOG: &str = "sse_relay::stream";

/// Called when a streaming body is dropped (the client went away or the
/// stream ended), so the hub can forget the client.
pub trait Departure: Send + Sync + 'static {
    fn depart(&self, client: ClientId);
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
        client: ClientId,
        hub: Arc<dyn Departure>,
        done: bool,
        /// The stream's place under the per-IP and per-token limits, given
        /// back when the body is dropped.
        _permit: Option<Box<StreamPermit>>,
        metrics: Arc<Metrics>,
        opened: std::time::Instant,
        log: Option<Box<StreamLog>>,
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

    pub(crate) fn stream(
        queue: Arc<ClientQueue>,
        client: ClientId,
        hub: Arc<dyn Departure>,
        permit: Option<Box<StreamPermit>>,
        metrics: Arc<Metrics>,
        log: Option<Box<StreamLog>>,
    ) -> Self {
        SseBody {
            kind: BodyKind::Stream {
                queue,
                client,
                hub,
                done: false,
                _permit: permit,
                metrics,
                opened: std::time::Instant::now(),
                log,
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
            BodyKind::Stream {
                queue,
                done,
                metrics,
                log,
                ..
            } => {
                if *done {
                    return Poll::Ready(None);
                }
                match queue.poll_chunk_stored(cx) {
                    Poll::Ready(Some((chunk, stored_us))) => {
                        let n = chunk.len() as u64;
                        metrics.bytes_written.inc_by(n);
                        if let Some(log) = log {
                            log.bytes += n;
                        }
                        if stored_us != 0 && sampled() {
                            metrics.write_latency.observe(seconds_since(stored_us));
                        }
                        Poll::Ready(Some(Ok(Frame::data(chunk))))
                    }
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
        if let BodyKind::Stream {
            client,
            hub,
            queue,
            metrics,
            opened,
            log,
            ..
        } = &self.kind
        {
            // Nothing drains the queue from here on: a replay into it stops.
            queue.abandon();
            hub.depart(*client);
            let lasted = opened.elapsed();
            metrics.stream_duration.observe(lasted.as_secs_f64());
            if let Some(log) = log {
                let (events, end) = queue.summary();
                let why = end.map_or("client left", |r| r.label());
                tracing::debug!(
                    target: STREAM_LOG,
                    peer = %log.peer,
                    sub = ?log.sub,
                    subjects = ?log.subjects,
                    start = %log.start,
                    events,
                    bytes = log.bytes,
                    seconds = lasted.as_secs_f64(),
                    ended = why,
                    "stream ended"
                );
            }
        }
    }
}

/// One live write in [`LATENCY_SAMPLE`] is timed: a clock read and a
/// histogram update on every write cost a quarter more user time per
/// delivery at 10k x 10 msg/s (BENCHMARKS.md), and a uniform sample keeps
/// the percentiles. Counted per shard thread, so shards never share it.
fn sampled() -> bool {
    thread_local! {
        static WRITES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
    }
    WRITES.with(|w| {
        let n = w.get().wrapping_add(1);
        w.set(n);
        n % LATENCY_SAMPLE == 0
    })
}

/// See [`sampled`].
pub const LATENCY_SAMPLE: u32 = 16;

/// Seconds from `us` (µs since the Unix epoch) to now; 0 when the clocks
/// disagree (NATS' ahead of ours).
fn seconds_since(us: u64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    now.saturating_sub(us) as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::task::{Wake, Waker};

    struct NoHub;

    impl Departure for NoHub {
        fn depart(&self, _: ClientId) {}
    }

    #[derive(Default)]
    struct Flag(AtomicBool);

    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// A resume's replay waits for the body to take what is queued. When
    /// the client hangs up mid-replay nothing ever will: dropping the body
    /// must wake the replay and stop it, or it waits forever and keeps one
    /// of the shard's JetStream read permits (with all of them kept, every
    /// later resume stalls, open and silent).
    #[test]
    fn dropping_the_body_stops_a_replay_waiting_for_room() {
        let queue = Arc::new(ClientQueue::held(4, 0));
        let metrics = Arc::new(Metrics::default());
        let body = SseBody::stream(
            queue.clone(),
            ClientId(1),
            Arc::new(NoHub),
            None,
            metrics,
            None,
        );
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let frame = Bytes::from_static(b"data: x\n\n");
        let mut seq = 0;
        while queue.poll_space(&mut cx).is_ready() {
            seq += 1;
            assert!(queue.replay(seq, &frame));
            assert!(seq < 10, "the queue never asked the replay to wait");
        }
        drop(body);
        assert!(
            flag.0.load(Ordering::SeqCst),
            "the waiting replay was not woken"
        );
        assert_eq!(queue.poll_space(&mut cx), Poll::Ready(()));
        assert!(
            !queue.replay(seq + 1, &frame),
            "the replay goes on into a queue nobody reads"
        );
    }
}
