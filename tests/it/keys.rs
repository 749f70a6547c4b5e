//! Token keys from a JWKS URL: a local key server that rotates its keys, and
//! a relay that follows it. An old token keeps working until its key is
//! removed; a token signed by a new key works right after the key appears;
//! made-up `kid`s cannot multiply fetches.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

const KEY_A: &[u8] = include_bytes!("fixtures/ed25519-a.pem");
const X_A: &str = include_str!("fixtures/ed25519-a.x");
const KEY_B: &[u8] = include_bytes!("fixtures/ed25519-b.pem");
const X_B: &str = include_str!("fixtures/ed25519-b.x");

/// Serves a JWKS document the test can change, counting fetches.
struct KeyServer {
    addr: String,
    doc: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KeyServer {
    async fn start(keys: &[(&str, &str)]) -> KeyServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let doc = Arc::new(Mutex::new(jwks(keys)));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (d, f) = (doc.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (d, f) = (d.clone(), f.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        f.fetch_add(1, Ordering::SeqCst);
                        let body = d.lock().unwrap().clone();
                        async move {
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        KeyServer {
            addr,
            doc,
            fetches,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn set(&self, keys: &[(&str, &str)]) {
        *self.doc.lock().unwrap() = jwks(keys);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for KeyServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A JWKS of Ed25519 public keys `(kid, x)`.
fn jwks(keys: &[(&str, &str)]) -> String {
    let keys: Vec<_> = keys
        .iter()
        .map(|(kid, x)| json!({"kty": "OKP", "crv": "Ed25519", "x": x.trim(), "kid": kid, "use": "sig"}))
        .collect();
    json!({ "keys": keys }).to_string()
}

/// A one-shard relay taking its keys from `url`.
fn jwks_relay(nats: &NatsServer, url: &str, extra: &[&str]) -> Relay {
    let mut args: Vec<String> = [
        "--nats-url",
        &nats.url(),
        "--create-stream",
        "--workers",
        "1",
        "--jwks-url",
        url,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Relay::spawn_serve(args, &[])
}

fn ed_token(pem: &[u8], kid: &str) -> String {
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(kid.into());
    let claims = json!({"exp": now_secs() + 300, "sub": "k", "subjects": ["events.keys.>"]});
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_pem(pem).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_through_the_jwks_url() {
    within(
        Duration::from_secs(60),
        "keys_rotate_through_the_jwks_url",
        async {
            let keys = KeyServer::start(&[("a", X_A)]).await;
            let nats = NatsServer::start().await;
            let mut relay = jwks_relay(&nats, &keys.url(), &["--jwks-refresh", "2"]);
            relay.wait_ready(WAIT).await;
            // A subject the tokens do not grant: a token that verifies gets
            // 403 at once, one that does not gets 401; no stream stays open.
            let path = events_path(&["events.elsewhere"]);
            let status = |tok: String| {
                let (relay, path) = (&relay, path.clone());
                async move {
                    relay
                        .get(
                            &path,
                            &[
                                ("Authorization", &bearer(&tok)),
                                ("Accept", "application/json"),
                            ],
                        )
                        .await
                }
            };

            let token_a = ed_token(KEY_A, "a");
            let c = relay.open_stream(&nats, &token_a, &["events.keys.>"]).await;
            assert_eq!(c.status, 200, "a token signed by a listed key");
            drop(c);
            assert_401(&status(ed_token(KEY_B, "b")).await, "a key not listed yet");
            // The right kid with the wrong key, and an algorithm the key is not for.
            assert_401(&status(ed_token(KEY_B, "a")).await, "kid a, signed by b");
            let hs = {
                let mut h = Header::new(Algorithm::HS256);
                h.kid = Some("a".into());
                let claims = json!({"exp": now_secs() + 300, "subjects": ["events.keys.>"]});
                jsonwebtoken::encode(
                    &h,
                    &claims,
                    &EncodingKey::from_secret(X_A.trim().as_bytes()),
                )
                .unwrap()
            };
            assert_401(&status(hs).await, "HS256 under an Ed25519 kid");

            assert_json_error(
                &status(token_a.clone()).await,
                403,
                "valid token, ungranted subject",
            );

            // Made-up kids share fetches: at most about one per second.
            let before = keys.fetches();
            let start = Instant::now();
            let made_up: Vec<_> = (0..40)
                .map(|i| status(ed_token(KEY_B, &format!("made-up-{i}"))))
                .collect();
            for r in futures_util::future::join_all(made_up).await {
                assert_401(&r, "unknown kid");
            }
            let fetched = keys.fetches() - before;
            let bound = start.elapsed().as_secs() as usize + 2;
            assert!(
                fetched <= bound,
                "40 unknown kids cost {fetched} fetches (bound {bound})"
            );

            // Rotation: b appears, a is still listed.
            keys.set(&[("a", X_A), ("b", X_B)]);
            let c = relay
                .open_stream(&nats, &ed_token(KEY_B, "b"), &["events.keys.>"])
                .await;
            assert_eq!(c.status, 200, "a new key works right after it appears");
            drop(c);
            assert_eq!(
                relay
                    .open_stream(&nats, &token_a, &["events.keys.>"])
                    .await
                    .status,
                200,
                "the old key still works while listed"
            );
            // a is removed: its tokens stop working at the next refresh.
            keys.set(&[("b", X_B)]);
            poll_until(WAIT, "the removed key to stop verifying", || async {
                (status(token_a.clone()).await.status == 401).then_some(())
            })
            .await;
            assert_json_error(&status(ed_token(KEY_B, "b")).await, 403, "b still verifies");
            assert!(
                !relay.log().contains(&token_a),
                "tokens never reach the log"
            );
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_wait_for_the_first_key_set() {
    within(TEST_LIMIT, "streams_wait_for_the_first_key_set", async {
        // Nothing listens here: the key set never loads.
        let url = format!("http://127.0.0.1:{}/jwks.json", free_port());
        let nats = NatsServer::start().await;
        let mut relay = jwks_relay(&nats, &url, &[]);
        relay.wait_ready(WAIT).await;
        let path = events_path(&["events.keys.>"]);
        let auth = bearer(&ed_token(KEY_A, "a"));
        let r = relay
            .get(
                &path,
                &[("Authorization", &auth), ("Accept", "application/json")],
            )
            .await;
        assert_json_error(&r, 503, "keys not loaded");
        assert!(r.header("retry-after").is_some());
        let c = SseClient::connect(relay.addr(), &path, &[("Authorization", &auth)]).await;
        assert_eq!(
            c.status, 200,
            "an EventSource is told to come back, not refused"
        );
    })
    .await
}
