//! The chaos run: a 3-node JetStream cluster with an R3 stream, two relay
//! processes sharing one port (`--reuse-port`), 40 clients on overlapping
//! wildcards that hang up at random and resume by `Last-Event-ID`, 2,000
//! clients each on a subject of its own, and a paced publisher whose
//! publishes are acknowledged (retried with the same `Nats-Msg-Id`, so each
//! is stored once), while faults of every kind hit at random: a node
//! SIGKILLed and restarted, a node SIGSTOPped and SIGCONTed, a relay
//! SIGKILLed or SIGTERMed (drained) and started again on the shared port,
//! the stream leader stepping down; and once each, every node restarted at
//! once with the 2,000 subscriptions held, and the stream deleted and
//! created again. At the end every client must hold exactly the events
//! stored on its subjects, in order, once: across the recreation, the old
//! stream's, a `relay.reset`, then the new stream's from sequence 1. One
//! summary line reports the run.
//!
//! Not part of `cargo test` (ignored); RELIABILITY.md has a run's figures:
//!
//! ```sh
//! CHAOS_SECONDS=600 cargo test --release --test it -- --ignored chaos --nocapture
//! ```
//!
//! `CHAOS_SECONDS` (default 60) is how long faults go on, `CHAOS_RATE`
//! the acknowledged publishes a second (default 25); `CHAOS_SEED`
//! picks the seed (printed at the start) of the faults, their timing, the
//! published subjects and the clients' hang-ups. Faults come one at a time,
//! each recovered from (the cluster's replicas current again, a relay ready
//! again) before the next, so that one seed replays the same sequence;
//! clients and the publisher never stop.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::{Mutex, watch};
use tokio::time::Instant;

/// Clients on a subject of their own (the per-user notification shape).
const USERS: usize = 2000;
/// Acknowledged publishes a second, unless `CHAOS_RATE` says otherwise.
const RATE: u64 = 25;
/// Bound of every recovery step (a restarted node catching up, a drain, a
/// stream read back).
const SETTLE: Duration = Duration::from_secs(60);
/// The subjects the 40 wildcard clients read; every fourth publish goes to
/// a user's subject (`events.u.<n>`) instead.
const SUBJECTS: &[&str] = &[
    "events.c.a.1",
    "events.c.a.2",
    "events.c.a.3",
    "events.c.b.1",
    "events.c.b.2",
    "events.c.b.3",
    "events.c.c.1",
    "events.c.c.2",
    "events.c.c.3",
    "events.c.d.1",
    "events.c.d.2",
    "events.c.d.3",
];

/// Twenty pattern sets that overlap (one event reaches a client through
/// several of its patterns), two clients on each: single literals,
/// single wildcards, several patterns, the whole stream.
fn wildcard_sets() -> Vec<Vec<&'static str>> {
    let sets: [&[&'static str]; 20] = [
        &["events.c.>"],
        &["events.c.a.*"],
        &["events.c.*.1"],
        &["events.c.b.2"],
        &["events.c.a.*", "events.c.*.1"],
        &["events.c.>", "events.c.a.1"],
        &["events.c.c.*", "events.c.d.3"],
        &["events.c.*.2"],
        &["events.>"],
        &["events.c.d.*", "events.c.*.3", "events.c.a.2"],
        &["events.c.b.*"],
        &["events.c.*.*"],
        &["events.c.a.1"],
        &["events.c.>", "events.u.>"],
        &["events.c.c.1", "events.c.c.2"],
        &["events.u.>"],
        &["events.c.d.>"],
        &["events.*.a.1"],
        &["events.c.*.1", "events.c.*.2"],
        &["events.c.b.>", "events.c.>"],
    ];
    sets.iter().chain(sets.iter()).map(|s| s.to_vec()).collect()
}

