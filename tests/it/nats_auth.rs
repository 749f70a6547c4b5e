//! The relay's two NATS connections (requests and the live feed): they
//! reach a server that requires TLS, and one that requires a `.creds`
//! file (operator mode), or a user and password or token in the URL, and
//! the stream is served with live events; on a
//! cluster, a shard's two connections start on the same node and relays
//! spread over the seeds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use sse_relay::dev::NatsServerOptions;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);

/// The relay's connections on `nats`, by name, as `/connz` shows them.
async fn relay_connections(nats: &NatsServer) -> Vec<Value> {
    let r = http_get(&nats.monitor_addr(), "/connz?limit=1000", &[]).await;
    assert_eq!(r.status, 200, "GET /connz: {}", r.body);
    let mut conns: Vec<Value> = r.json()["connections"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| {
            c["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("sse-relay/"))
        })
        .collect();
    conns.sort_by_key(|c| c["name"].as_str().unwrap_or_default().to_owned());
    conns
}

/// Opens a stream on `events.a`, publishes with `publisher` and asserts
/// the event arrives live with its stream sequence as id.
async fn live_event_arrives(relay: &Relay, nats: &NatsServer, publisher: async_nats::Client) {
    let tok = token(SECRET, &["events.a"], 300);
    let mut c = relay.open_stream(nats, &tok, &["events.a"]).await;
    let js = async_nats::jetstream::new(publisher);
    let ack = js
        .publish("events.a", "over the feed".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let ev = c.expect_data_event(WAIT, "the live event").await;
    assert_eq!(
        (ev.seq(), ev.data.as_str()),
        (ack.sequence, "over the feed")
    );
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1 it signed: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-nodes", "-days", "2"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req", "-nodes"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &csr);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_connections_speak_tls_when_the_server_requires_it() {
    within(Duration::from_secs(60), "tls", async {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = certificates(dir.path());
        let path = |p: &PathBuf| p.to_str().unwrap().to_owned();
        let nats = NatsServer::start_with(NatsServerOptions {
            args: vec![
                "--tls".into(),
                "--tlscert".into(),
                path(&cert),
                "--tlskey".into(),
                path(&key),
            ],
            ..Default::default()
        })
        .await;
        let url = nats.url().replace("nats://", "tls://");
        // The relay trusts the platform's roots; SSL_CERT_FILE names them.
        let relay = Relay::start(&url, &[], &[("SSL_CERT_FILE", &path(&ca))]).await;
        let conns = relay_connections(&nats).await;
        let names: Vec<&str> = conns.iter().filter_map(|c| c["name"].as_str()).collect();
        assert_eq!(names, ["sse-relay/0", "sse-relay/0/live"]);
        for c in &conns {
            assert!(
                c["tls_version"].as_str().is_some_and(|v| !v.is_empty()),
                "{} is not on TLS: {c}",
                c["name"]
            );
        }
        let publisher = async_nats::ConnectOptions::new()
            .add_root_certificates(ca.clone())
            .require_tls(true)
            .connect(&url)
            .await
            .expect("publisher over TLS");
        live_event_arrives(&relay, &nats, publisher).await;
    })
    .await
}

/// A JWT as `nsc` writes one: `claims` signed by `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: Value) -> String {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": nkeys::KeyPair::new_user().public_key(),
        "iat": now_secs(),
        "iss": issuer.public_key(),
        "name": "test",
        "sub": subject,
        "nats": nats,
    });
    let claims = b64.encode(claims.to_string());
    let sig = issuer
        .sign(format!("{header}.{claims}").as_bytes())
        .unwrap();
    format!("{header}.{claims}.{}", b64.encode(sig))
}

/// An operator, its system account, an account with JetStream, and a
/// user's `.creds` file; the
/// server config that trusts them. `sub` is the user's subscribe
/// permissions. Returns (config file, creds file).
fn operator_mode(dir: &Path, sub: Value) -> (PathBuf, PathBuf) {
    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        json!({
            "type": "account",
            "version": 2,
            "limits": {
                "subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1,
                "data": -1, "payload": -1, "wildcards": true,
                "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
            },
        }),
    );
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        json!({"type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        json!({"type": "user", "version": 2, "pub": {}, "sub": sub, "subs": -1, "data": -1, "payload": -1}),
    );
    let conf = dir.join("operator.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: {system_jwt}\n  {acc}: {account_jwt}\n}}\n",
            sys = system.public_key(),
            acc = account.public_key()
        ),
    )
    .unwrap();
    let creds = dir.join("user.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().unwrap()
        ),
    )
    .unwrap();
    (conf, creds)
}

