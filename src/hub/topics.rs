//! Topics and clients: one shared subscription per distinct pattern, created
//! on first use and dropped when its last client leaves, and the clients
//! that join and leave them.
//!
//! Topics live in a generational slot map: a task answering for a topic
//! that was removed meanwhile (its slot perhaps reused) finds its key dead
//! and is ignored, with no uid to compare by hand.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use slotmap::SlotMap;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::dispatcher::{Dispatcher, Done};
use super::{Backfill, Heartbeat, JoinError, JoinRequest, Upstream};
use crate::client::{ClientId, ClientQueue, EndReason};

/// How long subscribing (SUB + flush round trip) may take before a join fails.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

slotmap::new_key_type! {
    /// A topic; dead once the topic is removed, even if its slot is reused.
    pub(super) struct TopicKey;
}

pub(super) struct Topic {
    pub(super) pattern: String,
    /// The merge slot once the subscription is active.
    pub(super) slot: Option<usize>,
    pub(super) clients: Vec<(ClientId, Arc<ClientQueue>)>,
    /// Clients whose join waits for this subscription to become active.
    pub(super) waiting: Vec<ClientId>,
    /// Clients whose join waits for another of their subscriptions: this
    /// one is active and stays, even if its last client leaves meanwhile.
    pub(super) joining: Vec<ClientId>,
    /// Last sequence delivered for this pattern: where a catch-up starts.
    pub(super) last_seq: u64,
    /// The stream's last sequence once the subscription was active: every
    /// event of the pattern stored after it reaches the subscription. None
    /// until known.
    pub(super) since: Option<u64>,
    /// The pattern takes every event of the stream, so live sequences on
    /// it are consecutive and a jump is a missed event.
    pub(super) dense: bool,
    /// A read that extends the window back, and the resumes waiting on it.
    pub(super) fill: Option<Fill>,
}

impl Topic {
    /// Does live delivery `d` show that an earlier event of this topic,
    /// stored after the subscription became active, never arrived? Either
    /// the previous event on its subject (RePublish's `Nats-Last-Sequence`)
    /// is newer than anything delivered here, or, on a pattern that takes
    /// the whole stream, its sequence jumps.
    pub(super) fn skipped(&self, d: &super::dispatcher::Delivery) -> bool {
        let (Some(previous), Some(since)) = (d.previous, self.since) else {
            return false;
        };
        let delivered = self.last_seq.max(since);
        previous > delivered || (self.dense && d.seq > delivered + 1)
    }
}

/// Single flight for resumes that reach back past a topic's window: the
/// first one reads the missing range once into the window, the others wait
/// for it instead of each opening a JetStream consumer (a reconnect storm
/// on a shard that has just started).
pub(super) struct Fill {
    pub(super) from: u64,
    pub(super) waiters: Vec<ClientId>,
}

/// Every topic, by key and by pattern.
#[derive(Default)]
pub(super) struct Topics {
    map: SlotMap<TopicKey, Topic>,
    by_pattern: HashMap<String, TopicKey>,
}

impl Topics {
    pub(super) fn find(&self, pattern: &str) -> Option<TopicKey> {
        self.by_pattern.get(pattern).copied()
    }

    fn insert(&mut self, pattern: String, dense: bool) -> TopicKey {
        let key = self.map.insert(Topic {
            pattern: pattern.clone(),
            slot: None,
            clients: Vec::new(),
            waiting: Vec::new(),
            joining: Vec::new(),
            last_seq: 0,
            since: None,
            dense,
            fill: None,
        });
        self.by_pattern.insert(pattern, key);
        key
    }

    pub(super) fn get(&self, key: TopicKey) -> Option<&Topic> {
        self.map.get(key)
    }

    pub(super) fn get_mut(&mut self, key: TopicKey) -> Option<&mut Topic> {
        self.map.get_mut(key)
    }

    fn remove(&mut self, key: TopicKey) -> Option<Topic> {
        let topic = self.map.remove(key)?;
        self.by_pattern.remove(&topic.pattern);
        Some(topic)
    }

    /// Topics whose subscription is active.
    pub(super) fn active(&self) -> impl Iterator<Item = (TopicKey, &Topic)> {
        self.map.iter().filter(|(_, t)| t.slot.is_some())
    }
}

pub(super) struct Client {
    pub(super) queue: Arc<ClientQueue>,
    /// When the token expires; the expiry heap also holds the age limit.
    pub(super) token_deadline: Instant,
    pub(super) topics: Vec<TopicKey>,
    /// Subscriptions still being set up before the join can be answered.
    pub(super) pending: usize,
    pub(super) resume: Option<u64>,
    pub(super) initial: bool,
    pub(super) heartbeat: Heartbeat,
    pub(super) reply: Option<oneshot::Sender<Result<Backfill, JoinError>>>,
}

/// Every client, and the one heap of deadlines (token expiry, stream age)
/// that serves them all.
#[derive(Default)]
pub(super) struct Clients {
    map: HashMap<ClientId, Client>,
    /// Entries of clients that already left are skipped, and compacted away
    /// once they outnumber the living (long tokens and much churn would
    /// otherwise grow the heap without bound).
    expiries: BinaryHeap<Reverse<(Instant, ClientId)>>,
}

