//! Error answers of the relay: statuses, JSON bodies, WWW-Authenticate.

use crate::support::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

async fn setup() -> (NatsServer, InProcessRelay) {
    let nats = NatsServer::start().await;
    let relay = InProcessRelay::start(&nats.url(), &[]).await;
    (nats, relay)
}

fn orders_path() -> String {
    events_path(&["events.orders.>"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_token_is_401() {
    within(TEST_LIMIT, "missing_token_is_401", async {
        let (_nats, relay) = setup().await;
        let r = relay
            .get(&orders_path(), &[("Accept", "text/event-stream")])
            .await;
        assert_401(&r, "no token");
        let r = relay.get(&orders_path(), &[]).await;
        assert_401(&r, "no token, no Accept");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_token_is_401() {
    within(TEST_LIMIT, "malformed_token_is_401", async {
        let (_nats, relay) = setup().await;
        for bad in ["not-a-jwt", "a.b.c", "Zm9v.YmFy"] {
            let auth = bearer(bad);
            let r = relay.get(&orders_path(), &[("Authorization", &auth)]).await;
            assert_401(&r, &format!("malformed token {bad:?}"));
        }
        // Not a Bearer scheme at all.
        let r = relay
            .get(&orders_path(), &[("Authorization", "Basic dXNlcjpwYXNz")])
            .await;
        assert_401(&r, "Basic auth instead of Bearer");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signature_is_401() {
    within(TEST_LIMIT, "bad_signature_is_401", async {
        let (_nats, relay) = setup().await;
        let tok = token(
            "a-completely-different-secret-value",
            &["events.orders.>"],
            300,
        );
        let auth = bearer(&tok);
        let r = relay.get(&orders_path(), &[("Authorization", &auth)]).await;
        assert_401(&r, "token signed with another secret");

        // Valid token with its signature tampered.
        let good = token(SECRET, &["events.orders.>"], 300);
        let (head, sig) = good.rsplit_once('.').unwrap();
        let mut sig: Vec<char> = sig.chars().collect();
        sig[0] = if sig[0] == 'A' { 'B' } else { 'A' };
        let tampered = format!("{head}.{}", sig.into_iter().collect::<String>());
        let auth = bearer(&tampered);
        let r = relay.get(&orders_path(), &[("Authorization", &auth)]).await;
        assert_401(&r, "tampered signature");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_401() {
    within(TEST_LIMIT, "expired_token_is_401", async {
        let (_nats, relay) = setup().await;
        // Well past the default 5 s leeway.
        let tok = token(SECRET, &["events.orders.>"], -120);
        let auth = bearer(&tok);
        let r = relay.get(&orders_path(), &[("Authorization", &auth)]).await;
        assert_401(&r, "expired token");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_without_exp_is_401() {
    within(TEST_LIMIT, "token_without_exp_is_401", async {
        let (_nats, relay) = setup().await;
        let tok = token_with_claims(json!({"sub": "test", "subjects": ["events.orders.>"]}));
        let auth = bearer(&tok);
        let r = relay.get(&orders_path(), &[("Authorization", &auth)]).await;
        assert_401(&r, "token without exp");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_algorithm_is_401() {
    within(TEST_LIMIT, "wrong_algorithm_is_401", async {
        let (_nats, relay) = setup().await;
        let c = claims(&["events.orders.>"], 300);

        let none = raw_token(&json!({"alg": "none", "typ": "JWT"}), &c, b"");
        let auth = bearer(&none);
        let r = relay.get(&orders_path(), &[("Authorization", &auth)]).await;
        assert_401(&r, "alg none");

        // RS256 header over an HMAC-style signature made with the secret.
        let hs = sign(SECRET, Algorithm::HS256, &c);
        let sig = hs.rsplit('.').next().unwrap();
        let rs_head = b64url(json!({"alg": "RS256", "typ": "JWT"}).to_string().as_bytes());
        let body = hs.split('.').nth(1).unwrap();
        let rs = format!("{rs_head}.{body}.{sig}");
        let auth = bearer(&rs);
        let r = relay.get(&orders_path(), &[("Authorization", &auth)]).await;
        assert_401(&r, "RS256-headed token against an HS secret");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hs384_and_hs512_tokens_are_accepted() {
    within(TEST_LIMIT, "hs384_and_hs512_tokens_are_accepted", async {
        let (_nats, relay) = setup().await;
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let tok = sign(SECRET, alg, &claims(&["events.orders.>"], 300));
            let auth = bearer(&tok);
            let c =
                SseClient::connect(relay.addr(), &orders_path(), &[("Authorization", &auth)]).await;
            assert_eq!(
                c.status, 200,
                "{alg:?} token with the HS secret: {:?}",
                c.headers
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_not_granted_is_403() {
    within(TEST_LIMIT, "subject_not_granted_is_403", async {
        let (_nats, relay) = setup().await;
        let tok = token(SECRET, &["events.orders.*"], 300);
        let auth = bearer(&tok);
        for s in ["events.orders.>", "events.users.1", "events.orders.1.2"] {
            let r = relay
                .get(&events_path(&[s]), &[("Authorization", &auth)])
                .await;
            assert_json_error(&r, 403, &format!("token events.orders.* requesting {s}"));
        }
        // One allowed subject next to a forbidden one: still 403.
        let r = relay
            .get(
                &events_path(&["events.orders.1", "events.users.1"]),
                &[("Authorization", &auth)],
            )
            .await;
        assert_json_error(&r, 403, "allowed + forbidden subject");
        // And the allowed one alone is fine (containment, not string match).
        let c = SseClient::connect(
            relay.addr(),
            &events_path(&["events.orders.1"]),
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(c.status, 200, "events.orders.1 is inside events.orders.*");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_subject_syntax_is_400() {
    within(TEST_LIMIT, "invalid_subject_syntax_is_400", async {
        let (_nats, relay) = setup().await;
        let tok = token(SECRET, &[">"], 300);
        let auth = bearer(&tok);
        for s in ["events..x", "events.a>", "events.>.x"] {
            let r = relay
                .get(&events_path(&[s]), &[("Authorization", &auth)])
                .await;
            assert_json_error(&r, 400, &format!("invalid subject {s:?}"));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subject_outside_stream_is_400() {
    within(TEST_LIMIT, "subject_outside_stream_is_400", async {
        let (_nats, relay) = setup().await;
        let tok = token(SECRET, &[">"], 300);
        let auth = bearer(&tok);
        for s in ["other.x", "relay.events.x"] {
            let r = relay
                .get(&events_path(&[s]), &[("Authorization", &auth)])
                .await;
            assert_json_error(&r, 400, &format!("subject {s} outside the stream"));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_path_is_404() {
    within(TEST_LIMIT, "unknown_path_is_404", async {
        let (_nats, relay) = setup().await;
        for p in ["/nope", "/events/extra"] {
            let r = relay.get(p, &[]).await;
            assert_json_error(&r, 404, &format!("GET {p}"));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_method_is_405() {
    within(TEST_LIMIT, "wrong_method_is_405", async {
        let (_nats, relay) = setup().await;
        let tok = token(SECRET, &["events.orders.>"], 300);
        let auth = bearer(&tok);
        for m in ["POST", "PUT", "DELETE"] {
            let r = request(
                relay.addr(),
                m,
                &orders_path(),
                &[("Authorization", &auth)],
                Some(b"{}"),
            )
            .await;
            assert_json_error(&r, 405, &format!("{m} /events"));
        }
    })
    .await
}
