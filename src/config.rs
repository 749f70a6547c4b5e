//! One typed [`Config`], parsed from flags and environment variables and
//! validated before anything binds. Secrets never appear in `Debug` output.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::KeySource;

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_STREAM: &str = "EVENTS";
pub const DEFAULT_JWT_LEEWAY_SECS: u64 = 5;
pub const DEFAULT_HEARTBEAT_SECS: u64 = 15;
pub const DEFAULT_RETRY_MS: u64 = 2000;
pub const DEFAULT_CLIENT_QUEUE: usize = 1024;
pub const DEFAULT_REPLAY_CACHE_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_REPLAY_LIMIT: u64 = 100_000;
/// Inside Fly's default 5 s kill timeout (and Kubernetes' 30 s grace).
pub const DEFAULT_DRAIN_SECS: u64 = 4;

/// Most shards one process runs; more is a typo, not a machine.
pub const MAX_WORKERS: usize = 1024;

/// One shard per CPU the process may run on (1 if that cannot be read).
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub const DEFAULT_MAX_SUBJECTS: usize = 32;
pub const DEFAULT_JWKS_REFRESH_SECS: u64 = 300;
const MAX_SUBJECTS_LIMIT: usize = 256;

/// Sockets kept free below the open-file limit for NATS, logs and the
/// listener, so the relay refuses cleanly before the kernel does.
fn default_max_connections() -> usize {
    let limit = open_file_limit().unwrap_or(1024);
    limit.saturating_sub((limit / 10).max(64)).max(1)
}

/// The soft limit on open files (`Max open files` in /proc/self/limits).
pub fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// `None` stays off; `Some(0)` is a mistake worth a sentence.
fn positive(v: Option<usize>, flag: &str) -> Result<Option<usize>, String> {
    match v {
        Some(0) => Err(format!(
            "{flag} must be at least 1 (leave it unset for no limit)"
        )),
        v => Ok(v),
    }
}

