//! What the hub needs from NATS, as a trait ([`Upstream`]): the live feed
//! (one subscription per pattern) and the stream's history; and
//! [`NatsUpstream`], the trait on real connections (the live feed's
//! subscriptions on the stream's republish destination, JetStream for
//! history). The hub's
//! unit tests implement it with a fake that publishes synthetic events
//! under paused time.

use std::future::Future;
use std::sync::Arc;

use futures_util::Stream;

use super::feed::{Feed, FeedSub};
use super::{Bounds, CatchUpTopic, CaughtUp, History, HistoryError, LiveMessage, Scope, Stored};

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

    /// Does `pattern` take every event the stream stores? Then the live
    /// sequences on its subscription are consecutive.
    fn dense(&self, pattern: &str) -> bool;

    /// The stream's last sequence.
    /// (`reaching`: the id the caller wants to know exists.)
    fn last_sequence(
        &self,
        reaching: u64,
    ) -> impl Future<Output = Result<u64, HistoryError>> + Send;

    /// The stream's bounds and creation time (which tells a recreated
    /// stream from the one the hub has been serving).
    fn bounds(&self) -> impl Future<Output = Result<Bounds, HistoryError>> + Send;

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

#[derive(Clone)]
pub(crate) struct NatsUpstream {
    feed: Feed,
    scope: Arc<Scope>,
    history: History,
}

impl NatsUpstream {
    pub(crate) fn new(feed: Feed, scope: Arc<Scope>, history: History) -> Self {
        NatsUpstream {
            feed,
            scope,
            history,
        }
    }
}

impl Upstream for NatsUpstream {
    type Live = FeedSub;

    async fn subscribe(&self, pattern: &str) -> Result<(FeedSub, Option<u64>), String> {
        let live = self
            .scope
            .live_subject(pattern)
            .ok_or_else(|| format!("{pattern:?} is not republished by the stream"))?;
        let sub = self.feed.subscribe(&live).map_err(|e| e.to_string())?;
        // Answered once the stream's leader has the SUB: every event it
        // stores after this last sequence reaches the subscription. If the
        // stream does not answer, a flush still says the server has it.
        let covered = match self.history.last_via(&self.feed).await {
            Ok(last) => Some(last),
            Err(_) => {
                self.feed.flush().await.map_err(|e| e.to_string())?;
                None
            }
        };
        // A refusal (permissions) came before the answer.
        if let Some(why) = sub.refused() {
            return Err(format!("NATS refused the subscription to {live}: {why}"));
        }
        Ok((sub, covered))
    }

    fn dense(&self, pattern: &str) -> bool {
        self.scope.is_dense(pattern)
    }

    async fn last_sequence(&self, reaching: u64) -> Result<u64, HistoryError> {
        self.history.last_sequence(reaching).await
    }

    async fn bounds(&self) -> Result<Bounds, HistoryError> {
        self.history.bounds().await
    }

    async fn read(&self, pattern: &str, after: u64, to: u64) -> Result<Vec<Stored>, HistoryError> {
        self.history.read(pattern, after, to).await
    }

    async fn catch_up<K: Copy + Send + Sync + 'static>(
        &self,
        topics: Vec<CatchUpTopic<K>>,
        limit: u64,
    ) -> CaughtUp<K> {
        self.history.catch_up(&self.feed, &topics, limit).await
    }
}
