//! Two regions, as the README's multi-region section sets them up: a hub
//! (`nats/hub.conf`, the stream of `nats/stream.json`) where publishers
//! write, a regional leaf node (`nats/leaf.conf`) holding the mirror of
//! `nats/leaf-mirror.json`, a relay on each. Ids are hub sequences
//! everywhere, so clients move between the regions with `Last-Event-ID`.

use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde_json::Value;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);
/// Two servers, two relays and a leaf link that goes down and comes back.
const REGIONS_LIMIT: Duration = Duration::from_secs(90);
/// A mirror catching up after its link came back retries on its own
/// schedule (seconds).
const MIRROR_LIMIT: Duration = Duration::from_secs(30);

/// `sse-relay serve` against `nats_url`'s existing stream (no
/// `--create-stream`: at the edge that would make a stream of its own),
/// one shard.
async fn relay_at(nats_url: &str) -> Relay {
    Relay::start_existing_stream(nats_url, &["--workers", "1"]).await
}

/// Opens a fresh stream and waits for `relay.live`: from then on, every
/// event stored reaches it.
async fn open_live(relay: &Relay, auth: &str, subjects: &[&str]) -> SseClient {
    let path = events_path(subjects);
    let mut c = SseClient::connect(relay.addr(), &path, &[("Authorization", auth)]).await;
    assert_eq!(
        c.status,
        200,
        "GET {path}: {:?} {}",
        c.headers,
        c.body_text()
    );
    expect_live(&mut c, None, "a fresh stream").await;
    c
}

/// Opens a resume from `last` (as a browser reconnects) and asserts 200.
async fn resume(relay: &Relay, auth: &str, subjects: &[&str], last: u64) -> SseClient {
    let path = events_path(subjects);
    let last_s = last.to_string();
    let c = SseClient::connect(
        relay.addr(),
        &path,
        &[("Authorization", auth), ("Last-Event-ID", &last_s)],
    )
    .await;
    assert_eq!(
        c.status,
        200,
        "resume from {last}: {:?} {}",
        c.headers,
        c.body_text()
    );
    c
}

/// Reads up to `relay.live`, asserting its `last_event_id` (the last id
/// the client has) and that no data event comes before it.
/// (`None`: any position, as a fresh stream's.)
async fn expect_live(c: &mut SseClient, last: Option<u64>, what: &str) {
    loop {
        let ev = c.next_event(WAIT).await.unwrap_or_else(|| {
            panic!(
                "{what}: no relay.live within {WAIT:?}; body: {:?}",
                c.body_text()
            )
        });
        if ev.event.as_deref() == Some("relay.live") {
            let v: Value = serde_json::from_str(&ev.data).expect("relay.live data is JSON");
            if last.is_some() {
                assert_eq!(v["last_event_id"].as_u64(), last, "{what}: {ev:?}");
            }
            return;
        }
        assert!(!ev.has_data, "{what}: data before relay.live: {ev:?}");
    }
}

/// Publishes `payloads` at the hub on `subject`, returning `(seq, payload)`.
async fn publish(js: &jetstream::Context, subject: &str, payloads: &[&str]) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for p in payloads {
        let seq = js_publish(js, subject, Bytes::from(p.to_string())).await;
        out.push((seq, p.to_string()));
    }
    out
}

/// `n` data events of `c` as `(id, data)`.
async fn next_events(c: &mut SseClient, n: usize, what: &str) -> Vec<(u64, String)> {
    c.collect_data_events(n, WAIT, what)
        .await
        .into_iter()
        .map(|e| (e.seq(), e.data))
        .collect()
}

