//! The NATS client protocol, as far as the live feed needs it: the
//! server's operations parsed in place from the read buffer, the few
//! commands the feed sends, and a republished message turned into its
//! [`LiveMessage`] straight from the wire bytes.
//!
//! Why not async-nats for this part: it builds a `HeaderMap` of `String`s
//! for every message with headers, and RePublish sets five. Measured in the
//! load harness (10,000 subjects, the axum peer reading the republished
//! copies beside the plain subjects: `--peers axum,axum-republished`), that
//! map cost 0.7-3.9 µs of user time per message in six paired runs, about
//! as much as the relay spends on everything else a delivery needs. Here a
//! message costs one allocation: its SSE frame.
//! Requests (JetStream reads, publishes) stay on async-nats.

use bytes::{BufMut, Bytes, BytesMut};

use super::Republished;

/// Longest control line read (`INFO` with a large cluster's URLs is the
/// longest the server sends); a longer one is a protocol error.
pub(crate) const MAX_CONTROL_LINE: usize = 64 * 1024;

/// One operation from the server, borrowing the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ServerOp<'a> {
    /// `INFO {json}`.
    Info(&'a [u8]),
    /// `MSG` or `HMSG`: `headers` is the header block (`NATS/1.0` line and
    /// all) when the message has one.
    Msg {
        subject: &'a [u8],
        sid: u64,
        headers: Option<&'a [u8]>,
        payload: &'a [u8],
    },
    Ping,
    Pong,
    Ok,
    /// `-ERR 'text'`: the text, quotes removed.
    Err(&'a [u8]),
}

/// Bytes the server sent that are not the protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("NATS protocol error: {0}")]
pub(crate) struct ProtocolError(pub(crate) &'static str);

/// Parses the operation at the start of `buf`: the operation and the bytes
/// it took, `None` when `buf` does not hold all of it yet. A message's
/// payload may be at most `max_payload` bytes.
pub(crate) fn parse(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(ServerOp<'_>, usize)>, ProtocolError> {
    let Some(nl) = buf.iter().take(MAX_CONTROL_LINE).position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_CONTROL_LINE {
            Err(ProtocolError("control line too long"))
        } else {
            Ok(None)
        };
    };
    let line = buf[..nl]
        .strip_suffix(b"\r")
        .ok_or(ProtocolError("control line not ended by CRLF"))?;
    let after_line = nl + 1;
    let (name, args) = match line.iter().position(|b| b.is_ascii_whitespace()) {
        Some(i) => (&line[..i], line[i..].trim_ascii()),
        None => (line, &line[..0]),
    };
    let op = if name.eq_ignore_ascii_case(b"MSG") || name.eq_ignore_ascii_case(b"HMSG") {
        let with_headers = name.len() == 4;
        return message(buf, after_line, args, with_headers, max_payload);
    } else if name.eq_ignore_ascii_case(b"PING") {
        ServerOp::Ping
    } else if name.eq_ignore_ascii_case(b"PONG") {
        ServerOp::Pong
    } else if name.eq_ignore_ascii_case(b"+OK") {
        ServerOp::Ok
    } else if name.eq_ignore_ascii_case(b"-ERR") {
        let text = args.strip_prefix(b"'").unwrap_or(args);
        ServerOp::Err(text.strip_suffix(b"'").unwrap_or(text))
    } else if name.eq_ignore_ascii_case(b"INFO") {
        ServerOp::Info(args)
    } else {
        return Err(ProtocolError("unknown operation"));
    };
    Ok(Some((op, after_line)))
}

/// `MSG <subject> <sid> [reply-to] <#bytes>` or
/// `HMSG <subject> <sid> [reply-to] <#header bytes> <#total bytes>`, then
/// the bytes and CRLF.
fn message<'a>(
    buf: &'a [u8],
    start: usize,
    args: &'a [u8],
    with_headers: bool,
    max_payload: usize,
) -> Result<Option<(ServerOp<'a>, usize)>, ProtocolError> {
    let mut fields = args
        .split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty());
    let mut next = [&b""[..]; 5];
    let mut n = 0;
    for f in fields.by_ref() {
        if n == next.len() {
            return Err(ProtocolError("too many message arguments"));
        }
        next[n] = f;
        n += 1;
    }
    let sizes = if with_headers { 2 } else { 1 };
    // subject, sid, an optional reply subject, then the sizes.
    if n != 2 + sizes && n != 3 + sizes {
        return Err(ProtocolError("wrong number of message arguments"));
    }
    let (subject, sid) = (next[0], number(next[1])?);
    let total = number(next[n - 1])?;
    let header_len = if with_headers {
        number(next[n - 2])?
    } else {
        0
    };
    let total = usize::try_from(total).map_err(|_| ProtocolError("message size"))?;
    let header_len = usize::try_from(header_len).map_err(|_| ProtocolError("message size"))?;
    if header_len > total {
        return Err(ProtocolError("header size above message size"));
    }
    if total > max_payload {
        return Err(ProtocolError("message above the server's max_payload"));
    }
    let end = start + total;
    if buf.len() < end + 2 {
        return Ok(None);
    }
    if &buf[end..end + 2] != b"\r\n" {
        return Err(ProtocolError("message not ended by CRLF"));
    }
    let body = &buf[start..end];
    let (headers, payload) = if with_headers {
        let (h, p) = body.split_at(header_len);
        (Some(h), p)
    } else {
        (None, body)
    };
    let op = ServerOp::Msg {
        subject,
        sid,
        headers,
        payload,
    };
    Ok(Some((op, end + 2)))
}

