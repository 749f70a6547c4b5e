//! One nats-server with JetStream per test, killed on drop, and the
//! JetStream side of the tests: the `EVENTS` stream config, publishing with
//! acknowledgement, and reading a stream back.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::net::TcpStream;

use super::{POLL, free_port, http_get, try_request};

/// `nats-server` binary: `$NATS_SERVER_BIN` or `nats-server` from PATH.
pub fn nats_server_bin() -> String {
    std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".to_string())
}

/// A nats-server child with JetStream on, its own ports and store dir.
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    pub monitor_port: u16,
    dir: TempDir,
}

impl NatsServer {
    /// Starts on fresh ports and waits (10 s) until it accepts TCP and
    /// `/healthz` answers 200. Retries on fresh ports if the child dies
    /// (e.g. a port race).
    pub async fn start() -> NatsServer {
        let mut last_err = String::new();
        for _ in 0..3 {
            let mut s = NatsServer {
                child: None,
                port: free_port(),
                monitor_port: free_port(),
                dir: tempfile::tempdir().expect("tempdir"),
            };
            match s.launch().await {
                Ok(()) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("nats-server did not start: {last_err}");
    }

    /// Starts on the given client port (e.g. one a relay already dials).
    pub async fn start_on(port: u16) -> NatsServer {
        let mut s = NatsServer {
            child: None,
            port,
            monitor_port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
        };
        if let Err(e) = s.launch().await {
            panic!("nats-server did not start on port {port}: {e}");
        }
        s
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn launch(&mut self) -> Result<(), String> {
        let store = self.dir.path().join("jetstream");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| e.to_string())?;
        let child = Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-m")
            .arg(self.monitor_port.to_string())
            .arg("-sd")
            .arg(&store)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", nats_server_bin()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr = format!("127.0.0.1:{}", self.port);
        let maddr = self.monitor_addr();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .map_err(|e| e.to_string())?
            {
                self.child = None;
                return Err(format!(
                    "nats-server exited with {status}; log:\n{}",
                    self.log()
                ));
            }
            let tcp_ok = TcpStream::connect(&addr).await.is_ok();
            if tcp_ok {
                if let Ok(r) =
                    try_request(&maddr, "GET", "/healthz", &[], None, Duration::from_secs(1)).await
                {
                    if r.status == 200 {
                        return Ok(());
                    }
                }
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(format!("not healthy within 10 s; log:\n{}", self.log()));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn monitor_addr(&self) -> String {
        format!("127.0.0.1:{}", self.monitor_port)
    }

    /// Kills the server and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the server and starts it again on the same ports and store.
    pub async fn restart(&mut self) {
        self.stop();
        if let Err(e) = self.launch().await {
            panic!("nats-server did not restart: {e}");
        }
    }

    /// A client connection (bounded 10 s).
    pub async fn client(&self) -> async_nats::Client {
        tokio::time::timeout(Duration::from_secs(10), async_nats::connect(self.url()))
            .await
            .expect("connect to nats timed out")
            .expect("connect to nats")
    }

    /// Subjects of every subscription of every connection, from
    /// `/connz?subs=1`.
    pub async fn connz_subs(&self) -> Vec<String> {
        let r = http_get(&self.monitor_addr(), "/connz?subs=1&limit=100000", &[]).await;
        assert_eq!(r.status, 200, "GET /connz?subs=1: {}", r.body);
        let v = r.json();
        let mut subs = Vec::new();
        for conn in v["connections"].as_array().cloned().unwrap_or_default() {
            for s in conn["subscriptions_list"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                if let Some(s) = s.as_str() {
                    subs.push(s.to_string());
                } else if let Some(s) = s["subject"].as_str() {
                    subs.push(s.to_string());
                }
            }
        }
        subs
    }

    /// Number of subscriptions on exactly `subject`.
    pub async fn sub_count(&self, subject: &str) -> usize {
        self.connz_subs()
            .await
            .iter()
            .filter(|s| *s == subject)
            .count()
    }

    /// Waits (bounded) until, for each stream pattern P, a subscription on
    /// `relay.P` (the republish destination) exists on the server.
    pub async fn wait_relay_subs(&self, patterns: &[&str], limit: Duration) {
        let wanted: Vec<String> = patterns.iter().map(|p| format!("relay.{p}")).collect();
        let mut last: Vec<String>;
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let subs = self.connz_subs().await;
            if wanted.iter().all(|w| subs.contains(w)) {
                return;
            }
            last = subs;
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!(
            "the relay never subscribed to {wanted:?} on NATS within {limit:?}; subscriptions seen: {last:?}"
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// NATS headers with `Sse-Event: name`.
pub fn sse_event_headers(name: &str) -> async_nats::HeaderMap {
    let mut h = async_nats::HeaderMap::new();
    h.insert("Sse-Event", name);
    h
}

/// The stream config `--create-stream` makes (`events.>` republished to
/// `relay.events.>`), for tests that create the stream themselves and
/// change a field or two.
pub fn events_stream_config() -> async_nats::jetstream::stream::Config {
    async_nats::jetstream::stream::Config {
        name: "EVENTS".to_string(),
        subjects: vec!["events.>".to_string()],
        allow_direct: true,
        republish: Some(async_nats::jetstream::stream::Republish {
            source: "events.>".to_string(),
            destination: "relay.events.>".to_string(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// One JetStream publish, awaited until acknowledged (bounded 10 s);
/// returns the stream sequence.
pub async fn js_publish(
    js: &async_nats::jetstream::Context,
    subject: &str,
    payload: impl Into<bytes::Bytes>,
) -> u64 {
    let payload = payload.into();
    let fut = async {
        js.publish(subject.to_string(), payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok(ack)) => ack.sequence,
        Ok(Err(e)) => panic!("JetStream publish on {subject} failed: {e}"),
        Err(_) => panic!("JetStream publish on {subject}: no ack within 10 s"),
    }
}

/// One JetStream publish attempt with a `Nats-Msg-Id` (so a retry cannot
/// store the event twice), bounded by `limit`.
pub async fn js_publish_once_with_id(
    js: &async_nats::jetstream::Context,
    subject: &str,
    msg_id: &str,
    payload: bytes::Bytes,
    limit: Duration,
) -> Result<async_nats::jetstream::publish::PublishAck, String> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", msg_id);
    let fut = async {
        js.publish_with_headers(subject.to_string(), headers, payload)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("no ack within {limit:?}")),
    }
}

/// A message read back from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub subject: String,
    pub payload: String,
}

/// Every message of `stream` from sequence 1 up to its last sequence (at
/// the time of the call), read back with an ordered consumer that is
/// recreated from the next sequence whenever it fails (clusters in an
/// election). Bounded by `limit`.
pub async fn stream_contents(
    js: &async_nats::jetstream::Context,
    stream: &str,
    limit: Duration,
) -> Vec<StoredEvent> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_err = String::new();
    let last_seq = loop {
        if tokio::time::Instant::now() >= deadline {
            panic!("stream {stream}: no info within {limit:?} (last error: {last_err})");
        }
        let res = tokio::time::timeout(Duration::from_secs(3), async {
            let mut s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            let last = s
                .info()
                .await
                .map_err(|e| e.to_string())?
                .state
                .last_sequence;
            Ok::<_, String>(last)
        })
        .await;
        match res {
            Ok(Ok(v)) => break v,
            Ok(Err(e)) => last_err = e,
            Err(_) => last_err = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut out = Vec::new();
    let mut next = 1u64;
    // Each round either makes progress or waits 100 ms; bounded by `limit`.
    while next <= last_seq {
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "stream {stream}: read back only up to seq {next} of {last_seq} within {limit:?} (last error: {last_err})"
            );
        }
        let round = tokio::time::timeout_at(deadline, async {
            let s = js.get_stream(stream).await.map_err(|e| e.to_string())?;
            let consumer = s
                .create_consumer(OrderedConfig {
                    deliver_policy: DeliverPolicy::ByStartSequence {
                        start_sequence: next,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            let mut msgs = consumer.messages().await.map_err(|e| e.to_string())?;
            while next <= last_seq {
                match tokio::time::timeout(Duration::from_secs(3), msgs.next()).await {
                    Ok(Some(Ok(m))) => {
                        let seq = m.info().map_err(|e| e.to_string())?.stream_sequence;
                        if seq >= next {
                            out.push(StoredEvent {
                                seq,
                                subject: m.subject.to_string(),
                                payload: String::from_utf8_lossy(&m.payload).into_owned(),
                            });
                            next = seq + 1;
                        }
                    }
                    Ok(Some(Err(e))) => return Err(e.to_string()),
                    Ok(None) => return Err("consumer ended".to_string()),
                    Err(_) => return Err("no message within 3 s".to_string()),
                }
            }
            Ok(())
        })
        .await;
        match round {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                last_err = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => last_err = "deadline".into(),
        }
    }
    out.retain(|e| e.seq <= last_seq);
    out
}