/// `events.u.<n>` for each user, leaked once for the readers' patterns.
fn user_subjects() -> &'static [&'static str] {
    Box::leak(
        (0..USERS)
            .map(|i| &*Box::leak(format!("events.u.{i}").into_boxed_str()))
            .collect::<Vec<&'static str>>()
            .into_boxed_slice(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    NodeKill,
    NodeStop,
    RelayKill,
    RelayTerm,
    LeaderStepDown,
    NatsRestart,
    StreamRecreate,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::NodeKill => "node-sigkill",
            Fault::NodeStop => "node-sigstop",
            Fault::RelayKill => "relay-sigkill",
            Fault::RelayTerm => "relay-sigterm",
            Fault::LeaderStepDown => "leader-stepdown",
            Fault::NatsRestart => "nats-restart",
            Fault::StreamRecreate => "stream-recreate",
        }
    }
}

/// An acknowledged publish, with the stream epoch it went to (how many
/// times the stream had been recreated).
struct Acked {
    epoch: usize,
    seq: u64,
    subject: String,
    payload: String,
}

/// Publishing: the gate holds the current epoch; the publisher holds it
/// while an event is being published (with its retries), so the stream is
/// recreated between two acknowledged publishes, never under one.
#[derive(Clone)]
struct Publisher {
    js: async_nats::jetstream::Context,
    gate: Arc<Mutex<usize>>,
    seed: u64,
    rate: u64,
    deadline: Instant,
}

