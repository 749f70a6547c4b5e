//! Resuming a stream from `Last-Event-ID` (header) or `last_event_id=`
//! (query): replay of the missed events spliced to live delivery, the
//! `relay.gap` control event, `--replay-limit`, the in-memory replay window,
//! and a seeded randomized reconnect test.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);
/// Labels of `sse_relay_resumes_total` by where a resume was served from.
const FROM_MEMORY: &[(&str, &str)] = &[("source", "memory")];
const FROM_JETSTREAM: &[(&str, &str)] = &[("source", "jetstream")];

/// `(id, data)` of data events, asserting none of them is a control event.
fn ids_data(what: &str, evs: &[SseEvent]) -> Vec<(u64, String)> {
    evs.iter()
        .map(|e| {
            assert!(
                !e.event.as_deref().is_some_and(|n| n.starts_with("relay.")),
                "{what}: unexpected control event {e:?}"
            );
            (e.seq(), e.data.clone())
        })
        .collect()
}

/// Publishes `payloads[i]` on `subjects[i]`, pipelined (up to 256 acks in
/// flight), and returns `(seq, payload)` in publish order.
async fn publish_all(
    js: &async_nats::jetstream::Context,
    items: &[(String, Bytes)],
) -> Vec<(u64, String)> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(256) {
        let acks = within(WAIT, "publishing a batch", async {
            let mut futs = Vec::with_capacity(chunk.len());
            for (subject, payload) in chunk {
                futs.push(
                    js.publish(subject.clone(), payload.clone())
                        .await
                        .expect("publish"),
                );
            }
            let mut acks = Vec::with_capacity(futs.len());
            for f in futs {
                acks.push(f.await.expect("publish ack").sequence);
            }
            acks
        })
        .await;
        for ((_, payload), seq) in chunk.iter().zip(acks) {
            out.push((seq, String::from_utf8_lossy(payload).into_owned()));
        }
    }
    out
}

/// Publishes `n` events named `{prefix}{i}` round-robin over `subjects`.
async fn publish_named(
    js: &async_nats::jetstream::Context,
    subjects: &[&str],
    prefix: &str,
    n: usize,
) -> Vec<(u64, String)> {
    let items: Vec<(String, Bytes)> = (0..n)
        .map(|i| {
            (
                subjects[i % subjects.len()].to_string(),
                Bytes::from(format!("{prefix}{i}")),
            )
        })
        .collect();
    publish_all(js, &items).await
}

/// Publishes one event and asserts it is the very next data event of `c`
/// (no duplicate, nothing skipped, at the seam between replay and live).
async fn expect_live_next(
    c: &mut SseClient,
    js: &async_nats::jetstream::Context,
    subject: &str,
    payload: &str,
    what: &str,
) -> (u64, String) {
    let seq = js_publish(js, subject, Bytes::from(payload.to_string())).await;
    let ev = c.expect_data_event(WAIT, what).await;
    assert_eq!(
        (ev.id.as_deref(), ev.event.as_deref(), ev.data.as_str()),
        (Some(seq.to_string().as_str()), None, payload),
        "{what}: the next event after the replay must be the live one (id {seq})"
    );
    (seq, payload.to_string())
}

/// Asserts that `ev` is `event: relay.gap` without an id and with
/// `{"last_event_id": last, "first_available": first}`.
fn assert_gap(ev: &SseEvent, last: u64, first: u64, what: &str) {
    assert_eq!(
        ev.event.as_deref(),
        Some("relay.gap"),
        "{what}: expected a relay.gap control event first, got {ev:?}"
    );
    assert_eq!(
        ev.id, None,
        "{what}: relay.gap must carry no id line: {ev:?}"
    );
    let v: Value = serde_json::from_str(&ev.data)
        .unwrap_or_else(|e| panic!("{what}: relay.gap data is not JSON ({e}): {:?}", ev.data));
    assert_eq!(
        (v["last_event_id"].as_u64(), v["first_available"].as_u64()),
        (Some(last), Some(first)),
        "{what}: relay.gap data should be {{\"last_event_id\": {last}, \"first_available\": {first}}}, got {v}"
    );
}

// ---------------------------------------------------------------------------

/// `Last-Event-ID` resumes after that sequence: the stored events after it,
/// then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_after_that_sequence() {
    within(
        TEST_LIMIT,
        "last_event_id_resumes_after_that_sequence",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let mut seqs = Vec::new();
            for i in 0..5 {
                let ack = js
                    .publish("events.resume.1", Bytes::from(format!("r{i}")))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                seqs.push(ack.sequence);
            }
            let tok = token(SECRET, &["events.resume.>"], 300);
            let auth = bearer(&tok);
            let last_id = seqs[1].to_string();
            let mut c = SseClient::connect(
                relay.addr(),
                &events_path(&["events.resume.>"]),
                &[("Authorization", &auth), ("Last-Event-ID", &last_id)],
            )
            .await;
            assert_eq!(c.status, 200);
            let evs = c.collect_data_events(3, WAIT, "replayed events").await;
            let got: Vec<(u64, &str)> = evs.iter().map(|e| (e.seq(), e.data.as_str())).collect();
            assert_eq!(got, vec![(seqs[2], "r2"), (seqs[3], "r3"), (seqs[4], "r4")]);

            nats.wait_relay_subs(&["events.resume.>"], WAIT).await;
            let ack = js
                .publish("events.resume.1", Bytes::from("live"))
                .await
                .unwrap()
                .await
                .unwrap();
            let ev = c.expect_data_event(WAIT, "live after replay").await;
            assert_eq!((ev.seq(), ev.data.as_str()), (ack.sequence, "live"));
        },
    )
    .await
}

