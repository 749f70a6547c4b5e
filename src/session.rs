//! One client's stream, top to bottom: credentials -> authorize the
//! subjects -> resume point -> join the hub -> backfill from JetStream when
//! the hub's memory could not (a tracked task) -> release the held live
//! frames -> live until the client leaves, its token expires, it is too
//! slow, or the shard drains.

use std::net::IpAddr;
use std::sync::Arc;

use hyper::header::{self, HeaderMap};

use crate::app::{App, Live};
use crate::auth::{AuthError, Claims};
use crate::client::{ClientQueue, EndReason, STREAM_LOG, SseBody, StreamLog};
use crate::error::ApiError;
use crate::hub::{Backfill, Heartbeat, JoinError};
use crate::metrics::Metrics;
use crate::nats::{Bounds, History, HistoryError, RangeReader, ResumePlan, Stored};
use crate::sse;
use crate::subject;

/// Opens a stream for `GET /events`: the body that streams it.
pub(crate) async fn open(
    app: &Arc<App>,
    headers: &HeaderMap,
    query: Option<&str>,
    peer: IpAddr,
) -> Result<SseBody, ApiError> {
    let ip = app.limits.client_ip(peer, headers);
    app.limits.check_rate(ip).map_err(ApiError::Limited)?;
    let q = Query::parse(query.unwrap_or(""));
    if q.bad_initial {
        return Err(ApiError::BadQuery(
            "initial= takes `last` or a number of events, e.g. initial=10".into(),
        ));
    }
    let query_token = q.token.as_deref().filter(|_| app.cfg.query_token);
    let token = bearer(headers)
        .or(query_token)
        .or_else(|| cookie(headers, "relay_token"))
        .ok_or(ApiError::Auth(if q.token.is_some() {
            AuthError::QueryTokenOff
        } else {
            AuthError::Missing
        }))?;
    let claims = verify(app, token).await?;
    let patterns = requested_patterns(&claims, q.subjects, app.cfg.max_subjects)?;
    let live = app.live()?;
    authorize(live, &claims, &patterns)?;
    // Counted once the stream is known to be allowed; released when its
    // body is dropped.
    let permit = app
        .limits
        .admit(ip, claims.sub.as_deref().unwrap_or(token))
        .map_err(ApiError::Limited)?;
    let resume = resume_point(live, headers, q.last_event_id.as_deref()).await?;
    // A resume wins over `initial`.
    let initial = q.initial.filter(|_| resume == Resume::Fresh);
    let deadline = app.verifier.deadline(claims.exp);
    let hub = &live.hub;
    let joined = match (resume, initial) {
        (Resume::Reset, _) => {
            hub.join_reset(patterns.clone(), deadline, q.heartbeat)
                .await
        }
        (_, Some(_)) => {
            hub.join_initial(patterns.clone(), deadline, q.heartbeat)
                .await
        }
        (Resume::After(id), None) => {
            hub.join(patterns.clone(), deadline, Some(id), q.heartbeat)
                .await
        }
        (Resume::Fresh, None) => {
            hub.join(patterns.clone(), deadline, None, q.heartbeat)
                .await
        }
    }
    .map_err(|e| {
        tracing::warn!(error = %e, "join failed");
        match e {
            JoinError::ShuttingDown => ApiError::Unavailable("the relay is shutting down"),
            JoinError::Subscribe(_) => {
                ApiError::Unavailable("NATS did not accept the subscription")
            }
        }
    })?;
    tracing::debug!(
        client = %joined.id,
        sub = ?claims.sub.as_deref().unwrap_or("-"),
        "stream opened"
    );
    // The end-of-stream line's facts, kept only when it will be logged.
    let log = tracing::enabled!(target: STREAM_LOG, tracing::Level::DEBUG).then(|| {
        Box::new(StreamLog {
            peer: ip,
            sub: claims.sub.clone().unwrap_or_else(|| "-".into()),
            subjects: patterns.clone(),
            start: match (resume, initial) {
                (Resume::Reset, _) => "reset".into(),
                (_, Some(_)) => "initial".into(),
                (Resume::After(id), None) => format!("after {id}"),
                (Resume::Fresh, None) => "fresh".into(),
            },
            bytes: 0,
        })
    });
    if let Backfill::FromStream { after } = joined.backfill {
        // The queue holds live frames meanwhile and the body streams what
        // is replayed; the drain waits for this task like a connection.
        app.tasks.spawn(backfill(
            live.history.clone(),
            app.metrics.clone(),
            Replay {
                patterns,
                after,
                initial,
                limit: app.cfg.replay_limit,
                retry_ms: app.cfg.retry_ms,
            },
            joined.queue.clone(),
        ));
    }
    Ok(SseBody::stream(
        joined.queue,
        joined.id,
        live.hub.clone(),
        permit,
        app.metrics.clone(),
        log,
    ))
}