/// Exit code for a configuration error (EX_USAGE from sysexits.h).
pub const EXIT_CONFIG: i32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "sse-relay",
    version,
    about = "Server-Sent Events relay for NATS JetStream"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the relay.
    Serve(Box<ServeArgs>),
    /// Run a local nats-server (found on PATH) and the relay with a demo page.
    Dev(DevArgs),
    /// Print a signed HS256 token for development and tests.
    Token(TokenArgs),
    /// Check a running relay (for container health checks): exit 0 when
    /// GET /healthz on --listen, or --url, answers 2xx; else 1 and why.
    Health(crate::health::HealthArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "RELAY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// NATS server URLs (comma-separated seeds); `user:pass@` or `token@`
    /// in a URL signs both connections in.
    #[arg(long, env = "NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub nats_url: String,
    /// NATS credentials file.
    #[arg(long, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// JetStream stream holding the events.
    #[arg(long, env = "RELAY_STREAM", default_value = DEFAULT_STREAM)]
    pub stream: String,
    /// Create the stream (on `events.>`, republished to `relay.events.>`) if missing.
    #[arg(long, env = "RELAY_CREATE_STREAM")]
    pub create_stream: bool,
    /// HMAC secret for HS256/384/512 tokens.
    #[arg(long, env = "RELAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key file for RS*/PS*/ES256/ES384/EdDSA tokens.
    #[arg(long, env = "RELAY_JWT_PUBLIC_KEY")]
    pub jwt_public_key: Option<PathBuf>,
    /// JWKS URL the token keys are fetched from (https://; http:// only on
    /// loopback). Tokens name their key by `kid`.
    #[arg(long, env = "RELAY_JWKS_URL")]
    pub jwks_url: Option<String>,
    /// Seconds between refreshes of the JWKS (a `kid` it lacks also
    /// refreshes it, at most once a second).
    #[arg(long, env = "RELAY_JWKS_REFRESH", default_value_t = DEFAULT_JWKS_REFRESH_SECS)]
    pub jwks_refresh: u64,
    /// Required `aud` claim.
    #[arg(long, env = "RELAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim.
    #[arg(long, env = "RELAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Clock leeway for `exp`, in seconds.
    #[arg(long, env = "RELAY_JWT_LEEWAY", default_value_t = DEFAULT_JWT_LEEWAY_SECS)]
    pub jwt_leeway: u64,
    /// Seconds between heartbeat comments on idle streams.
    #[arg(long, env = "RELAY_HEARTBEAT", default_value_t = DEFAULT_HEARTBEAT_SECS)]
    pub heartbeat: u64,
    /// Reconnect delay suggested to clients (`retry:`), in milliseconds.
    #[arg(long, env = "RELAY_RETRY_MS", default_value_t = DEFAULT_RETRY_MS)]
    pub retry_ms: u64,
    /// Frames queued per client before it counts as slow and is disconnected.
    #[arg(long, env = "RELAY_CLIENT_QUEUE", default_value_t = DEFAULT_CLIENT_QUEUE)]
    pub client_queue: usize,
    /// Origins allowed to open cross-origin streams (comma-separated, or `*`).
    #[arg(long, env = "RELAY_CORS_ORIGINS")]
    pub cors_origins: Option<String>,
    /// Bytes of recent events kept in memory to serve resumes.
    #[arg(long, env = "RELAY_REPLAY_CACHE_BYTES", default_value_t = DEFAULT_REPLAY_CACHE_BYTES)]
    pub replay_cache_bytes: u64,
    /// Most events one resume replays; older ones are reported as a gap.
    #[arg(long, env = "RELAY_REPLAY_LIMIT", default_value_t = DEFAULT_REPLAY_LIMIT)]
    pub replay_limit: u64,
    /// Seconds over which shutdown (SIGTERM/SIGINT) spreads the closing of
    /// streams, each with a jittered `retry:`, so clients come back to other
    /// machines gradually; 0 closes them all at once.
    #[arg(long, env = "RELAY_DRAIN_SECONDS", default_value_t = DEFAULT_DRAIN_SECS)]
    pub drain_seconds: u64,
    /// End streams older than this (plus up to 10% at random) with a
    /// `retry:`, so load rebalances after scale-out; clients resume by
    /// Last-Event-ID and lose nothing. E.g. 30m, 6h. [default: off]
    #[arg(long, env = "RELAY_MAX_STREAM_AGE", value_parser = parse_duration)]
    pub max_stream_age: Option<Duration>,
    /// Set SO_REUSEPORT so several relay processes can share the port.
    #[arg(long, env = "RELAY_REUSE_PORT")]
    pub reuse_port: bool,
    /// Shards: each a single-threaded event loop on its own thread, with its
    /// own listener on the port, NATS connection and share of
    /// --replay-cache-bytes. [default: the number of available CPUs]
    #[arg(long, env = "RELAY_WORKERS")]
    pub workers: Option<usize>,
    /// Most subjects one stream may ask for.
    #[arg(long, env = "RELAY_MAX_SUBJECTS", default_value_t = DEFAULT_MAX_SUBJECTS)]
    pub max_subjects: usize,
    /// Open connections per process; beyond it requests are refused (503,
    /// or 200 + retry for an EventSource) so an edge proxy tries another
    /// machine. [default: the open-file limit minus 10% headroom]
    #[arg(long, env = "RELAY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Concurrent streams per client IP (429 beyond); off when unset. Behind
    /// a proxy set --client-ip-header too.
    #[arg(long, env = "RELAY_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// New streams per second per client IP (429 beyond); off when unset.
    #[arg(long, env = "RELAY_CONNECT_RATE_PER_IP")]
    pub connect_rate_per_ip: Option<u32>,
    /// Header holding the client IP set by a trusted edge proxy (e.g.
    /// Fly-Client-IP); only safe when every request comes through it.
    #[arg(long, env = "RELAY_CLIENT_IP_HEADER")]
    pub client_ip_header: Option<String>,
    /// Concurrent streams per token (its `sub`, or the token itself when it
    /// has none); off when unset.
    #[arg(long, env = "RELAY_MAX_STREAMS_PER_TOKEN")]
    pub max_streams_per_token: Option<usize>,
    /// Accept the token in the `token=` query parameter (URLs end up in
    /// proxy and CDN logs; turn off when browsers use the cookie).
    #[arg(long, env = "RELAY_QUERY_TOKEN", default_value_t = true, action = clap::ArgAction::Set)]
    pub query_token: bool,
    /// Log lines as text or as one JSON object each.
    #[arg(long, env = "RELAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Address to listen on (loopback unless --allow-remote). Dev mode reads
    /// no environment variables: a shell with production settings exported
    /// must not get an unauthenticated publish endpoint on production.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Use this NATS server instead of starting one (only when given here).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Listen on a non-loopback address: `POST /dev/publish` needs no token.
    #[arg(long)]
    pub allow_remote: bool,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// HMAC secret (same as the relay's RELAY_JWT_SECRET).
    #[arg(long, env = "RELAY_JWT_SECRET", hide_env_values = true)]
    pub secret: String,
    /// Subject patterns to grant for reading (repeatable or comma-separated).
    #[arg(long, required_unless_present = "publish", value_delimiter = ',')]
    pub subjects: Vec<String>,
    /// Subject patterns to grant for `POST /publish/` (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub publish: Vec<String>,
    /// Lifetime, e.g. 90s, 15m, 1h, 7d.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: Duration,
    /// The `sub` claim.
    #[arg(long)]
    pub sub: Option<String>,
}

