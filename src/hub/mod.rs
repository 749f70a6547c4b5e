//! The per-node hub: shared NATS subscriptions, frame-once fan-out, bounded
//! client queues, heartbeats and token expiry, all driven by ONE task.
//!
//! ```text
//!  request handler --Join/Leave--> Dispatcher task <--MergeSet-- one core subscription
//!                                      |                          per distinct pattern
//!                                      | encode once, sort batch by seq
//!                                      v
//!                  ClientQueue (bounded, per client) --> SseBody --> socket
//! ```
//!
//! Invariants:
//! - Exactly one NATS subscription per distinct requested pattern, created on
//!   first use and dropped (UNSUB) when its last client leaves.
//! - Frames reach every queue in stream-sequence order (see `merge.rs`), and a
//!   queue refuses any sequence at or below the last one it took, so a client
//!   on overlapping patterns gets each event once, ids strictly increasing.
//! - The fan-out never waits: a full queue ends that client (it resumes by
//!   Last-Event-ID); nobody else is slowed.
//! - No per-client task or timer: one heartbeat tick and one expiry timer
//!   serve the whole node.
//! - A resuming client's queue holds live frames while history is replayed
//!   (from the memory window when it reaches back far enough, else from
//!   JetStream), then releases them: no gap, no duplicate at the seam.
//! - When the live path may have missed events (NATS reconnect, slow
//!   consumer, stream leader change), live frames are held node-wide while
//!   every subscription catches up from the last sequence it delivered; the
//!   caught-up and held frames are then merged by sequence and delivered.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::Subscriber;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::merge::MergeSet;
use crate::metrics::{Metrics, Reason};
use crate::nats::{LinkEvent, Scope};
use crate::replay::{CatchUpTopic, ReplayError, Replayer};
use crate::sse::{self, ClientQueue, Departure, EndReason};
use crate::window::Window;

mod catch_up;
mod fanout;
mod resume;
mod topics;

use fanout::encode_batch;

/// How long subscribing (SUB + flush round trip) may take before a join fails.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Events fanned out between two yields of the dispatcher.
const DISPATCH_CHUNK: usize = 64;

/// Live frames held during a catch-up before the hub gives up and makes
/// every client resume on its own.
const CATCH_UP_HOLD_LIMIT: usize = 1_000_000;

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub heartbeat: Duration,
    pub client_queue: usize,
    pub retry_ms: u64,
    pub replay_cache_bytes: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum JoinError {
    #[error("the relay could not subscribe to NATS: {0}")]
    Subscribe(String),
    #[error("the relay is shutting down")]
    ShuttingDown,
}

/// A client that joined: its id and the queue its response body drains.
pub struct Joined {
    pub id: u64,
    pub queue: Arc<ClientQueue>,
    /// The resume must be read from JetStream (the memory window did not
    /// reach back far enough); the queue holds live frames until then.
    pub needs_replay: bool,
}

/// Handle to the dispatcher task; cheap to share.
pub struct Hub {
    cmds: mpsc::UnboundedSender<Cmd>,
    next_id: AtomicU64,
    cfg: HubConfig,
    /// Highest sequence this node knows the stream has reached (delivered
    /// live, or read as the stream's last sequence).
    max_seen: Arc<AtomicU64>,
    learning: tokio::sync::Mutex<()>,
}

/// A client asking the dispatcher to join its patterns.
struct JoinRequest {
    id: u64,
    queue: Arc<ClientQueue>,
    patterns: Vec<String>,
    deadline: Instant,
    resume: Option<u64>,
    reply: oneshot::Sender<Result<bool, JoinError>>,
}

enum Cmd {
    Join(JoinRequest),
    Leave(u64),
    Subscribed {
        topic: usize,
        uid: u64,
        result: Result<(Subscriber, Option<u64>), String>,
    },
    CaughtUp {
        epoch: u64,
        topics: Vec<CatchUpTopic>,
        frames: Vec<(u64, usize, Bytes)>,
        truncated: Vec<usize>,
    },
    /// A window fill read `(from, to]` of a topic from JetStream.
    Filled {
        topic: usize,
        uid: u64,
        from: u64,
        to: u64,
        frames: Option<Vec<(u64, Bytes)>>,
    },
}

impl Departure for Hub {
    fn depart(&self, client: u64) {
        let _ = self.cmds.send(Cmd::Leave(client));
    }
}