/// Verifies the token. With keys from a JWKS, an unknown `kid` refreshes
/// the key set first (shared and rate-limited, see `auth::Jwks`), and a
/// due periodic refresh starts in the background.
async fn verify(app: &App, token: &str) -> Result<Claims, ApiError> {
    let Some(jwks) = app.verifier.jwks() else {
        return app.verifier.verify(token).map_err(ApiError::Auth);
    };
    jwks.refresh_if_due();
    match app.verifier.verify(token) {
        Err(AuthError::UnknownKey) => {
            jwks.refresh().await;
            if !jwks.is_loaded() {
                return Err(ApiError::Unavailable("the token keys are not loaded yet"));
            }
            app.verifier.verify(token).map_err(ApiError::Auth)
        }
        other => other.map_err(ApiError::Auth),
    }
}

/// The subjects asked for (none: every pattern the token grants), checked
/// for syntax, deduplicated.
fn requested_patterns(
    claims: &Claims,
    asked: Vec<String>,
    max: usize,
) -> Result<Vec<String>, ApiError> {
    let mut patterns = if asked.is_empty() {
        claims.subjects.clone()
    } else {
        asked
    };
    if patterns.is_empty() {
        return Err(ApiError::BadQuery(
            "no subject requested and the token grants none".into(),
        ));
    }
    if patterns.len() > max {
        return Err(ApiError::BadQuery(format!(
            "at most {max} subjects per stream"
        )));
    }
    patterns.sort();
    patterns.dedup();
    for p in &patterns {
        subject::validate_pattern(p).map_err(ApiError::BadSubject)?;
    }
    // A pattern inside another of the same request adds no event: the
    // stream reads only the outer one (one subscription fewer, and one
    // JetStream filter fewer for its resumes).
    let all = patterns.clone();
    patterns.retain(|p| !all.iter().any(|q| q != p && subject::contains(q, p)));
    Ok(patterns)
}

/// Every pattern must be stored by the stream (400) and granted by the
/// token (403): contained in some granted pattern, not merely equal.
fn authorize(live: &Live, claims: &Claims, patterns: &[String]) -> Result<(), ApiError> {
    for p in patterns {
        if !live.scope.covers(p) {
            return Err(ApiError::OutsideStream(p.clone()));
        }
        if !claims.subjects.iter().any(|g| subject::contains(g, p)) {
            return Err(ApiError::Forbidden(p.clone()));
        }
    }
    Ok(())
}

