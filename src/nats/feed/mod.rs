//! The live feed: a NATS connection of its own per shard, carrying only
//! subscriptions (the hub's, one per pattern, and the stream's advisories).
//! Each message is read into a [`LiveMessage`] as it comes off the socket
//! (see `wire` for why not async-nats), pushed into its subscription's
//! bounded queue, and the queue's waker woken, in socket order: the order
//! the hub's merge relies on. Requests (JetStream, publishes) keep their
//! async-nats connection; [`Link`] tells the hub when the feed's
//! connection is lost and back, which is what decides a catch-up.
//!
//! The feed also carries the few JetStream requests whose answer must
//! come after its subscriptions reached the stream's leader (the stream's
//! end read by a subscribe and a catch-up): sent on the same connection
//! after the `SUB`s, they travel the same routes behind them.
//!
//! The feed reconnects forever (the seeds, then the servers they announce,
//! from the first in [`Link::seeds`]' order each time, as the request
//! connection does, with its backoff), re-sends every `SUB` first, and
//! pings every 5 s: two unanswered pings and the connection is given up.

mod dial;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::Stream;
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::link::{Link, LinkEvent, PING_INTERVAL, random_u64, reconnect_delay};
use super::wire::{self, LiveMessage, ServerOp};
use crate::config::Config;
use dial::{Conn, Dialer, Info};

/// Messages a subscription holds for the hub before the feed drops what
/// comes next and reports a slow consumer (async-nats' default capacity).
const SUB_CAPACITY: usize = 65_536;
/// How long a flush's `PING` or a request may go unanswered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// The subscription id of the feed's reply inbox.
const INBOX_SID: u64 = 0;
/// Bound on one connection attempt, as for the request connection.
const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Unanswered keep-alive pings before the connection is given up.
const MAX_PINGS_OUT: u32 = 2;
/// As long as two unanswered pings take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FeedError {
    #[error("the live feed has stopped")]
    Stopped,
    #[error("NATS did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the connection was lost before the answer")]
    Lost,
    #[error("{0:?} cannot be subscribed to")]
    Subject(String),
}

/// A handle on the shard's live feed (cheap to clone).
#[derive(Clone)]
pub(crate) struct Feed {
    cmds: mpsc::UnboundedSender<Cmd>,
    next_sid: Arc<AtomicU64>,
}

enum Cmd {
    Sub {
        sid: u64,
        subject: String,
        to: Route,
    },
    Unsub(u64),
    /// Answered once the server has everything written before it.
    Flush(oneshot::Sender<()>),
    /// A request; the reply's payload (empty: no responders).
    Request {
        subject: String,
        payload: Bytes,
        tx: oneshot::Sender<Bytes>,
    },
}

enum Route {
    Queue(Arc<SubQueue>),
    /// Every message is this event (advisories).
    Signal(LinkEvent),
    /// Replies to requests, by the token after the inbox prefix.
    Replies,
}

impl Feed {
    /// Starts the feed's task on the current runtime; it connects in the
    /// background. Fails only on configuration (URLs, credentials).
    pub(crate) fn start(cfg: &Config, shard: usize, link: Arc<Link>) -> Result<Feed, String> {
        let name = format!("sse-relay/{shard}/live");
        let dialer = Dialer::new(
            link.seeds(),
            cfg.nats_creds.as_deref(),
            cfg.nats_url_auth.clone(),
            name,
        )?;
        let (cmds, rx) = mpsc::unbounded_channel();
        let task = Task::new(rx, link, dialer, shard);
        tokio::spawn(task.run());
        Ok(Feed {
            cmds,
            next_sid: Arc::new(AtomicU64::new(1)),
        })
    }

    /// Subscribes to `subject`. The server has the subscription once a
    /// flush or a request sent after it is answered.
    pub(crate) fn subscribe(&self, subject: &str) -> Result<FeedSub, FeedError> {
        let queue = Arc::new(SubQueue::default());
        let sid = self.sub(subject, Route::Queue(queue.clone()))?;
        Ok(FeedSub {
            sid,
            queue,
            cmds: self.cmds.clone(),
        })
    }

