//! The relay binary (`CARGO_BIN_EXE_sse-relay`) as a child process: run
//! to completion (`run_relay`) or serving on a fresh port (`Relay`, killed
//! on drop, its stderr printed when a test fails); and [`RelayHttp`], the
//! requests tests make to a relay, child or in-process alike.

use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{
    NatsServer, POLL, Response, SECRET, SseClient, bearer, events_path, free_port, http_get,
    metric_value, tail, try_request,
};

pub fn relay_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sse-relay")
}

/// Environment variables the relay reads; removed from every child so the
/// developer's shell cannot leak config into a test.
pub const RELAY_ENV: &[&str] = &[
    "NATS_URL",
    "RELAY_LISTEN",
    "RELAY_STREAM",
    "RELAY_CREATE_STREAM",
    "RELAY_JWT_SECRET",
    "RELAY_JWT_PUBLIC_KEY",
    "RELAY_JWT_AUDIENCE",
    "RELAY_JWT_ISSUER",
    "RELAY_JWT_LEEWAY",
    "RELAY_HEARTBEAT",
    "RELAY_RETRY_MS",
    "RELAY_CLIENT_QUEUE",
    "RELAY_CORS_ORIGINS",
    "RELAY_REPLAY_CACHE_BYTES",
    "RELAY_REPLAY_LIMIT",
    "RELAY_DRAIN_SECONDS",
    "RELAY_MAX_STREAM_AGE",
    "RELAY_REUSE_PORT",
    "RELAY_WORKERS",
    "NATS_CREDS",
];

fn relay_command(args: &[String], envs: &[(&str, &str)]) -> Command {
    relay_command_under(&[], args, envs)
}

/// The relay run by `wrapper` (e.g. `prlimit --nofile=N:N --`), if any.
fn relay_command_under(wrapper: &[String], args: &[String], envs: &[(&str, &str)]) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((w, rest)) => {
            let mut c = Command::new(w);
            c.args(rest).arg(relay_bin());
            c
        }
        None => Command::new(relay_bin()),
    };
    cmd.args(args);
    for k in RELAY_ENV {
        cmd.env_remove(k);
    }
    cmd.env("RUST_LOG", "info").env("RUST_BACKTRACE", "1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd
}

/// Runs the relay binary to completion (e.g. `token`, or a `serve` that
/// must fail), killing it if it runs longer than `limit`.
pub async fn run_relay(args: &[&str], envs: &[(&str, &str)], limit: Duration) -> Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let mut cmd = tokio::process::Command::from(relay_command(&args, envs));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(limit, cmd.output()).await {
        Ok(out) => out.expect("run sse-relay"),
        Err(_) => panic!(
            "`sse-relay {}` did not exit within {limit:?}",
            args.join(" ")
        ),
    }
}

/// An `sse-relay serve` child process on a fresh port.
pub struct Relay {
    child: Option<Child>,
    addr: String,
    dir: TempDir,
    exit: Option<ExitStatus>,
}

