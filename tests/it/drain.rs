//! Shutdown without a reconnect storm, and `--max-stream-age`: streams end
//! spread over `--drain-seconds` (default 4), each with a jittered
//! `retry:`, keep receiving events until they end, and lose nothing when
//! they resume.

use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;

const WAIT: Duration = Duration::from_secs(15);
const STREAMS: usize = 20;

/// Reads `c` until it ends: the data events' ids, when it ended (after
/// `t0`) and the last `retry:` it carried.
async fn read_to_end(mut c: SseClient, t0: Instant) -> (Vec<u64>, Duration, Option<u64>) {
    let mut ids = Vec::new();
    let mut retry = None;
    while let Some(ev) = c.next_event(WAIT).await {
        if ev.retry.is_some() {
            retry = ev.retry;
        }
        let control = ev.event.as_deref().is_some_and(|e| e.starts_with("relay."));
        if ev.has_data && ev.id.is_some() && !control {
            ids.push(ev.seq());
        }
    }
    assert!(c.is_closed(), "the stream ended within {WAIT:?}");
    (ids, t0.elapsed(), retry)
}

/// SIGTERM with `drain`: every stream ends within the period, spread over
/// it, with a jittered retry; events published during the drain reach the
/// streams still open; the process exits 0.
async fn drain_spreads(extra: &[&str], period: Duration) {
    let nats = NatsServer::start().await;
    let mut relay = Relay::start(&nats.url(), extra, &[]).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let tok = token(SECRET, &["events.>"], 300);
    let mut clients = Vec::new();
    for _ in 0..STREAMS {
        clients.push(relay.open_stream(&nats, &tok, &["events.drain"]).await);
    }
    let t0 = Instant::now();
    relay.sigterm();
    let readers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(read_to_end(c, t0)))
        .collect();
    // Publish through the drain: each open stream gets what is stored.
    let mut published = Vec::new();
    while t0.elapsed() < period + Duration::from_millis(500) {
        published.push(js_publish(&js, "events.drain", Bytes::from("d")).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ends = Vec::new();
    let retry_ms = sse_relay::config::DEFAULT_RETRY_MS;
    for r in readers {
        let (ids, at, retry) = join_task("stream reader", r).await;
        assert!(
            published.starts_with(&ids),
            "a draining stream gets every event in order until it ends: {ids:?}"
        );
        let retry = retry.expect("a closing retry");
        assert!(
            (retry_ms..=retry_ms * 3 / 2).contains(&retry),
            "closing retry {retry} not within [{retry_ms}, 1.5 x]"
        );
        ends.push(at);
    }
    ends.sort();
    let (first, last) = (ends[0], ends[STREAMS - 1]);
    assert!(
        last <= period + Duration::from_secs(1),
        "all ended within the period ({period:?}): last at {last:?}"
    );
    assert!(
        last - first >= period / 2,
        "spread over the period ({period:?}): from {first:?} to {last:?}"
    );
    let in_first_half = ends.iter().filter(|t| **t < period / 2).count();
    assert!(
        (STREAMS / 4..=STREAMS * 3 / 4).contains(&in_first_half),
        "{in_first_half} of {STREAMS} ended in the first half: {ends:?}"
    );
    let st = relay
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("the relay exits after the drain");
    assert_eq!(st.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_spreads_the_end_of_streams_over_drain_seconds() {
    within(
        Duration::from_secs(60),
        "sigterm_spreads_the_end_of_streams_over_drain_seconds",
        drain_spreads(&["--drain-seconds", "2"], Duration::from_secs(2)),
    )
    .await
}

/// The documented default: 4 seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_drain_is_four_seconds() {
    within(
        Duration::from_secs(60),
        "the_default_drain_is_four_seconds",
        drain_spreads(
            &[],
            Duration::from_secs(sse_relay::config::DEFAULT_DRAIN_SECS),
        ),
    )
    .await;
    assert_eq!(sse_relay::config::DEFAULT_DRAIN_SECS, 4);
}

/// `--max-stream-age 2s`: a stream ends with a `retry:` after 2 to 2.2 s,
/// and resuming from its last id loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_stream_age_ends_streams_and_resumes_lose_nothing() {
    within(
        Duration::from_secs(60),
        "max_stream_age_ends_streams_and_resumes_lose_nothing",
        async {
            let nats = NatsServer::start().await;
            let relay = Relay::start(&nats.url(), &["--max-stream-age", "2s"], &[]).await;
            let js = async_nats::jetstream::new(nats.client().await);
            let tok = token(SECRET, &["events.>"], 300);
            let c = relay.open_stream(&nats, &tok, &["events.age"]).await;
            let t0 = Instant::now();
            let reader = tokio::spawn(read_to_end(c, t0));
            let mut published = Vec::new();
            while t0.elapsed() < Duration::from_millis(3000) {
                published.push(js_publish(&js, "events.age", Bytes::from("a")).await);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let (ids, at, retry) = join_task("stream reader", reader).await;
            assert!(
                at >= Duration::from_millis(1900) && at <= Duration::from_millis(2700),
                "ended at {at:?}, not after 2 s plus at most 10%"
            );
            assert!(retry.is_some(), "ended with a retry");
            let last = *ids.last().expect("events before the end");
            let mut back = SseClient::connect(
                relay.addr(),
                &events_path(&["events.age"]),
                &[
                    ("Authorization", &bearer(&tok)),
                    ("Last-Event-ID", &last.to_string()),
                ],
            )
            .await;
            let rest: Vec<u64> = published.iter().copied().filter(|s| *s > last).collect();
            let evs = back
                .collect_data_events(rest.len(), WAIT, "resumed after the age limit")
                .await;
            let mut all = ids.clone();
            all.extend(evs.iter().map(|e| e.seq()));
            assert_eq!(all, published, "nothing lost, nothing twice");
        },
    )
    .await
}
