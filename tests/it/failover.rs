//! Failures underneath a stream: the relay killed and restarted, nats-server
//! killed and restarted, and nodes of a 3-node JetStream cluster killed
//! (the one the relay is connected to, the stream leader, and a node that is
//! both). Clients must end with every stored event exactly once, in order.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(10);

/// Tells the readers where the stored events end, joins them, and asserts
/// each got exactly the stored events on its subjects, in order, once. A
/// reader that missed some says how many of them were acknowledged
/// publishes and how many were stored without an ack.
async fn finish_readers(
    readers: Readers,
    stored: &[StoredEvent],
    acked: &[Acked],
) -> Vec<ReaderReport> {
    let acked_seqs: HashSet<u64> = acked.iter().map(|a| a.seq).collect();
    let reports = readers.finish(stored).await;
    for rep in &reports {
        if rep.events != rep.expected {
            let got: HashSet<u64> = rep.events.iter().map(|e| e.0).collect();
            let (missing_acked, missing_unacked): (Vec<u64>, Vec<u64>) = rep
                .expected
                .iter()
                .map(|e| e.0)
                .filter(|s| !got.contains(s))
                .partition(|s| acked_seqs.contains(s));
            eprintln!(
                "{}: missing {} acked events (first: {:?}) and {} stored but un-acked ones (first: {:?})",
                rep.name,
                missing_acked.len(),
                &missing_acked[..missing_acked.len().min(20)],
                missing_unacked.len(),
                &missing_unacked[..missing_unacked.len().min(20)]
            );
        }
        rep.assert_complete();
    }
    reports
}

// ---------------------------------------------------------------------------
// a publisher that retries until acknowledged
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Acked {
    seq: u64,
    subject: String,
    payload: String,
}

