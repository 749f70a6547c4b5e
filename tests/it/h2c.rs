//! Cleartext HTTP/2 with prior knowledge (h2c) on the relay's port, as an
//! edge that speaks HTTP/2 to its backends uses it: hyper's HTTP/2 client
//! over a plain TCP connection, several SSE streams multiplexed on it.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

/// Streams one connection takes at once (the relay's
/// SETTINGS_MAX_CONCURRENT_STREAMS, stated in README).
const MAX_CONCURRENT_STREAMS: usize = 100;

/// One h2c connection: requests are streams on it.
struct H2 {
    sender: hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
    connection: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl H2 {
    async fn connect(addr: &str) -> H2 {
        Self::connect_with(
            addr,
            hyper::client::conn::http2::Builder::new(TokioExecutor::new()),
        )
        .await
    }

    async fn connect_with(
        addr: &str,
        builder: hyper::client::conn::http2::Builder<TokioExecutor>,
    ) -> H2 {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = builder
            .handshake(TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
        H2 {
            sender,
            connection: tokio::spawn(conn),
        }
    }

    /// Sends `GET path` as a new stream; the response head.
    async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> hyper::Response<Incoming> {
        let mut req = hyper::Request::get(format!("http://relay{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::new()).unwrap();
        let send = self.sender.send_request(req);
        match tokio::time::timeout(WAIT, send).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("GET {path} over h2c: {e}")),
            Err(_) => panic!("GET {path} over h2c: no response head within {WAIT:?}"),
        }
    }

    /// A whole (finite) response, as the HTTP/1.1 tests see one.
    async fn request(&mut self, path: &str, headers: &[(&str, &str)]) -> Response {
        let res = self.get(path, headers).await;
        let (head, body) = res.into_parts();
        assert_eq!(head.version, hyper::Version::HTTP_2);
        let body = tokio::time::timeout(WAIT, body.collect())
            .await
            .expect("body within the wait")
            .expect("body")
            .to_bytes();
        Response {
            status: head.status.as_u16(),
            headers: header_pairs(&head.headers),
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }
}

impl Drop for H2 {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// An SSE response body read over h2c.
struct H2Stream {
    body: Incoming,
    parser: SseParser,
    events: VecDeque<SseEvent>,
}

impl H2Stream {
    fn new(res: hyper::Response<Incoming>) -> H2Stream {
        assert_eq!(res.status(), 200, "headers {:?}", res.headers());
        let ct = res.headers()[hyper::header::CONTENT_TYPE].to_str().unwrap();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        H2Stream {
            body: res.into_body(),
            parser: SseParser::default(),
            events: VecDeque::new(),
        }
    }

    /// Every block until the body ends, within `limit`; and whether it
    /// ended cleanly (END_STREAM, not a reset).
    async fn until_end(&mut self, limit: Duration) -> (Vec<SseEvent>, bool) {
        let read = async {
            loop {
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.parser.feed(&data, &mut self.events);
                        }
                    }
                    Some(Err(_)) => return false,
                    None => return true,
                }
            }
        };
        match tokio::time::timeout(limit, read).await {
            Ok(clean) => (self.events.drain(..).collect(), clean),
            Err(_) => panic!("the stream did not end within {limit:?}"),
        }
    }

    /// The next event that carries data, within `limit`.
    async fn next_data_event(&mut self, limit: Duration) -> SseEvent {
        let read = async {
            loop {
                while let Some(ev) = self.events.pop_front() {
                    if ev.has_data && !is_marker(&ev) {
                        return ev;
                    }
                }
                match self.body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            self.parser.feed(&data, &mut self.events);
                        }
                    }
                    other => panic!("the stream ended before an event: {other:?}"),
                }
            }
        };
        match tokio::time::timeout(limit, read).await {
            Ok(ev) => ev,
            Err(_) => panic!("no event within {limit:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_on_one_connection_each_get_their_events() {
    within(
        TEST_LIMIT,
        "two_streams_on_one_connection_each_get_their_events",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let tok = token(SECRET, &["events.>"], 300);
            let auth = bearer(&tok);
            let mut h2 = H2::connect(relay.addr()).await;
            let a = h2
                .get(&events_path(&["events.a"]), &[("authorization", &auth)])
                .await;
            let b = h2
                .get(&events_path(&["events.b"]), &[("authorization", &auth)])
                .await;
            let (mut a, mut b) = (H2Stream::new(a), H2Stream::new(b));
            nats.wait_relay_subs(&["events.a", "events.b"], WAIT).await;

            let js = async_nats::jetstream::new(nats.client().await);
            let seq_a = js_publish(&js, "events.a", "for a").await;
            let seq_b = js_publish(&js, "events.b", "for b").await;
            let seq_a2 = js_publish(&js, "events.a", "for a again").await;

            let ev = b.next_data_event(WAIT).await;
            assert_eq!((ev.seq(), ev.data.as_str()), (seq_b, "for b"));
            let ev = a.next_data_event(WAIT).await;
            assert_eq!((ev.seq(), ev.data.as_str()), (seq_a, "for a"));
            let ev = a.next_data_event(WAIT).await;
            assert_eq!((ev.seq(), ev.data.as_str()), (seq_a2, "for a again"));

            // Both streams and the requests beside them share the one
            // connection: a third stream still opens on it.
            let health = h2.request("/healthz", &[]).await;
            assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_refusals_keep_their_shape_over_h2c() {
    within(
        TEST_LIMIT,
        "health_and_refusals_keep_their_shape_over_h2c",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let mut h2 = H2::connect(relay.addr()).await;
            let r = h2.request("/healthz", &[]).await;
            assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
            assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
            let r = h2.request("/readyz", &[]).await;
            assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));

            let r = h2.request(&events_path(&["events.a"]), &[]).await;
            assert_401(&r, "no token over h2c");
            let r = h2.request("/nope", &[]).await;
            assert_json_error(&r, 404, "unknown path over h2c");
            let tok = token(SECRET, &["events.a"], 300);
            let r = h2
                .request(
                    &events_path(&["events.b"]),
                    &[("authorization", &bearer(&tok))],
                )
                .await;
            assert_json_error(&r, 403, "subject not granted over h2c");
        },
    )
    .await
}

