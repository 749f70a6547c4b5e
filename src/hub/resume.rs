//! Resumes served by the hub: from the memory window, or after a single
//! read that fills a cold window for every concurrent resume of a topic.
//! Anything else goes back to the session as [`Backfill::FromStream`].

use super::dispatcher::{Dispatcher, Done};
use super::topics::{Fill, TopicKey};
use super::{Backfill, Upstream};
use crate::client::ClientId;
use crate::nats::Stored;
use crate::sse;

impl<U: Upstream> Dispatcher<U> {
    /// Every subscription of client `id` is active: serve its resume from
    /// the window if it can (or park it behind a fill), and answer the join.
    pub(super) fn answer_join(&mut self, id: ClientId) {
        let Some(c) = self.clients.get_mut(id) else {
            return;
        };
        if c.initial {
            if let Some(reply) = c.reply.take() {
                let _ = reply.send(Ok(Backfill::FromStream { after: 0 }));
            }
            return;
        }
        let Some(after) = c.resume else {
            // A fresh stream is live from here: before any event can reach
            // its queue (the dispatcher is the only one who fills it). Every
            // event its topics deliver from now on is above each topic's
            // last delivered sequence, so the lowest of those is where it
            // starts: a reconnect from there misses nothing.
            let start = c
                .topics
                .iter()
                .map(|&key| {
                    self.topics
                        .get(key)
                        .filter(|t| t.since.is_some())
                        .map(|t| t.last_seq)
                })
                .try_fold(u64::MAX, |low, seq| seq.map(|s| low.min(s)))
                .filter(|&s| s != u64::MAX);
            c.queue.offer_unsequenced(&sse::encode_live_fresh(start));
            if let Some(reply) = c.reply.take() {
                let _ = reply.send(Ok(Backfill::Done));
            }
            return;
        };
        let served = self.resume_from_window(id, after);
        if !served && self.wait_for_fill(id, after) {
            return; // answered when the fill lands
        }
        self.answer_resume(id, after, served);
    }

    /// Answers a resume's join: done if the window served it, else the
    /// session reads the stream.
    fn answer_resume(&mut self, id: ClientId, after: u64, served: bool) {
        let Some(reply) = self.clients.get_mut(id).and_then(|c| c.reply.take()) else {
            return;
        };
        let backfill = if served {
            Backfill::Done
        } else {
            Backfill::FromStream { after }
        };
        let _ = reply.send(Ok(backfill));
    }

    /// The most a resume from memory may replay: larger ones go through
    /// JetStream, which is flow-controlled, and so do resumes beyond the
    /// replay limit (which report a gap).
    fn fits_in_memory(&self, events: u64, span: u64) -> bool {
        let limit = self.cfg.replay_limit;
        events <= (self.cfg.client_queue / 2) as u64 && (limit == 0 || span.max(events) <= limit)
    }

    /// Parks a resume of a single-topic client behind a fill of the
    /// topic's window back to `after`, starting one if none runs. False when
    /// the resume should read JetStream on its own.
    fn wait_for_fill(&mut self, id: ClientId, after: u64) -> bool {
        if !self.live_is_whole() {
            return false;
        }
        let Some(c) = self.clients.get(id) else {
            return false;
        };
        let [key] = c.topics[..] else { return false };
        let Some(covered) = self.window.covered_from(key) else {
            return false;
        };
        // Only what a memory resume may then serve (see resume_from_window).
        if after >= covered || !self.fits_in_memory(covered - after, covered - after) {
            return false;
        }
        let Some(topic) = self.topics.get_mut(key) else {
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
        let pattern = topic.pattern.clone();
        let upstream = self.upstream.clone();
        let done = self.done.clone();
        tokio::spawn(async move {
            let frames = upstream.read(&pattern, after, covered).await.ok();
            let _ = done.send(Done::Filled {
                topic: key,
                from: after,
                to: covered,
                frames,
            });
        });
        true
    }

    pub(super) fn filled(
        &mut self,
        key: TopicKey,
        from: u64,
        to: u64,
        frames: Option<Vec<Stored>>,
    ) {
        let Some(topic) = self.topics.get_mut(key) else {
            return;
        };
        // No fill: the stream was reset meanwhile and this read is stale.
        let Some(fill) = topic.fill.take() else {
            return;
        };
        let waiters = fill.waiters;
        if let Some(frames) = frames {
            self.window.prepend(key, from, to, frames);
        }
        for id in waiters {
            let Some(after) = self.clients.get(id).and_then(|c| c.resume) else {
                continue;
            };
            let served = self.resume_from_window(id, after);
            self.answer_resume(id, after, served);
        }
    }

    /// Replays the client's history from the window and releases its hold,
    /// if the window holds all of it and it is small enough.
    fn resume_from_window(&mut self, id: ClientId, after: u64) -> bool {
        if !self.live_is_whole() {
            return false;
        }
        let Some(c) = self.clients.get(id) else {
            return false;
        };
        let mut total = 0;
        for &key in &c.topics {
            match self.window.count_after(key, after) {
                Some(n) => total += n,
                None => return false,
            }
        }
        // The limit counts stream sequences, as the JetStream path does, up
        // to the last one this shard knows of.
        let span = self.seen().saturating_sub(after);
        if !self.fits_in_memory(total as u64, span) {
            return false;
        }
        let mut frames = Vec::with_capacity(total);
        for &key in &c.topics {
            self.window.frames_after(key, after, &mut frames);
        }
        frames.sort_by_key(|(seq, _)| *seq);
        for (seq, f) in &frames {
            c.queue.replay(*seq, f);
        }
        tracing::debug!(
            target: crate::session::RESUME_LOG,
            after,
            replayed = frames.len(),
            last = ?frames.last().map(|(seq, _)| *seq),
            first_held = ?c.queue.first_held(),
            "resume served from memory"
        );
        c.queue.release();
        self.metrics.count_resume("memory", frames.len() as u64);
        true
    }
}
