//! The relay's NATS side: the connections (`link`, and the live `feed`
//! with its protocol in `wire`), the stream's [`Scope`], JetStream reads
//! (`History`) and the hub's `NatsUpstream`. Also the one place a NATS
//! message becomes an SSE frame (`event_frame` for stored messages,
//! `wire::live_message` for live ones).

mod feed;
mod history;
mod link;
mod scope;
mod upstream;
pub(crate) mod wire;

use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;

pub(crate) use feed::Feed;
pub(crate) use history::{
    Bounds, CatchUpTopic, CaughtUp, History, HistoryError, RangeReader, ResumePlan, Stored,
};
pub(crate) use link::{Link, LinkEvent, connect};
pub use scope::{Scope, default_stream_config};
pub(crate) use scope::{StreamError, load_scope};
pub(crate) use upstream::{NatsUpstream, Upstream};
pub(crate) use wire::LiveMessage;

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
    use super::{event_frame, rfc3339_micros};

    #[test]
    fn a_stored_message_s_frame_names_its_event() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Sse-Event", "order.shipped");
        let mut m = async_nats::Message {
            subject: "events.a".into(),
            reply: None,
            payload: bytes::Bytes::from_static(b"x"),
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        };
        assert_eq!(
            &event_frame(42, &m)[..],
            b"id: 42\nevent: order.shipped\ndata: x\n\n"
        );
        m.headers = None;
        assert_eq!(&event_frame(42, &m)[..], b"id: 42\ndata: x\n\n");
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
