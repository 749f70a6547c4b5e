//! The relay in this process, for tests that need no process boundary (no
//! exit code, signal, kill, process output or environment config): one
//! shard on a thread of its own with a current-thread runtime, as
//! `sse_relay::shards::serve` runs each shard, listening on 127.0.0.1:0.
//! No binary to spawn and no port to race for.
//!
//! Its tracing output goes to a buffer of its own (a subscriber set for
//! the shard's thread only, which runs every task of the shard), printed
//! when a test fails, as a child relay's stderr is.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use clap::Parser;
use sse_relay::config::{Cli, Command, Config};
use tokio_util::sync::CancellationToken;

use super::{RELAY_ENV, Relay, RelayHttp, tail, wait_readyz};

/// Bound for the relay to listen, and then to answer `/readyz` with 200.
const START_LIMIT: Duration = Duration::from_secs(15);
/// Bound for the shard to stop: its drain (`--drain-seconds`, 4 s by
/// default, plus 2 s), the NATS drain (2 s), and some slack.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// Variables of [`RELAY_ENV`] that the flags given here always override.
const OVERRIDDEN_ENV: &[&str] = &[
    "NATS_URL",
    "RELAY_LISTEN",
    "RELAY_JWT_SECRET",
    "RELAY_CREATE_STREAM",
    "RELAY_WORKERS",
];

/// One relay shard serving on a thread of this process; stopped (its
/// shutdown signal given, its thread joined within [`STOP_LIMIT`]) on drop.
pub struct InProcessRelay {
    addr: String,
    stop: CancellationToken,
    /// What `sse_relay::run` returned, sent as the thread ends.
    done: mpsc::Receiver<Result<(), String>>,
    /// How the shard ended, once it has.
    outcome: Option<String>,
    thread: Option<JoinHandle<()>>,
    log: LogBuffer,
}

impl InProcessRelay {
    /// Serves with the child relay's default flags
    /// ([`Relay::default_args`]) + `extra` on 127.0.0.1:0, and waits (15 s)
    /// until `GET /readyz` is 200.
    pub async fn start(nats_url: &str, extra: &[&str]) -> InProcessRelay {
        let cfg = config(nats_url, extra);
        let log = LogBuffer::default();
        let stop = CancellationToken::new();
        let (listening_tx, listening) = tokio::sync::oneshot::channel();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("relay-shard".to_string())
            .spawn({
                let log = log.clone();
                let stop = stop.clone();
                move || {
                    let _log = tracing::subscriber::set_default(log.subscriber());
                    let _ = done_tx.send(serve(cfg, stop, listening_tx));
                }
            })
            .expect("spawn the relay's thread");
        let mut relay = InProcessRelay {
            addr: String::new(),
            stop,
            done,
            outcome: None,
            thread: Some(thread),
            log,
        };
        match tokio::time::timeout(START_LIMIT, listening).await {
            Ok(Ok(addr)) => relay.addr = addr.to_string(),
            Ok(Err(_)) => {
                let why = relay.wait_ended(STOP_LIMIT).unwrap_or("it hangs");
                panic!("the relay did not listen: {why}");
            }
            Err(_) => panic!("the relay did not listen within {START_LIMIT:?}"),
        }
        let addr = relay.addr.clone();
        let ended = || relay.wait_ended(Duration::ZERO).map(str::to_string);
        if let Err(e) = wait_readyz(&addr, START_LIMIT, ended).await {
            panic!("in-process relay not ready: {e}");
        }
        relay
    }

    /// How the shard ended, waiting for it at most `limit`; None while it
    /// runs.
    fn wait_ended(&mut self, limit: Duration) -> Option<&str> {
        if self.outcome.is_none() {
            self.outcome = match self.done.recv_timeout(limit) {
                Ok(Ok(())) => Some("the relay stopped".to_string()),
                Ok(Err(e)) => Some(format!("the relay stopped: {e}")),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    Some("the relay's thread panicked".to_string())
                }
                Err(mpsc::RecvTimeoutError::Timeout) => None,
            };
        }
        self.outcome.as_deref()
    }
}

impl RelayHttp for InProcessRelay {
    fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for InProcessRelay {
    fn drop(&mut self) {
        self.stop.cancel();
        let ended = match self.wait_ended(STOP_LIMIT) {
            Some(why) => why.to_string(),
            None => format!("the relay did not stop within {STOP_LIMIT:?}"),
        };
        // A shard that did not stop in time is left running detached:
        // joining it could hang the test.
        if self.outcome.is_some()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- in-process relay on {} ({ended}) log (tail) ---\n{}\n--- end ---",
                self.addr,
                tail(&self.log.text(), 6000)
            );
        }
    }
}

/// The relay's config from `serve --listen 127.0.0.1:0` + the default
/// flags + `extra`. clap reads the relay's environment variables too, and
/// this process' environment cannot be cleared as a child's is: a variable
/// the flags do not override is refused.
fn config(nats_url: &str, extra: &[&str]) -> Config {
    let leaked: Vec<&str> = RELAY_ENV
        .iter()
        .copied()
        .filter(|v| !OVERRIDDEN_ENV.contains(v) && std::env::var_os(v).is_some())
        .collect();
    assert!(
        leaked.is_empty(),
        "the in-process relay would read {leaked:?} from the environment; unset them to run the tests"
    );
    let mut argv: Vec<String> = ["sse-relay", "serve", "--listen", "127.0.0.1:0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    argv.extend(Relay::default_args(nats_url));
    argv.extend(extra.iter().map(|s| s.to_string()));
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::Serve(args) = cli.command else {
        unreachable!("argv starts with `serve`")
    };
    Config::from_args(*args).unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

/// Runs one shard on a current-thread runtime of this thread until `stop`,
/// reporting its address once it listens.
fn serve(
    cfg: Config,
    stop: CancellationToken,
    listening: tokio::sync::oneshot::Sender<SocketAddr>,
) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        let listener = sse_relay::bind(&cfg).map_err(|e| format!("bind: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let _ = listening.send(addr);
        let shutdown = stop.cancelled_owned();
        sse_relay::run(listener, cfg, sse_relay::Shard::default(), shutdown)
            .await
            .map_err(|e| e.to_string())
    })
}

/// The relay's log lines, shared between its thread and the test.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    /// A subscriber writing the relay binary's default filter (`info`,
    /// async-nats at `warn`) into this buffer.
    fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync + 'static {
        let buffer = self.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info,async_nats=warn"))
            .with_ansi(false)
            .with_writer(move || buffer.clone())
            .finish()
    }

    fn text(&self) -> String {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
