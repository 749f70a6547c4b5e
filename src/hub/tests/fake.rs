//! A fake [`Upstream`]: a stream in memory whose live feed is one channel
//! per subscription, filled in publish order as NATS fills async-nats'
//! channels; and helpers that read a client's queue as its body would.

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::client::ClientQueue;
use crate::hub::{Heartbeat, Hub, HubConfig, Joined, LiveMessage, Upstream};
use crate::metrics::Metrics;
use crate::nats::{Bounds, CatchUpTopic, CaughtUp, HistoryError, LinkEvent, Stored};
use crate::subject;

/// A stream in memory with live subscriptions.
#[derive(Clone, Default)]
pub(super) struct Fake {
    state: Arc<Mutex<FakeState>>,
    /// When set, catch-ups wait for a permit: live events published
    /// meanwhile must be held.
    pub(super) catch_up_gate: Arc<Mutex<Option<Arc<Semaphore>>>>,
    /// When set, subscribing waits for a permit: a join stays pending.
    pub(super) subscribe_gate: Arc<Mutex<Option<Arc<Semaphore>>>>,
    /// When set, reads (window fills) wait for a permit.
    pub(super) read_gate: Arc<Mutex<Option<Arc<Semaphore>>>>,
}

#[derive(Default)]
pub(super) struct FakeState {
    /// (seq, subject, payload); seq = index + 1.
    pub(super) stored: Vec<(u64, String, Bytes)>,
    subs: Vec<(String, mpsc::UnboundedSender<LiveMessage>)>,
    pub(super) reads: usize,
    pub(super) last_sequence_asks: usize,
    pub(super) catch_ups: usize,
    /// Subscribes that reached the subscribe gate.
    pub(super) gated_subscribes: usize,
    pub(super) fail_subscribe: bool,
    /// Subscribing cannot read the stream's last sequence (JetStream slow
    /// or away).
    pub(super) unknown_position: bool,
    /// The next catch-ups (how many) are told the stream ends here (a stale
    /// answer from a node that lags).
    pub(super) stale_last: Option<(u64, usize)>,
    /// Subscriptions end as soon as they are made (the NATS client closed).
    pub(super) end_subscriptions: bool,
    /// The stream's creation time: a recreated stream gets a new one.
    pub(super) created: i128,
}

pub(super) struct FakeSub(mpsc::UnboundedReceiver<LiveMessage>);

impl Stream for FakeSub {
    type Item = LiveMessage;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

/// The live copy RePublish makes of event `seq`; `previous` is the event
/// stored before it on the same subject (0: none).
fn message(seq: u64, previous: u64, payload: &Bytes) -> LiveMessage {
    LiveMessage {
        id: crate::nats::Republished {
            seq,
            previous,
            stored_us: 0,
        },
        frame: crate::sse::encode_event(seq, None, payload),
    }
}

impl Fake {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Stores an event and delivers it live to every matching subscription.
    pub(super) fn publish(&self, subject: &str) -> u64 {
        let seq = self.store(subject);
        self.republish(seq);
        seq
    }

    /// Delivers stored event `seq` live (again) to every matching
    /// subscription, as RePublish would.
    pub(super) fn republish(&self, seq: u64) {
        let st = self.lock();
        let (_, subject, payload) = &st.stored[seq as usize - 1];
        let previous = st.stored[..seq as usize - 1]
            .iter()
            .rev()
            .find(|(_, s, _)| s == subject)
            .map_or(0, |(s, _, _)| *s);
        for (pattern, tx) in &st.subs {
            if subject::matches(pattern, subject) {
                let _ = tx.send(message(seq, previous, payload));
            }
        }
    }

    /// Stores an event that live delivery misses (NATS was away).
    pub(super) fn store(&self, subject: &str) -> u64 {
        let mut st = self.lock();
        let seq = st.stored.len() as u64 + 1;
        st.stored
            .push((seq, subject.to_string(), Bytes::from(format!("e{seq}"))));
        seq
    }

    /// Deletes the stream and creates it again: sequences restart at 1.
    pub(super) fn recreate(&self) {
        let mut st = self.lock();
        st.stored.clear();
        st.created += 1;
    }

    pub(super) fn last(&self) -> u64 {
        self.lock().stored.len() as u64
    }

    /// Live subscriptions the hub still holds, on `pattern`.
    pub(super) fn subscriptions(&self, pattern: &str) -> usize {
        self.lock()
            .subs
            .iter()
            .filter(|(p, tx)| p == pattern && !tx.is_closed())
            .count()
    }

