//! A lean HTTP/1.1 connection loop for requests without a body: every SSE
//! stream, health checks and refusals. Requests with a body go to hyper.
//!
//! Why not hyper for everything: a hyper HTTP/1 connection keeps an 8 KiB
//! read buffer and an 8 KiB header write buffer for its whole life, about
//! 16 KiB of RSS per open stream, while an idle SSE connection needs only
//! its socket, its queue and a small task. Here the request head is read
//! into a buffer that is freed before the stream starts, and the body is
//! written straight from the client's queue: chunked on HTTP/1.1,
//! close-delimited on HTTP/1.0. A connection that opens with the HTTP/2
//! preface goes to [`super::h2`] (h2c).
//!
//! One file of ~440 lines with its tests: the head parser, the response
//! writer and the stream copy are one connection's state machine.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::Empty;
use hyper::body::Body;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::client::SseBody;
use crate::limits::ConnectionPermit;

/// Largest request head accepted (431 beyond).
pub(super) const MAX_HEAD: usize = 16 * 1024;
/// Time a request head may take from its first byte (and a new connection
/// from its accept) to its end.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive connection is kept for its next request.
pub(super) const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a request with a body (extension routes only) has to be read and
/// answered.
pub(super) const BODY_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Who is on the other end, and its place under `--max-connections`.
pub(crate) struct Peer {
    pub(crate) ip: std::net::IpAddr,
    pub(crate) permit: ConnectionPermit,
}

/// What routing learns about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnInfo {
    pub(crate) peer: std::net::IpAddr,
    /// The process was at `--max-connections` when this one arrived.
    pub(crate) over_capacity: bool,
}