/// Disconnects a client after 3 events, publishes 20 while it is away,
/// resumes it from its last id (by `Last-Event-ID` header or by the
/// `last_event_id` query) and checks it gets exactly those 20 in order,
/// then live events next (no gap or duplicate at the seam).
async fn disconnect_then_resume(root: &'static str, by_header: bool) {
    let nats = NatsServer::start().await;
    let relay = Relay::start(&nats.url(), &[], &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let pattern = format!("{root}.>");
    let subject = |s: &str| format!("{root}.{s}");
    let tok = token(SECRET, &[&pattern], 300);
    let auth = bearer(&tok);

    let mut c = relay.open_stream(&nats, &tok, &[&pattern]).await;
    let before = publish_named(&js, &[&subject("1")], "before-", 3).await;
    let evs = c
        .collect_data_events(3, WAIT, "events before the disconnect")
        .await;
    assert_eq!(ids_data("before", &evs), before);
    let last = evs[2].seq().to_string();
    drop(c);

    let missed = publish_named(&js, &[&subject("1"), &subject("2.x")], "missed-", 20).await;
    let path = events_path(&[&pattern]);
    let mut c = if by_header {
        SseClient::connect(
            relay.addr(),
            &path,
            &[("Authorization", &auth), ("Last-Event-ID", &last)],
        )
        .await
    } else {
        let path = with_query(&path, &[("last_event_id", &last)]);
        SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await
    };
    assert_eq!(
        c.status, 200,
        "resume (header: {by_header}): {:?}",
        c.headers
    );
    assert!(
        c.header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "resume: {:?}",
        c.headers
    );
    let evs = c
        .collect_data_events(20, WAIT, "replay of the 20 missed")
        .await;
    assert_same_events("resumed client", &ids_data("replay", &evs), &missed);

    expect_live_next(&mut c, &js, &subject("3"), "live-1", "first live event").await;
    expect_live_next(&mut c, &js, &subject("1"), "live-2", "second live event").await;
}

/// Resume by the `Last-Event-ID` header (what a reconnecting browser sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_resume_replays_exactly_the_missed_events_then_live() {
    within(
        TEST_LIMIT,
        "header_resume_replays_exactly_the_missed_events_then_live",
        disconnect_then_resume("events.res", true),
    )
    .await
}

/// Resume by the query parameter `last_event_id` (what a client that
/// cannot set headers uses): exactly the missed events, then live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_param_resume_replays_exactly_the_missed_events_then_live() {
    within(
        TEST_LIMIT,
        "query_param_resume_replays_exactly_the_missed_events_then_live",
        disconnect_then_resume("events.q", false),
    )
    .await
}

/// Header and query both given: the header wins (the query points
/// earlier, so events between the two ids must not be replayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_header_wins_over_query_param() {
    within(
        TEST_LIMIT,
        "last_event_id_header_wins_over_query_param",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let pattern = "events.hw.>";
            let tok = token(SECRET, &[pattern], 300);
            let auth = bearer(&tok);
            let all = publish_named(&js, &["events.hw.1"], "e", 10).await;

            let query_id = all[1].0.to_string(); // earlier
            let header_id = all[5].0.to_string(); // later: this one counts
            let path = with_query(&events_path(&[pattern]), &[("last_event_id", &query_id)]);
            let mut c = SseClient::connect(
                relay.addr(),
                &path,
                &[("Authorization", &auth), ("Last-Event-ID", &header_id)],
            )
            .await;
            assert_eq!(c.status, 200, "{:?}", c.headers);
            let evs = c
                .collect_data_events(4, WAIT, "replay after the header id")
                .await;
            assert_same_events(
                "header-wins client (query said an earlier id)",
                &ids_data("replay", &evs),
                &all[6..],
            );
            expect_live_next(&mut c, &js, "events.hw.1", "live", "live after the replay").await;
        },
    )
    .await
}

/// Ids that are not non-negative integers are refused with 400 + JSON, by
/// header and by query. (Ids beyond the stream's end get 200 and
/// `relay.reset`: `recreate::an_id_beyond_the_stream_gets_relay_reset_then_the_stream`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_last_event_id_is_400() {
    within(TEST_LIMIT, "bad_last_event_id_is_400", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &[], &[]).await;
        let js = async_nats::jetstream::new(nats.client().await);
        let pattern = "events.bad.>";
        let tok = token(SECRET, &[pattern], 300);
        let auth = bearer(&tok);
        publish_named(&js, &["events.bad.1"], "e", 5).await;
        let path = events_path(&[pattern]);

        let bad: Vec<&str> = vec![
            "abc",
            "-1",
            "12abc",
            "1.5",
            "18446744073709551616", // 2^64: not a u64
        ];
        for id in &bad {
            for accept in ["text/event-stream", "*/*"] {
                let r = relay
                    .get(
                        &path,
                        &[
                            ("Authorization", &auth),
                            ("Accept", accept),
                            ("Last-Event-ID", id),
                        ],
                    )
                    .await;
                assert_json_error(
                    &r,
                    400,
                    &format!("Last-Event-ID: {id:?} (Accept: {accept})"),
                );
            }
            let qpath = with_query(&path, &[("last_event_id", id)]);
            let r = relay
                .get(
                    &qpath,
                    &[("Authorization", &auth), ("Accept", "text/event-stream")],
                )
                .await;
            assert_json_error(&r, 400, &format!("GET {qpath}"));
        }
    })
    .await
}

