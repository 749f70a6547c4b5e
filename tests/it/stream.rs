//! Streaming behaviour of `GET /events` against a real nats-server.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_has_sse_headers_and_starts_with_retry() {
    within(
        TEST_LIMIT,
        "stream_has_sse_headers_and_starts_with_retry",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let tok = token(SECRET, &["events.orders.>"], 300);
            let mut c = relay.open_stream(&nats, &tok, &["events.orders.>"]).await;

            let ct = c.header("content-type").unwrap_or_default().to_string();
            assert!(
                ct.starts_with("text/event-stream"),
                "Content-Type should be text/event-stream, got {ct:?}"
            );
            assert!(
                c.header("cache-control")
                    .is_some_and(|v| v.contains("no-store")),
                "Cache-Control should be no-store (private data), got {:?}",
                c.header("cache-control")
            );
            assert_eq!(
                c.header("x-accel-buffering"),
                Some("no"),
                "X-Accel-Buffering should be `no`"
            );
            assert_eq!(c.header("x-content-type-options"), Some("nosniff"));

            let first = c.next_event(WAIT).await.expect("a first block");
            assert_eq!(
                first.retry,
                Some(2000),
                "the first block should be `retry: 2000` (default --retry-ms), got {first:?}"
            );
            assert!(
                !first.has_data,
                "the retry block should carry no data: {first:?}"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_ms_flag_sets_retry_field() {
    within(TEST_LIMIT, "retry_ms_flag_sets_retry_field", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &["--retry-ms", "3500"]).await;
        let tok = token(SECRET, &["events.x.>"], 300);
        let mut c = relay.open_stream(&nats, &tok, &["events.x.>"]).await;
        let first = c.next_event(WAIT).await.expect("a first block");
        assert_eq!(first.retry, Some(3500), "first block: {first:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_publish_is_delivered_with_stream_sequence_id() {
    within(
        TEST_LIMIT,
        "core_publish_is_delivered_with_stream_sequence_id",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let tok = token(SECRET, &["events.orders.>"], 300);
            let mut c = relay.open_stream(&nats, &tok, &["events.orders.>"]).await;

            nats.publish_core([(
                "events.orders.1",
                Bytes::from_static(br#"{"status":"shipped"}"#),
            )])
            .await;

            let ev = c.expect_data_event(WAIT, "core publish").await;
            assert_eq!(ev.data, r#"{"status":"shipped"}"#);
            assert_eq!(
                ev.event, None,
                "no Sse-Event header, so no event field: {ev:?}"
            );

            let js = async_nats::jetstream::new(nats.client().await);
            let mut stream = js.get_stream("EVENTS").await.expect("stream EVENTS exists");
            let last = stream.info().await.unwrap().state.last_sequence;
            assert_eq!(ev.seq(), last, "id must be the JetStream stream sequence");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_publish_id_equals_ack_sequence() {
    within(
        TEST_LIMIT,
        "jetstream_publish_id_equals_ack_sequence",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let tok = token(SECRET, &["events.orders.>"], 300);
            let mut c = relay.open_stream(&nats, &tok, &["events.orders.>"]).await;

            let js = async_nats::jetstream::new(nats.client().await);
            let mut acks = Vec::new();
            for i in 0..5 {
                let ack = js
                    .publish(format!("events.orders.{i}"), Bytes::from(format!("js-{i}")))
                    .await
                    .unwrap()
                    .await
                    .unwrap();
                acks.push(ack.sequence);
            }
            let evs = c.collect_data_events(5, WAIT, "jetstream publishes").await;
            for (i, (ev, seq)) in evs.iter().zip(&acks).enumerate() {
                assert_eq!(
                    ev.seq(),
                    *seq,
                    "id of event {i} must equal the ack sequence"
                );
                assert_eq!(ev.data, format!("js-{i}"));
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_event_header_sets_event_field() {
    within(TEST_LIMIT, "sse_event_header_sets_event_field", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        let tok = token(SECRET, &["events.orders.>"], 300);
        let mut c = relay.open_stream(&nats, &tok, &["events.orders.>"]).await;

        let client = nats.client().await;
        client
            .publish_with_headers(
                "events.orders.7",
                sse_event_headers("order.shipped"),
                Bytes::from_static(b"{\"id\":7}"),
            )
            .await
            .unwrap();
        client
            .publish("events.orders.8", Bytes::from_static(b"plain"))
            .await
            .unwrap();
        client.flush().await.unwrap();

        let named = c.expect_data_event(WAIT, "named event").await;
        assert_eq!(named.event.as_deref(), Some("order.shipped"), "{named:?}");
        assert_eq!(named.data, "{\"id\":7}");
        let plain = c.expect_data_event(WAIT, "plain event").await;
        assert_eq!(
            plain.event, None,
            "no Sse-Event header, no event field: {plain:?}"
        );
        assert_eq!(plain.data, "plain");
        assert!(plain.seq() > named.seq());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_line_payloads_round_trip() {
    within(TEST_LIMIT, "multi_line_payloads_round_trip", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        let tok = token(SECRET, &["events.text.>"], 300);
        let mut c = relay.open_stream(&nats, &tok, &["events.text.>"]).await;

        // (payload, what a WHATWG parser must hand to the page)
        let cases: [(&str, &str); 7] = [
            ("line1\nline2", "line1\nline2"),
            ("a\r\nb\rc", "a\nb\nc"),
            ("trailing\n", "trailing\n"),
            ("", ""),
            ("emoji 🚀 ünïcödé", "emoji 🚀 ünïcödé"),
            ("\n\nx", "\n\nx"),
            ("data: fake\n\nid: 999", "data: fake\n\nid: 999"),
        ];
        nats.publish_core(cases.iter().map(|(p, _)| ("events.text.1", p.to_string())))
            .await;

        let mut last = 0;
        for (p, want) in &cases {
            let ev = c.expect_data_event(WAIT, &format!("payload {p:?}")).await;
            assert_eq!(&ev.data, want, "payload {p:?} did not round-trip: {ev:?}");
            assert!(ev.seq() > last, "ids must increase: {ev:?}");
            last = ev.seq();
        }
    })
    .await
}

/// Property: arbitrary text (with LF, CR, CRLF, unicode, `data:`-like
/// content) survives the relay, up to CR/CRLF becoming LF.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arbitrary_payloads_round_trip() {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;

    let piece = prop_oneof![
        "[a-z :]{0,6}",
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("\r".to_string()),
        any::<char>().prop_map(String::from),
    ];
    let payload = proptest::collection::vec(piece, 0..12).prop_map(|v| v.concat());
    let mut runner = TestRunner::deterministic();
    let payloads: Vec<String> = (0..60)
        .map(|_| payload.new_tree(&mut runner).unwrap().current())
        .collect();

    within(TEST_LIMIT, "arbitrary_payloads_round_trip", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        let tok = token(SECRET, &["events.prop.>"], 300);
        let mut c = relay.open_stream(&nats, &tok, &["events.prop.>"]).await;
        nats.publish_core(payloads.iter().map(|p| ("events.prop.x", p.clone())))
            .await;
        let evs = c
            .collect_data_events(payloads.len(), WAIT, "generated payloads")
            .await;
        for (p, ev) in payloads.iter().zip(&evs) {
            assert_eq!(
                ev.data,
                sse_normalized(p),
                "payload {p:?} did not round-trip"
            );
        }
    })
    .await
}

/// `subject=` filters delivery to matching subjects, whether the `*` is
/// sent literally or percent-encoded as `%2A` (the query helper sends it
/// literally).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_param_filters_delivery() {
    within(TEST_LIMIT, "subject_param_filters_delivery", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        let tok = token(SECRET, &["events.>"], 300);
        let auth = bearer(&tok);
        let mut clients = Vec::new();
        for path in [
            "/events?subject=events.orders.*",
            "/events?subject=events.orders.%2A",
        ] {
            let c = SseClient::connect(relay.addr(), path, &[("Authorization", &auth)]).await;
            assert_eq!(c.status, 200, "{path}: {:?}", c.headers);
            clients.push((path, c));
        }
        nats.wait_relay_subs(&["events.orders.*"], WAIT).await;

        nats.publish_core([
            ("events.users.1", "u1"),
            ("events.orders.1", "o1"),
            ("events.orders.1.deep", "deep"),
            ("events.orders.2", "o2"),
        ])
        .await;
        for (path, c) in &mut clients {
            let a = c.expect_data_event(WAIT, "first order").await;
            let b = c.expect_data_event(WAIT, "second order").await;
            assert_eq!(
                (a.data.as_str(), b.data.as_str()),
                ("o1", "o2"),
                "{path}: only events.orders.* must be delivered"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_subject_param_streams_all_token_subjects() {
    within(
        TEST_LIMIT,
        "no_subject_param_streams_all_token_subjects",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let tok = token(SECRET, &["events.x.>", "events.y.*"], 300);
            let auth = bearer(&tok);
            let mut c =
                SseClient::connect(relay.addr(), "/events", &[("Authorization", &auth)]).await;
            assert_eq!(c.status, 200, "{:?}", c.headers);
            nats.wait_relay_subs(&["events.x.>", "events.y.*"], WAIT)
                .await;

            nats.publish_core([
                ("events.x.1.2", "x"),
                ("events.z.1", "z-not-granted"),
                ("events.y.1", "y"),
            ])
            .await;
            let a = c.expect_data_event(WAIT, "x event").await;
            let b = c.expect_data_event(WAIT, "y event").await;
            assert_eq!((a.data.as_str(), b.data.as_str()), ("x", "y"));
            assert!(b.seq() > a.seq());
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_token_authorizes() {
    within(TEST_LIMIT, "query_token_authorizes", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        let tok = token(SECRET, &["events.q.>"], 300);
        let path = with_query("/events", &[("subject", "events.q.>"), ("token", &tok)]);
        let mut c = SseClient::connect(relay.addr(), &path, &[]).await;
        assert_eq!(c.status, 200, "{:?}", c.headers);
        nats.wait_relay_subs(&["events.q.>"], WAIT).await;
        nats.publish_core([("events.q.1", "q")]).await;
        assert_eq!(c.expect_data_event(WAIT, "query token").await.data, "q");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_token_authorizes() {
    within(TEST_LIMIT, "cookie_token_authorizes", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        let tok = token(SECRET, &["events.c.>"], 300);
        let cookie = format!("theme=dark; relay_token={tok}; other=1");
        let mut c = SseClient::connect(
            relay.addr(),
            &events_path(&["events.c.>"]),
            &[("Cookie", &cookie)],
        )
        .await;
        assert_eq!(c.status, 200, "cookie auth: {:?}", c.headers);
        nats.wait_relay_subs(&["events.c.>"], WAIT).await;
        nats.publish_core([("events.c.1", "c")]).await;
        assert_eq!(c.expect_data_event(WAIT, "cookie token").await.data, "c");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_header_wins_over_query_token() {
    within(TEST_LIMIT, "bearer_header_wins_over_query_token", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        let good_a = token(SECRET, &["events.a.>"], 300);
        let good_b = token(SECRET, &["events.b.>"], 300);
        let bad = token("some-other-secret-entirely-000000", &["events.a.>"], 300);

        // Valid header + invalid query token: the header is used.
        let path = with_query("/events", &[("subject", "events.a.>"), ("token", &bad)]);
        let c =
            SseClient::connect(relay.addr(), &path, &[("Authorization", &bearer(&good_a))]).await;
        assert_eq!(
            c.status, 200,
            "valid Bearer must win over a bad query token"
        );
        drop(c);

        // Invalid header + valid query token: still the header, so 401.
        let path = with_query("/events", &[("subject", "events.a.>"), ("token", &good_a)]);
        let r = http_get(relay.addr(), &path, &[("Authorization", &bearer(&bad))]).await;
        assert_401(&r, "bad Bearer with a good query token");

        // Header grants a, query grants b, request b: the header decides (403).
        let path = with_query("/events", &[("subject", "events.b.>"), ("token", &good_b)]);
        let r = http_get(relay.addr(), &path, &[("Authorization", &bearer(&good_a))]).await;
        assert_json_error(&r, 403, "Bearer grants only events.a.>");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_comments_on_idle_stream() {
    within(TEST_LIMIT, "heartbeat_comments_on_idle_stream", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &["--heartbeat", "1"]).await;
        let tok = token(SECRET, &["events.idle.>"], 300);
        let mut c = relay.open_stream(&nats, &tok, &["events.idle.>"]).await;
        assert!(
            c.wait_comments(2, Duration::from_secs(6)).await,
            "expected >= 2 heartbeat comments within 6 s with --heartbeat 1, got {} (closed: {})",
            c.comment_count(),
            c.is_closed()
        );
        assert!(!c.is_closed(), "an idle stream must stay open");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiry_mid_stream_sends_expired_event_then_ends() {
    within(TEST_LIMIT, "token_expiry_mid_stream_sends_expired_event_then_ends", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &["--jwt-leeway", "0"]).await;
        // now + 2 s, rounded up to whole seconds (exp has 1 s resolution).
        let exp = (now_secs_f64() + 2.0).ceil() as i64;
        let tok = token_with_claims(serde_json::json!({
            "exp": exp, "sub": "test", "subjects": ["events.exp.>"]
        }));
        let mut c = relay.open_stream(&nats, &tok, &["events.exp.>"]).await;

        let ev = loop {
            match c.next_event(Duration::from_secs(8)).await {
                Some(ev) if ev.event.as_deref() == Some("relay.expired") => break ev,
                Some(_) => continue,
                None => panic!(
                    "no `event: relay.expired` within 8 s (closed: {}, at {:.3}, exp {exp}); body: {:?}",
                    c.is_closed(),
                    now_secs_f64(),
                    c.body_text()
                ),
            }
        };
        let at = now_secs_f64();
        assert!(
            at >= exp as f64,
            "relay.expired arrived at {at:.3}, before exp {exp}"
        );
        assert_eq!(ev.data.trim(), "{}", "relay.expired data should be {{}}: {ev:?}");
        assert!(
            c.wait_closed(Duration::from_secs(5)).await,
            "the stream must end after relay.expired"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_shared_by_twenty_clients() {
    within(
        TEST_LIMIT,
        "one_subscription_shared_by_twenty_clients",
        async {
            let nats = NatsServer::start().await;
            // Short heartbeat so closed connections are noticed on write.
            let relay = InProcessRelay::start(&nats.url(), &["--heartbeat", "1"]).await;
            let tok = token(SECRET, &["events.shared.>"], 300);
            let mut clients = Vec::new();
            for _ in 0..20 {
                clients.push(relay.open_stream(&nats, &tok, &["events.shared.>"]).await);
            }
            let subs = nats.connz_subs().await;
            let n = subs
                .iter()
                .filter(|s| *s == "relay.events.shared.>")
                .count();
            assert_eq!(
                n, 1,
                "20 clients on one pattern must share ONE subscription; subscriptions: {subs:?}"
            );

            nats.publish_core([("events.shared.1", "hello all")]).await;
            for (i, c) in clients.iter_mut().enumerate() {
                let ev = c.expect_data_event(WAIT, &format!("client {i}")).await;
                assert_eq!(ev.data, "hello all");
            }

            drop(clients);
            wait_until(
                Duration::from_secs(10),
                "relay.events.shared.> to disappear after all 20 clients disconnected",
                || async { nats.sub_count("relay.events.shared.>").await == 0 },
            )
            .await;
        },
    )
    .await
}

/// Reads `n` data events on its own task so the relay never sees a slow reader.
fn spawn_collector(
    mut c: SseClient,
    n: usize,
    limit: Duration,
    what: &'static str,
) -> tokio::task::JoinHandle<(Vec<SseEvent>, SseClient)> {
    tokio::spawn(async move {
        let evs = c.collect_data_events(n, limit, what).await;
        (evs, c)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_subjects_keep_order_and_increasing_ids() {
    let _load = load_group(module_path!()).await;
    within(
        TEST_LIMIT,
        "interleaved_subjects_keep_order_and_increasing_ids",
        async {
            const N: usize = 5000;
            let nats = NatsServer::start().await;
            // The burst is published with no pacing; a queue smaller than the
            // burst would make this a test of the test client's scheduling
            // (slow clients are covered by the slow-client test).
            let relay = InProcessRelay::start(&nats.url(), &["--client-queue", "8192"]).await;
            let tok = token(SECRET, &["events.>"], 300);
            let two = relay
                .open_stream(&nats, &tok, &["events.a.*", "events.b.*"])
                .await;
            let all = relay.open_stream(&nats, &tok, &["events.>"]).await;
            let t_two = spawn_collector(two, N, Duration::from_secs(25), "client on a.* + b.*");
            let t_all = spawn_collector(all, N, Duration::from_secs(25), "client on events.>");

            let client = nats.client().await;
            let mut expected = Vec::with_capacity(N);
            for i in 0..N {
                let (subject, payload) = if i % 2 == 0 {
                    (format!("events.a.{}", i % 7), format!("a-{i}"))
                } else {
                    (format!("events.b.{}", i % 5), format!("b-{i}"))
                };
                client
                    .publish(subject, Bytes::from(payload.clone()))
                    .await
                    .unwrap();
                expected.push(payload);
            }
            client.flush().await.unwrap();

            for (name, t) in [("a.*+b.*", t_two), ("events.>", t_all)] {
                let (evs, _c) = t.await.expect("collector task");
                let mut prev = 0u64;
                for (i, (ev, want)) in evs.iter().zip(&expected).enumerate() {
                    let seq = ev.seq();
                    assert!(
                        seq > prev,
                        "client {name}: id {seq} at #{i} not above previous {prev}"
                    );
                    prev = seq;
                    assert_eq!(&ev.data, want, "client {name}: payload #{i} out of order");
                }
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_dropped_fast_client_gets_everything() {
    let _load = load_group(module_path!()).await;
    within(TEST_LIMIT, "slow_client_is_dropped_fast_client_gets_everything", async {
        const N: usize = 3000;
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &["--client-queue", "16"]).await;
        let tok = token(SECRET, &["events.load.>"], 300);
        let path = events_path(&["events.load.>"]);
        let auth = bearer(&tok);

        let mut slow =
            SseClient::connect_with_rcvbuf(relay.addr(), &path, &[("Authorization", &auth)], 4096)
                .await;
        assert_eq!(slow.status, 200, "slow client: {:?}", slow.headers);
        let mut fast = relay.open_stream(&nats, &tok, &["events.load.>"]).await;

        // F reads on its own task and reports its progress. The publisher
        // never runs more than WINDOW (< --client-queue) events ahead of
        // what F has received, so F cannot legitimately overflow its queue
        // however the two cores are scheduled; S, which never reads, must.
        const WINDOW: usize = 8;
        let (progress_tx, mut progress) = tokio::sync::watch::channel(0usize);
        let t_fast = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
            let mut evs = Vec::with_capacity(N);
            while evs.len() < N {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match fast.next_data_event(left).await {
                    Some(ev) => {
                        evs.push(ev);
                        let _ = progress_tx.send(evs.len());
                    }
                    None => panic!(
                        "fast client: got {} of {N} events (closed: {}, error: {:?})",
                        evs.len(),
                        fast.is_closed(),
                        fast.error()
                    ),
                }
            }
            (evs, fast)
        });

        let js = async_nats::jetstream::new(nats.client().await);
        let mut seqs = Vec::with_capacity(N);
        for i in 0..N {
            let waited = tokio::time::timeout(
                Duration::from_secs(10),
                progress.wait_for(|&got| got + WINDOW > i),
            )
            .await
            .map(|r| r.is_ok());
            match waited {
                Ok(true) => {}
                // The collector ended (it panicked): its panic is reported below.
                Ok(false) => break,
                Err(_) => panic!(
                    "fast client stalled: {} received, publishing #{i}",
                    *progress.borrow()
                ),
            }
            let mut p = format!("{i:06}-").into_bytes();
            p.resize(1024, b'x');
            let ack = js
                .publish("events.load.1", Bytes::from(p))
                .await
                .unwrap()
                .await
                .unwrap();
            seqs.push(ack.sequence);
        }

        let (evs, _fast) = t_fast.await.expect("fast collector");
        for (i, (ev, seq)) in evs.iter().zip(&seqs).enumerate() {
            assert_eq!(ev.seq(), *seq, "fast client: id of #{i}");
            assert!(ev.data.starts_with(&format!("{i:06}-")), "fast client: payload #{i}");
        }

        // Now the slow client reads: it must find its stream ended early.
        let mut got = 0usize;
        let mut prev = 0u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match slow.next_data_event(left).await {
                Some(ev) => {
                    assert!(ev.seq() > prev, "slow client ids must increase");
                    prev = ev.seq();
                    got += 1;
                }
                None => break,
            }
        }
        eprintln!("slow client read {got} of {N} events before its stream ended");
        assert!(
            slow.is_closed(),
            "the slow client's stream should have been ended by the relay (read {got} events, still open)"
        );
        assert!(
            got < N,
            "the slow client should have been dropped before receiving all {N} events (got {got})"
        );
    })
    .await
}

/// `relay.live` marks where a stream is live: right after a fresh stream's
/// subscriptions are active (naming, also as `id:`, where it starts: the
/// stream's last sequence then), and at the seam of a resume, after the
/// replay (naming the last replayed id, with no `id:`).
/// `heartbeat=event` makes the heartbeat an event a page can see.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_live_and_visible_heartbeats() {
    within(TEST_LIMIT, "relay_live_and_visible_heartbeats", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &["--heartbeat", "1"]).await;
        let js = async_nats::jetstream::new(nats.client().await);
        let tok = token(SECRET, &["events.live.>"], 300);
        let auth = bearer(&tok);

        // Stored before the stream opens: not for it.
        let before = js_publish(&js, "events.live.old", Bytes::from("old")).await;
        let path = with_query(&events_path(&["events.live.>"]), &[("heartbeat", "event")]);
        let mut fresh = SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await;
        assert_eq!(fresh.status, 200);
        let retry = fresh.next_event(WAIT).await.expect("retry");
        assert!(retry.retry.is_some());
        let live = fresh.next_event(WAIT).await.expect("relay.live");
        assert_eq!(live.event.as_deref(), Some("relay.live"), "{live:?}");
        let at = before.to_string();
        assert_eq!(
            live.id.as_deref(),
            Some(at.as_str()),
            "a fresh stream's start, for a reconnect before its first event"
        );
        assert_eq!(live.data, format!(r#"{{"last_event_id":{before}}}"#));
        let beat = fresh
            .next_event(Duration::from_secs(4))
            .await
            .expect("a heartbeat");
        assert_eq!(beat.event.as_deref(), Some("relay.heartbeat"), "{beat:?}");
        assert_eq!(beat.id, None);

        // A resume: replayed events, then the marker, then live events.
        let mut seqs = Vec::new();
        for i in 0..3 {
            let ack = js
                .publish("events.live.a", Bytes::from(format!("e{i}")))
                .await
                .unwrap()
                .await
                .unwrap();
            seqs.push(ack.sequence);
        }
        let after = seqs[0].to_string();
        let mut resumed = SseClient::connect(
            relay.addr(),
            &events_path(&["events.live.>"]),
            &[("Authorization", &auth), ("Last-Event-ID", &after)],
        )
        .await;
        let mut order = Vec::new();
        while order.len() < 3 {
            let ev = resumed.next_event(WAIT).await.expect("an event");
            if let Some(id) = &ev.id {
                order.push(format!("id {id}"));
            } else if ev.event.as_deref() == Some("relay.live") {
                order.push(format!("live {}", ev.data));
            }
        }
        // The seam is wherever the replay ended: after the last event the
        // relay had when it resumed (the live copy of the newest may still
        // be on its way), and the marker names the id just before it.
        let seam = |k: usize| {
            let mut o: Vec<String> = seqs[1..].iter().map(|s| format!("id {s}")).collect();
            o.insert(k, format!(r#"live {{"last_event_id":{}}}"#, seqs[k]));
            o
        };
        assert!(
            order == seam(2) || order == seam(1),
            "the marker sits between the replay and live, naming the last replayed id: {order:?}"
        );
    })
    .await
}

/// `initial=last` sends a fresh stream the last stored event of every
/// subject it asked for, `initial=<n>` the last n, in increasing id order
/// and spliced to live; a resume wins over `initial`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_state_on_connect() {
    within(TEST_LIMIT, "initial_state_on_connect", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        let js = async_nats::jetstream::new(nats.client().await);
        let tok = token(SECRET, &["events.>"], 300);
        let auth = bearer(&tok);
        let mut seq = std::collections::HashMap::new();
        for (subject, payload) in [
            ("events.init.a", "a1"),
            ("events.init.b", "b1"),
            ("events.init.a", "a2"),
            ("events.other", "o1"),
            ("events.init.a", "a3"),
            ("events.init.b", "b2"),
        ] {
            let ack = js
                .publish(subject, Bytes::from(payload))
                .await
                .unwrap()
                .await
                .unwrap();
            seq.insert(payload, ack.sequence);
        }
        let open = |query: &'static [(&'static str, &'static str)],
                    extra: Option<(&'static str, String)>| {
            let (relay, auth) = (&relay, auth.clone());
            async move {
                let path = with_query(&events_path(&["events.init.>"]), query);
                let mut h = vec![("Authorization", auth)];
                if let Some((k, v)) = extra {
                    h.push((k, v));
                }
                let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
                SseClient::connect(relay.addr(), &path, &h).await
            }
        };
        let mut last = open(&[("initial", "last")], None).await;
        assert_eq!(last.status, 200);
        assert_eq!(
            data_of(&mut last, 2).await,
            [(seq["a3"], "a3".to_string()), (seq["b2"], "b2".to_string())],
            "the last event of each subject, in id order"
        );
        let live = js
            .publish("events.init.b", Bytes::from("b3"))
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(
            data_of(&mut last, 1).await,
            [(live.sequence, "b3".to_string())]
        );
        assert_eq!(
            last.markers.first().map(|m| m.data.clone()),
            Some(format!(r#"{{"last_event_id":{}}}"#, seq["b2"])),
            "relay.live after the initial events"
        );

        let mut two = open(&[("initial", "2")], None).await;
        assert_eq!(
            data_of(&mut two, 2).await,
            [
                (seq["b2"], "b2".to_string()),
                (live.sequence, "b3".to_string())
            ],
            "the last two matching events"
        );

        let mut resumed = open(
            &[("initial", "last")],
            Some(("Last-Event-ID", seq["a2"].to_string())),
        )
        .await;
        assert_eq!(
            data_of(&mut resumed, 3).await,
            [
                (seq["a3"], "a3".to_string()),
                (seq["b2"], "b2".to_string()),
                (live.sequence, "b3".to_string()),
            ],
            "a resume wins over initial"
        );

        let r = relay
            .get(
                &with_query(&events_path(&["events.init.>"]), &[("initial", "all")]),
                &[("Authorization", &auth), ("Accept", "application/json")],
            )
            .await;
        assert_json_error(&r, 400, "initial=all");
    })
    .await
}

/// `(id, data)` of the next `n` data events.
async fn data_of(c: &mut SseClient, n: usize) -> Vec<(u64, String)> {
    let evs = c.collect_data_events(n, WAIT, "data events").await;
    evs.into_iter().map(|e| (e.seq(), e.data)).collect()
}
