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
use std::task::{Context, Waker};
use std::time::{Duration, SystemTime};

use async_nats::Subscriber;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::merge::MergeSet;
use crate::metrics::{Metrics, Reason, Source};
use crate::nats::{LinkEvent, Scope};
use crate::replay::{CatchUpTopic, ReplayError, Replayer};
use crate::sse::{self, ClientQueue, Departure, EndReason, Offer};
use crate::window::Window;

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

enum Cmd {
    Join {
        id: u64,
        queue: Arc<ClientQueue>,
        patterns: Vec<String>,
        deadline: Instant,
        resume: Option<u64>,
        reply: oneshot::Sender<Result<bool, JoinError>>,
    },
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
            .send(Cmd::Join {
                id,
                queue: queue.clone(),
                patterns,
                deadline: Instant::now() + left,
                resume,
                reply,
            })
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
            Cmd::Join {
                id,
                queue,
                patterns,
                deadline,
                resume,
                reply,
            } => self.join(id, queue, patterns, deadline, resume, reply),
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

    fn join(
        &mut self,
        id: u64,
        queue: Arc<ClientQueue>,
        patterns: Vec<String>,
        deadline: Instant,
        resume: Option<u64>,
        reply: oneshot::Sender<Result<bool, JoinError>>,
    ) {
        let mut client = Client {
            queue: queue.clone(),
            topics: Vec::with_capacity(patterns.len()),
            pending: 0,
            resume,
            reply: Some(reply),
        };
        for p in patterns {
            let t = self.topic_for(p);
            let topic = self.topics[t].as_mut().expect("live topic");
            if topic.slot.is_none() {
                topic.waiting.push(id);
                client.pending += 1;
            }
            client.topics.push(t);
        }
        let ready = client.pending == 0;
        self.clients.insert(id, client);
        self.expiries.push(Reverse((deadline, id)));
        self.metrics.connections.inc();
        self.metrics.connections_total.inc();
        if ready {
            self.activate(id);
        }
    }

    /// Every subscription of client `id` is active: add it to all its topics
    /// at once (so it never sees one topic's events without the other's),
    /// serve its resume from the window if it can, and answer the join.
    fn activate(&mut self, id: u64) {
        let Some(c) = self.clients.get(&id) else {
            return;
        };
        for &t in &c.topics {
            if let Some(topic) = self.topics[t].as_mut() {
                topic.clients.push((id, c.queue.clone()));
            }
        }
        self.answer(id);
    }

