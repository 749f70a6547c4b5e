//! The per-shard hub: shared NATS subscriptions, frame-once fan-out, bounded
//! client queues, heartbeats and token expiry, all driven by ONE task.
//!
//! ```text
//!  session --Join/Leave--> Dispatcher task <--MergeSet-- one live subscription
//!                              |                         per distinct pattern
//!                              | encode once, sort batch by seq   (Upstream)
//!                              v
//!          ClientQueue (bounded, per client) --> SseBody --> socket
//! ```
//!
//! Files: [`dispatcher`] the task and its loop; [`topics`] subscriptions
//! and the clients on them; [`fanout`] delivery in sequence order;
//! [`resume`] resumes from the memory [`window`]; [`catch_up`] after the
//! live path may have missed events; [`merge`] the ordered merge of
//! subscriptions. What the hub needs from NATS is the
//! [`Upstream`](crate::nats::Upstream) trait, which the hub's tests fake.
//!
//! Invariants (each held by a unit test in `tests/`, named in
//! ARCHITECTURE.md):
//! - Exactly one subscription per distinct requested pattern, created on
//!   first use and dropped (UNSUB) when its last client leaves (a client
//!   still joining counts).
//! - Frames reach every queue in stream-sequence order (see `merge.rs`), and a
//!   queue refuses any sequence at or below the last one it took, so a client
//!   on overlapping patterns gets each event once, ids strictly increasing.
//! - The fan-out never waits: a full queue ends that client (it resumes by
//!   Last-Event-ID); nobody else is slowed.
//! - No per-client task or timer: one heartbeat tick and one expiry timer
//!   serve the whole shard.
//! - A resuming client's queue holds live frames while history is replayed
//!   (from the memory window when it reaches back far enough, else by the
//!   session from JetStream), then releases them: no gap, no duplicate.
//! - When the live path may have missed events (NATS reconnect, slow
//!   consumer, stream leader change), live frames are held shard-wide while
//!   every subscription catches up from the last sequence it delivered; the
//!   caught-up and held frames are then merged by sequence and delivered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientId, ClientQueue, Departure};
use crate::metrics::Metrics;
use crate::nats::{HistoryError, LinkEvent};
use crate::sse;

pub(crate) mod bench;
mod catch_up;
mod dispatcher;
mod drain;
mod fanout;
mod merge;
mod reset;
mod resume;
#[cfg(test)]
mod tests;
mod topics;
mod window;

pub(crate) use crate::nats::{LiveMessage, Upstream};

#[derive(Debug, Clone)]
pub(crate) struct HubConfig {
    pub heartbeat: Duration,
    pub client_queue: usize,
    pub retry_ms: u64,
    pub replay_cache_bytes: u64,
    /// Most events one resume or catch-up replays (0: no limit).
    pub replay_limit: u64,
    /// On shutdown, the closing of streams is spread over this long.
    pub drain: Duration,
    /// Streams older than this (plus jitter) end with a `retry:`.
    pub max_stream_age: Option<Duration>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum JoinError {
    #[error("the relay could not subscribe to NATS: {0}")]
    Subscribe(String),
    #[error("the relay is shutting down")]
    ShuttingDown,
}

/// What a client's heartbeat looks like: an SSE comment (invisible to
/// JavaScript, keeps proxies and NAT tables awake) or `relay.heartbeat`, an
/// event a page's watchdog can see (`heartbeat=event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heartbeat {
    Comment,
    Event,
}

/// How a resuming client's history is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backfill {
    /// Nothing to replay (a fresh stream), or already replayed from memory:
    /// the queue is live.
    Done,
    /// The memory window did not reach back far enough: the caller reads
    /// JetStream after this sequence, then releases the queue's hold.
    FromStream { after: u64 },
}

/// A client that joined: its id, the queue its response body drains, and
/// what is left of its resume.
pub(crate) struct Joined {
    pub id: ClientId,
    pub queue: Arc<ClientQueue>,
    pub backfill: Backfill,
}

