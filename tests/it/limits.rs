//! Abuse limits: connections per process, streams and new streams per
//! second per client IP, streams per token, subjects per stream, and the
//! query-token switch. A refused EventSource gets 200, a jittered `retry:`
//! and the end of the stream (so it backs off instead of giving up); any
//! other client gets 429 or 503 with `Retry-After` and a JSON body.

use std::time::Duration;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);
const RETRY_MS: u64 = 2000;

/// Asserts the EventSource form of a transient refusal: 200, an SSE body
/// with a jittered retry in [retry, 1.5 x retry], and the end of the stream.
async fn assert_refused_stream(mut c: SseClient, what: &str) -> u64 {
    assert_eq!(c.status, 200, "{what}: {:?}", c.headers);
    assert!(
        c.header("content-type")
            .is_some_and(|t| t.starts_with("text/event-stream")),
        "{what}: {:?}",
        c.headers
    );
    let first = c.next_event(WAIT).await.expect("a retry block");
    let retry = first
        .retry
        .unwrap_or_else(|| panic!("{what}: no retry: {first:?}"));
    assert!(
        (RETRY_MS..=RETRY_MS * 3 / 2).contains(&retry),
        "{what}: retry {retry}"
    );
    assert!(
        c.wait_closed(WAIT).await,
        "{what}: the refusal ends the stream"
    );
    retry
}

/// Asserts the plain-HTTP form: `status`, `Retry-After`, JSON `code`.
fn assert_refused(r: &Response, status: u16, code: &str, what: &str) {
    assert_json_error(r, status, what);
    assert_eq!(r.json()["error"], code, "{what}");
    assert!(
        r.header("retry-after").is_some(),
        "{what}: Retry-After: {:?}",
        r.headers
    );
}

fn plain(tok: &str) -> Vec<(String, String)> {
    vec![
        ("Authorization".into(), bearer(tok)),
        ("Accept".into(), "application/json".into()),
    ]
}

