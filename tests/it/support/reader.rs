//! The one SSE client that resumes by `Last-Event-ID` until it has every
//! event it should, through relay restarts, NATS restarts, slow-client
//! drops and its own random hang-ups; and the comparison of what a client
//! received with what the stream stored.

use std::collections::HashSet;
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
}

impl ReaderReport {
    /// Asserts the reader got exactly the expected events, in order, once.
    pub fn assert_complete(&self) {
        let who = format!("{} (last stream: {})", self.name, self.last_stream);
        assert_same_events(&who, &self.events, &self.expected);
    }
}

/// One reader: connects with `Last-Event-ID: 0` (everything stored), always
/// resumes from the last id received, and reads until `stop_at` (the last
/// stored id on its subjects, known once publishing is over) is reached or
/// the deadline passes. Each event must have an id above the last, a
/// subject (the payload's text after `:`) inside its patterns, and not be
/// `relay.gap`: nothing is removed from the streams these readers read.
struct ResumingReader {
    name: String,
    patterns: Vec<&'static str>,
    auth: String,
    addr: watch::Receiver<String>,
    reconnect: bool,
    hang_ups: Option<StdRng>,
    deadline: Instant,
    stop_at: watch::Receiver<Option<u64>>,
    /// The last id received so far.
    progress: watch::Sender<u64>,
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

    fn finished(&self, last: u64) -> bool {
        self.stop_at.borrow().is_some_and(|s| last >= s) || Instant::now() >= self.deadline
    }

    async fn run(mut self) -> ReaderReport {
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
        };
        let path = events_path(&self.patterns);
        let mut last = 0u64;
        // Bounded: at most 20,000 connection attempts, and the deadline.
        for _ in 0..20_000 {
            if self.finished(last) {
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
            let budget = self.budget();
            if budget == 0 {
                rep.immediate_hang_ups += 1;
                continue;
            }
            let mut read = 0;
            let opened = Instant::now();
            let mut last_event_at = opened;
            while read < budget && !self.finished(last) {
                let ev = tokio::select! {
                    ev = c.next_data_event(Duration::from_millis(250)) => ev,
                    // Re-check `finished` as soon as the target is known.
                    _ = self.stop_at.changed() => continue,
                };
                match ev {
                    Some(ev) => {
                        assert_ne!(
                            ev.event.as_deref(),
                            Some("relay.gap"),
                            "{}: relay.gap although the stream lost nothing: {ev:?}",
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
                        let _ = self.progress.send(seq);
                    }
                    None if c.is_closed() => {
                        rep.ended_by_relay += 1;
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
        }
        rep
    }
}

/// A group of [`ResumingReader`]s, one per pattern set, each on its own task.
pub struct Readers {
    stops: Vec<watch::Sender<Option<u64>>>,
    progress: Vec<watch::Receiver<u64>>,
    patterns: Vec<Vec<&'static str>>,
    tasks: Vec<tokio::task::JoinHandle<ReaderReport>>,
}

impl Readers {
    pub fn spawn(sets: &[Vec<&'static str>], config: &ReaderConfig) -> Readers {
        let mut r = Readers {
            stops: Vec::new(),
            progress: Vec::new(),
            patterns: sets.to_vec(),
            tasks: Vec::new(),
        };
        for (i, patterns) in sets.iter().enumerate() {
            let (stop_tx, stop_at) = watch::channel(None);
            let (progress, progress_rx) = watch::channel(0);
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
                hang_ups,
                deadline: config.deadline,
                stop_at,
                progress,
            };
            r.stops.push(stop_tx);
            r.progress.push(progress_rx);
            r.tasks.push(tokio::spawn(reader.run()));
        }
        r
    }

    /// Waits until every reader has received an event with id >= `seq`.
    pub async fn wait_all_reached(&mut self, seq: u64, limit: Duration) {
        for (i, p) in self.progress.iter_mut().enumerate() {
            let ok = tokio::time::timeout(limit, p.wait_for(|&s| s >= seq))
                .await
                .is_ok_and(|r| r.is_ok());
            assert!(
                ok,
                "reader {i} did not receive id {seq} within {limit:?} (at {})",
                *p.borrow()
            );
        }
    }

    /// Tells each reader where the events of `stored` on its subjects end,
    /// joins them and returns their reports (with those events as
    /// `expected`), in spawn order. Asserting is the caller's.
    pub async fn finish(self, stored: &[StoredEvent]) -> Vec<ReaderReport> {
        let expected: Vec<Vec<(u64, String)>> = self
            .patterns
            .iter()
            .map(|p| events_matching(p, stored))
            .collect();
        for (tx, want) in self.stops.iter().zip(&expected) {
            let _ = tx.send(Some(want.last().map_or(0, |(s, _)| *s)));
        }
        let mut reports = Vec::new();
        // `self.stops` stays alive until every reader is joined: a dropped
        // sender would make `changed()` return at once, forever.
        for (t, expected) in self.tasks.into_iter().zip(expected) {
            let mut rep = join_task("reader", t).await;
            eprintln!(
                "{}: {} events, {} connections, {} ended by the relay, {} refused attempts (last: {:?}), {} immediate hang-ups",
                rep.name,
                rep.events.len(),
                rep.connections,
                rep.ended_by_relay,
                rep.refused,
                rep.last_refusal,
                rep.immediate_hang_ups
            );
            rep.expected = expected;
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