/// A publish at the hub reaches a client of the edge relay live, with the
/// hub's sequence as its id; the edge relay serves what its mirror holds
/// and refuses the rest as outside the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_at_the_hub_reaches_an_edge_client_with_the_hub_sequence() {
    within(
        REGIONS_LIMIT,
        "publish at the hub, read at the edge",
        async {
            let regions = Regions::start().await;
            let hub_js = jetstream::new(regions.hub.client().await);
            let edge = relay_at(&regions.leaf.url()).await;
            let auth = bearer(&token(SECRET, &[">"], 300));

            let r = http_get(
                edge.addr(),
                &events_path(&["other.x"]),
                &[("Authorization", &auth)],
            )
            .await;
            assert_json_error(&r, 400, "a subject the mirror cannot hold");
            assert_eq!(r.json()["error"], "subject_outside_stream");

            // Other events first: the id is the hub's sequence, not a count.
            publish(&hub_js, "events.users.1", &["u1", "u2", "u3"]).await;
            let mut c = open_live(&edge, &auth, &["events.orders.*"]).await;
            let sent = publish(&hub_js, "events.orders.42", &["shipped"]).await;
            assert_eq!(sent[0].0, 4);
            let got = next_events(&mut c, 1, "a hub publish at the edge").await;
            assert_eq!(got, sent);
        },
    )
    .await
}

/// A client resuming on the edge relay gets exactly the events it missed,
/// read from the local mirror: the leaf is cut off from the hub meanwhile.
/// `initial=last` reads the mirror too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_at_the_edge_is_served_by_the_local_mirror() {
    within(REGIONS_LIMIT, "resume at the edge from the mirror", async {
        let regions = Regions::start().await;
        let hub_js = jetstream::new(regions.hub.client().await);
        let leaf_js = jetstream::new(regions.leaf.client().await);
        let edge = relay_at(&regions.leaf.url()).await;
        let auth = bearer(&token(SECRET, &["events.>"], 300));

        // A client of everything: the edge shard sees every id live.
        let mut all = open_live(&edge, &auth, &["events.>"]).await;
        let mut sent = Vec::new();
        for i in 0..3 {
            sent.extend(publish(&hub_js, "events.orders.1", &[&format!("o{i}")]).await);
            sent.extend(publish(&hub_js, "events.users.2", &[&format!("u{i}")]).await);
        }
        assert_eq!(next_events(&mut all, 6, "live at the edge").await, sent);

        regions.cut_link().await;
        // The orders after the first one: o1, o2.
        let mut c = resume(&edge, &auth, &["events.orders.1"], sent[0].0).await;
        let got = next_events(&mut c, 2, "replay from the mirror").await;
        assert_eq!(got, vec![sent[2].clone(), sent[4].clone()]);
        expect_live(&mut c, Some(sent[4].0), "the resume").await;
        assert_eq!(
            regions.mirror_last(&leaf_js).await,
            Some(sent[5].0),
            "the mirror held everything before the cut"
        );

        let path = with_query(&events_path(&["events.>"]), &[("initial", "last")]);
        let mut first = SseClient::connect(edge.addr(), &path, &[("Authorization", &auth)]).await;
        assert_eq!(first.status, 200, "initial=last: {}", first.body_text());
        let got = next_events(&mut first, 2, "initial=last from the mirror").await;
        assert_eq!(got, vec![sent[4].clone(), sent[5].clone()]);
        expect_live(&mut first, Some(sent[5].0), "initial=last").await;

        // A relay that starts while the hub is out of reach has seen no id
        // yet: what the mirror holds is answered by the mirror alone.
        let fresh_edge = relay_at(&regions.leaf.url()).await;
        let mut late = resume(&fresh_edge, &auth, &["events.orders.1"], sent[2].0).await;
        let got = next_events(&mut late, 1, "a new edge relay, hub cut off").await;
        assert_eq!(got, vec![sent[4].clone()]);

        // The resumed client goes on live, with nothing skipped or repeated.
        regions.restore_link().await;
        let next = publish(&hub_js, "events.orders.1", &["o3"]).await;
        assert_eq!(next_events(&mut c, 1, "live after the resume").await, next);
    })
    .await
}