fn number(s: &[u8]) -> Result<u64, ProtocolError> {
    if s.is_empty() || s.len() > 20 {
        return Err(ProtocolError("not a number"));
    }
    s.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return Err(ProtocolError("not a number"));
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(d - b'0')))
            .ok_or(ProtocolError("number too large"))
    })
}

/// A republished event as the hub takes it: RePublish's ids and the SSE
/// frame, encoded once here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LiveMessage {
    pub(crate) id: Republished,
    pub(crate) frame: Bytes,
}

/// The headers the relay reads, as `HeaderMap::get` would find them: names
/// compared exactly, the first value of a name kept, values trimmed.
#[derive(Debug, Default, PartialEq, Eq)]
struct Read<'a> {
    seq: Option<&'a [u8]>,
    previous: Option<&'a [u8]>,
    stamp: Option<&'a [u8]>,
    event: Option<&'a [u8]>,
}

fn read_headers(block: &[u8]) -> Read<'_> {
    let mut read = Read::default();
    // The first line is the version (and a status, which live messages
    // do not carry); a line without a colon is skipped.
    for line in block.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        let slot = match name {
            b"Nats-Sequence" => &mut read.seq,
            b"Nats-Last-Sequence" => &mut read.previous,
            b"Nats-Time-Stamp" => &mut read.stamp,
            n if n == super::EVENT_HEADER.as_bytes() => &mut read.event,
            _ => continue,
        };
        slot.get_or_insert(value);
    }
    read
}

/// Reads RePublish's headers of a live message and encodes its frame. A
/// message without a valid `Nats-Sequence` (1 or more) was not republished
/// by the stream and has no resumable id: `None`.
pub(crate) fn live_message(headers: Option<&[u8]>, payload: &[u8]) -> Option<LiveMessage> {
    let read = read_headers(headers?);
    let seq = read.seq.and_then(|s| number(s).ok()).filter(|&s| s > 0)?;
    let previous = read.previous.and_then(|s| number(s).ok()).unwrap_or(0);
    let stored_us = read
        .stamp
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(super::rfc3339_micros)
        .unwrap_or(0);
    let event = read
        .event
        .and_then(|s| std::str::from_utf8(s).ok())
        .filter(|s| !s.is_empty());
    Some(LiveMessage {
        id: Republished {
            seq,
            previous,
            stored_us,
        },
        frame: crate::sse::encode_event(seq, event, payload),
    })
}

/// `SUB <subject> <sid>`.
pub(crate) fn sub(out: &mut BytesMut, subject: &str, sid: u64) {
    out.put_slice(b"SUB ");
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    out.put_slice(itoa::Buffer::new().format(sid).as_bytes());
    out.put_slice(b"\r\n");
}

