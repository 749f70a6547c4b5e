//! Reading stored events from JetStream. Every read returns frames (encoded
//! as the live path would have) and never touches a client's queue: the
//! session and the hub decide where frames go.
//!
//! Reads go through an ephemeral pull consumer with the patterns as filter
//! subjects ([`consumer_filter`]: JetStream refuses overlapping ones),
//! fetched in batches (a huge backlog is never loaded at once),
//! deleted when the read ends, and at most [`CONCURRENT_READS`] at once
//! per shard: no durable state per client on the server, and no pile of
//! consumers against its limit.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures_util::StreamExt;

use super::Scope;
use crate::metrics::Metrics;

/// Longest wait for the next stored message before the read is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// First retry delay of a catch-up; doubles up to `CATCH_UP_MAX_DELAY`.
const CATCH_UP_FIRST_DELAY: Duration = Duration::from_millis(100);
const CATCH_UP_MAX_DELAY: Duration = Duration::from_secs(2);
/// A catch-up that cannot read the stream for this long ends its streams
/// instead of holding live delivery (they resume by Last-Event-ID).
const CATCH_UP_GIVE_UP: Duration = Duration::from_secs(30);

/// Longest wait for a mirror's origin to say where it is.
const ORIGIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for a mirror to reach its origin's last sequence, and the
/// longest pause between two looks at it.
const MIRROR_WAIT: Duration = Duration::from_secs(2);
const MIRROR_POLL_MAX: Duration = Duration::from_millis(200);

/// A stored event: its stream sequence and its SSE frame.
pub(crate) type Stored = (u64, Bytes);

/// The stream's first and last sequence at the time of asking, and when it
/// was created: a stream deleted and made again under the same name numbers
/// its events from 1 again, and only its creation time tells it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub first: u64,
    pub last: u64,
    /// Creation time, in nanoseconds since the Unix epoch.
    pub created: i128,
}

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum HistoryError {
    #[error("JetStream: {0}")]
    Nats(String),
    #[error("no stored message within {0:?}")]
    Stalled(Duration),
    #[error("events after {after} are gone from the stream (it starts at {first})")]
    Gone { after: u64, first: u64 },
    #[error("the mirror's origin did not answer: {0}")]
    OriginAway(String),
    #[error("the mirror is at {mirror}, behind its origin at {origin}")]
    MirrorBehind { mirror: u64, origin: u64 },
    #[error("every answer put the stream's end below event {after}, which a client has")]
    Behind { after: u64 },
}

fn nats_err(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Nats(e.to_string())
}

/// `state.last_seq` of a `STREAM.INFO` answer; its `error`, or an empty
/// answer (no responders), as an error.
fn stream_last(reply: &[u8]) -> Result<u64, HistoryError> {
    #[derive(serde::Deserialize)]
    struct Answer {
        state: Option<State>,
        error: Option<ApiError>,
    }
    #[derive(serde::Deserialize)]
    struct State {
        last_seq: u64,
    }
    #[derive(serde::Deserialize)]
    struct ApiError {
        #[serde(default)]
        description: String,
    }
    if reply.is_empty() {
        return Err(HistoryError::Nats("no JetStream answered".into()));
    }
    let answer: Answer = serde_json::from_slice(reply)
        .map_err(|e| HistoryError::Nats(format!("unreadable STREAM.INFO answer: {e}")))?;
    match (answer.state, answer.error) {
        (_, Some(e)) => Err(HistoryError::Nats(e.description)),
        (Some(state), None) => Ok(state.last_seq),
        (None, None) => Err(HistoryError::Nats(
            "STREAM.INFO answer without state".into(),
        )),
    }
}

/// What reads need to reach the stream. The one owner of stream-info
/// requests (`bounds`), so each is counted once.
#[derive(Clone)]
pub(crate) struct History {
    js: jetstream::Context,
    stream: String,
    metrics: Arc<Metrics>,
    /// Permits for concurrent reads (see [`CONCURRENT_READS`]).
    reads: Arc<tokio::sync::Semaphore>,
    /// A mirror's origin, through its JetStream API, and its stream name.
    origin: Option<(jetstream::Context, String)>,
}

/// Where a resume's replay starts, and the gap it must report first (events
/// removed by stream limits, or beyond the replay limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResumePlan {
    /// First sequence to replay; nothing to replay when above `last`.
    pub start: u64,
    pub last: u64,
    /// `Some(first_available)` when events after the client's id are skipped.
    pub gap: Option<u64>,
}

impl ResumePlan {
    /// Plans a replay of events after `after` within `bounds`, at most
    /// `limit` events (0: no limit).
    pub(crate) fn new(after: u64, bounds: Bounds, limit: u64) -> ResumePlan {
        let mut start = (after + 1).max(bounds.first.max(1));
        if limit > 0 && bounds.last >= start && bounds.last - start + 1 > limit {
            start = bounds.last - limit + 1;
        }
        let gap = (start > after + 1 && bounds.last > after).then_some(start);
        ResumePlan {
            start,
            last: bounds.last,
            gap,
        }
    }
}

