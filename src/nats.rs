//! The relay's NATS side: one connection per process, and the [`Scope`] read
//! from the stream's config (what clients may ask for, where live copies of
//! events are republished).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use tokio::sync::broadcast;

use crate::config::Config;
use crate::subject;

/// Ping often enough that a silently dead server is noticed in seconds, not
/// the minutes async-nats' 60 s default would take.
const PING_INTERVAL: Duration = Duration::from_secs(5);

/// The stream a relay serves and how its events reach the live path.
#[derive(Debug, Clone)]
pub struct Scope {
    pub stream: String,
    /// The stream's subjects: clients may only ask for patterns inside these.
    pub subjects: Vec<String>,
    /// RePublish source and destination (`events.>` -> `relay.events.>`).
    pub src: String,
    pub dest: String,
}

/// Why a stream cannot be served; the message tells the operator the fix.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "stream {0} does not exist: create it with `nats stream add --config nats/stream.json` or start the relay with --create-stream"
    )]
    Missing(String),
    #[error(
        "stream {0} has no republish: the relay needs live copies of events, e.g. `\"republish\": {{\"src\": \"events.>\", \"dest\": \"relay.events.>\"}}` (see nats/stream.json)"
    )]
    NoRepublish(String),
    #[error(
        "stream {0} republishes headers only; the relay needs payloads (set headers_only to false)"
    )]
    HeadersOnly(String),
    #[error(
        "stream {stream}: republish {src} -> {dest} must map a fixed prefix with the same wildcard tail, e.g. events.> -> relay.events.>"
    )]
    BadRepublish {
        stream: String,
        src: String,
        dest: String,
    },
    #[error("NATS request failed: {0}")]
    Nats(String),
}

impl StreamError {
    /// Errors worth retrying (NATS away, JetStream electing a leader).
    pub fn is_transient(&self) -> bool {
        matches!(self, StreamError::Nats(_))
    }
}

impl Scope {
    fn from_config(cfg: &stream::Config) -> Result<Scope, StreamError> {
        let Some(rp) = &cfg.republish else {
            return Err(StreamError::NoRepublish(cfg.name.clone()));
        };
        if rp.headers_only {
            return Err(StreamError::HeadersOnly(cfg.name.clone()));
        }
        let bad = || StreamError::BadRepublish {
            stream: cfg.name.clone(),
            src: rp.source.clone(),
            dest: rp.destination.clone(),
        };
        if subject::map_prefix(&rp.source, &rp.source, &rp.destination).is_none() {
            return Err(bad());
        }
        Ok(Scope {
            stream: cfg.name.clone(),
            subjects: cfg.subjects.clone(),
            src: rp.source.clone(),
            dest: rp.destination.clone(),
        })
    }

    /// Is `pattern` something this stream stores and republishes?
    pub fn covers(&self, pattern: &str) -> bool {
        self.subjects.iter().any(|s| subject::contains(s, pattern))
            && subject::contains(&self.src, pattern)
    }

    /// The subject the relay subscribes to for live events of `pattern`.
    pub fn live_subject(&self, pattern: &str) -> Option<String> {
        subject::map_prefix(pattern, &self.src, &self.dest)
    }
}

/// Connection state shared with routes (readiness) and the hub (catch-up).
#[derive(Debug)]
pub struct Link {
    connected: AtomicBool,
    /// Wakes whoever waits for the first (or next) connection.
    up: tokio::sync::Notify,
    events: broadcast::Sender<LinkEvent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    Connected,
    Disconnected,
    /// async-nats dropped messages for a subscription (its buffer was full).
    SlowConsumer,
}

impl Link {
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LinkEvent> {
        self.events.subscribe()
    }

    /// Resolves once the connection is up.
    pub async fn connected(&self) {
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
pub async fn connect(
    cfg: &Config,
    shard: usize,
) -> Result<(async_nats::Client, Arc<Link>), String> {
    let (events, _) = broadcast::channel(64);
    let link = Arc::new(Link {
        connected: AtomicBool::new(false),
        up: tokio::sync::Notify::new(),
        events,
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
                        tracing::info!("nats connected");
                        LinkEvent::Connected
                    }
                    async_nats::Event::Disconnected => {
                        link.connected.store(false, Ordering::Release);
                        tracing::warn!("nats disconnected");
                        LinkEvent::Disconnected
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "nats slow consumer: messages dropped");
                        LinkEvent::SlowConsumer
                    }
                    other => {
                        tracing::info!(event = %other, "nats event");
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

/// The default stream `--create-stream` makes.
pub fn default_stream_config(name: &str) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec!["events.>".into()],
        max_age: Duration::from_secs(24 * 3600),
        allow_direct: true,
        republish: Some(stream::Republish {
            source: "events.>".into(),
            destination: "relay.events.>".into(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Reads (or creates) the stream and returns its [`Scope`].
pub async fn load_scope(
    js: &jetstream::Context,
    name: &str,
    create: bool,
) -> Result<Scope, StreamError> {
    let cfg = match js.get_stream(name).await {
        Ok(mut s) => s
            .info()
            .await
            .map_err(|e| StreamError::Nats(e.to_string()))?
            .config
            .clone(),
        Err(e) => {
            let missing = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if !missing {
                return Err(StreamError::Nats(e.to_string()));
            }
            if !create {
                return Err(StreamError::Missing(name.to_string()));
            }
            tracing::info!(stream = name, "creating stream");
            js.create_stream(default_stream_config(name))
                .await
                .map_err(|e| StreamError::Nats(e.to_string()))?
                .cached_info()
                .config
                .clone()
        }
    };
    Scope::from_config(&cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_maps_patterns_to_the_republish_destination() {
        let scope = Scope::from_config(&default_stream_config("EVENTS")).unwrap();
        assert!(scope.covers("events.orders.*"));
        assert!(!scope.covers("other.x"));
        assert!(!scope.covers(">"));
        assert_eq!(
            scope.live_subject("events.orders.*").as_deref(),
            Some("relay.events.orders.*")
        );
    }

    #[test]
    fn first_connection_attempt_is_immediate_then_backs_off() {
        let ms = |a| reconnect_delay(a).as_millis();
        assert_eq!((ms(0), ms(1), ms(2), ms(3), ms(4)), (0, 0, 100, 200, 400));
        assert_eq!(ms(50), 2000);
    }

    #[test]
    fn scope_requires_a_payload_republish() {
        let mut cfg = default_stream_config("EVENTS");
        cfg.republish = None;
        assert!(matches!(
            Scope::from_config(&cfg),
            Err(StreamError::NoRepublish(_))
        ));
        let mut cfg = default_stream_config("EVENTS");
        cfg.republish.as_mut().unwrap().headers_only = true;
        assert!(matches!(
            Scope::from_config(&cfg),
            Err(StreamError::HeadersOnly(_))
        ));
    }
}
