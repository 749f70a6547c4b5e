//! Two regions on loopback, run from the repository's own configs: a hub
//! (`nats/hub.conf`, JetStream domain `hub`, the `EVENTS` stream of
//! `nats/stream.json`) and a regional leaf node (`nats/leaf.conf`, domain
//! `edge`, the mirror of `nats/leaf-mirror.json`). Each config is used as
//! shipped but for its ports and store dir, which are swapped for fresh
//! ones. The leaf reaches the hub through [`LinkProxy`], so a test can cut
//! the link between the regions and restore it (the hub advertises the
//! proxy's address to leaf nodes, as one behind a load balancer would).

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde_json::Value;
use tempfile::TempDir;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use sse_relay::dev::{self, NatsServerOptions};

use super::{free_port, monitor_addr, poll_until, start_node, tail, try_request, wait_healthy};

/// Bound for a server to start, the leaf link to come up or go down, and a
/// stream to be created.
const SETUP_LIMIT: Duration = Duration::from_secs(20);

/// One server of a [`Regions`] setup.
pub struct RegionNode {
    pub name: &'static str,
    server: dev::NatsServer,
}

impl RegionNode {
    pub fn url(&self) -> String {
        self.server.url()
    }

    pub fn monitor_addr(&self) -> String {
        monitor_addr(&self.server)
    }

    /// A client connection (bounded 10 s).
    pub async fn client(&self) -> async_nats::Client {
        tokio::time::timeout(Duration::from_secs(10), async_nats::connect(self.url()))
            .await
            .expect("connect to nats timed out")
            .expect("connect to nats")
    }

    /// `GET path` on the monitoring port as JSON, if it answers 200.
    async fn monitor(&self, path: &str) -> Option<Value> {
        let r = try_request(
            &self.monitor_addr(),
            "GET",
            path,
            &[],
            None,
            Duration::from_secs(2),
        )
        .await
        .ok()?;
        (r.status == 200).then(|| serde_json::from_str(&r.body).ok())?
    }

    /// Leaf node connections this server has (from `/leafz`).
    pub async fn leaf_connections(&self) -> Option<u64> {
        self.monitor("/leafz").await?["leafnodes"].as_u64()
    }
}

/// A hub and a regional leaf node with a mirror of the hub's stream.
pub struct Regions {
    pub hub: RegionNode,
    pub leaf: RegionNode,
    /// The leaf's way to the hub.
    pub link: LinkProxy,
    /// The generated configs; removed on drop.
    _dir: TempDir,
}

impl Regions {
    /// Starts the hub and the leaf from `nats/hub.conf` and
    /// `nats/leaf.conf`, waits for the leaf link, then creates the stream
    /// at the hub from `nats/stream.json` and the mirror at the leaf from
    /// `nats/leaf-mirror.json`, as `nats stream add --config` would.
    pub async fn start() -> Regions {
        let dir = tempfile::tempdir().expect("tempdir");
        let leaf_port = free_port();
        let link = LinkProxy::start(leaf_port).await;

        let hub_conf = conf_from_template(
            "nats/hub.conf",
            &[
                ("port: 4222", None),
                ("http_port: 8222", None),
                ("store_dir: \"/tmp/nats-hub\"", None),
                // A hub tells leaf nodes where it listens, and they reconnect
                // there: it must name the proxy for a cut to hold.
                (
                    "port: 7422",
                    Some(format!(
                        "port: {leaf_port}\n  advertise: \"127.0.0.1:{}\"",
                        link.port
                    )),
                ),
            ],
        );
        let leaf_conf = conf_from_template(
            "nats/leaf.conf",
            &[
                ("port: 4225", None),
                ("http_port: 8225", None),
                ("store_dir: \"/tmp/nats-leaf\"", None),
                (
                    "urls: [\"nats://127.0.0.1:7422\"]",
                    Some(format!("urls: [\"nats://127.0.0.1:{}\"]", link.port)),
                ),
            ],
        );
        let hub = start_region_node("hub", &dir, &hub_conf).await;
        let leaf = start_region_node("edge1", &dir, &leaf_conf).await;
        let regions = Regions {
            hub,
            leaf,
            link,
            _dir: dir,
        };
        regions.wait_link(true).await;

        let hub_js = jetstream::new(regions.hub.client().await);
        create_stream(&hub_js, stream_config("nats/stream.json")).await;
        let leaf_js = jetstream::new(regions.leaf.client().await);
        create_stream(&leaf_js, stream_config("nats/leaf-mirror.json")).await;
        regions
    }

    /// Cuts the leaf link (every connection through the proxy dropped, new
    /// ones refused) and waits until the hub has no leaf connection.
    pub async fn cut_link(&self) {
        self.link.cut.send_replace(true);
        self.wait_link(false).await;
    }

    /// Lets the leaf connect again and waits until it has.
    pub async fn restore_link(&self) {
        self.link.cut.send_replace(false);
        self.wait_link(true).await;
    }