impl History {
    pub(crate) fn new(js: jetstream::Context, scope: &Scope, metrics: Arc<Metrics>) -> History {
        let origin = scope.origin.as_ref().map(|o| {
            let mut api = jetstream::with_prefix(js.client(), &o.api);
            api.set_timeout(ORIGIN_TIMEOUT);
            (api, o.stream.clone())
        });
        History {
            js,
            stream: scope.stream.clone(),
            metrics,
            reads: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_READS)),
            origin,
        }
    }

    /// The highest event id a client may hold: the stream's last sequence.
    /// A mirror is only as far as its origin was when asked: it first asks
    /// the origin for its last sequence (any id a client got elsewhere is at
    /// or below it), then waits, at most [`MIRROR_WAIT`], for the mirror to
    /// get there, and answers with the mirror's own last sequence. Until
    /// then it fails (`OriginAway`, `MirrorBehind`): the relay cannot tell an
    /// id the mirror has yet to receive from one that does not exist, and
    /// answers with a transient refusal, so the client comes back later
    /// instead of being refused for good, and nothing above what the mirror
    /// holds is taken as stored.
    /// An id the mirror itself holds (`reaching`) needs no origin: it
    /// answers from the mirror alone, so resumes the mirror can serve work
    /// while the hub is out of reach.
    pub(crate) async fn last_sequence(&self, reaching: u64) -> Result<u64, HistoryError> {
        let Some((api, name)) = &self.origin else {
            return Ok(self.bounds().await?.last);
        };
        let own = self.bounds().await?.last;
        if reaching <= own {
            return Ok(own);
        }
        self.metrics.jetstream_requests.inc();
        // One request (the stream's info), bounded by the context's timeout.
        let origin = match api.get_stream(name).await {
            Ok(s) => s.cached_info().state.last_sequence,
            Err(e) => return Err(HistoryError::OriginAway(e.to_string())),
        };
        let give_up = tokio::time::Instant::now() + MIRROR_WAIT;
        let mut pause = Duration::from_millis(10);
        loop {
            let mirror = self.bounds().await?.last;
            if mirror >= origin {
                return Ok(mirror);
            }
            if tokio::time::Instant::now() + pause > give_up {
                return Err(HistoryError::MirrorBehind { mirror, origin });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MIRROR_POLL_MAX);
        }
    }

    /// The stream's first and last sequence (one JetStream request).
    pub(crate) async fn bounds(&self) -> Result<Bounds, HistoryError> {
        self.metrics.jetstream_requests.inc();
        self.bounds_uncounted().await
    }

    /// The stream's last sequence, asked over the live feed: the request
    /// follows the feed's subscriptions to the stream's leader on the same
    /// routes, so the leader has every `SUB` sent before it when it
    /// answers (over the request connection, which may be on another
    /// server, nothing orders the two). Counted as [`History::bounds`].
    pub(crate) async fn last_via(&self, feed: &super::Feed) -> Result<u64, HistoryError> {
        self.metrics.jetstream_requests.inc();
        let subject = format!("$JS.API.STREAM.INFO.{}", self.stream);
        let reply = feed
            .request(&subject, Bytes::new())
            .await
            .map_err(nats_err)?;
        stream_last(&reply)
    }

    /// [`History::bounds`] for `/metrics`, which must not move the count of
    /// requests made for replay and catch-up it reports.
    pub(crate) async fn bounds_uncounted(&self) -> Result<Bounds, HistoryError> {
        let s = self.js.get_stream(&self.stream).await.map_err(nats_err)?;
        let info = s.cached_info();
        Ok(Bounds {
            first: info.state.first_sequence,
            last: info.state.last_sequence,
            created: info.created.unix_timestamp_nanos(),
        })
    }

    /// Whether the stream holds an event matching `patterns` (or sharing a
    /// consumer filter with them) in `start..=end`: a request per filter,
    /// where opening a read costs a consumer's creation, info and deletion.
    pub(crate) async fn holds_any(
        &self,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<bool, HistoryError> {
        if start > end || start == 0 || patterns.is_empty() {
            return Ok(false);
        }
        let (filters, _) = consumer_filter(patterns);
        leader_holds(&self.js, &self.stream, &self.metrics, &filters, start, end).await
    }

    /// Opens a read of the stored events matching `patterns` with sequence
    /// in `start..=end`, in order.
    pub(crate) async fn range(
        &self,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<RangeReader, HistoryError> {
        if start > end || start == 0 {
            return Ok(RangeReader { scan: None });
        }
        let scan = Scan::open(self, patterns, start, end).await?;
        Ok(RangeReader { scan: Some(scan) })
    }

    /// The last stored event of every subject matching `patterns`, up to
    /// `end`, in increasing id order: at most `limit` (0: no limit), the
    /// most recent.
    pub(crate) async fn last_per_subject(
        &self,
        patterns: &[String],
        end: u64,
        limit: u64,
    ) -> Result<Vec<Stored>, HistoryError> {
        let mut scan = Scan::open_last_per_subject(self, patterns, end).await?;
        let mut out = Vec::new();
        while let Some((seq, msg)) = scan.next().await? {
            out.push((seq, super::event_frame(seq, &msg)));
        }
        out.sort_by_key(|(seq, _)| *seq);
        if limit > 0 && out.len() as u64 > limit {
            out.drain(..out.len() - limit as usize);
        }
        Ok(out)
    }

    /// The last `n` stored events matching `patterns` up to `bounds.last`,
    /// looked for among the last `limit` (0: no limit) stream sequences.
    pub(crate) async fn last_n(
        &self,
        patterns: &[String],
        n: usize,
        bounds: Bounds,
        limit: u64,
    ) -> Result<Vec<Stored>, HistoryError> {
        let mut start = bounds.first.max(1);
        if limit > 0 {
            start = start.max(bounds.last.saturating_sub(limit) + 1);
        }
        let mut reader = self.range(patterns, start, bounds.last).await?;
        let mut out = std::collections::VecDeque::with_capacity(n.min(1024));
        while let Some(f) = reader.next().await? {
            if out.len() == n {
                out.pop_front();
            }
            out.push_back(f);
        }
        Ok(out.into())
    }

    /// Every event of `pattern` in `(after, to]`, in order, or `Gone` when
    /// stream limits removed part of it (a window fill must be whole).
    pub(crate) async fn read(
        &self,
        pattern: &str,
        after: u64,
        to: u64,
    ) -> Result<Vec<Stored>, HistoryError> {
        let first = self.bounds().await?.first;
        if first > after + 1 {
            return Err(HistoryError::Gone { after, first });
        }
        let patterns = [pattern.to_string()];
        self.range(&patterns, after + 1, to).await?.collect().await
    }

    /// Reads, for every topic, the events after its last delivered sequence
    /// up to the stream's current end. Retries with backoff: during a
    /// leader election JetStream answers nothing for seconds. Topics whose
    /// backlog exceeds `limit` are returned as truncated, and so is every
    /// topic when the stream cannot be read for [`CATCH_UP_GIVE_UP`]: their
    /// streams end and resume on their own rather than waiting on a relay
    /// that holds live delivery.
    pub(crate) async fn catch_up<K: Copy + Send + 'static>(
        &self,
        feed: &super::Feed,
        topics: &[CatchUpTopic<K>],
        limit: u64,
    ) -> CaughtUp<K> {
        retry_catch_up(topics, || self.catch_up_once(feed, topics, limit)).await
    }

    /// One pass: a single read of the stream from the oldest sequence any
    /// topic needs, each message routed to the topics that match it as
    /// live delivery would. The cost is a few JetStream requests and time
    /// proportional to the events missed, whatever the number of topics.
    async fn catch_up_once<K: Copy + Send + 'static>(
        &self,
        feed: &super::Feed,
        topics: &[CatchUpTopic<K>],
        limit: u64,
    ) -> Result<CaughtUp<K>, HistoryError> {
        // After a reconnect the feed re-sends every SUB first; the stream's
        // last sequence, asked behind them on the feed, bounds what live
        // delivery may have missed.
        let last = self.last_via(feed).await?;
        let mut out = CaughtUp {
            frames: Vec::new(),
            truncated: Vec::new(),
            read_to: last,
            known: 0,
            gave_up: false,
        };
        let mut todo = Vec::new();
        for t in topics {
            if t.after >= last {
                continue;
            }
            if limit > 0 && last - t.after > limit {
                out.truncated.push(t.key);
            } else {
                todo.push(t);
            }
        }
        let Some(start) = todo.iter().map(|t| t.after + 1).min() else {
            tracing::info!(
                last,
                topics = topics.len(),
                "catch-up: nothing after the stream's end"
            );
            return Ok(out);
        };
        tracing::info!(
            start,
            last,
            topics = todo.len(),
            "catch-up reads the stream"
        );
        out.known = todo.iter().map(|t| t.after).max().unwrap_or(0).min(last);
        let router = Router::new(&todo);
        let mut scan = Scan::open_for_catch_up(self, start, last).await?;
        // The read takes every subject: it ends at `last` unless the node
        // that served it is behind (see retry_catch_up).
        out.read_to = start - 1;
        while let Some((seq, msg)) = scan.next().await? {
            out.read_to = seq;
            let mut frame = None;
            for key in router.route(msg.subject.as_str(), seq) {
                let f = frame.get_or_insert_with(|| super::event_frame(seq, &msg));
                out.frames.push((seq, key, f.clone()));
            }
        }
        Ok(out)
    }
}

