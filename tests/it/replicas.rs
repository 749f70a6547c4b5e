//! Reads through a replica that lags behind the stream leader. JetStream
//! places an ephemeral consumer on any replica of an R3 stream, and a
//! replica catching up (a node just restarted or thawed) counts as pending
//! only what it holds itself: a read that trusted it would end short and
//! lose the rest without a word.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

const WAIT: Duration = Duration::from_secs(20);
/// Events stored while a replica is frozen: enough that it takes a while
/// to catch up once thawed.
const STORED: u64 = 20_000;
/// Events each resume asks for.
const BACK: u64 = 100;
/// Resumes at once, each through its own consumer (placed at random, so
/// some land on the lagging replica).
const RESUMES: usize = 16;

/// Publishes `n` events on `subject` with ~200-byte payloads, many in
/// flight, and waits for every ack.
async fn publish_many(js: &async_nats::jetstream::Context, subject: &str, n: u64) {
    let pad = "x".repeat(200);
    let mut inflight = FuturesUnordered::new();
    for i in 0..n {
        let ack = js
            .publish(subject.to_string(), Bytes::from(format!("{i}:{pad}")))
            .await
            .expect("publish");
        inflight.push(ack.into_future());
        if inflight.len() >= 1000 {
            inflight.next().await.unwrap().expect("ack");
        }
    }
    while let Some(ack) = inflight.next().await {
        ack.expect("ack");
    }
}

/// Reads `c` as a browser would: when the relay ends the stream (a read
/// that failed says "resume again"), it comes back with the last id it
/// got. Returns every id received, until [`BACK`] of them or `deadline`.
async fn read_resuming(
    mut c: SseClient,
    relay: &Relay,
    path: &str,
    auth: &str,
    deadline: tokio::time::Instant,
) -> Vec<u64> {
    let mut ids: Vec<u64> = Vec::new();
    for _ in 0..20 {
        while (ids.len() as u64) < BACK {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match c.next_data_event(left).await {
                Some(e) => ids.push(e.seq()),
                None => break,
            }
        }
        if ids.len() as u64 >= BACK || !c.is_closed() {
            break;
        }
        let last = ids.last().copied().unwrap_or(STORED - BACK).to_string();
        let headers = [("Authorization", auth), ("Last-Event-ID", last.as_str())];
        c = SseClient::connect(relay.addr(), path, &headers).await;
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_through_a_lagging_replica_miss_nothing() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(120),
        "resumes_through_a_lagging_replica_miss_nothing",
        async {
            let cluster = NatsCluster::start(3).await;
            let js = async_nats::jetstream::new(cluster.client().await);
            let mut cfg = events_stream_config();
            cfg.num_replicas = 3;
            cluster.create_stream(&js, cfg, WAIT).await;
            // No memory window: every resume reads the stream through a
            // consumer of its own.
            let relay =
                Relay::start_existing_stream(&cluster.url_list(), &["--replay-cache-bytes", "0"])
                    .await;
            let relay_node = cluster.wait_connection("sse-relay/0", WAIT).await;
            let leader = cluster.stream_leader(&js, "EVENTS", WAIT).await;
            let lagging = (0..3)
                .find(|&i| i != relay_node && i != leader)
                .expect("a node that neither leads nor serves the relay");
            // The publisher talks to the leader: the frozen node answers
            // nothing.
            let publisher = async_nats::connect(cluster.nodes[leader].url())
                .await
                .expect("connect to the leader");
            let pjs = async_nats::jetstream::new(publisher);

            cluster.pause(lagging);
            let t = std::time::Instant::now();
            publish_many(&pjs, "events.lag.x", STORED).await;
            eprintln!(
                "{STORED} events stored in {:?} with a replica frozen",
                t.elapsed()
            );
            cluster.resume(lagging);

            let tok = token(SECRET, &["events.lag.>"], 300);
            let auth = bearer(&tok);
            let after = (STORED - BACK).to_string();
            let path = events_path(&["events.lag.x"]);
            let headers = [("Authorization", auth.as_str()), ("Last-Event-ID", &after)];
            let mut clients = Vec::new();
            for _ in 0..RESUMES {
                clients.push(SseClient::connect(relay.addr(), &path, &headers).await);
            }
            let mut short = Vec::new();
            // One deadline for all: a short read leaves its client waiting.
            let deadline = tokio::time::Instant::now() + WAIT;
            let want: Vec<u64> = (STORED - BACK + 1..=STORED).collect();
            for (n, c) in clients.into_iter().enumerate() {
                let ids = read_resuming(c, &relay, &path, &auth, deadline).await;
                if ids != want {
                    short.push(format!(
                        "resume {n}: {} of {BACK} events (first {:?}, last {:?})",
                        ids.len(),
                        ids.first(),
                        ids.last()
                    ));
                }
            }
            assert!(
                short.is_empty(),
                "resumes read short through the lagging replica:\n{}\nrelay log:\n{}",
                short.join("\n"),
                relay.log()
            );
        },
    )
    .await
}
