//! CORS: headers on every answer to an allowed origin, refusals included.

use crate::support::*;

const APP: &str = "https://app.example";
const OTHER: &str = "https://other.example";
const EVIL: &str = "https://evil.example";

async fn listed_relay(nats: &NatsServer) -> InProcessRelay {
    InProcessRelay::start(
        &nats.url(),
        &[
            "--cors-origins",
            "https://app.example,https://other.example",
        ],
    )
    .await
}

fn assert_cors_for(headers: &[(String, String)], origin: &str, what: &str) {
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    assert_eq!(
        get("access-control-allow-origin"),
        Some(origin),
        "{what}: Access-Control-Allow-Origin (headers {headers:?})"
    );
    let vary: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k == "vary")
        .map(|(_, v)| v.as_str())
        .collect();
    assert!(
        vary.iter().any(|v| header_lists(Some(v), "origin")),
        "{what}: Vary must contain Origin (headers {headers:?})"
    );
    assert_eq!(
        get("access-control-allow-credentials"),
        Some("true"),
        "{what}: Access-Control-Allow-Credentials (headers {headers:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listed_origin_gets_cors_headers_on_stream_and_refusals() {
    within(
        TEST_LIMIT,
        "listed_origin_gets_cors_headers_on_stream_and_refusals",
        async {
            let nats = NatsServer::start().await;
            let relay = listed_relay(&nats).await;
            let tok = token(SECRET, &["events.orders.*"], 300);
            let auth = bearer(&tok);

            for origin in [APP, OTHER] {
                // 200 stream
                let c = SseClient::connect(
                    relay.addr(),
                    &events_path(&["events.orders.1"]),
                    &[("Authorization", &auth), ("Origin", origin)],
                )
                .await;
                assert_eq!(c.status, 200);
                assert_cors_for(&c.headers, origin, "200 stream");
                drop(c);

                // 401
                let r = relay
                    .get(&events_path(&["events.orders.1"]), &[("Origin", origin)])
                    .await;
                assert_401(&r, "no token, with Origin");
                assert_cors_for(&r.headers, origin, "401");

                // 403
                let r = relay
                    .get(
                        &events_path(&["events.users.1"]),
                        &[("Authorization", &auth), ("Origin", origin)],
                    )
                    .await;
                assert_json_error(&r, 403, "forbidden subject, with Origin");
                assert_cors_for(&r.headers, origin, "403");
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_origin_gets_no_allow_origin() {
    within(TEST_LIMIT, "unlisted_origin_gets_no_allow_origin", async {
        let nats = NatsServer::start().await;
        let relay = listed_relay(&nats).await;
        let tok = token(SECRET, &["events.orders.*"], 300);
        let auth = bearer(&tok);

        let c = SseClient::connect(
            relay.addr(),
            &events_path(&["events.orders.1"]),
            &[("Authorization", &auth), ("Origin", EVIL)],
        )
        .await;
        assert_eq!(
            c.header("access-control-allow-origin"),
            None,
            "unlisted origin on a stream: {:?}",
            c.headers
        );
        drop(c);
        let r = relay
            .get(&events_path(&["events.orders.1"]), &[("Origin", EVIL)])
            .await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.header("access-control-allow-origin"),
            None,
            "unlisted origin on a 401: {:?}",
            r.headers
        );
        // A near miss of a listed origin is not listed (exact match).
        let r = relay
            .get(
                &events_path(&["events.orders.1"]),
                &[("Origin", "https://app.example.evil.example")],
            )
            .await;
        assert_eq!(
            r.header("access-control-allow-origin"),
            None,
            "{:?}",
            r.headers
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_origins_allow_any_without_credentials() {
    within(
        TEST_LIMIT,
        "wildcard_origins_allow_any_without_credentials",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &["--cors-origins", "*"]).await;
            let tok = token(SECRET, &["events.orders.*"], 300);
            let auth = bearer(&tok);

            let c = SseClient::connect(
                relay.addr(),
                &events_path(&["events.orders.1"]),
                &[("Authorization", &auth), ("Origin", EVIL)],
            )
            .await;
            assert_eq!(c.status, 200);
            let acao = c.header("access-control-allow-origin");
            assert!(
                acao == Some("*") || acao == Some(EVIL),
                "with `*`, ACAO must be `*` or the origin: {:?}",
                c.headers
            );
            assert_eq!(
                c.header("access-control-allow-credentials"),
                None,
                "no credentials with `*`: {:?}",
                c.headers
            );
            drop(c);

            let r = relay
                .get(&events_path(&["events.orders.1"]), &[("Origin", EVIL)])
                .await;
            assert_401(&r, "no token");
            let acao = r.header("access-control-allow-origin");
            assert!(
                acao == Some("*") || acao == Some(EVIL),
                "401 with `*`: {:?}",
                r.headers
            );
            assert_eq!(r.header("access-control-allow-credentials"), None);
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_from_listed_origin() {
    within(TEST_LIMIT, "preflight_from_listed_origin", async {
        let nats = NatsServer::start().await;
        let relay = listed_relay(&nats).await;
        let r = request(
            relay.addr(),
            "OPTIONS",
            "/events",
            &[
                ("Origin", APP),
                ("Access-Control-Request-Method", "GET"),
                (
                    "Access-Control-Request-Headers",
                    "authorization, last-event-id",
                ),
            ],
            None,
        )
        .await;
        assert!(
            r.status == 204 || r.status == 200,
            "preflight status {} (headers {:?})",
            r.status,
            r.headers
        );
        assert_cors_for(&r.headers, APP, "preflight");
        let methods = r.header("access-control-allow-methods");
        assert!(
            header_lists(methods, "GET"),
            "Access-Control-Allow-Methods should list GET: {methods:?}"
        );
        let allowed = r.header("access-control-allow-headers");
        for h in ["authorization", "last-event-id"] {
            assert!(
                header_lists(allowed, h),
                "Access-Control-Allow-Headers should list {h}: {allowed:?}"
            );
        }
    })
    .await
}