/// The resume point: `Last-Event-ID` (what a reconnecting browser sends)
/// wins over the `last_event_id` query (what a fresh page carries).
/// Ids are stream sequences; one beyond the stream's end is refused.
async fn resume_point(
    live: &Live,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Resume, ApiError> {
    let raw = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .map_err(|_| ApiError::BadLastEventId("Last-Event-ID is not text".into()))?,
        None => match query {
            Some(q) => q,
            None => return Ok(Resume::Fresh),
        },
    };
    let raw = raw.trim();
    // No id: a browser whose id was reset (`id:` with nothing) sends no
    // header at all; an empty one means the same, not "replay everything".
    if raw.is_empty() {
        return Ok(Resume::Fresh);
    }
    let id: u64 = raw.parse().map_err(|_| {
        ApiError::BadLastEventId(format!(
            "last event id {raw:?} is not an event id (a stream sequence number)"
        ))
    })?;
    // An id beyond the stream's last event comes from a replica that is
    // ahead (a mirror catching up: wait a little), from a stream that was
    // deleted and created again, or from a buggy client. A native
    // EventSource dies on any status but 200, so the answer is the reset
    // signal and the stream from its beginning.
    for ask in 0..BEYOND_ASKS {
        let last = live.hub.last_sequence_reaching(id).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot read the stream's last sequence");
            ApiError::Unavailable("JetStream did not answer")
        })?;
        if id <= last {
            return Ok(Resume::After(id));
        }
        tracing::debug!(
            id,
            last,
            ask,
            "last event id beyond the stream's last event"
        );
    }
    Ok(Resume::Reset)
}

/// Asks (at most one a second, shared by every such client of a shard)
/// before an id beyond the stream's end is taken for a reset stream's.
const BEYOND_ASKS: usize = 3;

/// Where a stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    Fresh,
    After(u64),
    /// The id is from a stream that no longer exists: `relay.reset`, then
    /// the stream from its beginning.
    Reset,
}

/// A resume the hub's memory could not serve.
struct Replay {
    patterns: Vec<String>,
    after: u64,
    /// A fresh stream's `initial=`: what to read instead of a resume.
    initial: Option<Initial>,
    limit: u64,
    retry_ms: u64,
}

/// `initial=last` or `initial=<n>`: what a fresh stream gets before live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Initial {
    /// The last stored event of every subject matching the request.
    LastPerSubject,
    /// The last n stored events matching the request.
    Last(usize),
}

/// Replays the client's history from JetStream into its held queue, then
/// releases the live frames held meanwhile. On failure the stream ends with
/// a retry hint: the client resumes again from what it received.
async fn backfill(history: History, metrics: Arc<Metrics>, r: Replay, queue: Arc<ClientQueue>) {
    match replay(&history, &metrics, &r, &queue).await {
        Ok((n, read_to)) => {
            metrics.count_resume("jetstream", n);
            // Where the read ended and where the live frames held meanwhile
            // begin: the seam, for when a resume is suspected of a gap.
            tracing::debug!(
                target: RESUME_LOG,
                after = r.after,
                read_to,
                replayed = n,
                first_held = ?queue.first_held(),
                "resume read from the stream"
            );
            queue.release();
        }
        Err(e) => {
            tracing::warn!(error = %e, after = r.after, "replay failed; client will resume again");
            queue.close(EndReason::Resync, Some(sse::encode_retry(r.retry_ms)));
        }
    }
}

/// The target of the per-resume debug lines (`RUST_LOG=sse_relay::resume=debug`).
pub(crate) const RESUME_LOG: &str = "sse_relay::resume";

