//! The live path's per-batch work, reachable from `benches/micro.rs`:
//! what the feed and the dispatcher do with a batch of live messages,
//! without the sockets and tasks around them. Each message is a RePublish
//! copy with its five headers, as the server writes it; each is parsed
//! into its frame, the batch sorted, remembered in the replay window
//! (under a budget it keeps evicting from), offered to its topic's client
//! queue and taken from the queue as a connection would.

use std::task::{Context, Waker};

use bytes::Bytes;
use slotmap::SlotMap;

use super::fanout::{BatchBuffers, encode_batch};
use super::topics::TopicKey;
use super::window::Window;
use crate::client::{ClientQueue, Offer};
use crate::nats::{LiveMessage, wire};

/// A batch of live messages for [`LiveBatch::run`]: `HMSG` operations as
/// they come off the socket, each subscription's id its topic's index.
pub struct LiveMessages(Vec<u8>);

/// A hub's live path over `topics` subjects with one client each.
pub struct LiveBatch {
    keys: Vec<TopicKey>,
    queues: Vec<ClientQueue>,
    window: Window<TopicKey>,
    bufs: BatchBuffers,
    batch: Vec<(TopicKey, LiveMessage)>,
    payload: Bytes,
}

impl LiveBatch {
    /// `topics` subjects, a replay window of `window_bytes`, and a payload
    /// of `payload_len` bytes per event.
    pub fn new(topics: usize, window_bytes: u64, payload_len: usize) -> Self {
        let mut slots: SlotMap<TopicKey, ()> = SlotMap::with_key();
        let keys: Vec<TopicKey> = (0..topics).map(|_| slots.insert(())).collect();
        let mut window = Window::new(window_bytes);
        for &k in &keys {
            window.start(k, 0);
        }
        LiveBatch {
            queues: (0..topics).map(|_| ClientQueue::new(1024, 0)).collect(),
            keys,
            window,
            bufs: BatchBuffers::default(),
            batch: Vec::new(),
            payload: Bytes::from(vec![b'x'; payload_len]),
        }
    }

    /// The live copies of events `first..first + n`, round-robin over the
    /// subjects, as the server sends them to the feed.
    pub fn messages(&self, first: u64, n: usize) -> LiveMessages {
        let mut wire = Vec::new();
        for seq in first..first + n as u64 {
            let topic = seq as usize % self.keys.len();
            let previous = seq.saturating_sub(self.keys.len() as u64);
            let headers = format!(
                "NATS/1.0\r\nNats-Stream: EVENTS\r\nNats-Subject: events.user.{topic}\r\n\
                 Nats-Sequence: {seq}\r\nNats-Time-Stamp: 2026-11-30T19:20:00.948397123Z\r\n\
                 Nats-Last-Sequence: {previous}\r\n\r\n"
            );
            let total = headers.len() + self.payload.len();
            wire.extend_from_slice(
                format!(
                    "HMSG relay.events.user.{topic} {topic} {} {total}\r\n",
                    headers.len()
                )
                .as_bytes(),
            );
            wire.extend_from_slice(headers.as_bytes());
            wire.extend_from_slice(&self.payload);
            wire.extend_from_slice(b"\r\n");
        }
        LiveMessages(wire)
    }

    /// Reads `msgs` as the feed does: each into its frame, with its topic.
    pub(super) fn parse(&self, msgs: &LiveMessages, into: &mut Vec<(TopicKey, LiveMessage)>) {
        let mut rest = &msgs.0[..];
        while let Ok(Some((op, used))) = wire::parse(rest, usize::MAX / 2) {
            if let wire::ServerOp::Msg {
                sid,
                headers,
                payload,
                ..
            } = op
            {
                if let Some(m) = wire::live_message(headers, payload) {
                    into.push((self.keys[sid as usize], m));
                }
            }
            rest = &rest[used..];
        }
    }

    /// One batch through the live path; returns the bytes the clients took.
    pub fn run(&mut self, msgs: &LiveMessages) -> usize {
        let n = self.keys.len();
        let mut batch = std::mem::take(&mut self.batch);
        self.parse(msgs, &mut batch);
        self.batch = batch;
        encode_batch(&mut self.batch, &mut self.bufs);
        let mut cx = Context::from_waker(Waker::noop());
        let mut taken = 0;
        let mut deepest = 0;
        for d in &self.bufs.deliveries {
            self.window.push(d.topic, d.seq, &d.frame);
            let q = &self.queues[d.seq as usize % n];
            let offered = q.offer_live(d.seq, &d.frame, d.stored_us, &mut deepest);
            debug_assert_eq!(offered, Offer::Queued);
            if let std::task::Poll::Ready(Some((chunk, _))) = q.poll_chunk_stored(&mut cx) {
                taken += chunk.len();
            }
        }
        self.bufs.done();
        taken
    }
}

/// One fan-out round: a frame offered to every client of one subject, then
/// taken from each queue as its connection would (one frame at a time).
pub struct FanoutRound {
    queues: Vec<std::sync::Arc<ClientQueue>>,
}

impl FanoutRound {
    pub fn new(clients: usize) -> Self {
        FanoutRound {
            queues: (0..clients)
                .map(|_| std::sync::Arc::new(ClientQueue::new(1024, 0)))
                .collect(),
        }
    }

    /// Offers event `seq` to every queue, then takes it from each; returns
    /// the bytes taken.
    pub fn run(&self, seq: u64, frame: &Bytes) -> usize {
        let mut deepest = 0;
        for q in &self.queues {
            let offered = q.offer_live(seq, frame, 0, &mut deepest);
            debug_assert_eq!(offered, Offer::Queued);
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut taken = 0;
        for q in &self.queues {
            if let std::task::Poll::Ready(Some((chunk, _))) = q.poll_chunk_stored(&mut cx) {
                taken += chunk.len();
            }
        }
        taken
    }
}
