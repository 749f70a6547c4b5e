//! The one SSE client that resumes by `Last-Event-ID` until it has every
//! event it should, through relay restarts, NATS restarts, slow-client
//! drops and its own random hang-ups; and the comparison of what a client
//! received with what the stream stored.
//!
//! A group spawned with [`Readers::spawn_across_resets`] also reads through
//! a recreated stream: `relay.reset` (with `id: 0`) starts a new *epoch*
//! whose ids count from the new stream's first event; each epoch is checked
//! on its own against what that stream stored. Any other group fails on a
//! `relay.reset`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use sse_relay::subject;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{SseClient, StoredEvent, events_path, join_task};

/// Pause before connecting again after a refusal or a stream the relay
/// ended; a browser waits `retry:` ms, this keeps the reader from spinning
/// against a relay that is restarting.
const RECONNECT_PACING: Duration = Duration::from_millis(50);

/// What every reader of a [`Readers`] group shares.
pub struct ReaderConfig {
    /// The `Authorization` header value.
    pub auth: String,
    /// The relay to (re)connect to; changes when a new relay replaces it.
    pub addr: watch::Receiver<String>,
    /// Connect again (with `Last-Event-ID`) when the relay ends a stream;
    /// if false a reader gives up at the first end and reports it.
    pub reconnect: bool,
    /// With a seed, each reader hangs up after a random number of events
    /// (sometimes none: right after the response head, in the middle of
    /// the replay); without one it reads each stream until the relay ends
    /// it.
    pub hang_up_seed: Option<u64>,
    pub deadline: Instant,
}

/// What one reader received and how its connections went.
#[derive(Debug)]
pub struct ReaderReport {
    pub name: String,
    /// `(id, data)` of every data event, in arrival order.
    pub events: Vec<(u64, String)>,
    /// The stored events on the reader's subjects, which it must have got.
    pub expected: Vec<(u64, String)>,
    /// Streams opened with 200.
    pub connections: usize,
    /// Streams the relay ended (or that broke) while the reader still
    /// wanted events.
    pub ended_by_relay: usize,
    /// Connection attempts that failed (relay down), and the last failure.
    pub refused: usize,
    pub last_refusal: Option<String>,
    /// Streams the reader hung up right after the response head.
    pub immediate_hang_ups: usize,
    /// The last stream opened: its number, where it resumed from, what it
    /// delivered and how it ended (to tell a stalled stream from a gap).
    pub last_stream: String,
    /// Every stream opened with 200, in order (to place a loss).
    pub streams: Vec<StreamRecord>,
    /// Streams the reader hung up after reading its random budget of events.
    pub hang_ups: usize,
    /// Where each epoch after the first begins in `events` (the index of its
    /// first event), one per `relay.reset` received.
    pub resets: Vec<usize>,
    /// Where each epoch after the first begins in `expected`.
    pub expected_resets: Vec<usize>,
}

/// One stream a reader opened: in which epoch, the Last-Event-ID it
/// resumed from, the ids it got, when it opened (since the reader
/// started) and whether the relay ended it.
#[derive(Debug, Clone)]
pub struct StreamRecord {
    pub epoch: usize,
    pub from: u64,
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub events: usize,
    pub opened_at: Duration,
    pub ended_by_relay: bool,
}

impl std::fmt::Display for StreamRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {} from {}: {} events, ids {:?}..{:?}, opened at {:.3?}, {}",
            self.epoch,
            self.from,
            self.events,
            self.first,
            self.last,
            self.opened_at,
            if self.ended_by_relay {
                "ended by the relay"
            } else {
                "hung up or open"
            }
        )
    }
}

impl ReaderReport {
    /// The streams around the first id of `epoch` the reader should have
    /// got and did not: the last one opened before it, and the next.
    pub fn streams_around(&self, epoch: usize, missing: u64) -> Vec<&StreamRecord> {
        let i = self
            .streams
            .iter()
            .rposition(|r| r.epoch == epoch && r.from < missing)
            .unwrap_or(0);
        self.streams.iter().skip(i).take(3).collect()
    }