impl Hub {
    /// Starts the dispatcher task; it ends every stream when `shutdown` fires.
    pub fn start(
        nats: async_nats::Client,
        scope: Arc<Scope>,
        cfg: HubConfig,
        replayer: Replayer,
        link: broadcast::Receiver<LinkEvent>,
        advisories: Option<Subscriber>,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        let (tx, rx) = mpsc::unbounded_channel();
        let max_seen = Arc::new(AtomicU64::new(0));
        let dispatcher = Dispatcher {
            nats,
            scope,
            cfg: cfg.clone(),
            metrics: replayer.metrics.clone(),
            window: Window::new(cfg.replay_cache_bytes),
            replayer,
            max_seen: max_seen.clone(),
            suspect: false,
            catch_up: None,
            catch_up_again: false,
            epoch: 0,
            cmds: tx.clone(),
            topics: Vec::new(),
            free_topics: Vec::new(),
            by_pattern: HashMap::new(),
            next_uid: 0,
            merge: MergeSet::default(),
            clients: HashMap::new(),
            expiries: BinaryHeap::new(),
        };
        // Unconstrained: tokio's co-op budget would make a drained channel
        // report Pending early and defer its wake-up, cutting a batch short
        // and breaking the ordering argument in `merge.rs`.
        tokio::spawn(tokio::task::unconstrained(
            dispatcher.run(rx, link, advisories, shutdown),
        ));
        Arc::new(Hub {
            cmds: tx,
            next_id: AtomicU64::new(1),
            cfg,
            max_seen,
            learning: tokio::sync::Mutex::new(()),
        })
    }

    /// Highest sequence this node knows the stream has reached (0 before
    /// the first subscription).
    pub fn max_seen(&self) -> u64 {
        self.max_seen.load(Ordering::Acquire)
    }

    /// Makes sure the node knows whether `id` exists in the stream, asking
    /// JetStream at most once for any number of concurrent callers (a storm
    /// on a relay that has just started). Returns the highest known
    /// sequence.
    pub async fn learn_last(&self, id: u64, replayer: &Replayer) -> Result<u64, ReplayError> {
        if id <= self.max_seen() {
            return Ok(self.max_seen());
        }
        let _single_flight = self.learning.lock().await;
        if id <= self.max_seen() {
            return Ok(self.max_seen());
        }
        let last = replayer.last_sequence().await?;
        self.max_seen.fetch_max(last, Ordering::AcqRel);
        Ok(self.max_seen())
    }

