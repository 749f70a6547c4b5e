//! Catch-up: when the live path may have missed events (NATS reconnect,
//! slow consumer, stream leader change), live frames are held node-wide
//! while every subscription re-reads from its last delivered sequence; the
//! caught-up and held frames are then merged by sequence and delivered.

use bytes::Bytes;

use super::{CatchUp, Cmd, Dispatcher};
use crate::replay::CatchUpTopic;
use crate::sse::{self, EndReason};

impl Dispatcher {
    /// Holds live delivery and re-reads every subscription's events from
    /// its last delivered sequence (see `replay::Replayer::catch_up`).
    pub(super) fn start_catch_up(&mut self, why: &'static str) {
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

    pub(super) async fn caught_up(
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
}