/// A client moving between the hub's relay and the edge's, both ways,
/// resumes each time with exactly the events it missed, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moving_between_regions_resumes_without_gap_or_duplicate() {
    within(REGIONS_LIMIT, "a client moving between regions", async {
        let regions = Regions::start().await;
        let hub_js = jetstream::new(regions.hub.client().await);
        let hub_relay = relay_at(&regions.hub.url()).await;
        let edge = relay_at(&regions.leaf.url()).await;
        let auth = bearer(&token(SECRET, &["events.orders.>"], 300));
        let subjects = ["events.orders.>"];

        let mut c = open_live(&hub_relay, &auth, &subjects).await;
        let seen = publish(&hub_js, "events.orders.1", &["a", "b", "c"]).await;
        assert_eq!(next_events(&mut c, 3, "at the hub").await, seen);
        drop(c);

        // Missed while moving to the edge; the mirror may still be behind.
        let missed = publish(&hub_js, "events.orders.2", &["d", "e", "f"]).await;
        let mut c = resume(&edge, &auth, &subjects, seen[2].0).await;
        assert_eq!(next_events(&mut c, 3, "hub -> edge").await, missed);
        let live = publish(&hub_js, "events.orders.1", &["g"]).await;
        assert_eq!(next_events(&mut c, 1, "live at the edge").await, live);
        drop(c);

        let missed = publish(&hub_js, "events.orders.3", &["h", "i"]).await;
        let mut c = resume(&hub_relay, &auth, &subjects, live[0].0).await;
        assert_eq!(next_events(&mut c, 2, "edge -> hub").await, missed);
        let live = publish(&hub_js, "events.orders.1", &["j"]).await;
        assert_eq!(next_events(&mut c, 1, "live at the hub").await, live);
    })
    .await
}

