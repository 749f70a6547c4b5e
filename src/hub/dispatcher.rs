//! The dispatcher task: the one owner of a shard's topics, clients, window
//! and catch-up state. Sessions talk to it through [`Cmd`]s; the tasks it
//! starts (subscribing, window fills, catch-ups) answer through [`Done`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{broadcast, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::merge::MergeSet;
use super::topics::{Clients, TopicKey, Topics};
use super::window::Window;
use super::{Cmd, Heartbeat, HubConfig, Upstream};
use crate::client::{ClientId, ClientQueue, EndReason};
use crate::metrics::{Metrics, Reason};
use crate::nats::{CaughtUp, LinkEvent, Stored};
use crate::sse;

/// One event on its way to the clients of one topic.
#[derive(Debug, Clone)]
pub(super) struct Delivery {
    pub(super) seq: u64,
    pub(super) topic: TopicKey,
    pub(super) frame: Bytes,
    /// For a live copy, RePublish's `Nats-Last-Sequence`: the previous
    /// event stored on the same subject (0: none). None when read from the
    /// stream.
    pub(super) previous: Option<u64>,
    /// When the stream stored it (µs since the Unix epoch; 0: unknown).
    pub(super) stored_us: u64,
}

/// Streams ended by expiry (or age) between two yields of the dispatcher:
/// ten thousand tokens that expire at the same second end a chunk at a
/// time, with deliveries and socket writes in between.
pub(super) const EXPIRY_CHUNK: usize = 512;

/// Ticks per heartbeat interval: each looks at this share of the clients.
const HEARTBEAT_SLICES: usize = 16;

/// The heartbeat sweep: clients in HEARTBEAT_SLICES buckets by id, one
/// bucket looked at per tick, so every client (a new one too) is looked at
/// once per interval. Departed clients are dropped from their bucket when
/// it is next looked at.
#[derive(Default)]
pub(super) struct Sweep {
    buckets: [Vec<ClientId>; HEARTBEAT_SLICES],
    tick: usize,
}

impl Sweep {
    pub(super) fn add(&mut self, id: ClientId) {
        self.buckets[(id.0 % HEARTBEAT_SLICES as u64) as usize].push(id);
    }
}

/// One sweep tick: 1/HEARTBEAT_SLICES of the interval, in whole
/// milliseconds (the timer's resolution), so a cycle never outlasts it.
pub(super) fn sweep_tick(interval: Duration) -> Duration {
    Duration::from_millis((interval.as_millis() as u64 / HEARTBEAT_SLICES as u64).max(1))
}

/// Answers from the tasks the dispatcher starts.
pub(super) enum Done<U: Upstream> {
    Subscribed {
        topic: TopicKey,
        result: Result<(U::Live, Option<u64>), String>,
    },
    CaughtUp {
        epoch: u64,
        caught_up: CaughtUp<TopicKey>,
        /// The topics read, with the sequence each was read after.
        topics: Vec<(TopicKey, u64)>,
    },
    /// The stream's bounds and creation time (None: not read).
    Checked(Option<crate::nats::Bounds>),
    /// A window fill read `(from, to]` of a topic (None: it failed).
    Filled {
        topic: TopicKey,
        from: u64,
        to: u64,
        frames: Option<Vec<Stored>>,
    },
}

/// A catch-up in progress: live frames wait here until it lands.
pub(super) struct CatchUp {
    pub(super) epoch: u64,
    pub(super) held: Vec<Delivery>,
    /// Reads made so far (see `caught_up`).
    pub(super) rounds: u32,
}

pub(super) struct Dispatcher<U: Upstream> {
    pub(super) upstream: U,
    pub(super) cfg: HubConfig,
    pub(super) metrics: Arc<Metrics>,
    pub(super) window: Window<TopicKey>,
    pub(super) max_seen: Arc<AtomicU64>,
    /// NATS dropped: the live path may have missed events until catch-up.
    pub(super) disconnected: bool,
    pub(super) catch_up: Option<CatchUp>,
    /// Another trigger arrived during a catch-up: run one more after it.
    pub(super) catch_up_again: bool,
    pub(super) epoch: u64,
    pub(super) done: mpsc::UnboundedSender<Done<U>>,
    pub(super) done_rx: Option<mpsc::UnboundedReceiver<Done<U>>>,
    pub(super) topics: Topics,
    pub(super) merge: MergeSet<U::Live, TopicKey>,
    pub(super) clients: Clients,
    pub(super) stream_check: super::reset::StreamCheck,
    /// `retry: <ms>`: the last frame of every stream the hub ends, so the
    /// browser comes back (to this shard or another) after the delay.
    pub(super) retry: Bytes,
    /// Jitter for closing `retry:`s and stream age limits.
    pub(super) rng: u64,
    /// Shutdown in progress: streams close a slice at a time.
    pub(super) drain: Option<super::drain::Drain>,
    pub(super) sweep: Sweep,
}