    /// Every subscription of client `id` is active: serve its resume from
    /// the window if it can, and answer the join.
    fn answer(&mut self, id: u64) {
        let Some(c) = self.clients.get_mut(&id) else {
            return;
        };
        let Some(reply) = c.reply.take() else { return };
        let needs_replay = match c.resume {
            None => false,
            Some(after) => {
                if self.resume_from_window(id, after) {
                    false
                } else if self.wait_for_fill(id, after) {
                    // Answered when the fill lands.
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.reply = Some(reply);
                    }
                    return;
                } else {
                    true
                }
            }
        };
        let _ = reply.send(Ok(needs_replay));
    }

    /// Parks a resume of a single-topic client behind a fill of the
    /// topic's window back to `after`, starting one if none runs. False when
    /// the resume should read JetStream on its own.
    fn wait_for_fill(&mut self, id: u64, after: u64) -> bool {
        if self.catch_up.is_some() || self.suspect {
            return false;
        }
        let c = &self.clients[&id];
        let [t] = c.topics[..] else { return false };
        let Some(covered) = self.window.covered_from(t) else {
            return false;
        };
        // Only what a memory resume may then serve (see resume_from_window).
        let most = (self.cfg.client_queue / 2) as u64;
        let limit = self.replayer.limit;
        if after >= covered || covered - after > most || (limit > 0 && covered - after > limit) {
            return false;
        }
        let Some(topic) = self.topics[t].as_mut() else {
            return false;
        };
        if let Some(fill) = &mut topic.fill {
            if fill.from <= after {
                fill.waiters.push(id);
                return true;
            }
            return false;
        }
        topic.fill = Some(Fill {
            from: after,
            waiters: vec![id],
        });
        let (uid, pattern) = (topic.uid, topic.pattern.clone());
        let replayer = self.replayer.clone();
        let cmds = self.cmds.clone();
        tokio::spawn(async move {
            let frames = replayer.read(&pattern, after, covered).await.ok();
            let _ = cmds.send(Cmd::Filled {
                topic: t,
                uid,
                from: after,
                to: covered,
                frames,
            });
        });
        true
    }

    fn filled(
        &mut self,
        t: usize,
        uid: u64,
        from: u64,
        to: u64,
        frames: Option<Vec<(u64, Bytes)>>,
    ) {
        let Some(topic) = self.topics[t].as_mut().filter(|tp| tp.uid == uid) else {
            return;
        };
        let waiters = topic.fill.take().map(|f| f.waiters).unwrap_or_default();
        if let Some(frames) = frames {
            self.window.prepend(t, from, to, frames);
        }
        for id in waiters {
            let Some(c) = self.clients.get_mut(&id) else {
                continue;
            };
            let (Some(reply), Some(after)) = (c.reply.take(), c.resume) else {
                continue;
            };
            let served = self.resume_from_window(id, after);
            let _ = reply.send(Ok(!served));
        }
    }

    fn resume_from_window(&mut self, id: u64, after: u64) -> bool {
        if self.catch_up.is_some() || self.suspect {
            return false;
        }
        let c = &self.clients[&id];
        let mut total = 0;
        for &t in &c.topics {
            match self.window.count_after(t, after) {
                Some(n) => total += n,
                None => return false,
            }
        }
        // Large resumes go through JetStream, which is flow-controlled, and
        // so do resumes beyond the replay limit (which report a gap).
        let limit = usize::try_from(self.replayer.limit).unwrap_or(usize::MAX);
        if total > self.cfg.client_queue / 2 || (limit > 0 && total > limit) {
            return false;
        }
        let mut frames = Vec::with_capacity(total);
        for &t in &c.topics {
            self.window.frames_after(t, after, &mut frames);
        }
        frames.sort_by_key(|(seq, _)| *seq);
        for (seq, f) in &frames {
            c.queue.replay(*seq, f);
        }
        c.queue.release();
        let source = Source { source: "memory" };
        self.metrics.replay_requests.get_or_create(&source).inc();
        self.metrics
            .replayed
            .get_or_create(&source)
            .inc_by(frames.len() as u64);
        true
    }

    /// Finds the topic for `pattern`, creating it (and starting its
    /// subscription) on first use.
    fn topic_for(&mut self, pattern: String) -> usize {
        if let Some(&t) = self.by_pattern.get(&pattern) {
            return t;
        }
        let uid = self.next_uid;
        self.next_uid += 1;
        let t = self.free_topics.pop().unwrap_or_else(|| {
            self.topics.push(None);
            self.topics.len() - 1
        });
        let live = self
            .scope
            .live_subject(&pattern)
            .expect("routes only admit patterns inside the republish source");
        let nats = self.nats.clone();
        let cmds = self.cmds.clone();
        let replayer = self.replayer.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
                let sub = nats.subscribe(live).await.map_err(|e| e.to_string())?;
                // Once the server answers the flush it has the SUB: every
                // event republished from now on reaches this subscription.
                nats.flush().await.map_err(|e| e.to_string())?;
                // So everything after the stream's current last sequence
                // will be seen: the memory window is whole from there.
                let covered = replayer.last_sequence().await.ok();
                Ok((sub, covered))
            })
            .await
            .unwrap_or_else(|_| Err("timed out".to_string()));
            let _ = cmds.send(Cmd::Subscribed {
                topic: t,
                uid,
                result,
            });
        });
        self.by_pattern.insert(pattern.clone(), t);
        self.topics[t] = Some(Topic {
            uid,
            pattern,
            slot: None,
            clients: Vec::new(),
            waiting: Vec::new(),
            last_seq: 0,
            fill: None,
        });
        t
    }

    fn subscribed(
        &mut self,
        t: usize,
        uid: u64,
        result: Result<(Subscriber, Option<u64>), String>,
    ) {
        let Some(topic) = self.topics.get_mut(t).and_then(Option::as_mut) else {
            return;
        };
        if topic.uid != uid {
            return;
        }
        match result {
            Ok((sub, covered)) => {
                // The stream's last sequence is known now: resumes up to it
                // need no JetStream request to be validated, and new
                // clients start after it.
                if let Some(c) = covered {
                    self.max_seen.fetch_max(c, Ordering::AcqRel);
                }
                let seen = self.max_seen.load(Ordering::Acquire);
                topic.last_seq = covered.unwrap_or(seen).max(seen);
                // The window is whole from `covered` on: start it before the
                // first of this subscription's events is delivered.
                if let Some(from) = covered.filter(|_| self.catch_up.is_none() && !self.suspect) {
                    self.window.start(t, from);
                }
                topic.slot = Some(self.merge.insert(t, sub));
                self.metrics.subscriptions.inc();
                self.drain_merge();
                let Some(topic) = self.topics[t].as_mut().filter(|tp| tp.uid == uid) else {
                    return;
                };
                tracing::debug!(pattern = %topic.pattern, "subscribed");
                let waiting = std::mem::take(&mut topic.waiting);
                let empty = topic.clients.is_empty() && waiting.is_empty();
                for id in waiting {
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.pending -= 1;
                        if c.pending == 0 {
                            self.activate(id);
                        }
                    }
                }
                if empty {
                    self.remove_topic(t);
                }
            }
            Err(e) => {
                tracing::warn!(pattern = %topic.pattern, error = %e, "subscribe failed");
                let clients = std::mem::take(&mut topic.waiting);
                for id in clients {
                    if let Some(c) = self.clients.get_mut(&id) {
                        if let Some(r) = c.reply.take() {
                            let _ = r.send(Err(JoinError::Subscribe(e.clone())));
                        }
                    }
                    self.leave(id);
                }
            }
        }
    }

    fn leave(&mut self, id: u64) {
        let Some(client) = self.clients.remove(&id) else {
            return;
        };
        self.metrics.connections.dec();
        for t in client.topics {
            let Some(topic) = self.topics[t].as_mut() else {
                continue;
            };
            if let Some(i) = topic.clients.iter().position(|(c, _)| *c == id) {
                topic.clients.swap_remove(i);
            }
            topic.waiting.retain(|c| *c != id);
            // A topic still subscribing is removed when its answer arrives.
            if topic.clients.is_empty() && topic.waiting.is_empty() && topic.slot.is_some() {
                self.remove_topic(t);
            }
        }
    }

    fn remove_topic(&mut self, t: usize) {
        let Some(topic) = self.topics[t].take() else {
            return;
        };
        if let Some(slot) = topic.slot {
            // Dropping the subscriber sends UNSUB.
            drop(self.merge.remove(slot));
            self.metrics.subscriptions.dec();
        }
        self.window.stop(t);
        self.by_pattern.remove(&topic.pattern);
        self.free_topics.push(t);
        tracing::debug!(pattern = %topic.pattern, "unsubscribed");
    }

    /// The subscription's channel closed (the NATS client shut down): its
    /// clients cannot be kept whole, so they end and resume elsewhere.
    fn subscription_ended(&mut self, t: usize) {
        let Some(topic) = self.topics[t].as_mut() else {
            return;
        };
        topic.slot = None;
        self.metrics.subscriptions.dec();
        self.window.stop(t);
        let tail = sse::encode_retry(self.cfg.retry_ms);
        for (_, q) in &topic.clients {
            q.close(EndReason::Resync, Some(tail.clone()));
        }
    }

    /// Holds live delivery and re-reads every subscription's events from
    /// its last delivered sequence (see `replay::Replayer::catch_up`).
    fn start_catch_up(&mut self, why: &'static str) {
        if self.catch_up.is_some() {
            self.catch_up_again = true;
            return;
        }
        self.window.stop_all();
        self.epoch += 1;
        let topics: Vec<CatchUpTopic> = self
            .topics
            .iter()
            .enumerate()
            .filter_map(|(t, topic)| {
                let topic = topic.as_ref().filter(|tp| tp.slot.is_some())?;
                Some(CatchUpTopic {
                    topic: t,
                    uid: topic.uid,
                    pattern: topic.pattern.clone(),
                    after: topic.last_seq,
                })
            })
            .collect();
        tracing::info!(reason = why, subscriptions = topics.len(), "catching up");
        self.metrics.catchups.inc();
        self.catch_up = Some(CatchUp {
            epoch: self.epoch,
            held: Vec::new(),
        });
        let epoch = self.epoch;
        let replayer = self.replayer.clone();
        let nats = self.nats.clone();
        let cmds = self.cmds.clone();
        tokio::spawn(async move {
            let (frames, truncated) = replayer.catch_up(&nats, &topics).await;
            let _ = cmds.send(Cmd::CaughtUp {
                epoch,
                topics,
                frames,
                truncated,
            });
        });
    }

    async fn caught_up(
        &mut self,
        epoch: u64,
        topics: Vec<CatchUpTopic>,
        mut frames: Vec<(u64, usize, Bytes)>,
        truncated: Vec<usize>,
    ) {
        let Some(catch_up) = self.catch_up.take_if(|c| c.epoch == epoch) else {
            return;
        };
        let alive = |d: &Dispatcher, t: usize, uid: u64| {
            d.topics[t].as_ref().is_some_and(|tp| tp.uid == uid)
        };
        frames.retain(|(_, t, _)| {
            topics
                .iter()
                .any(|c| c.topic == *t && alive(self, *t, c.uid))
        });
        for c in &topics {
            if alive(self, c.topic, c.uid) && !truncated.contains(&c.topic) {
                self.window.start(c.topic, c.after);
            }
        }
        // Topics whose backlog exceeded the replay limit cannot be caught up
        // in memory: their clients resume on their own (with a gap notice).
        let tail = sse::encode_retry(self.cfg.retry_ms);
        for &t in &truncated {
            if let Some(tp) = self.topics[t].as_ref() {
                for (_, q) in &tp.clients {
                    q.close(EndReason::Resync, Some(tail.clone()));
                }
            }
        }
        frames.extend(catch_up.held);
        frames.sort_by_key(|(seq, _, _)| *seq);
        tracing::info!(events = frames.len(), "caught up");
        self.deliver(frames).await;
        if std::mem::take(&mut self.catch_up_again) {
            self.start_catch_up("triggered again during catch-up");
        }
    }

    /// Fans out frames (sorted by sequence) to every client of their topic.
    /// Between chunks the task yields so the connections it woke can write:
    /// a burst larger than a client queue must not evict a client that only
    /// lacked a turn on the CPU. (Outside the co-op budget nothing else
    /// would make this task yield.)
    async fn deliver(&mut self, items: Vec<(u64, usize, Bytes)>) {
        for (i, chunk) in items.chunks(DISPATCH_CHUNK).enumerate() {
            if i > 0 {
                tokio::task::yield_now().await;
            }
            self.deliver_now(chunk);
        }
    }

    /// Offers frames (sorted by sequence) to the clients of their topics.
    fn deliver_now(&mut self, items: &[(u64, usize, Bytes)]) {
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
    fn drain_merge(&mut self) {
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

/// Turns a merged batch into (seq, topic, frame), sorted by sequence, each
/// event encoded once even when overlapping topics both received it.
fn encode_batch(batch: &mut Vec<(usize, async_nats::Message)>) -> Vec<(u64, usize, Bytes)> {
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

async fn next_advisory(sub: &mut Option<Subscriber>) -> Option<async_nats::Message> {
    use futures_util::StreamExt;
    match sub {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
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