    /// Sends `payload` to `subject` and returns the reply's payload (empty
    /// when nothing answers). Sent after every command before it; while
    /// the feed is away, once it is back.
    pub(crate) async fn request(&self, subject: &str, payload: Bytes) -> Result<Bytes, FeedError> {
        if !wire::is_subscribable(subject) {
            return Err(FeedError::Subject(subject.to_owned()));
        }
        let (tx, rx) = oneshot::channel();
        let subject = subject.to_owned();
        self.cmds
            .send(Cmd::Request {
                subject,
                payload,
                tx,
            })
            .map_err(|_| FeedError::Stopped)?;
        answered(rx, FeedError::Lost).await
    }

    /// Turns every message on `subject` into `event` on the link, for as
    /// long as the feed runs.
    pub(crate) async fn watch(&self, subject: &str, event: LinkEvent) -> Result<(), FeedError> {
        self.sub(subject, Route::Signal(event))?;
        self.flush().await
    }

    fn sub(&self, subject: &str, to: Route) -> Result<u64, FeedError> {
        if !wire::is_subscribable(subject) {
            return Err(FeedError::Subject(subject.to_owned()));
        }
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        let subject = subject.to_owned();
        self.cmds
            .send(Cmd::Sub { sid, subject, to })
            .map_err(|_| FeedError::Stopped)?;
        Ok(sid)
    }

    /// Resolves once the server has read every command sent before (after
    /// a reconnect: every `SUB`, re-sent before anything else).
    pub(crate) async fn flush(&self) -> Result<(), FeedError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Flush(tx))
            .map_err(|_| FeedError::Stopped)?;
        answered(rx, FeedError::Stopped).await
    }
}

/// The task's answer within [`ANSWER_TIMEOUT`]; `dropped` when the task
/// let go of the question unanswered.
async fn answered<T>(rx: oneshot::Receiver<T>, dropped: FeedError) -> Result<T, FeedError> {
    match tokio::time::timeout(ANSWER_TIMEOUT, rx).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(dropped),
        Err(_) => Err(FeedError::Timeout(ANSWER_TIMEOUT)),
    }
}

/// One subscription's messages, bounded; the feed's task pushes, the hub
/// takes.
#[derive(Default)]
struct SubQueue {
    items: Mutex<VecDeque<LiveMessage>>,
    waker: AtomicWaker,
    /// Set when a message was dropped; reported once until one fits again.
    overflowed: AtomicBool,
    ended: AtomicBool,
    /// The server's refusal of the `SUB` (permissions): the queue ends.
    refused: std::sync::OnceLock<String>,
}

impl SubQueue {
    /// False when the queue is full (the message is dropped).
    fn push(&self, m: LiveMessage) -> bool {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        if items.len() >= SUB_CAPACITY {
            return false;
        }
        items.push_back(m);
        drop(items);
        self.waker.wake();
        true
    }

    fn pop(&self) -> Option<LiveMessage> {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        let m = items.pop_front();
        if items.is_empty() && items.capacity() > 64 {
            // A burst's room is given back.
            items.shrink_to(4);
        }
        m
    }

    fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The live messages of one subscription; dropping it unsubscribes.
pub(crate) struct FeedSub {
    sid: u64,
    queue: Arc<SubQueue>,
    cmds: mpsc::UnboundedSender<Cmd>,
}

impl FeedSub {
    /// The server's refusal of this subscription, once it has said so
    /// (its `-ERR` comes before the answer to anything sent after the
    /// `SUB`).
    pub(crate) fn refused(&self) -> Option<&str> {
        self.queue.refused.get().map(String::as_str)
    }
}

impl Stream for FeedSub {
    type Item = LiveMessage;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LiveMessage>> {
        let q = &self.queue;
        if let Some(m) = q.pop() {
            return Poll::Ready(Some(m));
        }
        q.waker.register(cx.waker());
        // Pushed between the first look and the registration?
        if let Some(m) = q.pop() {
            return Poll::Ready(Some(m));
        }
        if q.ended.load(Ordering::Acquire) {
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

impl Drop for FeedSub {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Unsub(self.sid));
    }
}

struct Sub {
    subject: String,
    to: Route,
}

/// Why a connection's service ended.
enum Ended {
    /// Every handle is gone: the feed stops.
    Stopped,
    Lost(String),
}

struct Task {
    cmds: mpsc::UnboundedReceiver<Cmd>,
    subs: HashMap<u64, Sub>,
    /// Flushes to answer on the next connection, after its `SUB`s.
    waiting: Vec<oneshot::Sender<()>>,
    /// Requests to send on the next connection, after its `SUB`s.
    unsent: Vec<(String, Bytes, oneshot::Sender<Bytes>)>,
    /// `_INBOX.<random>.`: a request's reply subject is this and a token.
    inbox: String,
    replies: HashMap<u64, oneshot::Sender<Bytes>>,
    next_token: u64,
    link: Arc<Link>,
    dialer: Dialer,
    shard: usize,
}

impl Task {
    fn new(
        cmds: mpsc::UnboundedReceiver<Cmd>,
        link: Arc<Link>,
        dialer: Dialer,
        shard: usize,
    ) -> Task {
        let inbox = format!("_INBOX.{:016x}{:016x}.", random_u64(), random_u64());
        let mut subs = HashMap::new();
        let subject = format!("{inbox}*");
        subs.insert(
            INBOX_SID,
            Sub {
                subject,
                to: Route::Replies,
            },
        );
        Task {
            cmds,
            subs,
            waiting: Vec::new(),
            unsent: Vec::new(),
            inbox,
            replies: HashMap::new(),
            next_token: 1,
            link,
            dialer,
            shard,
        }
    }

    async fn run(mut self) {
        let mut attempt = 0usize;
        loop {
            attempt += 1;
            if !self.idle(reconnect_delay(attempt)).await {
                break;
            }
            let conn = match self.dialer.dial(DIAL_TIMEOUT).await {
                Ok(conn) => conn,
                Err(e) => {
                    // An outage retries every 2 s: a warning for the first
                    // failure, then one a minute.
                    if attempt % 30 == 1 {
                        tracing::warn!(error = %e, shard = self.shard, attempt, "nats live feed: cannot connect");
                    } else {
                        tracing::debug!(error = %e, shard = self.shard, attempt, "nats live feed: cannot connect");
                    }
                    continue;
                }
            };
            let server = conn.server.clone();
            let since = tokio::time::Instant::now();
            let ended = self.serve(conn).await;
            self.link.set_feed(false, &server, self.shard);
            // A connection that lasted is retried at once; one the server
            // ends at once is retried with the backoff, not in a loop.
            if since.elapsed() >= PING_INTERVAL {
                attempt = 0;
            }
            match ended {
                Ended::Stopped => break,
                Ended::Lost(why) => {
                    tracing::warn!(%server, shard = self.shard, reason = %why, "nats live feed lost; reconnecting");
                }
            }
        }
        for sub in self.subs.values() {
            if let Route::Queue(q) = &sub.to {
                q.end();
            }
        }
    }

    /// Takes commands for `delay` while there is no connection; false once
    /// every handle is gone.
    async fn idle(&mut self, delay: Duration) -> bool {
        let until = tokio::time::Instant::now() + delay;
        loop {
            // Commands first: a closed channel ends the feed at once.
            while let Ok(cmd) = self.cmds.try_recv() {
                self.command(cmd, None);
            }
            if self.cmds.is_closed() && self.cmds.is_empty() {
                return false;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => return true,
                cmd = self.cmds.recv() => match cmd {
                    Some(cmd) => self.command(cmd, None),
                    None => return false,
                },
            }
        }
    }

