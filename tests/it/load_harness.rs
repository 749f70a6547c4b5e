//! Self-tests of the load harness's pure parts (`benches/load`), included
//! here as they are: the bench target has no test harness of its own
//! (`harness = false`), so `cargo test` would never run tests kept there.
//! The NATS protocol parser of `peer-epoll`, the per-second latency
//! histograms merged across client processes, the latency a server adds to
//! each message, the SVG chart.

#[allow(dead_code)]
#[path = "../../benches/load/peers/nats_proto.rs"]
mod nats_proto;
#[allow(dead_code)]
#[path = "../../benches/load/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../../benches/load/svg.rs"]
mod svg;

use nats_proto::{MAX_LINE, Op, next_op, payload_n};
use report::{MAX_SECONDS, PerSecond, added_latency};
use svg::{Series, line_chart, nice_ceil};

#[test]
fn msg_without_and_with_reply_to() {
    let buf = b"MSG events.bench.7 12 5\r\nhello\r\nMSG a 3 _INBOX.x 2\r\nhi\r\n";
    let (op, used) = next_op(buf).unwrap().unwrap();
    assert_eq!(
        op,
        Op::Msg {
            sid: 12,
            payload: b"hello"
        }
    );
    let (op, used2) = next_op(&buf[used..]).unwrap().unwrap();
    assert_eq!(
        op,
        Op::Msg {
            sid: 3,
            payload: b"hi"
        }
    );
    assert_eq!(used + used2, buf.len());
}

#[test]
fn a_msg_payload_may_hold_crlf_and_arrive_in_pieces() {
    let buf = b"MSG s 1 4\r\na\r\nb\r\nPING\r\n";
    for cut in 0..buf.len() {
        let r = next_op(&buf[..cut]).unwrap();
        // Complete only once the CRLF after the 4 payload bytes is in.
        assert_eq!(r.is_some(), cut >= 17, "cut at {cut}");
    }
    let (op, used) = next_op(buf).unwrap().unwrap();
    assert_eq!(
        op,
        Op::Msg {
            sid: 1,
            payload: b"a\r\nb"
        }
    );
    assert_eq!(next_op(&buf[used..]).unwrap().unwrap(), (Op::Ping, 6));
}

#[test]
fn nats_control_lines() {
    assert_eq!(next_op(b"PONG\r\n").unwrap().unwrap(), (Op::Pong, 6));
    assert_eq!(next_op(b"+OK\r\n").unwrap().unwrap(), (Op::Other, 5));
    assert_eq!(
        next_op(b"INFO {\"server_id\":\"x\"}\r\n")
            .unwrap()
            .unwrap()
            .0,
        Op::Other
    );
    assert_eq!(
        next_op(b"-ERR 'Slow Consumer'\r\n").unwrap().unwrap().0,
        Op::Err(b"'Slow Consumer'")
    );
    assert_eq!(next_op(b"PIN").unwrap(), None);
}

#[test]
fn nats_garbage_is_an_error() {
    assert!(next_op(b"HELLO\r\n").is_err());
    assert!(next_op(b"MSG s x 3\r\nabc\r\n").is_err());
    assert!(next_op(b"MSG s 1\r\n").is_err());
    assert!(next_op(b"MSG s 1 3\r\nabcXY").is_err());
    assert!(next_op(&vec![b'x'; MAX_LINE + 1]).is_err());
}

