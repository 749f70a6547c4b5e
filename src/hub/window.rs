//! The replay window: recent frames per shared subscription, capped in bytes
//! across all of them (least recently used subscription gives up its oldest
//! frames first), so a reconnect storm is served from memory instead of
//! opening one JetStream consumer per client.
//!
//! A ring is only useful if it is *whole*: it holds every event of its
//! pattern with sequence above `covered_from`. Coverage starts when the
//! subscription is active and the stream's last sequence is known, moves up
//! as old frames are evicted, and is dropped whenever the live path may have
//! missed something (NATS reconnect), until catch-up makes it whole again.

use std::collections::VecDeque;
use std::hash::Hash;

use bytes::Bytes;
use lru::LruCache;

/// What one remembered frame costs beyond its bytes: the ring slot and the
/// frame's allocation header. Counted so the budget bounds real memory.
const ENTRY_OVERHEAD: usize = 64;

fn cost(frame: &Bytes) -> usize {
    frame.len() + ENTRY_OVERHEAD
}
#[derive(Default)]
struct Ring {
    frames: VecDeque<(u64, Bytes)>,
    covered_from: u64,
    bytes: usize,
}

/// Per-topic rings of recent frames under one byte budget. The rings live
/// in the LRU map itself: one lookup (foldhash, not SipHash) per frame.
pub(crate) struct Window<K> {
    rings: LruCache<K, Ring>,
    bytes: usize,
    cap: usize,
}

impl<K: Hash + Eq + Copy> Window<K> {
    pub(crate) fn new(cap_bytes: u64) -> Self {
        Window {
            rings: LruCache::unbounded(),
            bytes: 0,
            cap: usize::try_from(cap_bytes).unwrap_or(usize::MAX),
        }
    }

    /// Starts (or restarts) coverage of `topic`: every frame above
    /// `covered_from` will be pushed.
    pub(crate) fn start(&mut self, topic: K, covered_from: u64) {
        self.stop(topic);
        if self.cap == 0 {
            return;
        }
        self.rings.put(
            topic,
            Ring {
                covered_from,
                ..Ring::default()
            },
        );
    }

    /// Forgets `topic`'s frames and coverage.
    pub(crate) fn stop(&mut self, topic: K) {
        if let Some(r) = self.rings.pop(&topic) {
            self.bytes -= r.bytes;
        }
    }

    pub(crate) fn stop_all(&mut self) {
        self.rings.clear();
        self.bytes = 0;
    }

    /// Records a frame of `topic` (in sequence order).
    pub(crate) fn push(&mut self, topic: K, seq: u64, frame: &Bytes) {
        // Promotes the topic: the most recently pushed gives up frames last.
        let Some(r) = self.rings.get_mut(&topic) else {
            return;
        };
        if r.frames.back().is_some_and(|(s, _)| *s >= seq) || seq <= r.covered_from {
            return;
        }
        r.frames.push_back((seq, frame.clone()));
        r.bytes += cost(frame);
        self.bytes += cost(frame);
        self.evict();
    }

    fn evict(&mut self) {
        while self.bytes > self.cap {
            // The least recent entry, reached from the list's tail: no hash
            // lookup (looking its key up again was two cache misses of the
            // three an eviction cost on 10,000 topics).
            let Some((&topic, r)) = self.rings.iter_mut().next_back() else {
                return;
            };
            if let Some((seq, f)) = r.frames.pop_front() {
                r.bytes -= cost(&f);
                self.bytes -= cost(&f);
                r.covered_from = seq;
            }
            // An emptied ring has nothing more to give: move it out of the
            // way so the least recent entry always holds frames (bytes above
            // the cap means some ring does), and eviction stays O(1).
            if r.frames.is_empty() {
                self.rings.promote(&topic);
            }
        }
    }

    /// The sequence above which `topic`'s ring is whole, if it has one.
    pub(crate) fn covered_from(&self, topic: K) -> Option<u64> {
        self.rings.peek(&topic).map(|r| r.covered_from)
    }

