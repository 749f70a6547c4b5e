//! The relay's NATS side: the connection (`link`), the stream's
//! [`Scope`], JetStream reads (`History`) and the hub's `NatsUpstream`.
//! Also the one place a NATS message becomes an SSE frame.

mod history;
mod link;
mod scope;
mod upstream;

use bytes::Bytes;

pub(crate) use history::{
    Bounds, CatchUpTopic, CaughtUp, History, HistoryError, ResumePlan, Stored,
};
pub(crate) use link::{Link, LinkEvent, connect};
pub use scope::{Scope, default_stream_config};
pub(crate) use scope::{StreamError, load_scope};
pub(crate) use upstream::{LiveMessage, NatsUpstream, Upstream};

/// The header a publisher sets to name the SSE event (`event:` line).
pub const EVENT_HEADER: &str = "Sse-Event";

/// Encodes a stored or republished message as its SSE frame: `id:` is the
/// stream sequence, `event:` the `Sse-Event` header when set.
pub(crate) fn event_frame(seq: u64, msg: &async_nats::Message) -> Bytes {
    let event = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(EVENT_HEADER))
        .map(|v| v.as_str())
        .filter(|s| !s.is_empty());
    crate::sse::encode_event(seq, event, &msg.payload)
}

/// What RePublish says of a live message: its stream sequence
/// (`Nats-Sequence`) and the sequence of the previous message stored on the
/// same subject (`Nats-Last-Sequence`; 0 when there was none). A message
/// without a valid `Nats-Sequence` was not republished by the stream and
/// has no resumable id.
pub(crate) fn republished(msg: &async_nats::Message) -> Option<(u64, u64)> {
    let headers = msg.headers.as_ref()?;
    let seq = headers.get("Nats-Sequence")?.as_str().parse().ok();
    let Some(seq) = seq else {
        tracing::warn!(subject = ?msg.subject.as_str(), "message without a valid Nats-Sequence ignored");
        return None;
    };
    let previous = headers
        .get("Nats-Last-Sequence")
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0);
    Some((seq, previous))
}