    /// Applies a command; `out` is the connection's write buffer and its
    /// unanswered pings, when connected.
    fn command(&mut self, cmd: Cmd, out: Option<(&mut BytesMut, &mut Pings)>) {
        match (cmd, out) {
            (Cmd::Sub { sid, subject, to }, out) => {
                if let Some((w, _)) = out {
                    wire::sub(w, &subject, sid);
                }
                self.subs.insert(sid, Sub { subject, to });
            }
            (Cmd::Unsub(sid), out) => {
                if self.subs.remove(&sid).is_some() {
                    if let Some((w, _)) = out {
                        wire::unsub(w, sid);
                    }
                }
            }
            (Cmd::Flush(tx), Some((w, pings))) => {
                w.extend_from_slice(wire::PING);
                pings.sent.push_back(Some(tx));
            }
            (Cmd::Flush(tx), None) => {
                // Callers give up after a while: theirs are not kept.
                self.waiting.retain(|t| !t.is_closed());
                self.waiting.push(tx);
            }
            (
                Cmd::Request {
                    subject,
                    payload,
                    tx,
                },
                Some((w, _)),
            ) => self.send_request(w, &subject, &payload, tx),
            (
                Cmd::Request {
                    subject,
                    payload,
                    tx,
                },
                None,
            ) => {
                self.unsent.retain(|(.., t)| !t.is_closed());
                self.unsent.push((subject, payload, tx));
            }
        }
    }

    fn send_request(
        &mut self,
        out: &mut BytesMut,
        subject: &str,
        payload: &[u8],
        tx: oneshot::Sender<Bytes>,
    ) {
        // No sweep of abandoned entries here (a subscribe burst would make
        // it quadratic): every request is answered (a reply, an error, or
        // no responders' status) or the connection is lost, which clears
        // them all.
        let token = self.next_token;
        self.next_token += 1;
        let reply = format!("{}{token}", self.inbox);
        wire::publish(out, subject, &reply, payload);
        self.replies.insert(token, tx);
    }

    /// Serves one connection until it is lost or the feed stops.
    async fn serve(&mut self, conn: Conn) -> Ended {
        let Conn {
            mut io,
            server,
            message_limit,
            mut read,
        } = conn;
        let mut out = BytesMut::new();
        let mut pings = Pings::default();
        let mut sids: Vec<_> = self.subs.keys().copied().collect();
        sids.sort_unstable();
        for sid in sids {
            wire::sub(&mut out, &self.subs[&sid].subject, sid);
        }
        for tx in std::mem::take(&mut self.waiting) {
            if !tx.is_closed() {
                out.extend_from_slice(wire::PING);
                pings.sent.push_back(Some(tx));
            }
        }
        for (subject, payload, tx) in std::mem::take(&mut self.unsent) {
            if !tx.is_closed() {
                self.send_request(&mut out, &subject, &payload, tx);
            }
        }
        let ended = async {
            write(&mut io, &mut out).await?;
            self.link.set_feed(true, &server, self.shard);
            let mut ping = tokio::time::interval(PING_INTERVAL);
            ping.tick().await;
            loop {
                tokio::select! {
                    r = io.read_buf(&mut read) => match r {
                        Ok(0) => return Err("closed by the server".to_owned()),
                        Ok(_) => self.read_ops(&mut read, message_limit, &mut out, &mut pings)?,
                        Err(e) => return Err(e.to_string()),
                    },
                    cmd = self.cmds.recv() => {
                        let Some(cmd) = cmd else { return Ok(()) };
                        self.command(cmd, Some((&mut out, &mut pings)));
                        while let Ok(cmd) = self.cmds.try_recv() {
                            self.command(cmd, Some((&mut out, &mut pings)));
                        }
                    },
                    _ = ping.tick() => {
                        if pings.keepalive_out >= MAX_PINGS_OUT {
                            return Err("no PONG to two pings".to_owned());
                        }
                        pings.keepalive_out += 1;
                        out.extend_from_slice(wire::PING);
                        pings.sent.push_back(None);
                    },
                }
                if read.capacity() - read.len() < 4096 {
                    read.reserve(64 * 1024);
                }
                write(&mut io, &mut out).await?;
            }
        }
        .await;
        // Flushes not answered here are answered on the next connection;
        // requests in flight may have been lost: their callers are told.
        self.waiting.extend(pings.sent.into_iter().flatten());
        self.replies.clear();
        match ended {
            Ok(()) => Ended::Stopped,
            Err(why) => Ended::Lost(why),
        }
    }

