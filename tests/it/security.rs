//! Hostile input on the open internet: request framing, uploads on a
//! stream, subjects and tokens built to break parsing, log injection, and
//! the dev mode's reach. Each answer is a clear status with a JSON body,
//! never a panic or a silently accepted request.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

/// Writes `raw` on a fresh connection and reads until the relay closes it
/// (bounded): everything it answered, as text.
async fn raw_exchange(addr: &str, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "the relay did not close the connection; got {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// The status codes of every response in `text`, in order.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text[i + 9..i + 12].parse().ok())
        .collect()
}

/// The JSON body of the single response in `text`.
fn json_body(text: &str) -> Value {
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_that_smuggles_requests_is_refused_and_closed() {
    within(TEST_LIMIT, "framing_that_smuggles_requests_is_refused_and_closed", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &[], &[]).await;
        let second = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for (what, head) in [
            ("Content-Length: +0", "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n"),
            ("Content-Length: -0", "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -0\r\n\r\n"),
            (
                "Content-Length with Transfer-Encoding",
                "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
            ),
            ("two Content-Lengths", "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\n"),
            ("no Host", "GET /healthz HTTP/1.1\r\n\r\n"),
            ("two Hosts", "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            ("Transfer-Encoding: gzip", "POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n"),
        ] {
            let text = raw_exchange(relay.addr(), format!("{head}{second}").as_bytes()).await;
            assert_eq!(statuses(&text), [400], "{what}: one refusal and nothing after it: {text:?}");
            assert_eq!(json_body(&text)["error"], "bad_request", "{what}");
        }
        // A valid Content-Length: 0 keeps the connection for the next request.
        let text = raw_exchange(
            relay.addr(),
            format!("GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n{second}")
                .replace("GET /metrics HTTP/1.1\r\nHost: x\r\n", "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(statuses(&text), [200, 200], "{text:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cannot_carry_a_body_or_an_upload() {
    within(TEST_LIMIT, "a_stream_cannot_carry_a_body_or_an_upload", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &[], &[]).await;
        let tok = token(SECRET, &["events.up.>"], 300);
        let target = events_path(&["events.up.>"]);
        // A body header cannot move a stream onto the body path.
        let text = raw_exchange(
            relay.addr(),
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Length: 5\r\n\r\nhello").as_bytes(),
        )
        .await;
        assert_eq!(statuses(&text), [400], "{text:?}");
        assert_eq!(json_body(&text)["error"], "body_not_allowed");

        // Bytes sent after a stream's request end the stream.
        let mut s = TcpStream::connect(relay.addr()).await.unwrap();
        s.write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "stream opened");
        let garbage = vec![b'x'; 64 * 1024];
        // The relay may close mid-upload: a failed write is the point.
        let _ = s.write_all(&garbage).await;
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a stream whose client uploads is closed");
        assert_eq!(relay.get("/healthz", &[]).await.status, 200);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_subjects_are_400_and_reach_the_log_escaped() {
    within(TEST_LIMIT, "hostile_subjects_are_400_and_reach_the_log_escaped", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &[], &[("RUST_LOG", "debug")]).await;
        let tok = token(SECRET, &["events.>"], 300);
        let auth = bearer(&tok);
        for (what, encoded) in [
            ("NUL", "events.a%00b"),
            ("form feed", "events.%0C"),
            ("escape sequence", "events.%1B%5B31mred"),
            ("invalid UTF-8", "events.%FF%FE"),
            ("DEL", "events.a%7F"),
        ] {
            let r = relay
                .get(&format!("/events?subject={encoded}"), &[("Authorization", &auth)])
                .await;
            assert_json_error(&r, 400, what);
            assert_eq!(r.json()["error"], "invalid_subject", "{what}");
        }
        // A curl user who did not encode `>` is told how.
        let text = raw_exchange(
            relay.addr(),
            format!("GET /events?subject=events.orders.> HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(statuses(&text), [400]);
        assert!(json_body(&text)["message"].as_str().unwrap().contains("%3E"), "{text}");
        let log = relay.log();
        assert!(!log.contains('\u{1b}'), "no raw escape byte reaches the log");
        assert!(!log.contains('\0'), "no raw NUL reaches the log");
        assert!(
            log.contains(r"\u{1b}[31mred"),
            "the refusal names the subject, escaped: {}",
            tail(&log, 3000)
        );
        assert!(!log.contains(&tok), "the token never reaches the log");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_built_to_break_verification_are_refused() {
    within(
        TEST_LIMIT,
        "tokens_built_to_break_verification_are_refused",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let path = events_path(&["events.b.c.d"]);
            let now = now_secs();
            let get = |tok: String| {
                let path = path.clone();
                let relay = &relay;
                async move { relay.get(&path, &[("Authorization", &bearer(&tok))]).await }
            };
            // Malformed grants grant nothing.
            for grant in ["events.>.x", "events.>.", "events..>", "events.>.>"] {
                let r = get(token(SECRET, &[grant], 300)).await;
                assert_json_error(&r, 403, grant);
            }
            // Not valid yet.
            let nbf = json!({"exp": now + 300, "nbf": now + 120, "subjects": ["events.>"]});
            assert_401(&get(token_with_claims(nbf)).await, "nbf in the future");
            // An unknown critical header extension.
            let claims = json!({"exp": now + 300, "subjects": ["events.>"]});
            let header = json!({"alg": "HS256", "typ": "JWT", "crit": ["x-ext"], "x-ext": true});
            assert_401(
                &get(sign_with_header(SECRET, &header, &claims)).await,
                "crit header",
            );
            // An exp at the end of time opens a stream and panics nothing.
            let far = json!({"exp": u64::MAX, "subjects": ["events.>"]});
            let mut c = SseClient::connect(
                relay.addr(),
                &path,
                &[("Authorization", &bearer(&token_with_claims(far)))],
            )
            .await;
            assert_eq!(c.status, 200, "{:?}", c.headers);
            assert!(c.next_event(WAIT).await.is_some_and(|e| e.retry.is_some()));
            assert_eq!(
                relay.get("/healthz", &[]).await.status,
                200,
                "the relay is still up"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_stays_on_loopback_and_ignores_the_environment() {
    within(
        TEST_LIMIT,
        "dev_mode_stays_on_loopback_and_ignores_the_environment",
        async {
            let out = run_relay(&["dev", "--listen", "0.0.0.0:0"], &[], WAIT).await;
            assert_eq!(
                out.status.code(),
                Some(64),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"));

            // NATS_URL and RELAY_LISTEN from a production shell are not read: dev
            // starts its own nats-server and listens where its flags say.
            let port = free_port();
            let (mut child, text) = start_dev(
                &format!("127.0.0.1:{port}"),
                &[
                    ("NATS_URL", "nats://127.0.0.1:1"),
                    ("RELAY_LISTEN", "0.0.0.0:9"),
                ],
            )
            .await;
            assert!(!text.contains("nats://127.0.0.1:1\n"), "{text}");
            assert!(
                text.contains(&format!("http://127.0.0.1:{port}/")),
                "{text}"
            );
            // SIGTERM ends dev mode and the nats-server it started.
            stop_dev(&mut child, &text).await;
        },
    )
    .await
}

/// Ends dev mode with SIGTERM, which also stops the nats-server it
/// started (asserted). A SIGKILL (`kill_on_drop`) would leave that server
/// running: every test that starts dev mode ends it here.
async fn stop_dev(child: &mut tokio::process::Child, banner: &str) {
    let nats_addr = banner
        .split("nats://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the NATS address in the banner")
        .to_string();
    let pid = child.id().expect("dev is running").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let status = tokio::time::timeout(WAIT, child.wait()).await;
    assert!(
        matches!(&status, Ok(Ok(s)) if s.success()),
        "dev exits 0 on SIGTERM: {status:?}"
    );
    assert!(
        TcpStream::connect(&nats_addr).await.is_err(),
        "the nats-server dev started is gone with it ({nats_addr})"
    );
}

/// Starts `sse-relay dev --listen <listen>` with `envs` set; returns it
/// with its banner. End it with [`stop_dev`].
async fn start_dev(listen: &str, envs: &[(&str, &str)]) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(relay_bin())
        .args(["dev", "--listen", listen])
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn dev");
    let text = dev_banner(&mut child).await;
    (child, text)
}

/// Dev mode's banner, read to its last line (`publish:`): dev prints
/// nothing more, and its stdout may then close without a failed write.
async fn dev_banner(child: &mut tokio::process::Child) -> String {
    let mut stdout = child.stdout.take().unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let printed = tokio::time::timeout(WAIT, async {
        while !text.contains("  publish:") || !text.ends_with('\n') {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "dev exited early: {text}");
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    assert!(printed.is_ok(), "dev printed its banner: {text}");
    text
}

/// `dev --listen 127.0.0.1:0` binds a free port, and its banner names that
/// port, not 0: the page and curl command it prints work as printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_banner_names_the_port_it_bound() {
    within(
        TEST_LIMIT,
        "dev_mode_banner_names_the_port_it_bound",
        async {
            let (mut child, text) = start_dev("127.0.0.1:0", &[]).await;
            let addr = text
                .split("demo page: http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
                .expect("the page's address in the banner")
                .to_string();
            assert!(!addr.ends_with(":0"), "the banner names port 0: {text}");
            let r = http_get(&addr, "/healthz", &[]).await;
            assert_eq!(r.status, 200, "dev answers where its banner says");
            stop_dev(&mut child, &text).await;
        },
    )
    .await
}
