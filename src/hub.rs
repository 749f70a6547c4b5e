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

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::Subscriber;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::merge::MergeSet;
use crate::metrics::{Metrics, Reason};
use crate::nats::Scope;
use crate::sse::{self, ClientQueue, Departure, EndReason, Offer};

/// How long subscribing (SUB + flush round trip) may take before a join fails.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Events fanned out between two yields of the dispatcher.
const DISPATCH_CHUNK: usize = 64;

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub heartbeat: Duration,
    pub client_queue: usize,
    pub retry_ms: u64,
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
}

/// Handle to the dispatcher task; cheap to share.
pub struct Hub {
    cmds: mpsc::UnboundedSender<Cmd>,
    next_id: AtomicU64,
    cfg: HubConfig,
}

enum Cmd {
    Join {
        id: u64,
        queue: Arc<ClientQueue>,
        patterns: Vec<String>,
        deadline: Instant,
        reply: oneshot::Sender<Result<(), JoinError>>,
    },
    Leave(u64),
    Subscribed {
        topic: usize,
        uid: u64,
        result: Result<Subscriber, String>,
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
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        let (tx, rx) = mpsc::unbounded_channel();
        let dispatcher = Dispatcher {
            nats,
            scope,
            cfg: cfg.clone(),
            metrics,
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
        tokio::spawn(tokio::task::unconstrained(dispatcher.run(rx, shutdown)));
        Arc::new(Hub {
            cmds: tx,
            next_id: AtomicU64::new(1),
            cfg,
        })
    }

    /// Registers a client for `patterns` (already authorized and inside the
    /// stream) and returns once every subscription is active on the server.
    pub async fn join(
        &self,
        patterns: Vec<String>,
        deadline: SystemTime,
    ) -> Result<Joined, JoinError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(ClientQueue::new(self.cfg.client_queue, 0));
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
                reply,
            })
            .map_err(|_| JoinError::ShuttingDown)?;
        // If this future is dropped (the client hung up while we subscribed)
        // or the join fails, the hub must still forget the client.
        let guard = LeaveGuard { hub: self, id };
        let result = match rx.await {
            Ok(Ok(())) => Ok(Joined { id, queue }),
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
}

struct Client {
    queue: Arc<ClientQueue>,
    topics: Vec<usize>,
    /// Subscriptions still being set up before the join can be answered.
    pending: usize,
    reply: Option<oneshot::Sender<Result<(), JoinError>>>,
}

