//! Entry points for the fuzz targets in `fuzz/` and their short property
//! test twins below (run by `make test`): every parser that reads what a
//! client or a token sends. Each function panics when an invariant breaks,
//! which is what the fuzzers look for; on any input it must not panic
//! otherwise.

use std::sync::LazyLock;
use std::time::Duration;

use crate::auth::{KeySource, Verifier};
use crate::http::conn::{HeadOutcome, head_outcome};
use crate::subject;

/// The HTTP/1.1 head parser: never panics; a complete head is within the
/// input; appending bytes never turns a refusal into an acceptance.
pub fn http_head(bytes: &[u8]) {
    let outcome = head_outcome(bytes);
    if let HeadOutcome::Complete { len, .. } = outcome {
        assert!(len <= bytes.len());
        // What follows a complete head does not change the head.
        let mut more = bytes.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(head_outcome(&more), outcome);
    }
}

/// The `/events` query and subject checks: never panic; every pattern let
/// through is valid NATS syntax without control characters and is inside
/// a grant; malformed grants let nothing through.
pub fn events_query(query: &str, grants: &[String]) {
    let Ok(patterns) = crate::session::patterns_for_query(query, grants) else {
        return;
    };
    for p in &patterns {
        assert_eq!(subject::validate_pattern(p), Ok(()), "{p:?}");
        assert!(!p.chars().any(char::is_control), "{p:?}");
        assert!(
            grants
                .iter()
                .any(|g| subject::validate_pattern(g).is_ok() && subject::contains(g, p)),
            "{p:?} let through by {grants:?}"
        );
    }
}

static VERIFIER: LazyLock<Verifier> = LazyLock::new(|| {
    Verifier::new(
        &KeySource::Secret(b"fuzzing-secret".to_vec()),
        None,
        None,
        Duration::from_secs(5),
    )
    .expect("a secret key")
});

/// Token verification: arbitrary bytes never verify and never panic, and
/// neither does the deadline of whatever claims a token carries.
pub fn token(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    if let Ok(claims) = VERIFIER.verify(&text) {
        // Only reachable with the secret: the fuzzer cannot forge HMACs.
        let _ = VERIFIER.deadline(claims.exp);
        panic!("arbitrary bytes verified: {text:?}");
    }
}

/// SSE encoding: any event name and payload round-trip through a parser
/// written from the WHATWG algorithm as one event with the same id, the
/// name's first line, and the payload with CRLF and CR turned into LF.
pub fn sse_event(id: u64, event: &str, data: &[u8]) {
    let frame = crate::sse::encode_event(id, Some(event), data);
    let text = String::from_utf8_lossy(&frame);
    let events = whatwg_events(&text);
    assert_eq!(events.len(), 1, "{text:?}");
    let (got_id, got_event, got_data) = &events[0];
    assert_eq!(got_id.as_deref(), Some(id.to_string().as_str()));
    let name = event.split(['\r', '\n']).next().unwrap_or_default();
    let want_event = if name.is_empty() { "message" } else { name };
    assert_eq!(got_event, want_event);
    let want = String::from_utf8_lossy(data)
        .replace("\r\n", "\n")
        .replace('\r', "\n");
    assert_eq!(got_data, &want);
}

/// The event stream interpretation of the WHATWG HTML standard (9.2.6),
/// reduced to what a frame can hold: `(last event id, type, data)` of
/// every dispatched event.
pub fn whatwg_events(stream: &str) -> Vec<(Option<String>, String, String)> {
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (None::<String>, String::new(), String::new());
    let mut has_data = false;
    let normalized = stream.replace("\r\n", "\n").replace('\r', "\n");
    let mut lines: Vec<&str> = normalized.split('\n').collect();
    // The text after the last line break is not a complete line.
    lines.pop();
    for line in lines {
        if line.is_empty() {
            if has_data {
                let mut d = std::mem::take(&mut data);
                if d.ends_with('\n') {
                    d.pop();
                }
                let ty = if event.is_empty() {
                    "message".to_string()
                } else {
                    std::mem::take(&mut event)
                };
                out.push((id.clone(), ty, d));
            }
            event.clear();
            data.clear();
            has_data = false;
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => event = value.to_string(),
            "data" => {
                data.push_str(value);
                data.push('\n');
                has_data = true;
            }
            "id" if !value.contains('\0') => id = Some(value.to_string()),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Request heads: mostly well-formed shapes with hostile pieces mixed
    /// in, so the property runs reach past the first line.
    fn head_bytes() -> impl Strategy<Value = Vec<u8>> {
        let line = prop::sample::select(vec![
            "Host: x\r\n",
            "Content-Length: 0\r\n",
            "Content-Length: +0\r\n",
            "Content-Length: 5\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Connection: close\r\n",
            "Connection: keep-alive, Close\r\n",
            "Host: y\r\n",
            "X: \u{1}\r\n",
            "\r\n",
            "Bad Header\r\n",
        ]);
        let start = prop::sample::select(vec![
            "GET /events?subject=events.%3E HTTP/1.1\r\n",
            "GET /events?subject=events.> HTTP/1.1\r\n",
            "POST /dev/publish HTTP/1.1\r\n",
            "GET / HTTP/1.0\r\n",
            "BREW / HTCPCP/1.0\r\n",
        ]);
        (
            start,
            prop::collection::vec(line, 0..6),
            prop::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(|(s, lines, tail)| {
                let mut b = s.as_bytes().to_vec();
                for l in lines {
                    b.extend_from_slice(l.as_bytes());
                }
                b.extend_from_slice(b"\r\n");
                b.extend(tail);
                b
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn http_heads(bytes in head_bytes()) {
            http_head(&bytes);
        }

        #[test]
        fn http_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            http_head(&bytes);
        }

        #[test]
        fn queries(
            query in "(subject=[a-z.*>%0-9A-F\u{0}\u{c}\u{fffd} ]{0,12}&?){0,4}(token=x)?",
            grants in prop::collection::vec("[a-z.*> ]{0,10}", 0..3),
        ) {
            events_query(&query, &grants);
        }

        #[test]
        fn tokens(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            token(&bytes);
        }

        #[test]
        fn token_shaped_strings(s in "[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,60}\\.[A-Za-z0-9_-]{0,43}") {
            token(s.as_bytes());
        }

        #[test]
        fn sse_events(id in any::<u64>(), event in any::<String>(), data in prop::collection::vec(any::<u8>(), 0..64)) {
            sse_event(id, &event, &data);
        }
    }

    #[test]
    fn the_reference_parser_follows_the_standard() {
        let s = "id: 1\nevent: a\ndata: x\ndata:y\n\n: comment\ndata\n\nid: \0\ndata: z\r\n\r\n";
        assert_eq!(
            whatwg_events(s),
            vec![
                (Some("1".into()), "a".into(), "x\ny".into()),
                (Some("1".into()), "message".into(), "".into()),
                (Some("1".into()), "message".into(), "z".into()),
            ]
        );
    }
}
