//! Resumes served by the hub: from the memory window, or after a single
//! read that fills a cold window for every concurrent resume of a topic.

use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::{Cmd, Dispatcher, Fill};
use crate::metrics::Source;

impl Dispatcher {
    /// Every subscription of client `id` is active: serve its resume from
    /// the window if it can, and answer the join.
    pub(super) fn answer(&mut self, id: u64) {
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
    pub(super) fn wait_for_fill(&mut self, id: u64, after: u64) -> bool {
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

    pub(super) fn filled(
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

    pub(super) fn resume_from_window(&mut self, id: u64, after: u64) -> bool {
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
        // The limit counts stream sequences, as the JetStream path does, up
        // to the last one this node knows of.
        let limit = self.replayer.limit;
        let span = self.max_seen.load(Ordering::Acquire).saturating_sub(after);
        if total > self.cfg.client_queue / 2 || (limit > 0 && span.max(total as u64) > limit) {
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
}
