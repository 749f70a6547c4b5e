//! Keys from a JWKS URL (`--jwks-url`): fetched over HTTPS, cached by
//! `kid`, refreshed every `--jwks-refresh` and when a token names a `kid`
//! the cache does not hold. Such refreshes happen at most once a second
//! and are shared by every request waiting, so tokens with made-up `kid`s
//! cannot multiply fetches. A key verifies only its own algorithm: the
//! JWK's `alg`, or when it has none, its key type's family.
//!
//! Plain `http://` is accepted only for a loopback host (a sidecar, tests):
//! anywhere else keys must not travel unauthenticated.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::time::Instant;

/// At most one fetch for unknown `kid`s per interval.
const MIN_REFETCH: Duration = Duration::from_secs(1);
/// Bound on one fetch.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest key set accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One usable key of the set.
#[derive(Clone)]
pub(crate) struct SetKey {
    pub(crate) key: DecodingKey,
    pub(crate) algorithms: Vec<Algorithm>,
}

pub struct Jwks {
    url: reqwest::Url,
    refresh: Duration,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, SetKey>>,
    /// When the keys were last fetched successfully.
    loaded_at: Mutex<Option<Instant>>,
    /// Fetches started so far; a caller is served by any fetch that started
    /// after it arrived.
    started: AtomicU64,
    /// The number and end of the last fetch (held while fetching).
    fetched: tokio::sync::Mutex<(u64, Option<Instant>)>,
    /// A periodic refresh is running: requests meanwhile start no other.
    refreshing: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("url", &self.url.as_str())
            .finish()
    }
}

impl Jwks {
    /// Checks the URL; fetches nothing yet.
    pub fn new(url: &str, refresh: Duration) -> Result<Jwks, String> {
        let url: reqwest::Url = url
            .parse()
            .map_err(|e| format!("--jwks-url {url:?} is not a URL: {e}"))?;
        let loopback = match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(d)) => d == "localhost",
            None => false,
        };
        match url.scheme() {
            "https" => {}
            "http" if loopback => {}
            _ => {
                return Err(format!(
                    "--jwks-url {url} must be https:// (http:// only on a loopback address)"
                ));
            }
        }
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot set up the JWKS client: {e}"))?;
        Ok(Jwks {
            url,
            refresh: refresh.max(MIN_REFETCH),
            client,
            keys: RwLock::default(),
            loaded_at: Mutex::default(),
            started: AtomicU64::new(0),
            fetched: tokio::sync::Mutex::new((0, None)),
            refreshing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    #[cfg(test)]
    pub(crate) fn refresh_interval(&self) -> Duration {
        self.refresh
    }

    pub(crate) fn key(&self, kid: &str) -> Option<SetKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kid)
            .cloned()
    }

    /// Whether a key set was ever loaded.
    pub(crate) fn is_loaded(&self) -> bool {
        self.loaded_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Starts the periodic refresh when it is due, once however many
    /// requests notice it.
    pub(crate) fn refresh_if_due(self: &std::sync::Arc<Self>) {
        if !self.is_loaded() || !self.is_stale() || self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let jwks = self.clone();
        tokio::spawn(async move {
            jwks.refresh().await;
            jwks.refreshing.store(false, Ordering::Release);
        });
    }

    /// Whether the periodic refresh is due.
    fn is_stale(&self) -> bool {
        self.loaded_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_none_or(|at| at.elapsed() >= self.refresh)
    }

    /// Fetches the key set again, unless a fetch that started after this
    /// call did has completed; at most one fetch per [`MIN_REFETCH`].
    pub(crate) async fn refresh(&self) {
        let arrived = self.started.load(Ordering::Acquire);
        let mut fetched = self.fetched.lock().await;
        let (completed, at) = *fetched;
        if completed > arrived {
            return;
        }
        if let Some(at) = at {
            tokio::time::sleep_until(at + MIN_REFETCH).await;
        }
        let number = self.started.fetch_add(1, Ordering::AcqRel) + 1;
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), "token keys loaded");
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
                *self.loaded_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
            Err(e) => tracing::warn!(url = %self.url, error = %e, "cannot load the token keys"),
        }
        *fetched = (number, Some(Instant::now()));
    }

    async fn fetch(&self) -> Result<HashMap<String, SetKey>, String> {
        let mut res = self
            .client
            .get(self.url.clone())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !res.status().is_success() {
            return Err(format!("status {}", res.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| e.to_string())? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("the key set is over {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_key_set(&body)
    }
}

/// The usable keys of a JWKS document, by `kid`. Keys without a `kid`, of
/// an unknown type, or that fail to load are skipped; a set with no usable
/// key is an error (it would refuse every token).
pub(crate) fn parse_key_set(body: &[u8]) -> Result<HashMap<String, SetKey>, String> {
    let set: JwkSet = serde_json::from_slice(body).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = &jwk.common.key_id else {
            continue;
        };
        let (Some(algorithms), Ok(key)) = (algorithms_of(jwk), DecodingKey::from_jwk(jwk)) else {
            continue;
        };
        keys.insert(kid.clone(), SetKey { key, algorithms });
    }
    if keys.is_empty() {
        return Err("the key set holds no usable key with a kid".into());
    }
    Ok(keys)
}

/// The algorithms a key may verify: its `alg`, else its type's family.
/// Symmetric keys (`oct`) are never taken from a URL.
fn algorithms_of(jwk: &Jwk) -> Option<Vec<Algorithm>> {
    use Algorithm::*;
    let family: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![RS256, RS384, RS512, PS256, PS384, PS512],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![ES256],
            EllipticCurve::P384 => vec![ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(_) => vec![EdDSA],
        _ => return None,
    };
    match jwk.common.key_algorithm {
        Some(alg) => {
            let alg = Algorithm::try_from(alg).ok()?;
            family.contains(&alg).then(|| vec![alg])
        }
        None => Some(family),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED_X: &str = "_I2ybrRQooafKx8zomDBEM-dgMq0thnvyF7Z0Vac4GM";

    #[test]
    fn only_https_or_loopback_http() {
        let ok = [
            "https://keys.example/jwks.json",
            "http://127.0.0.1:9/k",
            "http://localhost/k",
            "http://[::1]:8/k",
        ];
        for u in ok {
            assert!(Jwks::new(u, Duration::from_secs(60)).is_ok(), "{u}");
        }
        for u in [
            "http://keys.example/jwks.json",
            "ftp://127.0.0.1/k",
            "not a url",
        ] {
            assert!(Jwks::new(u, Duration::from_secs(60)).is_err(), "{u}");
        }
    }

    #[test]
    fn keys_are_taken_by_kid_with_their_own_algorithm() {
        let doc = serde_json::json!({"keys": [
            {"kty": "OKP", "crv": "Ed25519", "x": ED_X, "kid": "a"},
            {"kty": "OKP", "crv": "Ed25519", "x": ED_X, "kid": "b", "alg": "EdDSA"},
            {"kty": "OKP", "crv": "Ed25519", "x": ED_X},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "OKP", "crv": "Ed25519", "x": ED_X, "kid": "liar", "alg": "RS256"},
        ]});
        let keys = parse_key_set(doc.to_string().as_bytes()).unwrap();
        let mut kids: Vec<&String> = keys.keys().collect();
        kids.sort();
        assert_eq!(
            kids,
            ["a", "b"],
            "no kid, symmetric and mismatched keys are skipped"
        );
        assert_eq!(keys["a"].algorithms, [Algorithm::EdDSA]);
        assert!(parse_key_set(br#"{"keys": []}"#).is_err());
        assert!(parse_key_set(b"<html>").is_err());
    }
}
