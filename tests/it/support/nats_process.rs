//! One nats-server child process, for a single server or a cluster node:
//! its ports, its log file, and the bounded wait until it serves.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::{POLL, tail, try_request};

/// `nats-server` binary: `$NATS_SERVER_BIN` or `nats-server` from PATH.
pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

/// A nats-server process (killed on drop) that can be started again with
/// the same arguments, ports and log.
pub struct NatsProcess {
    /// Names the process in failure messages (`nats-server`, `n1`, ...).
    name: String,
    port: u16,
    monitor_port: u16,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsProcess {
    /// A process not started yet; `args` come after the binary.
    pub fn new(
        name: &str,
        port: u16,
        monitor_port: u16,
        args: Vec<OsString>,
        log: PathBuf,
    ) -> Self {
        NatsProcess {
            name: name.to_string(),
            port,
            monitor_port,
            args,
            log,
            child: None,
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn monitor_addr(&self) -> String {
        format!("127.0.0.1:{}", self.monitor_port)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Everything the process has printed, over all its starts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// [`NatsProcess::spawn`], then [`NatsProcess::wait_healthy`].
    pub async fn start(&mut self, health_path: &str, limit: Duration) -> Result<(), String> {
        self.spawn()?;
        self.wait_healthy(health_path, limit).await
    }

    /// Spawns the process (killing a running one first), its stdout and
    /// stderr appended to the log.
    pub fn spawn(&mut self) -> Result<(), String> {
        self.kill();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| e.to_string())?;
        let child = Command::new(nats_server_bin())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", nats_server_bin()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until the client port accepts and the monitor answers
    /// `health_path` with 200. Err, with the log, if the process exits or
    /// `limit` passes; the process is killed then.
    pub async fn wait_healthy(&mut self, health_path: &str, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        let addr = format!("127.0.0.1:{}", self.port);
        let monitor = self.monitor_addr();
        let mut last = String::from("nothing yet");
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!(
                    "{} exited with {status}; log:\n{}",
                    self.name,
                    tail(&self.log(), 4000)
                ));
            }
            if TcpStream::connect(&addr).await.is_ok() {
                let health = try_request(
                    &monitor,
                    "GET",
                    health_path,
                    &[],
                    None,
                    Duration::from_secs(1),
                );
                match health.await {
                    Ok(r) if r.status == 200 => return Ok(()),
                    Ok(r) => last = format!("status {} {:?}", r.status, r.body),
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "{} not healthy within {limit:?} (last: {last}); log:\n{}",
                    self.name,
                    tail(&self.log(), 4000)
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