/// Writes `bytes` as the first and last thing on a new connection;
/// everything the relay answers until it closes.
async fn raw_exchange(addr: &str, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut out))
        .await
        .expect("the relay closes the connection")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_preface_is_refused() {
    within(TEST_LIMIT, "a_bad_preface_is_refused", async {
        let nats = NatsServer::start().await;
        let relay = InProcessRelay::start(&nats.url(), &[]).await;
        for bad in [
            &b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\nGET / HTTP/1.1\r\n\r\n",
        ] {
            let answer = raw_exchange(relay.addr(), bad).await;
            assert!(
                answer.starts_with("HTTP/1.1 400 "),
                "{bad:?} answered {answer:?}"
            );
            let body = answer.split_once("\r\n\r\n").unwrap().1;
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"], "bad_request", "{body}");
        }
        // A preface cut short by the client closing: no answer, no harm.
        let answer = raw_exchange(relay.addr(), b"PRI * HTTP/2.0\r\n").await;
        assert_eq!(answer, "");
        // The relay still serves both protocols.
        assert_eq!(relay.get("/healthz", &[]).await.status, 200);
        let mut h2 = H2::connect(relay.addr()).await;
        assert_eq!(h2.request("/healthz", &[]).await.status, 200);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_holds_at_most_the_stated_streams() {
    within(
        TEST_LIMIT,
        "one_connection_holds_at_most_the_stated_streams",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &[]).await;
            let tok = token(SECRET, &["events.a"], 300);
            let auth = bearer(&tok);
            let mut h2 = H2::connect(relay.addr()).await;
            let mut streams = Vec::new();
            for _ in 0..MAX_CONCURRENT_STREAMS {
                let res = h2
                    .get(&events_path(&["events.a"]), &[("authorization", &auth)])
                    .await;
                streams.push(H2Stream::new(res));
            }
            // One more waits for a free stream (the client honours the
            // relay's SETTINGS_MAX_CONCURRENT_STREAMS) ...
            let req = hyper::Request::get("http://relay/healthz")
                .body(Empty::new())
                .unwrap();
            let mut extra = Box::pin(h2.sender.send_request(req));
            let early = tokio::time::timeout(Duration::from_millis(500), extra.as_mut()).await;
            assert!(
                early.is_err(),
                "stream {} opened beyond the limit",
                MAX_CONCURRENT_STREAMS + 1
            );
            // ... and opens as soon as one ends.
            streams.pop();
            let res = tokio::time::timeout(WAIT, extra)
                .await
                .expect("the extra stream opens once one ends")
                .expect("response");
            assert_eq!(res.status(), 200);
            // Every stream is live: an event reaches the first and the last.
            nats.wait_relay_subs(&["events.a"], WAIT).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let seq = js_publish(&js, "events.a", "x").await;
            assert_eq!(streams[0].next_data_event(WAIT).await.seq(), seq);
            let last = streams.last_mut().unwrap();
            assert_eq!(last.next_data_event(WAIT).await.seq(), seq);
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_h2c_streams_with_a_retry_hint() {
    within(
        TEST_LIMIT,
        "sigterm_ends_h2c_streams_with_a_retry_hint",
        async {
            let nats = NatsServer::start().await;
            let mut relay = Relay::start(&nats.url(), &[], &[]).await;
            let tok = token(SECRET, &["events.>"], 300);
            let auth = bearer(&tok);
            let mut h2 = H2::connect(relay.addr()).await;
            let mut streams = Vec::new();
            for subject in ["events.a", "events.b"] {
                let res = h2
                    .get(&events_path(&[subject]), &[("authorization", &auth)])
                    .await;
                streams.push(H2Stream::new(res));
            }
            nats.wait_relay_subs(&["events.a", "events.b"], WAIT).await;
            relay.sigterm();
            for (i, s) in streams.iter_mut().enumerate() {
                let (blocks, clean) = s.until_end(WAIT).await;
                assert!(clean, "stream {i} was reset instead of ended");
                // The first block is the stream's opening `retry:`; the last
                // is the shutdown's own.
                let retries = blocks.iter().filter(|b| b.retry.is_some()).count();
                assert!(
                    retries >= 2 && blocks.last().is_some_and(|b| b.retry.is_some()),
                    "stream {i} ends with a retry: hint: {blocks:?}"
                );
            }
            let st = relay
                .wait_exit(WAIT)
                .await
                .expect("the relay exits after SIGTERM");
            assert_eq!(st.code(), Some(0), "{st}");
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stops_reading_is_dropped_without_stalling_its_neighbour() {
    within(
        TEST_LIMIT,
        "a_stream_that_stops_reading_is_dropped_without_stalling_its_neighbour",
        async {
            const MAX_EVENTS: usize = 400;
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &["--client-queue", "16"]).await;
            let tok = token(SECRET, &["events.load"], 300);
            let auth = bearer(&tok);
            let path = events_path(&["events.load"]);
            // A 64 KiB stream window: the stream that is never read stops
            // taking data after 64 KiB; the connection's window (5 MiB by
            // default) keeps room for its neighbour.
            let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
            builder.initial_stream_window_size(64 * 1024);
            let mut h2 = H2::connect_with(relay.addr(), builder).await;
            let slow = h2.get(&path, &[("authorization", &auth)]).await;
            assert_eq!(slow.status(), 200);
            let mut fast = H2Stream::new(h2.get(&path, &[("authorization", &auth)]).await);
            nats.wait_relay_subs(&["events.load"], WAIT).await;

            let js = async_nats::jetstream::new(nats.client().await);
            let payload = "x".repeat(4096);
            let mut evicted = false;
            for i in 0..MAX_EVENTS {
                let seq = js_publish(&js, "events.load", payload.clone()).await;
                let ev = fast.next_data_event(WAIT).await;
                assert_eq!(ev.seq(), seq, "the reading stream's event #{i}");
                if i % 10 == 9 {
                    let slow_drops = relay
                        .metric("sse_relay_disconnects_total", &[("reason", "evicted_slow")])
                        .await;
                    if slow_drops == 1.0 {
                        evicted = true;
                        break;
                    }
                }
            }
            assert!(
                evicted,
                "the stream that never reads was not dropped within {MAX_EVENTS} events of 4 KiB"
            );
            drop(slow);
        },
    )
    .await
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Waits until the relay holds `n` streams; its RSS then (KiB).
async fn rss_holding(relay: &Relay, n: usize) -> u64 {
    wait_until(Duration::from_secs(60), "every stream open", || async {
        relay.metric("sse_relay_connections", &[]).await as usize == n
    })
    .await;
    rss_kib(relay.pid())
}

/// Relay memory per idle SSE stream on HTTP/1.1 (a connection each) and on
/// h2c (100 streams per connection), side by side: a measurement, not a
/// check. `cargo test --release --test it idle_memory -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run it with --release --ignored --nocapture"]
async fn idle_memory_per_stream_http1_and_h2c() {
    const STREAMS: usize = 10_000;
    within(Duration::from_secs(300), "idle_memory", async {
        let nats = NatsServer::start().await;
        let tok = token(SECRET, &["events.idle"], 3600);
        let auth = bearer(&tok);
        let path = events_path(&["events.idle"]);
        let per = |before: u64, after: u64| (after.saturating_sub(before) * 1024) as f64 / STREAMS as f64;

        let relay = Relay::start(&nats.url(), &[], &[]).await;
        let before = rss_holding(&relay, 0).await;
        let mut clients = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS {
            clients.push(SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await);
        }
        let after = rss_holding(&relay, STREAMS).await;
        println!(
            "HTTP/1.1: {STREAMS} streams, relay RSS {before} -> {after} KiB, {:.0} B per stream",
            per(before, after)
        );
        drop(clients);
        drop(relay);

        let relay = Relay::start(&nats.url(), &[], &[]).await;
        let before = rss_holding(&relay, 0).await;
        let mut conns = Vec::new();
        let mut streams = Vec::with_capacity(STREAMS);
        for _ in 0..STREAMS / MAX_CONCURRENT_STREAMS {
            let mut h2 = H2::connect(relay.addr()).await;
            for _ in 0..MAX_CONCURRENT_STREAMS {
                streams.push(h2.get(&path, &[("authorization", &auth)]).await);
            }
            conns.push(h2);
        }
        let after = rss_holding(&relay, STREAMS).await;
        println!(
            "h2c: {STREAMS} streams on {} connections, relay RSS {before} -> {after} KiB, {:.0} B per stream",
            conns.len(),
            per(before, after)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_connection_holds_one_place_under_max_connections() {
    within(
        TEST_LIMIT,
        "an_h2c_connection_holds_one_place_under_max_connections",
        async {
            let nats = NatsServer::start().await;
            let relay = InProcessRelay::start(&nats.url(), &["--max-connections", "1"]).await;
            let tok = token(SECRET, &["events.a"], 300);
            let auth = bearer(&tok);
            let path = events_path(&["events.a"]);
            let mut first = H2::connect(relay.addr()).await;
            let open = H2Stream::new(first.get(&path, &[("authorization", &auth)]).await);
            // Streams on the connection that holds the place are served...
            let again = first.get(&path, &[("authorization", &auth)]).await;
            assert_eq!(again.status(), 200);
            // ... a second connection is over the limit: health checks only.
            let mut second = H2::connect(relay.addr()).await;
            let r = second.request(&path, &[("authorization", &auth)]).await;
            assert_json_error(&r, 503, "a stream on a connection over --max-connections");
            assert_eq!(second.request("/healthz", &[]).await.status, 200);
            drop((open, again, first, second));
            // Both places are given back: a new connection is served.
            poll_until(WAIT, "a new connection under the limit", || async {
                let mut h2 = H2::connect(relay.addr()).await;
                let res = h2.get(&path, &[("authorization", &auth)]).await;
                (res.status() == 200).then_some(())
            })
            .await;
        },
    )
    .await
}