/// Replays the history into the held queue; returns how many events it
/// queued and the sequence its read went up to.
async fn replay<S: Source>(
    history: &S,
    metrics: &Metrics,
    r: &Replay,
    queue: &ClientQueue,
) -> Result<(u64, u64), HistoryError> {
    let (n, read_to) = if let Some(initial) = r.initial {
        // Read after the subscriptions are active, as a resume does: what
        // is stored later reaches the hold.
        let bounds = history.bounds().await?;
        let frames = match initial {
            Initial::LastPerSubject => {
                history
                    .last_per_subject(&r.patterns, bounds.last, r.limit)
                    .await?
            }
            Initial::Last(n) => history.last_n(&r.patterns, n, bounds, r.limit).await?,
        };
        (copy_into(frames.into_iter(), queue).await?, bounds.last)
    } else {
        // Read after the client's subscriptions are active: anything stored
        // later reaches the hold, anything up to `last` comes from here.
        let plan = ResumePlan::new(r.after, bounds_reaching(history, r.after).await?, r.limit);
        if let Some(first_available) = plan.gap {
            // History is partly gone (stream limits) or longer than one
            // resume may replay: say so once, then replay what is left.
            metrics.gaps.inc();
            queue.offer_unsequenced(&sse::encode_gap(r.after, first_available));
        }
        let reader = history.range(&r.patterns, plan.start, plan.last).await?;
        (copy_into(reader, queue).await?, plan.last)
    };
    // Every live frame held was stored before it arrived, and after the
    // stream's end this read was told (the subscriptions were active
    // first), so the read must reach just before the first of them. If it
    // did not, the end was stale (a node that had just come back answered)
    // and the events between would be skipped: read them too.
    let Some(first) = queue.first_held().filter(|&f| f > read_to + 1) else {
        return Ok((n, read_to));
    };
    // Usually the events between are on other subjects: asking whether
    // any is the client's costs a request per filter, a read three.
    if !history
        .holds_any(&r.patterns, read_to + 1, first - 1)
        .await?
    {
        return Ok((n, first - 1));
    }
    tracing::debug!(
        target: RESUME_LOG,
        read_to,
        first_held = first,
        "resume read ended before the live frames it holds; reading the rest"
    );
    let reader = history.range(&r.patterns, read_to + 1, first - 1).await?;
    Ok((n + copy_into(reader, queue).await?, first - 1))
}

/// The stream's bounds, from a node that holds `after`: the client has
/// event `after`, so an answer below it comes from a node behind the
/// stream (one just back from a freeze answers as the leader for a moment,
/// from what it held before), and a read up to that end would skip what
/// lies between. Asked again a few times, a little later; then the replay
/// fails and the client resumes again.
async fn bounds_reaching<S: Source>(history: &S, after: u64) -> Result<Bounds, HistoryError> {
    let mut pause = BEHIND_PAUSE;
    for ask in 1..=BEHIND_ASKS {
        let bounds = history.bounds().await?;
        if bounds.last >= after {
            return Ok(bounds);
        }
        tracing::debug!(
            target: RESUME_LOG,
            after,
            last = bounds.last,
            ask,
            "the stream's end read is below the resume point"
        );
        if ask < BEHIND_ASKS {
            tokio::time::sleep(pause).await;
            pause *= 2;
        }
    }
    Err(HistoryError::Behind { after })
}

/// Asks for the stream's end before a replay gives up on a node behind.
const BEHIND_ASKS: u32 = 4;
const BEHIND_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// Copies what `reader` reads into the queue, waiting for the client to
/// take what is queued; how many events it queued.
async fn copy_into<F: Frames>(mut reader: F, queue: &ClientQueue) -> Result<u64, HistoryError> {
    let mut n = 0;
    while let Some((seq, frame)) = reader.next().await? {
        std::future::poll_fn(|cx| queue.poll_space(cx)).await;
        if !queue.replay(seq, &frame) {
            break;
        }
        n += 1;
    }
    Ok(n)
}