impl Publisher {
    /// Publishes event `i` on `subject` with `Nats-Msg-Id: <seed>-<i>`
    /// until acknowledged (each attempt 2 s, paced retries, bounded by the
    /// deadline); returns it and the retries it took.
    async fn publish(&self, i: usize, subject: &str) -> (Acked, usize) {
        let epoch = self.gate.lock().await;
        let payload = format!("{i}:{subject}");
        let id = format!("{}-{i}", self.seed);
        let mut retries = 0;
        let ack = loop {
            let sent = js_publish_once_with_id(
                &self.js,
                subject,
                &id,
                Bytes::from(payload.clone()),
                Duration::from_secs(2),
            )
            .await;
            match sent {
                Ok(ack) => break ack,
                Err(e) => {
                    retries += 1;
                    assert!(
                        Instant::now() < self.deadline,
                        "publish #{i} ({subject}) never acknowledged; last error: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let acked = Acked {
            epoch: *epoch,
            seq: ack.sequence,
            subject: subject.to_string(),
            payload,
        };
        (acked, retries)
    }

    /// One event on every subject (so every client has one to wait for),
    /// then `rate` a second until `stop`, each on a subject of
    /// [`SUBJECTS`] or, one in four, a random user's.
    async fn run(self, mut stop: watch::Receiver<bool>) -> (Vec<Acked>, usize) {
        let users = user_subjects();
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x5eed);
        let mut acked = Vec::new();
        let mut retries = 0;
        let mut i = 0;
        for subject in SUBJECTS.iter().chain(users) {
            let (a, r) = self.publish(i, subject).await;
            acked.push(a);
            retries += r;
            i += 1;
        }
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / self.rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*stop.borrow() {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => break,
            }
            let subject = if i % 4 == 3 {
                users[rng.random_range(0..USERS)]
            } else {
                SUBJECTS[rng.random_range(0..SUBJECTS.len())]
            };
            let (a, r) = self.publish(i, subject).await;
            acked.push(a);
            retries += r;
            i += 1;
        }
        (acked, retries)
    }
}

/// The relay's flags: the shared port with SO_REUSEPORT, every node's URL,
/// the stream made by the test (no `--create-stream`), one shard.
fn relay_args(addr: &str, urls: &str) -> Vec<String> {
    [
        "serve",
        "--listen",
        addr,
        "--reuse-port",
        "--nats-url",
        urls,
        "--jwt-secret",
        SECRET,
        "--workers",
        "1",
        "--heartbeat",
        "1",
        "--drain-seconds",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Spawns a relay on `port` and waits (20 s) until it has loaded the
/// stream: `/readyz` on the shared port may be answered by the other relay.
async fn start_relay(port: u16, urls: &str) -> Relay {
    // Each resume's seam is logged, so that a failed run's kept logs say
    // where a client's replay ended and its live frames began.
    let envs = [("RUST_LOG", "info,sse_relay::resume=debug")];
    let mut r = Relay::spawn_exact(&relay_args(&format!("127.0.0.1:{port}"), urls), &envs, port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if r.log().contains("stream ready") {
            return r;
        }
        if let Some(st) = r.wait_exit(Duration::ZERO).await {
            panic!("relay exited with {st}:\n{}", tail(&r.log(), 6000));
        }
        assert!(
            Instant::now() < deadline,
            "relay did not load the stream within 20 s:\n{}",
            tail(&r.log(), 6000)
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Everything the faults act on.
struct Chaos {
    cluster: NatsCluster,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    urls: String,
    port: u16,
    relays: Vec<Relay>,
    rng: StdRng,
    t0: Instant,
    gate: Arc<Mutex<usize>>,
    /// What each recreated stream held when it was deleted, oldest first.
    old_streams: Vec<Vec<StoredEvent>>,
    faults: BTreeMap<&'static str, usize>,
    seed: u64,
    /// The logs of relays replaced after a kill or a drain, oldest first.
    old_relay_logs: Vec<String>,
}

impl Drop for Chaos {
    /// A failed run keeps every relay's whole log (the relays' own
    /// directories go with them) and says where.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("sse-relay-chaos-{}", self.seed));
        let _ = std::fs::create_dir_all(&dir);
        let live = self.relays.iter().map(|r| r.log());
        for (n, log) in self.old_relay_logs.iter().cloned().chain(live).enumerate() {
            let _ = std::fs::write(dir.join(format!("relay-{n:03}.log")), log);
        }
        for node in &self.cluster.nodes {
            let _ = std::fs::write(dir.join(format!("{}.log", node.name)), node.log());
        }
        eprintln!("chaos: relay and node logs kept in {}", dir.display());
    }
}

impl Chaos {
    fn note(&self, what: &str) {
        eprintln!("chaos {:>7.1}s {what}", self.t0.elapsed().as_secs_f64());
    }

    fn ms(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.rng.random_range(range))
    }

    async fn settle(&self) {
        self.cluster
            .wait_stream_current(&self.js, "EVENTS", SETTLE)
            .await;
    }

    async fn restart_node(&mut self, i: usize) {
        if let Err(e) = self.cluster.restart(i).await {
            panic!("node {} did not restart: {e}", self.cluster.nodes[i].name);
        }
    }

    async fn restart_relay(&mut self, k: usize) {
        let new = start_relay(self.port, &self.urls).await;
        let old = std::mem::replace(&mut self.relays[k], new);
        self.old_relay_logs.push(old.log());
    }

    /// Applies `fault` and waits until the system has recovered from it.
    async fn apply(&mut self, fault: Fault, readers: &mut [&mut Readers]) {
        *self.faults.entry(fault.name()).or_default() += 1;
        let nodes = self.cluster.nodes.len();
        match fault {
            Fault::NodeKill => {
                let i = self.rng.random_range(0..nodes);
                let down = self.ms(1000..5000);
                self.note(&format!(
                    "SIGKILL node {} for {down:?}",
                    self.cluster.nodes[i].name
                ));
                self.cluster.kill(i);
                tokio::time::sleep(down).await;
                self.restart_node(i).await;
                self.settle().await;
            }
            Fault::NodeStop => {
                let i = self.rng.random_range(0..nodes);
                let down = self.ms(1000..6000);
                self.note(&format!(
                    "SIGSTOP node {} for {down:?}",
                    self.cluster.nodes[i].name
                ));
                self.cluster.pause(i);
                tokio::time::sleep(down).await;
                self.cluster.resume(i);
                self.settle().await;
            }
            Fault::RelayKill => {
                let k = self.rng.random_range(0..self.relays.len());
                let down = self.ms(0..2000);
                self.note(&format!("SIGKILL relay {k} for {down:?}"));
                self.relays[k].kill();
                tokio::time::sleep(down).await;
                self.restart_relay(k).await;
            }
            Fault::RelayTerm => {
                let k = self.rng.random_range(0..self.relays.len());
                self.note(&format!("SIGTERM relay {k} (drain), then start it again"));
                self.relays[k].sigterm();
                let limit = Duration::from_secs(15);
                match self.relays[k].wait_exit(limit).await {
                    Some(st) => assert!(
                        st.success(),
                        "relay {k} exited with {st} after SIGTERM:\n{}",
                        tail(&self.relays[k].log(), 6000)
                    ),
                    None => panic!(
                        "relay {k} did not drain within {limit:?} of SIGTERM:\n{}",
                        tail(&self.relays[k].log(), 6000)
                    ),
                }
                self.restart_relay(k).await;
            }
            Fault::LeaderStepDown => {
                self.note("stream leader steps down");
                if let Err(e) = self
                    .cluster
                    .step_down_stream_leader(&self.client, "EVENTS", None)
                    .await
                {
                    self.note(&format!("  step-down refused: {e}"));
                }
                self.settle().await;
            }
            Fault::NatsRestart => {
                let down = self.ms(1000..3000);
                self.note(&format!(
                    "SIGKILL every node for {down:?}, {USERS} user subscriptions held"
                ));
                for i in 0..nodes {
                    self.cluster.kill(i);
                }
                tokio::time::sleep(down).await;
                for i in 0..nodes {
                    self.restart_node(i).await;
                }
                self.cluster.wait_meta_leader(SETTLE).await;
                self.settle().await;
            }
            Fault::StreamRecreate => {
                let gate = self.gate.clone();
                let mut epoch = gate.lock().await;
                let stored = stream_contents(&self.js, "EVENTS", SETTLE).await;
                // Deleting a stream deletes what it holds: the clients must
                // have had it all first for their check to be exact.
                for r in readers.iter_mut() {
                    r.wait_each_reached(*epoch, &stored, SETTLE).await;
                }
                self.note(&format!(
                    "delete and create the stream again (it held {} events)",
                    stored.len()
                ));
                let deadline = Instant::now() + SETTLE;
                loop {
                    let deleted = tokio::time::timeout(
                        Duration::from_secs(5),
                        self.js.delete_stream("EVENTS"),
                    )
                    .await;
                    let why = match deleted {
                        Ok(Ok(_)) => break,
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "timed out".to_string(),
                    };
                    assert!(
                        Instant::now() < deadline,
                        "stream not deleted within {SETTLE:?}: {why}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let mut cfg = events_stream_config();
                cfg.num_replicas = 3;
                self.cluster.create_stream(&self.js, cfg, SETTLE).await;
                self.old_streams.push(stored);
                *epoch += 1;
                drop(epoch);
                self.settle().await;
            }
        }
    }

    /// A fault other than the two that run once.
    fn random_fault(&mut self) -> Fault {
        match self.rng.random_range(0..10u32) {
            0..=1 => Fault::NodeKill,
            2..=3 => Fault::NodeStop,
            4..=5 => Fault::RelayKill,
            6..=7 => Fault::RelayTerm,
            _ => Fault::LeaderStepDown,
        }
    }
}

/// Counts over every reader: events delivered, duplicates (an id received
/// again in the same epoch), losses (an expected id not received),
/// reconnects (streams after the first), hang-ups by the client.
#[derive(Default)]
struct Tally {
    delivered: usize,
    duplicates: usize,
    losses: usize,
    reconnects: usize,
    client_drops: usize,
}

impl Tally {
    fn add(&mut self, r: &ReaderReport) {
        let keyed = |events: &[(u64, String)], resets: &[usize]| -> Vec<(usize, u64)> {
            events
                .iter()
                .enumerate()
                .map(|(n, (id, _))| (resets.iter().filter(|&&s| s <= n).count(), *id))
                .collect()
        };
        let got = keyed(&r.events, &r.resets);
        let mut seen = HashSet::new();
        self.duplicates += got.iter().filter(|k| !seen.insert(**k)).count();
        self.losses += keyed(&r.expected, &r.expected_resets)
            .iter()
            .filter(|k| !seen.contains(*k))
            .count();
        self.delivered += r.events.len();
        self.reconnects += r.connections.saturating_sub(1);
        self.client_drops += r.hang_ups + r.immediate_hang_ups;
    }
}

/// The first expected `(epoch, id)` the reader did not get.
fn first_missing(r: &ReaderReport) -> Option<(usize, u64)> {
    let keyed = |events: &[(u64, String)], resets: &[usize]| -> Vec<(usize, u64)> {
        events
            .iter()
            .enumerate()
            .map(|(n, (id, _))| (resets.iter().filter(|&&s| s <= n).count(), *id))
            .collect()
    };
    let got: HashSet<(usize, u64)> = keyed(&r.events, &r.resets).into_iter().collect();
    keyed(&r.expected, &r.expected_resets)
        .into_iter()
        .find(|k| !got.contains(k))
}

/// Every acknowledged publish is in the stream it went to, with its
/// payload; a failure here is NATS losing an acked message, not the relay.
fn assert_acked_stored(acked: &[Acked], streams: &[Vec<StoredEvent>]) {
    for (e, stored) in streams.iter().enumerate() {
        let by_seq: BTreeMap<u64, &StoredEvent> = stored.iter().map(|s| (s.seq, s)).collect();
        for a in acked.iter().filter(|a| a.epoch == e) {
            let found = by_seq.get(&a.seq);
            assert!(
                found.is_some_and(|s| s.payload == a.payload && s.subject == a.subject),
                "NATS (not the relay): acked {:?} (stream epoch {e}, seq {}) is stored as {found:?}",
                a.payload,
                a.seq
            );
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run with --ignored chaos (see RELIABILITY.md)"]
async fn chaos_faults_of_every_kind_lose_and_duplicate_nothing() {
    let secs = env_u64("CHAOS_SECONDS").unwrap_or(60);
    let seed = env_u64("CHAOS_SEED").unwrap_or_else(|| (now_secs_f64() * 1e6) as u64 % 1_000_000);
    eprintln!("chaos: seed {seed}, {secs} s of faults (CHAOS_SEED={seed} CHAOS_SECONDS={secs})");
    let faults_for = Duration::from_secs(secs);
    let limit = faults_for + Duration::from_secs(600);
    let rate = env_u64("CHAOS_RATE").unwrap_or(RATE).max(1);
    within(limit, "chaos", chaos_run(seed, rate, faults_for, limit)).await
}

async fn chaos_run(seed: u64, rate: u64, faults_for: Duration, limit: Duration) {
    let t0 = Instant::now();
    // The publisher's bound: before `within` cuts the test.
    let deadline = t0 + limit - Duration::from_secs(60);
    // The clients': setup, the faults (the last may run over), the final
    // read-back and a margin to get the last events; a client still short
    // of its events then fails the run.
    let readers_deadline = t0 + faults_for + Duration::from_secs(300);
    let cluster = NatsCluster::start(3).await;
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut cfg = events_stream_config();
    cfg.num_replicas = 3;
    cluster.create_stream(&js, cfg, SETTLE).await;
    let urls = cluster.url_list();
    let port = free_port();
    let relays = vec![
        start_relay(port, &urls).await,
        start_relay(port, &urls).await,
    ];

    let tok = token(SECRET, &["events.>"], (limit.as_secs() + 600) as i64);
    let (_addr_tx, addr) = watch::channel(format!("127.0.0.1:{port}"));
    let config = |hang_up_seed| ReaderConfig {
        auth: bearer(&tok),
        addr: addr.clone(),
        reconnect: true,
        hang_up_seed,
        deadline: readers_deadline,
    };
    let mut wildcards = Readers::spawn_across_resets(&wildcard_sets(), &config(Some(seed)));
    let user_sets: Vec<Vec<&'static str>> = user_subjects().iter().map(|s| vec![*s]).collect();
    let mut users = Readers::spawn_across_resets(&user_sets, &config(None)).quiet();

    let gate = Arc::new(Mutex::new(0usize));
    let publisher = Publisher {
        js: js.clone(),
        gate: gate.clone(),
        seed,
        rate,
        deadline,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let publishing = tokio::spawn(publisher.run(stop_rx));
    // Every client connected and streaming: the first event on each subject.
    wildcards.wait_all_reached(1, SETTLE).await;
    users.wait_all_reached(1, SETTLE).await;

    let mut chaos = Chaos {
        cluster,
        client,
        js,
        urls,
        port,
        relays,
        rng: StdRng::seed_from_u64(seed),
        t0,
        gate,
        old_streams: Vec::new(),
        faults: BTreeMap::new(),
        seed,
        old_relay_logs: Vec::new(),
    };
    chaos.note(&format!(
        "{} wildcard and {USERS} user clients streaming from 2 relays on port {port}; faults begin",
        wildcard_sets().len()
    ));
    let begin = Instant::now();
    let end = begin + faults_for;
    let at = |rng: &mut StdRng, from: f64, to: f64| {
        begin + faults_for.mul_f64(rng.random_range(from..to))
    };
    let restart_at = at(&mut chaos.rng, 0.2, 0.4);
    let recreate_at = at(&mut chaos.rng, 0.5, 0.7);
    let (mut restarted, mut recreated) = (false, false);
    while Instant::now() < end || !restarted || !recreated {
        let gap = chaos.ms(2000..6000);
        tokio::time::sleep(gap).await;
        let now = Instant::now();
        let fault = if !restarted && (now >= restart_at || now >= end) {
            restarted = true;
            Fault::NatsRestart
        } else if !recreated && (now >= recreate_at || now >= end) {
            recreated = true;
            Fault::StreamRecreate
        } else {
            chaos.random_fault()
        };
        chaos.apply(fault, &mut [&mut wildcards, &mut users]).await;
    }
    chaos.note("faults over; stopping the publisher");
    let _ = stop_tx.send(true);
    let (acked, retries) = join_task("publisher", publishing).await;
    chaos.settle().await;
    let mut streams = std::mem::take(&mut chaos.old_streams);
    streams.push(stream_contents(&chaos.js, "EVENTS", SETTLE).await);
    assert_acked_stored(&acked, &streams);
    let stored: usize = streams.iter().map(Vec::len).sum();
    chaos.note(&format!(
        "{} acked publishes ({retries} retries), {stored} stored over {} streams; waiting for the clients",
        acked.len(),
        streams.len()
    ));

    let mut reports = wildcards.finish_epochs(&streams).await;
    reports.extend(users.finish_epochs(&streams).await);
    let mut tally = Tally::default();
    for r in &reports {
        tally.add(r);
    }
    let mut faults = chaos.faults.clone();
    faults.insert("client-drop", tally.client_drops);
    let faults: Vec<String> = faults.iter().map(|(k, n)| format!("{k}={n}")).collect();
    eprintln!(
        "chaos summary: faults {}; published {} (stored {stored}, {retries} retries); delivered {}; duplicates {}; losses {}; reconnects {}; duration {:.0} s ({} s of faults); clients {}; {rate} publishes/s; seed {seed}",
        faults.join(" "),
        acked.len(),
        tally.delivered,
        tally.duplicates,
        tally.losses,
        tally.reconnects,
        t0.elapsed().as_secs_f64(),
        faults_for.as_secs(),
        reports.len(),
    );
    let failed: Vec<&ReaderReport> = reports
        .iter()
        .filter(|r| r.events != r.expected || r.resets != r.expected_resets)
        .collect();
    if let Some(first) = failed.first() {
        for r in failed.iter().take(20) {
            eprintln!(
                "chaos: {} got {} events ({} resets), expected {} ({} resets)",
                r.name,
                r.events.len(),
                r.resets.len(),
                r.expected.len(),
                r.expected_resets.len()
            );
            if let Some((epoch, id)) = first_missing(r) {
                eprintln!("  first missing: id {id} of epoch {epoch}; streams around it:");
                for s in r.streams_around(epoch, id) {
                    eprintln!("    {s}");
                }
            }
        }
        eprintln!(
            "chaos: {} of {} clients incomplete",
            failed.len(),
            reports.len()
        );
        first.assert_complete();
    }
}
