//! The SSE wire format: events, control events, comments and `retry:`.
//!
//! Every event is encoded once into a [`Bytes`] frame by the hub and shared by
//! every client that receives it (a client's queue only holds cheap clones).

use bytes::{BufMut, Bytes, BytesMut};

/// A heartbeat: an SSE comment, ignored by EventSource but it keeps proxies
/// and NAT tables from timing the connection out.
pub const HEARTBEAT: &[u8] = b":\n\n";

/// Encodes one event. `data` is split on CRLF, LF or CR into `data:` lines so
/// that EventSource reassembles exactly the payload (joined with LF; a CR or
/// CRLF in the payload arrives as LF, which is all the format can carry).
pub fn encode_event(id: u64, event: Option<&str>, data: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(data.len() + 32);
    buf.put_slice(b"id: ");
    buf.put_slice(itoa::Buffer::new().format(id).as_bytes());
    buf.put_u8(b'\n');
    if let Some(event) = event {
        buf.put_slice(b"event: ");
        // An event name cannot span lines; keep its first line only.
        let name = event.split(['\r', '\n']).next().unwrap_or_default();
        buf.put_slice(name.as_bytes());
        buf.put_u8(b'\n');
    }
    put_data_lines(&mut buf, data);
    buf.put_u8(b'\n');
    buf.freeze()
}

/// Encodes a named event without an id (relay control events such as
/// `relay.expired` and `relay.gap`); these never move a client's resume point.
pub fn encode_control(event: &str, data: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(event.len() + data.len() + 16);
    buf.put_slice(b"event: ");
    buf.put_slice(event.as_bytes());
    buf.put_u8(b'\n');
    put_data_lines(&mut buf, data.as_bytes());
    buf.put_u8(b'\n');
    buf.freeze()
}

/// `relay.gap`: events after `last_event_id` up to `first_available` are
/// not replayed (removed by stream limits, or beyond the replay limit).
pub fn encode_gap(last_event_id: u64, first_available: u64) -> Bytes {
    let data =
        serde_json::json!({"last_event_id": last_event_id, "first_available": first_available});
    encode_control("relay.gap", &data.to_string())
}

/// `relay.reset`: the stream the client's ids came from was deleted and
/// created again, so its sequences restarted. `id: 0` moves the browser's
/// Last-Event-ID to the new stream's beginning: the events that follow (or,
/// after a reconnect, the resume from 0) are the new stream's, from its
/// first. The page should reload its state.
pub fn encode_reset() -> Bytes {
    Bytes::from_static(
        b"id: 0\nevent: relay.reset\ndata: {\"reason\":\"stream_recreated\",\"last_event_id\":0}\n\n",
    )
}

/// `relay.live` at the seam of a resume: the replay is spliced to live;
/// `last_event_id` is the last id the client has. No `id:` line: it never
/// moves the browser's Last-Event-ID.
pub fn encode_live(last_event_id: Option<u64>) -> Bytes {
    let data = serde_json::json!({ "last_event_id": last_event_id });
    encode_control("relay.live", &data.to_string())
}

/// `relay.live` on a fresh stream whose subscriptions are active: `after`
/// is where it starts (every later event of its subjects follows), also as
/// `id:`, so a browser that reconnects before its first event resumes
/// from there instead of starting fresh and missing what came meanwhile.
/// None (the position is unknown): no `id:` and `last_event_id` null.
pub fn encode_live_fresh(after: Option<u64>) -> Bytes {
    match after {
        Some(n) => {
            let data = serde_json::json!({ "last_event_id": n });
            Bytes::from(format!("id: {n}\nevent: relay.live\ndata: {data}\n\n"))
        }
        None => encode_live(None),
    }
}

/// `relay.heartbeat`: a heartbeat a page can see (`heartbeat=event`).
pub const HEARTBEAT_EVENT: &[u8] = b"event: relay.heartbeat\ndata: {}\n\n";

/// `retry: <ms>` tells EventSource how long to wait before reconnecting.
/// Every stream opens with it, and every stream the relay ends closes with
/// it, so the browser comes back after the delay.
pub fn encode_retry(ms: u64) -> Bytes {
    Bytes::from(format!("retry: {ms}\n\n"))
}

/// A fixed body for a transient refusal to an EventSource: a comment saying
/// why, then `retry:`; the stream ends at once and the browser retries.
pub fn encode_refusal(why: &str, retry_ms: u64) -> Bytes {
    let why = why.split(['\r', '\n']).next().unwrap_or_default();
    Bytes::from(format!(": {why}\nretry: {retry_ms}\n\n"))
}

fn put_data_lines(buf: &mut BytesMut, data: &[u8]) {
    let mut rest = data;
    loop {
        buf.put_slice(b"data: ");
        match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            Some(i) => {
                buf.put_slice(&rest[..i]);
                buf.put_u8(b'\n');
                let skip = if rest[i] == b'\r' && rest.get(i + 1) == Some(&b'\n') {
                    2
                } else {
                    1
                };
                rest = &rest[i + skip..];
            }
            None => {
                buf.put_slice(rest);
                buf.put_u8(b'\n');
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(b: &Bytes) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn encodes_id_event_and_data() {
        let f = encode_event(42, Some("order.shipped"), b"{\"a\":1}");
        assert_eq!(
            text(&f),
            "id: 42\nevent: order.shipped\ndata: {\"a\":1}\n\n"
        );
    }

    #[test]
    fn splits_every_line_ending() {
        let f = encode_event(1, None, b"a\r\nb\rc\nd");
        assert_eq!(text(&f), "id: 1\ndata: a\ndata: b\ndata: c\ndata: d\n\n");
        let f = encode_event(2, None, b"x\n");
        assert_eq!(text(&f), "id: 2\ndata: x\ndata: \n\n");
        let f = encode_event(3, None, b"");
        assert_eq!(text(&f), "id: 3\ndata: \n\n");
    }

    #[test]
    fn event_name_cannot_inject_lines() {
        let f = encode_event(7, Some("a\ndata: evil"), b"x");
        assert_eq!(text(&f), "id: 7\nevent: a\ndata: x\n\n");
    }

    #[test]
    fn refusal_is_a_comment_and_a_retry() {
        let f = encode_refusal("NATS is away\ndata: x", 2000);
        assert_eq!(text(&f), ": NATS is away\nretry: 2000\n\n");
    }
}
