//! The relay's NATS side: the connection (`link`), the stream's
//! [`Scope`], JetStream reads (`History`) and the hub's `NatsUpstream`.
//! Also the one place a NATS message becomes an SSE frame.

mod history;
mod link;
mod scope;
mod upstream;

use async_nats::header::{
    HeaderMap, HeaderName, HeaderValue, NATS_LAST_SEQUENCE, NATS_SEQUENCE, NATS_TIME_STAMP,
};
use bytes::Bytes;

pub(crate) use history::{
    Bounds, CatchUpTopic, CaughtUp, History, HistoryError, RangeReader, ResumePlan, Stored,
};
pub(crate) use link::{Link, LinkEvent, connect};
pub use scope::{Scope, default_stream_config};
pub(crate) use scope::{StreamError, load_scope};
pub(crate) use upstream::{LiveMessage, NatsUpstream, Upstream};

/// The header a publisher sets to name the SSE event (`event:` line).
pub const EVENT_HEADER: &str = "Sse-Event";

const EVENT: HeaderName = HeaderName::from_static(EVENT_HEADER);

/// Encodes a stored or republished message as its SSE frame: `id:` is the
/// stream sequence, `event:` the `Sse-Event` header when set.
pub(crate) fn event_frame(seq: u64, msg: &async_nats::Message) -> Bytes {
    let event = msg
        .headers
        .as_ref()
        .and_then(|h| h.iter().find(|(n, _)| **n == EVENT))
        .and_then(|(_, v)| v.first())
        .map(HeaderValue::as_str)
        .filter(|s| !s.is_empty());
    crate::sse::encode_event(seq, event, &msg.payload)
}

/// What RePublish says of a live message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Republished {
    /// The stream sequence (`Nats-Sequence`): the event's id.
    pub seq: u64,
    /// The previous event stored on the same subject (`Nats-Last-Sequence`;
    /// 0 when there was none).
    pub previous: u64,
    /// When the stream stored it (`Nats-Time-Stamp`), in microseconds since
    /// the Unix epoch; 0 when absent or unreadable.
    pub stored_us: u64,
}

/// Reads RePublish's headers of a live message. A message without a valid
/// `Nats-Sequence` was not republished by the stream and has no resumable
/// id. Headers are read here and in [`event_frame`] by a scan of the map's
/// few entries, names compared as `HeaderMap::get` compares them, without
/// the name parsing and SipHash a `get` costs.
pub(crate) fn republished(msg: &async_nats::Message) -> Option<Republished> {
    let headers: &HeaderMap = msg.headers.as_ref()?;
    let (mut seq, mut previous, mut stamp) = (None, None, None);
    for (name, values) in headers.iter() {
        let slot = if *name == NATS_SEQUENCE {
            &mut seq
        } else if *name == NATS_LAST_SEQUENCE {
            &mut previous
        } else if *name == NATS_TIME_STAMP {
            &mut stamp
        } else {
            continue;
        };
        *slot = values.first().map(HeaderValue::as_str);
    }
    // Stream sequences start at 1: a 0 is no event of the stream.
    let seq = seq?.parse().ok().filter(|&s: &u64| s > 0);
    let Some(seq) = seq else {
        tracing::warn!(subject = ?msg.subject.as_str(), "message without a valid Nats-Sequence ignored");
        return None;
    };
    let previous = previous.and_then(|v| v.parse().ok()).unwrap_or(0);
    let stored_us = stamp.and_then(rfc3339_micros).unwrap_or(0);
    Some(Republished {
        seq,
        previous,
        stored_us,
    })
}

/// Microseconds since the Unix epoch of an RFC 3339 time as nats-server
/// writes it (`2026-11-30T11:18:00.948397123Z`: Go's RFC3339Nano, with
/// trailing zeros of the fraction trimmed, or an offset instead of `Z`).
pub(crate) fn rfc3339_micros(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let d = b.get(r)?;
        if d.is_empty() || !d.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(d.iter().fold(0i64, |n, c| n * 10 + i64::from(c - b'0')))
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        // The first six digits, right-padded.
        for k in 0..6 {
            let d = b
                .get(start + k)
                .filter(|_| start + k < i)
                .map_or(0, |c| c - b'0');
            micros = micros * 10 + i64::from(d);
        }
    }
    let offset = match b.get(i..)? {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let h = num(i + 1..i + 3)?;
            let m = num(i + 4..i + 6)?;
            let _ = (h1, h2, m1, m2);
            let off = (h * 60 + m) * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    // Days from the civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + min * 60 + sec - offset;
    u64::try_from(secs.checked_mul(1_000_000)?.checked_add(micros)?).ok()
}

#[cfg(test)]
mod tests {
    use super::{Republished, event_frame, republished, rfc3339_micros};

    fn live(seq: &str) -> async_nats::Message {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Sequence", seq);
        async_nats::Message {
            subject: "relay.events.a".into(),
            reply: None,
            payload: bytes::Bytes::from_static(b"x"),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn a_live_message_needs_a_stream_sequence_of_1_or_more() {
        assert_eq!(republished(&live("7")).map(|r| r.seq), Some(7));
        for bad in ["0", "-1", "x", "", "18446744073709551616"] {
            assert_eq!(republished(&live(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_every_header_republish_sets_and_the_event_name() {
        let mut m = live("42");
        let h = m.headers.as_mut().unwrap();
        h.insert("Nats-Stream", "EVENTS");
        h.insert("Nats-Subject", "events.a");
        h.insert("Nats-Last-Sequence", "40");
        h.insert("Nats-Time-Stamp", "1970-01-01T00:00:01.5Z");
        assert_eq!(
            republished(&m),
            Some(Republished {
                seq: 42,
                previous: 40,
                stored_us: 1_500_000,
            })
        );
        assert_eq!(&event_frame(42, &m)[..], b"id: 42\ndata: x\n\n");
        m.headers
            .as_mut()
            .unwrap()
            .insert("Sse-Event", "order.shipped");
        assert_eq!(
            &event_frame(42, &m)[..],
            b"id: 42\nevent: order.shipped\ndata: x\n\n"
        );
        // Without RePublish's headers: no id, and no guess at one.
        let mut plain = live("1");
        plain.headers = None;
        assert_eq!(republished(&plain), None);
        assert_eq!(
            republished(&live("9")),
            Some(Republished {
                seq: 9,
                previous: 0,
                stored_us: 0,
            }),
            "the other headers are optional"
        );
    }

    #[test]
    fn reads_nats_server_time_stamps() {
        for (s, want) in [
            ("1970-01-01T00:00:00Z", Some(0)),
            (
                "2026-11-30T11:18:00.948397123Z",
                Some(1_796_037_480_948_397),
            ),
            ("2000-02-29T23:59:59.5Z", Some(951_868_799_500_000)),
            ("2024-03-01T00:00:00Z", Some(1_709_251_200_000_000)),
            (
                "2026-11-30T12:18:00.948397+01:00",
                Some(1_796_037_480_948_397),
            ),
            ("2026-11-30T11:18:00.Z", None),
            ("2026-13-30T11:18:00Z", None),
            ("2026-11-30 11:18:00Z", None),
            ("2026-11-30T11:18:00", None),
            ("1969-12-31T23:59:59Z", None),
            ("", None),
            ("2026-11-30T11:18:00.9Zjunk", None),
        ] {
            assert_eq!(rfc3339_micros(s), want, "{s:?}");
        }
    }
}
