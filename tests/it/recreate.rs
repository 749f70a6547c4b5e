//! A stream deleted and created again under the same name numbers its
//! events from 1 again. Connected clients are told (`relay.reset`, `id: 0`)
//! and come back to the new stream's events; fresh clients get them; an id
//! beyond the stream's end (from the old stream, or a bogus one) gets 200
//! and the reset signal, never a status that kills a native EventSource.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;

const WAIT: Duration = Duration::from_secs(10);

/// Reads the next block that is not a retry-only one.
async fn next_block(c: &mut SseClient, what: &str) -> SseEvent {
    loop {
        let ev = c
            .next_event(WAIT)
            .await
            .unwrap_or_else(|| panic!("{what}: nothing within {WAIT:?}: {}", c.body_text()));
        if ev.has_data || ev.event.is_some() {
            return ev;
        }
    }
}

fn assert_reset(ev: &SseEvent, what: &str) {
    assert_eq!(
        (ev.event.as_deref(), ev.id.as_deref()),
        (Some("relay.reset"), Some("0")),
        "{what}: expected relay.reset with id 0, got {ev:?}"
    );
    let data: serde_json::Value = serde_json::from_str(&ev.data).expect("reset data is JSON");
    assert_eq!(data["reason"], "stream_recreated", "{what}");
}

async fn recreate_stream(js: &async_nats::jetstream::Context) {
    js.delete_stream("EVENTS").await.expect("delete the stream");
    js.create_stream(sse_relay::default_stream_config("EVENTS"))
        .await
        .expect("create the stream again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_beyond_the_stream_gets_relay_reset_then_the_stream() {
    within(
        Duration::from_secs(60),
        "an_id_beyond_the_stream_gets_relay_reset_then_the_stream",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let mut seqs = Vec::new();
            for i in 0..3 {
                seqs.push(js_publish(&js, "events.beyond.1", Bytes::from(format!("e{i}"))).await);
            }
            let auth = bearer(&token(SECRET, &["events.beyond.>"], 300));
            let path = events_path(&["events.beyond.>"]);
            let beyond = (seqs[2] + 1).to_string();
            let far = (seqs[2] + 1_000_000).to_string();
            for (how, path, headers) in [
                (
                    "header",
                    path.clone(),
                    vec![("Last-Event-ID", beyond.as_str())],
                ),
                (
                    "query",
                    with_query(&path, &[("last_event_id", &far)]),
                    vec![],
                ),
            ] {
                let mut headers = headers;
                headers.push(("Authorization", &auth));
                let mut c = SseClient::connect(relay.addr(), &path, &headers).await;
                assert_eq!(c.status, 200, "{how}: a native EventSource needs 200");
                assert_reset(&next_block(&mut c, how).await, how);
                let evs = c.collect_data_events(3, WAIT, how).await;
                let got: Vec<u64> = evs.iter().map(|e| e.seq()).collect();
                assert_eq!(got, seqs, "{how}: the stream from its beginning");
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_restarts_connected_resuming_and_fresh_clients() {
    within(
        Duration::from_secs(60),
        "a_recreated_stream_restarts_connected_resuming_and_fresh_clients",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let pattern = "events.re.>";
            let auth = bearer(&token(SECRET, &[pattern], 300));
            let path = events_path(&[pattern]);
            let mut connected =
                SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await;
            nats.wait_relay_subs(&[pattern], WAIT).await;
            let mut old = Vec::new();
            for i in 0..5 {
                old.push(js_publish(&js, "events.re.1", Bytes::from(format!("old{i}"))).await);
            }
            let got = connected.collect_data_events(5, WAIT, "old stream").await;
            assert_eq!(got.iter().map(|e| e.seq()).collect::<Vec<_>>(), old);

            recreate_stream(&js).await;
            // Published at once: whether they reach the relay before or
            // after it notices, nobody may miss them.
            let mut new = Vec::new();
            for i in 0..2 {
                new.push(js_publish(&js, "events.re.1", Bytes::from(format!("new{i}"))).await);
            }
            assert_eq!(new, [1, 2], "the new stream numbers from 1");

            // The connected client is told, then its stream ends.
            // Nothing of the new stream comes before it: its ids are
            // below the old ones this stream already carried.
            let ev = next_block(&mut connected, "connected client").await;
            assert_reset(&ev, "connected client");
            assert!(
                connected.wait_closed(WAIT).await,
                "the connected client's stream ends after relay.reset"
            );

            // It comes back with Last-Event-ID 0 (what `id: 0` set) and
            // gets the new stream from its first event.
            let mut back = SseClient::connect(
                relay.addr(),
                &path,
                &[("Authorization", &auth), ("Last-Event-ID", "0")],
            )
            .await;
            let evs = back
                .collect_data_events(2, WAIT, "back after the reset")
                .await;
            assert_eq!(evs.iter().map(|e| e.seq()).collect::<Vec<_>>(), new);

            // A client resuming with an old-stream id beyond the new end.
            let mut resuming = SseClient::connect(
                relay.addr(),
                &path,
                &[
                    ("Authorization", &auth),
                    ("Last-Event-ID", &old[4].to_string()),
                ],
            )
            .await;
            assert_eq!(resuming.status, 200);
            assert_reset(
                &next_block(&mut resuming, "resuming client").await,
                "resuming client",
            );
            let evs = resuming
                .collect_data_events(2, WAIT, "resuming client")
                .await;
            assert_eq!(evs.iter().map(|e| e.seq()).collect::<Vec<_>>(), new);

            // A fresh client gets what is published after it connected, as
            // do the others.
            let mut fresh =
                SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await;
            nats.wait_relay_subs(&[pattern], WAIT).await;
            let seq = js_publish(&js, "events.re.1", Bytes::from("after")).await;
            for (c, who) in [
                (&mut fresh, "fresh"),
                (&mut back, "back"),
                (&mut resuming, "resuming"),
            ] {
                let ev = c.expect_data_event(WAIT, who).await;
                assert_eq!((ev.seq(), ev.data.as_str()), (seq, "after"), "{who}");
            }
            assert_eq!(
                relay.metric("sse_relay_stream_resets_total", &[]).await,
                1.0
            );
        },
    )
    .await
}