#[test]
fn payload_count_is_the_peers_id() {
    assert_eq!(payload_n(br#"{"t":17,"n":42,"pad":"xx"}"#), Some(42));
    assert_eq!(payload_n(br#"{"t":17,"pad":"xx"}"#), None);
}

fn seconds(samples: &[(usize, u64)]) -> PerSecond {
    let mut p = PerSecond::default();
    for &(sec, us) in samples {
        p.record(sec, us);
    }
    p
}

/// Sample counts per second, through the JSON the client processes send.
fn counts(p: &PerSecond) -> Vec<u64> {
    let v = p.to_json();
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| h["n"].as_u64().unwrap())
        .collect()
}

#[test]
fn per_second_merge_adds_second_by_second() {
    // Two client processes: one saw seconds 0 and 1, the other 0 and 3.
    let mut a = seconds(&[(0, 1_000), (1, 2_000), (1, 2_000)]);
    let b = seconds(&[(0, 9_000), (3, 4_000)]);
    a.merge(&PerSecond::from_json(&b.to_json()));
    assert_eq!(counts(&a), [2, 2, 0, 1]);
    let p99 = a.p99_ms();
    // Second 0 holds 1 ms and 9 ms: its p99 is the larger (to a bucket).
    assert!((p99[0].unwrap() - 9.0).abs() < 0.6, "{p99:?}");
    assert!((p99[1].unwrap() - 2.0).abs() < 0.2, "{p99:?}");
    assert_eq!(p99[2], None);
    assert!((p99[3].unwrap() - 4.0).abs() < 0.3, "{p99:?}");
}

#[test]
fn per_second_merge_into_empty_and_shorter() {
    let a = seconds(&[(2, 5_000), (0, 700)]);
    let mut total = PerSecond::default();
    total.merge(&a);
    assert_eq!(total.p99_ms(), a.p99_ms());
    let mut short = seconds(&[(0, 700)]);
    short.merge(&a);
    assert_eq!(counts(&short), [2, 0, 1]);
}

#[test]
fn per_second_ignores_seconds_past_the_cap() {
    let p = seconds(&[(MAX_SECONDS, 1), (usize::MAX, 1)]);
    assert!(p.p99_ms().is_empty());
}

fn polylines(svg: &str) -> Vec<Vec<(f64, f64)>> {
    svg.lines()
        .filter(|l| l.starts_with("<polyline"))
        .map(|l| {
            let pts = l.split("points=\"").nth(1).unwrap();
            let pts = pts.split('"').next().unwrap();
            pts.split_whitespace()
                .map(|p| {
                    let (a, b) = p.split_once(',').unwrap();
                    (a.parse().unwrap(), b.parse().unwrap())
                })
                .collect()
        })
        .collect()
}

#[test]
fn svg_has_one_polyline_per_series_and_a_point_per_sampled_second() {
    let relay = [Some(1.0), Some(2.5), None, Some(4.0)];
    let axum = [Some(3.0), Some(30.0), Some(12.0)];
    let probe = [Some(0.5), Some(0.5)];
    let svg = line_chart(
        "p99 <per second>",
        &[
            Series {
                name: "relay",
                values: &relay,
                color: 0,
                dashed: false,
            },
            Series {
                name: "peer-axum",
                values: &axum,
                color: 1,
                dashed: false,
            },
            Series {
                name: "relay: NATS path",
                values: &probe,
                color: 0,
                dashed: true,
            },
        ],
    );
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("p99 &lt;per second&gt;"));
    let lines = polylines(&svg);
    assert_eq!(lines.len(), 3);
    // The probe is drawn dashed, in its server's colour.
    assert_eq!(
        svg.matches("stroke-dasharray").count(),
        2,
        "its line and its legend"
    );
    assert_eq!(svg.matches("stroke=\"#1f77b4\"").count(), 4);
    assert_eq!(lines[0].len(), 3, "the second without samples is left out");
    assert_eq!(lines[1].len(), 3);
    // Larger values sit higher (smaller y); x grows with the second.
    assert!(lines[1][1].1 < lines[1][0].1);
    assert!(lines[0].windows(2).all(|w| w[0].0 < w[1].0));
    // Labelled axes: 30 ms rounds the top up to 50 ms; seconds 0..3.
    assert!(svg.contains(">50 ms<") && svg.contains(">0 ms<"));
    assert!(svg.contains(">0 s<") && svg.contains(">3 s<"));
    assert!(svg.contains(">peer-axum<"));
}

#[test]
fn svg_of_nothing_is_still_a_document() {
    let svg = line_chart("nothing", &[]);
    assert!(svg.contains("</svg>"));
    assert!(polylines(&svg).is_empty());
}

#[test]
fn svg_axis_tops_are_round() {
    assert_eq!(nice_ceil(0.7), 1.0);
    assert_eq!(nice_ceil(13.0), 20.0);
    assert_eq!(nice_ceil(200.0), 200.0);
    assert_eq!(nice_ceil(201.0), 500.0);
}

#[test]
fn warm_up_events_are_left_out_of_latency_and_without_a_window_none_are() {
    let start = 1_000_000_000u64;
    assert!(
        !report::measured(start - 1, Some(start)),
        "published in the warm-up"
    );
    assert!(report::measured(start, Some(start)));
    assert!(report::measured(start + 5, Some(start)));
    assert!(
        report::measured(0, None),
        "no measured window: every event counts"
    );
}

/// Each client's receipt is paired with the probe's receipt of the same
/// message (subject and publish time), never with another subject's or
/// another message's; a client ahead of the probe added nothing, a message
/// the probe missed is counted, not guessed, and the seconds count from
/// the epoch by the client's receipt.
#[test]
fn added_latency_pairs_each_arrival_with_the_probe_s_of_the_same_message() {
    let ms = 1_000_000u64;
    let t = 5_000 * ms;
    let later = t + 2_000 * ms;
    let probe = std::collections::HashMap::from([
        ((0, t), t + 2 * ms),
        ((1, t), t + 30 * ms),
        ((0, t + ms), t + 3 * ms),
        ((0, later), later + ms),
    ]);
    let clients = [
        [0, t, t + 5 * ms],         // 3 ms after the probe, before the epoch
        [1, t, t + 31 * ms],        // 1 ms, though 31 ms end to end
        [0, t + ms, t + 10 * ms],   // 7 ms
        [1, t, t + 29 * ms],        // ahead of the probe: 0
        [2, t, t + 4 * ms],         // the probe never saw subject 2
        [0, later, later + 3 * ms], // 2 ms, in the epoch's second second
    ];
    let added = added_latency(&clients, &probe, t + 6 * ms);
    assert_eq!(added.unpaired, 1);
    let hist = &added.hist;
    assert_eq!(hist.count, 5);
    assert_eq!(hist.max, 7_000, "µs");
    assert_eq!(hist.quantile(0.2), 0);
    let median = hist.quantile(0.4);
    assert!((950..=1_050).contains(&median), "{median} µs");
    let fourth = hist.quantile(0.8);
    assert!((2_900..=3_100).contains(&fourth), "{fourth} µs");
    let p99 = added.per_second.p99_ms();
    assert_eq!(p99.len(), 2, "{p99:?}");
    let near = |v: Option<f64>, want: f64| v.is_some_and(|v| (v - want).abs() <= want * 0.07);
    assert!(near(p99[0], 7.0), "{p99:?}");
    assert!(near(p99[1], 2.0), "{p99:?}");
    assert_eq!(counts(&added.per_second), [3, 1]);
}