/// An id the mirror has not reached (the client got it at the hub while
/// the leaf was cut off) is not refused: an EventSource gets 200, a
/// `retry:` hint and the end of the stream, another client 503 with
/// `Retry-After`. Once the mirror has caught up, the same resume continues
/// after that id: nothing the client had is sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_the_mirror_has_not_reached_is_retried_not_refused() {
    within(REGIONS_LIMIT, "an id ahead of the mirror", async {
        let regions = Regions::start().await;
        let hub_js = jetstream::new(regions.hub.client().await);
        let leaf_js = jetstream::new(regions.leaf.client().await);
        let hub_relay = relay_at(&regions.hub.url()).await;
        let edge = relay_at(&regions.leaf.url()).await;
        let auth = bearer(&token(SECRET, &["events.orders.>"], 300));
        let subjects = ["events.orders.>"];

        let mut at_hub = open_live(&hub_relay, &auth, &subjects).await;
        let before = publish(&hub_js, "events.orders.1", &["a", "b"]).await;
        assert_eq!(next_events(&mut at_hub, 2, "at the hub").await, before);
        regions.wait_mirrored(&leaf_js, before[1].0, WAIT).await;
        // The edge shard has seen the mirror's end.
        drop(open_live(&edge, &auth, &subjects).await);

        regions.cut_link().await;
        let ahead = publish(&hub_js, "events.orders.1", &["c", "d"]).await;
        assert_eq!(
            next_events(&mut at_hub, 2, "at the hub, cut off").await,
            ahead
        );
        let last = ahead[1].0;

        let mut c = resume(&edge, &auth, &subjects, last).await;
        assert!(c.wait_closed(WAIT).await, "the refusal ends the stream");
        let body = c.body_text();
        assert!(
            body.lines().any(|l| l.starts_with("retry:")),
            "a retry hint: {body:?}"
        );
        assert!(!body.contains("data:"), "no event: {body:?}");
        let last_s = last.to_string();
        let r = http_get(
            edge.addr(),
            &events_path(&subjects),
            &[("Authorization", &auth), ("Last-Event-ID", &last_s)],
        )
        .await;
        assert_json_error(&r, 503, "an id ahead of the mirror, not an EventSource");
        assert!(r.header("retry-after").is_some(), "{:?}", r.headers);

        // As an EventSource does: come back until the stream stays open.
        regions.restore_link().await;
        let deadline = tokio::time::Instant::now() + MIRROR_LIMIT;
        let mut c = loop {
            let mut c = resume(&edge, &auth, &subjects, last).await;
            match c.next_event(WAIT).await {
                Some(ev) if ev.retry.is_some() && !ev.has_data => {}
                other => panic!("a stream opens with its retry hint, got {other:?}"),
            }
            if !c.wait_closed(Duration::from_millis(500)).await {
                break c;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the edge still refuses {last} after {MIRROR_LIMIT:?}: {}",
                c.body_text()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        expect_live(&mut c, Some(last), "the resume ahead of the mirror").await;
        let next = publish(&hub_js, "events.orders.1", &["e"]).await;
        assert_eq!(next_events(&mut c, 1, "after the id").await, next);
    })
    .await
}

/// Each region's relays see only their own server's live copies: a
/// subscriber on `relay.events.>` on either side gets each event once,
/// with the hub's sequence, and nothing published on `relay.>` crosses the
/// leaf link either way (where hub frames could run ahead of the mirror).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_region_gets_its_own_live_copy_once() {
    within(REGIONS_LIMIT, "live copies per region", async {
        let regions = Regions::start().await;
        let hub = regions.hub.client().await;
        let leaf = regions.leaf.client().await;
        let mut hub_live = hub.subscribe("relay.events.>").await.unwrap();
        let mut leaf_live = leaf.subscribe("relay.events.>").await.unwrap();
        let mut hub_probe = hub.subscribe("probe.hub").await.unwrap();
        let mut leaf_probe = leaf.subscribe("probe.leaf").await.unwrap();
        hub.flush().await.unwrap();
        leaf.flush().await.unwrap();

        let js = jetstream::new(hub.clone());
        let sent: Vec<u64> = publish(&js, "events.orders.1", &["a", "b", "c", "d"])
            .await
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();

        // Each side also publishes a live copy of its own by hand, which
        // its local subscriber sees and the other side must not.
        for (client, forged) in [(&hub, "forged at the hub"), (&leaf, "forged at the leaf")] {
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Sequence", "999");
            client
                .publish_with_headers("relay.events.orders.1", h, Bytes::from(forged))
                .await
                .expect("publish");
            client.flush().await.expect("flush");
        }
        // Then probes from the other side: the link is FIFO, so once a
        // probe arrives, whatever could cross before it has.
        for (live, probe, from, subject, own) in [
            (
                &mut hub_live,
                &mut hub_probe,
                &leaf,
                "probe.hub",
                "forged at the hub",
            ),
            (
                &mut leaf_live,
                &mut leaf_probe,
                &hub,
                "probe.leaf",
                "forged at the leaf",
            ),
        ] {
            let mut got = Vec::new();
            let mut forged = Vec::new();
            let mut take = |m: async_nats::Message| match &m.payload[..] {
                b"forged at the hub" | b"forged at the leaf" => {
                    forged.push(String::from_utf8_lossy(&m.payload).into_owned());
                }
                _ => got.push(sequence_of(&m)),
            };
            let mut n = 0;
            while n < sent.len() + 1 {
                let m = tokio::time::timeout(WAIT, live.next())
                    .await
                    .unwrap_or_else(|_| panic!("{subject}: {n} messages of {}", sent.len() + 1))
                    .expect("subscription open");
                take(m);
                n += 1;
            }
            // Interest in the probe crosses the link on its own time:
            // probe until one arrives.
            let deadline = tokio::time::Instant::now() + WAIT;
            loop {
                from.publish(subject, Bytes::new()).await.expect("publish");
                from.flush().await.expect("flush");
                let wait = tokio::time::timeout(Duration::from_millis(200), probe.next());
                if let Ok(Some(_)) = wait.await {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{subject} did not cross the link within {WAIT:?}"
                );
            }
            while let Some(Some(m)) = live.next().now_or_never() {
                take(m);
            }
            assert_eq!(got, sent, "republished copies on the {subject} side");
            assert_eq!(forged, [own], "copies by hand on the {subject} side");
        }
    })
    .await
}

/// The `Nats-Sequence` of a republished message.
fn sequence_of(m: &async_nats::Message) -> u64 {
    m.headers
        .as_ref()
        .and_then(|h| h.get("Nats-Sequence"))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or_else(|| panic!("no Nats-Sequence on {:?}", m.subject))
}