    /// Handles every whole operation in `read` and drops its bytes.
    fn read_ops(
        &mut self,
        read: &mut BytesMut,
        limit: usize,
        out: &mut BytesMut,
        pings: &mut Pings,
    ) -> Result<(), String> {
        let mut used = 0;
        while let Some((op, n)) = wire::parse(&read[used..], limit).map_err(|e| e.to_string())? {
            used += n;
            match op {
                ServerOp::Msg {
                    subject,
                    sid,
                    headers,
                    payload,
                } => self.route(sid, subject, headers, payload),
                ServerOp::Ping => out.extend_from_slice(wire::PONG),
                ServerOp::Pong => {
                    pings.keepalive_out = 0;
                    if let Some(Some(tx)) = pings.sent.pop_front() {
                        let _ = tx.send(());
                    }
                }
                ServerOp::Info(json) => match Info::parse(json) {
                    Ok(info) => self.dialer.learn(&info),
                    Err(e) => tracing::debug!(error = %e, "nats live feed: INFO ignored"),
                },
                ServerOp::Ok => {}
                ServerOp::Err(text) => {
                    let text = String::from_utf8_lossy(text);
                    tracing::warn!(error = %text, shard = self.shard, "nats live feed: server error");
                    if let Some(subject) = refused_subject(&text) {
                        self.refuse(subject, &text);
                    }
                }
            }
        }
        read.advance(used);
        Ok(())
    }

    /// The server did not take the subscriptions on `subject`: they end,
    /// saying why, and are not sent again.
    fn refuse(&mut self, subject: &str, why: &str) {
        self.subs.retain(|_, sub| {
            let Route::Queue(q) = &sub.to else {
                return true;
            };
            if sub.subject != subject {
                return true;
            }
            let _ = q.refused.set(why.to_owned());
            q.end();
            false
        });
    }

    fn route(&mut self, sid: u64, subject: &[u8], headers: Option<&[u8]>, payload: &[u8]) {
        // A message for a subscription just removed is expected: the server
        // had not read the UNSUB yet.
        let Some(sub) = self.subs.get(&sid) else {
            return;
        };
        match &sub.to {
            Route::Signal(event) => self.link.send(*event),
            Route::Replies => {
                let token = subject
                    .strip_prefix(self.inbox.as_bytes())
                    .and_then(|t| std::str::from_utf8(t).ok())
                    .and_then(|t| t.parse().ok());
                if let Some(tx) = token.and_then(|t| self.replies.remove(&t)) {
                    // A status line (`NATS/1.0 503`: no responders) and no
                    // body: an empty answer.
                    let _ = tx.send(Bytes::copy_from_slice(payload));
                }
            }
            Route::Queue(q) => {
                let Some(m) = wire::live_message(headers, payload) else {
                    let subject = String::from_utf8_lossy(subject);
                    tracing::warn!(%subject, "message without a valid Nats-Sequence ignored");
                    return;
                };
                if q.push(m) {
                    if q.overflowed.load(Ordering::Relaxed) {
                        q.overflowed.store(false, Ordering::Relaxed);
                    }
                } else if !q.overflowed.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        sid,
                        shard = self.shard,
                        "nats live feed: slow consumer, messages dropped"
                    );
                    self.link.send(LinkEvent::SlowConsumer);
                }
            }
        }
    }
}

/// The subject of `Permissions Violation for Subscription to "<subject>"`
/// (nats-server's words; a queue subscription's add ` using queue "<q>"`).
fn refused_subject(err: &str) -> Option<&str> {
    let rest = err.strip_prefix("Permissions Violation for Subscription to \"")?;
    rest.split('"').next()
}

/// Pings sent on a connection, oldest first: a flush's answer, or `None`
/// for a keep-alive.
#[derive(Default)]
struct Pings {
    sent: VecDeque<Option<oneshot::Sender<()>>>,
    keepalive_out: u32,
}

