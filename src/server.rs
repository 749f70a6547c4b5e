//! Accept loop, NATS start-up, and graceful drain.
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

use crate::auth::Verifier;
use crate::config::Config;
use crate::hub::{Hub, HubConfig};
use crate::metrics::Metrics;
use crate::nats::{self, StreamError};
use crate::replay::Replayer;
use crate::routes::{App, Live};

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
    TcpListener::from_std(crate::shards::bind_one(cfg.listen, cfg.reuse_port)?)
}

/// Which shard of the process this is, and the metrics all shards share.
pub struct Shard {
    pub index: usize,
    pub metrics: Arc<Metrics>,
}

/// Serves one shard on the current runtime until `shutdown` completes, then
/// drains. Returns an error when the stream cannot be served (missing, no
/// republish) so the process can exit. `cfg.workers` is not read here: the
/// process-wide launcher is [`crate::shards::serve`].
pub async fn run(
    listener: TcpListener,
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RunError> {
    let shard = Shard {
        index: 0,
        metrics: Arc::new(Metrics::default()),
    };
    run_shard(listener, Arc::new(cfg), shard, shutdown).await
}

pub(crate) async fn run_shard(
    listener: TcpListener,
    cfg: Arc<Config>,
    shard: Shard,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let verifier = Verifier::new(
        &cfg.key,
        cfg.jwt_audience.as_deref(),
        cfg.jwt_issuer.as_deref(),
        cfg.jwt_leeway,
    )
    .map_err(RunError::Config)?;
    let metrics = shard.metrics;
    let demo_page = cfg.dev.as_ref().map(crate::dev::demo_page);
    let app = Arc::new(App {
        cfg: cfg.clone(),
        verifier,
        metrics: metrics.clone(),
        live: OnceLock::new(),
        link: OnceLock::new(),
        draining: Default::default(),
        demo_page,
    });
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
    let tracker = TaskTracker::new();
    tokio::pin!(shutdown);
    let mut fatal = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => serve_connection(&app, &tracker, &cancel, stream),
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
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
    // `cancel`); idle keep-alive connections end on `cancel` directly.
    tracker.close();
    if tokio::time::timeout(cfg.drain_timeout, tracker.wait())
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
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    stream: TcpStream,
) {
    let _ = stream.set_nodelay(true);
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    tracker.spawn(crate::http1::serve(app.clone(), stream, cancel.clone()));
}

/// Connects to NATS, loads the stream's scope and starts the hub. Transient
/// failures are retried until shutdown; a stream that cannot be served is
/// fatal.
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
    let js = async_nats::jetstream::new(client.clone());
    let mut delay = Duration::from_millis(100);
    let scope = loop {
        // Wait for the connection itself rather than polling: a cold start
        // is served as soon as NATS answers.
        tokio::select! {
            () = cancel.cancelled() => return,
            () = link.connected() => {}
        }
        match nats::load_scope(&js, &cfg.stream, cfg.create_stream).await {
            Ok(scope) => break scope,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "stream not readable yet; retrying");
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot serve the stream");
                let _ = fatal.send(e.into());
                return;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    };
    tracing::info!(stream = %scope.stream, subjects = ?scope.subjects, live = %scope.dest, "stream ready");
    // One gauge for every shard: each adds its own connection while it is up.
    let mut up = false;
    let mut set_up = |now: bool| {
        if now != up {
            up = now;
            app.metrics.nats_connected.inc_by(if now { 1 } else { -1 });
        }
    };
    set_up(link.is_connected());
    let replayer = Replayer {
        js: js.clone(),
        stream: scope.stream.clone(),
        limit: cfg.replay_limit,
        retry_ms: cfg.retry_ms,
        metrics: app.metrics.clone(),
    };
    // Only the stream leader republishes; a new leader means events stored
    // just before the old one died may never have been republished.
    let advisories = client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}",
            scope.stream
        ))
        .await
        .map_err(|e| tracing::warn!(error = %e, "cannot watch stream leader changes"))
        .ok();
    let hub = Hub::start(
        client.clone(),
        Arc::new(scope.clone()),
        HubConfig {
            heartbeat: cfg.heartbeat,
            client_queue: cfg.client_queue,
            retry_ms: cfg.retry_ms,
            replay_cache_bytes: cfg.replay_cache_bytes,
        },
        replayer.clone(),
        link.subscribe(),
        advisories,
        cancel.clone(),
    );
    let _ = app.live.set(Live {
        hub,
        scope: Arc::new(scope),
        nats: client,
        replayer,
    });
    let mut events = link.subscribe();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            ev = events.recv() => match ev {
                Ok(nats::LinkEvent::Connected) => set_up(true),
                Ok(nats::LinkEvent::Disconnected) => set_up(false),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    }
    set_up(false);
}
