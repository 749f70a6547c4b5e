//! The response body of every `/events` response: a fixed body (refusals)
//! or a live stream that drains one client's [`ClientQueue`], coalescing
//! whatever is queued into one chunk per poll, so a burst costs one write
//! per client rather than one per event.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use super::{ClientId, ClientQueue};
use crate::limits::StreamPermit;

/// Called when a streaming body is dropped (the client went away or the
/// stream ended), so the hub can forget the client.
pub trait Departure: Send + Sync + 'static {
    fn depart(&self, client: ClientId);
}

/// The response body of every `/events` response.
pub struct SseBody {
    kind: BodyKind,
}

enum BodyKind {
    /// A fixed body (errors, transient refusals).
    Full(Option<Bytes>),
    /// A live stream fed by the hub.
    Stream {
        queue: Arc<ClientQueue>,
        client: ClientId,
        hub: Arc<dyn Departure>,
        done: bool,
        /// The stream's place under the per-IP and per-token limits, given
        /// back when the body is dropped.
        _permit: Option<Box<StreamPermit>>,
    },
}

impl SseBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let b: Bytes = bytes.into();
        SseBody {
            kind: BodyKind::Full(if b.is_empty() { None } else { Some(b) }),
        }
    }

    pub fn empty() -> Self {
        SseBody {
            kind: BodyKind::Full(None),
        }
    }

    pub(crate) fn stream(
        queue: Arc<ClientQueue>,
        client: ClientId,
        hub: Arc<dyn Departure>,
        permit: Option<Box<StreamPermit>>,
    ) -> Self {
        SseBody {
            kind: BodyKind::Stream {
                queue,
                client,
                hub,
                done: false,
                _permit: permit,
            },
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.get_mut().kind {
            BodyKind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            BodyKind::Stream { queue, done, .. } => {
                if *done {
                    return Poll::Ready(None);
                }
                match queue.poll_chunk(cx) {
                    Poll::Ready(Some(chunk)) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                    Poll::Ready(None) => {
                        *done = true;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Full(b) => b.is_none(),
            BodyKind::Stream { done, .. } => *done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            BodyKind::Full(None) => SizeHint::with_exact(0),
            BodyKind::Stream { .. } => SizeHint::default(),
        }
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        if let BodyKind::Stream { client, hub, .. } = &self.kind {
            hub.depart(*client);
        }
    }
}