/// An empty `Last-Event-ID` (or `last_event_id=`) is no resume, as a
/// browser sends no header at all once its id was reset: the stream starts
/// live, and nothing stored is replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_last_event_id_is_no_resume() {
    within(TEST_LIMIT, "an_empty_last_event_id_is_no_resume", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &[], &[]).await;
        let js = async_nats::jetstream::new(nats.client().await);
        let pattern = "events.empty.>";
        let tok = token(SECRET, &[pattern], 300);
        let auth = bearer(&tok);
        let path = events_path(&[pattern]);
        publish_named(&js, &["events.empty.1"], "old", 5).await;
        for (what, headers, p) in [
            (
                "empty Last-Event-ID",
                vec![("Last-Event-ID", "")],
                path.clone(),
            ),
            (
                "blank Last-Event-ID",
                vec![("Last-Event-ID", "  ")],
                path.clone(),
            ),
            (
                "last_event_id=",
                vec![],
                with_query(&path, &[("last_event_id", "")]),
            ),
        ] {
            let mut h: Vec<(&str, &str)> = vec![("Authorization", &auth)];
            h.extend(headers);
            let mut c = SseClient::connect(relay.addr(), &p, &h).await;
            assert_eq!(c.status, 200, "{what}: {:?}", c.headers);
            nats.wait_relay_subs(&[pattern], WAIT).await;
            expect_live_next(&mut c, &js, "events.empty.1", what, what).await;
        }
        assert_eq!(
            relay
                .metric("sse_relay_resumes_total", &[("source", "jetstream")])
                .await,
            0.0
        );
        assert_eq!(
            relay
                .metric("sse_relay_resumes_total", &[("source", "memory")])
                .await,
            0.0
        );
    })
    .await
}

/// The valid edges: `0` means "from the beginning of what is stored"; the
/// stream's last sequence itself is a valid id (nothing to replay, live
/// continues).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_and_last_sequence_are_valid_resume_points() {
    within(
        TEST_LIMIT,
        "zero_and_last_sequence_are_valid_resume_points",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let pattern = "events.edge.>";
            let tok = token(SECRET, &[pattern], 300);
            let auth = bearer(&tok);
            let path = events_path(&[pattern]);
            // Something outside the pattern first, so "from the beginning"
            // is also filtered.
            js_publish(&js, "events.other.1", Bytes::from("not mine")).await;
            let mut stored = publish_named(&js, &["events.edge.1", "events.edge.2"], "s", 5).await;

            for (what, headers, p) in [
                (
                    "Last-Event-ID: 0",
                    vec![("Last-Event-ID", "0")],
                    path.clone(),
                ),
                (
                    "last_event_id=0",
                    vec![],
                    with_query(&path, &[("last_event_id", "0")]),
                ),
            ] {
                let mut h: Vec<(&str, &str)> = vec![("Authorization", &auth)];
                h.extend(headers);
                let mut c = SseClient::connect(relay.addr(), &p, &h).await;
                assert_eq!(c.status, 200, "{what}: {:?}", c.headers);
                let evs = c.collect_data_events(stored.len(), WAIT, what).await;
                assert_same_events(what, &ids_data(what, &evs), &stored);
                // Each round's live event is stored too: the next round replays it.
                stored.push(expect_live_next(&mut c, &js, "events.edge.3", what, what).await);
            }

            let last = js
                .get_stream("EVENTS")
                .await
                .unwrap()
                .info()
                .await
                .unwrap()
                .state
                .last_sequence
                .to_string();
            let mut c = SseClient::connect(
                relay.addr(),
                &path,
                &[("Authorization", &auth), ("Last-Event-ID", &last)],
            )
            .await;
            assert_eq!(
                c.status, 200,
                "Last-Event-ID = last sequence {last}: {:?}",
                c.headers
            );
            expect_live_next(
                &mut c,
                &js,
                "events.edge.1",
                "after-last",
                "id = last sequence",
            )
            .await;
        },
    )
    .await
}

/// Part of the history is gone (the stream keeps 10 messages): the relay
/// says so with `relay.gap` (no id), then replays what is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_into_removed_history_sends_gap_then_what_is_left() {
    within(
        TEST_LIMIT,
        "resume_into_removed_history_sends_gap_then_what_is_left",
        async {
            let nats = NatsServer::start().await;
            let js = async_nats::jetstream::new(nats.client().await);
            let mut cfg = events_stream_config();
            cfg.max_messages = 10;
            within(WAIT, "create stream EVENTS", js.create_stream(cfg))
                .await
                .expect("create stream EVENTS with max_messages 10");
            let relay = Relay::start_existing_stream(&nats.url(), &[]).await;
            let pattern = "events.gap.>";
            let tok = token(SECRET, &[pattern], 300);
            let auth = bearer(&tok);

            let all = publish_named(&js, &["events.gap.1"], "g", 30).await;
            let ids: Vec<u64> = all.iter().map(|(s, _)| *s).collect();
            assert_eq!(
                ids,
                (1..=30).collect::<Vec<u64>>(),
                "fresh stream: ids 1..30"
            );

            let mut c = SseClient::connect(
                relay.addr(),
                &events_path(&[pattern]),
                &[("Authorization", &auth), ("Last-Event-ID", "5")],
            )
            .await;
            assert_eq!(
                c.status, 200,
                "resume into removed history: {:?}",
                c.headers
            );
            let gap = c.expect_data_event(WAIT, "relay.gap").await;
            assert_gap(&gap, 5, 21, "resume from 5 with only 21..30 stored");
            let evs = c.collect_data_events(10, WAIT, "events 21..30").await;
            assert_same_events("after relay.gap", &ids_data("after gap", &evs), &all[20..]);
            expect_live_next(
                &mut c,
                &js,
                "events.gap.2",
                "live",
                "live after the gap replay",
            )
            .await;
        },
    )
    .await
}

