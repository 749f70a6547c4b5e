//! Micro-benchmarks of the relay's hot paths: SSE encoding, subject
//! matching/containment, JWT verification (HS256, ES256), the fan-out of
//! one frame into 10,000 client queues, the live path's work per batch of
//! messages on 10,000 subjects, and what the metrics add per write.
//!
//! `cargo bench --bench micro` (about a minute and a half in all).

use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use sse_relay::auth::{Claims, KeySource, Verifier};
use sse_relay::client::{ClientQueue, Offer};
use sse_relay::sse::encode_event;
use sse_relay::subject::{contains, matches};

/// A throwaway P-256 key pair, generated once with openssl for this bench
/// (PKCS#8 private key, SPKI public key). Not a secret of anything.
const EC_PRIVATE_PEM: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgSBrgTLieUH/IcML/
4Q+SZnIrdMZVb14hDjYk7b/zoYahRANCAATQrFBRBduQf/c7EKTrzgwrYeZ3R4rg
2c6xo4jC6QdOos3FYrmD6PHKuzMwN/LhZYzP9zAUMbclyWGDhWVNad+z
-----END PRIVATE KEY-----
";
const EC_PUBLIC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE0KxQUQXbkH/3OxCk684MK2Hmd0eK
4NnOsaOIwukHTqLNxWK5g+jxyrszMDfy4WWMz/cwFDG3Jclhg4VlTWnfsw==
-----END PUBLIC KEY-----
";

const FANOUT_CLIENTS: usize = 10_000;
/// Frames offered to each queue set before it is dropped and re-created
/// (untimed), so queues never fill and memory stays bounded.
const FANOUT_BATCH: u64 = 64;

fn payload_100() -> Vec<u8> {
    let mut p = br#"{"t":1732500000000000000,"order":42,"status":"shipped","pad":""#.to_vec();
    while p.len() < 98 {
        p.push(b'x');
    }
    p.extend_from_slice(b"\"}");
    p
}

fn bench_encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse::encode_event");
    let one_line = payload_100();
    let three_lines =
        b"{\"line\":1,\"text\":\"first\"}\n{\"line\":2,\"text\":\"second\"}\r\n{\"line\":3}";
    g.throughput(Throughput::Bytes(one_line.len() as u64));
    g.bench_function("100B_one_line", |b| {
        b.iter(|| encode_event(black_box(123_456_789), None, black_box(&one_line)))
    });
    g.throughput(Throughput::Bytes(three_lines.len() as u64));
    g.bench_function("three_lines_named", |b| {
        b.iter(|| {
            encode_event(
                black_box(123_456_789),
                Some("order.shipped"),
                black_box(three_lines),
            )
        })
    });
    g.finish();
}

fn bench_subject(c: &mut Criterion) {
    let pairs: [(&str, &str, &str); 5] = [
        ("literal_eq", "events.orders.42", "events.orders.42"),
        ("star_in_gt", "events.orders.>", "events.orders.*"),
        ("gt_not_in_star", "events.orders.*", "events.orders.>"),
        ("mismatch_early", "events.users.>", "events.orders.42.items"),
        (
            "deep_star",
            "events.*.*.*.*.>",
            "events.a.b.c.d.e.f.g.h.i.j",
        ),
    ];
    let mut g = c.benchmark_group("subject::contains");
    for (name, outer, inner) in pairs {
        g.bench_function(name, |b| {
            b.iter(|| contains(black_box(outer), black_box(inner)))
        });
    }
    g.finish();
    let mut g = c.benchmark_group("subject::matches");
    let subjects: [(&str, &str, &str); 4] = [
        ("literal", "events.orders.42", "events.orders.42"),
        ("star", "events.orders.*", "events.orders.42"),
        ("gt", "events.>", "events.orders.42.items.7"),
        ("no_match", "events.orders.*", "events.orders.42.items"),
    ];
    for (name, pattern, subject) in subjects {
        g.bench_function(name, |b| {
            b.iter(|| matches(black_box(pattern), black_box(subject)))
        });
    }
    g.finish();
}

fn claims() -> Claims {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + 3600;
    Claims {
        exp,
        sub: Some("bench-user".into()),
        subjects: vec!["events.orders.>".into(), "events.users.42".into()],
        publish: Vec::new(),
    }
}