/// `PUB <subject> <reply> <#bytes>` and the payload.
pub(crate) fn publish(out: &mut BytesMut, subject: &str, reply: &str, payload: &[u8]) {
    out.put_slice(b"PUB ");
    out.put_slice(subject.as_bytes());
    out.put_u8(b' ');
    out.put_slice(reply.as_bytes());
    out.put_u8(b' ');
    out.put_slice(itoa::Buffer::new().format(payload.len()).as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(payload);
    out.put_slice(b"\r\n");
}

/// `UNSUB <sid>`.
pub(crate) fn unsub(out: &mut BytesMut, sid: u64) {
    out.put_slice(b"UNSUB ");
    out.put_slice(itoa::Buffer::new().format(sid).as_bytes());
    out.put_slice(b"\r\n");
}

pub(crate) const PING: &[u8] = b"PING\r\n";
pub(crate) const PONG: &[u8] = b"PONG\r\n";

/// Can `subject` go into a `SUB` line as it is?
pub(crate) fn is_subscribable(subject: &str) -> bool {
    !subject.is_empty()
        && !subject
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    fn one(buf: &[u8]) -> (ServerOp<'_>, usize) {
        parse(buf, MAX).unwrap().expect("a whole operation")
    }

    #[test]
    fn parses_every_operation_the_server_sends() {
        assert_eq!(one(b"PING\r\n"), (ServerOp::Ping, 6));
        assert_eq!(one(b"pong\r\n"), (ServerOp::Pong, 6));
        assert_eq!(one(b"+OK\r\n"), (ServerOp::Ok, 5));
        assert_eq!(
            one(b"-ERR 'Stale Connection'\r\n").0,
            ServerOp::Err(b"Stale Connection")
        );
        assert_eq!(
            one(b"INFO {\"a\":1}\r\nPING").0,
            ServerOp::Info(b"{\"a\":1}")
        );
        assert_eq!(
            one(b"MSG a.b 7 5\r\nhello\r\n"),
            (
                ServerOp::Msg {
                    subject: b"a.b",
                    sid: 7,
                    headers: None,
                    payload: b"hello"
                },
                20
            )
        );
        assert_eq!(
            one(b"MSG a.b 7 reply.x 0\r\n\r\n").0,
            ServerOp::Msg {
                subject: b"a.b",
                sid: 7,
                headers: None,
                payload: b""
            }
        );
        let hmsg = b"HMSG a 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n";
        assert_eq!(
            one(hmsg),
            (
                ServerOp::Msg {
                    subject: b"a",
                    sid: 1,
                    headers: Some(b"NATS/1.0\r\n\r\n"),
                    payload: b"hi"
                },
                hmsg.len()
            )
        );
    }

    #[test]
    fn waits_for_the_rest_and_refuses_what_is_not_the_protocol() {
        for part in [
            &b""[..],
            b"PIN",
            b"MSG a 1 5\r\nhel",
            b"MSG a 1 5\r\nhello",
            b"MSG a 1 5\r\nhello\r",
        ] {
            assert_eq!(parse(part, MAX), Ok(None), "{part:?}");
        }
        for bad in [
            &b"PING\n"[..],
            b"WHAT\r\n",
            b"MSG a 1\r\n",
            b"MSG a b 1\r\n",
            b"MSG a 1 -1\r\n",
            b"MSG a 1 r x y 3\r\n",
            b"HMSG a 1 5 3\r\n",
            b"MSG a 1 2\r\nhixx",
            b"MSG a 1 99999999999999999999\r\n",
        ] {
            assert!(parse(bad, MAX).is_err(), "{bad:?}");
        }
        assert!(parse(b"MSG a 1 11\r\n", 10).is_err(), "above max_payload");
        let long = vec![b'x'; MAX_CONTROL_LINE];
        assert!(parse(&long, MAX).is_err(), "a control line without end");
    }

    fn republish(seq: &str, extra: &str) -> Vec<u8> {
        format!(
            "NATS/1.0\r\nNats-Stream: EVENTS\r\nNats-Subject: events.a\r\nNats-Sequence: {seq}\r\n\
             Nats-Time-Stamp: 1970-01-01T00:00:01.5Z\r\nNats-Last-Sequence: 40\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn reads_every_header_republish_sets_and_the_event_name() {
        let m = live_message(Some(&republish("42", "")), b"x").unwrap();
        assert_eq!(
            m.id,
            Republished {
                seq: 42,
                previous: 40,
                stored_us: 1_500_000,
            }
        );
        assert_eq!(&m.frame[..], b"id: 42\ndata: x\n\n");
        let named = republish("42", "Sse-Event:  order.shipped \r\nSse-Event: second\r\n");
        assert_eq!(
            &live_message(Some(&named), b"x").unwrap().frame[..],
            b"id: 42\nevent: order.shipped\ndata: x\n\n",
            "the first value, trimmed"
        );
        let empty = republish("42", "Sse-Event: \r\nsse-event: lower\r\n");
        assert_eq!(
            &live_message(Some(&empty), b"x").unwrap().frame[..],
            b"id: 42\ndata: x\n\n",
            "an empty name is no name; names compare exactly"
        );
        let only_seq = b"NATS/1.0\r\nNats-Sequence: 9\r\n\r\n";
        assert_eq!(
            live_message(Some(only_seq), b"").unwrap().id,
            Republished {
                seq: 9,
                previous: 0,
                stored_us: 0,
            },
            "the other headers are optional"
        );
    }

    #[test]
    fn a_live_message_needs_a_stream_sequence_of_1_or_more() {
        assert!(live_message(None, b"x").is_none(), "no headers, no id");
        for bad in ["0", "-1", "x", "", "18446744073709551616", "1 2"] {
            assert!(
                live_message(Some(&republish(bad, "")), b"x").is_none(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn writes_the_commands_the_feed_sends() {
        let mut out = BytesMut::new();
        sub(&mut out, "relay.events.>", 12);
        unsub(&mut out, 12);
        publish(&mut out, "$JS.API.STREAM.INFO.EVENTS", "_INBOX.x.7", b"{}");
        assert_eq!(
            &out[..],
            b"SUB relay.events.> 12\r\nUNSUB 12\r\nPUB $JS.API.STREAM.INFO.EVENTS _INBOX.x.7 2\r\n{}\r\n"
        );
        assert!(is_subscribable("relay.events.a"));
        for bad in ["", "a b", "a\r\nPUB x 1", "a\tb"] {
            assert!(!is_subscribable(bad), "{bad:?}");
        }
    }

    proptest::proptest! {
        /// Hostile or torn input never panics, and an operation read from a
        /// buffer cut anywhere is either incomplete or the same operation.
        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200), cut in 0usize..200) {
            let whole = parse(&bytes, 64);
            let cut = cut.min(bytes.len());
            if let (Ok(Some((op, used))), Ok(Some((part, part_used)))) = (&whole, parse(&bytes[..cut], 64)) {
                proptest::prop_assert_eq!((op, used), (&part, &part_used));
            }
            let _ = live_message(Some(&bytes), &bytes);
        }

        #[test]
        fn a_message_split_anywhere_reads_the_same(cut in 0usize..60, seq in 1u64..u64::MAX) {
            let headers = republish(&seq.to_string(), "");
            let mut wire = format!("HMSG relay.events.a 3 {} {}\r\n", headers.len(), headers.len() + 5).into_bytes();
            wire.extend_from_slice(&headers);
            wire.extend_from_slice(b"hello\r\n");
            let cut = cut.min(wire.len());
            if cut < wire.len() {
                proptest::prop_assert_eq!(parse(&wire[..cut], MAX), Ok(None));
            }
            let (op, used) = one(&wire);
            proptest::prop_assert_eq!(used, wire.len());
            let ServerOp::Msg { headers, payload, sid, .. } = op else {
                return Err(proptest::test_runner::TestCaseError::fail("not a message"));
            };
            proptest::prop_assert_eq!(sid, 3);
            proptest::prop_assert_eq!(live_message(headers, payload).map(|m| m.id.seq), Some(seq));
        }
    }
}
