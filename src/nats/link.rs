//! The relay's NATS connections (two per shard): the request connection
//! (async-nats: JetStream reads, publishes) and the live feed
//! (`feed`: subscriptions). Every seed, 5 s pings, reconnects forever, and
//! [`LinkEvent`]s for readiness and catch-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::{Config, NatsUrlAuth};

/// Ping often enough that a silently dead server is noticed in seconds, not
/// the minutes async-nats' 60 s default would take.
pub(super) const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Connection state shared with routes (readiness) and the hub (catch-up).
#[derive(Debug)]
pub(crate) struct Link {
    /// The request connection is up.
    requests: AtomicBool,
    /// The live feed's connection is up, its subscriptions re-sent.
    feed: AtomicBool,
    /// Wakes whoever waits for the first (or next) connection.
    up: tokio::sync::Notify,
    events: broadcast::Sender<LinkEvent>,
    /// The client, once made: its server info names the server in logs.
    client: std::sync::OnceLock<async_nats::Client>,
    /// The server last connected to, for the line that says it was lost.
    server: std::sync::Mutex<String>,
    /// The seeds in the order both connections try them.
    seeds: Vec<String>,
}

/// What happened to the connection, for whoever keeps the live path whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    /// The live feed is connected (again), every subscription re-sent.
    Connected,
    /// The live feed's connection is lost: whatever NATS sends until the
    /// next `Connected` is lost to live.
    Disconnected,
    /// The request connection came up or went down ([`Link::is_connected`]).
    Requests,
    /// The feed dropped messages for a subscription (its queue was full).
    SlowConsumer,
    /// The stream has a new leader. Only the leader republishes, so events
    /// its predecessor stored just before dying may never have been.
    StreamLeaderElected,
    /// A stream of this name was created (perhaps after being deleted: its
    /// sequences may have restarted).
    StreamCreated,
}

impl Link {
    /// Both connections down, the seeds in their order for this shard.
    pub(super) fn new(urls: &[String]) -> Arc<Link> {
        let (events, _) = broadcast::channel(64);
        Arc::new(Link {
            requests: AtomicBool::new(false),
            feed: AtomicBool::new(false),
            up: tokio::sync::Notify::new(),
            events,
            client: std::sync::OnceLock::new(),
            server: std::sync::Mutex::new(urls.join(",")),
            seeds: rotated(urls),
        })
    }

    /// Both connections are up: streams can be served.
    pub(crate) fn is_connected(&self) -> bool {
        self.requests.load(Ordering::Acquire) && self.feed.load(Ordering::Acquire)
    }

    pub(crate) fn send(&self, event: LinkEvent) {
        let _ = self.events.send(event);
    }

