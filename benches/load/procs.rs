//! Child processes (nats-server, relays) and what the harness reads about
//! processes from /proc: RSS, CPU ticks. Every child is registered so the
//! watchdog can kill it, and killed on drop.

use sse_relay::dev::{NatsServer, NatsServerOptions};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Pids of every child still alive, for the watchdog.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

pub(crate) fn register(pid: u32) {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
}

pub(crate) fn unregister(pid: u32) {
    CHILDREN
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|p| *p != pid);
}

/// Kills every registered child (watchdog path: no destructors will run).
pub(crate) fn kill_all() {
    let pids = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}

/// A child killed (SIGKILL) and reaped on drop.
pub(crate) struct Proc {
    pub(crate) child: Child,
}

impl Proc {
    pub(crate) fn spawn(mut cmd: Command, name: &str) -> Result<Proc, String> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        register(child.id());
        Ok(Proc { child })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        unregister(self.child.id());
    }
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub(crate) fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// `taskset -c <cpu> <program>` when pinning, else the program itself.
pub(crate) fn command(program: &Path, cpu: Option<usize>) -> Command {
    match cpu {
        Some(c) => {
            let mut cmd = Command::new("taskset");
            cmd.arg("-c").arg(c.to_string()).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Pins this process and all its threads (and so its future children).
pub(crate) fn pin_self(cpu: usize) -> Result<(), String> {
    let st = Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string()])
        .arg(std::process::id().to_string())
        .stdout(Stdio::null())
        .status()
        .map_err(|e| format!("taskset: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("taskset -a -p -c {cpu} failed: {st}"))
    }
}

/// `nats-server -js` on a port of its own with a temporary store (pinned
/// to `cpu` when asked), known to the watchdog while it runs.
pub(crate) struct Nats {
    pub(crate) server: NatsServer,
    pub(crate) url: String,
}

impl Nats {
    pub(crate) fn start(cpu: Option<usize>) -> Result<Nats, String> {
        let server = NatsServer::start(NatsServerOptions {
            wrapper: cpu
                .map(|c| vec!["taskset".to_string(), "-c".to_string(), c.to_string()])
                .unwrap_or_default(),
            ..NatsServerOptions::default()
        })?;
        if let Some(pid) = server.pid() {
            register(pid);
        }
        let url = server.url();
        Ok(Nats { server, url })
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        if let Some(pid) = self.server.pid() {
            unregister(pid);
        }
    }
}

/// The relay binary, built in release mode.
/// `target/release/sse-relay`, or `LOAD_RELAY_BIN` (another build, to
/// compare two binaries in the same conditions).
pub(crate) fn relay_binary() -> Result<PathBuf, String> {
    let p = match std::env::var_os("LOAD_RELAY_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/sse-relay"),
    };
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} is missing: run `cargo build --release` first",
            p.display()
        ))
    }
}

/// The relays' `--heartbeat` (seconds); the peers keep the same interval.
pub(crate) const RELAY_HEARTBEAT_S: u64 = 60;

/// Settings shared by every relay of a run.
pub(crate) struct RelaySpec {
    pub(crate) port: u16,
    pub(crate) nats_url: String,
    pub(crate) secret: String,
    pub(crate) client_queue: usize,
    pub(crate) workers: usize,
    pub(crate) cpu: Option<usize>,
}

/// One `sse-relay serve` process; its log goes to `relay-<i>.log`.
pub(crate) struct Relay {
    pub(crate) proc: Proc,
    pub(crate) log: PathBuf,
}

impl Relay {
    pub(crate) fn spawn(spec: &RelaySpec, i: usize, dir: &Path) -> Result<Relay, String> {
        let bin = relay_binary()?;
        let log = dir.join(format!("relay-{i}.log"));
        let file = fs::File::create(&log).map_err(|e| e.to_string())?;
        let mut cmd = command(&bin, spec.cpu);
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", spec.port)])
            .arg("--reuse-port")
            .args(["--nats-url", &spec.nats_url])
            .args(["--jwt-secret", &spec.secret])
            .arg("--create-stream")
            .args(["--client-queue", &spec.client_queue.to_string()])
            .args(["--workers", &spec.workers.to_string()])
            .args(["--heartbeat", &RELAY_HEARTBEAT_S.to_string()])
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("LOAD_RELAY_LOG").unwrap_or_else(|_| "warn,sse_relay=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file);
        let proc = Proc::spawn(cmd, "sse-relay")?;
        Ok(Relay { proc, log })
    }

    /// Waits for every shard's log line saying the stream is loaded.
    pub(crate) fn wait_ready(&mut self, workers: usize, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if text.matches("stream ready").count() >= workers {
                return Ok(());
            }
            if let Some(st) = self.proc.exited() {
                return Err(format!("relay exited ({st}): {}", tail(&text)));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("relay not ready after {limit:?}"))
    }

    /// Log lines that say something went wrong or clients were evicted.
    pub(crate) fn notable_log_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("evicted"))
            .take(10)
            .map(String::from)
            .collect()
    }
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// VmRSS of `pid` in KiB.
pub(crate) fn rss_kib(pid: u32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// (user, system) CPU ticks of `pid` (fields 14 and 15 of /proc/pid/stat).
pub(crate) fn cpu_ticks(pid: u32) -> (u64, u64) {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may contain spaces; fields restart after the last ')'.
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 -> index 11.
    let get = |i: usize| f.get(i).and_then(|v| v.parse().ok()).unwrap_or(0);
    (get(11), get(12))
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 on Linux).
pub(crate) fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// GET `path` from the relay port with a blocking HTTP/1.0 request.
pub(crate) fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A counter's value from the Prometheus text of GET /metrics; `series` is
/// the full name with labels as rendered, e.g. `sse_relay_resumes_total{source="memory"}`.
pub(crate) fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}