    pub(super) fn stored_after(&self, pattern: &str, after: u64, to: u64) -> Vec<Stored> {
        self.lock()
            .stored
            .iter()
            .filter(|(s, subj, _)| *s > after && *s <= to && subject::matches(pattern, subj))
            .map(|(s, _, p)| (*s, crate::sse::encode_event(*s, None, p)))
            .collect()
    }
}

impl Upstream for Fake {
    type Live = FakeSub;

    async fn subscribe(&self, pattern: &str) -> Result<(FakeSub, Option<u64>), String> {
        let gate = self.subscribe_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            self.lock().gated_subscribes += 1;
            gate.acquire().await.unwrap().forget();
        }
        let mut st = self.lock();
        if st.fail_subscribe {
            return Err("refused".into());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        if !st.end_subscriptions {
            st.subs.push((pattern.to_string(), tx));
        }
        let covered = (!st.unknown_position).then_some(st.stored.len() as u64);
        Ok((FakeSub(rx), covered))
    }

    async fn bounds(&self) -> Result<Bounds, HistoryError> {
        let st = self.lock();
        Ok(Bounds {
            first: 1,
            last: st.stored.len() as u64,
            created: st.created,
        })
    }

    /// The fake stream stores `events.>`.
    fn dense(&self, pattern: &str) -> bool {
        subject::contains(pattern, "events.>")
    }

    async fn last_sequence(&self, _reaching: u64) -> Result<u64, HistoryError> {
        self.lock().last_sequence_asks += 1;
        Ok(self.last())
    }

    async fn read(&self, pattern: &str, after: u64, to: u64) -> Result<Vec<Stored>, HistoryError> {
        let gate = self.read_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
        self.lock().reads += 1;
        Ok(self.stored_after(pattern, after, to))
    }

    async fn catch_up<K: Copy + Send + Sync + 'static>(
        &self,
        topics: Vec<CatchUpTopic<K>>,
        limit: u64,
    ) -> CaughtUp<K> {
        let gate = self.catch_up_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.acquire().await.unwrap().forget();
        }
        let last = {
            let mut st = self.lock();
            st.catch_ups += 1;
            match &mut st.stale_last {
                Some((end, n)) if *n > 0 => {
                    *n -= 1;
                    *end
                }
                _ => st.stored.len() as u64,
            }
        };
        let mut out = CaughtUp {
            frames: Vec::new(),
            truncated: Vec::new(),
            read_to: last,
            known: 0,
            gave_up: false,
        };
        for t in topics {
            if t.after >= last {
                continue;
            }
            if limit > 0 && last - t.after > limit {
                out.truncated.push(t.key);
                continue;
            }
            for (s, f) in self.stored_after(&t.pattern, t.after, last) {
                out.frames.push((s, t.key, f));
            }
        }
        out
    }
}

pub(super) struct Setup {
    pub(super) fake: Fake,
    pub(super) hub: Arc<Hub>,
    pub(super) link: broadcast::Sender<LinkEvent>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) shutdown: CancellationToken,
}

pub(super) fn config() -> HubConfig {
    HubConfig {
        heartbeat: Duration::from_secs(15),
        client_queue: 1024,
        retry_ms: 2000,
        replay_cache_bytes: 1 << 20,
        replay_limit: 100_000,
        drain: Duration::ZERO,
        max_stream_age: None,
    }
}

pub(super) fn start(cfg: HubConfig) -> Setup {
    let fake = Fake::default();
    let (link, rx) = broadcast::channel(16);
    let metrics = Arc::new(Metrics::default());
    let shutdown = CancellationToken::new();
    let hub = Hub::start(fake.clone(), cfg, metrics.clone(), rx, shutdown.clone());
    Setup {
        fake,
        hub,
        link,
        metrics,
        shutdown,
    }
}

pub(super) fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

impl Setup {
    /// [`Setup::join`] on a task of its own, for a join the test holds up
    /// (behind a gate) while it does something else.
    pub(super) fn spawn_join(
        &self,
        patterns: &[&str],
        resume: Option<u64>,
    ) -> tokio::task::JoinHandle<Joined> {
        let hub = self.hub.clone();
        let patterns = patterns.iter().map(|p| p.to_string()).collect();
        tokio::spawn(async move {
            hub.join(patterns, in_an_hour(), resume, Heartbeat::Comment)
                .await
                .expect("join")
        })
    }

    pub(super) async fn join(&self, patterns: &[&str], resume: Option<u64>) -> Joined {
        let patterns = patterns.iter().map(|p| p.to_string()).collect();
        self.hub
            .join(patterns, in_an_hour(), resume, Heartbeat::Comment)
            .await
            .expect("join")
    }