/// Which origins may read streams cross-origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cors {
    Off,
    /// `*`: any origin, never with credentials.
    Any,
    /// Exact origins, with credentials.
    List(Vec<String>),
}

/// A user and password, or a token, given in `--nats-url`
/// (`nats://user:pass@host`, `nats://token@host`); both NATS connections
/// send it. Its secret is not in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub enum NatsUrlAuth {
    UserPassword { user: String, password: String },
    Token(String),
}

impl std::fmt::Debug for NatsUrlAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NatsUrlAuth::UserPassword { user, .. } => {
                write!(f, "UserPassword {{ user: {user:?}, password: <redacted> }}")
            }
            NatsUrlAuth::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

/// `url` without its user info, and what the user info says.
fn split_user_info(url: &str) -> (String, Option<NatsUrlAuth>) {
    let (scheme, rest) = match url.find("://") {
        Some(i) => url.split_at(i + 3),
        None => ("", url),
    };
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    let Some(at) = authority.rfind('@') else {
        return (url.to_owned(), None);
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let info = &rest[..at];
    let auth = match info.split_once(':') {
        Some((user, password)) => NatsUrlAuth::UserPassword {
            user: decode(user),
            password: decode(password),
        },
        None => NatsUrlAuth::Token(decode(info)),
    };
    (format!("{scheme}{}", &rest[at + 1..]), Some(auth))
}

/// The validated relay configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The seeds, without user info.
    pub nats_urls: Vec<String>,
    /// The user info of the seeds that carry one (all the same).
    pub nats_url_auth: Option<NatsUrlAuth>,
    pub nats_creds: Option<PathBuf>,
    pub stream: String,
    pub create_stream: bool,
    pub key: KeySource,
    pub jwt_audience: Option<String>,
    pub jwt_issuer: Option<String>,
    pub jwt_leeway: Duration,
    pub heartbeat: Duration,
    pub retry_ms: u64,
    pub client_queue: usize,
    pub cors: Cors,
    pub replay_cache_bytes: u64,
    pub replay_limit: u64,
    pub drain: Duration,
    pub max_stream_age: Option<Duration>,
    pub reuse_port: bool,
    /// Shards to run (at least 1).
    pub workers: usize,
    pub max_subjects: usize,
    pub limits: LimitsConfig,
    pub query_token: bool,
    pub log_format: LogFormat,
}

/// Abuse limits (see `limits.rs`); `None` is off.
#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub per_ip: Option<usize>,
    pub rate_per_ip: Option<std::num::NonZeroU32>,
    pub client_ip_header: Option<hyper::header::HeaderName>,
    pub per_token: Option<usize>,
}