/// `--replay-limit 10`: a resume that missed 50 gets `relay.gap` and the
/// newest 10, from JetStream and again with the subscription (and its
/// memory window) kept alive by another client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_limit_caps_a_resume_with_a_gap() {
    within(TEST_LIMIT, "replay_limit_caps_a_resume_with_a_gap", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &["--replay-limit", "10"], &[]).await;
        let js = async_nats::jetstream::new(nats.client().await);
        let pattern = "events.lim.>";
        let tok = token(SECRET, &[pattern], 300);
        let auth = bearer(&tok);
        let path = events_path(&[pattern]);

        for round in ["no other client", "another client keeps the subscription"] {
            let keeper = if round == "no other client" {
                None
            } else {
                Some(relay.open_stream(&nats, &tok, &[pattern]).await)
            };
            let first = js_publish(&js, "events.lim.1", Bytes::from("seen")).await;
            let last_seen = first.to_string();
            let missed = publish_named(&js, &["events.lim.1", "events.lim.2"], "m", 50).await;
            let last_seq = missed[49].0;
            let keeper = match keeper {
                // The memory-window case: wait until the node has every
                // missed event, else the resume races their live arrival.
                Some(mut k) => {
                    k.collect_data_events(51, WAIT, "keeper").await;
                    Some(k)
                }
                None => None,
            };

            let mut c = SseClient::connect(
                relay.addr(),
                &path,
                &[("Authorization", &auth), ("Last-Event-ID", &last_seen)],
            )
            .await;
            assert_eq!(c.status, 200, "{round}: {:?}", c.headers);
            let gap = c.expect_data_event(WAIT, "relay.gap").await;
            assert_gap(&gap, first, last_seq - 9, round);
            let evs = c.collect_data_events(10, WAIT, "newest 10").await;
            assert_same_events(round, &ids_data(round, &evs), &missed[40..]);
            expect_live_next(&mut c, &js, "events.lim.3", "live", round).await;
            drop(keeper);
        }
    })
    .await
}

/// A client on two wildcard patterns, with unrelated subjects
/// interleaved in the stream: the resume replays only its events, in
/// increasing id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_two_wildcards_replays_only_matching_events_in_order() {
    within(
        TEST_LIMIT,
        "resume_on_two_wildcards_replays_only_matching_events_in_order",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let patterns = ["events.a.*", "events.b.>"];
            let tok = token(SECRET, &["events.>"], 300);
            let auth = bearer(&tok);

            let mut c = relay.open_stream(&nats, &tok, &patterns).await;
            js_publish(&js, "events.a.0", Bytes::from("first")).await;
            let ev = c.expect_data_event(WAIT, "first event").await;
            assert_eq!(ev.data, "first");
            let last = ev.seq().to_string();
            drop(c);

            let subjects = [
                "events.a.1",
                "events.c.1", // other subtree
                "events.b.1",
                "events.a.1.x", // one token too many for a.*
                "events.b.2.y",
                "events.ab.1", // prefix look-alike
                "events.a.2",
                "events.b", // b.> needs one more token
                "events.b.3",
            ];
            let items: Vec<(String, Bytes)> = (0..63)
                .map(|i| {
                    let s = subjects[i % subjects.len()];
                    (s.to_string(), Bytes::from(format!("{i}:{s}")))
                })
                .collect();
            let published = publish_all(&js, &items).await;
            let expected: Vec<(u64, String)> = published
                .iter()
                .zip(&items)
                .filter(|(_, (s, _))| matches_any(&patterns, s))
                .map(|(p, _)| p.clone())
                .collect();
            assert_eq!(expected.len(), 35, "test premise: 5 of 9 subjects match");

            let mut c = SseClient::connect(
                relay.addr(),
                &events_path(&patterns),
                &[("Authorization", &auth), ("Last-Event-ID", &last)],
            )
            .await;
            assert_eq!(c.status, 200, "{:?}", c.headers);
            let evs = c
                .collect_data_events(expected.len(), WAIT, "matching replay")
                .await;
            assert_same_events("two-wildcard resume", &ids_data("replay", &evs), &expected);

            // Live: a non-matching event must be skipped, the matching one is next.
            js_publish(&js, "events.c.9", Bytes::from("not mine")).await;
            expect_live_next(&mut c, &js, "events.b.9.9", "mine", "live after replay").await;
        },
    )
    .await
}