/// Publishes `n` events at about `per_sec` (one at a time, each awaited),
/// round-robin over `subjects`, each with `Nats-Msg-Id: <run>-<i>`; an
/// event that is not acknowledged (NATS down, leader election) is retried
/// with the same id until it is, so it is stored once. Reports progress
/// (events acked) on `progress`.
async fn publish_paced(
    js: async_nats::jetstream::Context,
    run: &'static str,
    n: usize,
    per_sec: u64,
    subjects: &'static [&'static str],
    progress: watch::Sender<usize>,
    deadline: Instant,
) -> (Vec<Acked>, usize) {
    let mut acked = Vec::with_capacity(n);
    let mut retries = 0usize;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_sec));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0..n {
        tick.tick().await;
        let subject = subjects[i % subjects.len()];
        let payload = format!("{i}:{subject}");
        let id = format!("{run}-{i}");
        // Bounded by the deadline: each attempt takes at most 2 s.
        let ack = loop {
            match js_publish_once_with_id(
                &js,
                subject,
                &id,
                Bytes::from(payload.clone()),
                Duration::from_secs(2),
            )
            .await
            {
                Ok(ack) => break ack,
                Err(e) => {
                    retries += 1;
                    assert!(
                        Instant::now() < deadline,
                        "publish #{i} ({subject}) never acknowledged before the deadline; last error: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        acked.push(Acked {
            seq: ack.sequence,
            subject: subject.to_string(),
            payload,
        });
        let _ = progress.send(i + 1);
    }
    (acked, retries)
}

/// Publishes `n` events as fast as acks come back, with up to `window`
/// un-acked publishes in flight, each with `Nats-Msg-Id: <run>-<i>`; an
/// event whose ack does not come (within 3 s of sending) or fails is
/// published again with the same id until acked.
async fn publish_burst(
    js: async_nats::jetstream::Context,
    run: &'static str,
    n: usize,
    window: usize,
    subjects: &'static [&'static str],
    progress: watch::Sender<usize>,
    deadline: Instant,
) -> (Vec<Acked>, usize) {
    use std::collections::VecDeque;
    use std::future::IntoFuture;
    let event = |i: usize| {
        let subject = subjects[i % subjects.len()];
        (subject, format!("{i}:{subject}"), format!("{run}-{i}"))
    };
    let mut acked = Vec::with_capacity(n);
    let mut retries = 0usize;
    let mut todo: VecDeque<usize> = (0..n).collect();
    let mut inflight = VecDeque::new();
    // Bounded by the deadline, asserted every round.
    while acked.len() < n {
        assert!(
            Instant::now() < deadline,
            "burst publisher: only {} of {n} acked before the deadline",
            acked.len()
        );
        let mut failed = false;
        while inflight.len() < window {
            let Some(i) = todo.pop_front() else { break };
            let (subject, payload, id) = event(i);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            let sent = tokio::time::timeout(
                Duration::from_secs(2),
                js.publish_with_headers(subject, headers, Bytes::from(payload)),
            )
            .await;
            match sent {
                Ok(Ok(f)) => inflight.push_back((i, Instant::now(), f)),
                _ => {
                    todo.push_front(i);
                    failed = true;
                    break;
                }
            }
        }
        if let Some((i, sent_at, f)) = inflight.pop_front() {
            match tokio::time::timeout_at(sent_at + Duration::from_secs(3), f.into_future()).await {
                Ok(Ok(ack)) => {
                    let (subject, payload, _) = event(i);
                    acked.push(Acked {
                        seq: ack.sequence,
                        subject: subject.to_string(),
                        payload,
                    });
                    let _ = progress.send(acked.len());
                }
                _ => {
                    retries += 1;
                    todo.push_back(i);
                    failed = true;
                }
            }
        }
        if failed {
            // No leader yet or the node is gone: pace the retries.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    acked.sort_by_key(|a| a.seq);
    (acked, retries)
}

/// Fire-and-forget core NATS publishes (the stream stores them without
/// acks, as `nats pub` does) at about 10,000/s (100 every 10 ms, each
/// hundred flushed), `n` in all: the load under which a dying stream leader
/// leaves messages stored but never republished. Whatever the stream stored
/// is what the clients must get; publishes lost in the failover do not
/// matter. Reports progress.
async fn core_flood(
    client: async_nats::Client,
    n: usize,
    subjects: &'static [&'static str],
    progress: watch::Sender<usize>,
    deadline: Instant,
) -> usize {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = 0;
    while i < n && Instant::now() < deadline {
        tick.tick().await;
        for _ in 0..100.min(n - i) {
            let subject = subjects[i % subjects.len()];
            let _ = client
                .publish(subject, Bytes::from(format!("core{i}:{subject}")))
                .await;
            i += 1;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
        let _ = progress.send(i);
    }
    i
}

/// Asserts every acknowledged publish is in the stream, with its payload,
/// exactly once (the `Nats-Msg-Id` dedup); a failure here is NATS losing or
/// duplicating an acked message, not the relay.
fn assert_acked_stored(acked: &[Acked], stored: &[StoredEvent]) {
    let by_seq: HashMap<u64, &StoredEvent> = stored.iter().map(|e| (e.seq, e)).collect();
    for a in acked {
        match by_seq.get(&a.seq) {
            Some(e) => assert!(
                e.payload == a.payload && e.subject == a.subject,
                "NATS (not the relay): acked seq {} holds {:?} on {}, expected {:?} on {}",
                a.seq,
                e.payload,
                e.subject,
                a.payload,
                a.subject
            ),
            None => panic!(
                "NATS (not the relay): acked publish {:?} (seq {}) is not in the stream",
                a.payload, a.seq
            ),
        }
    }
    let mut seen = HashSet::new();
    let dups: Vec<&str> = stored
        .iter()
        .filter(|e| !seen.insert(e.payload.as_str()))
        .map(|e| e.payload.as_str())
        .take(10)
        .collect();
    if !dups.is_empty() {
        // The relay must still deliver each stored message once; note it.
        eprintln!("NOTE: the stream stores some payloads twice despite Nats-Msg-Id: {dups:?}");
    }
}

async fn wait_progress(rx: &mut watch::Receiver<usize>, at_least: usize, limit: Duration) {
    let ok = tokio::time::timeout(limit, rx.wait_for(|&n| n >= at_least))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        ok,
        "publisher did not reach {at_least} acked events within {limit:?} (at {})",
        *rx.borrow()
    );
}

// ---------------------------------------------------------------------------
// single server
// ---------------------------------------------------------------------------

/// The relay is SIGKILLed mid-stream and a new relay process takes over
/// (on a new port) while a publisher keeps publishing (~200/s for 3 s);
/// clients reconnect with their last id and end with every acked event
/// exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_sigkill_and_restart_clients_resume_without_loss() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(45),
        "relay_sigkill_and_restart_clients_resume_without_loss",
        async {
            let deadline = Instant::now() + Duration::from_secs(35);
            let nats = NatsServer::start().await;
            let mut relay = Relay::start(&nats.url(), &["--heartbeat", "1"], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let tok = token(SECRET, &["events.f.>"], 300);
            let auth = bearer(&tok);
            let (addr_tx, addr_rx) = watch::channel(relay.addr().to_string());
            let mut readers = Readers::spawn(
                &[
                    vec!["events.f.>"],
                    vec!["events.f.a.*"],
                    vec!["events.f.b.x", "events.f.c.*"],
                ],
                &ReaderConfig {
                    auth: auth.clone(),
                    addr: addr_rx.clone(),
                    reconnect: true,
                    hang_up_seed: None,
                    deadline,
                },
            );

            const SUBJECTS: &[&str] = &[
                "events.f.a.1",
                "events.f.b.x",
                "events.f.c.2",
                "events.f.a.2",
                "events.f.d",
            ];
            let (prog_tx, mut prog) = watch::channel(0usize);
            let publisher = tokio::spawn(publish_paced(
                js.clone(),
                "relay-kill",
                600,
                200,
                SUBJECTS,
                prog_tx,
                deadline,
            ));

            wait_progress(&mut prog, 200, WAIT).await;
            // Every reader is streaming from the first relay.
            readers.wait_all_reached(1, WAIT).await;
            relay.kill();
            eprintln!("relay killed after {} acked events", *prog.borrow());
            let relay2 = Relay::start(&nats.url(), &["--heartbeat", "1"], &[]).await;
            addr_tx.send(relay2.addr().to_string()).unwrap();

            let (acked, retries) = join_task("publisher", publisher).await;
            eprintln!("publisher: {} acked, {retries} retries", acked.len());
            let stored = stream_contents(&js, "EVENTS", WAIT).await;
            assert_acked_stored(&acked, &stored);
            let reports = finish_readers(readers, &stored, &acked).await;
            for r in &reports {
                assert!(
                    r.connections >= 2,
                    "{}: its first relay was killed, so it must have reconnected (connections: {})",
                    r.name,
                    r.connections
                );
            }
        },
    )
    .await
}