impl Config {
    /// Validates parsed arguments; the error is a sentence for the operator.
    pub fn from_args(a: ServeArgs) -> Result<Config, String> {
        let listen: SocketAddr = a.listen.parse().map_err(|_| {
            format!(
                "--listen {:?} is not an address like 0.0.0.0:8080",
                a.listen
            )
        })?;
        let (nats_urls, auths): (Vec<String>, Vec<Option<NatsUrlAuth>>) = a
            .nats_url
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(split_user_info)
            .unzip();
        if nats_urls.is_empty() {
            return Err("--nats-url / NATS_URL is empty".into());
        }
        let mut auths = auths.into_iter().flatten();
        let nats_url_auth = auths.next();
        if auths.any(|other| Some(&other) != nats_url_auth.as_ref()) {
            return Err(
                "--nats-url: the seeds carry different user info; give the same on each".into(),
            );
        }
        let key = match (a.jwt_secret, a.jwt_public_key, a.jwks_url) {
            (Some(s), None, None) if s.is_empty() => return Err("--jwt-secret is empty".into()),
            (Some(s), None, None) => KeySource::Secret(s.into_bytes()),
            (None, Some(path), None) => KeySource::PublicKeyPem(
                std::fs::read(&path)
                    .map_err(|e| format!("cannot read --jwt-public-key {}: {e}", path.display()))?,
            ),
            (None, None, Some(url)) => KeySource::Jwks(std::sync::Arc::new(
                crate::auth::Jwks::new(&url, Duration::from_secs(a.jwks_refresh))?,
            )),
            (None, None, None) => {
                return Err(
                    "no JWT key: set --jwt-secret / RELAY_JWT_SECRET, --jwt-public-key / RELAY_JWT_PUBLIC_KEY or --jwks-url / RELAY_JWKS_URL"
                        .into(),
                );
            }
            _ => {
                return Err("set only one of --jwt-secret, --jwt-public-key and --jwks-url".into());
            }
        };
        if a.heartbeat == 0 {
            return Err("--heartbeat must be at least 1 second".into());
        }
        if a.client_queue == 0 {
            return Err("--client-queue must be at least 1".into());
        }
        if !(1..=MAX_SUBJECTS_LIMIT).contains(&a.max_subjects) {
            return Err(format!(
                "--max-subjects {} is out of range: use 1 to {MAX_SUBJECTS_LIMIT}",
                a.max_subjects
            ));
        }
        let limits = LimitsConfig {
            max_connections: match a.max_connections {
                Some(0) => return Err("--max-connections must be at least 1".into()),
                Some(n) => n,
                None => default_max_connections(),
            },
            per_ip: positive(a.max_connections_per_ip, "--max-connections-per-ip")?,
            rate_per_ip: match a.connect_rate_per_ip {
                Some(0) => return Err("--connect-rate-per-ip must be at least 1".into()),
                r => r.and_then(std::num::NonZeroU32::new),
            },
            client_ip_header: match a.client_ip_header.as_deref().map(str::trim) {
                None | Some("") => None,
                Some(h) => Some(
                    h.parse()
                        .map_err(|_| format!("--client-ip-header {h:?} is not a header name"))?,
                ),
            },
            per_token: positive(a.max_streams_per_token, "--max-streams-per-token")?,
        };
        let workers = a.workers.unwrap_or_else(default_workers);
        if !(1..=MAX_WORKERS).contains(&workers) {
            return Err(format!(
                "--workers {workers} is out of range: use 1 to {MAX_WORKERS} (default: one per CPU)"
            ));
        }
        if a.stream.is_empty() || a.stream.contains(['.', '*', '>', ' ']) {
            return Err(format!(
                "--stream {:?} is not a valid stream name",
                a.stream
            ));
        }
        Ok(Config {
            listen,
            nats_urls,
            nats_url_auth,
            nats_creds: a.nats_creds,
            stream: a.stream,
            create_stream: a.create_stream,
            key,
            jwt_audience: a.jwt_audience.filter(|s| !s.is_empty()),
            jwt_issuer: a.jwt_issuer.filter(|s| !s.is_empty()),
            jwt_leeway: Duration::from_secs(a.jwt_leeway),
            heartbeat: Duration::from_secs(a.heartbeat),
            retry_ms: a.retry_ms,
            client_queue: a.client_queue,
            cors: parse_cors(a.cors_origins.as_deref())?,
            replay_cache_bytes: a.replay_cache_bytes,
            replay_limit: a.replay_limit,
            drain: Duration::from_secs(a.drain_seconds),
            max_stream_age: a.max_stream_age.filter(|d| !d.is_zero()),
            reuse_port: a.reuse_port,
            workers,
            max_subjects: a.max_subjects,
            limits,
            query_token: a.query_token,
            log_format: a.log_format,
        })
    }
}

fn parse_cors(s: Option<&str>) -> Result<Cors, String> {
    let Some(s) = s.map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(Cors::Off);
    };
    if s == "*" {
        return Ok(Cors::Any);
    }
    let mut list = Vec::new();
    for o in s.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if o == "*" {
            return Err("--cors-origins: `*` cannot be combined with other origins".into());
        }
        if !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/') {
            return Err(format!(
                "--cors-origins: {o:?} is not an origin like https://app.example.com"
            ));
        }
        list.push(o.to_string());
    }
    Ok(Cors::List(list))
}