    /// The live feed's connection to `server` is up (subscriptions re-sent)
    /// or lost.
    pub(super) fn set_feed(&self, up: bool, server: &str, shard: usize) {
        if self.feed.swap(up, Ordering::AcqRel) == up {
            return;
        }
        if up {
            self.up.notify_waiters();
            tracing::info!(%server, shard, "nats live feed connected");
            self.send(LinkEvent::Connected);
        } else {
            self.send(LinkEvent::Disconnected);
        }
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<LinkEvent> {
        self.events.subscribe()
    }

    /// Forwards the stream's leader-election and creation advisories as
    /// [`LinkEvent`]s, on the live feed (so that a lost advisory comes with
    /// the feed's `Disconnected`, which starts a catch-up anyway).
    pub(crate) async fn watch_stream(&self, feed: &super::Feed, stream: &str) {
        let advisories = [
            ("LEADER_ELECTED", LinkEvent::StreamLeaderElected),
            ("CREATED", LinkEvent::StreamCreated),
        ];
        for (kind, event) in advisories {
            let subject = format!("$JS.EVENT.ADVISORY.STREAM.{kind}.{stream}");
            if let Err(e) = feed.watch(&subject, event).await {
                tracing::warn!(error = %e, "cannot watch stream advisories");
            }
        }
    }

    /// `name (host:port)` of the server the client is connected to, noted
    /// for the line that says when it is lost; the configured URLs before
    /// the client exists.
    fn server_name(&self) -> String {
        let mut last = self.server.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = self.client.get() {
            let info = c.server_info();
            *last = format!("{} ({}:{})", info.server_name, info.host, info.port);
        }
        last.clone()
    }

    /// The seeds, in the order both connections try them: the configured
    /// order from a starting point random per shard, so that relays spread
    /// over a cluster's seeds while a shard's two connections start on the
    /// same server (each reconnect starts from the first again, so they
    /// usually meet again after a loss; nothing depends on it).
    pub(crate) fn seeds(&self) -> &[String] {
        &self.seeds
    }

    /// Resolves once both connections are up.
    pub(crate) async fn connected(&self) {
        loop {
            let notified = self.up.notified();
            if self.is_connected() {
                return;
            }
            notified.await;
        }
    }
}

/// Connects in the background: returns at once, and the client keeps trying
/// (and reconnecting) for as long as the process runs.
/// `shard` names the connection (`sse-relay/0`) in the server's monitoring.
pub(crate) async fn connect(
    cfg: &Config,
    shard: usize,
) -> Result<(async_nats::Client, Arc<Link>), String> {
    let link = Link::new(&cfg.nats_urls);
    let cb_link = link.clone();
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("sse-relay/{shard}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .ping_interval(PING_INTERVAL)
        .retain_servers_order()
        .connection_timeout(Duration::from_secs(3))
        .request_timeout(Some(Duration::from_secs(5)))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let link = cb_link.clone();
            async move {
                let ev = match event {
                    async_nats::Event::Connected => {
                        link.requests.store(true, Ordering::Release);
                        link.up.notify_waiters();
                        let server = link.server_name();
                        tracing::info!(%server, shard, "nats connected");
                        LinkEvent::Requests
                    }
                    async_nats::Event::Disconnected => {
                        link.requests.store(false, Ordering::Release);
                        let server = link.server.lock().map(|s| s.clone()).unwrap_or_default();
                        tracing::warn!(%server, shard, "nats disconnected; reconnecting in the background");
                        LinkEvent::Requests
                    }
                    other => {
                        tracing::info!(event = %other, shard, "nats event");
                        return;
                    }
                };
                let _ = link.events.send(ev);
            }
        });
    match &cfg.nats_url_auth {
        Some(NatsUrlAuth::UserPassword { user, password }) => {
            opts = opts.user_and_password(user.clone(), password.clone());
        }
        Some(NatsUrlAuth::Token(token)) => opts = opts.token(token.clone()),
        None => {}
    }
    if let Some(path) = &cfg.nats_creds {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| format!("cannot read NATS credentials {}: {e}", path.display()))?;
    }
    let addrs: Vec<async_nats::ServerAddr> = link
        .seeds
        .iter()
        .map(|u| {
            u.parse()
                .map_err(|e| format!("--nats-url {u:?} is not a NATS URL: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let client = opts
        .connect(addrs)
        .await
        .map_err(|e| format!("cannot start the NATS client: {e}"))?;
    let _ = link.client.set(client.clone());
    Ok((client, link))
}

/// A random number (std's per-process random hash keys), for the seeds'
/// starting point and the feed's inbox: nothing that needs a CSPRNG.
pub(super) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// `urls` from a random starting point onwards, wrapping around.
fn rotated(urls: &[String]) -> Vec<String> {
    let mut urls = urls.to_vec();
    if !urls.is_empty() {
        let start = (random_u64() % urls.len() as u64) as usize;
        urls.rotate_left(start);
    }
    urls
}

/// Delay before connection attempt `attempt` (async-nats counts from 1):
/// the first is immediate (a cold start is served as soon as NATS answers),
/// then 100, 200, 400 ms ... up to 2 s, so a restarted server is picked up
/// quickly without being hammered.
pub(super) fn reconnect_delay(attempt: usize) -> Duration {
    if attempt <= 1 {
        return Duration::ZERO;
    }
    let exp = (attempt - 2).min(5) as u32;
    Duration::from_millis((100u64 << exp).min(2000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_keep_their_order_from_a_random_start() {
        let urls: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let mut starts = std::collections::HashSet::new();
        for _ in 0..200 {
            let r = rotated(&urls);
            let at = urls.iter().position(|u| *u == r[0]).unwrap();
            let mut back = r.clone();
            back.rotate_right(at);
            assert_eq!(back, urls, "a rotation of the configured order");
            starts.insert(at);
        }
        assert_eq!(starts.len(), 3, "every seed comes first sometimes");
        assert!(rotated(&[]).is_empty());
    }

    #[test]
    fn first_connection_attempt_is_immediate_then_backs_off() {
        let ms = |a| reconnect_delay(a).as_millis();
        assert_eq!((ms(0), ms(1), ms(2), ms(3), ms(4)), (0, 0, 100, 200, 400));
        assert_eq!(ms(50), 2000);
    }
}
