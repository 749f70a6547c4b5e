//! The hub's [`Upstream`] on a real NATS connection: core subscriptions on
//! the stream's republish destination, JetStream for history.

use std::sync::Arc;

use async_nats::Subscriber;

use super::{CatchUpTopic, CaughtUp, History, HistoryError, Scope, Stored};
use crate::hub::Upstream;

#[derive(Clone)]
pub(crate) struct NatsUpstream {
    client: async_nats::Client,
    scope: Arc<Scope>,
    history: History,
}

impl NatsUpstream {
    pub(crate) fn new(client: async_nats::Client, scope: Arc<Scope>, history: History) -> Self {
        NatsUpstream {
            client,
            scope,
            history,
        }
    }
}

impl Upstream for NatsUpstream {
    type Live = Subscriber;

    async fn subscribe(&self, pattern: &str) -> Result<(Subscriber, Option<u64>), String> {
        let live = self
            .scope
            .live_subject(pattern)
            .ok_or_else(|| format!("{pattern:?} is not republished by the stream"))?;
        let sub = self
            .client
            .subscribe(live)
            .await
            .map_err(|e| e.to_string())?;
        // Once the server answers the flush it has the SUB: every event
        // republished from now on reaches this subscription.
        self.client.flush().await.map_err(|e| e.to_string())?;
        let covered = self.history.bounds().await.ok().map(|b| b.last);
        Ok((sub, covered))
    }

    async fn last_sequence(&self) -> Result<u64, HistoryError> {
        self.history.bounds().await.map(|b| b.last)
    }

    async fn read(&self, pattern: &str, after: u64, to: u64) -> Result<Vec<Stored>, HistoryError> {
        self.history.read(pattern, after, to).await
    }

    async fn catch_up<K: Copy + Send + Sync + 'static>(
        &self,
        topics: Vec<CatchUpTopic<K>>,
        limit: u64,
    ) -> CaughtUp<K> {
        self.history.catch_up(&self.client, &topics, limit).await
    }
}