/// Which topics a stored message belongs to: literal patterns by subject
/// (the per-user notification shape: thousands of them, one lookup), the
/// few wildcard patterns by matching.
struct Router<'a, K> {
    literal: std::collections::HashMap<&'a str, Vec<(K, u64)>>,
    wildcard: Vec<(&'a str, K, u64)>,
}

impl<'a, K: Copy> Router<'a, K> {
    fn new(topics: &[&'a CatchUpTopic<K>]) -> Self {
        let mut r = Router {
            literal: std::collections::HashMap::new(),
            wildcard: Vec::new(),
        };
        for t in topics {
            let p = t.pattern.as_str();
            if p.split('.').any(|tok| tok == "*" || tok == ">") {
                r.wildcard.push((p, t.key, t.after));
            } else {
                r.literal.entry(p).or_default().push((t.key, t.after));
            }
        }
        r
    }

    /// The topics `subject` belongs to that have not delivered `seq` yet.
    fn route<'s>(&'s self, subject: &'s str, seq: u64) -> impl Iterator<Item = K> + 's {
        let literal = self.literal.get(subject).into_iter().flatten().copied();
        let wildcard = self
            .wildcard
            .iter()
            .filter(move |(p, _, _)| crate::subject::matches(p, subject))
            .map(|(_, k, after)| (*k, *after));
        literal
            .chain(wildcard)
            .filter(move |(_, after)| seq > *after)
            .map(|(k, _)| k)
    }
}

/// How long one pull request waits for messages before it comes back.
const FETCH_WAIT: Duration = Duration::from_secs(1);

/// Messages to fetch per pull request of a scan.
const SCAN_BATCH: usize = 1000;

/// JetStream consumers one shard reads through at once: the server caps a
/// stream's consumers (1,000 by default), and a storm of resumes on
/// thousands of subjects must queue here rather than hit that cap.
pub(crate) const CONCURRENT_READS: usize = 32;

/// Every stored message matching `patterns` (all, when empty) with sequence
/// in `start..=end`, in order, through one ephemeral pull consumer that is
/// deleted when the scan ends or is dropped, so reads never pile consumers
/// up against the server's limit.
struct Scan {
    js: jetstream::Context,
    stream: String,
    consumer: Option<consumer::PullConsumer>,
    batch: Option<consumer::pull::Batch>,
    /// Matching messages the server still holds after the last one read
    /// (from the consumer's info, then each message's): 0 means done.
    pending: u64,
    /// When the read last moved forward: a read stuck for READ_TIMEOUT
    /// (a leader election, a replica behind) fails and is retried whole.
    progress: tokio::time::Instant,
    next_seq: u64,
    end: u64,
    /// Last-per-subject reads come in the server's subject order.
    unordered: bool,
    /// When the consumer's filter is wider than the patterns asked for:
    /// the patterns a message must match to be returned.
    only: Vec<String>,
    /// The consumer's filter subjects (empty: the whole stream).
    filters: Vec<String>,
    /// The consumer's server was found behind the stream leader: its
    /// `pending` cannot end the read (see [`Scan::leader_has_more`]).
    behind: bool,
    /// Highest sequence read so far (for last-per-subject reads).
    max_read: u64,
    metrics: Arc<Metrics>,
    /// None for a catch-up, which must never wait behind client reads.
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Where a scan starts.
enum ScanStart {
    Sequence(u64),
    LastPerSubject,
}

impl History {
    /// One of the shard's [`CONCURRENT_READS`] permits for a client read.
    async fn read_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, HistoryError> {
        self.reads
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| HistoryError::Nats("the relay is stopping".into()))
    }
}

impl Scan {
    /// A read for clients (a resume, a window fill): waits for one of the
    /// shard's [`CONCURRENT_READS`] permits.
    async fn open(
        history: &History,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<Scan, HistoryError> {
        let permit = history.read_permit().await?;
        Self::open_with(
            history,
            patterns,
            ScanStart::Sequence(start),
            end,
            Some(permit),
        )
        .await
    }

    /// The catch-up's read: one per shard at a time by construction, and
    /// never queued behind resumes that a slow client may hold for long.
    async fn open_for_catch_up(
        history: &History,
        start: u64,
        end: u64,
    ) -> Result<Scan, HistoryError> {
        Self::open_with(history, &[], ScanStart::Sequence(start), end, None).await
    }

    /// The last stored message of every subject matching `patterns`, up to
    /// `end`, in the order the server delivers them (a client read).
    async fn open_last_per_subject(
        history: &History,
        patterns: &[String],
        end: u64,
    ) -> Result<Scan, HistoryError> {
        let permit = history.read_permit().await?;
        Self::open_with(
            history,
            patterns,
            ScanStart::LastPerSubject,
            end,
            Some(permit),
        )
        .await
    }

    async fn open_with(
        history: &History,
        patterns: &[String],
        from: ScanStart,
        end: u64,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> Result<Scan, HistoryError> {
        let (deliver_policy, start) = match from {
            ScanStart::Sequence(start) => (
                consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                start,
            ),
            ScanStart::LastPerSubject => (consumer::DeliverPolicy::LastPerSubject, 0),
        };
        let (filters, only) = consumer_filter(patterns);
        let (filter_subject, filter_subjects) = match filters.as_slice() {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        // No request: a handle to the stream without fetching its info.
        let stream = history
            .js
            .get_stream_no_info(&history.stream)
            .await
            .map_err(nats_err)?;
        history.metrics.jetstream_requests.inc();
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject,
                filter_subjects,
                deliver_policy,
                ack_policy: consumer::AckPolicy::None,
                // Removed by the server too, should the delete be lost.
                inactive_threshold: Duration::from_secs(10),
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        let pending = consumer.cached_info().num_pending;
        Ok(Scan {
            js: history.js.clone(),
            stream: history.stream.clone(),
            consumer: Some(consumer),
            batch: None,
            pending,
            progress: tokio::time::Instant::now(),
            next_seq: start,
            unordered: matches!(from, ScanStart::LastPerSubject),
            only,
            filters,
            behind: false,
            max_read: 0,
            metrics: history.metrics.clone(),
            end,
            _permit: permit,
        })
    }

    /// Asks the stream leader whether a message the scan wants is stored at
    /// or after `from` and at or before the scan's end. An ephemeral
    /// consumer lives on any of the stream's replicas, and one on a replica
    /// that lags behind (a node just restarted) counts only what that
    /// replica holds: its `pending` reaches 0 before the range's end, which
    /// would end the read silently short. The leader's answer
    /// (`STREAM.MSG.GET` with `next_by_subj`, never served by a replica)
    /// decides instead.
    async fn leader_has_more(&self, from: u64) -> Result<bool, HistoryError> {
        if from > self.end {
            return Ok(false);
        }
        leader_holds(
            &self.js,
            &self.stream,
            &self.metrics,
            &self.filters,
            from,
            self.end,
        )
        .await
    }

    /// The next message with its stream sequence; None past `end`.
    async fn next(&mut self) -> Result<Option<(u64, async_nats::Message)>, HistoryError> {
        loop {
            // Done when past the range, or when the server holds no more
            // matching message at all: the consumer's server says so, and
            // the stream leader agrees (the consumer's replica may lag).
            if self.next_seq > self.end {
                return Ok(None);
            }
            if self.pending == 0 && !self.behind {
                let from = if self.unordered {
                    self.max_read + 1
                } else {
                    self.next_seq
                };
                if !self.leader_has_more(from).await? {
                    return Ok(None);
                }
                if self.unordered {
                    // The replica's last-per-subject answers may be stale:
                    // the read fails (the session ends the client's stream
                    // with a retry hint, and the client reads again).
                    return Err(HistoryError::Nats(
                        "the read's replica is behind the stream leader".into(),
                    ));
                }
                tracing::debug!(
                    at = from,
                    "read replica behind the stream leader; reading on"
                );
                self.behind = true;
            }
            if self.progress.elapsed() >= READ_TIMEOUT {
                return Err(HistoryError::Stalled(READ_TIMEOUT));
            }
            let Some(consumer) = &self.consumer else {
                return Ok(None);
            };
            if self.batch.is_none() {
                // Waits a little for messages rather than answering "none
                // now": a replica that lags behind the range's end must not
                // end the read early.
                let batch = consumer
                    .batch()
                    .max_messages(SCAN_BATCH)
                    .expires(FETCH_WAIT)
                    .messages()
                    .await
                    .map_err(nats_err)?;
                self.batch = Some(batch);
            }
            let batch = self.batch.as_mut().expect("just set");
            let msg = match tokio::time::timeout(READ_TIMEOUT, batch.next()).await {
                Err(_) => return Err(HistoryError::Stalled(READ_TIMEOUT)),
                Ok(None) => {
                    // This batch is done; the next one asks again. A
                    // replica found behind may have caught up by now, with
                    // nothing left to send: the leader says when that is.
                    self.batch = None;
                    if self.behind && !self.leader_has_more(self.next_seq).await? {
                        return Ok(None);
                    }
                    continue;
                }
                Ok(Some(m)) => m.map_err(nats_err)?,
            };
            self.progress = tokio::time::Instant::now();
            let info = msg.info().map_err(nats_err)?;
            let seq = info.stream_sequence;
            self.pending = info.pending;
            self.max_read = self.max_read.max(seq);
            let wanted = self.only.is_empty()
                || self
                    .only
                    .iter()
                    .any(|p| crate::subject::matches(p, &msg.message.subject));
            if self.unordered {
                // Last-per-subject: one message per subject, in whatever
                // order the server keeps its subjects; the caller sorts.
                if seq > self.end || !wanted {
                    continue;
                }
                return Ok(Some((seq, msg.message)));
            }
            // Sequences only grow (limits and filters may skip some); one
            // going backwards means the read lost its place.
            if seq < self.next_seq {
                return Err(HistoryError::Nats(format!(
                    "read {seq} after {}",
                    self.next_seq - 1
                )));
            }
            self.next_seq = seq + 1;
            if seq > self.end {
                return Ok(None);
            }
            if !wanted {
                continue;
            }
            return Ok(Some((seq, msg.message)));
        }
    }
}

/// The filter subjects of a consumer that reads `patterns`, and the
/// patterns a message must then match (empty: the filter is exact).
/// JetStream refuses a consumer whose filter subjects overlap (error
/// 10138), and a client's patterns may: a pattern inside another is left
/// to that one, and if some still share subjects (`a.*` and `*.1`) the
/// consumer reads one pattern that covers them all ([`cover`]) and the
/// scan keeps the matching messages.
fn consumer_filter(patterns: &[String]) -> (Vec<String>, Vec<String>) {
    use crate::subject::{contains, overlaps};
    let mut kept: Vec<String> = Vec::with_capacity(patterns.len());
    for (i, p) in patterns.iter().enumerate() {
        // Inside another pattern (or a repeat of an earlier one).
        let covered = patterns
            .iter()
            .enumerate()
            .any(|(j, q)| j != i && contains(q, p) && (q != p || j < i));
        if !covered {
            kept.push(p.clone());
        }
    }
    let collide = kept
        .iter()
        .enumerate()
        .any(|(i, a)| kept[i + 1..].iter().any(|b| overlaps(a, b)));
    if collide {
        let wide = kept
            .iter()
            .skip(1)
            .fold(kept[0].clone(), |w, p| cover(&w, p));
        (vec![wide], kept)
    } else {
        (kept, Vec::new())
    }
}

/// Whether the stream leader holds a message on one of `filters` (every
/// subject when empty) with sequence in `from..=end`: `STREAM.MSG.GET` with
/// `next_by_subj`, one request per filter, answered by the leader only.
async fn leader_holds(
    js: &jetstream::Context,
    stream: &str,
    metrics: &Metrics,
    filters: &[String],
    from: u64,
    end: u64,
) -> Result<bool, HistoryError> {
    let stream = js.get_stream_no_info(stream).await.map_err(nats_err)?;
    let all = [">".to_string()];
    let filters = if filters.is_empty() {
        &all[..]
    } else {
        filters
    };
    for f in filters {
        metrics.jetstream_requests.inc();
        let got = stream
            .raw_message_builder()
            .sequence(from)
            .next_by_subject(f.clone())
            .send()
            .await;
        match got {
            Ok(m) if m.sequence <= end => return Ok(true),
            Ok(_) => {}
            Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => {}
            Err(e) => return Err(nats_err(e)),
        }
    }
    Ok(false)
}

/// A pattern matching every subject `a` or `b` matches: token by token,
/// equal tokens kept and others made `*`; when the lengths differ or one
/// ends in `>`, the common literal tokens (one fewer than the shorter has)
/// then `>`.
fn cover(a: &str, b: &str) -> String {
    let (x, y): (Vec<&str>, Vec<&str>) = (a.split('.').collect(), b.split('.').collect());
    if x.len() == y.len() && !x.contains(&">") && !y.contains(&">") {
        let tokens: Vec<&str> = (x.iter().zip(&y))
            .map(|(p, q)| if p == q { *p } else { "*" })
            .collect();
        return tokens.join(".");
    }
    let shorter = x.len().min(y.len());
    let mut tokens: Vec<&str> = (x.iter().zip(&y))
        .take(shorter - 1)
        .take_while(|(p, q)| p == q && **p != "*" && **p != ">")
        .map(|(p, _)| *p)
        .collect();
    tokens.push(">");
    tokens.join(".")
}

impl Drop for Scan {
    fn drop(&mut self) {
        let Some(consumer) = self.consumer.take() else {
            return;
        };
        let name = consumer.cached_info().name.clone();
        let (js, stream) = (self.js.clone(), std::mem::take(&mut self.stream));
        // Best effort: the consumer also expires on its own.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = js.delete_consumer_from_stream(&name, &stream).await {
                    tracing::debug!(error = %e, "read consumer not deleted; it expires");
                }
            });
        }
    }
}

