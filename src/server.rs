//! One shard: accept loop, NATS start-up, and graceful drain.
//!
//! The listener is bound before NATS answers, so a relay can boot before its
//! NATS and refuse transiently meanwhile. Shutdown is one
//! [`CancellationToken`]: it stops the accept loop, ends every stream (after
//! a `retry:` hint, since hyper's graceful shutdown alone would wait on
//! endless bodies forever), waits for connections with a deadline, and
//! drains NATS.

use std::future::Future;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::{App, Extension, Live};
use crate::auth::Verifier;
use crate::config::Config;
use crate::hub::{Hub, HubConfig};
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::nats::{self, Feed, History, Link, NatsUpstream, Scope, StreamError};

/// After the drain has closed every stream: time for their last bytes and
/// for replays still running to end.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// How long an unresponsive NATS gets to answer the final drain.
const NATS_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// A zero window for this long (a client that stopped reading, or a peer
/// that vanished) makes the kernel drop the connection.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why `run` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a shard: {0}")]
    Thread(std::io::Error),
    #[error("a shard panicked")]
    Panicked,
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("NATS: {0}")]
    Nats(String),
}

/// Binds `cfg.listen` for one shard (with SO_REUSEPORT when asked).
pub fn bind(cfg: &Config) -> std::io::Result<TcpListener> {
    TcpListener::from_std(bind_socket(cfg.listen, cfg.reuse_port)?)
}

/// A non-blocking listening socket on `addr`.
pub(crate) fn bind_socket(
    addr: std::net::SocketAddr,
    reuse_port: bool,
) -> std::io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Which shard of the process this is, what all shards share, and the
/// routes installed from outside (dev mode).
#[derive(Clone, Default)]
pub struct Shard {
    pub index: usize,
    pub metrics: Arc<Metrics>,
    pub extension: Option<Arc<dyn Extension>>,
    /// The process's limits; None: this shard counts alone, from the config.
    pub limits: Option<Arc<Limits>>,
}

/// Serves one shard on the current runtime until `shutdown` completes, then
/// drains. Returns an error when the stream cannot be served (missing, no
/// republish) so the process can exit. `cfg.workers` is not read here: the
/// process-wide launcher is [`crate::shards::serve`].
pub async fn run(
    listener: TcpListener,
    cfg: Config,
    shard: Shard,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let cfg = Arc::new(cfg);
    let verifier = Verifier::new(
        &cfg.key,
        cfg.jwt_audience.as_deref(),
        cfg.jwt_issuer.as_deref(),
        cfg.jwt_leeway,
    )
    .map_err(RunError::Config)?;
    let app = Arc::new(App {
        cfg: cfg.clone(),
        verifier,
        metrics: shard.metrics,
        live: OnceLock::new(),
        link: OnceLock::new(),
        draining: Default::default(),
        tasks: TaskTracker::new(),
        extension: shard.extension,
        limits: shard
            .limits
            .unwrap_or_else(|| Arc::new(Limits::new(cfg.limits.clone()))),
    });
    if let Some(jwks) = app.verifier.jwks() {
        // Loaded once for all shards (concurrent refreshes share a fetch).
        let jwks = jwks.clone();
        tokio::spawn(async move { jwks.refresh().await });
    }
    let cancel = CancellationToken::new();
    let (fatal_tx, mut fatal_rx) = tokio::sync::oneshot::channel::<RunError>();
    let startup = tokio::spawn(start_nats(
        app.clone(),
        shard.index,
        cancel.clone(),
        fatal_tx,
    ));

    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, shard = shard.index, "listening");
    }
    tokio::pin!(shutdown);
    let mut fatal = None;
    let mut accept_errors = AcceptErrors::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve_connection(&app, &cancel, stream, peer.ip()),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and
                    // say so once per burst rather than every 50 ms.
                    accept_errors.note(&e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
            err = &mut fatal_rx => {
                if let Ok(err) = err {
                    fatal = Some(err);
                }
                break;
            }
        }
    }
    drop(listener);
    tracing::info!("draining");
    app.draining.store(true, Ordering::Release);
    cancel.cancel();
    let _ = startup.await;
    // Streams end once the hub has closed their queues (it watches
    // `cancel`); idle keep-alive connections end on `cancel` directly;
    // replays end with their streams.
    app.tasks.close();
    if tokio::time::timeout(cfg.drain + DRAIN_GRACE, app.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing remaining connections");
    }
    if let Some(live) = app.live.get() {
        let _ = tokio::time::timeout(NATS_DRAIN_TIMEOUT, live.nats.drain()).await;
    }
    tracing::info!("stopped");
    match fatal {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn serve_connection(
    app: &Arc<App>,
    cancel: &CancellationToken,
    stream: TcpStream,
    peer: std::net::IpAddr,
) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    let permit = app.limits.connection();
    app.tasks.spawn(crate::http::conn::serve(
        app.clone(),
        stream,
        cancel.clone(),
        crate::http::conn::Peer { ip: peer, permit },
    ));
}