/// nats-server is SIGKILLed and restarted on the same store and port while
/// a publisher goes on (`n` events at `per_sec` over `subjects`, retried
/// until acked) and readers on `sets` stay connected: /readyz is 503 while
/// it is down and 200 after, and every event JetStream stored (each acked
/// publish, once) reaches the readers in order, exactly once, on their
/// first and only connection.
/// `max_requests`: the most JetStream requests the relay may make from just
/// before the kill to the end (the catch-up's cost).
async fn nats_restart(
    root: &'static str,
    sets: &[Vec<&'static str>],
    subjects: &'static [&'static str],
    n: usize,
    per_sec: u64,
    max_requests: Option<f64>,
) {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut nats = NatsServer::start().await;
    let relay = Relay::start(&nats.url(), &["--heartbeat", "1"], &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let tok = token(SECRET, &[&format!("{root}.>")], 300);
    let auth = bearer(&tok);
    let (_addr_tx, addr_rx) = watch::channel(relay.addr().to_string());
    let mut readers = Readers::spawn(
        sets,
        &ReaderConfig {
            auth: auth.clone(),
            addr: addr_rx.clone(),
            reconnect: false,
            hang_up_seed: None,
            deadline,
        },
    );

    let (prog_tx, mut prog) = watch::channel(0usize);
    let publisher = tokio::spawn(publish_paced(
        js.clone(),
        root,
        n,
        per_sec,
        subjects,
        prog_tx,
        deadline,
    ));

    wait_progress(&mut prog, per_sec as usize, WAIT).await;
    readers.wait_all_reached(1, WAIT).await;
    let requests_before = relay
        .metric("sse_relay_jetstream_requests_total", &[])
        .await;
    nats.stop(); // SIGKILL
    let killed_at = *prog.borrow();
    wait_until(WAIT, "/readyz to be 503 while NATS is down", || async {
        relay.get("/readyz", &[]).await.status == 503
    })
    .await;
    nats.restart().await; // same ports, same store
    wait_until(
        Duration::from_secs(20),
        "/readyz to be 200 again after NATS restarted",
        || async { relay.get("/readyz", &[]).await.status == 200 },
    )
    .await;
    eprintln!("NATS killed after {killed_at} acked events; relay ready again");
    assert_eq!(
        relay.metric("sse_relay_nats_reconnects_total", &[]).await,
        1.0,
        "one reconnect counted"
    );
    // One line per state change, naming the server, however many attempts
    // the outage took.
    let log = relay.log();
    let lines = |what: &str| log.lines().filter(|l| l.contains(what)).collect::<Vec<_>>();
    let (lost, back) = (lines("nats disconnected"), lines("nats connected"));
    assert_eq!((lost.len(), back.len()), (1, 2), "state changes:\n{log}");
    let port = nats.url().rsplit(':').next().unwrap().to_string();
    for line in lost.iter().chain(&back) {
        assert!(
            line.contains(&format!(":{port}")),
            "names the server: {line}"
        );
    }

    let (acked, retries) = join_task("publisher", publisher).await;
    eprintln!("publisher: {} acked, {retries} retries", acked.len());
    if max_requests.is_some() {
        // Every read's consumer is deleted when the read ends, or, when
        // the delete cannot reach NATS (a read cut by the kill), expires
        // after 10 s idle; none is left to count against the server's
        // limit. Checked before this test reads the stream itself.
        let gone = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                let mut s = js.get_stream("EVENTS").await.expect("stream");
                if s.info().await.expect("stream info").state.consumer_count == 0 {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        if gone.is_err() {
            use futures_util::StreamExt;
            let s = js.get_stream("EVENTS").await.expect("stream");
            let mut list = s.consumers();
            let mut left = Vec::new();
            while let Some(Ok(c)) = list.next().await {
                left.push(format!(
                    "{} {:?} {:?} delivered {:?} pending {}",
                    c.name,
                    c.config.filter_subject,
                    c.config.filter_subjects,
                    c.delivered,
                    c.num_pending
                ));
            }
            panic!("consumers left after 15 s: {left:#?}");
        }
    }
    let stored = stream_contents(&js, "EVENTS", WAIT).await;
    assert_acked_stored(&acked, &stored);
    let reports = finish_readers(readers, &stored, &acked).await;
    if let Some(max) = max_requests {
        let made = relay
            .metric("sse_relay_jetstream_requests_total", &[])
            .await
            - requests_before;
        assert!(
            made <= max,
            "the catch-up of {} subscriptions made {made} JetStream requests (at most {max})",
            sets.len()
        );
    }
    for r in &reports {
        assert_eq!(
            (r.connections, r.ended_by_relay),
            (1, 0),
            "{}: the SSE connection must stay open through the NATS restart (connections, ended streams)",
            r.name
        );
    }
}

/// Clients on overlapping patterns stay connected through a nats-server
/// SIGKILL and restart and miss nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_sigkill_and_restart_clients_stay_connected_and_miss_nothing() {
    let _load = load_group(module_path!()).await;
    const SUBJECTS: &[&str] = &[
        "events.n.a.1",
        "events.n.b.x",
        "events.n.c.2",
        "events.n.a.2",
        "events.n.d",
    ];
    within(
        Duration::from_secs(50),
        "nats_sigkill_and_restart_clients_stay_connected_and_miss_nothing",
        nats_restart(
            "events.n",
            &[
                vec!["events.n.>"],
                vec!["events.n.a.*"],
                vec!["events.n.b.x", "events.n.c.*"],
            ],
            SUBJECTS,
            800,
            200,
            None,
        ),
    )
    .await
}

/// nats-server SIGKILLed and restarted under 24 clients each on its own
/// subject (and one on all): after the restart every shared subscription
/// catches up (several are read at once) and no client misses anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_catches_up_many_subscriptions() {
    let _load = load_group(module_path!()).await;
    let subjects: &'static [&'static str] = Box::leak(
        (0..24)
            .map(|i| &*Box::leak(format!("events.p.{i}").into_boxed_str()))
            .collect::<Vec<&'static str>>()
            .into_boxed_slice(),
    );
    let mut sets: Vec<Vec<&'static str>> = subjects.iter().map(|s| vec![*s]).collect();
    sets.push(vec!["events.p.>"]);
    within(
        Duration::from_secs(50),
        "nats_restart_catches_up_many_subscriptions",
        nats_restart("events.p", &sets, subjects, 960, 240, None),
    )
    .await
}