/// Serves one connection until it closes, the peer goes, or shutdown.
pub(crate) async fn serve(
    app: Arc<App>,
    mut stream: TcpStream,
    cancel: CancellationToken,
    peer: Peer,
) {
    // Held for the connection's life; only its verdict is copied around.
    let Peer {
        ip,
        permit: _permit,
    } = peer;
    let info = ConnInfo {
        peer: ip,
        over_capacity: _permit.over_capacity,
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        // Boxed, like routing below: the timers and parser state of this
        // phase would otherwise size the task for the stream's whole life.
        let mut head = match Box::pin(next_head(&mut stream, &mut pending, first, &cancel)).await {
            Some(Opening::Http1(head)) => head,
            Some(Opening::H2) => {
                // A task of its own on this shard: awaited here, its state
                // would size every HTTP/1.1 connection's task. It takes
                // this connection's place under the limits before this
                // task gives it back; `info` keeps the verdict taken at
                // the accept.
                let permit = app.limits.connection();
                let pending = std::mem::take(&mut pending);
                let h2 = super::h2::serve(
                    app.clone(),
                    stream,
                    pending,
                    cancel.clone(),
                    info,
                    permit,
                    KEEP_ALIVE_TIMEOUT,
                );
                app.tasks.spawn(h2);
                return;
            }
            None => return,
        };
        head.req.extensions_mut().insert(info);
        first = false;
        let mut keep_alive = head.keep_alive;
        if head.has_body && !super::routes::takes_body(&app, head.req.uri().path()) {
            // Only extension routes read bodies: a stream cannot be moved
            // onto the body path by adding a body header. GET and HEAD take
            // no body anywhere; other methods get their usual answer (405,
            // 404) here, unread body and all, and the connection closes.
            let get = matches!(*head.req.method(), hyper::Method::GET | hyper::Method::HEAD);
            if get {
                let reply = bad_request(400, "body_not_allowed", BODY_NOT_ALLOWED);
                let _ = stream.write_all(&reply).await;
                return;
            }
            keep_alive = false;
        } else if head.has_body {
            // Rare (dev publish): let hyper read the body, one request only.
            let io = Rewind {
                pre: Bytes::from(std::mem::take(&mut pending)),
                inner: stream,
            };
            let service = hyper::service::service_fn(move |mut req: Request<_>| {
                let app = app.clone();
                req.extensions_mut().insert(info);
                async move { Ok::<_, std::convert::Infallible>(super::handle(app, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                .without_shutdown();
            // Boxed: this rare path must not size every connection's task.
            Box::pin(async move {
                if let Ok(Ok(parts)) = tokio::time::timeout(BODY_REQUEST_TIMEOUT, conn).await {
                    linger(parts.io.into_inner().inner).await;
                }
            })
            .await;
            return;
        }
        if pending.is_empty() {
            // Free the head buffer: a stream may hold this task for hours.
            pending = Vec::new();
        }
        let version = head.req.version();
        let head_only = head.req.method() == hyper::Method::HEAD;
        // Boxed: the routing future is large and lives only until the
        // response starts; unboxed it would size this task for its life.
        let res = Box::pin(super::handle(app.clone(), head.req)).await;
        let Rendered {
            bytes,
            stream: body,
            keep_alive,
        } = render(res, version, keep_alive, head_only);
        if stream.write_all(&bytes).await.is_err() {
            return;
        }
        drop(bytes);
        match body {
            Some((mut body, chunked)) => {
                let _ = stream_body(&mut stream, &mut body, chunked).await;
                return;
            }
            None if keep_alive => continue,
            None => return,
        }
    }
}

/// How a connection goes on: an HTTP/1.1 request, or (first thing on the
/// connection only) the HTTP/2 preface.
// As large as the head it carries (an `Option<Head>` before h2c): boxing
// it would cost every HTTP/1.1 request an allocation.
#[allow(clippy::large_enum_variant)]
enum Opening {
    Http1(Head),
    H2,
}

/// Waits for the next request head; None when the connection should close
/// (EOF, timeout, shutdown, or a malformed head, which is answered here).
/// The first request of a connection has [`HEAD_TIMEOUT`] from the accept;
/// a later one may idle [`KEEP_ALIVE_TIMEOUT`] before its first byte, then
/// has [`HEAD_TIMEOUT`] too.
async fn next_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    first: bool,
    cancel: &CancellationToken,
) -> Option<Opening> {
    let read = async {
        if !first && pending.is_empty() {
            match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, stream.read_buf(pending)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return Err(HeadError::Io),
            }
        }
        match tokio::time::timeout(HEAD_TIMEOUT, read_opening(stream, pending, first)).await {
            Ok(Ok(Some(opening))) => Ok(opening),
            Ok(Ok(None)) | Err(_) => Err(HeadError::Io),
            Ok(Err(e)) => Err(e),
        }
    };
    let error = tokio::select! {
        h = read => match h {
            Ok(head) => return Some(head),
            Err(e) => e,
        },
        () = cancel.cancelled() => return None,
    };
    let reply = match error {
        HeadError::Io => return None,
        HeadError::TooLarge => bad_request(431, "too_large", "the request head is over 16 KiB"),
        HeadError::Malformed(why) => bad_request(400, "bad_request", why),
    };
    let _ = stream.write_all(&reply).await;
    None
}

/// The first head of a connection, or the HTTP/2 preface: looked for only
/// once the HTTP/1.1 parser has refused the bytes (it refuses the preface's
/// `HTTP/2.0` as soon as it reads it), so a valid HTTP/1.1 request costs
/// nothing more.
async fn read_opening(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    first: bool,
) -> Result<Option<Opening>, HeadError> {
    match read_head(stream, pending).await {
        Err(HeadError::Malformed(_)) if first && super::h2::may_be_preface(pending) => {
            Ok(super::h2::read_preface(stream, pending)
                .await?
                .then_some(Opening::H2))
        }
        other => other.map(|head| head.map(Opening::Http1)),
    }
}

/// Why a body on a request that takes none is refused.
const BODY_NOT_ALLOWED: &str = "this request takes no body; send none";

/// A JSON error answer that closes the connection.
fn bad_request(status: u16, code: &str, message: &str) -> Vec<u8> {
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    let reason = if status == 431 {
        "Request Header Fields Too Large"
    } else {
        "Bad Request"
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nx-content-type-options: nosniff\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

struct Head {
    req: Request<Empty<Bytes>>,
    has_body: bool,
    keep_alive: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeadError {
    Io,
    TooLarge,
    /// Answered with 400 and this sentence.
    Malformed(&'static str),
}

/// Reads one request head. `pending` holds bytes already read; on return
/// it holds what follows the head (a body, or a pipelined request).
async fn read_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
) -> Result<Option<Head>, HeadError> {
    loop {
        if let Some((head, len)) = parse_head(pending)? {
            if !head.has_body {
                pending.drain(..len);
            }
            return Ok(Some(head));
        }
        if pending.capacity() - pending.len() < 512 {
            pending.reserve(1024);
        }
        match stream.read_buf(pending).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(_) => return Err(HeadError::Io),
        }
    }
}

/// Parses a complete head at the start of `buf` and its length; None while
/// it is incomplete (and under [`MAX_HEAD`]).
fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some((build(&parsed)?, len))),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::Malformed(why_malformed(buf))),
    }
}

/// What the HTTP head parser made of some bytes (for the fuzz targets).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeadOutcome {
    /// A head `len` bytes long; its body follows when `has_body`.
    Complete {
        len: usize,
        has_body: bool,
        keep_alive: bool,
    },
    Incomplete,
    Refused,
}