    async fn wait_link(&self, up: bool) {
        let want = u64::from(up);
        let what = if up {
            "the leaf link up"
        } else {
            "the leaf link down"
        };
        poll_until(SETUP_LIMIT, what, || async {
            let hub = self.hub.leaf_connections().await?;
            let leaf = self.leaf.leaf_connections().await?;
            (hub == want && leaf == want).then_some(())
        })
        .await;
    }

    /// The last sequence of `EVENTS` at the leaf (the mirror), if it answers.
    pub async fn mirror_last(&self, js: &jetstream::Context) -> Option<u64> {
        let info = async {
            let mut s = js.get_stream("EVENTS").await.ok()?;
            Some(s.info().await.ok()?.state.last_sequence)
        };
        tokio::time::timeout(Duration::from_secs(2), info)
            .await
            .ok()
            .flatten()
    }

    /// Waits until the mirror holds sequence `seq` (`js` is the leaf's).
    pub async fn wait_mirrored(&self, js: &jetstream::Context, seq: u64, limit: Duration) {
        poll_until(limit, &format!("the mirror to reach {seq}"), || async {
            self.mirror_last(js).await.filter(|last| *last >= seq)
        })
        .await;
    }

    /// Both servers' log tails, for failure messages.
    pub fn logs(&self) -> String {
        [&self.hub, &self.leaf]
            .iter()
            .map(|n| format!("--- {} ---\n{}", n.name, tail(&n.server.log(), 3000)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Regions {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- nats logs (tail) ---\n{}", self.logs());
        }
    }
}

/// Writes `conf` to `<dir>/<name>.conf`, starts nats-server with it and
/// waits until its JetStream is healthy.
async fn start_region_node(name: &'static str, dir: &TempDir, conf: &str) -> RegionNode {
    let path = dir.path().join(format!("{name}.conf"));
    std::fs::write(&path, conf).expect("write config");
    let server = start_node(NatsServerOptions {
        args: vec!["-c".into(), path.to_string_lossy().into_owned()],
        ..Default::default()
    })
    .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
    if let Err(e) = wait_healthy(&server, "/healthz?js-enabled-only=true", SETUP_LIMIT).await {
        panic!("{name} did not start: {e}");
    }
    RegionNode { name, server }
}

/// A stream config file of the repository, read as the `nats` CLI reads
/// `--config`: the JSON of a JetStream `StreamConfig`.
pub fn stream_config(path: &str) -> stream::Config {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not a stream config: {e}"))
}

/// Creates `config`, retrying while JetStream is starting, at most
/// [`SETUP_LIMIT`].
async fn create_stream(js: &jetstream::Context, config: stream::Config) {
    let name = config.name.clone();
    poll_until(SETUP_LIMIT, &format!("stream {name} created"), || async {
        let r = tokio::time::timeout(Duration::from_secs(5), js.create_stream(config.clone()));
        match r.await {
            Ok(Ok(_)) => Some(()),
            Ok(Err(e)) => {
                eprintln!("creating stream {name}: {e}; retrying");
                None
            }
            Err(_) => None,
        }
    })
    .await
}

/// A config file of the repository with comments dropped and, for each
/// `(line, replacement)`, the one line that reads `line` (indentation
/// aside) replaced, or removed when the replacement is None.
/// [`dev::NatsServer`] sets the client and monitoring ports and the store
/// dir on the command line (a `store_dir` in the file as well is refused as
/// a duplicate). Panics if the file no longer has one of those lines.
fn conf_from_template(path: &str, edits: &[(&str, Option<String>)]) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let template = std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let mut lines: Vec<String> = template
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect();
    for (from, to) in edits {
        let at: Vec<usize> = (0..lines.len())
            .filter(|i| lines[*i].trim() == *from)
            .collect();
        assert_eq!(
            at.len(),
            1,
            "{path} should have exactly one line `{from}`; update conf_from_template's callers"
        );
        match to {
            Some(to) => {
                let indent = &lines[at[0]][..lines[at[0]].len() - lines[at[0]].trim_start().len()];
                lines[at[0]] = format!("{indent}{to}");
            }
            None => {
                lines.remove(at[0]);
            }
        }
    }
    lines.join("\n") + "\n"
}

/// A TCP forwarder the leaf dials instead of the hub: it carries the leaf
/// link until cut, then drops every connection and refuses new ones until
/// restored.
pub struct LinkProxy {
    pub port: u16,
    cut: watch::Sender<bool>,
    accept: tokio::task::AbortHandle,
}

impl LinkProxy {
    async fn start(target: u16) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the link proxy");
        let port = listener.local_addr().expect("local_addr").port();
        let (cut, rx) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if *rx.borrow() {
                    continue; // refused: the socket is dropped
                }
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    // Ends on either side's close, a cut, or the proxy's
                    // drop (the sender goes away).
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = rx.wait_for(|cut| *cut) => {}
                    }
                });
            }
        })
        .abort_handle();
        LinkProxy { port, cut, accept }
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut.send_replace(true);
    }
}
