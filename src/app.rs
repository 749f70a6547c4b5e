//! A shard's shared state: what every connection of the shard reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::{Method, Response};
use tokio_util::task::TaskTracker;

use crate::auth::Verifier;
use crate::client::SseBody;
use crate::config::Config;
use crate::error::ApiError;
use crate::hub::Hub;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::nats::{History, Link, Scope};

pub struct App {
    pub(crate) cfg: Arc<Config>,
    pub(crate) verifier: Verifier,
    pub(crate) metrics: Arc<Metrics>,
    /// Set once NATS answered and the stream's scope is known.
    pub(crate) live: OnceLock<Live>,
    pub(crate) link: OnceLock<Arc<Link>>,
    pub(crate) draining: AtomicBool,
    /// Connections and the tasks they start (JetStream replays): the drain
    /// waits for all of them.
    pub(crate) tasks: TaskTracker,
    /// Routes installed from outside (`sse-relay dev`).
    pub(crate) extension: Option<Arc<dyn Extension>>,
    pub(crate) limits: Arc<Limits>,
}

/// The NATS-backed half of the shard, available once the stream is loaded.
pub struct Live {
    pub(crate) hub: Arc<Hub>,
    pub scope: Arc<Scope>,
    pub nats: async_nats::Client,
    pub(crate) history: History,
}

/// Routes added to the relay from outside, e.g. dev mode's demo page and
/// publish endpoint: `serve` never has any.
pub trait Extension: Send + Sync + 'static {
    /// Whether `path` is one of this extension's routes, and the methods it
    /// takes there as an `Allow` header value (`"GET"`, `"GET, POST"`).
    fn allows(&self, path: &str) -> Option<&'static str>;

    /// Answers a request to one of its routes; `body` is at most
    /// [`crate::MAX_EXTENSION_BODY`] bytes.
    fn call(
        &self,
        app: Arc<App>,
        method: Method,
        path: String,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Response<SseBody>, ApiError>>;
}

impl App {
    /// Ready for streams: NATS connected, the stream loaded, not draining.
    pub(crate) fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self.live.get().is_some()
            && self.link.get().is_some_and(|l| l.is_connected())
    }

    /// The NATS half, or the transient refusal that says why it is away.
    pub fn live(&self) -> Result<&Live, ApiError> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the relay is shutting down"));
        }
        let live = self.live.get().ok_or(ApiError::Unavailable(
            "the relay is not connected to NATS yet",
        ))?;
        if !self.link.get().is_some_and(|l| l.is_connected()) {
            return Err(ApiError::Unavailable("NATS is unreachable"));
        }
        Ok(live)
    }
}
