//! A client's side of a stream: its bounded queue and the response body
//! that drains it.

mod body;
mod queue;

pub use body::{Departure, LATENCY_SAMPLE, STREAM_LOG, SseBody, StreamLog};
pub use queue::{ClientQueue, EndReason, Offer};

/// One stream, as the hub knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
