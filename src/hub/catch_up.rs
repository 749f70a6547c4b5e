//! Catch-up: when the live path may have missed events (NATS reconnect,
//! slow consumer, stream leader change), live frames are held shard-wide
//! while every subscription re-reads from its last delivered sequence; the
//! caught-up and held frames are then merged by sequence and delivered.

use super::Upstream;
use super::dispatcher::{CatchUp, Delivery, Dispatcher, Done};
use super::topics::TopicKey;
use crate::client::EndReason;
use crate::nats::{CatchUpTopic, CaughtUp};

/// Reads one catch-up may make before it delivers what it holds anyway.
const CATCH_UP_ROUNDS: u32 = 4;

impl<U: Upstream> Dispatcher<U> {
    /// Holds live delivery and re-reads every subscription's events from
    /// its last delivered sequence.
    pub(super) fn start_catch_up(&mut self, why: &'static str) {
        if self.catch_up.is_some() {
            self.catch_up_again = true;
            return;
        }
        self.window.stop_all();
        tracing::info!(reason = why, "catching up");
        self.metrics.catchups.inc();
        self.catch_up_round(Vec::new(), 1);
    }

    /// One read of every subscription from its last delivered sequence,
    /// with live frames `held` (and those arriving meanwhile) waiting.
    fn catch_up_round(&mut self, held: Vec<Delivery>, rounds: u32) {
        self.epoch += 1;
        let topics: Vec<CatchUpTopic<TopicKey>> = self
            .topics
            .active()
            .map(|(key, topic)| CatchUpTopic {
                key,
                pattern: topic.pattern.clone(),
                after: topic.last_seq,
            })
            .collect();
        tracing::info!(
            subscriptions = topics.len(),
            round = rounds,
            "catch-up reads"
        );
        self.catch_up = Some(CatchUp {
            epoch: self.epoch,
            held,
            rounds,
        });
        let epoch = self.epoch;
        let upstream = self.upstream.clone();
        let done = self.done.clone();
        let limit = self.cfg.replay_limit;
        tokio::spawn(async move {
            let read: Vec<(TopicKey, u64)> = topics.iter().map(|t| (t.key, t.after)).collect();
            let caught_up = upstream.catch_up(topics, limit).await;
            let _ = done.send(Done::CaughtUp {
                epoch,
                caught_up,
                topics: read,
            });
        });
    }

    pub(super) async fn caught_up(
        &mut self,
        epoch: u64,
        caught_up: CaughtUp<TopicKey>,
        topics: Vec<(TopicKey, u64)>,
    ) {
        let Some(catch_up) = self.catch_up.take_if(|c| c.epoch == epoch) else {
            return;
        };
        let CaughtUp {
            frames,
            truncated,
            read_to,
            gave_up,
            ..
        } = caught_up;
        // Every live frame held was stored before it arrived, so the read
        // must reach just before the first of them: if it did not (the
        // stream's end it was told was stale, e.g. from a node that had
        // just come back), events between the two would be skipped. Read
        // again, holding on, a bounded number of times.
        let first_held = catch_up.held.iter().map(|d| d.seq).min();
        if let Some(f) = first_held
            && f > read_to + 1
            && !gave_up
            && catch_up.rounds < CATCH_UP_ROUNDS
        {
            tracing::info!(
                read_to,
                first_held = f,
                "catch-up ended before the live frames it held; reading again"
            );
            self.catch_up_round(catch_up.held, catch_up.rounds + 1);
            return;
        }
        // Topics removed meanwhile are dead keys: their frames are dropped.
        let mut items: Vec<Delivery> = frames
            .into_iter()
            .filter(|(_, key, _)| self.topics.get(*key).is_some())
            .map(|(seq, topic, frame)| Delivery {
                seq,
                topic,
                frame,
                previous: None,
                stored_us: 0,
            })
            .collect();
        for (key, after) in topics {
            if self.topics.get(key).is_some() && !truncated.contains(&key) {
                self.window.start(key, after);
            }
        }
        // Topics whose backlog exceeded the replay limit cannot be caught up
        // in memory: their clients resume on their own (with a gap notice).
        // Their subscriptions go on from what the shard has seen, so a live
        // event does not report the skipped backlog as a hole.
        let seen = self.seen();
        for &key in &truncated {
            if let Some(topic) = self.topics.get_mut(key) {
                topic.last_seq = topic.last_seq.max(seen);
            }
        }
        let queues = truncated
            .iter()
            .filter_map(|&key| self.topics.get(key))
            .flat_map(|topic| topic.clients.iter().map(|(_, q)| q));
        self.end_streams(queues, EndReason::Resync);
        items.extend(catch_up.held);
        items.sort_by_key(|d| d.seq);
        tracing::info!(events = items.len(), "caught up");
        self.deliver(&items).await;
        if std::mem::take(&mut self.catch_up_again) {
            self.start_catch_up("triggered again during catch-up");
        }
    }
}