/// A nats-server in operator mode (`sub`: the relay user's subscribe
/// permissions), a relay signed in with the user's creds, and a publisher
/// signed in with them too. `dir` holds the files.
async fn operator_mode_relay(dir: &Path, sub: Value) -> (NatsServer, Relay, async_nats::Client) {
    let (conf, creds) = operator_mode(dir, sub);
    let nats = NatsServer::start_with(NatsServerOptions {
        args: vec!["-c".into(), conf.to_str().unwrap().into()],
        ..Default::default()
    })
    .await;
    let creds_arg = creds.to_str().unwrap();
    let relay = Relay::start(&nats.url(), &["--nats-creds", creds_arg], &[]).await;
    let publisher = async_nats::ConnectOptions::with_credentials_file(creds.clone())
        .await
        .expect("creds")
        .connect(nats.url())
        .await
        .expect("publisher with the creds");
    (nats, relay, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_connections_sign_in_with_the_creds_file() {
    within(Duration::from_secs(60), "creds", async {
        let dir = tempfile::tempdir().unwrap();
        let (nats, relay, publisher) = operator_mode_relay(dir.path(), json!({})).await;
        let names: Vec<String> = relay_connections(&nats)
            .await
            .iter()
            .filter_map(|c| c["name"].as_str().map(String::from))
            .collect();
        assert_eq!(names, ["sse-relay/0", "sse-relay/0/live"]);
        live_event_arrives(&relay, &nats, publisher).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_s_two_connections_start_on_one_node_and_relays_spread() {
    within(Duration::from_secs(120), "seeds", async {
        let cluster = NatsCluster::start(3).await;
        let js = async_nats::jetstream::new(cluster.client().await);
        cluster
            .create_stream(&js, events_stream_config(), WAIT)
            .await;
        let mut nodes = std::collections::HashSet::new();
        // Ten relays in turn: each one's two connections on one node, and
        // not every relay on the same node (that ten random starts pick
        // one node is 1 in 19,683).
        for _ in 0..10 {
            let relay = Relay::start_existing_stream(&cluster.url_list(), &[]).await;
            let requests = cluster.wait_connection("sse-relay/0", WAIT).await;
            let feed = cluster.wait_connection("sse-relay/0/live", WAIT).await;
            assert_eq!(requests, feed, "a shard's connections on one node");
            nodes.insert(feed);
            drop(relay);
            poll_until(WAIT, "the relay's connections gone", || async {
                (cluster.node_with_connection("sse-relay/0").await.is_none()
                    && cluster
                        .node_with_connection("sse-relay/0/live")
                        .await
                        .is_none())
                .then_some(())
            })
            .await;
        }
        assert!(nodes.len() > 1, "every relay started on node {nodes:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_nats_refuses_is_a_503_not_a_silent_stream() {
    within(Duration::from_secs(60), "refused", async {
        let dir = tempfile::tempdir().unwrap();
        // The relay's user may not read one subject's live copies.
        let deny = json!({"deny": ["relay.events.secret"]});
        let (nats, relay, publisher) = operator_mode_relay(dir.path(), deny).await;
        let tok = token(SECRET, &["events.>"], 300);
        let refused = relay
            .get(
                &events_path(&["events.secret"]),
                &[("authorization", &bearer(&tok))],
            )
            .await;
        assert_json_error(&refused, 503, "a subscription NATS refused");
        assert!(
            relay.log().contains("Permissions Violation"),
            "the log says why: {}",
            tail(&relay.log(), 2000)
        );
        // Other subjects are served.
        live_event_arrives(&relay, &nats, publisher).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_connections_sign_in_with_the_user_info_of_the_url() {
    within(Duration::from_secs(60), "url user info", async {
        let with = |args: &[&str]| NatsServerOptions {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        // A user and password, then a token.
        let cases = [
            (
                &["--user", "alice", "--pass", "s3cret"][..],
                "alice:s3cret@",
            ),
            (&["--auth", "t0ken-s3cret"][..], "t0ken-s3cret@"),
        ];
        for (server_args, info) in cases {
            let nats = NatsServer::start_with(with(server_args)).await;
            let url = nats.url().replace("nats://", &format!("nats://{info}"));
            let relay = Relay::start(&url, &[], &[]).await;
            let names: Vec<String> = relay_connections(&nats)
                .await
                .iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect();
            assert_eq!(names, ["sse-relay/0", "sse-relay/0/live"], "{info}");
            let publisher = match server_args[0] {
                "--user" => {
                    async_nats::ConnectOptions::with_user_and_password(
                        "alice".into(),
                        "s3cret".into(),
                    )
                    .connect(nats.url())
                    .await
                }
                _ => {
                    async_nats::ConnectOptions::with_token("t0ken-s3cret".into())
                        .connect(nats.url())
                        .await
                }
            }
            .expect("publisher signed in");
            live_event_arrives(&relay, &nats, publisher).await;
            assert!(
                !relay.log().contains("s3cret"),
                "the secret is in the log: {}",
                tail(&relay.log(), 2000)
            );
        }
    })
    .await
}
