//! The relay's NATS side: the connection (`link`), the stream's
//! [`Scope`], JetStream reads (`History`) and the hub's `NatsUpstream`.
//! Also the one place a NATS message becomes an SSE frame.

mod history;
mod link;
mod scope;
mod upstream;

use bytes::Bytes;

pub(crate) use history::{CatchUpTopic, CaughtUp, History, HistoryError, ResumePlan, Stored};
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

/// The stream sequence RePublish puts in `Nats-Sequence`. A message
/// without it was not republished by the stream and has no resumable id.
pub(crate) fn republished_sequence(msg: &async_nats::Message) -> Option<u64> {
    let seq = msg
        .headers
        .as_ref()?
        .get("Nats-Sequence")?
        .as_str()
        .parse()
        .ok();
    if seq.is_none() {
        tracing::warn!(subject = ?msg.subject.as_str(), "message without a valid Nats-Sequence ignored");
    }
    seq
}
