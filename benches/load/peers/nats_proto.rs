//! The plain NATS client protocol as the epoll peer speaks it: the blocking
//! handshake, the server's operations cut from a byte buffer, and the one
//! payload field the peers read. Only `std`: the integration tests include this file as it is
//! (tests/it/load_harness.rs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Longest control line accepted (an `INFO` carries the server's JSON).
pub(crate) const MAX_LINE: usize = 64 * 1024;

/// One operation from the server.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Op<'a> {
    /// `MSG <subject> <sid> [reply-to] <#bytes>` and its payload.
    Msg {
        sid: u64,
        payload: &'a [u8],
    },
    Ping,
    Pong,
    /// `-ERR '<text>'`.
    Err(&'a [u8]),
    /// `INFO {...}` and `+OK`: nothing to do.
    Other,
}

/// Cuts the first complete operation from `buf`: `Ok(Some((op, used)))`,
/// `Ok(None)` when more bytes are needed, `Err` for bytes that are not the
/// NATS protocol (the connection cannot be read any further).
pub(crate) fn next_op(buf: &[u8]) -> Result<Option<(Op<'_>, usize)>, String> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() > MAX_LINE {
            Err(format!("no line end in {} bytes", buf.len()))
        } else {
            Ok(None)
        };
    };
    let line = &buf[..eol];
    let after = eol + 2;
    let word_end = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let op = match line[..word_end].to_ascii_uppercase().as_slice() {
        b"MSG" => {
            let (sid, len) = msg_head(line)?;
            let end = after + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err("MSG payload not followed by CRLF".into());
            }
            return Ok(Some((
                Op::Msg {
                    sid,
                    payload: &buf[after..end],
                },
                end + 2,
            )));
        }
        b"PING" => Op::Ping,
        b"PONG" => Op::Pong,
        b"-ERR" => Op::Err(line[word_end..].trim_ascii()),
        b"INFO" | b"+OK" => Op::Other,
        _ => {
            let shown = String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned();
            return Err(format!("unknown operation {shown:?}"));
        }
    };
    Ok(Some((op, after)))
}

/// `(sid, payload length)` of a `MSG` line (reply-to subject optional).
pub(crate) fn msg_head(line: &[u8]) -> Result<(u64, usize), String> {
    let words: Vec<&[u8]> = line
        .split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty())
        .collect();
    if words.len() != 4 && words.len() != 5 {
        return Err(format!(
            "MSG line of {} fields: {:?}",
            words.len(),
            String::from_utf8_lossy(line)
        ));
    }
    let num = |w: &[u8]| -> Result<u64, String> {
        std::str::from_utf8(w)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("not a number in MSG line: {:?}", String::from_utf8_lossy(w)))
    };
    let sid = num(words[2])?;
    let len = num(words[words.len() - 1])? as usize;
    Ok((sid, len))
}

/// The publisher's per-subject count `"n":<digits>` in a payload: the
/// peers' event id (they have no stream sequence).
pub(crate) fn payload_n(payload: &[u8]) -> Option<u64> {
    let at = payload.windows(4).position(|w| w == b"\"n\":")? + 4;
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

/// Blocking handshake: INFO, then CONNECT and PING, until PONG. Returns the
/// socket (non-blocking from then on) and any bytes read past the PONG.
pub(crate) fn connect(url: &str, name: &str) -> Result<(TcpStream, Vec<u8>), String> {
    let addr: SocketAddr = url
        .trim_start_matches("nats://")
        .parse()
        .map_err(|e| format!("NATS address {url:?}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect to NATS: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|_| s.set_nodelay(true))
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    // INFO first (an `Other`), then our CONNECT and PING.
    wait_for(&mut s, &mut buf, |op| matches!(op, Op::Other))?;
    let connect = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":false,\
         \"protocol\":1,\"name\":\"{name}\"}}\r\nPING\r\n"
    );
    s.write_all(connect.as_bytes())
        .map_err(|e| format!("CONNECT: {e}"))?;
    wait_for(&mut s, &mut buf, |op| matches!(op, Op::Pong))?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok((s, buf))
}

/// Reads operations until one matches `want` (bounded by the read timeout
/// and a number of reads); leaves the bytes after it in `buf`.
fn wait_for(s: &mut TcpStream, buf: &mut Vec<u8>, want: fn(&Op<'_>) -> bool) -> Result<(), String> {
    let mut chunk = [0u8; 4096];
    for _ in 0..1000 {
        while let Some((op, n)) = next_op(buf)? {
            if let Op::Err(text) = op {
                return Err(format!("NATS -ERR {}", String::from_utf8_lossy(text)));
            }
            let found = want(&op);
            buf.drain(..n);
            if found {
                return Ok(());
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("NATS closed during the handshake".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("NATS handshake: {e}")),
        }
    }
    Err("NATS handshake: too many reads".into())
}
