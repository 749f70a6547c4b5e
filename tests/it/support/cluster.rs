//! A JetStream cluster of nats-server processes on loopback, built from
//! the `nats/cluster/n1.conf` template: start it, kill nodes, find the
//! stream leader and move it, find the node a client is connected to.

use std::time::Duration;

use serde_json::{Value, json};
use tempfile::TempDir;

use sse_relay::dev::{self, NatsServerOptions};

use super::{free_port, monitor_addr, poll_until, start_node, tail, try_request, wait_healthy};

/// One node of a [`NatsCluster`].
pub struct ClusterNode {
    /// `server_name` (`n1`, `n2`, ...).
    pub name: String,
    server: dev::NatsServer,
}

impl ClusterNode {
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn monitor_addr(&self) -> String {
        monitor_addr(&self.server)
    }

    /// False once the node has been killed.
    pub fn is_running(&self) -> bool {
        self.server.pid().is_some()
    }

    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Waits until the node's JetStream is enabled and healthy.
    async fn wait_healthy(&self) -> Result<(), String> {
        let health = "/healthz?js-enabled-only=true";
        wait_healthy(&self.server, health, Duration::from_secs(15)).await
    }
}

/// A JetStream cluster of nats-server processes on loopback, configured
/// from `nats/cluster/n1.conf`. Each node picks its client and monitoring
/// ports and keeps its store and log in a directory of its own
/// ([`dev::NatsServer`]); the cluster ports are chosen up front, since
/// every node's config lists them all as routes.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
    /// The nodes' configs; removed on drop.
    _dir: TempDir,
}