/// What a replay reads: JetStream, or a stand-in in the unit tests.
trait Source {
    type Reader: Frames;
    async fn bounds(&self) -> Result<Bounds, HistoryError>;
    async fn holds_any(
        &self,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<bool, HistoryError>;
    async fn range(
        &self,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<Self::Reader, HistoryError>;
    async fn last_per_subject(
        &self,
        patterns: &[String],
        end: u64,
        limit: u64,
    ) -> Result<Vec<Stored>, HistoryError>;
    async fn last_n(
        &self,
        patterns: &[String],
        n: usize,
        bounds: Bounds,
        limit: u64,
    ) -> Result<Vec<Stored>, HistoryError>;
}

/// Stored events, in order.
trait Frames {
    async fn next(&mut self) -> Result<Option<Stored>, HistoryError>;
}

impl Source for History {
    type Reader = RangeReader;
    async fn bounds(&self) -> Result<Bounds, HistoryError> {
        History::bounds(self).await
    }
    async fn holds_any(
        &self,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<bool, HistoryError> {
        History::holds_any(self, patterns, start, end).await
    }
    async fn range(
        &self,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<RangeReader, HistoryError> {
        History::range(self, patterns, start, end).await
    }
    async fn last_per_subject(
        &self,
        patterns: &[String],
        end: u64,
        limit: u64,
    ) -> Result<Vec<Stored>, HistoryError> {
        History::last_per_subject(self, patterns, end, limit).await
    }
    async fn last_n(
        &self,
        patterns: &[String],
        n: usize,
        bounds: Bounds,
        limit: u64,
    ) -> Result<Vec<Stored>, HistoryError> {
        History::last_n(self, patterns, n, bounds, limit).await
    }
}

impl Frames for RangeReader {
    async fn next(&mut self) -> Result<Option<Stored>, HistoryError> {
        RangeReader::next(self).await
    }
}

/// Frames already read (`initial=`'s).
impl Frames for std::vec::IntoIter<Stored> {
    async fn next(&mut self) -> Result<Option<Stored>, HistoryError> {
        Ok(Iterator::next(self))
    }
}

/// Parses a query as `/events` does, with `grants` as the token's subjects:
/// the patterns it would subscribe to, or the refusal. For the fuzz targets.
pub(crate) fn patterns_for_query(query: &str, grants: &[String]) -> Result<Vec<String>, String> {
    let q = Query::parse(query);
    let claims = Claims {
        exp: 0,
        sub: None,
        subjects: grants.to_vec(),
        publish: Vec::new(),
    };
    let patterns = requested_patterns(&claims, q.subjects, 32).map_err(|e| format!("{e:?}"))?;
    for p in &patterns {
        if !claims.subjects.iter().any(|g| subject::contains(g, p)) {
            return Err(format!("{p:?} not granted"));
        }
    }
    Ok(patterns)
}

/// The `/events` query string.
#[derive(Debug)]
struct Query {
    token: Option<String>,
    subjects: Vec<String>,
    last_event_id: Option<String>,
    heartbeat: Heartbeat,
    initial: Option<Initial>,
    /// An `initial=` value that is neither `last` nor a count.
    bad_initial: bool,
}

impl Query {
    fn parse(q: &str) -> Query {
        let mut out = Query {
            token: None,
            subjects: Vec::new(),
            last_event_id: None,
            heartbeat: Heartbeat::Comment,
            initial: None,
            bad_initial: false,
        };
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "token" => out.token = Some(v.into_owned()),
                "subject" => out.subjects.push(v.into_owned()),
                "last_event_id" => out.last_event_id = Some(v.into_owned()),
                "heartbeat" if v == "event" => out.heartbeat = Heartbeat::Event,
                "initial" => match (&*v, v.parse::<usize>()) {
                    ("last", _) => out.initial = Some(Initial::LastPerSubject),
                    (_, Ok(n)) if n > 0 => out.initial = Some(Initial::Last(n)),
                    _ => out.bad_initial = true,
                },
                _ => {}
            }
        }
        out
    }
}

/// A token from the `Authorization` header or the `relay_token` cookie
/// (never the URL).
pub(crate) fn header_token(h: &HeaderMap) -> Option<&str> {
    bearer(h).or_else(|| cookie(h, "relay_token"))
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use hyper::header::HeaderValue;

    /// A pattern inside another of the same request is dropped: the outer
    /// one reads every event of it.
    #[test]
    fn a_pattern_inside_another_is_dropped() {
        let claims = Claims {
            exp: 0,
            sub: None,
            subjects: vec![],
            publish: vec![],
        };
        let ask = |v: &[&str]| {
            requested_patterns(&claims, v.iter().map(|s| s.to_string()).collect(), 32).unwrap()
        };
        assert_eq!(ask(&["events.c.b.>", "events.c.>"]), ["events.c.>"]);
        assert_eq!(
            ask(&["events.a.1", "events.a.*", "events.b"]),
            ["events.a.*", "events.b"]
        );
        // Overlapping but neither inside the other: both stay.
        assert_eq!(
            ask(&["events.a.*", "events.*.1"]),
            ["events.*.1", "events.a.*"]
        );
        assert_eq!(ask(&["events.>", "events.>"]), ["events.>"]);
    }

    #[test]
    fn parses_repeated_subjects_and_decodes() {
        let q = Query::parse("subject=events.a.%3E&subject=events.b.*&token=t%2B1");
        assert_eq!(q.subjects, vec!["events.a.>", "events.b.*"]);
        assert_eq!(q.token.as_deref(), Some("t+1"));
    }

    /// The stream as a replay reads it: events 1..=`stored` on one
    /// subject, with an end of stream that may be stale.
    struct Stale {
        stored: u64,
        /// Sequences of other subjects: not the client's.
        others: Vec<u64>,
        /// The last sequences `bounds` reports, in turn (the last one
        /// from then on).
        told: std::sync::Mutex<Vec<u64>>,
        reads: std::sync::Mutex<Vec<(u64, u64)>>,
    }

    fn frame(seq: u64) -> Bytes {
        Bytes::from(format!("{seq};"))
    }

    impl Stale {
        fn events(&self, start: u64, end: u64) -> Vec<Stored> {
            (start.max(1)..=end.min(self.stored))
                .filter(|s| !self.others.contains(s))
                .map(|s| (s, frame(s)))
                .collect()
        }
    }

    impl Source for Stale {
        type Reader = std::vec::IntoIter<Stored>;
        async fn bounds(&self) -> Result<Bounds, HistoryError> {
            let mut told = self.told.lock().unwrap();
            let last = if told.len() > 1 {
                told.remove(0)
            } else {
                told[0]
            };
            Ok(Bounds {
                first: 1,
                last,
                created: 0,
            })
        }
        async fn holds_any(
            &self,
            _: &[String],
            start: u64,
            end: u64,
        ) -> Result<bool, HistoryError> {
            Ok(!self.events(start, end).is_empty())
        }
        async fn range(
            &self,
            _: &[String],
            start: u64,
            end: u64,
        ) -> Result<std::vec::IntoIter<Stored>, HistoryError> {
            self.reads.lock().unwrap().push((start, end));
            Ok(self.events(start, end).into_iter())
        }
        async fn last_per_subject(
            &self,
            _: &[String],
            end: u64,
            _: u64,
        ) -> Result<Vec<Stored>, HistoryError> {
            Ok(self.events(end, end))
        }
        async fn last_n(
            &self,
            _: &[String],
            n: usize,
            bounds: Bounds,
            _: u64,
        ) -> Result<Vec<Stored>, HistoryError> {
            Ok(self.events(bounds.last.saturating_sub(n as u64) + 1, bounds.last))
        }
    }

    /// Replays into `queue` (holding live frames 8..=10, the stream holding
    /// 1..=10 but saying it ends at `told`), releases it and returns what
    /// the client receives, with the reads made.
    async fn replay_told(
        told: &[u64],
        after: u64,
        initial: Option<Initial>,
    ) -> (Result<(u64, u64), HistoryError>, String, Vec<(u64, u64)>) {
        let stream = Stale {
            stored: 10,
            others: Vec::new(),
            told: std::sync::Mutex::new(told.to_vec()),
            reads: Default::default(),
        };
        replay_from(stream, after, initial).await
    }

    async fn replay_from(
        stream: Stale,
        after: u64,
        initial: Option<Initial>,
    ) -> (Result<(u64, u64), HistoryError>, String, Vec<(u64, u64)>) {
        let queue = ClientQueue::held(64, after);
        for seq in 8..=10 {
            queue.offer(seq, &frame(seq));
        }
        let r = Replay {
            patterns: vec!["events.a".into()],
            after,
            initial,
            limit: 0,
            retry_ms: 1000,
        };
        let replayed = replay(&stream, &Metrics::default(), &r, &queue).await;
        queue.release();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut got = String::new();
        for _ in 0..16 {
            let std::task::Poll::Ready(Some(chunk)) = queue.poll_chunk(&mut cx) else {
                break;
            };
            got.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        // Only the events, not the relay.live marker at the seam.
        let events = got
            .split_inclusive(';')
            .map(|e| e.rsplit('\n').next().unwrap())
            .collect();
        (replayed, events, stream.reads.into_inner().unwrap())
    }

    /// A resume told a stale end of the stream (5, by a node that has just
    /// come back, while 6 and 7 are stored too) reads on to just before the
    /// first live frame it holds (8): nothing between is skipped.
    #[tokio::test]
    async fn a_resume_told_a_stale_end_reads_up_to_the_first_held_frame() {
        let (_, got, reads) = replay_told(&[5], 2, None).await;
        assert_eq!(got, "3;4;5;6;7;8;9;10;");
        assert_eq!(reads, [(3, 5), (6, 7)]);
        // Told the true end, it reads once.
        let (_, got, reads) = replay_told(&[7], 2, None).await;
        assert_eq!(got, "3;4;5;6;7;8;9;10;");
        assert_eq!(reads, [(3, 7)]);
    }

    /// When what lies between is on other subjects (6 and 7 here), one
    /// question says so and no read is opened for it.
    #[tokio::test]
    async fn a_seam_without_the_clients_events_opens_no_read() {
        let stream = Stale {
            stored: 10,
            others: vec![6, 7],
            told: std::sync::Mutex::new(vec![5]),
            reads: Default::default(),
        };
        let (replayed, got, reads) = replay_from(stream, 2, None).await;
        assert_eq!(replayed.unwrap(), (3, 7));
        assert_eq!(got, "3;4;5;8;9;10;");
        assert_eq!(reads, [(3, 5)]);
    }

    /// The same holds for a fresh stream's `initial=`: what was stored
    /// after the stale end reaches it before the held live frames.
    #[tokio::test]
    async fn an_initial_read_told_a_stale_end_reads_up_to_the_first_held_frame() {
        let (_, got, _) = replay_told(&[5], 0, Some(Initial::Last(2))).await;
        assert_eq!(got, "4;5;6;7;8;9;10;");
        let (_, got, _) = replay_told(&[5], 0, Some(Initial::LastPerSubject)).await;
        assert_eq!(got, "5;6;7;8;9;10;");
    }

    /// A stream's end below the resume point (1, for a client that has
    /// event 2) comes from a node behind the stream: asked again, the next
    /// answer (10) bounds the read, and nothing is skipped.
    #[tokio::test(start_paused = true)]
    async fn a_resume_told_an_end_below_its_id_asks_again() {
        let (replayed, got, reads) = replay_told(&[1, 1, 10], 2, None).await;
        assert_eq!(replayed.unwrap(), (8, 10));
        assert_eq!(got, "3;4;5;6;7;8;9;10;");
        assert_eq!(reads, [(3, 10)]);
    }

    /// Told such an end every time, the replay fails (the client resumes
    /// again) rather than release the live frames past a gap.
    #[tokio::test(start_paused = true)]
    async fn a_resume_always_told_an_end_below_its_id_fails() {
        let (replayed, _, reads) = replay_told(&[1], 2, None).await;
        assert!(matches!(replayed, Err(HistoryError::Behind { after: 2 })));
        assert!(reads.is_empty());
    }

    #[test]
    fn finds_bearer_and_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; relay_token=xyz"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        assert_eq!(cookie(&h, "relay_token"), Some("xyz"));
        assert_eq!(cookie(&h, "missing"), None);
    }
}