/// A client dropped as slow (`--client-queue 16`, 4 KiB receive buffer,
/// reads nothing while 2,000 x 1 KiB events are published, topped up past
/// the kernel's send-buffer bound) resumes from the last id it actually
/// received and, combining both connections, has every event exactly
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_dropped_then_resumes_without_loss() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(45),
        "slow_client_dropped_then_resumes_without_loss",
        async {
            const N: usize = 2000;
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &["--client-queue", "16"], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let pattern = "events.slow.>";
            let tok = token(SECRET, &[pattern], 300);
            let auth = bearer(&tok);
            let path = events_path(&[pattern]);

            let mut slow =
                SseClient::connect_with_rcvbuf(relay.addr(), &path, &[("Authorization", &auth)], 4096)
                    .await;
            assert_eq!(slow.status, 200, "slow client: {:?}", slow.headers);
            nats.wait_relay_subs(&[pattern], WAIT).await;

            // The slow client reads nothing while these are published, one
            // at a time (a pipelined burst of more than 16 would overflow any
            // client's queue at once, before a byte is written).
            let mut published = Vec::with_capacity(N);
            for i in 0..N {
                let mut p = format!("{i:06}-").into_bytes();
                p.resize(1024, b'x');
                let seq = js_publish(&js, "events.slow.1", Bytes::from(p.clone())).await;
                published.push((seq, String::from_utf8(p).unwrap()));
            }
            // Whether 2,000 KiB overflow the kernel buffers depends on how
            // far the relay's send buffer autotunes (up to tcp_wmem's max),
            // so top up (pipelined) past that bound: then the relay's writes
            // must block, its queue must fill, and the drop is certain.
            let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
                .ok()
                .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
                .unwrap_or(4 << 20);
            let extra = (wmem_max + (256 << 10)).saturating_sub(N << 10) >> 10;
            let items: Vec<(String, Bytes)> = (N..N + extra)
                .map(|i| {
                    let mut p = format!("{i:06}-").into_bytes();
                    p.resize(1024, b'x');
                    ("events.slow.1".to_string(), Bytes::from(p))
                })
                .collect();
            published.extend(publish_all(&js, &items).await);
            let total = published.len();

            let first = slow.data_events_until_closed(Duration::from_secs(15)).await;
            assert!(
                slow.is_closed(),
                "test premise: the relay should have dropped the slow client (--client-queue 16), but its stream is still open after {} events",
                first.len()
            );
            assert!(
                !first.is_empty() && first.len() < total,
                "test premise: the slow client should get some but not all {total} events before the drop, got {} (body {:?})",
                first.len(),
                tail(&slow.body_text(), 300)
            );
            let first = ids_data("before the drop", &first);
            assert_same_events(
                "slow client before the drop (a prefix of the stream)",
                &first,
                &published[..first.len()],
            );
            eprintln!(
                "slow client received {} of {total} events before it was dropped (ended cleanly: {}, error: {:?}, body bytes: {})",
                first.len(),
                slow.ended_cleanly(),
                slow.error(),
                slow.body_text().len()
            );

            let last = first.last().map_or(0, |(s, _)| *s).to_string();
            let mut c = SseClient::connect(
                relay.addr(),
                &path,
                &[("Authorization", &auth), ("Last-Event-ID", &last)],
            )
            .await;
            assert_eq!(c.status, 200, "resume after the drop: {:?}", c.headers);
            let rest = c
                .collect_data_events(total - first.len(), Duration::from_secs(20), "resumed stream")
                .await;
            let mut all = first;
            all.extend(ids_data("resumed", &rest));
            assert_same_events("slow client, both connections", &all, &published);
            expect_live_next(&mut c, &js, "events.slow.2", "live", "live after the resume").await;
        },
    )
    .await
}

/// Reconnect storm: while one client keeps `events.storm` subscribed,
/// 500 clients resume at once from (last - 100). Each gets exactly the
/// 100 missed events, all from the memory window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_is_served_from_memory() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(50),
        "reconnect_storm_is_served_from_memory",
        async {
            const WANTED: u64 = 500;
            const HEADROOM: u64 = 300;
            let limit = open_file_limit();
            let clients = if limit >= WANTED + HEADROOM {
                WANTED
            } else {
                let n = limit.saturating_sub(HEADROOM);
                eprintln!(
                    "NOTE: `ulimit -n` is {limit}; the relay and this test each need one descriptor per client plus ~{HEADROOM}, so the storm is scaled down from {WANTED} to {n} clients"
                );
                n
            };
            assert!(
                clients >= 50,
                "`ulimit -n` is {limit}: too low for a meaningful storm (need at least {})",
                50 + HEADROOM
            );
            let clients = clients as usize;

            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let pattern = "events.storm";
            let tok = token(SECRET, &[pattern], 300);
            let auth = bearer(&tok);

            let mut keeper = relay.open_stream(&nats, &tok, &[pattern]).await;
            let published = publish_named(&js, &[pattern], "s", 200).await;
            let evs = keeper
                .collect_data_events(200, WAIT, "keeper client")
                .await;
            assert_same_events("keeper", &ids_data("keeper", &evs), &published);
            let from = published[99].0;
            let want = Arc::new(published[100..].to_vec());

            let mem0 = relay.metric("sse_relay_resumes_total", FROM_MEMORY).await;
            let jsr0 = relay.metric("sse_relay_resumes_total", FROM_JETSTREAM).await;
            let req0 = relay.metric("sse_relay_jetstream_requests_total", &[]).await;

            // At most 100 connection attempts in flight at a time.
            let gate = Arc::new(tokio::sync::Semaphore::new(100));
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..clients {
                let gate = gate.clone();
                let want = want.clone();
                let addr = relay.addr().to_string();
                let auth = auth.clone();
                let from = from.to_string();
                tasks.spawn(async move {
                    let permit = gate.acquire_owned().await.expect("semaphore");
                    let mut c = SseClient::connect(
                        &addr,
                        &events_path(&[pattern]),
                        &[("Authorization", &auth), ("Last-Event-ID", &from)],
                    )
                    .await;
                    drop(permit);
                    assert_eq!(c.status, 200, "storm client {i}: {:?}", c.headers);
                    let evs = c
                        .collect_data_events(100, Duration::from_secs(25), "storm client replay")
                        .await;
                    assert_same_events(
                        &format!("storm client {i}"),
                        &ids_data("storm", &evs),
                        &want,
                    );
                    c
                });
            }
            let mut open = Vec::with_capacity(clients);
            while let Some(r) = tasks.join_next().await {
                match r {
                    Ok(c) => open.push(c),
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(e) => panic!("storm client task: {e}"),
                }
            }

            // Nothing extra queued behind the 100: the next event is live.
            let marker = js_publish(&js, pattern, Bytes::from("marker")).await;
            let mut tasks = tokio::task::JoinSet::new();
            for (i, mut c) in open.into_iter().enumerate() {
                tasks.spawn(async move {
                    let ev = c.expect_data_event(WAIT, "marker after the storm").await;
                    assert_eq!(
                        (ev.seq(), ev.data.as_str()),
                        (marker, "marker"),
                        "storm client {i}: the next event after the replay"
                    );
                });
            }
            while let Some(r) = tasks.join_next().await {
                if let Err(e) = r {
                    if e.is_panic() {
                        std::panic::resume_unwind(e.into_panic());
                    }
                    panic!("marker task: {e}");
                }
            }

            let want_mem = mem0 + clients as f64;
            let mut mem = mem0;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while tokio::time::Instant::now() < deadline {
                mem = relay.metric("sse_relay_resumes_total", FROM_MEMORY).await;
                if mem >= want_mem {
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
            let jsr = relay.metric("sse_relay_resumes_total", FROM_JETSTREAM).await;
            let req = relay.metric("sse_relay_jetstream_requests_total", &[]).await;
            eprintln!(
                "storm of {clients}: resumes from memory +{}, from jetstream +{}, jetstream requests +{}",
                mem - mem0,
                jsr - jsr0,
                req - req0
            );
            assert_eq!(
                (mem - mem0, jsr - jsr0),
                (clients as f64, 0.0),
                "{clients} resumes inside the memory window: sse_relay_resumes_total{{source=\"memory\"}} should grow by {clients} and {{source=\"jetstream\"}} by 0"
            );
            assert_eq!(
                req - req0,
                0.0,
                "resumes served from memory must make no JetStream requests (sse_relay_jetstream_requests_total)"
            );
        },
    )
    .await
}