/// Handle to the dispatcher task; cheap to share within a shard.
pub(crate) struct Hub {
    cmds: mpsc::UnboundedSender<Cmd>,
    next_id: AtomicU64,
    cfg: HubConfig,
    /// Highest sequence this shard knows the stream has reached (delivered
    /// live, or read as the stream's last sequence). The dispatcher raises
    /// it; resumes read it to validate ids without asking JetStream.
    max_seen: Arc<AtomicU64>,
    /// Asks the stream for its last sequence (one request for any number of
    /// concurrent callers: a storm on a shard that has just started).
    last_sequence: Box<dyn Fn(u64) -> LastSequence + Send + Sync>,
    /// Asks started so far; a caller is answered by any ask that started
    /// after it arrived.
    asks_started: AtomicU64,
    /// The number and end of the last ask that completed (held while asking).
    asked: tokio::sync::Mutex<(u64, Option<Instant>)>,
}

/// At most one "what is your last sequence" per interval: ids above
/// everything the shard has seen (a client coming from another shard or
/// region, or a bogus id) wait for the next ask instead of each making one.
const ASK_INTERVAL: Duration = Duration::from_secs(1);

type LastSequence = std::pin::Pin<Box<dyn Future<Output = Result<u64, HistoryError>> + Send>>;

/// A client asking the dispatcher to join its patterns.
struct JoinRequest {
    id: ClientId,
    queue: Arc<ClientQueue>,
    patterns: Vec<String>,
    deadline: Instant,
    resume: Option<u64>,
    /// A fresh stream that first gets stored events: never from memory.
    initial: bool,
    heartbeat: Heartbeat,
    reply: oneshot::Sender<Result<Backfill, JoinError>>,
}

/// What sessions ask of the dispatcher.
enum Cmd {
    Join(JoinRequest),
    Leave(ClientId),
    /// The stream's last sequence is below what the shard has seen: was it
    /// recreated?
    CheckStream,
}

impl Departure for Hub {
    fn depart(&self, client: ClientId) {
        let _ = self.cmds.send(Cmd::Leave(client));
    }
}

impl Hub {
    /// Starts the dispatcher task on the current runtime; it ends every
    /// stream when `shutdown` fires.
    pub(crate) fn start<U: Upstream>(
        upstream: U,
        cfg: HubConfig,
        metrics: Arc<Metrics>,
        link: broadcast::Receiver<LinkEvent>,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        let (tx, rx) = mpsc::unbounded_channel();
        let max_seen = Arc::new(AtomicU64::new(0));
        let dispatcher =
            dispatcher::Dispatcher::new(upstream.clone(), cfg.clone(), metrics, max_seen.clone());
        // Unconstrained: tokio's co-op budget would make a drained channel
        // report Pending early and defer its wake-up, cutting a batch short
        // and breaking the ordering argument in `merge.rs`.
        tokio::spawn(tokio::task::unconstrained(
            dispatcher.run(rx, link, shutdown),
        ));
        Arc::new(Hub {
            cmds: tx,
            next_id: AtomicU64::new(1),
            cfg,
            max_seen,
            last_sequence: Box::new(move |reaching| {
                let u = upstream.clone();
                Box::pin(async move { u.last_sequence(reaching).await })
            }),
            asks_started: AtomicU64::new(0),
            asked: tokio::sync::Mutex::new((0, None)),
        })
    }

    /// Highest sequence this shard knows the stream has reached (0 before
    /// the first subscription).
    pub(crate) fn max_seen(&self) -> u64 {
        self.max_seen.load(Ordering::Acquire)
    }

    /// The stream's last sequence, as far as needed to judge whether `id`
    /// exists: what this shard has seen when `id` is at or below it, else
    /// the stream's answer from an ask that started after this call did.
    /// Asks are shared by every caller waiting and made at most once per
    /// [`ASK_INTERVAL`], so unknown ids cannot multiply JetStream requests.
    pub(crate) async fn last_sequence_reaching(&self, id: u64) -> Result<u64, HistoryError> {
        if id <= self.max_seen() {
            return Ok(self.max_seen());
        }
        let arrived = self.asks_started.load(Ordering::Acquire);
        let mut asked = self.asked.lock().await;
        let (completed, at) = *asked;
        if id <= self.max_seen() || completed > arrived {
            return Ok(self.max_seen());
        }
        if let Some(at) = at {
            tokio::time::sleep_until(at + ASK_INTERVAL).await;
        }
        let number = self.asks_started.fetch_add(1, Ordering::AcqRel) + 1;
        let last = (self.last_sequence)(id).await?;
        *asked = (number, Some(Instant::now()));
        if last < self.max_seen() {
            let _ = self.cmds.send(Cmd::CheckStream);
            return Ok(last);
        }
        self.max_seen.fetch_max(last, Ordering::AcqRel);
        Ok(self.max_seen())
    }