/// One shared subscription to catch up: events of `pattern` after `after`.
#[derive(Debug, Clone)]
pub(crate) struct CatchUpTopic<K> {
    pub(crate) key: K,
    pub(crate) pattern: String,
    pub(crate) after: u64,
}

/// What a catch-up read: frames tagged with their topic (unsorted), and the
/// topics whose backlog was over the limit.
#[derive(Debug)]
pub(crate) struct CaughtUp<K> {
    pub(crate) frames: Vec<(u64, K, Bytes)>,
    pub(crate) truncated: Vec<K>,
    /// The last sequence the read took (every subject), or the stream's
    /// last when nothing needed reading.
    pub(crate) read_to: u64,
    /// The highest sequence a topic had delivered live before the read:
    /// stored for certain, so a read of every subject from below it that
    /// stops short of it was served by a node behind the stream.
    pub(crate) known: u64,
    /// The stream could not be read: every topic is truncated.
    pub(crate) gave_up: bool,
}

/// Reads a catch-up short of an event it knows is stored may make again, a
/// little later, before what they read is taken as all there is.
const CATCH_UP_SHORT_RETRIES: u32 = 3;

/// Runs a catch-up read (`once`) until it succeeds, with backoff: during a
/// leader election JetStream answers nothing for seconds. Gives up after
/// [`CATCH_UP_GIVE_UP`], returning every topic as truncated.
///
/// A read of every subject that ends below a sequence a topic delivered
/// live (`known`: stored for certain) was served by a node behind the
/// stream: one that has just come back from a freeze still answers as the
/// stream's leader for a moment, from what it held before. Taken as
/// complete, it would skip the events between without a trace. So it is
/// read again, up to [`CATCH_UP_SHORT_RETRIES`] times; after that, what it
/// read is taken (that message may have been deleted since). A read that
/// ends short of the stream's end but past `known` is taken at once: the
/// stream's last messages may have been deleted or expired, which is no
/// reason to hold live delivery.
pub(crate) async fn retry_catch_up<K: Copy, F, Fut>(
    topics: &[CatchUpTopic<K>],
    mut once: F,
) -> CaughtUp<K>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<CaughtUp<K>, HistoryError>>,
{
    let give_up = tokio::time::Instant::now() + CATCH_UP_GIVE_UP;
    let mut delay = CATCH_UP_FIRST_DELAY;
    let mut short = 0;
    loop {
        let err = match once().await {
            Ok(out) if out.read_to < out.known && short < CATCH_UP_SHORT_RETRIES => {
                short += 1;
                tracing::warn!(
                    read_to = out.read_to,
                    known = out.known,
                    "catch-up read ended before an event delivered live; reading again"
                );
                tokio::time::sleep(CATCH_UP_FIRST_DELAY * short).await;
                continue;
            }
            Ok(out) => return out,
            Err(e) => e,
        };
        if tokio::time::Instant::now() + delay >= give_up {
            tracing::warn!(error = %err, "catch-up gave up; its streams resume on their own");
            return CaughtUp {
                frames: Vec::new(),
                truncated: topics.iter().map(|t| t.key).collect(),
                read_to: 0,
                known: 0,
                gave_up: true,
            };
        }
        tracing::warn!(error = %err, retry_in = ?delay, "catch-up failed; retrying");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(CATCH_UP_MAX_DELAY);
    }
}

