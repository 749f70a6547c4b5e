//! A lean HTTP/1.1 connection loop for requests without a body: every SSE
//! stream, health checks and refusals. Requests with a body go to hyper.
//!
//! Why not hyper for everything: a hyper HTTP/1 connection keeps an 8 KiB
//! read buffer and an 8 KiB header write buffer for its whole life, about
//! 16 KiB of RSS per open stream, while an idle SSE connection needs only
//! its socket, its queue and a small task. Here the request head is read
//! into a buffer that is freed before the stream starts, and the body is
//! written straight from the client's queue: chunked on HTTP/1.1,
//! close-delimited on HTTP/1.0.
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

/// Largest request head accepted (431 beyond).
const MAX_HEAD: usize = 16 * 1024;
/// Time a new connection has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time an idle keep-alive connection is kept for its next request.
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one connection until it closes, the peer goes, or shutdown.
pub(crate) async fn serve(app: Arc<App>, mut stream: TcpStream, cancel: CancellationToken) {
    let mut pending: Vec<u8> = Vec::new();
    let mut first = true;
    loop {
        let wait = if first {
            HEAD_TIMEOUT
        } else {
            KEEP_ALIVE_TIMEOUT
        };
        first = false;
        // Boxed, like routing below: the timers and parser state of this
        // phase would otherwise size the task for the stream's whole life.
        let head = match Box::pin(next_head(&mut stream, &mut pending, wait, &cancel)).await {
            Some(head) => head,
            None => return,
        };
        if head.has_body {
            // Rare (dev publish): let hyper read the body, one request only.
            let io = Rewind {
                pre: Bytes::from(std::mem::take(&mut pending)),
                inner: stream,
            };
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, std::convert::Infallible>(super::handle(app, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(hyper_util::rt::TokioIo::new(io), service);
            let _ = Box::pin(conn).await;
            return;
        }
        if pending.is_empty() {
            // Free the head buffer: a stream may hold this task for hours.
            pending = Vec::new();
        }
        let version = head.req.version();
        let head_only = head.req.method() == hyper::Method::HEAD;
        let keep_alive = head.keep_alive;
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

/// Waits for the next request head; None when the connection should close
/// (EOF, timeout, shutdown, or a malformed head, which is answered here).
async fn next_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
    wait: Duration,
    cancel: &CancellationToken,
) -> Option<Head> {
    let reply: &[u8] = tokio::select! {
        h = tokio::time::timeout(wait, read_head(stream, pending)) => match h {
            Ok(Ok(Some(head))) => return Some(head),
            Ok(Ok(None)) | Err(_) | Ok(Err(HeadError::Io)) => return None,
            Ok(Err(HeadError::TooLarge)) => b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            Ok(Err(HeadError::Malformed)) => b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        },
        () = cancel.cancelled() => return None,
    };
    let _ = stream.write_all(reply).await;
    None
}

struct Head {
    req: Request<Empty<Bytes>>,
    has_body: bool,
    keep_alive: bool,
}

enum HeadError {
    Io,
    TooLarge,
    Malformed,
}

/// Reads one request head. `pending` holds bytes already read; on return
/// it holds what follows the head (a body, or a pipelined request).
async fn read_head(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
) -> Result<Option<Head>, HeadError> {
    loop {
        if !pending.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut parsed = httparse::Request::new(&mut headers);
            match parsed.parse(pending) {
                Ok(httparse::Status::Complete(len)) => {
                    let head = build(&parsed)?;
                    if !head.has_body {
                        pending.drain(..len);
                    }
                    return Ok(Some(head));
                }
                Ok(httparse::Status::Partial) if pending.len() >= MAX_HEAD => {
                    return Err(HeadError::TooLarge);
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
                Err(_) => return Err(HeadError::Malformed),
            }
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

fn build(p: &httparse::Request<'_, '_>) -> Result<Head, HeadError> {
    let version = match p.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut builder = Request::builder()
        .method(p.method.unwrap_or("GET"))
        .uri(p.path.unwrap_or("/"))
        .version(version);
    let mut has_body = false;
    let mut close = version == Version::HTTP_10;
    let headers = builder.headers_mut().ok_or(HeadError::Malformed)?;
    for h in p.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| HeadError::Malformed)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| HeadError::Malformed)?;
        if name == header::CONTENT_LENGTH {
            has_body |= value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                != Some(0);
        } else if name == header::TRANSFER_ENCODING {
            has_body = true;
        } else if name == header::CONNECTION {
            let v = value.to_str().unwrap_or_default().to_ascii_lowercase();
            if v.contains("close") {
                close = true;
            } else if v.contains("keep-alive") {
                close = false;
            }
        }
        headers.append(name, value);
    }
    let req = builder
        .body(Empty::new())
        .map_err(|_| HeadError::Malformed)?;
    Ok(Head {
        req,
        has_body,
        keep_alive: !close,
    })
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
                    Ok(0) => return Ok(()),
                    // Bytes after the request (a pipelined request) are not
                    // served on a stream; keep waiting for events.
                    Ok(_) => {}
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
struct Rewind {
    pre: Bytes,
    inner: TcpStream,
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
    #[tokio::test]
    async fn connection_task_stays_small() {
        use crate::config::{Cli, Command, Config};
        use clap::Parser;
        let Command::Serve(args) = Cli::try_parse_from(["sse-relay", "serve", "--jwt-secret", "s"])
            .unwrap()
            .command
        else {
            unreachable!()
        };
        let cfg = Config::from_args(*args).unwrap();
        let verifier = crate::auth::Verifier::new(&cfg.key, None, None, Duration::ZERO).unwrap();
        let app = Arc::new(App {
            cfg: Arc::new(cfg),
            verifier,
            metrics: Default::default(),
            live: Default::default(),
            link: Default::default(),
            draining: Default::default(),
            tasks: Default::default(),
            extension: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let size = std::mem::size_of_val(&serve(app, stream, CancellationToken::new()));
        println!(
            "connection future: {size} bytes; client queue: {} bytes",
            std::mem::size_of::<crate::client::ClientQueue>()
        );
        assert!(size <= 1024, "connection future grew to {size} bytes");
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