/// Accept failures (EMFILE when the process is out of files) come in bursts:
/// one warning per burst, with how many were suppressed.
#[derive(Default)]
struct AcceptErrors {
    last_warned: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl AcceptErrors {
    const QUIET: Duration = Duration::from_secs(10);

    fn note(&mut self, e: &std::io::Error) {
        let now = tokio::time::Instant::now();
        if self.last_warned.is_some_and(|at| now - at < Self::QUIET) {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(error = %e, suppressed = self.suppressed, "accept failed; backing off");
        self.last_warned = Some(now);
        self.suppressed = 0;
    }
}

/// Connects to NATS, loads the stream's scope, starts the hub, then keeps
/// the connection gauge. Transient failures are retried until shutdown; a
/// stream that cannot be served is fatal.
async fn start_nats(
    app: Arc<App>,
    shard: usize,
    cancel: CancellationToken,
    fatal: tokio::sync::oneshot::Sender<RunError>,
) {
    let cfg = app.cfg.clone();
    let (client, link) = match nats::connect(&cfg, shard).await {
        Ok(c) => c,
        Err(e) => {
            let _ = fatal.send(RunError::Nats(e));
            return;
        }
    };
    let _ = app.link.set(link.clone());
    // The live feed connects while the stream is read.
    let feed = match Feed::start(&cfg, shard, link.clone()) {
        Ok(f) => f,
        Err(e) => {
            let _ = fatal.send(RunError::Nats(e));
            return;
        }
    };
    let js = async_nats::jetstream::new(client.clone());
    let scope = match load_scope(&js, &cfg, &link, &cancel).await {
        Ok(Some(scope)) => Arc::new(scope),
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the stream");
            let _ = fatal.send(e.into());
            return;
        }
    };
    tracing::info!(stream = %scope.stream, subjects = ?scope.subjects, live = %scope.dest, mirror_of = ?scope.origin, shard, "stream ready");
    let history = History::new(js, &scope, app.metrics.clone());
    // Subscribed to before the hub starts: no election is missed.
    let events = link.subscribe();
    link.watch_stream(&feed, &scope.stream).await;
    let hub = Hub::start(
        NatsUpstream::new(feed, scope.clone(), history.clone()),
        HubConfig {
            heartbeat: cfg.heartbeat,
            client_queue: cfg.client_queue,
            retry_ms: cfg.retry_ms,
            replay_cache_bytes: cfg.replay_cache_bytes,
            replay_limit: cfg.replay_limit,
            drain: cfg.drain,
            max_stream_age: cfg.max_stream_age,
        },
        app.metrics.clone(),
        events,
        cancel.clone(),
    );
    let _ = app.live.set(Live {
        hub,
        scope,
        nats: client,
        history,
    });
    count_connection(&app.metrics, &link, &cancel).await;
}

/// Waits for the NATS connection and reads (or creates) the stream, with
/// backoff on transient failures. None when shutdown came first.
async fn load_scope(
    js: &async_nats::jetstream::Context,
    cfg: &Config,
    link: &Link,
    cancel: &CancellationToken,
) -> Result<Option<Scope>, StreamError> {
    let mut delay = Duration::from_millis(100);
    loop {
        // Wait for the connection itself rather than polling: a cold start
        // is served as soon as NATS answers.
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            () = link.connected() => {}
        }
        match nats::load_scope(js, &cfg.stream, cfg.create_stream).await {
            Ok(scope) => return Ok(Some(scope)),
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "stream not readable yet; retrying");
            }
            Err(e) => return Err(e),
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(None),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Keeps this shard's share of the `nats_connected` gauge (one per shard
/// whose two connections are up) until shutdown.
async fn count_connection(metrics: &Metrics, link: &Link, cancel: &CancellationToken) {
    let mut events = link.subscribe();
    let mut up = false;
    let mut set_up = |now: bool| {
        if now != up {
            up = now;
            metrics.nats_connected.inc_by(if now { 1 } else { -1 });
        }
    };
    set_up(link.is_connected());
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            ev = events.recv() => match ev {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    set_up(link.is_connected());
                }
                Err(_) => break,
            }
        }
    }
    set_up(false);
}