/// Fixed seed; `RESUME_FUZZ_SEED=<n>` replays another run.
const FUZZ_SEED: u64 = 0x5EED_F00D_2026_0001;

/// Four clients on overlapping wildcards keep hanging up at random moments
/// (also mid-replay) and resuming from their last id while 3,000 events are
/// published over random subjects; each ends with exactly the published
/// events matching its subjects, in order, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_reconnects_lose_and_duplicate_nothing() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(50),
        "randomized_reconnects_lose_and_duplicate_nothing",
        async {
            const N: usize = 3000;
            let seed = std::env::var("RESUME_FUZZ_SEED")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(FUZZ_SEED);
            eprintln!(
                "randomized_reconnects: seed {seed} ({seed:#x}); set RESUME_FUZZ_SEED=<decimal> to run another"
            );
            let deadline = tokio::time::Instant::now() + Duration::from_secs(40);

            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let tok = token(SECRET, &["events.>"], 300);

            const SUBJECTS: [&str; 7] = [
                "events.r.a.x",
                "events.r.a.y",
                "events.r.b.x",
                "events.r.b.y",
                "events.r.c.x",
                "events.r.a.x.deep",
                "events.q.a.x",
            ];
            let (_addr_tx, addr) = tokio::sync::watch::channel(relay.addr().to_string());
            let readers = Readers::spawn(
                &[
                    vec!["events.r.>"],
                    vec!["events.r.a.*"],
                    vec!["events.r.*.x"],
                    vec!["events.r.a.x", "events.r.b.*"],
                ],
                &ReaderConfig {
                    auth: bearer(&tok),
                    addr,
                    reconnect: true,
                    hang_up_seed: Some(seed),
                    deadline,
                },
            );

            // Publisher: bursts of 1..=40 pipelined publishes every 15 ms
            // (about 1,300 events/s), subjects picked at random.
            let mut rng = StdRng::seed_from_u64(seed);
            let mut published: Vec<StoredEvent> = Vec::with_capacity(N);
            let mut tick = tokio::time::interval(Duration::from_millis(15));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while published.len() < N {
                tick.tick().await;
                let burst = rng.random_range(1..=40).min(N - published.len());
                let items: Vec<(String, Bytes)> = (0..burst)
                    .map(|k| {
                        let s = SUBJECTS[rng.random_range(0..SUBJECTS.len())];
                        (
                            s.to_string(),
                            Bytes::from(format!("{}:{s}", published.len() + k)),
                        )
                    })
                    .collect();
                for ((seq, payload), (subject, _)) in publish_all(&js, &items).await.into_iter().zip(&items) {
                    published.push(StoredEvent { seq, subject: subject.clone(), payload });
                }
            }
            eprintln!("published {N} events");

            for rep in readers.finish(&published).await {
                rep.assert_complete();
                assert_eq!(rep.refused, 0, "{}: the relay refused connections", rep.name);
                assert!(
                    rep.connections >= 10,
                    "{}: only {} connections; the test should exercise many resumes",
                    rep.name,
                    rep.connections
                );
            }
        },
    )
    .await
}