struct Dispatcher {
    nats: async_nats::Client,
    scope: Arc<Scope>,
    cfg: HubConfig,
    metrics: Arc<Metrics>,
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
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, shutdown: CancellationToken) {
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
                    Some(cmd) => self.command(cmd),
                    None => break,
                },
                () = std::future::poll_fn(|cx| self.merge.poll_batch(cx, &mut batch, &mut ended)) => {
                    self.dispatch(&mut batch).await;
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
        self.metrics
            .disconnects
            .get_or_create(&Reason {
                reason: EndReason::Shutdown.as_str(),
            })
            .inc_by(self.clients.len() as u64);
        tracing::info!(clients = self.clients.len(), "hub stopped: streams ended");
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Join {
                id,
                queue,
                patterns,
                deadline,
                reply,
            } => self.join(id, queue, patterns, deadline, reply),
            Cmd::Leave(id) => self.leave(id),
            Cmd::Subscribed { topic, uid, result } => self.subscribed(topic, uid, result),
        }
    }

    fn join(
        &mut self,
        id: u64,
        queue: Arc<ClientQueue>,
        patterns: Vec<String>,
        deadline: Instant,
        reply: oneshot::Sender<Result<(), JoinError>>,
    ) {
        let mut client = Client {
            queue: queue.clone(),
            topics: Vec::with_capacity(patterns.len()),
            pending: 0,
            reply: None,
        };
        for p in patterns {
            let t = self.topic_for(p);
            let topic = self.topics[t].as_mut().expect("live topic");
            topic.clients.push((id, queue.clone()));
            if topic.slot.is_none() {
                topic.waiting.push(id);
                client.pending += 1;
            }
            client.topics.push(t);
        }
        if client.pending == 0 {
            let _ = reply.send(Ok(()));
        } else {
            client.reply = Some(reply);
        }
        self.clients.insert(id, client);
        self.expiries.push(Reverse((deadline, id)));
        self.metrics.connections.inc();
        self.metrics.connections_total.inc();
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
        tokio::spawn(async move {
            let result = tokio::time::timeout(SUBSCRIBE_TIMEOUT, async {
                let sub = nats.subscribe(live).await.map_err(|e| e.to_string())?;
                // Once the server answers the flush it has the SUB: every
                // event republished from now on reaches this subscription.
                nats.flush().await.map_err(|e| e.to_string())?;
                Ok(sub)
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
        });
        t
    }

    fn subscribed(&mut self, t: usize, uid: u64, result: Result<Subscriber, String>) {
        let Some(topic) = self.topics.get_mut(t).and_then(Option::as_mut) else {
            return;
        };
        if topic.uid != uid {
            return;
        }
        match result {
            Ok(sub) => {
                topic.slot = Some(self.merge.insert(t, sub));
                self.metrics.subscriptions.inc();
                tracing::debug!(pattern = %topic.pattern, "subscribed");
                for id in std::mem::take(&mut topic.waiting) {
                    if let Some(c) = self.clients.get_mut(&id) {
                        c.pending -= 1;
                        if c.pending == 0 {
                            if let Some(r) = c.reply.take() {
                                let _ = r.send(Ok(()));
                            }
                        }
                    }
                }
                if topic.clients.is_empty() {
                    self.remove_topic(t);
                }
            }
            Err(e) => {
                tracing::warn!(pattern = %topic.pattern, error = %e, "subscribe failed");
                let clients: Vec<u64> = topic.clients.iter().map(|(id, _)| *id).collect();
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
            if topic.clients.is_empty() && topic.slot.is_some() {
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
        let tail = sse::encode_retry(self.cfg.retry_ms);
        for (_, q) in &topic.clients {
            q.close(EndReason::Resync, Some(tail.clone()));
        }
    }

    /// Fans a batch out in sequence order. Between chunks the task yields so
    /// the connections it woke can write: a burst larger than a client
    /// queue must not evict a client that only lacked a turn on the CPU.
    /// (Outside the co-op budget nothing else would make this task yield.)
    async fn dispatch(&mut self, batch: &mut Vec<(usize, async_nats::Message)>) {
        let mut items: Vec<(u64, usize, async_nats::Message)> = batch
            .drain(..)
            .filter_map(|(t, m)| sequence(&m).map(|seq| (seq, t, m)))
            .collect();
        // Stable: a message seen by two overlapping topics keeps both copies
        // adjacent, and the queues drop the second.
        items.sort_by_key(|(seq, _, _)| *seq);
        let mut delivered = 0u64;
        let mut frame: Option<(u64, Bytes)> = None;
        let mut evicted: Vec<u64> = Vec::new();
        for (i, (seq, t, msg)) in items.iter().enumerate() {
            if i > 0 && i % DISPATCH_CHUNK == 0 {
                tokio::task::yield_now().await;
            }
            let Some(topic) = self.topics[*t].as_ref() else {
                continue;
            };
            let bytes = match &frame {
                Some((s, b)) if s == seq => b.clone(),
                _ => {
                    let b = sse::encode_event(*seq, event_name(msg), &msg.payload);
                    frame = Some((*seq, b.clone()));
                    b
                }
            };
            for (id, q) in &topic.clients {
                match q.offer(*seq, &bytes) {
                    Offer::Queued => delivered += 1,
                    Offer::Duplicate | Offer::Closed => {}
                    Offer::Full => {
                        q.close(EndReason::Slow, None);
                        evicted.push(*id);
                    }
                }
            }
        }
        self.metrics.events_received.inc_by(items.len() as u64);
        self.metrics.deliveries.inc_by(delivered);
        if !evicted.is_empty() {
            self.metrics
                .disconnects
                .get_or_create(&Reason {
                    reason: EndReason::Slow.as_str(),
                })
                .inc_by(evicted.len() as u64);
            tracing::info!(clients = evicted.len(), "evicted: slow");
        }
    }

    fn expire(&mut self) {
        let now = Instant::now();
        let tail = sse::encode_control("relay.expired", "{}");
        let mut n = 0u64;
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
            self.metrics
                .disconnects
                .get_or_create(&Reason {
                    reason: EndReason::Expired.as_str(),
                })
                .inc_by(n);
            tracing::info!(clients = n, "token expired");
        }
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