impl NatsCluster {
    /// Writes `n` configs, starts every node, and waits (bounded) until
    /// each reports `/healthz?js-enabled-only=true` 200 and a JetStream
    /// meta leader is elected.
    pub async fn start(n: usize) -> NatsCluster {
        assert!(n >= 1, "a cluster needs at least one node");
        let template_path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("nats/cluster/n1.conf");
        let template = std::fs::read_to_string(&template_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", template_path.display()));
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|port| format!("    nats://127.0.0.1:{port}"))
            .collect();
        let mut nodes = Vec::with_capacity(n);
        for (i, cluster_port) in cluster_ports.into_iter().enumerate() {
            let name = format!("n{}", i + 1);
            let conf =
                cluster_conf_from_template(&template, &name, cluster_port, &routes.join("\n"));
            let conf_path = dir.path().join(format!("{name}.conf"));
            std::fs::write(&conf_path, conf).expect("write node config");
            let server = start_node(NatsServerOptions {
                args: vec!["-c".into(), conf_path.to_string_lossy().into_owned()],
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("cluster node {name} did not start: {e}"));
            nodes.push(ClusterNode { name, server });
        }
        let c = NatsCluster { nodes, _dir: dir };
        for node in &c.nodes {
            if let Err(e) = node.wait_healthy().await {
                panic!("cluster node {} did not start: {e}", node.name);
            }
        }
        c.wait_meta_leader(Duration::from_secs(20)).await;
        c
    }

    /// The node URLs, comma-separated (the relay's `--nats-url`).
    pub fn url_list(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Index of the node called `name` (`n1` -> 0).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    /// A client that knows every node (reconnects to a live one).
    pub async fn client(&self) -> async_nats::Client {
        let addrs: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url().parse().expect("server addr"))
            .collect();
        tokio::time::timeout(
            Duration::from_secs(10),
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect(addrs),
        )
        .await
        .expect("connect to the cluster timed out")
        .expect("connect to the cluster")
    }

    /// Waits until a live node reports a JetStream meta leader in `/jsz`.
    pub async fn wait_meta_leader(&self, limit: Duration) -> String {
        poll_until(limit, "a JetStream meta leader in the cluster", || async {
            for n in self.nodes.iter().filter(|n| n.is_running()) {
                if let Ok(r) = try_request(
                    &n.monitor_addr(),
                    "GET",
                    "/jsz",
                    &[],
                    None,
                    Duration::from_secs(1),
                )
                .await
                {
                    if r.status != 200 {
                        continue;
                    }
                    let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
                    if let Some(l) = v["meta_cluster"]["leader"].as_str() {
                        if !l.is_empty() {
                            return Some(l.to_string());
                        }
                    }
                }
            }
            None
        })
        .await
    }

    /// Creates (or updates to) `config`, retrying until the cluster accepts
    /// it (meta elections make the first attempts fail), at most `limit`.
    pub async fn create_stream(
        &self,
        js: &async_nats::jetstream::Context,
        config: async_nats::jetstream::stream::Config,
        limit: Duration,
    ) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let last = match tokio::time::timeout(
                Duration::from_secs(5),
                js.get_or_create_stream(config.clone()),
            )
            .await
            {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out".to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "stream {} not created within {limit:?}: {last}",
                    config.name
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Wait until the stream's own group has a leader.
        self.stream_leader(js, &config.name, limit).await;
    }

    /// Index of the node leading `stream` (from the stream info's
    /// `cluster.leader`), polled until one is elected, at most `limit`.
    pub async fn stream_leader(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
        limit: Duration,
    ) -> usize {
        poll_until(limit, &format!("a leader for stream {stream}"), || async {
            let info = stream_leader_name(js, stream).await?;
            let idx = self.index_of(&info)?;
            self.nodes[idx].is_running().then_some(idx)
        })
        .await
    }

    /// Asks the stream's leader to step down (a new one is elected among
    /// the other replicas); `preferred` names the node that should lead
    /// (servers that do not support it elect any other peer).
    pub async fn step_down_stream_leader(
        &self,
        client: &async_nats::Client,
        stream: &str,
        preferred: Option<usize>,
    ) -> Result<(), String> {
        let subject = format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}");
        let body = match preferred {
            Some(i) => json!({ "placement": { "preferred": self.nodes[i].name } }).to_string(),
            None => String::new(),
        };
        let resp = tokio::time::timeout(
            Duration::from_secs(5),
            client.request(subject, bytes::Bytes::from(body)),
        )
        .await
        .map_err(|_| "stepdown request timed out".to_string())?
        .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&resp.payload).map_err(|e| e.to_string())?;
        if v["success"].as_bool() == Some(true) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    }

    /// Moves the leadership of `stream` until `want(leader index)` holds,
    /// with bounded step-downs; returns the leader.
    pub async fn move_stream_leader(
        &self,
        js: &async_nats::jetstream::Context,
        client: &async_nats::Client,
        stream: &str,
        preferred: Option<usize>,
        want: impl Fn(usize) -> bool,
        limit: Duration,
    ) -> usize {
        let deadline = tokio::time::Instant::now() + limit;
        let mut history = Vec::new();
        for _ in 0..12 {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let leader = self.stream_leader(js, stream, left).await;
            history.push(self.nodes[leader].name.clone());
            if want(leader) {
                if history.len() > 1 {
                    eprintln!("stream {stream}: leader moved: {}", history.join(" -> "));
                }
                return leader;
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            if let Err(e) = self
                .step_down_stream_leader(client, stream, preferred)
                .await
            {
                // An unsupported `preferred` is refused: step down without it.
                history.push(format!("stepdown refused: {e}"));
                let _ = self.step_down_stream_leader(client, stream, None).await;
            }
            // Until the old leader is gone from the stream info.
            let old = leader;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            poll_until(left, "a new stream leader after a step-down", || async {
                let l = stream_leader_name(js, stream).await?;
                let idx = self.index_of(&l)?;
                (idx != old).then_some(())
            })
            .await;
        }
        panic!(
            "stream {stream}: could not move its leader where wanted; leaders seen: {history:?}"
        );
    }

    /// Index of the running node holding a client connection named `name`
    /// (from each node's `/connz`).
    pub async fn node_with_connection(&self, name: &str) -> Option<usize> {
        for (i, n) in self.nodes.iter().enumerate() {
            if !n.is_running() {
                continue;
            }
            let Ok(r) = try_request(
                &n.monitor_addr(),
                "GET",
                "/connz?limit=100000",
                &[],
                None,
                Duration::from_secs(2),
            )
            .await
            else {
                continue;
            };
            let v: Value = serde_json::from_str(&r.body).unwrap_or_default();
            let found = v["connections"]
                .as_array()
                .is_some_and(|cs| cs.iter().any(|c| c["name"].as_str() == Some(name)));
            if found {
                return Some(i);
            }
        }
        None
    }

    /// Waits until a node holds a connection named `name`.
    pub async fn wait_connection(&self, name: &str, limit: Duration) -> usize {
        poll_until(
            limit,
            &format!("a connection named {name:?} on some node"),
            || self.node_with_connection(name),
        )
        .await
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].server.stop();
    }

    /// Starts node `i` again (killing it first if it runs) on its ports and
    /// store, and waits until its JetStream is healthy.
    pub async fn restart(&mut self, i: usize) -> Result<(), String> {
        let node = &mut self.nodes[i];
        tokio::task::block_in_place(|| node.server.restart())?;
        node.wait_healthy().await
    }

    /// SIGSTOPs node `i`: it keeps its sockets and answers nothing until
    /// [`NatsCluster::resume`] (a process frozen or a host unreachable).
    /// A stopped node is still killed by drop.
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// SIGCONTs node `i` after [`NatsCluster::pause`].
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, sig: &str) {
        let pid = self.nodes[i]
            .server
            .pid()
            .unwrap_or_else(|| panic!("node {} is not running", self.nodes[i].name))
            .to_string();
        let st = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("run kill");
        assert!(st.success(), "kill {sig} {pid} failed");
    }

    /// Waits until `stream` has a leader and every replica reports itself
    /// current (a node back from a kill or a stop has caught up).
    pub async fn wait_stream_current(
        &self,
        js: &async_nats::jetstream::Context,
        stream: &str,
        limit: Duration,
    ) {
        let what = format!("stream {stream} led, with every replica current");
        poll_until(limit, &what, || async {
            let info = async {
                let mut s = js.get_stream(stream).await.ok()?;
                s.info().await.ok().cloned()
            };
            let info = tokio::time::timeout(Duration::from_secs(2), info)
                .await
                .ok()
                .flatten()?;
            let cluster = info.cluster.as_ref()?;
            let led = cluster.leader.as_ref().is_some_and(|l| !l.is_empty());
            let replicas = &cluster.replicas;
            let current = replicas.len() + 1 == self.nodes.len()
                && replicas.iter().all(|r| r.current && !r.offline);
            (led && current).then_some(())
        })
        .await
    }

    /// Every node's log tail, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, tail(&n.log(), 3000)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- nats cluster logs (tail) ---\n{}", self.logs());
        }
    }
}