impl Relay {
    /// Default flags: `--nats-url URL --jwt-secret SECRET --create-stream
    /// --workers 1`. One shard unless a test asks for more: most tests hold
    /// per-shard behaviour (one subscription per pattern, one window).
    pub fn default_args(nats_url: &str) -> Vec<String> {
        [
            "--nats-url",
            nats_url,
            "--jwt-secret",
            SECRET,
            "--create-stream",
            "--workers",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Spawns `serve --listen 127.0.0.1:PORT` + default flags + `extra`,
    /// without waiting for readiness.
    pub fn spawn(nats_url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Relay {
        let mut args = Self::default_args(nats_url);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn_serve(args, envs)
    }

    /// Spawns `serve --listen 127.0.0.1:PORT <args>` (no other flags).
    pub fn spawn_serve(args: Vec<String>, envs: &[(&str, &str)]) -> Relay {
        let port = free_port();
        let mut full = vec![
            "serve".to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        full.extend(args);
        Self::spawn_exact(&full, envs, port)
    }

    /// Spawns the binary with exactly `args`; `port` is where it is
    /// expected to listen (e.g. set via RELAY_LISTEN in `envs`).
    pub fn spawn_exact(args: &[String], envs: &[(&str, &str)], port: u16) -> Relay {
        Self::spawn_under(&[], args, envs, port)
    }

    /// Spawns with the default flags + `extra`, allowed only `nofile` open
    /// files (through `prlimit`), without waiting for readiness.
    pub fn spawn_with_file_limit(nats_url: &str, extra: &[&str], nofile: u64) -> Relay {
        let port = free_port();
        let mut args = vec![
            "serve".to_string(),
            "--listen".to_string(),
            format!("127.0.0.1:{port}"),
        ];
        args.extend(Self::default_args(nats_url));
        args.extend(extra.iter().map(|s| s.to_string()));
        let wrapper = [
            "prlimit".to_string(),
            format!("--nofile={nofile}:{nofile}"),
            "--".to_string(),
        ];
        Self::spawn_under(&wrapper, &args, &[], port)
    }

    fn spawn_under(wrapper: &[String], args: &[String], envs: &[(&str, &str)], port: u16) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = std::fs::File::create(dir.path().join("relay.log")).expect("log file");
        let child = relay_command_under(wrapper, args, envs)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn sse-relay");
        Relay {
            child: Some(child),
            addr: format!("127.0.0.1:{port}"),
            dir,
            exit: None,
        }
    }

    /// Spawns with the default flags + `extra` and waits (15 s) until
    /// `GET /readyz` is 200.
    pub async fn start(nats_url: &str, extra: &[&str], envs: &[(&str, &str)]) -> Relay {
        for attempt in 0..3 {
            let mut r = Self::spawn(nats_url, extra, envs);
            match r.try_wait_ready(Duration::from_secs(15)).await {
                Ok(()) => return r,
                Err(e) => {
                    let log = r.log();
                    if attempt < 2 && log.to_ascii_lowercase().contains("in use") {
                        continue; // port race: try a fresh port
                    }
                    panic!(
                        "relay not ready: {e}\n--- relay stderr ---\n{}",
                        tail(&log, 8000)
                    );
                }
            }
        }
        unreachable!()
    }

    /// Spawns `serve` with `--nats-url URL --jwt-secret SECRET` + `extra`
    /// (no `--create-stream`: the stream must already exist) and waits
    /// (15 s) until `/readyz` is 200.
    pub async fn start_existing_stream(nats_url: &str, extra: &[&str]) -> Relay {
        let mut args: Vec<String> = ["--nats-url", nats_url, "--jwt-secret", SECRET]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut r = Self::spawn_serve(args, &[]);
        r.wait_ready(Duration::from_secs(15)).await;
        r
    }

    /// Waits (bounded) until `GET /readyz` answers 200; Err if the process
    /// exits or the deadline passes.
    pub async fn try_wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let addr = self.addr.clone();
        wait_readyz(&addr, limit, || {
            self.try_exit()
                .map(|st| format!("sse-relay exited with {st}"))
        })
        .await
    }

    pub async fn wait_ready(&mut self, limit: Duration) {
        if let Err(e) = self.try_wait_ready(limit).await {
            panic!("{e}\n--- relay stderr ---\n{}", tail(&self.log(), 8000));
        }
    }

    /// Waits (bounded) until the relay accepts HTTP (any answer to /healthz).
    pub async fn wait_listening(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_exit() {
                panic!(
                    "sse-relay exited with {st}; stderr:\n{}",
                    tail(&self.log(), 8000)
                );
            }
            if try_request(
                &self.addr,
                "GET",
                "/healthz",
                &[],
                None,
                Duration::from_secs(2),
            )
            .await
            .is_ok()
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "relay did not accept HTTP within {limit:?}; stderr:\n{}",
                    tail(&self.log(), 8000)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(|c| c.id())
            .expect("relay already reaped")
    }

    /// The relay's output (stderr and stdout) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }

    pub fn sigterm(&self) {
        let pid = self.pid().to_string();
        let st = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill -TERM {pid} failed");
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                self.exit = Some(st);
            }
        }
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if let Some(st) = self.exit {
            return Some(st);
        }
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => {
                self.exit = Some(st);
                self.child = None;
                Some(st)
            }
            _ => None,
        }
    }

    /// Polls for the process' exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.try_exit() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl RelayHttp for Relay {
    fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- sse-relay on {} stderr (tail) ---\n{}\n--- end ---",
                self.addr,
                tail(&self.log(), 6000)
            );
        }
    }
}

/// The requests tests make to a relay listening on [`RelayHttp::addr`],
/// whether a child process ([`Relay`]) or in this process
/// ([`super::InProcessRelay`]).
pub trait RelayHttp {
    /// `127.0.0.1:<port>` the relay listens on.
    fn addr(&self) -> &str;

    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        http_get(self.addr(), path, headers).await
    }

    /// Opens `/events` for `subjects` with a Bearer token, asserts 200 and
    /// waits until the relay's NATS subscriptions for those subjects exist
    /// (so that a message published afterwards must reach the client).
    async fn open_stream(&self, nats: &NatsServer, token: &str, subjects: &[&str]) -> SseClient {
        let auth = bearer(token);
        let path = events_path(subjects);
        let c = SseClient::connect(self.addr(), &path, &[("Authorization", &auth)]).await;
        assert_eq!(
            c.status, 200,
            "GET {path} expected 200, got {} {:?}",
            c.status, c.headers
        );
        nats.wait_relay_subs(subjects, Duration::from_secs(10))
            .await;
        c
    }

    /// The `GET /metrics` text exposition.
    async fn metrics_text(&self) -> String {
        let r = self.get("/metrics", &[]).await;
        assert_eq!(r.status, 200, "GET /metrics: {} {:?}", r.status, r.body);
        r.body
    }

    /// One sample of `/metrics` (see [`metric_value`]), e.g.
    /// `relay.metric("sse_relay_resumes_total", &[("source", "memory")])`.
    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics_text().await, name, labels)
    }
}

/// Polls `GET /readyz` on `addr` until it answers 200, at most `limit`;
/// Err as soon as `gone` reports that the relay has stopped, or when the
/// deadline passes.
pub async fn wait_readyz(
    addr: &str,
    limit: Duration,
    mut gone: impl FnMut() -> Option<String>,
) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    let mut last: String;
    loop {
        if let Some(why) = gone() {
            return Err(format!("{why} before /readyz was 200"));
        }
        match try_request(addr, "GET", "/readyz", &[], None, Duration::from_secs(2)).await {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => last = format!("status {} body {:?}", r.status, r.body),
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            return Err(format!("/readyz not 200 within {limit:?} (last: {last})"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The soft limit on open files of this process (`ulimit -n`, which child
/// processes such as the relay inherit). `u64::MAX` for `unlimited`.
pub fn open_file_limit() -> u64 {
    let out = Command::new("sh")
        .args(["-c", "ulimit -n"])
        .output()
        .expect("run `sh -c 'ulimit -n'`");
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if s == "unlimited" {
        return u64::MAX;
    }
    s.parse()
        .unwrap_or_else(|e| panic!("`ulimit -n` printed {s:?}: {e}"))
}