impl<U: Upstream> Dispatcher<U> {
    pub(super) fn new(
        upstream: U,
        cfg: HubConfig,
        metrics: Arc<Metrics>,
        max_seen: Arc<AtomicU64>,
    ) -> Self {
        let (done, done_rx) = mpsc::unbounded_channel();
        Dispatcher {
            upstream,
            window: Window::new(cfg.replay_cache_bytes),
            retry: sse::encode_retry(cfg.retry_ms),
            cfg,
            metrics,
            max_seen,
            disconnected: false,
            catch_up: None,
            catch_up_again: false,
            epoch: 0,
            done,
            done_rx: Some(done_rx),
            topics: Topics::default(),
            merge: MergeSet::default(),
            clients: Clients::default(),
            stream_check: Default::default(),
            rng: seed(),
            drain: None,
            sweep: Sweep::default(),
        }
    }

    /// Is every live frame since the subscriptions became active known to
    /// have arrived? False while NATS is away or a catch-up runs: the
    /// window cannot serve resumes then.
    pub(super) fn live_is_whole(&self) -> bool {
        self.catch_up.is_none() && !self.disconnected
    }

    pub(super) fn note_seen(&self, seq: u64) {
        self.max_seen.fetch_max(seq, Ordering::AcqRel);
        self.metrics
            .last_sequence_seen
            .fetch_max(seq, Ordering::Relaxed);
    }

    pub(super) fn seen(&self) -> u64 {
        self.max_seen.load(Ordering::Acquire)
    }