    /// Asserts the reader got exactly the expected events, in order, once,
    /// and one `relay.reset` at each recreation of the stream, where the
    /// old stream's events end.
    pub fn assert_complete(&self) {
        if self.resets.len() != self.expected_resets.len() {
            let firsts: Vec<Option<&(u64, String)>> =
                self.resets.iter().map(|&i| self.events.get(i)).collect();
            panic!(
                "{}: {} relay.reset received (before events #{:?}, first of each epoch: {firsts:?}), {} expected (the stream was recreated that often)",
                self.name,
                self.resets.len(),
                self.resets,
                self.expected_resets.len()
            );
        }
        for (e, (got, want)) in epochs(&self.events, &self.resets)
            .zip(epochs(&self.expected, &self.expected_resets))
            .enumerate()
        {
            let who = match self.resets.len() {
                0 => format!("{} (last stream: {})", self.name, self.last_stream),
                _ => format!(
                    "{} (stream epoch {e}; last stream: {})",
                    self.name, self.last_stream
                ),
            };
            assert_same_events(&who, got, want);
        }
    }
}

/// `events` cut at the epoch starts `resets`.
fn epochs<'a>(
    events: &'a [(u64, String)],
    resets: &'a [usize],
) -> impl Iterator<Item = &'a [(u64, String)]> {
    let starts = std::iter::once(0).chain(resets.iter().copied());
    let ends = resets.iter().copied().chain(std::iter::once(events.len()));
    starts.zip(ends).map(move |(a, b)| &events[a..b])
}

/// One reader: connects with `Last-Event-ID: 0` (everything stored), always
/// resumes from the last id received, and reads until `stop_at` (the last
/// stored id on its subjects, known once publishing is over) is reached or
/// the deadline passes. Each event must have an id above the last, a
/// subject (the payload's text after `:`) inside its patterns, and not be
/// a `relay.*` control event (`relay.gap` among them: nothing is removed
/// from the streams these readers read). With `resets_allowed`,
/// `relay.reset` with `id: 0` starts a new epoch: the reader goes on from
/// id 0 (as a browser's Last-Event-ID does), and `stop_at` and `progress`
/// are `(epoch, id)`.
struct ResumingReader {
    name: String,
    patterns: Vec<&'static str>,
    auth: String,
    addr: watch::Receiver<String>,
    reconnect: bool,
    resets_allowed: bool,
    hang_ups: Option<StdRng>,
    deadline: Instant,
    stop_at: watch::Receiver<Option<(usize, u64)>>,
    /// The epoch and the last id received in it so far.
    progress: watch::Sender<(usize, u64)>,
    /// How its connections go, for a failure message while it runs.
    state: Arc<Mutex<ReaderState>>,
}

/// A running reader's connections so far, and what it is doing now.
#[derive(Debug, Default)]
struct ReaderState {
    connections: usize,
    ended_by_relay: usize,
    refused: usize,
    /// When the stream it reads now opened (None between streams).
    streaming_since: Option<Instant>,
    last_event_at: Option<Instant>,
}

impl ResumingReader {
    /// How many events to read on the next connection before hanging up.
    fn budget(&mut self) -> u64 {
        let Some(rng) = self.hang_ups.as_mut() else {
            return u64::MAX;
        };
        match rng.random_range(0..10u64) {
            0 | 1 => 0,
            2 => 1 + rng.random_range(0..3u64),
            _ => 1 + rng.random_range(0..80u64),
        }
    }

    fn finished(&self, epoch: usize, last: u64) -> bool {
        self.stop_at.borrow().is_some_and(|s| (epoch, last) >= s) || Instant::now() >= self.deadline
    }