pub(crate) fn head_outcome(buf: &[u8]) -> HeadOutcome {
    match parse_head(buf) {
        Ok(Some((head, len))) => HeadOutcome::Complete {
            len,
            has_body: head.has_body,
            keep_alive: head.keep_alive,
        },
        Ok(None) => HeadOutcome::Incomplete,
        Err(_) => HeadOutcome::Refused,
    }
}

/// What to tell a client whose request line httparse refused. The usual
/// cause is a query typed into a shell: `subject=events.orders.>` with the
/// `>` not percent-encoded.
fn why_malformed(raw: &[u8]) -> &'static str {
    let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    if line.iter().any(|&b| {
        matches!(
            b,
            b'>' | b'<' | b'"' | b'{' | b'}' | b'|' | b'\\' | b'^' | b'`'
        )
    }) {
        "the request target holds characters that must be percent-encoded: write `>` as %3E (subject=events.orders.%3E)"
    } else {
        "the request is not valid HTTP/1.1"
    }
}

/// Checks the framing rules of RFC 9112 this loop relies on and builds the
/// request. A head that breaks them is refused: 400, connection closed.
fn build(p: &httparse::Request<'_, '_>) -> Result<Head, HeadError> {
    use HeadError::Malformed;
    let version = match p.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let path = p.path.unwrap_or("/");
    let uri: hyper::Uri = path
        .parse()
        .map_err(|_| Malformed(why_malformed(path.as_bytes())))?;
    let mut builder = Request::builder()
        .method(p.method.unwrap_or("GET"))
        .uri(uri)
        .version(version);
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut hosts = 0;
    let mut close = version == Version::HTTP_10;
    let headers = builder
        .headers_mut()
        .ok_or(Malformed("the request line is not valid"))?;
    for h in p.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Malformed("a header name is not valid"))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| Malformed("a header value is not valid"))?;
        if name == header::CONTENT_LENGTH {
            // §6.3: 1*DIGIT only (no sign, no list); repeats must agree.
            let n =
                parse_content_length(h.value).ok_or(Malformed("Content-Length is not valid"))?;
            if content_length.is_some_and(|c| c != n) {
                return Err(Malformed(
                    "Content-Length is given twice with different values",
                ));
            }
            content_length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // §6.1: chunked must be the final coding of a request.
            if version == Version::HTTP_10 || chunked {
                return Err(Malformed("Transfer-Encoding is not valid here"));
            }
            let last = h.value.rsplit(|&b| b == b',').next().unwrap_or_default();
            if !last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(Malformed("Transfer-Encoding must end with chunked"));
            }
            chunked = true;
        } else if name == header::HOST {
            hosts += 1;
        } else if name == header::CONNECTION {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                    close = false;
                }
            }
        }
        headers.append(name, value);
    }
    // §6.3: both framings at once is how requests are smuggled.
    if chunked && content_length.is_some() {
        return Err(Malformed("Content-Length and Transfer-Encoding together"));
    }
    // §3.2: exactly one Host on HTTP/1.1, at most one on HTTP/1.0.
    if hosts > 1 || (hosts == 0 && version == Version::HTTP_11) {
        return Err(Malformed(
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    let req = builder
        .body(Empty::new())
        .map_err(|_| Malformed("the request line is not valid"))?;
    Ok(Head {
        req,
        has_body: chunked || content_length.is_some_and(|n| n > 0),
        keep_alive: !close,
    })
}

/// `1*DIGIT` as RFC 9110 §8.6 defines Content-Length (Rust's parser would
/// also take a leading `+`).
fn parse_content_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A response turned into bytes: the head (and the whole body when it is
/// not a stream), plus the stream to copy afterwards.
struct Rendered {
    bytes: Vec<u8>,
    /// The stream body and whether it is chunked.
    stream: Option<(SseBody, bool)>,
    keep_alive: bool,
}

/// Synchronous on purpose: the response's headers never live across an
/// await, so they do not size the connection task.
fn render(res: Response<SseBody>, version: Version, keep_alive: bool, head_only: bool) -> Rendered {
    let (parts, mut body) = res.into_parts();
    let exact = body.size_hint().exact();
    let streaming = exact.is_none();
    // A stream ends its connection: the browser reconnects with a new one.
    let keep_alive = keep_alive && !streaming;
    let chunked = streaming && version == Version::HTTP_11;
    let mut out = Vec::with_capacity(256 + exact.unwrap_or(0) as usize);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(parts.status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    write_headers(&mut out, &parts.headers);
    match exact {
        Some(n) => out.extend_from_slice(format!("content-length: {n}\r\n").as_bytes()),
        None if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        None => {}
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if head_only {
        return Rendered {
            bytes: out,
            stream: None,
            keep_alive,
        };
    }
    if streaming {
        return Rendered {
            bytes: out,
            stream: Some((body, chunked)),
            keep_alive,
        };
    }
    // A fixed body is ready at once: take it without a real waker.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    while let Poll::Ready(Some(frame)) = Pin::new(&mut body).poll_frame(&mut cx) {
        let Ok(frame) = frame;
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    Rendered {
        bytes: out,
        stream: None,
        keep_alive,
    }
}

fn write_headers(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Copies the client's queue to the socket until the stream ends or the
/// peer goes away (noticed by reading EOF while waiting for events).
async fn stream_body(stream: &mut TcpStream, body: &mut SseBody, chunked: bool) -> io::Result<()> {
    enum Next {
        Frame(Option<Bytes>),
        Readable(io::Result<()>),
    }
    loop {
        // One poll function rather than `select!` over `readable()`: read
        // readiness then uses the socket's single waker slot instead of a
        // waiter registered (and removed) on every event.
        let next = std::future::poll_fn(|cx| {
            if let Poll::Ready(f) = Pin::new(&mut *body).poll_frame(cx) {
                let data = f.and_then(|f| match f {
                    Ok(frame) => frame.into_data().ok(),
                    Err(never) => match never {},
                });
                return Poll::Ready(Next::Frame(data));
            }
            stream.poll_read_ready(cx).map(Next::Readable)
        })
        .await;
        match next {
            Next::Readable(r) => {
                r?;
                let mut scratch = [0u8; 64];
                match stream.try_read(&mut scratch) {
                    // EOF: the client left.
                    Ok(0) => return Ok(()),
                    // A stream's request side may send nothing more: a
                    // client that does (a pipelined request, an upload of
                    // garbage) is closed rather than read forever.
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Next::Frame(Some(data)) if chunked => {
                let mut buf = Vec::with_capacity(data.len() + 20);
                put_chunk_size(&mut buf, data.len());
                buf.extend_from_slice(&data);
                buf.extend_from_slice(b"\r\n");
                stream.write_all(&buf).await?;
            }
            Next::Frame(Some(data)) => stream.write_all(&data).await?,
            Next::Frame(None) => {
                if chunked {
                    stream.write_all(b"0\r\n\r\n").await?;
                }
                return Ok(());
            }
        }
    }
}

/// Writes `n` in hex followed by CRLF: a chunk header.
fn put_chunk_size(buf: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        buf.push(HEX[(n >> (i * 4)) & 0xf]);
    }
    buf.extend_from_slice(b"\r\n");
}

/// A stream that first yields bytes already read from it.
/// After an answer given before the request's body was read (a refusal,
/// or 413), closing at once would make the kernel reset the connection over
/// the unread bytes, and the client, still sending, would see a broken pipe
/// instead of the answer. So: send FIN, then read and drop what the client
/// still sends, for a short while and a bounded amount, and close.
async fn linger(mut stream: TcpStream) {
    use tokio::io::AsyncReadExt;
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 8192];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER_TIME, async {
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

/// How long, and how much, a closing body connection reads to drain.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 << 20;

pub(super) struct Rewind {
    pub(super) pre: Bytes,
    pub(super) inner: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pre.has_remaining() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The connection task lives as long as its stream: its size is most of
    /// an idle connection's memory (BENCHMARKS.md). Routing and the head
    /// phase are boxed to keep it small; this catches a regression.
    /// A shard's state without NATS: enough for health checks and refusals.
    fn app() -> Arc<App> {
        use crate::config::{Cli, Command, Config};
        use clap::Parser;
        let Command::Serve(args) = Cli::try_parse_from(["sse-relay", "serve", "--jwt-secret", "s"])
            .unwrap()
            .command
        else {
            unreachable!()
        };
        let cfg = Config::from_args(*args).unwrap();
        let cfg_limits = cfg.limits.clone();
        let verifier = crate::auth::Verifier::new(&cfg.key, None, None, Duration::ZERO).unwrap();
        Arc::new(App {
            cfg: Arc::new(cfg),
            verifier,
            metrics: Default::default(),
            live: Default::default(),
            link: Default::default(),
            draining: Default::default(),
            tasks: Default::default(),
            extension: None,
            limits: Arc::new(crate::limits::Limits::new(cfg_limits)),
        })
    }

    /// A served connection and the client's end of it.
    async fn connection(app: &Arc<App>) -> (TcpStream, impl Future<Output = ()> + use<>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let peer = Peer {
            ip: std::net::IpAddr::from([127, 0, 0, 1]),
            permit: app.limits.connection(),
        };
        (
            client,
            serve(app.clone(), server, CancellationToken::new(), peer),
        )
    }

    /// Reads until the server closes; the paused clock's reading then.
    async fn closed_at(client: &mut TcpStream) -> tokio::time::Instant {
        let mut buf = [0u8; 1024];
        while client.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        tokio::time::Instant::now()
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_comes_is_cut_after_its_timeout() {
        let app = app();
        let (mut client, conn) = connection(&app).await;
        tokio::spawn(conn);
        let start = tokio::time::Instant::now();
        client
            .write_all(b"POST /publish/events.a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
            .await
            .unwrap();
        let at = closed_at(&mut client).await;
        assert_eq!(at - start, BODY_REQUEST_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_is_closed_after_the_head_timeout() {
        let app = app();
        let (mut client, conn) = connection(&app).await;
        tokio::spawn(conn);
        let start = tokio::time::Instant::now();
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let at = closed_at(&mut client).await;
        assert_eq!(at - start, HEAD_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_idles_then_each_head_has_its_own_timeout() {
        let app = app();
        let (mut client, conn) = connection(&app).await;
        tokio::spawn(conn);
        client
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = client.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // Idle for almost the keep-alive timeout, then a slow second head.
        tokio::time::sleep(KEEP_ALIVE_TIMEOUT - Duration::from_secs(1)).await;
        client
            .write_all(b"GET /healthz HTTP/1.1\r\n")
            .await
            .unwrap();
        let first_byte = tokio::time::Instant::now();
        let at = closed_at(&mut client).await;
        assert_eq!(
            at - first_byte,
            HEAD_TIMEOUT,
            "the head timeout counts from its first byte"
        );

        let (mut idle, conn) = connection(&app).await;
        tokio::spawn(conn);
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = idle.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        let answered = tokio::time::Instant::now();
        let at = closed_at(&mut idle).await;
        assert_eq!(at - answered, KEEP_ALIVE_TIMEOUT);
    }

    /// An h2c client on `client` (the preface goes out with the handshake),
    /// and its connection's task, which ends when the server closes it.
    async fn h2c<B>(
        client: TcpStream,
    ) -> (
        hyper::client::conn::http2::SendRequest<B>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    )
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                .await
                .unwrap();
        (send, tokio::spawn(conn))
    }

    /// The idle timeout of an h2c connection, on a short interval of real
    /// time (the loop passes [`KEEP_ALIVE_TIMEOUT`]): under a paused clock
    /// the closing handshake races the clock's jumps.
    #[tokio::test]
    async fn an_h2c_connection_without_streams_closes_after_its_idle_interval() {
        use http_body_util::BodyExt;
        const IDLE: Duration = Duration::from_millis(200);
        let app = app();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let info = ConnInfo {
            peer: std::net::IpAddr::from([127, 0, 0, 1]),
            over_capacity: false,
        };
        let cancel = CancellationToken::new();
        let permit = app.limits.connection();
        let h2 =
            super::super::h2::serve(app.clone(), server, Vec::new(), cancel, info, permit, IDLE);
        tokio::spawn(h2);
        let (mut send, client_conn) = h2c(client).await;
        let req = Request::get("http://x/healthz")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.version(), Version::HTTP_2);
        assert_eq!(res.status(), 200);
        res.into_body().collect().await.unwrap();
        let answered = std::time::Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(10), client_conn).await;
        assert!(closed.is_ok(), "the idle connection was never closed");
        drop(send);
        let idle = answered.elapsed();
        assert!(
            idle >= IDLE && idle < 2 * IDLE + Duration::from_secs(1),
            "closed after {idle:?} without a stream"
        );
    }

    /// A request body that sends two bytes and then nothing, forever.
    struct Stalled(bool);

    impl Body for Stalled {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            if self.0 {
                return Poll::Pending;
            }
            self.0 = true;
            Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
                b"ab",
            )))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_h2c_body_that_never_ends_is_reset_after_its_timeout() {
        let app = app();
        let (client, conn) = connection(&app).await;
        tokio::spawn(conn);
        let (mut send, _client_conn) = h2c(client).await;
        let req = Request::post("http://x/publish/events.a")
            .body(Stalled(false))
            .unwrap();
        let start = tokio::time::Instant::now();
        let res = send.send_request(req).await;
        assert!(res.is_err(), "the stream is reset, not answered: {res:?}");
        let took = tokio::time::Instant::now() - start;
        assert!(
            took >= BODY_REQUEST_TIMEOUT && took < BODY_REQUEST_TIMEOUT + Duration::from_secs(1),
            "reset after {took:?}"
        );
    }

    #[tokio::test]
    async fn connection_task_stays_small() {
        let app = app();
        let (_client, conn) = connection(&app).await;
        let size = std::mem::size_of_val(&conn);
        println!(
            "connection future: {size} bytes; client queue: {} bytes",
            std::mem::size_of::<crate::client::ClientQueue>()
        );
        assert!(size <= 1024, "connection future grew to {size} bytes");
    }

    /// Parses a whole request head as the loop does.
    fn head(raw: &str) -> Result<Head, HeadError> {
        match parse_head(raw.as_bytes()) {
            Ok(Some((head, _))) => Ok(head),
            Ok(None) => panic!("incomplete: {raw:?}"),
            Err(e) => Err(e),
        }
    }

    fn get(extra: &str) -> Result<Head, HeadError> {
        head(&format!("GET /events HTTP/1.1\r\nHost: x\r\n{extra}\r\n"))
    }

    #[test]
    fn content_length_is_digits_only_and_agrees_with_itself() {
        for bad in [
            "+0",
            "-1",
            "0x10",
            " ",
            "1, 1",
            "1 1",
            "18446744073709551616",
        ] {
            let h = get(&format!("Content-Length: {bad}\r\n"));
            assert!(matches!(h, Err(HeadError::Malformed(_))), "{bad:?}");
        }
        let twice = get("Content-Length: 1\r\nContent-Length: 2\r\n");
        assert!(matches!(twice, Err(HeadError::Malformed(_))));
        assert!(
            get("Content-Length: 3\r\nContent-Length: 3\r\n")
                .unwrap()
                .has_body
        );
        assert!(!get("Content-Length: 0\r\n").unwrap().has_body);
        assert!(!get("Content-Length: 00\r\n").unwrap().has_body);
        assert!(get("Content-Length: 5\r\n").unwrap().has_body);
    }

    #[test]
    fn transfer_encoding_must_be_chunked_last_and_alone() {
        assert!(get("Transfer-Encoding: chunked\r\n").unwrap().has_body);
        assert!(
            get("Transfer-Encoding: gzip, chunked\r\n")
                .unwrap()
                .has_body
        );
        for bad in [
            "Transfer-Encoding: gzip\r\n",
            "Transfer-Encoding: chunked, gzip\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
            "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        ] {
            assert!(matches!(get(bad), Err(HeadError::Malformed(_))), "{bad:?}");
        }
        let old = head("POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert!(matches!(old, Err(HeadError::Malformed(_))));
    }

    #[test]
    fn exactly_one_host_on_http_1_1() {
        let none = head("GET / HTTP/1.1\r\n\r\n");
        assert!(matches!(none, Err(HeadError::Malformed(_))));
        let two = get("Host: y\r\n");
        assert!(matches!(two, Err(HeadError::Malformed(_))));
        assert!(head("GET / HTTP/1.0\r\n\r\n").is_ok(), "optional on 1.0");
    }

    #[test]
    fn connection_is_a_list_of_tokens() {
        assert!(get("").unwrap().keep_alive);
        assert!(!get("Connection: close\r\n").unwrap().keep_alive);
        assert!(!get("Connection: keep-alive, Close\r\n").unwrap().keep_alive);
        assert!(
            get("Connection: closed\r\n").unwrap().keep_alive,
            "not the close token"
        );
        assert!(get("Connection: upgrade-close-x\r\n").unwrap().keep_alive);
        let old = head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(old.keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").unwrap().keep_alive);
    }

    #[test]
    fn an_unencoded_wildcard_gets_a_sentence() {
        let h = head("GET /events?subject=events.orders.> HTTP/1.1\r\nHost: x\r\n\r\n");
        let Err(HeadError::Malformed(why)) = h else {
            panic!("expected a refusal")
        };
        assert!(why.contains("%3E"), "{why}");
        let reply = String::from_utf8(bad_request(400, "bad_request", why)).unwrap();
        assert!(reply.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let body = reply.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "bad_request");
        assert!(reply.contains(&format!("content-length: {}\r\n", body.len())));
    }

    #[test]
    fn the_body_refusal_is_well_formed() {
        let reply = bad_request(400, "body_not_allowed", BODY_NOT_ALLOWED);
        let reply = std::str::from_utf8(&reply).unwrap();
        let (head, body) = reply.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{reply}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "body_not_allowed");
    }

    #[test]
    fn chunk_sizes_are_lowercase_hex() {
        for (n, want) in [
            (0, "0\r\n"),
            (9, "9\r\n"),
            (26, "1a\r\n"),
            (65536, "10000\r\n"),
        ] {
            let mut buf = Vec::new();
            put_chunk_size(&mut buf, n);
            assert_eq!(std::str::from_utf8(&buf).unwrap(), want);
        }
    }
}
