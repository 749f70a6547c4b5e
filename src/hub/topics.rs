//! Topics: one shared NATS subscription per distinct pattern, created on
//! first use and dropped when its last client leaves, and the clients that
//! join and leave them.

use std::cmp::Reverse;
use std::sync::atomic::Ordering;

use async_nats::Subscriber;

use super::{Client, Cmd, Dispatcher, JoinError, JoinRequest, SUBSCRIBE_TIMEOUT, Topic};
use crate::sse::{self, EndReason};

impl Dispatcher {
    pub(super) fn join(&mut self, req: JoinRequest) {
        let JoinRequest {
            id,
            queue,
            patterns,
            deadline,
            resume,
            reply,
        } = req;
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
    pub(super) fn activate(&mut self, id: u64) {
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

    /// Finds the topic for `pattern`, creating it (and starting its
    /// subscription) on first use.
    pub(super) fn topic_for(&mut self, pattern: String) -> usize {
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

    pub(super) fn subscribed(
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

    pub(super) fn leave(&mut self, id: u64) {
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

    pub(super) fn remove_topic(&mut self, t: usize) {
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
    pub(super) fn subscription_ended(&mut self, t: usize) {
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
}