    async fn run(mut self) -> ReaderReport {
        let started = Instant::now();
        let mut rep = ReaderReport {
            name: self.name.clone(),
            events: Vec::new(),
            expected: Vec::new(),
            connections: 0,
            ended_by_relay: 0,
            refused: 0,
            last_refusal: None,
            immediate_hang_ups: 0,
            last_stream: "none".into(),
            streams: Vec::new(),
            hang_ups: 0,
            resets: Vec::new(),
            expected_resets: Vec::new(),
        };
        let path = events_path(&self.patterns);
        let mut last = 0u64;
        let mut epoch = 0usize;
        // Bounded: at most 20,000 connection attempts, and the deadline.
        for _ in 0..20_000 {
            if self.finished(epoch, last) {
                break;
            }
            let addr = self.addr.borrow().clone();
            let last_s = last.to_string();
            let headers = [
                ("Authorization", self.auth.as_str()),
                ("Last-Event-ID", &last_s),
            ];
            let mut c = match SseClient::try_connect(&addr, &path, &headers, Duration::from_secs(5))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    self.state.lock().unwrap().refused += 1;
                    rep.refused += 1;
                    rep.last_refusal = Some(e);
                    tokio::time::sleep(RECONNECT_PACING).await;
                    continue;
                }
            };
            assert_eq!(
                c.status,
                200,
                "{}: resume from {last} on {addr} refused: {:?} {:?}",
                self.name,
                c.headers,
                c.body_text()
            );
            rep.connections += 1;
            {
                let mut st = self.state.lock().unwrap();
                st.connections += 1;
                st.streaming_since = Some(Instant::now());
            }
            let budget = self.budget();
            if budget == 0 {
                rep.immediate_hang_ups += 1;
                continue;
            }
            let mut read = 0;
            let opened = Instant::now();
            let from = last;
            let first_index = rep.events.len();
            let mut last_event_at = opened;
            while read < budget && !self.finished(epoch, last) {
                let ev = tokio::select! {
                    ev = c.next_data_event(Duration::from_millis(250)) => ev,
                    // Re-check `finished` as soon as the target is known.
                    _ = self.stop_at.changed() => continue,
                };
                match ev {
                    Some(ev)
                        if self.resets_allowed && ev.event.as_deref() == Some("relay.reset") =>
                    {
                        assert_eq!(
                            ev.id.as_deref(),
                            Some("0"),
                            "{}: relay.reset must restart the ids from 0: {ev:?}",
                            self.name
                        );
                        epoch += 1;
                        last = 0;
                        rep.resets.push(rep.events.len());
                        let _ = self.progress.send((epoch, 0));
                    }
                    Some(ev) => {
                        assert_ne!(
                            ev.event.as_deref(),
                            Some("relay.gap"),
                            "{}: relay.gap although the stream lost nothing: {ev:?}",
                            self.name
                        );
                        assert!(
                            !ev.event.as_deref().is_some_and(|e| e.starts_with("relay.")),
                            "{}: a relay.* control event among the data events: {ev:?}",
                            self.name
                        );
                        let seq = ev.seq();
                        assert!(
                            seq > last,
                            "{} (connection #{}, resumed from {last_s}): id {seq} is not above the last received {last}",
                            self.name,
                            rep.connections
                        );
                        let subject = ev.data.split_once(':').map_or("", |(_, s)| s);
                        assert!(
                            matches_any(&self.patterns, subject),
                            "{} got an event on {subject}: {ev:?}",
                            self.name
                        );
                        last = seq;
                        rep.events.push((seq, ev.data));
                        read += 1;
                        last_event_at = Instant::now();
                        let _ = self.progress.send((epoch, seq));
                        self.state.lock().unwrap().last_event_at = Some(Instant::now());
                    }
                    None if c.is_closed() => {
                        rep.ended_by_relay += 1;
                        self.state.lock().unwrap().ended_by_relay += 1;
                        if !self.reconnect {
                            eprintln!(
                                "{}: stream ended (clean end: {}, error: {:?}) after id {last}",
                                self.name,
                                c.ended_cleanly(),
                                c.error()
                            );
                            return rep;
                        }
                        tokio::time::sleep(RECONNECT_PACING).await;
                        break;
                    }
                    None => {}
                }
            }
            let got = &rep.events[first_index.min(rep.events.len())..];
            rep.streams.push(StreamRecord {
                epoch,
                from,
                first: got.first().map(|e| e.0),
                last: got.last().map(|e| e.0),
                events: got.len(),
                opened_at: opened.duration_since(started),
                ended_by_relay: c.is_closed(),
            });
            rep.last_stream = format!(
                "#{} resumed from {last_s}, {read} events in {:?}, none for the last {:?}, markers {:?}, {}",
                rep.connections,
                opened.elapsed(),
                last_event_at.elapsed(),
                c.markers
                    .iter()
                    .map(|m| m.event.clone())
                    .collect::<Vec<_>>(),
                if c.is_closed() { "ended" } else { "open" }
            );
            if read >= budget {
                rep.hang_ups += 1;
            }
            self.state.lock().unwrap().streaming_since = None;
        }
        rep
    }
}

/// A group of [`ResumingReader`]s, one per pattern set, each on its own task.
pub struct Readers {
    stops: Vec<watch::Sender<Option<(usize, u64)>>>,
    progress: Vec<watch::Receiver<(usize, u64)>>,
    states: Vec<Arc<Mutex<ReaderState>>>,
    patterns: Vec<Vec<&'static str>>,
    tasks: Vec<tokio::task::JoinHandle<ReaderReport>>,
    /// No line per reader from `finish` (groups of thousands).
    quiet: bool,
}

