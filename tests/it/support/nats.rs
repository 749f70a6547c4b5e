//! One nats-server with JetStream per test, killed on drop, and the
//! JetStream side of the tests: the `EVENTS` stream config, publishing with
//! acknowledgement, and reading a stream back.

use std::time::Duration;

use sse_relay::dev::{self, NatsServerOptions};

use super::{POLL, http_get, tail, try_request};

/// Bound for a nats-server to start serving.
const START_LIMIT: Duration = Duration::from_secs(10);

/// A nats-server with JetStream on, on ports it picked itself, with its own
/// store dir; killed and removed on drop.
pub struct NatsServer {
    server: dev::NatsServer,
}

impl NatsServer {
    /// Starts on ports the server picks and waits (10 s) until `/healthz`
    /// answers 200.
    pub async fn start() -> NatsServer {
        Self::start_with(NatsServerOptions::default()).await
    }

    /// Starts on the given client port (e.g. one a relay already dials).
    pub async fn start_on(port: u16) -> NatsServer {
        Self::start_with(NatsServerOptions {
            port: Some(port),
            ..Default::default()
        })
        .await
    }

    /// Starts with `opts` (the monitoring port always on).
    pub async fn start_with(opts: NatsServerOptions) -> NatsServer {
        let server = start_node(opts).unwrap_or_else(|e| panic!("nats-server did not start: {e}"));
        if let Err(e) = wait_healthy(&server, "/healthz", START_LIMIT).await {
            panic!("nats-server did not start: {e}");
        }
        NatsServer { server }
    }

    pub fn url(&self) -> String {
        self.server.url()
    }

    /// `127.0.0.1:<port>` of the monitoring endpoint (`/connz`, `/healthz`).
    pub fn monitor_addr(&self) -> String {
        monitor_addr(&self.server)
    }

    /// Kills the server and waits for it.
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Kills the server and starts it again on the same ports and store,
    /// then waits (10 s) until `/healthz` answers 200.
    pub async fn restart(&mut self) {
        if let Err(e) = tokio::task::block_in_place(|| self.server.restart()) {
            panic!("nats-server did not restart: {e}");
        }
        if let Err(e) = wait_healthy(&self.server, "/healthz", START_LIMIT).await {
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

    /// Core NATS publishes of `(subject, payload)`, in order, then a flush:
    /// the stream stores them as `nats pub` would, without acks.
    pub async fn publish_core<S, P>(&self, messages: impl IntoIterator<Item = (S, P)>)
    where
        S: AsRef<str>,
        P: Into<bytes::Bytes>,
    {
        let client = self.client().await;
        for (subject, payload) in messages {
            let subject = subject.as_ref().to_string();
            client
                .publish(subject, payload.into())
                .await
                .expect("core publish");
        }
        client.flush().await.expect("flush");
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

/// Starts `sse_relay::dev::NatsServer` with its monitoring port open: the
/// server picks its ports, and the call returns once the client port
/// accepts. Blocks the worker thread meanwhile (tests run on the
/// multi-threaded runtime).
pub fn start_node(opts: NatsServerOptions) -> Result<dev::NatsServer, String> {
    let opts = NatsServerOptions {
        monitor: true,
        ..opts
    };
    tokio::task::block_in_place(|| dev::NatsServer::start(opts))
}

/// `127.0.0.1:<port>` of a server's monitoring endpoint.
pub fn monitor_addr(server: &dev::NatsServer) -> String {
    let port = server
        .monitor_port()
        .expect("the tests start every nats-server with its monitoring port");
    format!("127.0.0.1:{port}")
}

/// Waits until the monitoring endpoint answers `health_path` with 200; Err,
/// with the server's log, once `limit` has passed.
pub async fn wait_healthy(
    server: &dev::NatsServer,
    health_path: &str,
    limit: Duration,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    let monitor = monitor_addr(server);
    loop {
        let last = match try_request(
            &monitor,
            "GET",
            health_path,
            &[],
            None,
            Duration::from_secs(1),
        )
        .await
        {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => format!("status {} {:?}", r.status, r.body),
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "{health_path} not 200 within {limit:?} (last: {last}); log:\n{}",
                tail(&server.log(), 4000)
            ));
        }
        tokio::time::sleep(POLL).await;
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