impl Clients {
    fn insert(&mut self, id: ClientId, client: Client, age_limit: Option<Instant>) {
        self.expiries.push(Reverse((client.token_deadline, id)));
        if let Some(at) = age_limit.filter(|at| *at < client.token_deadline) {
            self.expiries.push(Reverse((at, id)));
        }
        self.map.insert(id, client);
    }

    fn remove(&mut self, id: ClientId) -> Option<Client> {
        let c = self.map.remove(&id)?;
        if self.expiries.len() > 3 * self.map.len() + 1024 {
            let map = &self.map;
            self.expiries
                .retain(|Reverse((_, id))| map.contains_key(id));
        }
        Some(c)
    }

    pub(super) fn get(&self, id: ClientId) -> Option<&Client> {
        self.map.get(&id)
    }

    pub(super) fn get_mut(&mut self, id: ClientId) -> Option<&mut Client> {
        self.map.get_mut(&id)
    }

    pub(super) fn queues(&self) -> impl Iterator<Item = &Arc<ClientQueue>> {
        self.map.values().map(|c| &c.queue)
    }

    /// Every client's id, for one cycle of the heartbeat sweep.
    pub(super) fn ids(&self) -> Vec<ClientId> {
        self.map.keys().copied().collect()
    }

    pub(super) fn next_expiry(&self) -> Option<Instant> {
        self.expiries.peek().map(|Reverse((at, _))| *at)
    }

    /// Ends the streams whose token expired at or before `now` with
    /// `expired`, and those that reached their age limit with `aged()`, at
    /// most `limit` of them. Returns how many of each ended; more may be
    /// due (see [`Clients::next_expiry`]).
    pub(super) fn close_due(
        &mut self,
        now: Instant,
        limit: usize,
        expired: &Bytes,
        mut aged: impl FnMut() -> Bytes,
    ) -> (usize, usize) {
        let (mut n_expired, mut n_aged) = (0, 0);
        while let Some(Reverse((at, id))) = self.expiries.peek().copied() {
            if at > now || n_expired + n_aged >= limit {
                break;
            }
            self.expiries.pop();
            let Some(c) = self.map.get(&id) else {
                continue;
            };
            if c.token_deadline <= now {
                if c.queue.close(EndReason::Expired, Some(expired.clone())) {
                    n_expired += 1;
                }
            } else if c.queue.close(EndReason::MaxAge, Some(aged())) {
                n_aged += 1;
            }
        }
        (n_expired, n_aged)
    }
}

impl<U: Upstream> Dispatcher<U> {
    pub(super) fn join(&mut self, req: JoinRequest) {
        let JoinRequest {
            id,
            queue,
            patterns,
            deadline,
            resume,
            initial,
            heartbeat,
            reply,
        } = req;
        let mut client = Client {
            queue,
            token_deadline: deadline,
            topics: Vec::with_capacity(patterns.len()),
            pending: 0,
            resume,
            initial,
            heartbeat,
            reply: Some(reply),
        };
        for p in patterns {
            let key = self.topic_for(p);
            let topic = self.topics.get_mut(key).expect("just found or made");
            if topic.slot.is_none() {
                topic.waiting.push(id);
                client.pending += 1;
            }
            client.topics.push(key);
        }
        let ready = client.pending == 0;
        if !ready {
            // Its other topics must still be there when it activates.
            for &key in &client.topics {
                if let Some(topic) = self.topics.get_mut(key).filter(|t| t.slot.is_some()) {
                    topic.joining.push(id);
                }
            }
        }
        let age_limit = self.age_limit();
        self.clients.insert(id, client, age_limit);
        self.sweep.add(id);
        self.metrics.connections.inc();
        self.metrics.connections_total.inc();
        if ready {
            self.activate(id);
        }
    }

    /// Every subscription of client `id` is active: add it to all its topics
    /// at once (so it never sees one topic's events without the other's),
    /// then serve its resume and answer the join.
    fn activate(&mut self, id: ClientId) {
        let Some(c) = self.clients.get(id) else {
            return;
        };
        for &key in &c.topics {
            if let Some(topic) = self.topics.get_mut(key) {
                topic.joining.retain(|j| *j != id);
                topic.clients.push((id, c.queue.clone()));
            }
        }
        self.answer_join(id);
    }

    /// Finds the topic for `pattern`, creating it (and starting its
    /// subscription) on first use.
    fn topic_for(&mut self, pattern: String) -> TopicKey {
        if let Some(key) = self.topics.find(&pattern) {
            return key;
        }
        let dense = self.upstream.dense(&pattern);
        let key = self.topics.insert(pattern.clone(), dense);
        let upstream = self.upstream.clone();
        let done = self.done.clone();
        tokio::spawn(async move {
            let result = tokio::time::timeout(SUBSCRIBE_TIMEOUT, upstream.subscribe(&pattern))
                .await
                .unwrap_or_else(|_| Err("timed out".to_string()));
            let _ = done.send(Done::Subscribed { topic: key, result });
        });
        key
    }

