//! Process lifecycle: startup checks, config errors, readiness, NATS
//! outages, graceful shutdown, and the `token` subcommand.

use std::time::{Duration, Instant};

use crate::support::*;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_are_200_when_connected() {
    within(
        TEST_LIMIT,
        "healthz_and_readyz_are_200_when_connected",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            assert_eq!(relay.get("/healthz", &[]).await.status, 200);
            assert_eq!(relay.get("/readyz", &[]).await.status, 200);
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_stream_without_create_stream_exits_with_hint() {
    within(
        TEST_LIMIT,
        "missing_stream_without_create_stream_exits_with_hint",
        async {
            let nats = NatsServer::start().await;
            let listen = format!("127.0.0.1:{}", free_port());
            let out = run_relay(
                &[
                    "serve",
                    "--listen",
                    &listen,
                    "--nats-url",
                    &nats.url(),
                    "--jwt-secret",
                    SECRET,
                ],
                &[],
                Duration::from_secs(20),
            )
            .await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                !out.status.success(),
                "serve without the stream and without --create-stream must fail; stderr:\n{stderr}"
            );
            assert!(
                stderr.contains("nats stream add"),
                "stderr should tell how to create the stream (`nats stream add`):\n{stderr}"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_exits_64() {
    within(TEST_LIMIT, "bad_config_exits_64", async {
        let nats = NatsServer::start().await;
        let url = nats.url();
        let listen = format!("127.0.0.1:{}", free_port());
        let cases: Vec<(&str, Vec<&str>)> = vec![
            (
                "no JWT key",
                vec![
                    "serve",
                    "--listen",
                    &listen,
                    "--nats-url",
                    &url,
                    "--create-stream",
                ],
            ),
            (
                "--heartbeat 0",
                vec![
                    "serve",
                    "--listen",
                    &listen,
                    "--nats-url",
                    &url,
                    "--jwt-secret",
                    SECRET,
                    "--create-stream",
                    "--heartbeat",
                    "0",
                ],
            ),
            (
                "--listen notanaddr",
                vec![
                    "serve",
                    "--listen",
                    "notanaddr",
                    "--nats-url",
                    &url,
                    "--jwt-secret",
                    SECRET,
                    "--create-stream",
                ],
            ),
        ];
        for (what, args) in cases {
            let out = run_relay(&args, &[], Duration::from_secs(10)).await;
            assert_eq!(
                out.status.code(),
                Some(64),
                "{what}: expected exit code 64; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !out.stderr.is_empty(),
                "{what}: a config error should say something on stderr"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_from_environment_variables() {
    within(TEST_LIMIT, "config_from_environment_variables", async {
        let nats = NatsServer::start().await;
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let url = nats.url();
        let mut relay = Relay::spawn_exact(
            &["serve".to_string()],
            &[
                ("RELAY_LISTEN", &listen),
                ("NATS_URL", &url),
                ("RELAY_JWT_SECRET", SECRET),
                ("RELAY_CREATE_STREAM", "true"),
                ("RELAY_RETRY_MS", "1234"),
                ("RELAY_HEARTBEAT", "1"),
            ],
            port,
        );
        relay.wait_ready(Duration::from_secs(15)).await;
        let tok = token(SECRET, &["events.env.>"], 300);
        let mut c = relay.open_stream(&nats, &tok, &["events.env.>"]).await;
        let first = c.next_event(WAIT).await.expect("first block");
        assert_eq!(first.retry, Some(1234), "RELAY_RETRY_MS: {first:?}");
        assert!(
            c.wait_comments(1, Duration::from_secs(4)).await,
            "RELAY_HEARTBEAT=1 should produce a comment within 4 s"
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_refusals_while_nats_is_unreachable_then_recovers() {
    within(
        TEST_LIMIT,
        "transient_refusals_while_nats_is_unreachable_then_recovers",
        async {
            let nats_port = free_port();
            let url = format!("nats://127.0.0.1:{nats_port}");
            let mut relay = Relay::spawn(&url, &[], &[]);
            relay.wait_listening(Duration::from_secs(10)).await;

            assert_eq!(
                relay.get("/healthz", &[]).await.status,
                200,
                "/healthz while NATS is away"
            );
            assert_eq!(
                relay.get("/readyz", &[]).await.status,
                503,
                "/readyz while NATS is away"
            );

            let tok = token(SECRET, &["events.t.>"], 300);
            let auth = bearer(&tok);
            let path = events_path(&["events.t.>"]);

            // EventSource-like request: 200, a retry hint, immediate end.
            let mut c = SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await;
            assert_eq!(
                c.status, 200,
                "an EventSource must get 200 (not an error that kills it): {:?}",
                c.headers
            );
            assert!(
                c.header("content-type")
                    .is_some_and(|v| v.starts_with("text/event-stream")),
                "{:?}",
                c.headers
            );
            assert!(
                c.wait_closed(Duration::from_secs(5)).await,
                "the refusal stream must end immediately; body so far {:?}",
                c.body_text()
            );
            let body = c.body_text();
            assert!(
                body.lines().any(|l| l.starts_with("retry:")),
                "the refusal stream should carry a `retry:` line: {body:?}"
            );

            // Other clients: 503 + Retry-After + JSON.
            let r = relay.get(&path, &[("Authorization", &auth)]).await;
            assert_json_error(&r, 503, "GET /events without Accept: text/event-stream");
            assert!(
                r.header("retry-after").is_some(),
                "503 needs Retry-After: {:?}",
                r.headers
            );

            // NATS comes up on that port: the relay becomes ready and streams.
            let nats = NatsServer::start_on(nats_port).await;
            relay.wait_ready(Duration::from_secs(20)).await;
            let mut c = relay.open_stream(&nats, &tok, &["events.t.>"]).await;
            nats.publish_core([("events.t.1", "back")]).await;
            assert_eq!(
                c.expect_data_event(WAIT, "after recovery").await.data,
                "back"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_and_exits_zero() {
    within(TEST_LIMIT, "sigterm_ends_streams_and_exits_zero", async {
        let nats = NatsServer::start().await;
        let mut relay = Relay::start(&nats.url(), &[], &[]).await;
        let tok = token(SECRET, &["events.>"], 300);
        let mut streams = [
            relay.open_stream(&nats, &tok, &["events.one.>"]).await,
            relay.open_stream(&nats, &tok, &["events.two.>"]).await,
            relay.open_stream(&nats, &tok, &["events.>"]).await,
        ];

        let t0 = Instant::now();
        relay.sigterm();

        let addr = relay.addr().to_string();
        wait_until(Duration::from_secs(10), "/readyz to stop answering 200 after SIGTERM", || {
            let addr = addr.clone();
            async move {
                !matches!(
                    try_request(&addr, "GET", "/readyz", &[], None, Duration::from_secs(1)).await,
                    Ok(r) if r.status == 200
                )
            }
        })
        .await;

        for (i, s) in streams.iter_mut().enumerate() {
            assert!(
                s.wait_closed(Duration::from_secs(10)).await,
                "stream {i} still open after SIGTERM"
            );
        }
        let left = Duration::from_secs(10).saturating_sub(t0.elapsed());
        let st = relay
            .wait_exit(left)
            .await
            .unwrap_or_else(|| panic!("relay still running 10 s after SIGTERM"));
        assert_eq!(st.code(), Some(0), "exit status after SIGTERM: {st}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_subcommand_prints_a_jwt_the_relay_accepts() {
    within(
        TEST_LIMIT,
        "token_subcommand_prints_a_jwt_the_relay_accepts",
        async {
            let out = run_relay(
                &[
                    "token",
                    "--secret",
                    SECRET,
                    "--subjects",
                    "events.orders.>,events.users.*",
                    "--subjects",
                    "events.x.1",
                    "--ttl",
                    "1h",
                    "--sub",
                    "alice",
                ],
                &[],
                Duration::from_secs(10),
            )
            .await;
            assert!(
                out.status.success(),
                "token failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8(out.stdout).expect("utf-8 stdout");
            let lines: Vec<&str> = stdout.lines().collect();
            assert_eq!(lines.len(), 1, "stdout must be one line: {stdout:?}");
            let tok = lines[0].trim();
            assert_eq!(tok.split('.').count(), 3, "not a JWT: {tok:?}");

            let header = jsonwebtoken::decode_header(tok).expect("JWT header");
            assert_eq!(header.alg, Algorithm::HS256);
            let mut v = Validation::new(Algorithm::HS256);
            v.validate_aud = false;
            let data = jsonwebtoken::decode::<Value>(
                tok,
                &DecodingKey::from_secret(SECRET.as_bytes()),
                &v,
            )
            .expect("token verifies with the secret");
            let claims = data.claims;
            let mut subjects: Vec<&str> = claims["subjects"]
                .as_array()
                .expect("subjects array")
                .iter()
                .map(|s| s.as_str().expect("string subject"))
                .collect();
            subjects.sort_unstable();
            assert_eq!(
                subjects,
                vec!["events.orders.>", "events.users.*", "events.x.1"]
            );
            assert_eq!(claims["sub"], "alice");
            let exp = claims["exp"].as_i64().expect("numeric exp");
            assert!(
                (exp - (now_secs() + 3600)).abs() <= 120,
                "--ttl 1h: exp {exp} should be about now+3600"
            );

            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &[], &[]).await;
            let auth = bearer(tok);
            let c = SseClient::connect(
                relay.addr(),
                &events_path(&["events.orders.>"]),
                &[("Authorization", &auth)],
            )
            .await;
            assert_eq!(c.status, 200, "relay with the same secret must accept it");
        },
    )
    .await
}

/// A stream stays open across a NATS restart and carries events
/// published afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_nats_restart() {
    within(TEST_LIMIT, "stream_survives_nats_restart", async {
        let mut nats = NatsServer::start().await;
        let relay = Relay::start(&nats.url(), &["--heartbeat", "1"], &[]).await;
        let tok = token(SECRET, &["events.r.>"], 300);
        let mut c = relay.open_stream(&nats, &tok, &["events.r.>"]).await;

        nats.restart().await;
        nats.wait_relay_subs(&["events.r.>"], Duration::from_secs(15))
            .await;
        nats.publish_core([("events.r.1", "after restart")]).await;
        let ev = c.expect_data_event(WAIT, "event after NATS restart").await;
        assert_eq!(ev.data, "after restart");
        assert!(!c.is_closed());
    })
    .await
}

/// `--log-format json`: every log line is one JSON object; async-nats'
/// per-message debug lines stay out even under `RUST_LOG=debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_without_nats_client_noise() {
    within(TEST_LIMIT, "json_logs_without_nats_client_noise", async {
        let nats = NatsServer::start().await;
        let relay = Relay::start(
            &nats.url(),
            &["--log-format", "json"],
            &[("RUST_LOG", "debug")],
        )
        .await;
        let tok = token(SECRET, &["events.log.>"], 300);
        let mut c = relay.open_stream(&nats, &tok, &["events.log.>"]).await;
        nats.publish_core([("events.log.1", "hello")]).await;
        c.expect_data_event(WAIT, "an event").await;
        let log = relay.log();
        let mut lines = 0;
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line:?}"));
            assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
            let target = v["target"].as_str().unwrap_or_default();
            assert!(
                !(target.starts_with("async_nats") && v["level"] == "DEBUG"),
                "async-nats debug noise: {line}"
            );
            lines += 1;
        }
        assert!(lines > 3, "the relay logged: {log}");
        assert!(log.contains("\"stream ready\""), "{log}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_subcommand_grants_publishing() {
    within(TEST_LIMIT, "token_subcommand_grants_publishing", async {
        let out = run_relay(
            &[
                "token",
                "--secret",
                SECRET,
                "--publish",
                "events.pub.>,events.x",
            ],
            &[],
            Duration::from_secs(10),
        )
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tok = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let mut v = Validation::new(Algorithm::HS256);
        v.validate_aud = false;
        let claims =
            jsonwebtoken::decode::<Value>(&tok, &DecodingKey::from_secret(SECRET.as_bytes()), &v)
                .expect("verifies")
                .claims;
        assert_eq!(
            claims["publish"],
            serde_json::json!(["events.pub.>", "events.x"])
        );
        assert_eq!(claims["subjects"], serde_json::json!([]));
        let none = run_relay(&["token", "--secret", SECRET], &[], Duration::from_secs(10)).await;
        assert_eq!(
            none.status.code(),
            Some(64),
            "a token that grants nothing is refused"
        );
    })
    .await
}

/// A relay whose stderr was closed (its supervisor's pipe cut) keeps
/// serving, and SIGTERM still stops it with exit 0: a failed log write
/// must not panic the thread that logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stderr_does_not_stop_shutdown() {
    within(
        TEST_LIMIT,
        "a_closed_stderr_does_not_stop_shutdown",
        async {
            let nats = NatsServer::start().await;
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let mut args = vec!["serve".to_string(), "--listen".into(), addr.clone()];
            args.extend(Relay::default_args(&nats.url()));
            let mut child = std::process::Command::new(relay_bin())
                .args(&args)
                .env("RUST_LOG", "debug")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("the relay starts");
            wait_readyz(&addr, WAIT, || None).await.expect("ready");
            drop(child.stderr.take());
            // Something to log about once nobody reads it.
            let tok = token(SECRET, &["events.>"], 300);
            let r = http_get(
                &addr,
                "/events?subject=events.x",
                &[("Authorization", "Bearer nope")],
            )
            .await;
            assert_eq!(r.status, 401);
            let r = http_get(&addr, "/healthz", &[("Authorization", &bearer(&tok))]).await;
            assert_eq!(r.status, 200, "still serving with stderr closed");
            let pid = child.id().to_string();
            let kill = std::process::Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap();
            assert!(kill.success());
            let status = poll_until(
                Duration::from_secs(15),
                "the relay exits after SIGTERM",
                || {
                    let st = child.try_wait().unwrap();
                    async move { st }
                },
            )
            .await;
            assert_eq!(status.code(), Some(0), "exit after SIGTERM: {status}");
        },
    )
    .await
}
