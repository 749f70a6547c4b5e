//! `POST /publish/<subject>`: HTTP publish for backends without a NATS
//! connection, scoped by the token's `publish` claim, acknowledged by
//! JetStream, idempotent by `Idempotency-Key`.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

fn publisher(patterns: &[&str]) -> String {
    token_with_claims(json!({
        "exp": now_secs() + 300,
        "sub": "backend",
        "subjects": [],
        "publish": patterns,
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_is_acknowledged_and_reaches_a_client() {
    within(
        TEST_LIMIT,
        "a_publish_is_acknowledged_and_reaches_a_client",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let reader = token(SECRET, &["events.pub.>"], 300);
            let mut c = relay.open_stream(&nats, &reader, &["events.pub.>"]).await;
            let auth = bearer(&publisher(&["events.pub.>"]));
            let r = request(
                relay.addr(),
                "POST",
                "/publish/events.pub.orders",
                &[("Authorization", &auth), ("Sse-Event", "order.shipped")],
                Some(br#"{"status":"shipped"}"#),
            )
            .await;
            assert_eq!(r.status, 200, "{}", r.body);
            let id = r.json()["id"].as_u64().expect("an id");
            assert_eq!(r.json()["duplicate"], false);
            let ev = c.expect_data_event(WAIT, "the published event").await;
            assert_eq!(ev.seq(), id, "the answer's id is the event's id");
            assert_eq!(ev.event.as_deref(), Some("order.shipped"));
            assert_eq!(ev.data, r#"{"status":"shipped"}"#);

            // A retried POST with the same Idempotency-Key is stored once.
            let retry = |body: &'static [u8]| {
                let (relay, auth) = (&relay, auth.clone());
                async move {
                    request(
                        relay.addr(),
                        "POST",
                        "/publish/events.pub.pay",
                        &[("Authorization", &auth), ("Idempotency-Key", "pay-42")],
                        Some(body),
                    )
                    .await
                }
            };
            let first = retry(b"paid").await;
            let again = retry(b"paid").await;
            assert_eq!((first.status, again.status), (200, 200));
            assert_eq!(
                first.json()["id"],
                again.json()["id"],
                "same id for the retry"
            );
            assert_eq!(again.json()["duplicate"], true);
            let ev = c.expect_data_event(WAIT, "the idempotent event").await;
            assert_eq!(ev.data, "paid");
            let stored = stream_contents(
                &async_nats::jetstream::new(nats.client().await),
                "EVENTS",
                WAIT,
            )
            .await;
            assert_eq!(stored.len(), 2, "two publishes stored, the retry not");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_refusals_have_their_status() {
    within(TEST_LIMIT, "publish_refusals_have_their_status", async {
        let nats = NatsServer::start().await;
        let relay =
            InProcessRelay::start(&nats.url(), &["--cors-origins", "https://app.example"]).await;
        let post = |path: &'static str, auth: Option<String>, body: Vec<u8>| {
            let relay = &relay;
            async move {
                let mut h = vec![];
                if let Some(a) = &auth {
                    h.push(("Authorization", a.as_str()));
                }
                request(relay.addr(), "POST", path, &h, Some(&body)).await
            }
        };
        let ok = Some(bearer(&publisher(&["events.pub.>"])));
        assert_401(
            &post("/publish/events.pub.a", None, b"x".to_vec()).await,
            "no token",
        );
        let reader_only = Some(bearer(&token(SECRET, &["events.pub.>"], 300)));
        assert_json_error(
            &post("/publish/events.pub.a", reader_only, b"x".to_vec()).await,
            403,
            "a reading token",
        );
        let narrow = Some(bearer(&publisher(&["events.pub.a"])));
        assert_json_error(
            &post("/publish/events.pub.b", narrow, b"x".to_vec()).await,
            403,
            "outside the grant",
        );
        assert_json_error(
            &post("/publish/events.pub.*", ok.clone(), b"x".to_vec()).await,
            400,
            "a wildcard",
        );
        assert_json_error(
            &post("/publish/other.x", ok.clone(), b"x".to_vec()).await,
            400,
            "outside the stream",
        );
        assert_json_error(
            &post("/publish/events.%FF", ok.clone(), b"x".to_vec()).await,
            400,
            "not UTF-8",
        );
        let big = vec![b'x'; 1024 * 1024 + 1];
        let r = post("/publish/events.pub.a", ok.clone(), big).await;
        assert_json_error(&r, 413, "over 1 MiB");
        let r = relay.get("/publish/events.pub.a", &[]).await;
        assert_json_error(&r, 405, "GET");
        assert_eq!(r.header("allow"), Some("POST"));
        // A fetch-based publisher from a listed origin passes the preflight.
        let r = request(
            relay.addr(),
            "OPTIONS",
            "/publish/events.pub.a",
            &[
                ("Origin", "https://app.example"),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, idempotency-key",
                ),
            ],
            None,
        )
        .await;
        assert_eq!(r.status, 204);
        assert!(header_lists(
            r.header("access-control-allow-methods"),
            "POST"
        ));
        for h in ["authorization", "idempotency-key", "sse-event"] {
            assert!(
                header_lists(r.header("access-control-allow-headers"), h),
                "{h}"
            );
        }
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some("https://app.example")
        );
    })
    .await
}