/// Clients that hang up in the middle of a JetStream replay give its read
/// back. A shard runs at most 32 client reads at once; a replay waiting for
/// room in the queue of a client that left would wait forever (nothing
/// drains it) and keep its read, and with 32 kept every later resume would
/// stay open and silent. Here 33 clients resume from 0 over more history
/// than the socket buffers hold (so no replay can end while they read
/// nothing) and hang up; a resume after them still gets its 100 events
/// (more than half of `--client-queue 16`: from JetStream, not memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hang_ups_during_replays_do_not_stall_later_resumes() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(60),
        "hang_ups_during_replays_do_not_stall_later_resumes",
        async {
            const CONCURRENT_READS: usize = 32;
            // Small events: 33 reads of 1,000-message batches stay within
            // what NATS lets a connection have pending.
            const SIZE: usize = 1 << 10;
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &["--client-queue", "16"], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let pattern = "events.left";
            let tok = token(SECRET, &[pattern], 300);
            let auth = bearer(&tok);
            let path = events_path(&[pattern]);

            // The relay's send buffer autotunes up to tcp_wmem's max; the
            // client's 4 KiB receive buffer and hyper's read buffer hold
            // little more: 1 MiB over that bound cannot all be written.
            let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
                .ok()
                .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
                .unwrap_or(4 << 20);
            let n = (wmem_max + (1 << 20)) / SIZE + 1;
            let items: Vec<(String, Bytes)> = (0..n)
                .map(|i| {
                    let mut p = format!("{i:06}-").into_bytes();
                    p.resize(SIZE, b'x');
                    (pattern.to_string(), Bytes::from(p))
                })
                .collect();
            let published = publish_all(&js, &items).await;

            let mut left = Vec::new();
            for i in 0..=CONCURRENT_READS {
                let c = SseClient::connect_with_rcvbuf(
                    relay.addr(),
                    &path,
                    &[("Authorization", &auth), ("Last-Event-ID", "0")],
                    4096,
                )
                .await;
                assert_eq!(c.status, 200, "replayed client {i}: {:?}", c.headers);
                left.push(c);
            }
            drop(left);

            let from = published[n - 101].0.to_string();
            let mut c = SseClient::connect(
                relay.addr(),
                &path,
                &[("Authorization", &auth), ("Last-Event-ID", &from)],
            )
            .await;
            assert_eq!(c.status, 200, "resume after the hang-ups: {:?}", c.headers);
            // Within less than the relay's 10 s read timeout: a resume that
            // got its read only because a stuck one timed out still fails.
            let evs = c
                .collect_data_events(
                    100,
                    Duration::from_secs(5),
                    "resume after 33 hang-ups mid-replay",
                )
                .await;
            assert_same_events(
                "resume after 33 hang-ups mid-replay",
                &ids_data("resume", &evs),
                &published[n - 100..],
            );
        },
    )
    .await
}

/// A storm on a relay whose window does not reach back far enough (it
/// subscribed after the events were stored, as right after a restart):
/// the first resume reads the missing range once into the window and the
/// others wait for it, instead of each opening a JetStream consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_window_storm_reads_jetstream_once() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(50),
        "cold_window_storm_reads_jetstream_once",
        async {
            let clients = (open_file_limit().saturating_sub(300) as usize).min(300);
            assert!(clients >= 50, "`ulimit -n` too low for a storm");
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let pattern = "events.cold";
            let tok = token(SECRET, &[pattern], 300);
            let auth = bearer(&tok);

            // Stored before the relay subscribes: not in its window. No
            // client holds the subject, so the storm itself subscribes.
            let published = publish_named(&js, &[pattern], "c", 200).await;
            let from = published[99].0;
            let want = Arc::new(published[100..].to_vec());

            let mem0 = relay.metric("sse_relay_resumes_total", FROM_MEMORY).await;
            let jsr0 = relay
                .metric("sse_relay_resumes_total", FROM_JETSTREAM)
                .await;
            let req0 = relay
                .metric("sse_relay_jetstream_requests_total", &[])
                .await;

            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..clients {
                let want = want.clone();
                let addr = relay.addr().to_string();
                let auth = auth.clone();
                let from = from.to_string();
                tasks.spawn(async move {
                    let mut c = SseClient::connect(
                        &addr,
                        &events_path(&[pattern]),
                        &[("Authorization", &auth), ("Last-Event-ID", &from)],
                    )
                    .await;
                    assert_eq!(c.status, 200, "storm client {i}: {:?}", c.headers);
                    let evs = c
                        .collect_data_events(100, Duration::from_secs(25), "cold storm replay")
                        .await;
                    assert_same_events(
                        &format!("cold storm client {i}"),
                        &ids_data("cold", &evs),
                        &want,
                    );
                });
            }
            while let Some(r) = tasks.join_next().await {
                if let Err(e) = r {
                    std::panic::resume_unwind(e.into_panic());
                }
            }
            let mem = relay.metric("sse_relay_resumes_total", FROM_MEMORY).await - mem0;
            let jsr = relay
                .metric("sse_relay_resumes_total", FROM_JETSTREAM)
                .await
                - jsr0;
            let req = relay
                .metric("sse_relay_jetstream_requests_total", &[])
                .await
                - req0;
            assert_eq!(
                (mem, jsr),
                (clients as f64, 0.0),
                "every resume served from the window once filled"
            );
            assert!(
                req <= 4.0,
                "one window fill, not one consumer per client: {req} JetStream requests"
            );
        },
    )
    .await
}

fn relay_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .expect("relay VmRSS")
}