    /// `n` clients on `pattern`, and how many events each queue has taken
    /// so far.
    pub(super) async fn join_many(
        &self,
        pattern: &str,
        n: usize,
    ) -> (Vec<Arc<ClientQueue>>, Vec<u64>) {
        let mut queues = Vec::with_capacity(n);
        for _ in 0..n {
            queues.push(self.join(&[pattern], None).await.queue);
        }
        let taken = queues.iter().map(|q| q.summary().0).collect();
        (queues, taken)
    }
}

/// A task like a connection's: it runs whenever the dispatcher lets the
/// runtime's other tasks run, and notes each new value of `look` until
/// `done` holds for one (at most 10,000 turns).
pub(super) fn watch<T, F, D>(look: F, done: D) -> tokio::task::JoinHandle<Vec<T>>
where
    T: PartialEq + Send + 'static,
    F: Fn() -> T + Send + 'static,
    D: Fn(&T) -> bool + Send + 'static,
{
    tokio::spawn(async move {
        let mut seen: Vec<T> = Vec::new();
        for _ in 0..10_000 {
            tokio::task::yield_now().await;
            let now = look();
            let over = done(&now);
            if seen.last() != Some(&now) {
                seen.push(now);
            }
            if over {
                break;
            }
        }
        seen
    })
}

/// Lets the dispatcher and the tasks it started run a while, without
/// moving the paused clock.
pub(super) async fn settle() {
    for _ in 0..64 {
        tokio::task::yield_now().await;
    }
}

/// Lets the dispatcher (and the tasks it started) run until `cond` holds,
/// without moving the paused clock. Bounded.
pub(super) async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if cond() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}

/// What a client has received so far, frame by frame.
#[derive(Debug, Default)]
pub(super) struct Received {
    pub(super) ids: Vec<u64>,
    pub(super) comments: usize,
    pub(super) controls: Vec<String>,
    pub(super) retries: usize,
    /// The `retry:` values, in order.
    pub(super) retry_ms: Vec<u64>,
    pub(super) ended: bool,
    /// Every frame in order: `id 5`, `relay.live {"last_event_id":4}`,
    /// `:`, `retry`.
    pub(super) order: Vec<String>,
}

/// Drains everything queued for a client (as its body would).
pub(super) fn drain(q: &ClientQueue, into: &mut Received) {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        match q.poll_chunk(&mut cx) {
            Poll::Ready(Some(chunk)) => {
                let text = std::str::from_utf8(&chunk).unwrap().to_string();
                for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
                    let control_with_id = frame.split_once('\n').filter(|(first, rest)| {
                        first.starts_with("id: ") && rest.starts_with("event: relay.")
                    });
                    if let Some((id, rest)) = control_with_id {
                        // A control with an id: it moves Last-Event-ID.
                        let mut lines = rest.lines();
                        let name = lines.next().unwrap().trim_start_matches("event: ");
                        let data = lines
                            .next()
                            .unwrap_or_default()
                            .trim_start_matches("data: ");
                        let id = id.trim_start_matches("id: ");
                        into.order.push(format!("{name} id {id} {data}"));
                        into.controls.push(name.to_string());
                    } else if let Some(id) = frame.strip_prefix("id: ") {
                        let id = id.lines().next().unwrap();
                        into.ids.push(id.parse().unwrap());
                        into.order.push(format!("id {id}"));
                    } else if frame == ":" {
                        into.comments += 1;
                        into.order.push(":".into());
                    } else if let Some(ms) = frame.strip_prefix("retry: ") {
                        into.retries += 1;
                        into.retry_ms.push(ms.trim().parse().unwrap());
                        into.order.push("retry".into());
                    } else if let Some(ev) = frame.strip_prefix("event: ") {
                        let mut lines = ev.lines();
                        let name = lines.next().unwrap().to_string();
                        let data = lines
                            .next()
                            .unwrap_or_default()
                            .trim_start_matches("data: ");
                        into.order.push(format!("{name} {data}"));
                        into.controls.push(name);
                    } else {
                        panic!("unexpected frame {frame:?}");
                    }
                }
            }
            Poll::Ready(None) => {
                into.ended = true;
                return;
            }
            Poll::Pending => return,
        }
    }
}

/// Drains `q` into `got` until it holds `n` event ids or more (bounded);
/// the failure names the ids it did hold.
pub(super) async fn receive_ids(q: &ClientQueue, got: &mut Received, n: usize) {
    for _ in 0..10_000 {
        drain(q, got);
        if got.ids.len() >= n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {n} events (got {:?})", got.ids);
}

pub(super) fn received(q: &ClientQueue) -> Received {
    let mut r = Received::default();
    drain(q, &mut r);
    r
}