    /// Registers a client for `patterns` (already authorized and inside the
    /// stream) and returns once every subscription is active on the server.
    /// With `resume`, events after that sequence are replayed first: from
    /// memory before this returns, or by the caller from JetStream when
    /// `needs_replay` is set.
    pub async fn join(
        &self,
        patterns: Vec<String>,
        deadline: SystemTime,
        resume: Option<u64>,
    ) -> Result<Joined, JoinError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(match resume {
            Some(after) => ClientQueue::held(self.cfg.client_queue, after),
            // A new client starts at "now": nothing older, even if a
            // catch-up delivers it later.
            None => ClientQueue::new(self.cfg.client_queue, self.max_seen()),
        });
        // The stream opens with the reconnect hint, before any event.
        queue.offer_unsequenced(&sse::encode_retry(self.cfg.retry_ms));
        let left = deadline
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Join(JoinRequest {
                id,
                queue: queue.clone(),
                patterns,
                deadline: Instant::now() + left,
                resume,
                reply,
            }))
            .map_err(|_| JoinError::ShuttingDown)?;
        // If this future is dropped (the client hung up while we subscribed)
        // or the join fails, the hub must still forget the client.
        let guard = LeaveGuard { hub: self, id };
        let result = match rx.await {
            Ok(Ok(needs_replay)) => Ok(Joined {
                id,
                queue,
                needs_replay,
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

struct LeaveGuard<'a> {
    hub: &'a Hub,
    id: u64,
}

impl Drop for LeaveGuard<'_> {
    fn drop(&mut self) {
        self.hub.depart(self.id);
    }
}

struct Topic {
    /// Distinguishes a reused slot from the topic a subscribe task was for.
    uid: u64,
    pattern: String,
    /// The merge slot once the subscription is active.
    slot: Option<usize>,
    clients: Vec<(u64, Arc<ClientQueue>)>,
    /// Clients whose join waits for this subscription to become active.
    waiting: Vec<u64>,
    /// Last sequence delivered for this pattern: where a catch-up starts.
    last_seq: u64,
    /// A read that extends the window back, and the resumes waiting on it.
    fill: Option<Fill>,
}

/// Single flight for resumes that reach back past a topic's window: the
/// first one reads the missing range once into the window, the others wait
/// for it instead of each opening a JetStream consumer (a reconnect storm
/// on a relay that has just started).
struct Fill {
    from: u64,
    waiters: Vec<u64>,
}

struct Client {
    queue: Arc<ClientQueue>,
    topics: Vec<usize>,
    /// Subscriptions still being set up before the join can be answered.
    pending: usize,
    resume: Option<u64>,
    reply: Option<oneshot::Sender<Result<bool, JoinError>>>,
}

/// A catch-up in progress: live frames wait here until it lands.
struct CatchUp {
    epoch: u64,
    held: Vec<(u64, usize, Bytes)>,
}

struct Dispatcher {
    nats: async_nats::Client,
    scope: Arc<Scope>,
    cfg: HubConfig,
    metrics: Arc<Metrics>,
    replayer: Replayer,
    window: Window,
    max_seen: Arc<AtomicU64>,
    /// NATS dropped: the live path may have missed events until catch-up.
    suspect: bool,
    catch_up: Option<CatchUp>,
    /// Another trigger arrived during a catch-up: run one more after it.
    catch_up_again: bool,
    epoch: u64,
    cmds: mpsc::UnboundedSender<Cmd>,
    topics: Vec<Option<Topic>>,
    free_topics: Vec<usize>,
    by_pattern: HashMap<String, usize>,
    next_uid: u64,
    merge: MergeSet<Subscriber, usize>,
    clients: HashMap<u64, Client>,
    /// Token deadlines; entries of clients that already left are skipped.
    expiries: BinaryHeap<Reverse<(Instant, u64)>>,
}

impl Dispatcher {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Cmd>,
        mut link: broadcast::Receiver<LinkEvent>,
        mut advisories: Option<Subscriber>,
        shutdown: CancellationToken,
    ) {
        let mut heartbeat = tokio::time::interval(self.cfg.heartbeat);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let expiry = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86400));
        tokio::pin!(expiry);
        let mut armed: Option<Instant> = None;
        let mut batch = Vec::new();
        let mut ended = Vec::new();
        let heartbeat_frame = Bytes::from_static(sse::HEARTBEAT);
        loop {
            let next = self.expiries.peek().map(|Reverse((at, _))| *at);
            if next != armed {
                if let Some(at) = next {
                    expiry.as_mut().reset(at);
                }
                armed = next;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(Cmd::CaughtUp { epoch, topics, frames, truncated }) => {
                        self.caught_up(epoch, topics, frames, truncated).await;
                    }
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                ev = link.recv() => match ev {
                    Ok(LinkEvent::Disconnected) => {
                        // Whatever NATS sends while we are away is lost to
                        // the live path: the windows are no longer whole.
                        self.suspect = true;
                        self.window.stop_all();
                    }
                    Ok(LinkEvent::Connected) if self.suspect => {
                        self.suspect = false;
                        self.start_catch_up("nats reconnected");
                    }
                    Ok(LinkEvent::SlowConsumer) => self.start_catch_up("slow consumer"),
                    Ok(LinkEvent::Connected) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.start_catch_up("missed connection events");
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        link = broadcast::channel(1).1;
                    }
                },
                Some(_) = next_advisory(&mut advisories) => {
                    // A new stream leader: its predecessor may have stored
                    // events it never republished.
                    self.start_catch_up("stream leader elected");
                }
                () = std::future::poll_fn(|cx| self.merge.poll_batch(cx, &mut batch, &mut ended)) => {
                    let items = encode_batch(&mut batch);
                    self.deliver(items).await;
                    for topic in ended.drain(..) {
                        self.subscription_ended(topic);
                    }
                }
                _ = heartbeat.tick() => {
                    for c in self.clients.values() {
                        c.queue.heartbeat(&heartbeat_frame);
                    }
                }
                () = &mut expiry, if armed.is_some() => self.expire(),
            }
        }
        let tail = sse::encode_retry(self.cfg.retry_ms);
        for c in self.clients.values() {
            c.queue.close(EndReason::Shutdown, Some(tail.clone()));
        }
        self.count_ends(EndReason::Shutdown, self.clients.len());
        tracing::info!(clients = self.clients.len(), "hub stopped: streams ended");
    }

    fn count_ends(&self, reason: EndReason, n: usize) {
        if n > 0 {
            self.metrics
                .disconnects
                .get_or_create(&Reason {
                    reason: reason.as_str(),
                })
                .inc_by(n as u64);
        }
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join(req) => self.join(req),
            Cmd::Leave(id) => self.leave(id),
            Cmd::Subscribed { topic, uid, result } => self.subscribed(topic, uid, result),
            Cmd::CaughtUp { .. } => unreachable!("handled in run"),
            Cmd::Filled {
                topic,
                uid,
                from,
                to,
                frames,
            } => self.filled(topic, uid, from, to, frames),
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let tail = sse::encode_control("relay.expired", "{}");
        let mut n = 0;
        while let Some(Reverse((at, id))) = self.expiries.peek().copied() {
            if at > now {
                break;
            }
            self.expiries.pop();
            if let Some(c) = self.clients.get(&id) {
                c.queue.close(EndReason::Expired, Some(tail.clone()));
                n += 1;
            }
        }
        if n > 0 {
            self.count_ends(EndReason::Expired, n);
            tracing::info!(clients = n, "token expired");
        }
    }
}

async fn next_advisory(sub: &mut Option<Subscriber>) -> Option<async_nats::Message> {
    use futures_util::StreamExt;
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}
