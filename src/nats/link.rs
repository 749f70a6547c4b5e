//! The relay's NATS connection (one per shard): every seed, 5 s pings,
//! reconnects forever, and [`LinkEvent`]s for readiness and catch-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::config::Config;

/// Ping often enough that a silently dead server is noticed in seconds, not
/// the minutes async-nats' 60 s default would take.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// Connection state shared with routes (readiness) and the hub (catch-up).
#[derive(Debug)]
pub(crate) struct Link {
    connected: AtomicBool,
    /// Wakes whoever waits for the first (or next) connection.
    up: tokio::sync::Notify,
    events: broadcast::Sender<LinkEvent>,
    /// The client, once made: its server info names the server in logs.
    client: std::sync::OnceLock<async_nats::Client>,
    /// The server last connected to, for the line that says it was lost.
    server: std::sync::Mutex<String>,
}

/// What happened to the connection, for whoever keeps the live path whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LinkEvent {
    Connected,
    /// Whatever NATS sends until the next `Connected` is lost to live.
    Disconnected,
    /// async-nats dropped messages for a subscription (its buffer was full).
    SlowConsumer,
    /// The stream has a new leader. Only the leader republishes, so events
    /// its predecessor stored just before dying may never have been.
    StreamLeaderElected,
    /// A stream of this name was created (perhaps after being deleted: its
    /// sequences may have restarted).
    StreamCreated,
}

impl Link {
    pub(crate) fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<LinkEvent> {
        self.events.subscribe()
    }

    /// Forwards the stream's leader-election and creation advisories as
    /// [`LinkEvent`]s, for as long as the client lives.
    pub(crate) async fn watch_stream(self: &Arc<Self>, client: &async_nats::Client, stream: &str) {
        let advisories = [
            ("LEADER_ELECTED", LinkEvent::StreamLeaderElected),
            ("CREATED", LinkEvent::StreamCreated),
        ];
        for (kind, event) in advisories {
            self.forward(
                client,
                format!("$JS.EVENT.ADVISORY.STREAM.{kind}.{stream}"),
                event,
            )
            .await;
        }
    }

    async fn forward(
        self: &Arc<Self>,
        client: &async_nats::Client,
        subject: String,
        event: LinkEvent,
    ) {
        use futures_util::StreamExt;
        let mut advisories = match client.subscribe(subject).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch stream advisories");
                return;
            }
        };
        let link = self.clone();
        tokio::spawn(async move {
            while advisories.next().await.is_some() {
                let _ = link.events.send(event);
            }
        });
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

    /// Resolves once the connection is up.
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
    let (events, _) = broadcast::channel(64);
    let link = Arc::new(Link {
        connected: AtomicBool::new(false),
        up: tokio::sync::Notify::new(),
        events,
        client: std::sync::OnceLock::new(),
        server: std::sync::Mutex::new(cfg.nats_urls.join(",")),
    });
    let cb_link = link.clone();
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("sse-relay/{shard}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .ping_interval(PING_INTERVAL)
        .connection_timeout(Duration::from_secs(3))
        .request_timeout(Some(Duration::from_secs(5)))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let link = cb_link.clone();
            async move {
                let ev = match event {
                    async_nats::Event::Connected => {
                        link.connected.store(true, Ordering::Release);
                        link.up.notify_waiters();
                        let server = link.server_name();
                        tracing::info!(%server, shard, "nats connected");
                        LinkEvent::Connected
                    }
                    async_nats::Event::Disconnected => {
                        link.connected.store(false, Ordering::Release);
                        let server = link.server.lock().map(|s| s.clone()).unwrap_or_default();
                        tracing::warn!(%server, shard, "nats disconnected; reconnecting in the background");
                        LinkEvent::Disconnected
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "nats slow consumer: messages dropped");
                        LinkEvent::SlowConsumer
                    }
                    other => {
                        tracing::info!(event = %other, shard, "nats event");
                        return;
                    }
                };
                let _ = link.events.send(ev);
            }
        });
    if let Some(path) = &cfg.nats_creds {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| format!("cannot read NATS credentials {}: {e}", path.display()))?;
    }
    let addrs: Vec<async_nats::ServerAddr> = cfg
        .nats_urls
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

/// Delay before connection attempt `attempt` (async-nats counts from 1):
/// the first is immediate (a cold start is served as soon as NATS answers),
/// then 100, 200, 400 ms ... up to 2 s, so a restarted server is picked up
/// quickly without being hammered.
fn reconnect_delay(attempt: usize) -> Duration {
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
    fn first_connection_attempt_is_immediate_then_backs_off() {
        let ms = |a| reconnect_delay(a).as_millis();
        assert_eq!((ms(0), ms(1), ms(2), ms(3), ms(4)), (0, 0, 100, 200, 400));
        assert_eq!(ms(50), 2000);
    }
}
