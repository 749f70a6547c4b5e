//! The `sse-relay` binary: parse, set up tracing, bind, hand over to `run`.

use std::process::ExitCode;

use clap::Parser;
use std::sync::Arc;

use sse_relay::app::Extension;
use sse_relay::config::{Cli, Command, Config, EXIT_CONFIG, LogFormat, ServeArgs};
use sse_relay::dev::{DEMO_SUBJECT, DevRoutes, NatsServer, NatsServerOptions};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_CONFIG as u8),
            };
        }
    };
    match cli.command {
        Command::Token(t) => {
            let patterns = |v: Vec<String>| -> Vec<String> {
                v.into_iter()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            };
            let (subjects, publish) = (patterns(t.subjects), patterns(t.publish));
            match sse_relay::auth::sign_hs256_grants(
                t.secret.as_bytes(),
                subjects,
                publish,
                t.ttl,
                t.sub,
            ) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: cannot sign the token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve(args) => match Config::from_args(*args) {
            Ok(cfg) => serve(cfg, None),
            Err(msg) => config_error(&msg),
        },
        Command::Dev(args) => dev(args),
        Command::Health(args) => health(&args),
    }
}

/// `sse-relay health`: one line on stdout when healthy, on stderr when not.
fn health(args: &sse_relay::health::HealthArgs) -> ExitCode {
    use sse_relay::health::{Target, check_blocking};
    let target = match Target::from_args(args) {
        Ok(t) => t,
        Err(msg) => return config_error(&msg),
    };
    match check_blocking(&target, std::time::Duration::from_secs(args.timeout)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("unhealthy: {why}");
            ExitCode::FAILURE
        }
    }
}

fn config_error(msg: &str) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(EXIT_CONFIG as u8)
}

/// `RUST_LOG` (default `info`), with async-nats' per-message debug lines
/// kept out unless `RUST_LOG` names async_nats itself.
fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let mut filter = tracing_subscriber::EnvFilter::new(&rust_log);
    if !rust_log.contains("async_nats") {
        filter = filter.add_directive("async_nats=warn".parse().expect("a valid directive"));
    }
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr (a supervisor gone, a pipe cut) must not take the
        // relay down: the default reports a failed write with eprintln!,
        // which panics on that same stderr, in whatever thread logged (the
        // signal thread included, and SIGTERM would then be ignored).
        .log_internal_errors(false)
        // Colour codes only for a person at a terminal, never into files.
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
}

fn serve(cfg: Config, extension: Option<Arc<dyn Extension>>) -> ExitCode {
    init_tracing(cfg.log_format);
    match watch_signals() {
        Ok(stop) => serve_until(cfg, extension, stop, |_| {}),
        Err(code) => code,
    }
}

fn serve_until(
    cfg: Config,
    extension: Option<Arc<dyn Extension>>,
    stop: CancellationToken,
    bound: impl FnOnce(std::net::SocketAddr),
) -> ExitCode {
    match sse_relay::shards::serve(cfg, extension, stop, bound) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A token that SIGTERM (Kubernetes, Docker) or SIGINT (Ctrl-C, Fly.io's
/// default) cancels. The handlers are installed before this returns, on a
/// small runtime of their own, so no shard carries them.
fn watch_signals() -> Result<CancellationToken, ExitCode> {
    let stop = CancellationToken::new();
    install_signal_handlers(stop.clone()).map_err(|e| {
        eprintln!("error: cannot watch for SIGTERM/SIGINT: {e}");
        ExitCode::FAILURE
    })?;
    Ok(stop)
}

fn install_signal_handlers(stop: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = {
        let _guard = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                    _ = int.recv() => tracing::info!("SIGINT: shutting down"),
                    () = stop.cancelled() => {}
                }
            });
            stop.cancel();
        })?;
    Ok(())
}

fn dev(args: sse_relay::config::DevArgs) -> ExitCode {
    let loopback = args
        .listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback());
    if !loopback && !args.allow_remote {
        return config_error(&format!(
            "dev mode listens on loopback only (its publish endpoint needs no token): --listen {:?} needs --allow-remote",
            args.listen
        ));
    }
    let secret = format!("dev-{:x}", std::process::id() as u64 * 0x9E37_79B9 + 0x7F4A);
    let (nats, url) = match &args.nats_url {
        Some(url) => (None, url.clone()),
        None => match NatsServer::start(NatsServerOptions::default()) {
            Ok(n) => {
                let url = n.url();
                (Some(n), url)
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let serve_args = ServeArgs {
        listen: args.listen,
        nats_url: url.clone(),
        nats_creds: None,
        stream: sse_relay::config::DEFAULT_STREAM.into(),
        create_stream: true,
        jwt_secret: Some(secret.clone()),
        jwt_public_key: None,
        jwks_url: None,
        jwks_refresh: sse_relay::config::DEFAULT_JWKS_REFRESH_SECS,
        jwt_audience: None,
        jwt_issuer: None,
        jwt_leeway: sse_relay::config::DEFAULT_JWT_LEEWAY_SECS,
        heartbeat: sse_relay::config::DEFAULT_HEARTBEAT_SECS,
        retry_ms: sse_relay::config::DEFAULT_RETRY_MS,
        client_queue: sse_relay::config::DEFAULT_CLIENT_QUEUE,
        cors_origins: None,
        replay_cache_bytes: sse_relay::config::DEFAULT_REPLAY_CACHE_BYTES,
        replay_limit: sse_relay::config::DEFAULT_REPLAY_LIMIT,
        drain_seconds: sse_relay::config::DEFAULT_DRAIN_SECS,
        max_stream_age: None,
        reuse_port: false,
        workers: Some(1),
        max_subjects: sse_relay::config::DEFAULT_MAX_SUBJECTS,
        max_connections: None,
        max_connections_per_ip: None,
        connect_rate_per_ip: None,
        client_ip_header: None,
        max_streams_per_token: None,
        query_token: true,
        log_format: LogFormat::Text,
    };
    let cfg = match Config::from_args(serve_args) {
        Ok(c) => c,
        Err(msg) => return config_error(&msg),
    };
    let token = match sse_relay::auth::sign_hs256(
        secret.as_bytes(),
        vec!["events.>".into()],
        std::time::Duration::from_secs(24 * 3600),
        Some("dev".into()),
    ) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: cannot sign the dev token: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Before the banner: whoever reads it may stop dev mode right away.
    init_tracing(LogFormat::Text);
    let stop = match watch_signals() {
        Ok(stop) => stop,
        Err(code) => return code,
    };
    let routes: Arc<dyn Extension> = Arc::new(DevRoutes::new(&token));
    // The banner names the address bound (`--listen 127.0.0.1:0` picks a port).
    let banner = |addr: std::net::SocketAddr| {
        println!("sse-relay dev");
        println!("  NATS:      {url}");
        println!("  demo page: http://{addr}/");
        println!("  token (events.>, 24h): {token}");
        println!(
            "  stream:    curl -N -H \"Authorization: Bearer {token}\" \"http://{addr}/events?subject={DEMO_SUBJECT}\""
        );
        println!("  publish:   nats --server {url} pub {DEMO_SUBJECT} '{{\"hello\":\"world\"}}'");
    };
    let code = serve_until(cfg, Some(routes), stop, banner);
    drop(nats);
    code
}
