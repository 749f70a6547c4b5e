//! Self-tests of the test support code (SSE parser, the HTTP and SSE
//! clients over a scripted server, `/metrics` lookup), so that a relay
//! failure is never a harness bug in disguise. No nats-server or relay here.

use std::collections::VecDeque;
use std::time::Duration;

use crate::support::*;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn ev(id: Option<&str>, event: Option<&str>, data: &str) -> SseEvent {
    SseEvent {
        id: id.map(str::to_string),
        event: event.map(str::to_string),
        data: data.to_string(),
        retry: None,
        has_data: true,
    }
}

/// Feeds `body` to a fresh parser in pieces of `sizes` bytes (cycled), as
/// the reads of a socket might cut it; returns the blocks and comments.
fn parse_in_pieces(body: &[u8], sizes: &[usize]) -> (Vec<SseEvent>, Vec<String>) {
    let mut parser = SseParser::default();
    let mut events = VecDeque::new();
    let mut rest = body;
    for size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (piece, more) = rest.split_at((*size).clamp(1, rest.len()));
        parser.feed(piece, &mut events);
        rest = more;
    }
    (events.into(), parser.comments)
}

/// Line ends CRLF, LF and CR; `data` lines joined; the one optional space
/// after the colon stripped; comments kept apart; unknown fields ignored;
/// a retry-only block surfaced without data.
#[test]
fn sse_parser_follows_whatwg_line_rules() {
    let body = b"retry: 2000\n\n: hb\n\nid: 1\nevent: order.shipped\ndata: a\ndata:b\ndata:  c\n\n\
id: 2\r\ndata: x\r\ndata\r\n\r\nid: 3\rdata: y\r\r: second\nunknown: z\ndata: \n\n";
    let (events, comments) = parse_in_pieces(body, &[7, 1, 13]);
    assert_eq!(comments, vec![" hb".to_string(), " second".to_string()]);
    assert_eq!(
        events[0],
        SseEvent {
            retry: Some(2000),
            has_data: false,
            ..Default::default()
        }
    );
    assert_eq!(events[1], ev(Some("1"), Some("order.shipped"), "a\nb\n c"));
    assert_eq!(events[2], ev(Some("2"), None, "x\n"));
    assert_eq!(events[3], ev(Some("3"), None, "y"));
    assert_eq!(events[4], ev(None, None, ""));
    assert_eq!(events.len(), 5);
}

/// A block is dispatched only at its blank line.
#[test]
fn incomplete_block_at_end_is_not_dispatched() {
    let (events, _) = parse_in_pieces(b"data: a\n\ndata: partial\n", &[100]);
    assert_eq!(events, vec![ev(None, None, "a")]);
}

proptest! {
    /// Any split of the body into reads gives the same events as one piece.
    #[test]
    fn read_boundaries_do_not_matter(
        payloads in proptest::collection::vec("[a-z\u{1F680}\r\n :]{0,12}", 0..8),
        sizes in proptest::collection::vec(1usize..20, 1..4),
    ) {
        let mut body = Vec::new();
        let mut expected = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            body.extend_from_slice(format!("id: {i}\n").as_bytes());
            for line in sse_normalized(p).split('\n') {
                body.extend_from_slice(format!("data: {line}\n").as_bytes());
            }
            body.extend_from_slice(b"\n");
            expected.push(ev(Some(&i.to_string()), None, &sse_normalized(p)));
        }
        let (events, _) = parse_in_pieces(&body, &sizes);
        prop_assert_eq!(events, expected);
    }
}

/// A one-shot server answering every connection with `response`.
async fn serve_once(response: &'static [u8], close_after: bool) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut req = Vec::new();
        while !req.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                return;
            }
            req.extend_from_slice(&buf[..n]);
        }
        s.write_all(response).await.unwrap();
        if close_after {
            s.shutdown().await.unwrap();
        } else {
            // Keep the connection open: the body framing must end the read.
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        }
    });
    addr
}

/// The one-shot client reads length-delimited, chunked (with extensions and
/// trailers), close-delimited and empty bodies, status and headers.
#[tokio::test]
async fn http_client_handles_length_chunked_and_close_bodies() {
    within(Duration::from_secs(10), "http client self-test", async {
        let a = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Thing: One\r\n\r\nhello",
            false,
        )
        .await;
        let r = http_get(&a, "/", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (200, "hello"));
        assert_eq!(r.header("x-thing"), Some("One"));

        let a = serve_once(
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\n",
            false,
        )
        .await;
        let r = http_get(&a, "/", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (401, "abc0123456789"));

        let a = serve_once(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\n\r\nuntil close", true).await;
        let r = http_get(&a, "/", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (503, "until close"));
        assert_eq!(r.header("Retry-After"), Some("2"));

        let a = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n", false).await;
        let r = http_get(&a, "/", &[]).await;
        assert_eq!((r.status, r.body.as_str()), (204, ""));
    })
    .await
}

/// The SSE client hands over a retry-only block, counts comments, parses
/// events across chunk boundaries, and sees the chunked body's clean end.
#[tokio::test]
async fn sse_client_streams_and_sees_the_end() {
    within(Duration::from_secs(10), "sse client self-test", async {
        let a = serve_once(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n\
d\r\nretry: 1500\n\n\r\n4\r\n: x\n\r\n10\r\nid: 7\ndata: hi\n\n\r\n0\r\n\r\n",
            false,
        )
        .await;
        let mut c = SseClient::connect(&a, "/events", &[]).await;
        assert_eq!(c.status, 200);
        let first = c.next_event(Duration::from_secs(2)).await.unwrap();
        assert_eq!(first.retry, Some(1500));
        let e = c.expect_data_event(Duration::from_secs(2), "self-test").await;
        assert_eq!((e.seq(), e.data.as_str()), (7, "hi"));
        assert_eq!(c.comment_count(), 1);
        assert!(c.wait_closed(Duration::from_secs(2)).await);
        assert!(c.ended_cleanly());
        assert!(c.next_event(Duration::from_millis(100)).await.is_none());
    })
    .await
}

/// `/metrics` lookup: labelled and plain samples, labels in any order, and
/// 0 for a sample that is not (yet) there.
#[test]
fn metric_lookup_reads_labelled_and_plain_samples() {
    let text = "# HELP relay_resumes Resumes served.\n\
                # TYPE relay_resumes counter\n\
                relay_resumes_total{source=\"memory\"} 12\n\
                relay_resumes_total{source=\"jetstream\"} 3\n\
                # TYPE relay_jetstream_requests counter\n\
                relay_jetstream_requests_total 7\n\
                # TYPE relay_gaps counter\n\
                # TYPE relay_x gauge\n\
                relay_x{b=\"2\",a=\"q\"} 1.5\n\
                # EOF\n";
    let memory = [("source", "memory")];
    assert_eq!(metric_value(text, "relay_resumes_total", &memory), 12.0);
    let jetstream = [("source", "jetstream")];
    assert_eq!(metric_value(text, "relay_resumes_total", &jetstream), 3.0);
    assert_eq!(
        metric_value(text, "relay_jetstream_requests_total", &[]),
        7.0
    );
    // No such sample (yet): 0, as for a counter never incremented.
    assert_eq!(metric_value(text, "relay_gaps_total", &[]), 0.0);
    let other = [("source", "other")];
    assert_eq!(metric_value(text, "relay_resumes_total", &other), 0.0);
    assert_eq!(metric_value(text, "relay_resumes_total", &[]), 0.0);
    // Label order does not matter.
    assert_eq!(
        metric_value(text, "relay_x", &[("a", "q"), ("b", "2")]),
        1.5
    );
}