/// Parses `90`, `90s`, `15m`, `1h`, `7d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90s, 15m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?} is not a duration like 90s, 15m, 1h or 7d")),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["sse-relay", "serve", "--jwt-secret", "x"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_validate() {
        let c = Config::from_args(args(&[])).unwrap();
        assert_eq!(c.listen.port(), 8080);
        assert_eq!(c.heartbeat, Duration::from_secs(15));
        assert_eq!(c.cors, Cors::Off);
        assert_eq!(c.workers, default_workers());
        assert_eq!(c.replay_cache_bytes, DEFAULT_REPLAY_CACHE_BYTES);
    }

    #[test]
    fn limits_default_off_except_connections_and_subjects() {
        let c = Config::from_args(args(&[])).unwrap();
        assert_eq!(c.max_subjects, 32);
        assert!(c.query_token);
        let l = &c.limits;
        assert!(l.per_ip.is_none() && l.rate_per_ip.is_none() && l.per_token.is_none());
        assert!(l.client_ip_header.is_none());
        let files = open_file_limit().expect("Linux has /proc/self/limits");
        assert!(
            l.max_connections < files,
            "{} vs {files}",
            l.max_connections
        );
        assert!(l.max_connections >= files / 2);
    }

    #[test]
    fn jwks_url_with_its_default_refresh() {
        let argv = [
            "sse-relay",
            "serve",
            "--jwks-url",
            "https://keys.example/jwks.json",
        ];
        let Command::Serve(a) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!()
        };
        let c = Config::from_args(*a).unwrap();
        let KeySource::Jwks(j) = &c.key else {
            panic!("{:?}", c.key)
        };
        assert_eq!(j.refresh_interval(), Duration::from_secs(300));
        assert!(
            Config::from_args(args(&["--jwks-url", "https://k.example/j"])).is_err(),
            "with a secret too"
        );
    }

    #[test]
    fn limits_from_flags() {
        let c = Config::from_args(args(&[
            "--max-connections-per-ip",
            "3",
            "--connect-rate-per-ip",
            "5",
            "--client-ip-header",
            "Fly-Client-IP",
            "--max-streams-per-token",
            "7",
            "--max-connections",
            "100",
            "--query-token",
            "false",
        ]))
        .unwrap();
        assert_eq!(c.limits.per_ip, Some(3));
        assert_eq!(c.limits.rate_per_ip.map(|r| r.get()), Some(5));
        assert_eq!(
            c.limits.client_ip_header.as_ref().unwrap().as_str(),
            "fly-client-ip"
        );
        assert_eq!(c.limits.per_token, Some(7));
        assert_eq!(c.limits.max_connections, 100);
        assert!(!c.query_token);
        for bad in [
            ["--max-connections-per-ip", "0"],
            ["--max-subjects", "0"],
            ["--client-ip-header", "bad header"],
            ["--max-connections", "0"],
        ] {
            assert!(Config::from_args(args(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn workers_from_flag_and_bounds() {
        assert_eq!(
            Config::from_args(args(&["--workers", "3"]))
                .unwrap()
                .workers,
            3
        );
        assert!(Config::from_args(args(&["--workers", "0"])).is_err());
        assert!(Config::from_args(args(&["--workers", "100000"])).is_err());
    }

    #[test]
    fn splits_nats_seeds() {
        let c = Config::from_args(args(&["--nats-url", "nats://a:1, nats://b:2"])).unwrap();
        assert_eq!(c.nats_urls, vec!["nats://a:1", "nats://b:2"]);
        assert_eq!(c.nats_url_auth, None);
    }

    #[test]
    fn user_info_in_nats_urls_is_taken_out_and_kept_out_of_debug() {
        let c = Config::from_args(args(&[
            "--nats-url",
            "nats://alice:s%40pw9x@a:1,b:2,tls://alice:s%40pw9x@c:3",
        ]))
        .unwrap();
        assert_eq!(c.nats_urls, vec!["nats://a:1", "b:2", "tls://c:3"]);
        assert_eq!(
            c.nats_url_auth,
            Some(NatsUrlAuth::UserPassword {
                user: "alice".into(),
                password: "s@pw9x".into()
            })
        );
        let shown = format!("{c:?}");
        assert!(
            shown.contains("alice") && !shown.contains("pw9x"),
            "{shown}"
        );
        let t = Config::from_args(args(&["--nats-url", "t0ken@a:1"])).unwrap();
        assert_eq!(t.nats_url_auth, Some(NatsUrlAuth::Token("t0ken".into())));
        assert!(!format!("{t:?}").contains("t0ken"));
        assert!(
            Config::from_args(args(&["--nats-url", "nats://a:x@h:1,nats://b:y@h:2"])).is_err(),
            "different user info on two seeds"
        );
    }

    #[test]
    fn rejects_bad_values_with_a_sentence() {
        assert!(Config::from_args(args(&["--listen", "nope"])).is_err());
        assert!(Config::from_args(args(&["--heartbeat", "0"])).is_err());
        assert!(Config::from_args(args(&["--cors-origins", "*,https://a.b"])).is_err());
        assert!(Config::from_args(args(&["--cors-origins", "app.example"])).is_err());
    }

    #[test]
    fn parses_cors_lists() {
        let c = Config::from_args(args(&["--cors-origins", "https://a.example,http://b:3000"]))
            .unwrap();
        assert_eq!(
            c.cors,
            Cors::List(vec!["https://a.example".into(), "http://b:3000".into()])
        );
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(604800));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