    pub(super) fn subscribed(
        &mut self,
        key: TopicKey,
        result: Result<(U::Live, Option<u64>), String>,
    ) {
        let whole = self.live_is_whole();
        let seen = self.seen();
        let Some(topic) = self.topics.get_mut(key) else {
            return;
        };
        let (sub, covered) = match result {
            Ok(ok) => ok,
            Err(e) => {
                tracing::warn!(pattern = ?topic.pattern, error = %e, "subscribe failed");
                let waiting = std::mem::take(&mut topic.waiting);
                // Forgotten at once, so the next join subscribes afresh.
                self.remove_topic(key);
                for id in waiting {
                    if let Some(r) = self.clients.get_mut(id).and_then(|c| c.reply.take()) {
                        let _ = r.send(Err(JoinError::Subscribe(e.clone())));
                    }
                    self.leave(id);
                }
                return;
            }
        };
        // The stream's last sequence went back: it was recreated?
        let went_back = covered.is_some_and(|c| c < seen);
        // The stream's last sequence is known now: resumes up to it need no
        // JetStream request to be validated, and new clients start after it.
        topic.last_seq = covered.unwrap_or(seen).max(seen);
        topic.since = covered;
        if covered.is_none() {
            tracing::debug!(pattern = ?topic.pattern, "stream position unknown when subscribed; holes are looked for from the first live event");
        }
        topic.slot = Some(self.merge.insert(key, sub));
        if let Some(c) = covered {
            self.note_seen(c);
            // The window is whole from `covered` on: start it before the
            // first of this subscription's events is delivered.
            if whole {
                self.window.start(key, c);
            }
        }
        self.metrics.subscriptions.inc();
        if went_back {
            self.check_stream("a subscription found the stream behind the shard", false);
        }
        self.drain_merge();
        let Some(topic) = self.topics.get_mut(key) else {
            return;
        };
        tracing::debug!(pattern = ?topic.pattern, ?covered, "subscribed");
        let waiting = std::mem::take(&mut topic.waiting);
        let empty = topic.clients.is_empty() && waiting.is_empty();
        for id in waiting {
            if let Some(c) = self.clients.get_mut(id) {
                c.pending -= 1;
                if c.pending == 0 {
                    self.activate(id);
                } else if let Some(t) = self.topics.get_mut(key) {
                    // Active now, and the client still waits for another
                    // of its topics: this one must stay for it.
                    t.joining.push(id);
                }
            }
        }
        if empty {
            self.remove_topic(key);
        }
    }

    pub(super) fn leave(&mut self, id: ClientId) {
        let Some(client) = self.clients.remove(id) else {
            return;
        };
        self.metrics.connections.dec();
        for key in client.topics {
            let Some(topic) = self.topics.get_mut(key) else {
                continue;
            };
            if let Some(i) = topic.clients.iter().position(|(c, _)| *c == id) {
                topic.clients.swap_remove(i);
            }
            topic.waiting.retain(|c| *c != id);
            topic.joining.retain(|c| *c != id);
            // A topic still subscribing is removed when its answer arrives.
            if topic.clients.is_empty()
                && topic.waiting.is_empty()
                && topic.joining.is_empty()
                && topic.slot.is_some()
            {
                self.remove_topic(key);
            }
        }
    }

    fn remove_topic(&mut self, key: TopicKey) {
        let Some(topic) = self.topics.remove(key) else {
            return;
        };
        if let Some(slot) = topic.slot {
            // Dropping the subscriber sends UNSUB.
            drop(self.merge.remove(slot));
            self.metrics.subscriptions.dec();
        }
        self.window.stop(key);
        tracing::debug!(pattern = ?topic.pattern, "unsubscribed");
    }

    /// The subscription's channel closed (the NATS client shut down): its
    /// clients, and those joining it, cannot be kept whole, so they end and
    /// resume elsewhere. The topic goes, so a later join subscribes afresh;
    /// every join it still owed an answer gets one.
    pub(super) fn subscription_ended(&mut self, key: TopicKey) {
        // Its slot is already out of the merge set.
        let Some(topic) = self.topics.remove(key) else {
            return;
        };
        self.metrics.subscriptions.dec();
        self.window.stop(key);
        let joining = topic
            .joining
            .iter()
            .filter_map(|id| self.clients.get(*id).map(|c| &c.queue));
        self.end_streams(
            topic.clients.iter().map(|(_, q)| q).chain(joining),
            EndReason::Resync,
        );
        let why = JoinError::Subscribe("the subscription ended".into());
        // Resumes parked behind a window fill of this topic, and clients
        // waiting for it to become active (if it ended at once).
        let parked = topic.fill.map(|f| f.waiters).unwrap_or_default();
        for id in parked.into_iter().chain(topic.waiting) {
            if let Some(r) = self.clients.get_mut(id).and_then(|c| c.reply.take()) {
                let _ = r.send(Err(why.clone()));
            }
            self.leave(id);
        }
    }
}