/// Stored events matching some patterns with sequence in `start..=end`, in
/// order, as frames.
pub(crate) struct RangeReader {
    scan: Option<Scan>,
}

impl RangeReader {
    /// The next event, or None when the range is exhausted.
    pub(crate) async fn next(&mut self) -> Result<Option<Stored>, HistoryError> {
        let Some(scan) = &mut self.scan else {
            return Ok(None);
        };
        Ok(scan
            .next()
            .await?
            .map(|(seq, msg)| (seq, super::event_frame(seq, &msg))))
    }

    /// Every remaining event, in order.
    pub(crate) async fn collect(mut self) -> Result<Vec<Stored>, HistoryError> {
        let mut out = Vec::new();
        while let Some(f) = self.next().await? {
            out.push(f);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_last_sequence_of_a_stream_info_answer() {
        use super::stream_last;
        let ok = br#"{"type":"io.nats.jetstream.api.v1.stream_info_response","state":{"messages":3,"first_seq":5,"last_seq":7}}"#;
        assert_eq!(stream_last(ok).unwrap(), 7);
        let refused = br#"{"type":"x","error":{"code":404,"err_code":10059,"description":"stream not found"}}"#;
        assert!(
            matches!(stream_last(refused), Err(HistoryError::Nats(d)) if d == "stream not found")
        );
        assert!(stream_last(b"").is_err(), "no responders");
        assert!(stream_last(b"{").is_err());
        assert!(stream_last(b"{}").is_err());
    }

    fn b(first: u64, last: u64) -> Bounds {
        Bounds {
            first,
            last,
            created: 0,
        }
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// Catch-up reads of every subject that end at `read_to`, against a
    /// stream whose end is 10 and of which a topic delivered 8 live; how
    /// many reads were made, and what was taken.
    async fn catch_up_reading(ends: &[u64]) -> (usize, u64) {
        let topics = [CatchUpTopic {
            key: 1u8,
            pattern: "a.>".into(),
            after: 0,
        }];
        let reads = std::cell::Cell::new(0);
        let out = retry_catch_up(&topics, || {
            let n = reads.get();
            reads.set(n + 1);
            let read_to = ends[n.min(ends.len() - 1)];
            async move {
                Ok(CaughtUp {
                    frames: Vec::new(),
                    truncated: Vec::new(),
                    read_to,
                    known: 8,
                    gave_up: false,
                })
            }
        })
        .await;
        (reads.get(), out.read_to)
    }

    /// A catch-up read that ends below an event delivered live was served
    /// by a node behind the stream (one just back from a freeze): it is
    /// read again, and the whole read is what is delivered. One that ends
    /// past it but before the stream's end (its last messages deleted or
    /// expired) is taken at once.
    #[tokio::test(start_paused = true)]
    async fn a_catch_up_read_short_of_the_end_is_read_again() {
        assert_eq!(catch_up_reading(&[4, 10]).await, (2, 10));
        assert_eq!(catch_up_reading(&[10]).await, (1, 10));
        assert_eq!(catch_up_reading(&[8, 10]).await, (1, 8));
    }

    /// A read that stays short (the event was deleted since) is taken
    /// after a bounded number of reads, not retried for ever.
    #[tokio::test(start_paused = true)]
    async fn a_catch_up_read_that_stays_short_is_taken_after_a_few_reads() {
        let (reads, read_to) = catch_up_reading(&[4]).await;
        assert_eq!(reads, CATCH_UP_SHORT_RETRIES as usize + 1);
        assert_eq!(read_to, 4);
    }

    #[test]
    fn consumer_filters_never_overlap() {
        let f = |p: &[&str]| consumer_filter(&strings(p));
        let exact = |v: &[&str]| (strings(v), Vec::new());
        assert_eq!(f(&["a.>"]), exact(&["a.>"]));
        assert_eq!(f(&["a.*", "b.>"]), exact(&["a.*", "b.>"]));
        // Inside another: left to it.
        assert_eq!(f(&["a.>", "a.b.1"]), exact(&["a.>"]));
        assert_eq!(f(&["a.b.1", "a.*.1", "c.1"]), exact(&["a.*.1", "c.1"]));
        assert_eq!(f(&["a.1", "a.1"]), exact(&["a.1"]));
        // Sharing subjects without containment: read all, keep the matching.
        assert_eq!(
            f(&["x.a.*", "x.*.1", "x.c.2"]),
            (strings(&["x.*.*"]), strings(&["x.a.*", "x.*.1", "x.c.2"]))
        );
        assert_eq!(
            f(&["x.a.*", "x.*.1", "x.c.2.3"]),
            (strings(&["x.>"]), strings(&["x.a.*", "x.*.1", "x.c.2.3"]))
        );
    }

    #[test]
    fn a_cover_matches_what_either_pattern_matches() {
        assert_eq!(cover("a.b.1", "a.c.1"), "a.*.1");
        assert_eq!(cover("a.b.*", "a.*.1"), "a.*.*");
        assert_eq!(cover("a.b", "a.b.c"), "a.>");
        assert_eq!(cover("a.b.>", "a.b.c"), "a.b.>");
        assert_eq!(cover("a.*.c", "a.*.c.d"), "a.>");
        assert_eq!(cover("a", "b.c"), ">");
        for (a, b) in [("a.b", "a.b.c"), ("a.*.c", "a.*.c.d"), ("a.b.>", "a.b.c")] {
            let c = cover(a, b);
            assert!(
                crate::subject::contains(&c, a) && crate::subject::contains(&c, b),
                "{c} covers {a} and {b}"
            );
        }
    }

    #[test]
    fn plans_a_whole_resume_without_a_gap() {
        let p = ResumePlan::new(10, b(1, 20), 0);
        assert_eq!((p.start, p.last, p.gap), (11, 20, None));
        let p = ResumePlan::new(20, b(1, 20), 0);
        assert!(p.start > p.last, "nothing to replay");
        assert_eq!(p.gap, None);
    }

    #[test]
    fn plans_a_gap_for_removed_history_and_the_limit() {
        let p = ResumePlan::new(3, b(8, 20), 0);
        assert_eq!((p.start, p.gap), (8, Some(8)));
        let p = ResumePlan::new(0, b(1, 100), 10);
        assert_eq!((p.start, p.gap), (91, Some(91)));
        // An empty stream (first = last + 1) has nothing to report.
        let p = ResumePlan::new(5, b(6, 5), 10);
        assert_eq!(p.gap, None);
    }
}
