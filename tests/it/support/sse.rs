//! `text/event-stream` on the client side: a parser that follows the
//! WHATWG rules, and [`SseClient`], a streaming `GET` whose body is parsed
//! as it arrives.
//!
//! The client runs hyper's HTTP/1 connection over a socket it opens itself,
//! so a test can shrink the receive buffer (a client that reads nothing)
//! and so that dropping the client closes the socket at once, as a browser
//! closing a tab does.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::AbortHandle;

use super::{HTTP_TIMEOUT, header_of, header_pairs, tail};

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

/// What a payload looks like after an SSE round trip: CRLF and lone CR
/// become LF (the format cannot carry them; everything else is exact).
pub fn sse_normalized(payload: &str) -> String {
    payload.replace("\r\n", "\n").replace('\r', "\n")
}

/// WHATWG `text/event-stream` parser (lines end at CRLF, LF or CR), fed
/// with body bytes split anywhere.
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    skip_lf: bool,
    cur: SseEvent,
    cur_any_field: bool,
    data_lines: Vec<String>,
    /// Comment lines (text after the ':') seen so far.
    pub comments: Vec<String>,
}

impl SseParser {
    /// Parses `bytes`, appending every block they complete to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut VecDeque<SseEvent>) {
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

/// Aborts the connection task, and so closes the socket, when dropped.
struct ConnectionGuard(AbortHandle);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A streaming `GET` whose body is parsed as SSE as it arrives.
pub struct SseClient {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    body_stream: Incoming,
    _connection: ConnectionGuard,
    /// Every body byte received so far.
    body: Vec<u8>,
    parser: SseParser,
    events: VecDeque<SseEvent>,
    /// The body ended with its proper end (chunked terminator, length
    /// reached, or end of a close-delimited body).
    done: bool,
    /// The connection broke before the body's end.
    error: Option<String>,
    /// `relay.live` and `relay.heartbeat` markers skipped by
    /// [`SseClient::next_data_event`], in order.
    pub markers: Vec<SseEvent>,
}

/// Events that mark a stream's state and carry no event of the stream.
pub fn is_marker(ev: &SseEvent) -> bool {
    matches!(ev.event.as_deref(), Some("relay.live" | "relay.heartbeat"))
}

impl SseClient {
    /// Connects and sends `GET path` with `Accept: text/event-stream`
    /// (unless `headers` has an Accept), then reads the response head.
    /// Panics if that fails or takes longer than [`HTTP_TIMEOUT`].
    pub async fn connect(addr: &str, path: &str, headers: &[(&str, &str)]) -> SseClient {
        Self::try_connect(addr, path, headers, HTTP_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`SseClient::connect`] but the socket's receive buffer is set to
    /// `rcvbuf` bytes before connecting. Not calling any read method on the
    /// client leaves the data in the kernel: the client then reads little
    /// more than what hyper's read buffer holds.
    pub async fn connect_with_rcvbuf(
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        rcvbuf: u32,
    ) -> SseClient {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(rcvbuf).expect("SO_RCVBUF");
        let sockaddr = addr.parse().expect("socket address");
        let open = async {
            let stream = socket.connect(sockaddr).await.map_err(|e| e.to_string())?;
            Self::on_stream(stream, addr, path, headers).await
        };
        match tokio::time::timeout(HTTP_TIMEOUT, open).await {
            Ok(r) => r.unwrap_or_else(|e| panic!("GET {path} on {addr}: {e}")),
            Err(_) => panic!("GET {path} on {addr}: no response head within {HTTP_TIMEOUT:?}"),
        }
    }

    /// Like [`SseClient::connect`], but connection and protocol errors (a
    /// relay that is down or restarting) come back as `Err`. Bounded by
    /// `limit` overall.
    pub async fn try_connect(
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        limit: Duration,
    ) -> Result<SseClient, String> {
        let open = async {
            let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            Self::on_stream(stream, addr, path, headers).await
        };
        match tokio::time::timeout(limit, open).await {
            Ok(r) => r.map_err(|e| format!("GET {path} on {addr}: {e}")),
            Err(_) => Err(format!(
                "GET {path} on {addr}: no response head within {limit:?}"
            )),
        }
    }

    async fn on_stream(
        stream: TcpStream,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<SseClient, String> {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        let connection = ConnectionGuard(tokio::spawn(connection).abort_handle());
        let mut req = hyper::Request::get(path).header("Host", addr);
        for (name, value) in [
            ("Accept", "text/event-stream"),
            ("Cache-Control", "no-cache"),
        ] {
            if !headers.iter().any(|(h, _)| h.eq_ignore_ascii_case(name)) {
                req = req.header(name, value);
            }
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let (head, body_stream) = resp.into_parts();
        Ok(SseClient {
            status: head.status.as_u16(),
            headers: header_pairs(&head.headers),
            body_stream,
            _connection: connection,
            body: Vec::new(),
            parser: SseParser::default(),
            events: VecDeque::new(),
            done: false,
            error: None,
            markers: Vec::new(),
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    /// One body frame (cancel-safe: a frame is taken only when it is
    /// ready). Returns false if the body is over.
    async fn read_more(&mut self) -> bool {
        if self.is_closed() {
            return false;
        }
        match self.body_stream.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    self.body.extend_from_slice(&data);
                    self.parser.feed(&data, &mut self.events);
                }
                true
            }
            Some(Err(e)) => {
                self.error = Some(e.to_string());
                false
            }
            None => {
                self.done = true;
                false
            }
        }
    }

    /// The server ended the stream: its proper end, or a broken connection.
    pub fn is_closed(&self) -> bool {
        self.done || self.error.is_some()
    }

    /// The body ended with its proper end (not by a reset or EOF in the
    /// middle of a chunked body).
    pub fn ended_cleanly(&self) -> bool {
        self.done
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
    /// other data-less blocks, and keeps `relay.live` / `relay.heartbeat`
    /// markers in [`SseClient::markers`]).
    pub async fn next_data_event(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let ev = self.next_event(left).await?;
            if is_marker(&ev) {
                self.markers.push(ev);
            } else if ev.has_data {
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
                tail(&self.body_text(), 2000)
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

    /// Data events until the stream ends or `limit` passes.
    pub async fn data_events_until_closed(&mut self, limit: Duration) -> Vec<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut evs = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_data_event(left).await {
                Some(ev) => evs.push(ev),
                None => return evs,
            }
        }
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

    pub fn comment_count(&self) -> usize {
        self.parser.comments.len()
    }

    /// All body bytes so far, as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}
