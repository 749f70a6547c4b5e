//! One process on every core: `--workers` shards, each a single-threaded
//! tokio runtime on its own OS thread with its own listener on the shared
//! port (SO_REUSEPORT), its own hub, its own NATS connection and its share
//! of `--replay-cache-bytes`.
//!
//! Why shards and not one work-stealing runtime: a connection the hub has
//! just filled must be written before the hub runs again. With several
//! workers stealing tasks, a connection can wait behind a busy worker while
//! its queue fills and be dropped as slow without being slow (measured: the
//! interleaving test failed 1 run in 3 with two workers). A shard never hands
//! a connection to another thread; the kernel spreads new connections over
//! the shards' listeners (Envoy's and nginx's worker model). Nothing per
//! connection crosses threads; the shards share only the read-only config,
//! the JWT verifier's keys and the metric counters (`/metrics` on any shard
//! reports the sum over all of them).

use std::net::TcpListener;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::app::Extension;
use crate::config::Config;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::server::{RunError, Shard};

/// Runs `cfg.workers` shards until `stop` is cancelled (or one of them
/// fails, which stops the others), then returns once every shard drained.
/// Binding happens before any shard starts: a port in use is an error here,
/// not a half-started relay. `extension` adds routes to every shard.
/// `bound` is called with the address the shards listen on (the port
/// resolved when `--listen` asked for port 0) before any shard starts.
pub fn serve(
    cfg: Config,
    extension: Option<Arc<dyn Extension>>,
    stop: CancellationToken,
    bound: impl FnOnce(std::net::SocketAddr),
) -> Result<(), RunError> {
    let bind_error = |source| RunError::Bind {
        addr: cfg.listen,
        source,
    };
    let listeners = bind_all(&cfg).map_err(bind_error)?;
    let addr = listeners[0].local_addr().map_err(bind_error)?;
    bound(addr);
    let metrics = Arc::new(Metrics::default());
    let limits = Arc::new(Limits::new(cfg.limits.clone()));
    let mut shard_cfg = cfg;
    shard_cfg.replay_cache_bytes /= listeners.len() as u64;
    let mut threads = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.into_iter().enumerate() {
        let shard = Shard {
            index,
            metrics: metrics.clone(),
            extension: extension.clone(),
            limits: Some(limits.clone()),
        };
        let cfg = shard_cfg.clone();
        let stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("shard-{index}"))
            .spawn(move || run_shard(listener, cfg, shard, stop))
            .map_err(RunError::Thread)?;
        threads.push(thread);
    }
    let mut first_error = None;
    for t in threads {
        let result = t.join().unwrap_or(Err(RunError::Panicked));
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn run_shard(
    listener: TcpListener,
    cfg: Config,
    shard: Shard,
    stop: CancellationToken,
) -> Result<(), RunError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RunError::Thread)?;
    let result = rt.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(RunError::Thread)?;
        crate::server::run(listener, cfg, shard, stop.clone().cancelled_owned()).await
    });
    if result.is_err() {
        // A stream this relay cannot serve is fatal for every shard.
        stop.cancel();
    }
    result
}

/// One listener per shard on the same address. With more than one shard
/// they share the port through SO_REUSEPORT; unless `--reuse-port` asks to
/// share it with other processes too, the port is first checked to be free
/// (and port 0 resolved), so a second relay started by mistake fails to
/// bind instead of quietly taking half the connections.
pub fn bind_all(cfg: &Config) -> std::io::Result<Vec<TcpListener>> {
    let n = cfg.workers.max(1);
    let mut addr = cfg.listen;
    if n > 1 && !cfg.reuse_port {
        addr = crate::server::bind_socket(addr, false)?.local_addr()?;
    }
    let reuse_port = cfg.reuse_port || n > 1;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let l = crate::server::bind_socket(addr, reuse_port)?;
        // Port 0 resolved by the first bind: the others join that port.
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use clap::Parser;

    fn cfg(listen: &str, extra: &[&str]) -> Config {
        let mut argv = vec![
            "sse-relay",
            "serve",
            "--jwt-secret",
            "x",
            "--listen",
            listen,
        ];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => Config::from_args(*a).unwrap(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn every_shard_listens_on_the_same_port() {
        let ls = bind_all(&cfg("127.0.0.1:0", &["--workers", "3"])).unwrap();
        assert_eq!(ls.len(), 3);
        let port = ls[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }

    #[test]
    fn a_second_relay_cannot_take_the_port_without_reuse_port() {
        let first = bind_all(&cfg("127.0.0.1:0", &["--workers", "2"])).unwrap();
        let port = first[0].local_addr().unwrap().port();
        let listen = format!("127.0.0.1:{port}");
        assert!(bind_all(&cfg(&listen, &["--workers", "2"])).is_err());
        assert!(bind_all(&cfg(&listen, &["--workers", "1"])).is_err());
    }

    #[test]
    fn reuse_port_lets_several_processes_share() {
        let first = bind_all(&cfg("127.0.0.1:0", &["--workers", "2", "--reuse-port"])).unwrap();
        let port = first[0].local_addr().unwrap().port();
        let listen = format!("127.0.0.1:{port}");
        let second = bind_all(&cfg(&listen, &["--workers", "2", "--reuse-port"]));
        assert_eq!(second.unwrap().len(), 2);
    }
}