/// A client that stops reading while 10,000 events of 1 KiB flow: it is
/// dropped, the relay's memory does not grow with its backlog, a reading
/// client gets everything, and the stalled one's resume returns the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_client_under_10k_kib_events_is_dropped_with_bounded_memory() {
    let _load = load_group(module_path!()).await;
    within(
        Duration::from_secs(55),
        "stalled_client_under_10k_kib_events_is_dropped_with_bounded_memory",
        async {
            const N: usize = 10_000;
            let nats = NatsServer::start().await;
            // A small window, so that a backlog held for the stalled client
            // (10 MiB if its queue were unbounded) would show in RSS.
            let relay = Relay::start(&nats.url(), &["--replay-cache-bytes", "1048576"], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let pattern = "events.stall.>";
            let tok = token(SECRET, &[pattern], 300);
            let auth = bearer(&tok);
            let path = events_path(&[pattern]);

            let mut stalled = SseClient::connect_with_rcvbuf(
                relay.addr(),
                &path,
                &[("Authorization", &auth)],
                4096,
            )
            .await;
            assert_eq!(stalled.status, 200);
            let mut reader = relay.open_stream(&nats, &tok, &[pattern]).await;
            // The reader reports its progress; the publisher stays at most
            // 512 events ahead of it, so the reader is never slow itself.
            let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
            let collect = tokio::spawn(async move {
                let mut got = Vec::with_capacity(N);
                while got.len() < N {
                    match reader.next_data_event(Duration::from_secs(20)).await {
                        Some(ev) => got.push(ev),
                        None => panic!("reading client: stream ended after {} events", got.len()),
                    }
                    let _ = progress_tx.send(got.len());
                }
                got
            });
            let rss0 = relay_rss_kib(relay.pid());
            let mut peak = rss0;
            let mut published = Vec::with_capacity(N);
            for batch in 0..N / 100 {
                let items: Vec<(String, Bytes)> = (batch * 100..(batch + 1) * 100)
                    .map(|i| {
                        let mut p = format!("{i:06}-").into_bytes();
                        p.resize(1024, b'x');
                        ("events.stall.1".to_string(), Bytes::from(p))
                    })
                    .collect();
                published.extend(publish_all(&js, &items).await);
                let ahead = published.len().saturating_sub(512);
                tokio::time::timeout(Duration::from_secs(20), progress.wait_for(|n| *n >= ahead))
                    .await
                    .expect("reader keeps up within 20 s")
                    .expect("reader task alive");
                peak = peak.max(relay_rss_kib(relay.pid()));
            }
            let got = collect.await.expect("reading client task");
            assert_same_events("reading client", &ids_data("reader", &got), &published);
            peak = peak.max(relay_rss_kib(relay.pid()));
            // Two queues of at most 1,024 x ~1 KiB, the 1 MiB window and
            // allocator slack; an unbounded backlog would add ~10 MiB.
            eprintln!("relay RSS grew {} KiB with a client stalled", peak - rss0);
            assert!(
                peak - rss0 < 8 * 1024,
                "relay RSS grew {} KiB while a client was stalled",
                peak - rss0
            );

            let first = stalled
                .data_events_until_closed(Duration::from_secs(15))
                .await;
            assert!(
                stalled.is_closed(),
                "the stalled client must have been dropped"
            );
            assert!(first.len() < N, "dropped before it had everything");
            let first = ids_data("stalled before the drop", &first);
            assert_same_events("stalled client prefix", &first, &published[..first.len()]);
            let last = first.last().map_or(0, |(s, _)| *s).to_string();
            let mut again = SseClient::connect(
                relay.addr(),
                &path,
                &[("Authorization", &auth), ("Last-Event-ID", &last)],
            )
            .await;
            let rest = again
                .collect_data_events(N - first.len(), Duration::from_secs(20), "resumed")
                .await;
            let mut all = first;
            all.extend(ids_data("resumed", &rest));
            assert_same_events("stalled client, both connections", &all, &published);
        },
    )
    .await
}

/// A client whose patterns overlap (one inside another, or two wildcards
/// sharing subjects) resumes from the stream like any other: JetStream
/// refuses a consumer with overlapping filter subjects, so the relay must
/// not ask for one. Each event once, in order; `initial=last` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_patterns_resume_from_the_stream() {
    within(
        Duration::from_secs(60),
        "overlapping_patterns_resume_from_the_stream",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let subjects = [
                "events.ov.a.1",
                "events.ov.b.1",
                "events.ov.a.2",
                "events.ov.b.2",
            ];
            let items: Vec<(String, Bytes)> = (0..40)
                .map(|i| {
                    let s = subjects[i % subjects.len()];
                    (s.to_string(), Bytes::from(format!("{i}:{s}")))
                })
                .collect();
            // Stored before any client subscribed: no memory window has them.
            let published = publish_all(&js, &items).await;
            let auth = bearer(&token(SECRET, &["events.>"], 300));
            for patterns in [
                &["events.ov.>", "events.ov.a.1"][..],
                &["events.ov.a.*", "events.ov.*.1"][..],
                &["events.ov.a.*", "events.ov.*.1", "events.ov.b.2"][..],
            ] {
                let what = format!("resume from 0 on {patterns:?}");
                let expected: Vec<(u64, String)> = published
                    .iter()
                    .zip(&items)
                    .filter(|(_, (s, _))| matches_any(patterns, s))
                    .map(|(p, _)| p.clone())
                    .collect();
                let mut c = SseClient::connect(
                    relay.addr(),
                    &events_path(patterns),
                    &[("Authorization", &auth), ("Last-Event-ID", "0")],
                )
                .await;
                assert_eq!(c.status, 200, "{what}: {:?}", c.headers);
                let evs = c.collect_data_events(expected.len(), WAIT, &what).await;
                assert_same_events(&what, &ids_data(&what, &evs), &expected);

                let what = format!("initial=last on {patterns:?}");
                let mut last_per_subject: Vec<(u64, String)> = subjects
                    .iter()
                    .filter(|s| matches_any(patterns, s))
                    .filter_map(|s| {
                        let i = items.iter().rposition(|(x, _)| x == s)?;
                        Some(published[i].clone())
                    })
                    .collect();
                last_per_subject.sort();
                let path = with_query(&events_path(patterns), &[("initial", "last")]);
                let mut c =
                    SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await;
                assert_eq!(c.status, 200, "{what}: {:?}", c.headers);
                let evs = c
                    .collect_data_events(last_per_subject.len(), WAIT, &what)
                    .await;
                assert_same_events(&what, &ids_data(&what, &evs), &last_per_subject);
            }
        },
    )
    .await
}