    pub(super) async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut link: broadcast::Receiver<LinkEvent>,
        shutdown: CancellationToken,
    ) {
        let mut done = self.done_rx.take().expect("run once");
        // The sweep looks at 1/HEARTBEAT_SLICES of the clients per tick, so
        // every client is looked at once per interval and the writes are
        // spread over it instead of landing in one burst.
        let mut heartbeat = tokio::time::interval(sweep_tick(self.cfg.heartbeat));
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        heartbeat.tick().await;
        let expiry = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86400));
        tokio::pin!(expiry);
        let mut armed: Option<Instant> = None;
        let mut batch = Vec::new();
        let mut ended = Vec::new();
        let mut bufs = super::fanout::BatchBuffers::default();
        let mut drain_tick = tokio::time::interval(super::drain::DRAIN_TICK);
        drain_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let comment = Bytes::from_static(sse::HEARTBEAT);
        let event = Bytes::from_static(sse::HEARTBEAT_EVENT);
        // What the shard's sequences belong to, before anything hints at
        // a reset.
        self.check_stream("start", true);
        loop {
            let next = self.clients.next_expiry();
            if next != armed {
                if let Some(at) = next {
                    expiry.as_mut().reset(at);
                }
                armed = next;
            }
            tokio::select! {
                biased;
                () = shutdown.cancelled(), if self.drain.is_none() => {
                    if self.start_drain() {
                        break;
                    }
                }
                _ = drain_tick.tick(), if self.drain.is_some() => {
                    if self.drain_step() {
                        break;
                    }
                }
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Join(req)) => self.join(req),
                    Some(Cmd::Leave(id)) => self.leave(id),
                    Some(Cmd::CheckStream) => self.check_stream("last sequence below the shard's", false),
                    None => break,
                },
                Some(d) = done.recv() => match d {
                    Done::Subscribed { topic, result } => self.subscribed(topic, result),
                    Done::CaughtUp { epoch, caught_up, topics } => {
                        self.caught_up(epoch, caught_up, topics).await;
                    }
                    Done::Filled { topic, from, to, frames } => self.filled(topic, from, to, frames),
                    Done::Checked(bounds) => self.checked(bounds),
                },
                ev = link.recv() => match ev {
                    Ok(LinkEvent::Disconnected) => {
                        // Whatever NATS sends while we are away is lost to
                        // the live path: the windows are no longer whole.
                        self.disconnected = true;
                        self.window.stop_all();
                    }
                    Ok(LinkEvent::Connected) if self.disconnected => {
                        self.disconnected = false;
                        self.metrics.nats_reconnects.inc();
                        self.start_catch_up("nats reconnected");
                        // The stream may have been recreated meanwhile.
                        self.check_stream("nats reconnected", true);
                    }
                    Ok(LinkEvent::Connected | LinkEvent::Requests) => {}
                    Ok(LinkEvent::SlowConsumer) => self.start_catch_up("slow consumer"),
                    Ok(LinkEvent::StreamLeaderElected) => {
                        self.start_catch_up("stream leader elected");
                    }
                    Ok(LinkEvent::StreamCreated) => self.check_stream("stream created", true),
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.start_catch_up("missed connection events");
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        link = broadcast::channel(1).1;
                    }
                },
                () = std::future::poll_fn(|cx| self.merge.poll_batch(cx, &mut batch, &mut ended)) => {
                    super::fanout::encode_batch(&mut batch, &mut bufs);
                    self.deliver(&bufs.deliveries).await;
                    bufs.done();
                    for topic in ended.drain(..) {
                        self.subscription_ended(topic);
                    }
                }
                _ = heartbeat.tick() => self.sweep_heartbeats(&comment, &event),
                () = &mut expiry, if armed.is_some() => {
                    if self.expire() {
                        // More are due (tokens issued together expire
                        // together): let the connections write what is
                        // queued, and deliveries go first, between chunks.
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
        let n = self.end_streams(self.clients.queues(), EndReason::Shutdown);
        tracing::info!(clients = n, "hub stopped: remaining streams ended");
    }

    /// Ends `queues`' streams after a `retry:` hint (the clients resume by
    /// Last-Event-ID), counted under `reason`.
    pub(super) fn end_streams<'a>(
        &self,
        queues: impl Iterator<Item = &'a Arc<ClientQueue>>,
        reason: EndReason,
    ) -> usize {
        let mut n = 0;
        for q in queues {
            q.close(reason, Some(self.retry.clone()));
            n += 1;
        }
        self.count_ends(reason, n);
        n
    }

    /// One tick of the heartbeat sweep: the clients of the next bucket get
    /// a heartbeat if their stream wrote nothing since the sweep last
    /// looked (one interval ago).
    fn sweep_heartbeats(&mut self, comment: &Bytes, event: &Bytes) {
        let tick = self.sweep.tick;
        self.sweep.tick = (tick + 1) % HEARTBEAT_SLICES;
        let clients = &self.clients;
        self.sweep.buckets[tick].retain(|id| {
            let Some(c) = clients.get(*id) else {
                return false;
            };
            c.queue.heartbeat(match c.heartbeat {
                Heartbeat::Comment => comment,
                Heartbeat::Event => event,
            });
            true
        });
    }

    pub(super) fn count_ends(&self, reason: EndReason, n: usize) {
        if n > 0 {
            self.metrics
                .disconnects
                .get_or_create(&Reason {
                    reason: reason.label(),
                })
                .inc_by(n as u64);
        }
    }

    /// Ends the streams whose token expired or that reached their age
    /// limit, [`EXPIRY_CHUNK`] at most; true when more are due.
    fn expire(&mut self) -> bool {
        let tail = sse::encode_control("relay.expired", "{}");
        let (retry_ms, rng) = (self.cfg.retry_ms, &mut self.rng);
        let now = Instant::now();
        let (expired, aged) = self
            .clients
            .close_due(now, EXPIRY_CHUNK, &tail, || jittered_retry(retry_ms, rng));
        if expired > 0 {
            self.count_ends(EndReason::Expired, expired);
            tracing::info!(clients = expired, "token expired");
        }
        if aged > 0 {
            self.count_ends(EndReason::MaxAge, aged);
            tracing::debug!(clients = aged, "max stream age reached");
        }
        self.clients.next_expiry().is_some_and(|at| at <= now)
    }

    /// When a stream joining now reaches `--max-stream-age`: the age plus
    /// up to a tenth of it at random, so streams opened together (after a
    /// deploy) do not all end together.
    pub(super) fn age_limit(&mut self) -> Option<Instant> {
        let age = self.cfg.max_stream_age?;
        let spread = (age.as_millis() as u64 / 10).max(1);
        let extra = Duration::from_millis(next_random(&mut self.rng) % spread);
        Instant::now().checked_add(age + extra)
    }
}

/// xorshift64: the dispatcher's cheap source of jitter (not for secrets).
pub(super) fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

/// A closing `retry:` of `ms` plus up to half again at random, so the
/// clients of streams ended together do not all come back together.
pub(super) fn jittered_retry(ms: u64, rng: &mut u64) -> Bytes {
    sse::encode_retry(ms + next_random(rng) % (ms / 2 + 1))
}

/// A seed for [`next_random`] that differs between processes and shards.
fn seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now()) | 1
}
