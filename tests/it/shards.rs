//! `--workers`: one process runs several shards on one port, each with its
//! own NATS connections, and clients on any shard get every event.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// The relay's NATS connections (named `sse-relay/<shard>` for requests,
/// `sse-relay/<shard>/live` for the live feed) with the subjects each one
/// subscribes to, from the server's `/connz`.
async fn relay_connections(nats: &NatsServer) -> Vec<(String, Vec<String>)> {
    let r = http_get(&nats.monitor_addr(), "/connz?subs=1&limit=100000", &[]).await;
    assert_eq!(r.status, 200, "GET /connz: {}", r.body);
    let v: Value = r.json();
    let mut out = Vec::new();
    for conn in v["connections"].as_array().cloned().unwrap_or_default() {
        let name = conn["name"].as_str().unwrap_or_default().to_string();
        if !name.starts_with("sse-relay/") {
            continue;
        }
        let subs = conn["subscriptions_list"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        out.push((name, subs));
    }
    out.sort();
    out
}

/// Waits until `shards` shards each hold their two connections.
async fn wait_relay_connections(nats: &NatsServer, shards: usize) -> Vec<(String, Vec<String>)> {
    let n = 2 * shards;
    poll_until(WAIT, &format!("{n} relay connections on NATS"), || async {
        let conns = relay_connections(nats).await;
        (conns.len() == n).then_some(conns)
    })
    .await
}

fn relay_args(nats: &NatsServer, workers: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = ["--nats-url", &nats.url(), "--jwt-secret", SECRET]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.push("--create-stream".into());
    if let Some(w) = workers {
        args.extend(["--workers".to_string(), w.to_string()]);
    }
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_spread_clients_and_deliver_every_event() {
    within(
        Duration::from_secs(60),
        "two_workers_spread_clients_and_deliver_every_event",
        async {
            let nats = NatsServer::start().await;
            let mut relay = Relay::spawn_serve(relay_args(&nats, Some("2")), &[]);
            relay.wait_ready(Duration::from_secs(15)).await;
            let conns = wait_relay_connections(&nats, 2).await;
            let names: Vec<&str> = conns.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names,
                [
                    "sse-relay/0",
                    "sse-relay/0/live",
                    "sse-relay/1",
                    "sse-relay/1/live"
                ]
            );

            // Clients each on a subject of their own, one on a shared
            // subject, and one on two subjects at once.
            const SOLO: usize = 24;
            let tok = token(SECRET, &["events.>"], 300);
            let mut solo = Vec::new();
            for i in 0..SOLO {
                let subject = format!("events.solo.{i}");
                solo.push(relay.open_stream(&nats, &tok, &[&subject]).await);
            }
            let mut shared = Vec::new();
            for _ in 0..8 {
                shared.push(relay.open_stream(&nats, &tok, &["events.shared"]).await);
            }
            let mut many = Vec::new();
            for _ in 0..8 {
                many.push(
                    relay
                        .open_stream(&nats, &tok, &["events.many.a", "events.many.b"])
                        .await,
                );
            }

            // The kernel spread the connections: both shards' feeds
            // subscribed.
            let conns = relay_connections(&nats).await;
            for (name, subs) in conns.iter().filter(|(n, _)| n.ends_with("/live")) {
                assert!(
                    subs.iter().any(|s| s.starts_with("relay.events.solo.")),
                    "{name} holds no client subscription: connections landed on one shard only: {conns:?}"
                );
            }
            assert_eq!(
                relay.metric("sse_relay_connections", &[]).await,
                (SOLO + 16) as f64,
                "the connections gauge sums every shard"
            );
            assert_eq!(relay.metric("sse_relay_nats_connected", &[]).await, 2.0);
            let m = relay.get("/metrics", &[]).await;
            assert_eq!(
                m.header("content-type"),
                Some("application/openmetrics-text; version=1.0.0; charset=utf-8"),
                "the content type says what the body is (it ends with # EOF)"
            );
            assert!(m.body.ends_with("# EOF\n"));

            let js = async_nats::jetstream::new(nats.client().await);
            let mut want_solo = Vec::new();
            for i in 0..SOLO {
                let ack = js
                    .publish(format!("events.solo.{i}"), Bytes::from(format!("solo {i}")))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                want_solo.push(ack.sequence);
            }
            let mut want_shared = Vec::new();
            let mut want_many = Vec::new();
            for i in 0..50 {
                let ack = js
                    .publish("events.shared", Bytes::from(format!("shared {i}")))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                want_shared.push((ack.sequence, format!("shared {i}")));
                let subject = if i % 3 == 0 {
                    "events.many.a"
                } else {
                    "events.many.b"
                };
                let ack = js
                    .publish(subject, Bytes::from(format!("many {i}")))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                want_many.push((ack.sequence, format!("many {i}")));
            }

            for (i, c) in solo.iter_mut().enumerate() {
                let ev = c.expect_data_event(WAIT, &format!("solo client {i}")).await;
                assert_eq!((ev.seq(), ev.data.as_str()), (want_solo[i], &*format!("solo {i}")));
            }
            for (what, clients, want) in [
                ("shared", &mut shared, &want_shared),
                ("many", &mut many, &want_many),
            ] {
                for (i, c) in clients.iter_mut().enumerate() {
                    let got: Vec<(u64, String)> = c
                        .collect_data_events(want.len(), WAIT, &format!("{what} client {i}"))
                        .await
                        .into_iter()
                        .map(|e| (e.seq(), e.data))
                        .collect();
                    assert_eq!(&got, want, "{what} client {i}: every event, in order, once");
                }
            }

            // SIGTERM drains every shard: each stream ends, the process exits 0.
            relay.sigterm();
            for (i, c) in solo.iter_mut().chain(&mut shared).chain(&mut many).enumerate() {
                assert!(c.wait_closed(WAIT).await, "stream {i} did not end on SIGTERM");
            }
            let status = relay.wait_exit(WAIT).await.expect("relay exits after SIGTERM");
            assert!(status.success(), "exit status after SIGTERM: {status:?}");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_workers_is_one_per_available_cpu() {
    within(
        TEST_LIMIT,
        "default_workers_is_one_per_available_cpu",
        async {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let nats = NatsServer::start().await;
            let mut relay = Relay::spawn_serve(relay_args(&nats, None), &[]);
            relay.wait_ready(Duration::from_secs(15)).await;
            let conns = wait_relay_connections(&nats, cpus).await;
            assert_eq!(
                conns.len(),
                2 * cpus,
                "two NATS connections per shard: {conns:?}"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_from_the_environment() {
    within(TEST_LIMIT, "workers_from_the_environment", async {
        let nats = NatsServer::start().await;
        let mut relay = Relay::spawn_serve(relay_args(&nats, None), &[("RELAY_WORKERS", "3")]);
        relay.wait_ready(Duration::from_secs(15)).await;
        wait_relay_connections(&nats, 3).await;
    })
    .await
}
