//! What the hub needs from NATS, as a trait: the live feed (one
//! subscription per pattern) and the stream's history. Production uses
//! [`crate::nats::NatsUpstream`]; the hub's unit tests drive it with a fake
//! that publishes synthetic events under paused time.

use std::future::Future;

use futures_util::Stream;

use crate::nats::{CatchUpTopic, CaughtUp, HistoryError, Stored};

/// A live message: async-nats' type, so the hot path converts nothing.
/// The stream sequence is in its `Nats-Sequence` header (RePublish).
pub(crate) type LiveMessage = async_nats::Message;

pub(crate) trait Upstream: Clone + Send + Sync + 'static {
    type Live: Stream<Item = LiveMessage> + Unpin + Send + 'static;

    /// Subscribes to the live copies of `pattern`'s events and resolves once
    /// the server has the subscription, so every event stored from then on
    /// reaches it. Also returns the stream's last sequence read after that
    /// point, when it could be read: the subscription sees everything above.
    fn subscribe(
        &self,
        pattern: &str,
    ) -> impl Future<Output = Result<(Self::Live, Option<u64>), String>> + Send;

    /// The stream's last sequence.
    fn last_sequence(&self) -> impl Future<Output = Result<u64, HistoryError>> + Send;

    /// Every stored event of `pattern` in `(after, to]`, in order; an error
    /// unless the whole range is still stored.
    fn read(
        &self,
        pattern: &str,
        after: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<Stored>, HistoryError>> + Send;

    /// For every topic, the stored events after its `after` up to the
    /// stream's end once the live subscriptions are active again; topics
    /// with more than `limit` (0: no limit) events missing are returned as
    /// truncated. Retries until it succeeds.
    fn catch_up<K: Copy + Send + Sync + 'static>(
        &self,
        topics: Vec<CatchUpTopic<K>>,
        limit: u64,
    ) -> impl Future<Output = CaughtUp<K>> + Send;
}