    /// Extends `topic`'s ring back: `frames` are every event of the topic in
    /// `(from, to]`, in order, and the ring must be whole from `to` (else
    /// nothing changes). The budget still applies: the oldest frames may be
    /// evicted again at once.
    pub(crate) fn prepend(&mut self, topic: K, from: u64, to: u64, frames: Vec<(u64, Bytes)>) {
        let Some(r) = self.rings.peek_mut(&topic) else {
            return;
        };
        if r.covered_from != to || frames.iter().any(|(s, _)| *s <= from || *s > to) {
            return;
        }
        let added: usize = frames.iter().map(|(_, f)| cost(f)).sum();
        for f in frames.into_iter().rev() {
            r.frames.push_front(f);
        }
        r.covered_from = from;
        r.bytes += added;
        self.bytes += added;
        self.rings.promote(&topic);
        self.evict();
    }

    /// How many frames of `topic` are above `after`, or None when the ring
    /// does not reach back that far (the caller must read the stream).
    pub(crate) fn count_after(&self, topic: K, after: u64) -> Option<usize> {
        let r = self.rings.peek(&topic)?;
        if r.covered_from > after {
            return None;
        }
        Some(r.frames.len() - r.frames.partition_point(|(s, _)| *s <= after))
    }

    /// Appends the frames of `topic` above `after` to `out`.
    pub(crate) fn frames_after(&mut self, topic: K, after: u64, out: &mut Vec<(u64, Bytes)>) {
        if let Some(r) = self.rings.get(&topic) {
            let i = r.frames.partition_point(|(s, _)| *s <= after);
            out.extend(r.frames.range(i..).cloned());
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    #[test]
    fn serves_only_what_it_covers() {
        let mut w = Window::new(1 << 20);
        w.start(0, 10);
        for s in 11..=20 {
            w.push(0, s, &f(10));
        }
        assert_eq!(w.count_after(0, 15), Some(5));
        assert_eq!(w.count_after(0, 10), Some(10));
        assert_eq!(
            w.count_after(0, 9),
            None,
            "seq 10 and below were never seen"
        );
        assert_eq!(w.count_after(1, 15), None, "unknown topic");
        let mut out = Vec::new();
        w.frames_after(0, 18, &mut out);
        assert_eq!(
            out.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![19, 20]
        );
    }

    #[test]
    fn evicts_oldest_frames_of_the_least_recent_topic_and_moves_coverage() {
        let each = cost(&f(10));
        let mut w = Window::new(10 * each as u64);
        w.start(0, 0);
        w.start(1, 0);
        for s in 1..=5 {
            w.push(0, s, &f(10)); // topic 0: half the budget
        }
        for s in 6..=10 {
            w.push(1, s, &f(10)); // topic 1: the other half, most recent
        }
        assert_eq!(w.bytes(), 10 * each);
        w.push(1, 11, &f(10));
        assert!(w.bytes() <= 10 * each);
        assert_eq!(w.count_after(0, 0), None, "topic 0 lost seq 1");
        assert_eq!(w.count_after(0, 1), Some(4));
        assert_eq!(w.count_after(1, 5), Some(6));
    }

    #[test]
    fn prepend_extends_coverage_back_only_when_contiguous() {
        let mut w = Window::new(1 << 20);
        w.start(0, 10);
        w.push(0, 12, &f(10));
        w.prepend(0, 4, 9, vec![(6, f(10))]);
        assert_eq!(
            w.count_after(0, 4),
            None,
            "not contiguous with coverage at 10"
        );
        w.prepend(0, 4, 10, vec![(6, f(10)), (9, f(10))]);
        assert_eq!(w.count_after(0, 4), Some(3));
        let mut out = Vec::new();
        w.frames_after(0, 5, &mut out);
        assert_eq!(
            out.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![6, 9, 12]
        );
    }

    #[test]
    fn stop_drops_coverage_and_bytes() {
        let mut w = Window::new(1000);
        w.start(3, 0);
        w.push(3, 1, &f(10));
        w.stop(3);
        assert_eq!(w.bytes(), 0);
        assert_eq!(w.count_after(3, 0), None);
    }
}