    /// Registers a client for `patterns` (already authorized and inside the
    /// stream) and returns once every subscription is active on the server.
    /// With `resume`, events after that sequence are replayed from memory
    /// before this returns when the window holds them; otherwise the queue
    /// holds live frames and [`Backfill::FromStream`] tells the caller to
    /// replay from JetStream and then release it.
    pub(crate) async fn join(
        &self,
        patterns: Vec<String>,
        deadline: SystemTime,
        resume: Option<u64>,
        heartbeat: Heartbeat,
    ) -> Result<Joined, JoinError> {
        self.join_with(patterns, deadline, resume, false, heartbeat, None)
            .await
    }

    /// Joins a client whose Last-Event-ID is from a stream that no longer
    /// exists (beyond the stream's end): `relay.reset` (`id: 0`) first,
    /// then the stream from its beginning, like a resume from 0.
    pub(crate) async fn join_reset(
        &self,
        patterns: Vec<String>,
        deadline: SystemTime,
        heartbeat: Heartbeat,
    ) -> Result<Joined, JoinError> {
        let notice = sse::encode_reset();
        self.join_with(patterns, deadline, Some(0), false, heartbeat, Some(notice))
            .await
    }

    /// Joins a fresh stream that first gets stored events (`initial=`):
    /// its queue holds live frames from the moment its subscriptions are
    /// active, and the answer is always [`Backfill::FromStream`] (from 0),
    /// for the caller to read what it was asked for and then release.
    pub(crate) async fn join_initial(
        &self,
        patterns: Vec<String>,
        deadline: SystemTime,
        heartbeat: Heartbeat,
    ) -> Result<Joined, JoinError> {
        self.join_with(patterns, deadline, Some(0), true, heartbeat, None)
            .await
    }

    async fn join_with(
        &self,
        patterns: Vec<String>,
        deadline: SystemTime,
        resume: Option<u64>,
        initial: bool,
        heartbeat: Heartbeat,
        notice: Option<bytes::Bytes>,
    ) -> Result<Joined, JoinError> {
        let id = ClientId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let queue = Arc::new(match resume {
            Some(after) => ClientQueue::held(self.cfg.client_queue, after),
            // A new client starts at "now": nothing older, even if a
            // catch-up delivers it later.
            None => ClientQueue::new(self.cfg.client_queue, self.max_seen()),
        });
        // The stream opens with the reconnect hint, before any event.
        queue.offer_unsequenced(&sse::encode_retry(self.cfg.retry_ms));
        if let Some(notice) = notice {
            queue.offer_unsequenced(&notice);
        }
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Join(JoinRequest {
                id,
                queue: queue.clone(),
                patterns,
                deadline: deadline_after(left),
                resume,
                initial,
                heartbeat,
                reply,
            }))
            .map_err(|_| JoinError::ShuttingDown)?;
        // If this future is dropped (the client hung up while we subscribed)
        // or the join fails, the hub must still forget the client.
        let guard = LeaveGuard { hub: self, id };
        let result = match rx.await {
            Ok(Ok(backfill)) => Ok(Joined {
                id,
                queue,
                backfill,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(JoinError::ShuttingDown),
        };
        if result.is_ok() {
            // From here the response body's drop sends the Leave.
            std::mem::forget(guard);
        }
        result
    }
}

/// `now + left`, saturating: a token valid for centuries must not overflow
/// the clock.
fn deadline_after(left: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(left)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400))
}

struct LeaveGuard<'a> {
    hub: &'a Hub,
    id: ClientId,
}

impl Drop for LeaveGuard<'_> {
    fn drop(&mut self) {
        self.hub.depart(self.id);
    }
}