async fn get(relay: &Relay, path: &str, headers: &[(String, String)]) -> Response {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    relay.get(path, &h).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_requests_are_refused_until_one_closes() {
    within(
        TEST_LIMIT,
        "beyond_max_connections_requests_are_refused_until_one_closes",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &["--max-connections", "3"], &[]).await;
            let tok = token(SECRET, &["events.cap.>"], 300);
            let path = events_path(&["events.cap.>"]);
            let mut streams = Vec::new();
            for _ in 0..3 {
                streams.push(relay.open_stream(&nats, &tok, &["events.cap.>"]).await);
            }
            let auth = bearer(&tok);
            let c = SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await;
            assert_refused_stream(c, "EventSource over capacity").await;
            let r = get(&relay, &path, &plain(&tok)).await;
            assert_refused(&r, 503, "at_capacity", "plain client over capacity");
            // Health stays answerable over capacity, for the edge's checks.
            assert_eq!(relay.get("/healthz", &[]).await.status, 200);
            drop(streams.pop());
            wait_until(WAIT, "a slot to free", || async {
                get(&relay, "/healthz", &[]).await.status == 200
                    && relay.metric("sse_relay_connections", &[]).await == 2.0
            })
            .await;
            let c = relay.open_stream(&nats, &tok, &["events.cap.>"]).await;
            assert_eq!(c.status, 200);
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_ip_use_the_trusted_header_when_configured() {
    within(
        TEST_LIMIT,
        "streams_per_ip_use_the_trusted_header_when_configured",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(
                &nats.url(),
                &[
                    "--max-connections-per-ip",
                    "2",
                    "--client-ip-header",
                    "Fly-Client-IP",
                ],
                &[],
            )
            .await;
            let tok = token(SECRET, &["events.ip.>"], 300);
            let path = events_path(&["events.ip.>"]);
            let auth = bearer(&tok);
            let from = |ip: &'static str| {
                vec![
                    ("Authorization", auth.clone()),
                    ("Fly-Client-IP", ip.to_string()),
                ]
            };
            let open = |h: Vec<(&'static str, String)>| {
                let path = path.clone();
                let addr = relay.addr().to_string();
                async move {
                    let h: Vec<(&str, &str)> = h.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    SseClient::connect(&addr, &path, &h).await
                }
            };
            let a1 = open(from("198.51.100.1")).await;
            let a2 = open(from("198.51.100.1")).await;
            assert_eq!((a1.status, a2.status), (200, 200));
            let b = open(from("198.51.100.2")).await;
            assert_eq!(b.status, 200, "another address has its own count");
            let mut h = plain(&tok);
            h.push(("Fly-Client-IP".into(), "198.51.100.1".into()));
            assert_refused(
                &get(&relay, &path, &h).await,
                429,
                "rate_limited",
                "third from one IP",
            );
            assert_refused_stream(
                open(from("198.51.100.1")).await,
                "EventSource, third from one IP",
            )
            .await;
            drop(a1);
            wait_until(WAIT, "the slot to free", || async {
                relay.metric("sse_relay_connections", &[]).await == 2.0
            })
            .await;
            let again = open(from("198.51.100.1")).await;
            let first = {
                let mut again = again;
                assert_eq!(again.status, 200);
                again.next_event(WAIT).await
            };
            assert!(
                first.is_some_and(|e| e.retry == Some(RETRY_MS)),
                "a live stream, not a refusal"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_streams_per_second_per_ip_are_limited() {
    within(
        TEST_LIMIT,
        "new_streams_per_second_per_ip_are_limited",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &["--connect-rate-per-ip", "3"], &[]).await;
            let path = events_path(&["events.rate.>"]);
            // Attempts count before the token is checked: a flood of bad tokens
            // is limited too (and answers end at once, 401 or 429).
            let mut answers = Vec::new();
            for _ in 0..6 {
                answers.push(get(&relay, &path, &plain("not-a-token")).await);
            }
            let codes: Vec<u16> = answers.iter().map(|r| r.status).collect();
            assert_eq!(codes[0], 401, "{codes:?}");
            assert!(
                codes.iter().filter(|c| **c == 429).count() >= 2,
                "6 against 3/s: {codes:?}"
            );
            let r = answers.iter().find(|r| r.status == 429).unwrap();
            assert_refused(r, 429, "rate_limited", "over the rate");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_per_token_are_capped_by_sub() {
    within(TEST_LIMIT, "streams_per_token_are_capped_by_sub", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &["--max-streams-per-token", "1"], &[]).await;
        let path = events_path(&["events.tok.>"]);
        let alice = token_with_claims(serde_json::json!({
            "exp": now_secs() + 300, "sub": "alice", "subjects": ["events.tok.>"]
        }));
        // Another token for the same sub counts against the same cap.
        let alice_again = token_with_claims(serde_json::json!({
            "exp": now_secs() + 301, "sub": "alice", "subjects": ["events.tok.>"]
        }));
        let bob = token_with_claims(serde_json::json!({
            "exp": now_secs() + 300, "sub": "bob", "subjects": ["events.tok.>"]
        }));
        let first = relay.open_stream(&nats, &alice, &["events.tok.>"]).await;
        assert_refused(
            &get(&relay, &path, &plain(&alice_again)).await,
            429,
            "rate_limited",
            "second stream of alice",
        );
        let auth = bearer(&alice_again);
        let c = SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await;
        assert_refused_stream(c, "EventSource, second stream of alice").await;
        let b = relay.open_stream(&nats, &bob, &["events.tok.>"]).await;
        assert_eq!(b.status, 200);
        drop(first);
        wait_until(WAIT, "alice's slot to free", || async {
            relay.metric("sse_relay_connections", &[]).await == 1.0
        })
        .await;
        assert_eq!(
            relay
                .open_stream(&nats, &alice, &["events.tok.>"])
                .await
                .status,
            200
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subjects_per_stream_and_the_query_token_switch() {
    within(
        TEST_LIMIT,
        "subjects_per_stream_and_the_query_token_switch",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(
                &nats.url(),
                &["--max-subjects", "2", "--query-token", "false"],
                &[],
            )
            .await;
            let tok = token(SECRET, &["events.>"], 300);
            let three = events_path(&["events.a", "events.b", "events.c"]);
            let r = get(&relay, &three, &plain(&tok)).await;
            assert_json_error(&r, 400, "three subjects against --max-subjects 2");
            assert!(r.json()["message"].as_str().unwrap().contains("at most 2"));
            let two = events_path(&["events.a", "events.b"]);
            let in_url = with_query(&two, &[("token", &tok)]);
            let r = relay.get(&in_url, &[("Accept", "application/json")]).await;
            assert_401(&r, "token in the URL with --query-token false");
            assert!(r.json()["message"].as_str().unwrap().contains("turned off"));
            let c = relay
                .open_stream(&nats, &tok, &["events.a", "events.b"])
                .await;
            assert_eq!(c.status, 200, "the header still works");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_connection_limit_refuses_before_the_kernel_does() {
    within(TEST_LIMIT, "the_default_connection_limit_refuses_before_the_kernel_does", async {
        let nats = NatsServer::start().await;
        // 200 files: the default --max-connections keeps 64 of them free.
        let mut relay = Relay::spawn_with_file_limit(&nats.url(), &[], 200);
        relay.wait_ready(WAIT).await;
        let tok = token(SECRET, &["events.files.>"], 300);
        let mut open = Vec::new();
        let mut refused = 0;
        for _ in 0..180 {
            let mut s = tokio::net::TcpStream::connect(relay.addr()).await.expect("connect");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let req = format!(
                "GET {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nAccept: application/json\r\n\r\n",
                events_path(&["events.files.>"])
            );
            s.write_all(req.as_bytes()).await.unwrap();
            let mut buf = [0u8; 512];
            let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.expect("an answer").unwrap();
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            if head.starts_with("HTTP/1.1 503") {
                assert!(head.contains("at_capacity"), "{head}");
                refused += 1;
            } else {
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            }
            open.push(s);
        }
        assert!(refused > 0, "the relay refused some of 180 connections under 200 files");
        assert_eq!(relay.metric("sse_relay_connections", &[]).await, (180 - refused) as f64);
        // Past the file limit itself: accepts fail, and say so once.
        let mut extra = Vec::new();
        for _ in 0..60 {
            if let Ok(s) = tokio::net::TcpStream::connect(relay.addr()).await {
                extra.push(s);
            }
        }
        drop(extra);
        drop(open);
        wait_until(WAIT, "the relay to serve again", || async {
            relay.get("/healthz", &[]).await.status == 200
        })
        .await;
        let warnings = relay.log().matches("accept failed").count();
        assert!(
            (1..=2).contains(&warnings),
            "EMFILE is reported once per burst, not in a storm: {warnings} warnings"
        );
    })
    .await
}