/// 2,000 clients, each on a subject of its own (the per-user notification
/// shape), through a nats-server SIGKILL and restart: one catch-up read for
/// all of them, every client gets its events exactly once, and the relay
/// makes at most 20 JetStream requests for it (one consumer, deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_with_2000_subscriptions_costs_a_few_requests() {
    let _load = load_group(module_path!()).await;
    let subjects: &'static [&'static str] = Box::leak(
        (0..2000)
            .map(|i| &*Box::leak(format!("events.u.{i}").into_boxed_str()))
            .collect::<Vec<&'static str>>()
            .into_boxed_slice(),
    );
    let sets: Vec<Vec<&'static str>> = subjects.iter().map(|s| vec![*s]).collect();
    within(
        Duration::from_secs(90),
        "nats_restart_with_2000_subscriptions_costs_a_few_requests",
        nats_restart("events.u", &sets, subjects, 8000, 2000, Some(20.0)),
    )
    .await
}

// ---------------------------------------------------------------------------
// 3-node cluster
// ---------------------------------------------------------------------------

/// The relay's connection names on NATS: requests, and the live feed.
const RELAY_CONN: &str = "sse-relay/0";
const RELAY_FEED: &str = "sse-relay/0/live";

struct ClusterSetup {
    cluster: NatsCluster,
    client: async_nats::Client,
    js: async_nats::jetstream::Context,
    relay: Relay,
}