/// The `server_name` of the node leading `stream`, if one is elected and
/// the stream info comes within 2 s.
async fn stream_leader_name(js: &async_nats::jetstream::Context, stream: &str) -> Option<String> {
    let info = async {
        let mut s = js.get_stream(stream).await.ok()?;
        let i = s.info().await.ok()?;
        i.cluster.as_ref()?.leader.clone()
    };
    tokio::time::timeout(Duration::from_secs(2), info)
        .await
        .ok()
        .flatten()
}

/// Turns the `nats/cluster/n1.conf` template into node `name`'s config:
/// comments dropped, name, cluster port and routes replaced. The client
/// and monitoring ports and the store dir are dropped: [`dev::NatsServer`]
/// sets them on the command line (a `store_dir` in the file as well would
/// be refused as a duplicate). Panics if the template no longer has the
/// lines it is based on.
fn cluster_conf_from_template(
    template: &str,
    name: &str,
    cluster_port: u16,
    routes: &str,
) -> String {
    let mut conf: String = template
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    let replace = |conf: &mut String, from: &str, to: &str| {
        assert!(
            conf.contains(from),
            "nats/cluster/n1.conf no longer contains {from:?}; update cluster_conf_from_template"
        );
        *conf = conf.replacen(from, to, 1);
    };
    replace(
        &mut conf,
        "server_name: n1",
        &format!("server_name: {name}"),
    );
    replace(&mut conf, "listen: 127.0.0.1:4222\n", "");
    replace(&mut conf, "http: 127.0.0.1:8222\n", "");
    replace(
        &mut conf,
        "jetstream {\n  store_dir: \"/tmp/nats-cluster/n1\"\n}\n",
        "",
    );
    replace(
        &mut conf,
        "listen: 127.0.0.1:6222",
        &format!("listen: 127.0.0.1:{cluster_port}"),
    );
    let start = conf
        .find("routes: [")
        .expect("nats/cluster/n1.conf has no `routes: [`");
    let end = start
        + conf[start..]
            .find(']')
            .expect("nats/cluster/n1.conf: unterminated routes list");
    conf.replace_range(start..=end, &format!("routes: [\n{routes}\n  ]"));
    // A template port left over is `:PORT` not followed by another digit
    // (the fresh ports may well contain those digits).
    for stale in [":4222", ":8222", ":6222", ":6223", ":6224"] {
        let left = conf.match_indices(stale).any(|(i, _)| {
            !conf[i + stale.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit())
        });
        assert!(
            !left,
            "generated cluster config still mentions {stale:?}:\n{conf}"
        );
    }
    assert!(
        !conf.contains("/tmp/nats-cluster"),
        "generated cluster config still uses the template store dir:\n{conf}"
    );
    conf
}
