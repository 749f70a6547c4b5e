//! Shared helpers for the integration tests: a real `nats-server` with
//! JetStream, the real `sse-relay` binary, a tiny raw-TCP HTTP/1.1 client,
//! an SSE parser that follows the WHATWG rules, and JWT minting.
//!
//! Every helper that waits is bounded: it polls a condition every
//! [`POLL`] up to a deadline and then panics with a message naming what it
//! waited for. Nothing here sleeps for synchronisation.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::io;
use std::net::TcpListener as StdTcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// HS256 secret every default relay is started with.
pub const SECRET: &str = "integration-test-secret-0123456789abcdef";
/// Interval of every bounded polling loop.
pub const POLL: Duration = Duration::from_millis(20);
/// Upper bound for one whole test.
pub const TEST_LIMIT: Duration = Duration::from_secs(30);
/// Default bound for one HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// generic bounded waiting
// ---------------------------------------------------------------------------

/// Runs `fut` with an upper bound; panics naming `what` when it is exceeded.
/// Resources owned by the future (servers, relays) are dropped, and so
/// killed, on timeout.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("test `{what}` did not finish within {limit:?}"),
    }
}

/// Polls `probe` every [`POLL`] until it yields `Some`, at most `limit`.
/// A probe that hangs is cut off by the same deadline.
pub async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, probe()).await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(_) => panic!("timed out after {limit:?} waiting for: {what}"),
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls the boolean condition `cond` every [`POLL`] until true, at most `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(limit, what, || {
        let f = cond();
        async move { if f.await { Some(()) } else { None } }
    })
    .await
}

// ---------------------------------------------------------------------------
// ports, time, encoding
// ---------------------------------------------------------------------------

/// A free TCP port on 127.0.0.1, never the same one twice in this process.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    for _ in 0..200 {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("could not find a fresh free port");
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs() as i64
}

pub fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs_f64()
}

/// Percent-encodes everything except RFC 3986 unreserved characters
/// (so `>` becomes `%3E` and `*` becomes `%2A`).
pub fn urlencode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `/events?subject=a&subject=b` with each subject percent-encoded.
pub fn events_path(subjects: &[&str]) -> String {
    let mut p = String::from("/events");
    for (i, s) in subjects.iter().enumerate() {
        p.push(if i == 0 { '?' } else { '&' });
        p.push_str("subject=");
        p.push_str(&urlencode(s));
    }
    p
}

/// Unpadded base64url, for hand-made (deliberately invalid) JWTs.
pub fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// JWT
// ---------------------------------------------------------------------------

/// Standard test claims: `{"exp": now+ttl, "sub": "test", "subjects": [...]}`.
pub fn claims(subjects: &[&str], ttl_secs: i64) -> Value {
    json!({ "exp": now_secs() + ttl_secs, "sub": "test", "subjects": subjects })
}

/// HS256 token signed with `secret`.
pub fn token(secret: &str, subjects: &[&str], ttl_secs: i64) -> String {
    sign(secret, Algorithm::HS256, &claims(subjects, ttl_secs))
}

/// HS256 token over arbitrary claims, signed with [`SECRET`].
pub fn token_with_claims(claims: Value) -> String {
    sign(SECRET, Algorithm::HS256, &claims)
}

/// Token over `claims` signed with an HMAC `alg` (HS256/384/512).
pub fn sign(secret: &str, alg: Algorithm, claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(alg),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// A token assembled by hand from a raw header JSON, claims and signature
/// bytes (e.g. `{"alg":"none"}` with an empty signature).
pub fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes()),
        b64url(signature)
    )
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client (raw TCP)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}); status {} body {:?}",
                self.status, self.body
            )
        })
    }
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

/// True if a comma-separated header value lists `token` (case-insensitive).
pub fn header_lists(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

fn build_request(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    for (k, v) in extra {
        if !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(k)) {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads until the end of the response head; returns (status, headers) and
/// leaves any body bytes already read in `raw`.
async fn read_head(
    stream: &mut TcpStream,
    raw: &mut Vec<u8>,
) -> io::Result<(u16, Vec<(String, String)>)> {
    let mut buf = [0u8; 8192];
    let end = loop {
        if let Some(i) = find(raw, b"\r\n\r\n") {
            break i;
        }
        if raw.len() > 64 * 1024 {
            return Err(io::Error::other("response head larger than 64 KiB"));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before the response head was complete (got {:?})",
                    String::from_utf8_lossy(raw)
                ),
            ));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    raw.drain(..end + 4);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::other(format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((status, headers))
}

#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked(ChunkState),
    Close,
}

#[derive(Debug)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// Incremental HTTP/1.1 body decoder (Content-Length, chunked, or
/// close-delimited). Synchronous, so the only await in a read loop is the
/// socket read itself, which keeps reads cancel-safe under timeouts.
#[derive(Debug)]
struct BodyDecoder {
    framing: Framing,
    /// Saw the end of the body (length reached, last chunk, or EOF for
    /// close-delimited).
    done: bool,
}

impl BodyDecoder {
    fn new(method: &str, status: u16, headers: &[(String, String)]) -> Self {
        let no_body = method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&status)
            || status == 204
            || status == 304;
        let te_chunked = header_of(headers, "transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
        let framing = if no_body {
            Framing::Length(0)
        } else if te_chunked {
            Framing::Chunked(ChunkState::Size)
        } else if let Some(len) = header_of(headers, "content-length") {
            Framing::Length(len.trim().parse().expect("numeric content-length"))
        } else {
            Framing::Close
        };
        let done = matches!(framing, Framing::Length(0));
        BodyDecoder { framing, done }
    }

    fn decode(&mut self, raw: &mut Vec<u8>, out: &mut Vec<u8>) -> Result<(), String> {
        loop {
            if self.done {
                return Ok(());
            }
            match &mut self.framing {
                Framing::Close => {
                    out.append(raw);
                    return Ok(());
                }
                Framing::Length(rem) => {
                    let n = (*rem).min(raw.len() as u64) as usize;
                    out.extend(raw.drain(..n));
                    *rem -= n as u64;
                    if *rem == 0 {
                        self.done = true;
                    }
                    return Ok(());
                }
                Framing::Chunked(state) => match state {
                    ChunkState::Size => {
                        let Some(i) = find(raw, b"\r\n") else {
                            return Ok(());
                        };
                        let line = String::from_utf8_lossy(&raw[..i]).into_owned();
                        raw.drain(..i + 2);
                        let hex = line.split(';').next().unwrap_or_default().trim();
                        let size = u64::from_str_radix(hex, 16)
                            .map_err(|e| format!("bad chunk size line {line:?}: {e}"))?;
                        *state = if size == 0 {
                            ChunkState::Trailers
                        } else {
                            ChunkState::Data(size)
                        };
                    }
                    ChunkState::Data(rem) => {
                        let n = (*rem).min(raw.len() as u64) as usize;
                        if n == 0 {
                            return Ok(());
                        }
                        out.extend(raw.drain(..n));
                        *rem -= n as u64;
                        if *rem == 0 {
                            *state = ChunkState::DataEnd;
                        }
                    }
                    ChunkState::DataEnd => {
                        if raw.len() < 2 {
                            return Ok(());
                        }
                        if &raw[..2] != b"\r\n" {
                            return Err(format!("missing CRLF after chunk data: {:?}", &raw[..2]));
                        }
                        raw.drain(..2);
                        *state = ChunkState::Size;
                    }
                    ChunkState::Trailers => {
                        let Some(i) = find(raw, b"\r\n") else {
                            return Ok(());
                        };
                        raw.drain(..i + 2);
                        if i == 0 {
                            self.done = true;
                        }
                    }
                },
            }
        }
    }

    fn on_eof(&mut self) {
        if matches!(self.framing, Framing::Close) {
            self.done = true;
        }
    }
}

/// Like [`request`] but returns connection errors instead of panicking
/// (for polling endpoints of a process that may not listen yet).
pub async fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    limit: Duration,
) -> io::Result<Response> {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await?;
        let req = build_request(
            method,
            addr,
            path,
            headers,
            body,
            &[("Connection", "close")],
        );
        stream.write_all(&req).await?;
        let mut raw = Vec::new();
        let (status, hdrs) = read_head(&mut stream, &mut raw).await?;
        let mut dec = BodyDecoder::new(method, status, &hdrs);
        let mut out = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            dec.decode(&mut raw, &mut out).map_err(io::Error::other)?;
            if dec.done {
                break;
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                dec.on_eof();
                if !dec.done {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed in the middle of the body",
                    ));
                }
                break;
            }
            raw.extend_from_slice(&buf[..n]);
        }
        Ok(Response {
            status,
            headers: hdrs,
            body: String::from_utf8_lossy(&out).into_owned(),
        })
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{method} {path} on {addr}: no complete response within {limit:?}"),
        )),
    }
}

/// One HTTP/1.1 request with `Connection: close`; panics on I/O errors or
/// when no complete response arrives within [`HTTP_TIMEOUT`].
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    try_request(addr, method, path, headers, body, HTTP_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path} failed: {e}"))
}

pub async fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", path, headers, None).await
}

/// Asserts an error response: exact status, `Content-Type: application/json`
/// and a JSON body with string fields `error` and `message`.
pub fn assert_json_error(resp: &Response, status: u16, what: &str) {
    assert_eq!(
        resp.status, status,
        "{what}: expected status {status}, got {} (headers {:?}, body {:?})",
        resp.status, resp.headers, resp.body
    );
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(
        ct.to_ascii_lowercase().starts_with("application/json"),
        "{what}: expected Content-Type application/json, got {ct:?}"
    );
    let v: Value = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {:?}", resp.body));
    assert!(
        v.get("error")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty()),
        "{what}: JSON body lacks a string `error`: {v}"
    );
    assert!(
        v.get("message")
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty()),
        "{what}: JSON body lacks a string `message`: {v}"
    );
}

/// Asserts a 401 with a JSON error body and a `WWW-Authenticate: Bearer ...`.
pub fn assert_401(resp: &Response, what: &str) {
    assert_json_error(resp, 401, what);
    let wa = resp.header("www-authenticate").unwrap_or_else(|| {
        panic!(
            "{what}: 401 without WWW-Authenticate (headers {:?})",
            resp.headers
        )
    });
    assert!(
        wa.starts_with("Bearer"),
        "{what}: WWW-Authenticate should start with `Bearer`, got {wa:?}"
    );
}

// ---------------------------------------------------------------------------
// SSE client
// ---------------------------------------------------------------------------

/// One dispatched SSE block.
///
/// Unlike a browser, blocks without any `data:` line are surfaced too (the
/// browser would not dispatch them): a block holding only `retry: 2000`
/// comes out as `SseEvent { retry: Some(2000), has_data: false, data: "", .. }`.
/// `id` is the `id:` field of this block only (not the inherited
/// last-event-id); `has_data` tells an empty `data:` line (`data == ""`,
/// `has_data == true`) from no data line at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    pub has_data: bool,
}

impl SseEvent {
    /// The `id:` as a number; panics if absent or not numeric.
    pub fn seq(&self) -> u64 {
        self.id
            .as_deref()
            .unwrap_or_else(|| panic!("event without id: {self:?}"))
            .parse()
            .unwrap_or_else(|e| panic!("non-numeric id ({e}): {self:?}"))
    }
}

/// WHATWG `text/event-stream` parser (lines end at CRLF, LF or CR).
#[derive(Debug, Default)]
struct SseParser {
    line: Vec<u8>,
    skip_lf: bool,
    cur: SseEvent,
    cur_any_field: bool,
    data_lines: Vec<String>,
    comments: Vec<String>,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<SseEvent>) {
        for &b in bytes {
            if self.skip_lf {
                self.skip_lf = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => {
                    self.skip_lf = true;
                    self.line_done(out);
                }
                b'\n' => self.line_done(out),
                _ => self.line.push(b),
            }
        }
    }

    fn line_done(&mut self, out: &mut VecDeque<SseEvent>) {
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.line)).into_owned();
        if line.is_empty() {
            if self.cur_any_field {
                let mut ev = std::mem::take(&mut self.cur);
                ev.has_data = !self.data_lines.is_empty();
                ev.data = std::mem::take(&mut self.data_lines).join("\n");
                out.push_back(ev);
            }
            self.cur = SseEvent::default();
            self.data_lines.clear();
            self.cur_any_field = false;
            return;
        }
        if let Some(comment) = line.strip_prefix(':') {
            self.comments.push(comment.to_string());
            return;
        }
        let (field, value) = match line.find(':') {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(' ').unwrap_or(v))
            }
            None => (line.as_str(), ""),
        };
        match field {
            "data" => self.data_lines.push(value.to_string()),
            "event" => self.cur.event = Some(value.to_string()),
            "id" => {
                if !value.contains('\0') {
                    self.cur.id = Some(value.to_string());
                }
            }
            "retry" => {
                if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
                    self.cur.retry = value.parse().ok();
                }
            }
            _ => return,
        }
        self.cur_any_field = true;
    }
}

/// A streaming `GET` whose body is parsed as SSE as it arrives.
pub struct SseClient {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    stream: TcpStream,
    raw: Vec<u8>,
    decoder: BodyDecoder,
    /// Every decoded body byte received so far.
    body: Vec<u8>,
    parser: SseParser,
    events: VecDeque<SseEvent>,
    eof: bool,
    error: Option<String>,
}

impl SseClient {
    /// Connects and sends `GET path` with `Accept: text/event-stream`
    /// (unless `headers` has an Accept), then reads the response head.
    pub async fn connect(addr: &str, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let stream = tokio::time::timeout(HTTP_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
            .unwrap_or_else(|e| panic!("connect to {addr} failed: {e}"));
        Self::on_stream(stream, addr, path, headers).await
    }

    /// Like [`SseClient::connect`] but the socket's receive buffer is set to
    /// `rcvbuf` bytes before connecting. Not calling any read method on the
    /// client leaves the data in the kernel: the client then reads nothing.
    pub async fn connect_with_rcvbuf(
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        rcvbuf: u32,
    ) -> SseClient {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let sockaddr = addr.parse().expect("socket address");
        let stream = tokio::time::timeout(HTTP_TIMEOUT, socket.connect(sockaddr))
            .await
            .unwrap_or_else(|_| panic!("connect to {addr} timed out"))
            .unwrap_or_else(|e| panic!("connect to {addr} failed: {e}"));
        Self::on_stream(stream, addr, path, headers).await
    }

    async fn on_stream(
        mut stream: TcpStream,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> SseClient {
        let req = build_request(
            "GET",
            addr,
            path,
            headers,
            None,
            &[
                ("Accept", "text/event-stream"),
                ("Cache-Control", "no-cache"),
            ],
        );
        let mut raw = Vec::new();
        let head = tokio::time::timeout(HTTP_TIMEOUT, async {
            stream.write_all(&req).await?;
            read_head(&mut stream, &mut raw).await
        })
        .await
        .unwrap_or_else(|_| panic!("GET {path}: no response head within {HTTP_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let (status, headers) = head;
        SseClient::from_head(stream, raw, status, headers)
    }

    /// A client whose response head (`status`, `headers`) has been read;
    /// `raw` holds whatever body bytes came with it.
    fn from_head(
        stream: TcpStream,
        raw: Vec<u8>,
        status: u16,
        headers: Vec<(String, String)>,
    ) -> SseClient {
        let decoder = BodyDecoder::new("GET", status, &headers);
        let mut c = SseClient {
            status,
            headers,
            stream,
            raw,
            decoder,
            body: Vec::new(),
            parser: SseParser::default(),
            events: VecDeque::new(),
            eof: false,
            error: None,
        };
        c.process();
        c
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    fn process(&mut self) {
        let start = self.body.len();
        if let Err(e) = self.decoder.decode(&mut self.raw, &mut self.body) {
            self.error = Some(e);
            self.eof = true;
        }
        let new = self.body[start..].to_vec();
        self.parser.feed(&new, &mut self.events);
    }

    /// One socket read (cancel-safe). Returns false if the stream is over.
    async fn read_more(&mut self) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut buf = [0u8; 16384];
        match self.stream.read(&mut buf).await {
            Ok(0) => {
                self.eof = true;
                self.decoder.on_eof();
                false
            }
            Ok(n) => {
                self.raw.extend_from_slice(&buf[..n]);
                self.process();
                true
            }
            Err(e) => {
                self.error = Some(e.to_string());
                self.eof = true;
                false
            }
        }
    }

    /// The server ended the stream: chunk terminator (or end of a
    /// length-delimited body), EOF, or a connection error.
    pub fn is_closed(&self) -> bool {
        self.decoder.done || self.eof
    }

    /// The body ended with its proper terminator (not by a reset/EOF in
    /// the middle of a chunked body).
    pub fn ended_cleanly(&self) -> bool {
        self.decoder.done
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Next parsed block (including retry-only blocks), or None on timeout
    /// or when the stream ended with no more blocks queued.
    pub async fn next_event(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            if self.is_closed() {
                return None;
            }
            if tokio::time::timeout_at(deadline, self.read_more())
                .await
                .is_err()
            {
                return None;
            }
        }
    }

    /// Next block that has at least one `data:` line (skips retry-only and
    /// other data-less blocks).
    pub async fn next_data_event(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_event(left).await?;
            if ev.has_data {
                return Some(ev);
            }
        }
    }

    /// Like [`SseClient::next_data_event`] but panics with `what` on
    /// timeout or end of stream.
    pub async fn expect_data_event(&mut self, limit: Duration, what: &str) -> SseEvent {
        match self.next_data_event(limit).await {
            Some(e) => e,
            None => panic!(
                "{what}: no data event within {limit:?} (closed: {}, error: {:?}, body so far: {:?})",
                self.is_closed(),
                self.error,
                tail(&String::from_utf8_lossy(&self.body), 2000)
            ),
        }
    }

    /// Collects `n` data events; panics if they do not all arrive in `limit`.
    pub async fn collect_data_events(
        &mut self,
        n: usize,
        limit: Duration,
        what: &str,
    ) -> Vec<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_data_event(left).await {
                Some(e) => got.push(e),
                None => panic!(
                    "{what}: got {} of {n} data events within {limit:?} (closed: {}, error: {:?}, last: {:?})",
                    got.len(),
                    self.is_closed(),
                    self.error,
                    got.last()
                ),
            }
        }
        got
    }

    /// Reads until the server ends the stream, at most `limit`. Events read
    /// meanwhile stay queued for [`SseClient::next_event`].
    pub async fn wait_closed(&mut self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_closed() {
            if tokio::time::timeout_at(deadline, self.read_more())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Reads until at least `n` comment lines arrived, at most `limit`.
    pub async fn wait_comments(&mut self, n: usize, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.parser.comments.len() < n {
            if self.is_closed() {
                return false;
            }
            if tokio::time::timeout_at(deadline, self.read_more())
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }

    /// Comment lines (text after the ':') received so far.
    pub fn comments(&self) -> &[String] {
        &self.parser.comments
    }

    pub fn comment_count(&self) -> usize {
        self.parser.comments.len()
    }

    /// Blocks parsed but not yet taken.
    pub fn queued(&self) -> usize {
        self.events.len()
    }

    /// All decoded body bytes so far, as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Reads the whole (non-SSE) body until its end, at most `limit`.
    pub async fn body_to_end(&mut self, limit: Duration) -> String {
        assert!(
            self.wait_closed(limit).await,
            "body did not end within {limit:?}: {:?}",
            self.body_text()
        );
        self.body_text()
    }
}

pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

// ---------------------------------------------------------------------------
// nats-server
// ---------------------------------------------------------------------------

/// `nats-server` binary: `$NATS_SERVER_BIN` or `nats-server` from PATH.
pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

/// A nats-server child with JetStream on, its own ports and store dir.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub monitor_port: u16,
    dir: TempDir,
}

impl NatsServer {
    /// Starts on fresh ports and waits (10 s) until it accepts TCP and
    /// `/healthz` answers 200. Retries on fresh ports if the child dies
    /// (e.g. a port race).
    pub async fn start() -> NatsServer {
        let mut last_err = String::new();
        for _ in 0..3 {
            let mut s = NatsServer {
                child: None,
                port: free_port(),
                monitor_port: free_port(),
                dir: tempfile::tempdir().expect("tempdir"),
            };
            match s.launch().await {
                Ok(()) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("nats-server did not start: {last_err}");
    }

    /// Starts on the given client port (e.g. one a relay already dials).
    pub async fn start_on(port: u16) -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port,
            monitor_port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        if let Err(e) = s.launch().await {
            panic!("nats-server did not start on port {port}: {e}");
        }
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn launch(&mut self) -> Result<(), String> {
        let store = self.dir.path().join("jetstream");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| e.to_string())?;
        let child = Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .arg("-sd")
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", nats_server_bin()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = format!("127.0.0.1:{}", self.port);
        let maddr = self.monitor_addr();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .map_err(|e| e.to_string())?
            {
                self.child = None;
                return Err(format!(
                    "nats-server exited with {status}; log:\n{}",
                    self.log()
                ));
            }
            let tcp_ok = TcpStream::connect(&addr).await.is_ok();
            if tcp_ok {
                if let Ok(r) =
                    try_request(&maddr, "GET", "/healthz", &[], None, Duration::from_secs(1)).await
                {
                    if r.status == 200 {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!("not healthy within 10 s; log:\n{}", self.log()));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn monitor_addr(&self) -> String {
        format!("127.0.0.1:{}", self.monitor_port)
    }

    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// Kills the server and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts it again on the same ports and store.
    pub async fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.launch().await {
            panic!("nats-server did not restart: {e}");
        }
    }

    /// A client connection (bounded 10 s).
    pub async fn client(&self) -> async_nats::Client {
        tokio::time::timeout(Duration::from_secs(10), async_nats::connect(self.url()))
            .await
            .expect("connect to nats timed out")
            .expect("connect to nats")
    }

    /// Subjects of every subscription of every connection, from
    /// `/connz?subs=1`.
    pub async fn connz_subs(&self) -> Vec<String> {
        let r = http_get(&self.monitor_addr(), "/connz?subs=1&limit=100000", &[]).await;
        assert_eq!(r.status, 200, "GET /connz?subs=1: {}", r.body);
        let v = r.json();
        let mut subs = Vec::new();
        for conn in v["connections"].as_array().cloned().unwrap_or_default() {
            for s in conn["subscriptions_list"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                if let Some(s) = s.as_str() {
                    subs.push(s.to_string());
                } else if let Some(s) = s["subject"].as_str() {
                    subs.push(s.to_string());
                }
            }
        }
        subs
    }

    /// Alias of [`NatsServer::connz_subs`].
    pub async fn subsz(&self) -> Vec<String> {
        self.connz_subs().await
    }

    /// Number of subscriptions on exactly `subject`.
    pub async fn sub_count(&self, subject: &str) -> usize {
        self.connz_subs()
            .await
            .iter()
            .filter(|s| *s == subject)
            .count()
    }

    /// Waits (bounded) until, for each stream pattern P, a subscription on
    /// `relay.P` (the republish destination) exists on the server.
    pub async fn wait_relay_subs(&self, patterns: &[&str], limit: Duration) {
        let wanted: Vec<String> = patterns.iter().map(|p| format!("relay.{p}")).collect();
        let mut last: Vec<String>;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let subs = self.connz_subs().await;
            if wanted.iter().all(|w| subs.contains(w)) {
                return;
            }
            last = subs;
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "the relay never subscribed to {wanted:?} on NATS within {limit:?}; subscriptions seen: {last:?}"
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// the relay
// ---------------------------------------------------------------------------

pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sse-relay")
}

/// Environment variables the relay reads; removed from every child so the
/// developer's shell cannot leak config into a test.
const RELAY_ENV: &[&str] = &[
    "NATS_URL",
    "RELAY_LISTEN",
    "RELAY_STREAM",
    "RELAY_CREATE_STREAM",
    "RELAY_JWT_SECRET",
    "RELAY_JWT_PUBLIC_KEY",
    "RELAY_JWT_AUDIENCE",
    "RELAY_JWT_ISSUER",
    "RELAY_JWT_LEEWAY",
    "RELAY_HEARTBEAT",
    "RELAY_RETRY_MS",
    "RELAY_CLIENT_QUEUE",
    "RELAY_CORS_ORIGINS",
    "RELAY_REPLAY_CACHE_BYTES",
    "RELAY_REPLAY_LIMIT",
    "RELAY_DRAIN_TIMEOUT",
    "RELAY_REUSE_PORT",
    "RELAY_WORKERS",
    "NATS_CREDS",
];

fn relay_command(args: &[String], envs: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(relay_bin());
    cmd.args(args);
    for k in RELAY_ENV {
        cmd.env_remove(k);
    }
    cmd.env("RUST_LOG", "info").env("RUST_BACKTRACE", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the relay binary to completion (e.g. `token`, or a `serve` that
/// must fail), killing it if it runs longer than `limit`.
pub async fn run_relay(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut cmd = tokio::process::Command::from(relay_command(&args, envs));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(limit, cmd.output()).await {
        Ok(out) => out.expect("run sse-relay"),
        Err(_) => panic!(
            "`sse-relay {}` did not exit within {limit:?}",
            args.join(" ")
        ),
    }
}

/// An `sse-relay serve` child process on a fresh port.
pub struct Relay {
    child: Option<Child>,
    pub port: u16,
    addr: String,
    dir: TempDir,
    exit: Option<ExitStatus>,
}

impl Relay {
    /// Default flags: `--nats-url URL --jwt-secret SECRET --create-stream`.
    /// One shard unless a test asks for more: most tests hold per-node
    /// behaviour (one subscription per pattern, one window).
    pub fn default_args(nats_url: &str) -> Vec<String> {
        [
            "--nats-url",
            nats_url,
            "--jwt-secret",
            SECRET,
            "--create-stream",
            "--workers",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Spawns `serve --listen 127.0.0.1:PORT` + default flags + `extra`,
    /// without waiting for readiness.
    pub fn spawn(nats_url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Relay {
        let mut args = Self::default_args(nats_url);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn_serve(args, envs)
    }

    /// Spawns `serve --listen 127.0.0.1:PORT <args>` (no other flags).
    pub fn spawn_serve(args: Vec<String>, envs: &[(&str, &str)]) -> Relay {
        let port = free_port();
        let mut full = vec![
            "serve".to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        full.extend(args);
        Self::spawn_exact(&full, envs, port)
    }

    /// Spawns the binary with exactly `args`; `port` is where it is
    /// expected to listen (e.g. set via RELAY_LISTEN in `envs`).
    pub fn spawn_exact(args: &[String], envs: &[(&str, &str)], port: u16) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("relay.log")).expect("log file");
        let out = std::fs::File::create(dir.path().join("relay.stdout")).expect("stdout file");
        let child = relay_command(args, envs)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log)
            .spawn()
            .expect("spawn sse-relay");
        Relay {
            child: Some(child),
            port,
            addr: format!("127.0.0.1:{port}"),
            dir,
            exit: None,
        }
    }

    /// Spawns with the default flags + `extra` and waits (15 s) until
    /// `GET /readyz` is 200.
    pub async fn start(nats_url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Relay {
        for attempt in 0..3 {
            let mut r = Self::spawn(nats_url, extra, envs);
            match r.try_wait_ready(Duration::from_secs(15)).await {
                Ok(()) => return r,
                Err(e) => {
                    let log = r.log();
                    if attempt < 2 && log.to_ascii_lowercase().contains("in use") {
                        continue; // port race: try a fresh port
                    }
                    panic!(
                        "relay not ready: {e}\n--- relay stderr ---\n{}",
                        tail(&log, 8000)
                    );
                }
            }
        }
        unreachable!()
    }

    /// Waits (bounded) until `GET /readyz` answers 200; Err if the process
    /// exits or the deadline passes.
    pub async fn try_wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let mut last: String;
        loop {
            if let Some(st) = self.try_exit() {
                return Err(format!("sse-relay exited with {st} before /readyz was 200"));
            }
            match try_request(
                &self.addr,
                "GET",
                "/readyz",
                &[],
                None,
                Duration::from_secs(2),
            )
            .await
            {
                Ok(r) if r.status == 200 => return Ok(()),
                Ok(r) => last = format!("status {} body {:?}", r.status, r.body),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                return Err(format!("/readyz not 200 within {limit:?} (last: {last})"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn wait_ready(&mut self, limit: Duration) {
        if let Err(e) = self.try_wait_ready(limit).await {
            panic!("{e}\n--- relay stderr ---\n{}", tail(&self.log(), 8000));
        }
    }

    /// Waits (bounded) until the relay accepts HTTP (any answer to /healthz).
    pub async fn wait_listening(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_exit() {
                panic!(
                    "sse-relay exited with {st}; stderr:\n{}",
                    tail(&self.log(), 8000)
                );
            }
            if try_request(
                &self.addr,
                "GET",
                "/healthz",
                &[],
                None,
                Duration::from_secs(2),
            )
            .await
            .is_ok()
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "relay did not accept HTTP within {limit:?}; stderr:\n{}",
                    tail(&self.log(), 8000)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("relay already reaped")
    }

    /// The relay's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }

    /// The relay's stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.stdout")).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let pid = self.pid().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM {pid} failed");
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                self.exit = Some(st);
            }
        }
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if let Some(st) = self.exit {
            return Some(st);
        }
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.exit = Some(st);
                self.child = None;
                Some(st)
            }
            _ => None,
        }
    }

    /// Polls for the process' exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http_get(&self.addr, path, headers).await
    }

    /// Opens `/events` for `subjects` with a Bearer token, asserts 200 and
    /// waits until the relay's NATS subscriptions for those subjects exist
    /// (so that a message published afterwards must reach the client).
    pub async fn open_stream(
        &self,
        nats: &NatsServer,
        token: &str,
        subjects: &[&str],
    ) -> SseClient {
        let auth = bearer(token);
        let c = SseClient::connect(
            &self.addr,
            &events_path(subjects),
            &[("Authorization", &auth)],
        )
        .await;
        assert_eq!(
            c.status,
            200,
            "GET {} expected 200, got {} {:?}",
            events_path(subjects),
            c.status,
            c.headers
        );
        nats.wait_relay_subs(subjects, Duration::from_secs(10))
            .await;
        c
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- sse-relay on {} stderr (tail) ---\n{}\n--- end ---",
                self.addr,
                tail(&self.log(), 6000)
            );
        }
    }
}

/// NATS headers with `Sse-Event: name`.
pub fn sse_event_headers(name: &str) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Sse-Event", name);
    h
}

/// What a payload looks like after an SSE round trip: CRLF and lone CR
/// become LF (the format cannot carry them; everything else is exact).
pub fn sse_normalized(payload: &str) -> String {
    payload.replace("\r\n", "\n").replace('\r', "\n")
}

// ---------------------------------------------------------------------------
// hooks for the harness self-tests (tests/harness.rs)
// ---------------------------------------------------------------------------

/// Feeds raw chunked-transfer bytes, split into `pieces` as they might
/// arrive from the socket, through the body decoder and the SSE parser.
/// Returns the blocks, the comments, and whether the chunked terminator
/// was seen.
pub fn parse_chunked_sse(pieces: &[Vec<u8>]) -> Result<(Vec<SseEvent>, Vec<String>, bool), String> {
    let headers = vec![("transfer-encoding".to_string(), "chunked".to_string())];
    let mut dec = BodyDecoder::new("GET", 200, &headers);
    let mut parser = SseParser::default();
    let mut raw = Vec::new();
    let mut events = VecDeque::new();
    for p in pieces {
        raw.extend_from_slice(p);
        let mut out = Vec::new();
        dec.decode(&mut raw, &mut out)?;
        parser.feed(&out, &mut events);
    }
    Ok((events.into_iter().collect(), parser.comments, dec.done))
}

/// Encodes `body` as chunked transfer coding with chunks of `sizes`
/// (cycled), plus the terminator.
pub fn chunked_encode(body: &[u8], sizes: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].max(1).min(rest.len());
        out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
        i += 1;
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

// ---------------------------------------------------------------------------
// resume / failover helpers (tests/resume.rs, tests/failover.rs)
// ---------------------------------------------------------------------------

impl SseClient {
    /// Like [`SseClient::connect`], but connection and protocol errors (a
    /// relay that is down or restarting) come back as `Err` instead of
    /// panicking. Bounded by `limit` overall.
    pub async fn try_connect(
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        limit: Duration,
    ) -> io::Result<SseClient> {
        let fut = async {
            let mut stream = TcpStream::connect(addr).await?;
            let req = build_request(
                "GET",
                addr,
                path,
                headers,
                None,
                &[
                    ("Accept", "text/event-stream"),
                    ("Cache-Control", "no-cache"),
                ],
            );
            stream.write_all(&req).await?;
            let mut raw = Vec::new();
            let (status, headers) = read_head(&mut stream, &mut raw).await?;
            Ok(SseClient::from_head(stream, raw, status, headers))
        };
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("GET {path} on {addr}: no response head within {limit:?}"),
            )),
        }
    }
}

impl Relay {
    /// Spawns `serve` with `--nats-url URL --jwt-secret SECRET` + `extra`
    /// (no `--create-stream`: the stream must already exist) and waits
    /// (15 s) until `/readyz` is 200.
    pub async fn start_existing_stream(nats_url: &str, extra: &[&str]) -> Relay {
        let mut args: Vec<String> = ["--nats-url", nats_url, "--jwt-secret", SECRET]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = Self::spawn_serve(args, &[]);
        r.wait_ready(Duration::from_secs(15)).await;
        r
    }

    /// The `GET /metrics` text exposition.
    pub async fn metrics_text(&self) -> String {
        let r = self.get("/metrics", &[]).await;
        assert_eq!(r.status, 200, "GET /metrics: {} {:?}", r.status, r.body);
        r.body
    }

    /// One sample of `/metrics`, e.g. `relay_resumes_total{source="memory"}`
    /// (label order does not matter). A sample that is not there reads as 0:
    /// a labelled counter appears only once incremented, and its whole
    /// family is omitted until then. Tests that rely on a 0 should also see
    /// the same family move elsewhere, so a misspelt name cannot pass.
    pub async fn metric(&self, name_with_labels: &str) -> f64 {
        let text = self.metrics_text().await;
        metric_value(&text, name_with_labels)
            .unwrap_or_else(|e| panic!("{e}\n--- /metrics ---\n{}", tail(&text, 6000)))
    }
}

/// Splits `name{a="x",b="y"}` into the name and its sorted labels.
fn parse_metric_key(s: &str) -> Result<(String, Vec<(String, String)>), String> {
    let s = s.trim();
    let Some(open) = s.find('{') else {
        return Ok((s.to_string(), Vec::new()));
    };
    let name = s[..open].to_string();
    let body = s[open + 1..]
        .strip_suffix('}')
        .ok_or_else(|| format!("unterminated labels in {s:?}"))?;
    let mut labels = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        for c in chars.by_ref() {
            if c == '=' {
                break;
            }
            key.push(c);
        }
        if chars.next() != Some('"') {
            return Err(format!("label {key:?} without a quoted value in {s:?}"));
        }
        let mut value = String::new();
        let mut closed = false;
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(o) => value.push(o),
                    None => break,
                },
                '"' => {
                    closed = true;
                    break;
                }
                o => value.push(o),
            }
        }
        if !closed {
            return Err(format!("unterminated label value in {s:?}"));
        }
        labels.push((key.trim().to_string(), value));
    }
    labels.sort();
    Ok((name, labels))
}

/// Reads one sample out of a Prometheus/OpenMetrics text exposition; see
/// [`Relay::metric`] (absent samples are 0). Err only on malformed text.
pub fn metric_value(text: &str, name_with_labels: &str) -> Result<f64, String> {
    let (want_name, want_labels) = parse_metric_key(name_with_labels)?;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key_end = match line.find('{') {
            Some(i) if line[..i].find(char::is_whitespace).is_none() => line[i..]
                .find('}')
                .map(|j| i + j + 1)
                .ok_or_else(|| format!("bad sample line {line:?}"))?,
            _ => line
                .find(char::is_whitespace)
                .ok_or_else(|| format!("bad sample line {line:?}"))?,
        };
        let (name, labels) = parse_metric_key(&line[..key_end])?;
        if name != want_name || labels != want_labels {
            continue;
        }
        let value = line[key_end..]
            .split_whitespace()
            .next()
            .ok_or_else(|| format!("sample without value: {line:?}"))?;
        return match value {
            "+Inf" => Ok(f64::INFINITY),
            "-Inf" => Ok(f64::NEG_INFINITY),
            v => v
                .parse::<f64>()
                .map_err(|e| format!("sample {line:?}: bad value ({e})")),
        };
    }
    Ok(0.0)
}

/// The soft limit on open files of this process (`ulimit -n`, which child
/// processes such as the relay inherit). `u64::MAX` for `unlimited`.
pub fn open_file_limit() -> u64 {
    let out = Command::new("sh")
        .args(["-c", "ulimit -n"])
        .output()
        .expect("run `sh -c 'ulimit -n'`");
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if s == "unlimited" {
        return u64::MAX;
    }
    s.parse()
        .unwrap_or_else(|e| panic!("`ulimit -n` printed {s:?}: {e}"))
}

/// NATS subject matching: `*` matches one token, `>` one or more trailing
/// tokens.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// True if `subject` matches any of `patterns`.
pub fn matches_any(patterns: &[&str], subject: &str) -> bool {
    patterns.iter().any(|p| subject_matches(p, subject))
}

/// The stream config `--create-stream` makes (`events.>` republished to
/// `relay.events.>`), for tests that create the stream themselves and
/// change a field or two.
pub fn events_stream_config() -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: "EVENTS".to_string(),
        subjects: vec!["events.>".to_string()],
        allow_direct: true,
        republish: Some(async_nats::jetstream::stream::Republish {
            source: "events.>".to_string(),
            destination: "relay.events.>".to_string(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// One JetStream publish, awaited until acknowledged (bounded 10 s);
/// returns the stream sequence.
pub async fn js_publish(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payload: impl Into<bytes::Bytes>,
) -> u64 {
    let payload = payload.into();
    let fut = async {
        js.publish(subject.to_string(), payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok(ack)) => ack.sequence,
        Ok(Err(e)) => panic!("JetStream publish on {subject} failed: {e}"),
        Err(_) => panic!("JetStream publish on {subject}: no ack within 10 s"),
    }
}

/// One JetStream publish attempt with a `Nats-Msg-Id` (so a retry cannot
/// store the event twice), bounded by `limit`.
pub async fn js_publish_once_with_id(
    js: &async_nats::jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: bytes::Bytes,
    limit: Duration,
) -> Result<async_nats::jetstream::publish::PublishAck, String> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    let fut = async {
        js.publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no ack within {limit:?}")),
    }
}

/// A message read back from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub subject: String,
    pub payload: String,
}

/// Every message of `stream` from sequence 1 up to its last sequence (at
/// the time of the call), read back with an ordered consumer that is
/// recreated from the next sequence whenever it fails (clusters in an
/// election). Bounded by `limit`.
pub async fn stream_contents(
    js: &async_nats::jetstream::Context,
    stream: &str,
    limit: Duration,
) -> Vec<StoredEvent> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_err = String::new();
    let last_seq = loop {
        if tokio::time::Instant::now() >= deadline {
            panic!("stream {stream}: no info within {limit:?} (last error: {last_err})");
        }
        let res = tokio::time::timeout(Duration::from_secs(3), async {
            let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            let last = s
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            Ok::<_, String>(last)
        })
        .await;
        match res {
            Ok(Ok(v)) => break v,
            Ok(Err(e)) => last_err = e,
            Err(_) => last_err = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut out = Vec::new();
    let mut next = 1u64;
    // Each round either makes progress or waits 100 ms; bounded by `limit`.
    while next <= last_seq {
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "stream {stream}: read back only up to seq {next} of {last_seq} within {limit:?} (last error: {last_err})"
            );
        }
        let round = tokio::time::timeout_at(deadline, async {
            let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            let consumer = s
                .create_consumer(OrderedConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let mut msgs = consumer.messages().await.map_err(|e| e.to_string())?;
            while next <= last_seq {
                match tokio::time::timeout(Duration::from_secs(3), msgs.next()).await {
                    Ok(Some(Ok(m))) => {
                        let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
                        if seq >= next {
                            out.push(StoredEvent {
                                seq,
                                subject: m.subject.to_string(),
                                payload: String::from_utf8_lossy(&m.payload).into_owned(),
                            });
                            next = seq + 1;
                        }
                    }
                    Ok(Some(Err(e))) => return Err(e.to_string()),
                    Ok(None) => return Err("consumer ended".to_string()),
                    Err(_) => return Err("no message within 3 s".to_string()),
                }
            }
            Ok(())
        })
        .await;
        match round {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                last_err = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => last_err = "deadline".into(),
        }
    }
    out.retain(|e| e.seq <= last_seq);
    out
}

/// Asserts that `got` equals `want` (both `(id, data)` in delivery order),
/// and on failure says what went wrong: duplicates, order, missing ids.
pub fn assert_same_events(who: &str, got: &[(u64, String)], want: &[(u64, String)]) {
    if got == want {
        return;
    }
    let mut seen = HashSet::new();
    let dups: Vec<u64> = got
        .iter()
        .filter(|(s, _)| !seen.insert(*s))
        .map(|(s, _)| *s)
        .take(20)
        .collect();
    let disorder: Vec<(u64, u64)> = got
        .windows(2)
        .filter(|w| w[1].0 <= w[0].0)
        .map(|w| (w[0].0, w[1].0))
        .take(10)
        .collect();
    let got_ids: HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
    let want_ids: HashSet<u64> = want.iter().map(|(s, _)| *s).collect();
    let mut missing: Vec<u64> = want_ids.difference(&got_ids).copied().collect();
    missing.sort_unstable();
    let mut extra: Vec<u64> = got_ids.difference(&want_ids).copied().collect();
    extra.sort_unstable();
    let first_diff = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{who}: received {} events, expected {}.\n  duplicates (first 20): {dups:?}\n  out of order (prev, next; first 10): {disorder:?}\n  missing ({}; first 30): {:?}\n  unexpected ({}; first 30): {:?}\n  first difference at #{first_diff}: got {:?}, want {:?}",
        got.len(),
        want.len(),
        missing.len(),
        &missing[..missing.len().min(30)],
        extra.len(),
        &extra[..extra.len().min(30)],
        got.get(first_diff),
        want.get(first_diff),
    );
}

/// Awaits a spawned task; a panic inside it is re-raised with its own
/// message.
pub async fn join_task<T>(what: &str, h: tokio::task::JoinHandle<T>) -> T {
    match h.await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("{what}: task failed: {e}"),
    }
}

// ---------------------------------------------------------------------------
// a 3-node (or n-node) JetStream cluster on loopback
// ---------------------------------------------------------------------------

/// One node of a [`NatsCluster`].
pub struct ClusterNode {
    /// `server_name` (`n1`, `n2`, ...).
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    pub monitor_port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn monitor_addr(&self) -> String {
        format!("127.0.0.1:{}", self.monitor_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", nats_server_bin()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the client port accepts and the monitor answers
    /// `/healthz?js-enabled-only=true` with 200.
    async fn wait_healthy(&mut self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let addr = format!("127.0.0.1:{}", self.port);
        let maddr = self.monitor_addr();
        let mut last = String::from("nothing yet");
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "{} exited with {st}; log:\n{}",
                        self.name,
                        tail(&self.log(), 4000)
                    ));
                }
            }
            if TcpStream::connect(&addr).await.is_ok() {
                match try_request(
                    &maddr,
                    "GET",
                    "/healthz?js-enabled-only=true",
                    &[],
                    None,
                    Duration::from_secs(1),
                )
                .await
                {
                    Ok(r) if r.status == 200 => return Ok(()),
                    Ok(r) => last = format!("status {} {:?}", r.status, r.body),
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} not healthy within {limit:?} (last: {last}); log:\n{}",
                    self.name,
                    tail(&self.log(), 4000)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A JetStream cluster of nats-server processes on loopback, configured
/// from `nats/cluster/n1.conf` with free ports and temporary store dirs.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
    dir: TempDir,
}

impl NatsCluster {
    /// Writes `n` configs, starts every node, and waits (bounded) until
    /// each reports `/healthz?js-enabled-only=true` 200 and a JetStream
    /// meta leader is elected.
    pub async fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster needs at least one node");
        let template_path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/cluster/n1.conf");
        let template = std::fs::read_to_string(&template_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", template_path.display()));
        let dir = tempfile::tempdir().expect("tempdir");
        let mut nodes: Vec<ClusterNode> = (1..=n)
            .map(|i| ClusterNode {
                name: format!("n{i}"),
                port: free_port(),
                cluster_port: free_port(),
                monitor_port: free_port(),
                conf: dir.path().join(format!("n{i}.conf")),
                log: dir.path().join(format!("n{i}.log")),
                child: None,
            })
            .collect();
        let routes: Vec<String> = nodes
            .iter()
            .map(|nd| format!("    nats://127.0.0.1:{}", nd.cluster_port))
            .collect();
        for nd in &nodes {
            let store = dir.path().join(&nd.name);
            let conf = cluster_conf_from_template(
                &template,
                &nd.name,
                nd.port,
                nd.monitor_port,
                nd.cluster_port,
                &store.to_string_lossy(),
                &routes.join("\n"),
            );
            std::fs::write(&nd.conf, conf).expect("write node config");
        }
        for nd in nodes.iter_mut() {
            nd.spawn().unwrap_or_else(|e| panic!("{e}"));
        }
        let mut c = NatsCluster { nodes, dir };
        for i in 0..n {
            if let Err(e) = c.nodes[i].wait_healthy(Duration::from_secs(15)).await {
                panic!("cluster node did not start: {e}");
            }
        }
        c.wait_meta_leader(Duration::from_secs(20)).await;
        c
    }

    /// The node URLs, comma-separated (the relay's `--nats-url`).
    pub fn url_list(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the node called `name` (`n1` -> 0).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// A client that knows every node (reconnects to a live one).
    pub async fn client(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url().parse().expect("server addr"))
            .collect();
        tokio::time::timeout(
            Duration::from_secs(10),
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(addrs),
        )
        .await
        .expect("connect to the cluster timed out")
        .expect("connect to the cluster")
    }

    /// Waits until a live node reports a JetStream meta leader in `/jsz`.
    pub async fn wait_meta_leader(&self, limit: Duration) -> String {
        poll_until(limit, "a JetStream meta leader in the cluster", || async {
            for n in self.nodes.iter().filter(|n| n.is_running()) {
                if let Ok(r) = try_request(
                    &n.monitor_addr(),
                    "GET",
                    "/jsz",
                    &[],
                    None,
                    Duration::from_secs(1),
                )
                .await
                {
                    if r.status != 200 {
                        continue;
                    }
                    let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
                    if let Some(l) = v["meta_cluster"]["leader"].as_str() {
                        if !l.is_empty() {
                            return Some(l.to_string());
                        }
                    }
                }
            }
            None
        })
        .await
    }

    /// Creates (or updates to) `config`, retrying until the cluster accepts
    /// it (meta elections make the first attempts fail), at most `limit`.
    pub async fn create_stream(
        &self,
        js: &async_nats::jetstream::Context,
        config: async_nats::jetstream::stream::Config,
        limit: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let last = match tokio::time::timeout(
                Duration::from_secs(5),
                js.get_or_create_stream(config.clone()),
            )
            .await
            {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "stream {} not created within {limit:?}: {last}",
                    config.name
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Wait until the stream's own group has a leader.
        self.stream_leader(js, &config.name, limit).await;
    }

    /// Index of the node leading `stream` (from the stream info's
    /// `cluster.leader`), polled until one is elected, at most `limit`.
    pub async fn stream_leader(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
        limit: Duration,
    ) -> usize {
        poll_until(limit, &format!("a leader for stream {stream}"), || async {
            let info = tokio::time::timeout(Duration::from_secs(2), async {
                let mut s = js.get_stream(stream).await.ok()?;
                let i = s.info().await.ok()?;
                i.cluster.as_ref()?.leader.clone()
            })
            .await
            .ok()??;
            let idx = self.index_of(&info)?;
            self.nodes[idx].is_running().then_some(idx)
        })
        .await
    }

    /// Asks the stream's leader to step down (a new one is elected among
    /// the other replicas); `preferred` names the node that should lead
    /// (servers that do not support it elect any other peer).
    pub async fn step_down_stream_leader(
        &self,
        client: &async_nats::Client,
        stream: &str,
        preferred: Option<usize>,
    ) -> Result<(), String> {
        let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
        let body = match preferred {
            Some(i) => json!({ "placement": { "preferred": self.nodes[i].name } }).to_string(),
            None => String::new(),
        };
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(subject, bytes::Bytes::from(body)),
        )
        .await
        .map_err(|_| "stepdown request timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&resp.payload).map_err(|e| e.to_string())?;
        if v["success"].as_bool() == Some(true) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    }

    /// Moves the leadership of `stream` until `want(leader index)` holds,
    /// with bounded step-downs; returns the leader.
    pub async fn move_stream_leader(
        &self,
        js: &async_nats::jetstream::Context,
        client: &async_nats::Client,
        stream: &str,
        preferred: Option<usize>,
        want: impl Fn(usize) -> bool,
        limit: Duration,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        let mut history = Vec::new();
        for _ in 0..12 {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let leader = self.stream_leader(js, stream, left).await;
            history.push(self.nodes[leader].name.clone());
            if want(leader) {
                if history.len() > 1 {
                    eprintln!("stream {stream}: leader moved: {}", history.join(" -> "));
                }
                return leader;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            if let Err(e) = self
                .step_down_stream_leader(client, stream, preferred)
                .await
            {
                // An unsupported `preferred` is refused: step down without it.
                history.push(format!("stepdown refused: {e}"));
                let _ = self.step_down_stream_leader(client, stream, None).await;
            }
            // Until the old leader is gone from the stream info.
            let old = leader;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            poll_until(left, "a new stream leader after a step-down", || async {
                let l = tokio::time::timeout(Duration::from_secs(2), async {
                    let mut s = js.get_stream(stream).await.ok()?;
                    let i = s.info().await.ok()?;
                    i.cluster.as_ref()?.leader.clone()
                })
                .await
                .ok()??;
                let idx = self.index_of(&l)?;
                (idx != old).then_some(())
            })
            .await;
        }
        panic!(
            "stream {stream}: could not move its leader where wanted; leaders seen: {history:?}"
        );
    }

    /// Index of the running node holding a client connection named `name`
    /// (from each node's `/connz`).
    pub async fn node_with_connection(&self, name: &str) -> Option<usize> {
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.is_running() {
                continue;
            }
            let Ok(r) = try_request(
                &n.monitor_addr(),
                "GET",
                "/connz?limit=100000",
                &[],
                None,
                Duration::from_secs(2),
            )
            .await
            else {
                continue;
            };
            let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
            let found = v["connections"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["name"].as_str() == Some(name)));
            if found {
                return Some(i);
            }
        }
        None
    }

    /// Waits until a node holds a connection named `name`.
    pub async fn wait_connection(&self, name: &str, limit: Duration) -> usize {
        poll_until(
            limit,
            &format!("a connection named {name:?} on some node"),
            || self.node_with_connection(name),
        )
        .await
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Starts node `i` again with the same config and store; waits until
    /// it is healthy.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].kill();
        self.nodes[i].spawn().unwrap_or_else(|e| panic!("{e}"));
        if let Err(e) = self.nodes[i].wait_healthy(Duration::from_secs(15)).await {
            panic!("cluster node did not restart: {e}");
        }
    }

    /// Every node's log tail, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, tail(&n.log(), 3000)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for n in self.nodes.iter_mut() {
            n.kill();
        }
        if std::thread::panicking() {
            eprintln!("--- nats cluster logs (tail) ---\n{}", self.logs());
        }
    }
}

/// Turns the `nats/cluster/n1.conf` template into node `name`'s config:
/// comments dropped, ports, store dir and routes replaced. Panics if the
/// template no longer has the lines it is based on.
fn cluster_conf_from_template(
    template: &str,
    name: &str,
    port: u16,
    monitor_port: u16,
    cluster_port: u16,
    store: &str,
    routes: &str,
) -> String {
    let mut conf: String = template
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let replace = |conf: &mut String, from: &str, to: &str| {
        assert!(
            conf.contains(from),
            "nats/cluster/n1.conf no longer contains {from:?}; update cluster_conf_from_template"
        );
        *conf = conf.replacen(from, to, 1);
    };
    replace(
        &mut conf,
        "server_name: n1",
        &format!("server_name: {name}"),
    );
    replace(
        &mut conf,
        "listen: 127.0.0.1:4222",
        &format!("listen: 127.0.0.1:{port}"),
    );
    replace(
        &mut conf,
        "http: 127.0.0.1:8222",
        &format!("http: 127.0.0.1:{monitor_port}"),
    );
    replace(
        &mut conf,
        "listen: 127.0.0.1:6222",
        &format!("listen: 127.0.0.1:{cluster_port}"),
    );
    replace(
        &mut conf,
        "\"/tmp/nats-cluster/n1\"",
        &format!("{:?}", store),
    );
    let start = conf
        .find("routes: [")
        .expect("nats/cluster/n1.conf has no `routes: [`");
    let end = start
        + conf[start..]
            .find(']')
            .expect("nats/cluster/n1.conf: unterminated routes list");
    conf.replace_range(start..=end, &format!("routes: [\n{routes}\n  ]"));
    // A template port left over is `:PORT` not followed by another digit
    // (the fresh ports may well contain those digits).
    for stale in [":4222", ":8222", ":6222", ":6223", ":6224"] {
        let left = conf.match_indices(stale).any(|(i, _)| {
            !conf[i + stale.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        });
        assert!(
            !left,
            "generated cluster config still mentions {stale:?}:\n{conf}"
        );
    }
    assert!(
        !conf.contains("/tmp/nats-cluster"),
        "generated cluster config still uses the template store dir:\n{conf}"
    );
    conf
}
