//! Cleartext HTTP/2 with prior knowledge (h2c) on the relay's port, for
//! edges that speak HTTP/2 to their backends (Fly's `h2_backend`, Envoy,
//! a gRPC-style load balancer) and multiplex many SSE streams on one
//! connection.
//!
//! The lean HTTP/1.1 loop ([`super::conn`]) reads the first request head;
//! only when its parser refuses it and the bytes read so far are the start
//! of the connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`) does the
//! connection come here, so the HTTP/1.1 path pays nothing for it. From
//! then on hyper's HTTP/2 server runs the connection with the same routing
//! ([`super::handle`]) and the same limits: the connection holds its one
//! place under `--max-connections`, every request carries the same
//! [`ConnInfo`], streams count under the per-IP and per-token limits as
//! HTTP/1.1 streams do, a request body has [`BODY_REQUEST_TIMEOUT`], and a
//! connection with no open stream is closed after one to two keep-alive
//! timeouts (30 s each).
//!
//! Each stream is a task of hyper's on the shard's runtime (it never leaves
//! the shard), plus the h2 crate's per-stream state: ~5.2 KB of RSS per idle
//! stream against ~1.9 KB on HTTP/1.1 (BENCHMARKS.md, "Idle memory on h2c").

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::Request;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::conn::{BODY_REQUEST_TIMEOUT, ConnInfo, HeadError, MAX_HEAD, Rewind};
use crate::app::App;
use crate::client::SseBody;
use crate::limits::ConnectionPermit;

/// The HTTP/2 connection preface a client with prior knowledge sends first
/// (RFC 9113 §3.4).
pub(super) const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Streams one HTTP/2 connection may have open at once (its
/// SETTINGS_MAX_CONCURRENT_STREAMS): the floor RFC 9113 §6.5.2 recommends.
/// An edge opens more connections for more streams.
pub(crate) const MAX_CONCURRENT_STREAMS: u32 = 100;

/// Bytes hyper buffers per stream beyond what the peer's flow-control
/// window takes: a reader that stops reading reaches this, and then its
/// queue in the hub fills and it is dropped as slow, as on HTTP/1.1.
const MAX_SEND_BUF: usize = 64 * 1024;

/// Whether `buf`, the start of a connection that the HTTP/1.1 parser
/// refused, can be (the start of) the HTTP/2 preface.
pub(super) fn may_be_preface(buf: &[u8]) -> bool {
    let n = buf.len().min(PREFACE.len());
    n > 0 && buf[..n] == PREFACE[..n]
}

/// Reads the rest of the preface into `pending`. Ok(false) on EOF.
pub(super) async fn read_preface(
    stream: &mut TcpStream,
    pending: &mut Vec<u8>,
) -> Result<bool, HeadError> {
    while pending.len() < PREFACE.len() {
        match stream.read_buf(pending).await {
            Ok(0) => return Ok(false),
            Ok(_) => {}
            Err(_) => return Err(HeadError::Io),
        }
    }
    if pending.starts_with(PREFACE) {
        Ok(true)
    } else {
        Err(HeadError::Malformed(
            "the request is neither HTTP/1.1 nor an HTTP/2 connection preface",
        ))
    }
}

/// Serves one h2c connection whose first bytes (the preface, maybe more)
/// are in `pending`, until the peer closes it, it has no open stream for
/// one to two `idle` intervals (the keep-alive timeout, from the loop), or
/// shutdown (a GOAWAY, then the streams end as they do on HTTP/1.1).
pub(super) async fn serve(
    app: Arc<App>,
    stream: TcpStream,
    pending: Vec<u8>,
    cancel: CancellationToken,
    info: ConnInfo,
    _permit: ConnectionPermit,
    idle: Duration,
) {
    let activity = Arc::new(Activity::default());
    let service = hyper::service::service_fn({
        let activity = activity.clone();
        move |mut req: Request<Incoming>| {
            let app = app.clone();
            let open = Activity::open(&activity);
            req.extensions_mut().insert(info);
            async move {
                let res = if req.body().is_end_stream() {
                    super::handle(app, req).await
                } else {
                    tokio::time::timeout(BODY_REQUEST_TIMEOUT, super::handle(app, req))
                        .await
                        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request body"))?
                };
                Ok::<_, io::Error>(res.map(|body| Tracked { body, _open: open }))
            }
        }
    });
    let io = Rewind {
        pre: Bytes::from(pending),
        inner: stream,
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEAD as u32)
        .max_send_buf_size(MAX_SEND_BUF);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = cancel.cancelled() => {}
        () = activity.idle(idle) => {}
    }
    // GOAWAY: no new streams; open ones end on `cancel` like any stream.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Open streams and a count of stream starts and ends, for the idle timeout.
#[derive(Default)]
struct Activity {
    open: AtomicUsize,
    changes: AtomicU64,
}

/// One open stream (request to the end of its response body).
struct Open(Arc<Activity>);

impl Activity {
    fn open(this: &Arc<Activity>) -> Open {
        this.open.fetch_add(1, Ordering::Relaxed);
        this.changes.fetch_add(1, Ordering::Relaxed);
        Open(this.clone())
    }

    /// Completes once a whole `interval` passed with no stream open and
    /// none opened or closed: one to two intervals after the last stream
    /// ended.
    async fn idle(&self, interval: Duration) {
        let mut seen = self.changes.load(Ordering::Relaxed);
        loop {
            tokio::time::sleep(interval).await;
            let now = self.changes.load(Ordering::Relaxed);
            if now == seen && self.open.load(Ordering::Relaxed) == 0 {
                return;
            }
            seen = now;
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.0.changes.fetch_add(1, Ordering::Relaxed);
    }
}

/// A response body that counts as an open stream until it is dropped.
struct Tracked {
    body: SseBody,
    _open: Open,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_recognised_from_its_first_byte() {
        assert!(may_be_preface(b"P"));
        assert!(may_be_preface(b"PRI * HTTP/2.0\r\n"));
        assert!(may_be_preface(PREFACE));
        assert!(may_be_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00"));
        assert!(!may_be_preface(b""));
        assert!(!may_be_preface(b"GET / HTTP/2.0\r\n"));
        assert!(!may_be_preface(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"));
    }
}