/// Writes `out` whole; a server that takes nothing for [`WRITE_TIMEOUT`]
/// is given up (the pings are not checked while a write waits).
async fn write(io: &mut Box<dyn dial::Io>, out: &mut BytesMut) -> Result<(), String> {
    if out.is_empty() {
        return Ok(());
    }
    let written = async {
        io.write_all(out).await?;
        io.flush().await
    };
    match tokio::time::timeout(WRITE_TIMEOUT, written).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("the server took nothing for {WRITE_TIMEOUT:?}")),
    }
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn message(seq: u64) -> LiveMessage {
        let headers = format!("NATS/1.0\r\nNats-Sequence: {seq}\r\n\r\n");
        wire::live_message(Some(headers.as_bytes()), b"x").unwrap()
    }

    fn task(link: &Arc<Link>) -> (Task, mpsc::UnboundedSender<Cmd>) {
        let (cmds, rx) = mpsc::unbounded_channel();
        let urls = ["nats://127.0.0.1:4222".to_owned()];
        let dialer = Dialer::new(&urls, None, None, "test".into()).unwrap();
        (Task::new(rx, link.clone(), dialer, 0), cmds)
    }

    #[tokio::test]
    async fn a_reply_reaches_its_request_and_a_lost_connection_fails_the_rest() {
        let link = Link::new(&[]);
        let (mut task, _cmds) = task(&link);
        assert!(task.inbox.starts_with("_INBOX.") && task.inbox.ends_with('.'));
        assert_eq!(
            task.subs[&INBOX_SID].subject,
            format!("{}*", task.inbox),
            "the inbox is subscribed from the start (and re-sent with the rest)"
        );
        let mut out = BytesMut::new();
        let mut pings = Pings::default();
        let mut asks = Vec::new();
        for _ in 0..3 {
            let (tx, rx) = oneshot::channel();
            let ask = Cmd::Request {
                subject: "$JS.API.STREAM.INFO.EVENTS".into(),
                payload: Bytes::new(),
                tx,
            };
            task.command(ask, Some((&mut out, &mut pings)));
            asks.push(rx);
        }
        let wire = String::from_utf8(out.to_vec()).unwrap();
        let reply_to = |n: u64| format!("{}{n}", task.inbox);
        assert!(wire.contains(&format!(
            "PUB $JS.API.STREAM.INFO.EVENTS {} 0\r\n",
            reply_to(2)
        )));
        task.route(INBOX_SID, reply_to(2).as_bytes(), None, b"second");
        task.route(INBOX_SID, b"_INBOX.other.1", None, b"not ours");
        assert_eq!(asks[1].try_recv().unwrap(), Bytes::from_static(b"second"));
        assert!(asks[0].try_recv().is_err(), "still waiting");
        // The connection is lost with two requests in flight: they fail.
        task.replies.clear();
        assert!(matches!(
            asks[0].try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        // While away, a request waits for the next connection.
        let (tx, _rx) = oneshot::channel();
        let ask = Cmd::Request {
            subject: "$JS.API.STREAM.INFO.EVENTS".into(),
            payload: Bytes::new(),
            tx,
        };
        task.command(ask, None);
        assert_eq!(task.unsent.len(), 1);
    }

    #[tokio::test]
    async fn a_full_subscription_drops_and_says_so_once_until_one_fits_again() {
        let link = Link::new(&[]);
        let mut events = link.subscribe();
        let (mut task, cmds) = task(&link);
        let queue = Arc::new(SubQueue::default());
        task.command(
            Cmd::Sub {
                sid: 1,
                subject: "relay.events.a".into(),
                to: Route::Queue(queue.clone()),
            },
            None,
        );
        let mut sub = FeedSub {
            sid: 1,
            queue: queue.clone(),
            cmds,
        };
        let wire = |seq: u64| format!("NATS/1.0\r\nNats-Sequence: {seq}\r\n\r\n");
        for seq in 1..=SUB_CAPACITY as u64 + 3 {
            task.route(1, b"relay.events.a", Some(wire(seq).as_bytes()), b"x");
        }
        assert_eq!(events.try_recv(), Ok(LinkEvent::SlowConsumer));
        assert!(events.try_recv().is_err(), "one report for the overflow");
        assert_eq!(sub.next().await.map(|m| m.id.seq), Some(1));
        // Room again: the next message fits, a later overflow is reported.
        task.route(1, b"relay.events.a", Some(wire(100_000).as_bytes()), b"x");
        task.route(1, b"relay.events.a", Some(wire(100_001).as_bytes()), b"x");
        assert_eq!(events.try_recv(), Ok(LinkEvent::SlowConsumer));
        // Messages without a stream sequence, or for a removed
        // subscription, go nowhere.
        assert_eq!(queue.items.lock().unwrap().len(), SUB_CAPACITY);
        let _ = sub.next().await;
        task.route(1, b"relay.events.a", Some(b"NATS/1.0\r\n\r\n"), b"x");
        assert_eq!(queue.items.lock().unwrap().len(), SUB_CAPACITY - 1);
        task.command(Cmd::Unsub(1), None);
        task.route(1, b"relay.events.a", Some(wire(7).as_bytes()), b"x");
        assert_eq!(queue.items.lock().unwrap().len(), SUB_CAPACITY - 1);
        assert!(!task.subs.contains_key(&1));
    }

    #[tokio::test]
    async fn a_subscription_yields_in_order_then_ends_with_the_feed() {
        let (cmds, mut rx) = mpsc::unbounded_channel();
        let queue = Arc::new(SubQueue::default());
        let mut sub = FeedSub {
            sid: 9,
            queue: queue.clone(),
            cmds,
        };
        assert!(queue.push(message(1)) && queue.push(message(2)));
        queue.end();
        let seqs: Vec<u64> = (&mut sub).map(|m| m.id.seq).collect().await;
        assert_eq!(seqs, [1, 2], "what was queued, then the end");
        drop(sub);
        assert!(
            matches!(rx.recv().await, Some(Cmd::Unsub(9))),
            "dropping a subscription unsubscribes"
        );
    }

    #[tokio::test]
    async fn a_refused_subscription_ends_saying_why() {
        let link = Link::new(&[]);
        let (mut task, cmds) = task(&link);
        let queue = Arc::new(SubQueue::default());
        let sub = |sid| Cmd::Sub {
            sid,
            subject: "relay.events.secret".into(),
            to: Route::Queue(queue.clone()),
        };
        task.command(sub(4), None);
        let mut read = BytesMut::from(
            &b"-ERR 'Permissions Violation for Subscription to \"relay.events.secret\"'\r\n"[..],
        );
        let (mut out, mut pings) = (BytesMut::new(), Pings::default());
        task.read_ops(&mut read, 1 << 20, &mut out, &mut pings)
            .unwrap();
        let mut fs = FeedSub {
            sid: 4,
            queue: queue.clone(),
            cmds,
        };
        assert_eq!(
            fs.refused(),
            Some("Permissions Violation for Subscription to \"relay.events.secret\"")
        );
        assert!(fs.next().await.is_none(), "the subscription ended");
        assert!(!task.subs.contains_key(&4), "not sent again");
        assert_eq!(
            refused_subject("Permissions Violation for Subscription to \"a.b\" using queue \"q\""),
            Some("a.b")
        );
        assert_eq!(refused_subject("Maximum Subscriptions Exceeded"), None);
    }

    #[tokio::test]
    async fn advisories_become_link_events() {
        let link = Link::new(&[]);
        let mut events = link.subscribe();
        let (mut task, _cmds) = task(&link);
        task.command(
            Cmd::Sub {
                sid: 3,
                subject: "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.EVENTS".into(),
                to: Route::Signal(LinkEvent::StreamLeaderElected),
            },
            None,
        );
        task.route(
            3,
            b"$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.EVENTS",
            None,
            b"{}",
        );
        assert_eq!(events.try_recv(), Ok(LinkEvent::StreamLeaderElected));
    }
}