/// A 3-node cluster, an R3 `EVENTS` stream (republish `events.>` ->
/// `relay.events.>`), and a relay given all three URLs.
async fn cluster_setup() -> ClusterSetup {
    let cluster = NatsCluster::start(3).await;
    let client = cluster.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut cfg = events_stream_config();
    cfg.num_replicas = 3;
    cluster
        .create_stream(&js, cfg, Duration::from_secs(20))
        .await;
    let relay = Relay::start_existing_stream(&cluster.url_list(), &["--heartbeat", "1"]).await;
    ClusterSetup {
        cluster,
        client,
        js,
        relay,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Victim {
    /// The node the relay is connected to (not the stream leader).
    RelayNode,
    /// The same node frozen (SIGSTOP) for good instead of killed: its
    /// sockets stay open and answer nothing, so only the relay's pings
    /// can tell that it is gone.
    FrozenRelayNode,
    /// The stream leader (not the node the relay is connected to).
    Leader,
    /// One node that is both.
    Both,
}

const CLUSTER_SUBJECTS: &[&str] = &[
    "events.k.a.1",
    "events.k.b.x",
    "events.k.c.2",
    "events.k.a.2",
    "events.k.d",
];

/// Kills `victim` while events are being published; clients must miss
/// nothing (staying connected, or resuming by Last-Event-ID if their stream
/// ends).
#[derive(Clone, Copy, Debug)]
enum Load {
    /// One publish at a time, about `per_sec` a second.
    Paced { n: usize, per_sec: u64 },
    /// As fast as acks come back, `window` in flight.
    Burst { n: usize, window: usize },
}

/// Subscribes on `relay.events.>` through the node at `url` and collects
/// the `Nats-Sequence` of every republished event until told to stop.
async fn spawn_witness(url: &str) -> (watch::Sender<bool>, tokio::task::JoinHandle<HashSet<u64>>) {
    use futures_util::StreamExt;
    let client = within(WAIT, "witness connect", async_nats::connect(url))
        .await
        .expect("witness connects");
    let mut sub = client
        .subscribe("relay.events.>")
        .await
        .expect("witness subscribes");
    within(WAIT, "witness flush", client.flush())
        .await
        .expect("witness flush");
    let (tx, mut stop) = watch::channel(false);
    let task = tokio::spawn(async move {
        let _client = client;
        let mut seen = HashSet::new();
        loop {
            tokio::select! {
                m = sub.next() => match m {
                    Some(m) => {
                        if let Some(q) = m
                            .headers
                            .as_ref()
                            .and_then(|h| h.get("Nats-Sequence"))
                            .and_then(|v| v.as_str().parse::<u64>().ok())
                        {
                            seen.insert(q);
                        }
                    }
                    None => return seen,
                },
                _ = stop.changed() => return seen,
            }
        }
    });
    (tx, task)
}

/// Kills `victim` once `kill_after` publishes are acked; with
/// `flood = Some(n)`, n core publishes run alongside, started 5,000 ahead
/// of the acked publisher so that the flood goes on through the kill.
async fn cluster_node_loss(victim: Victim, load: Load, kill_after: usize, flood: Option<usize>) {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(45);
    let mut s = cluster_setup().await;
    let relay_node = s.cluster.wait_connection(RELAY_CONN, WAIT).await;
    let leader = match victim {
        Victim::RelayNode | Victim::FrozenRelayNode | Victim::Leader => {
            s.cluster
                .move_stream_leader(
                    &s.js,
                    &s.client,
                    "EVENTS",
                    None,
                    |l| l != relay_node,
                    Duration::from_secs(15),
                )
                .await
        }
        Victim::Both => {
            s.cluster
                .move_stream_leader(
                    &s.js,
                    &s.client,
                    "EVENTS",
                    Some(relay_node),
                    |l| l == relay_node,
                    Duration::from_secs(15),
                )
                .await
        }
    };
    let victim_node = match victim {
        Victim::RelayNode | Victim::FrozenRelayNode | Victim::Both => relay_node,
        Victim::Leader => leader,
    };
    if victim == Victim::FrozenRelayNode {
        // The test's own client pings once a minute: it must not be on
        // the node that freezes.
        s.client = within(
            WAIT,
            "connect to the leader",
            async_nats::connect(s.cluster.nodes[leader].url()),
        )
        .await
        .expect("connect to the leader");
        s.js = async_nats::jetstream::new(s.client.clone());
    }
    eprintln!(
        "{victim:?}: relay on {}, stream leader {}, killing {} (setup took {:?})",
        s.cluster.nodes[relay_node].name,
        s.cluster.nodes[leader].name,
        s.cluster.nodes[victim_node].name,
        t0.elapsed()
    );

    let tok = token(SECRET, &["events.k.>"], 300);
    let auth = bearer(&tok);
    let (_addr_tx, addr_rx) = watch::channel(s.relay.addr().to_string());
    let mut readers = Readers::spawn(
        &[
            vec!["events.k.>"],
            vec!["events.k.a.*"],
            vec!["events.k.b.x", "events.k.c.*"],
        ],
        &ReaderConfig {
            auth: auth.clone(),
            addr: addr_rx.clone(),
            reconnect: true,
            hang_up_seed: None,
            deadline,
        },
    );
    // A witness on a node that survives counts which stored events were
    // republished at all (diagnostic only: it shows whether this run hit
    // the "stored but never republished" case the relay must fill in).
    let witness_node = (0..s.cluster.nodes.len())
        .find(|&i| i != victim_node)
        .expect("a surviving node");
    let (witness_stop, witness) = spawn_witness(&s.cluster.nodes[witness_node].url()).await;

    // The flood (if any) first, so that it is still running at the kill.
    let flooder = flood.map(|n| {
        let (tx, rx) = watch::channel(0usize);
        let client = s.client.clone();
        (
            tokio::spawn(core_flood(client, n, CLUSTER_SUBJECTS, tx, deadline)),
            rx,
            n,
        )
    });
    if let Some((_, rx, n)) = &flooder {
        let mut rx = rx.clone();
        wait_progress(&mut rx, 5000.min(*n), Duration::from_secs(15)).await;
    }
    let (prog_tx, mut prog) = watch::channel(0usize);
    let publisher = match load {
        Load::Paced { n, per_sec } => tokio::spawn(publish_paced(
            s.js.clone(),
            "cluster",
            n,
            per_sec,
            CLUSTER_SUBJECTS,
            prog_tx,
            deadline,
        )),
        Load::Burst { n, window } => tokio::spawn(publish_burst(
            s.js.clone(),
            "cluster",
            n,
            window,
            CLUSTER_SUBJECTS,
            prog_tx,
            deadline,
        )),
    };
    wait_progress(&mut prog, kill_after, Duration::from_secs(15)).await;
    readers.wait_all_reached(1, WAIT).await;
    if victim == Victim::FrozenRelayNode {
        s.cluster.pause(victim_node);
    } else {
        s.cluster.kill(victim_node);
    }
    let killed_at = Instant::now();
    eprintln!(
        "{victim:?}: killed after {} acked events, {} core publishes, {:?} into the test",
        *prog.borrow(),
        flooder.as_ref().map_or(0, |(_, rx, _)| *rx.borrow()),
        t0.elapsed()
    );

    let (acked, retries) = join_task("publisher", publisher).await;
    eprintln!(
        "{victim:?}: publisher done {:?} after the kill: {} acked, {retries} retries",
        killed_at.elapsed(),
        acked.len()
    );
    if let Some((t, _, _)) = flooder {
        let sent = join_task("core flood", t).await;
        eprintln!("{victim:?}: core flood sent {sent}");
    }
    if victim != Victim::Leader {
        // Pings every 5 s, given up after two unanswered: a frozen node is
        // noticed within 15 s (and a reconnect may try it first again).
        let limit = if victim == Victim::FrozenRelayNode {
            Duration::from_secs(30)
        } else {
            WAIT
        };
        for conn in [RELAY_CONN, RELAY_FEED] {
            let now_on = s.cluster.wait_connection(conn, limit).await;
            assert_ne!(
                now_on, victim_node,
                "{conn} must have moved off the killed node"
            );
        }
    }
    let stored = stream_contents(&s.js, "EVENTS", Duration::from_secs(15)).await;
    eprintln!("{victim:?}: the stream holds {} events", stored.len());
    assert_acked_stored(&acked, &stored);
    let _ = witness_stop.send(true);
    let republished = join_task("witness", witness).await;
    let never: Vec<u64> = stored
        .iter()
        .map(|e| e.seq)
        .filter(|q| !republished.contains(q))
        .collect();
    eprintln!(
        "{victim:?}: {} stored events were never seen republished by a witness on {} (first: {:?})",
        never.len(),
        s.cluster.nodes[witness_node].name,
        &never[..never.len().min(10)]
    );
    finish_readers(readers, &stored, &acked).await;
    eprintln!(
        "{victim:?}: all readers complete {:?} after the kill",
        killed_at.elapsed()
    );
    drop(s.relay);
}

/// Kill the node the relay is connected to (the stream leader is on
/// another node): the relay reconnects to a surviving node and catches
/// up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_kill_node_the_relay_is_connected_to() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(55),
        "cluster_kill_node_the_relay_is_connected_to",
        cluster_node_loss(
            Victim::RelayNode,
            Load::Paced {
                n: 1200,
                per_sec: 200,
            },
            300,
            None,
        ),
    )
    .await
}