fn bench_jwt(c: &mut Criterion) {
    let mut g = c.benchmark_group("auth::Verifier::verify");
    let secret = b"bench-secret-0123456789abcdef0123456789".to_vec();
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(&secret),
    )
    .expect("sign HS256");
    let hv = Verifier::new(
        &KeySource::Secret(secret),
        None,
        None,
        Duration::from_secs(5),
    )
    .expect("HS256 verifier");
    assert!(hv.verify(&hs).is_ok(), "HS256 token must verify");
    g.bench_function("HS256", |b| b.iter(|| hv.verify(black_box(&hs))));

    let key = EncodingKey::from_ec_pem(EC_PRIVATE_PEM.as_bytes()).expect("EC private key");
    let es =
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims(), &key).expect("sign ES256");
    let ev = Verifier::new(
        &KeySource::PublicKeyPem(EC_PUBLIC_PEM.as_bytes().to_vec()),
        None,
        None,
        Duration::from_secs(5),
    )
    .expect("ES256 verifier");
    assert!(ev.verify(&es).is_ok(), "ES256 token must verify");
    g.bench_function("ES256", |b| b.iter(|| ev.verify(black_box(&es))));
    g.finish();
}

fn bench_fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("sse::ClientQueue::offer");
    let frame = encode_event(1, None, &payload_100());
    g.throughput(Throughput::Elements(FANOUT_CLIENTS as u64));
    g.bench_function("one_frame_to_10k_queues", |b| {
        b.iter_custom(|iters| fanout_run(iters, &frame))
    });
    g.finish();
    // What a fan-out round costs the relay outside the kernel: offered to
    // each queue, then taken by each connection, one frame at a time.
    let mut g = c.benchmark_group("hub::fanout_round");
    g.throughput(Throughput::Elements(FANOUT_CLIENTS as u64));
    let round = sse_relay::FanoutRound::new(FANOUT_CLIENTS);
    let mut seq = 0;
    g.bench_function("one_frame_to_10k_queues_and_taken", |b| {
        b.iter(|| {
            seq += 1;
            black_box(round.run(seq, &frame))
        })
    });
    g.finish();
}

/// Times `iters` fan-outs of `frame` to [`FANOUT_CLIENTS`] queues; the queues
/// are re-created (untimed) every [`FANOUT_BATCH`] frames.
fn fanout_run(iters: u64, frame: &Bytes) -> Duration {
    let mut total = Duration::ZERO;
    let mut done = 0;
    while done < iters {
        let n = (iters - done).min(FANOUT_BATCH);
        let queues: Vec<ClientQueue> = (0..FANOUT_CLIENTS)
            .map(|_| ClientQueue::new(1 << 20, 0))
            .collect();
        let start = Instant::now();
        for seq in 1..=n {
            for q in &queues {
                let r = q.offer(seq, frame);
                debug_assert_eq!(r, Offer::Queued);
                black_box(r);
            }
        }
        total += start.elapsed();
        drop(queues);
        done += n;
    }
    total
}

/// Live messages per batch in `hub::live_batch` (what one read of the
/// NATS socket typically hands over at 30k msg/s).
const LIVE_BATCH: usize = 64;
const LIVE_SUBJECTS: usize = 10_000;

/// The live path per message on 10,000 subjects with one client each:
/// the `HMSG` parsed as the live feed reads it, RePublish headers read,
/// the frame encoded, the replay window (32 MiB, full, so every push
/// evicts) and the client's queue in and out. The wire bytes are built
/// untimed.
fn bench_live_batch(c: &mut Criterion) {
    let mut g = c.benchmark_group("hub::live_batch");
    g.throughput(Throughput::Elements(LIVE_BATCH as u64));
    let mut live = sse_relay::LiveBatch::new(LIVE_SUBJECTS, 32 << 20, 100);
    let mut seq = 1;
    // Fill the window first: the steady state evicts on every push.
    while seq < 400_000 {
        let msgs = live.messages(seq, LIVE_BATCH);
        live.run(&msgs);
        seq += LIVE_BATCH as u64;
    }
    g.bench_function("64_messages_on_10k_subjects", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let msgs = live.messages(seq, LIVE_BATCH);
                seq += LIVE_BATCH as u64;
                let start = Instant::now();
                black_box(live.run(&msgs));
                total += start.elapsed();
            }
            total
        })
    });
    g.finish();
}

/// What each write of a live chunk adds for the publish-to-write histogram:
/// reading the clock and one observation (a short mutex-guarded update).
fn bench_metrics(c: &mut Criterion) {
    let mut g = c.benchmark_group("metrics");
    let metrics = sse_relay::metrics::Metrics::default();
    let stored_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
        - 3_000;
    g.bench_function("publish_to_write_per_write", |b| {
        b.iter(|| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            let secs = now.saturating_sub(black_box(stored_us)) as f64 / 1e6;
            metrics.write_latency.observe(secs);
        })
    });
    g.bench_function("bytes_written_per_write", |b| {
        b.iter(|| metrics.bytes_written.inc_by(black_box(140)))
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50)
}

criterion_group! {
    name = micro;
    config = config();
    targets = bench_encode, bench_subject, bench_jwt, bench_fanout, bench_live_batch, bench_metrics
}
criterion_main!(micro);