impl Readers {
    /// Readers for a stream that is never recreated: a `relay.reset` fails
    /// the reader.
    pub fn spawn(sets: &[Vec<&'static str>], config: &ReaderConfig) -> Readers {
        Self::spawn_inner(sets, config, false)
    }

    /// Readers for a stream that may be deleted and created again: each
    /// `relay.reset` starts a new epoch (see the module doc); finish them
    /// with [`Readers::finish_epochs`].
    pub fn spawn_across_resets(sets: &[Vec<&'static str>], config: &ReaderConfig) -> Readers {
        Self::spawn_inner(sets, config, true)
    }

    fn spawn_inner(
        sets: &[Vec<&'static str>],
        config: &ReaderConfig,
        resets_allowed: bool,
    ) -> Readers {
        let mut r = Readers {
            stops: Vec::new(),
            progress: Vec::new(),
            states: Vec::new(),
            patterns: sets.to_vec(),
            tasks: Vec::new(),
            quiet: false,
        };
        for (i, patterns) in sets.iter().enumerate() {
            let (stop_tx, stop_at) = watch::channel(None);
            let (progress, progress_rx) = watch::channel((0, 0));
            let state = Arc::new(Mutex::new(ReaderState::default()));
            let mut name = format!("reader {i} {patterns:?}");
            let hang_ups = config.hang_up_seed.map(|seed| {
                name.push_str(&format!(" (hang-up seed {seed})"));
                let salt = (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                StdRng::seed_from_u64(seed ^ salt)
            });
            let reader = ResumingReader {
                name,
                patterns: patterns.clone(),
                auth: config.auth.clone(),
                addr: config.addr.clone(),
                reconnect: config.reconnect,
                resets_allowed,
                hang_ups,
                deadline: config.deadline,
                stop_at,
                progress,
                state: state.clone(),
            };
            r.states.push(state);
            r.stops.push(stop_tx);
            r.progress.push(progress_rx);
            r.tasks.push(tokio::spawn(reader.run()));
        }
        r
    }

    /// `finish` prints no line per reader.
    pub fn quiet(mut self) -> Readers {
        self.quiet = true;
        self
    }

    /// Waits until every reader has received an event with id >= `seq`
    /// (in the first epoch, or any later one).
    pub async fn wait_all_reached(&mut self, seq: u64, limit: Duration) {
        for (i, p) in self.progress.iter_mut().enumerate() {
            let ok = tokio::time::timeout(limit, p.wait_for(|&(e, s)| e > 0 || s >= seq))
                .await
                .is_ok_and(|r| r.is_ok());
            assert!(
                ok,
                "reader {i} did not receive id {seq} within {limit:?} (at {:?})",
                *p.borrow()
            );
        }
    }

    /// Waits until every reader of epoch `epoch` has received the last
    /// event of `stored` on its subjects (all `limit`, shared); on failure
    /// names every reader that did not.
    pub async fn wait_each_reached(
        &mut self,
        epoch: usize,
        stored: &[StoredEvent],
        limit: Duration,
    ) {
        let deadline = Instant::now() + limit;
        let mut short = Vec::new();
        for (i, (p, patterns)) in self.progress.iter_mut().zip(&self.patterns).enumerate() {
            let want = (
                epoch,
                events_matching(patterns, stored).last().map_or(0, |e| e.0),
            );
            let ok = tokio::time::timeout_at(deadline, p.wait_for(|&at| at >= want))
                .await
                .is_ok_and(|r| r.is_ok());
            if !ok {
                let st = self.states[i].lock().unwrap();
                let ago = |t: Option<Instant>| t.map(|t| t.elapsed());
                short.push(format!(
                    "reader {i} {patterns:?}: at {:?} of {want:?}; {} connections, {} ended by the relay, {} refused; on a stream opened {:?} ago, last event {:?} ago",
                    *p.borrow(),
                    st.connections,
                    st.ended_by_relay,
                    st.refused,
                    ago(st.streaming_since),
                    ago(st.last_event_at)
                ));
            }
        }
        assert!(
            short.is_empty(),
            "{} readers did not reach their last event within {limit:?} (first 40):\n  {}",
            short.len(),
            short[..short.len().min(40)].join("\n  ")
        );
    }

    /// Tells each reader where the events of `stored` on its subjects end,
    /// joins them and returns their reports (with those events as
    /// `expected`), in spawn order. Asserting is the caller's.
    pub async fn finish(self, stored: &[StoredEvent]) -> Vec<ReaderReport> {
        self.finish_epochs(&[stored.to_vec()]).await
    }

    /// [`Readers::finish`] for a stream recreated `epochs.len() - 1` times:
    /// `epochs` holds what each stream stored, oldest first; a reader must
    /// have every one's events on its subjects, in order, once, with a
    /// `relay.reset` between two epochs.
    pub async fn finish_epochs(self, epochs: &[Vec<StoredEvent>]) -> Vec<ReaderReport> {
        assert!(!epochs.is_empty(), "at least one stream's contents");
        // Per reader: its events of every epoch, and where each epoch
        // after the first begins.
        let expected: Vec<_> = self
            .patterns
            .iter()
            .map(|p| {
                let mut all: Vec<(u64, String)> = Vec::new();
                let mut starts: Vec<usize> = Vec::new();
                for (e, stored) in epochs.iter().enumerate() {
                    if e > 0 {
                        starts.push(all.len());
                    }
                    all.extend(events_matching(p, stored));
                }
                (all, starts)
            })
            .collect();
        let last_epoch = epochs.len() - 1;
        for (tx, p) in self.stops.iter().zip(&self.patterns) {
            let last = events_matching(p, &epochs[last_epoch])
                .last()
                .map_or(0, |e| e.0);
            let _ = tx.send(Some((last_epoch, last)));
        }
        let mut reports = Vec::new();
        // `self.stops` stays alive until every reader is joined: a dropped
        // sender would make `changed()` return at once, forever.
        for (t, expected) in self.tasks.into_iter().zip(expected) {
            let mut rep = join_task("reader", t).await;
            if !self.quiet {
                eprintln!(
                    "{}: {} events, {} connections, {} ended by the relay, {} refused attempts (last: {:?}), {} immediate hang-ups, {} resets",
                    rep.name,
                    rep.events.len(),
                    rep.connections,
                    rep.ended_by_relay,
                    rep.refused,
                    rep.last_refusal,
                    rep.immediate_hang_ups,
                    rep.resets.len()
                );
            }
            (rep.expected, rep.expected_resets) = expected;
            reports.push(rep);
        }
        drop(self.stops);
        reports
    }
}

/// True if `subject` matches any of `patterns`.
pub fn matches_any(patterns: &[&str], subject: &str) -> bool {
    patterns.iter().any(|p| subject::matches(p, subject))
}

/// `(seq, payload)` of the events of `stored` whose subject matches one of
/// `patterns`, in stream order: what a client on those patterns must get.
pub fn events_matching(patterns: &[&str], stored: &[StoredEvent]) -> Vec<(u64, String)> {
    stored
        .iter()
        .filter(|e| matches_any(patterns, &e.subject))
        .map(|e| (e.seq, e.payload.clone()))
        .collect()
}

/// Asserts that `got` equals `want` (both `(id, data)` in delivery order),
/// and on failure says what went wrong: duplicates, order, missing ids.
pub fn assert_same_events(who: &str, got: &[(u64, String)], want: &[(u64, String)]) {
    if got == want {
        return;
    }
    let mut seen = HashSet::new();
    let dups: Vec<u64> = got
        .iter()
        .filter(|(s, _)| !seen.insert(*s))
        .map(|(s, _)| *s)
        .take(20)
        .collect();
    let disorder: Vec<(u64, u64)> = got
        .windows(2)
        .filter(|w| w[1].0 <= w[0].0)
        .map(|w| (w[0].0, w[1].0))
        .take(10)
        .collect();
    let got_ids: HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
    let want_ids: HashSet<u64> = want.iter().map(|(s, _)| *s).collect();
    let mut missing: Vec<u64> = want_ids.difference(&got_ids).copied().collect();
    missing.sort_unstable();
    let mut extra: Vec<u64> = got_ids.difference(&want_ids).copied().collect();
    extra.sort_unstable();
    let first_diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{who}: received {} events, expected {}.\n  duplicates (first 20): {dups:?}\n  out of order (prev, next; first 10): {disorder:?}\n  missing ({}; first 30): {:?}\n  unexpected ({}; first 30): {:?}\n  first difference at #{first_diff}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        missing.len(),
        &missing[..missing.len().min(30)],
        extra.len(),
        &extra[..extra.len().min(30)],
        got.get(first_diff),
        want.get(first_diff),
    );
}