/// Freeze the node the relay is connected to (the stream leader is on
/// another node): the relay's pings find both its connections dead, it
/// reconnects to a surviving node and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_freeze_node_the_relay_is_connected_to() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(55),
        "cluster_freeze_node_the_relay_is_connected_to",
        cluster_node_loss(
            Victim::FrozenRelayNode,
            Load::Paced {
                n: 1200,
                per_sec: 200,
            },
            300,
            None,
        ),
    )
    .await
}

/// Kill the stream leader while the relay is connected to another node,
/// with acked publishes (~200/s) and a core-publish flood (~10,000/s)
/// going on: events the old leader stored but never republished must
/// still reach the clients. (Whether a run hit that case is printed by
/// the witness; on this machine the loads used here did not provoke it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_kill_stream_leader() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(55),
        "cluster_kill_stream_leader",
        cluster_node_loss(
            Victim::Leader,
            Load::Paced {
                n: 1200,
                per_sec: 200,
            },
            300,
            Some(30_000),
        ),
    )
    .await
}

/// Kill a node that is both the relay's and the stream leader, in the
/// middle of a publish burst (32 publishes in flight, as fast as acks
/// come back); un-acked publishes are retried with the same Nats-Msg-Id.
/// A core-publish flood runs alongside. Every stored event (each acked
/// one among them) must arrive once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_kill_leader_and_relay_node_during_burst() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(55),
        "cluster_kill_leader_and_relay_node_during_burst",
        cluster_node_loss(
            Victim::Both,
            Load::Burst {
                n: 8000,
                window: 32,
            },
            1500,
            Some(30_000),
        ),
    )
    .await
}
