//! One-shot HTTP requests through hyper's client, request paths with
//! form-encoded queries, and the assertions on the relay's JSON error
//! answers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::HTTP_TIMEOUT;

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased; repeated headers appear once per value.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}); status {} body {:?}",
                self.status, self.body
            )
        })
    }
}

/// The first value of header `name` (any case) in lowercased `headers`.
pub fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
}

/// Every header of `map` as (lowercase name, value) pairs.
pub fn header_pairs(map: &hyper::HeaderMap) -> Vec<(String, String)> {
    map.iter()
        .map(|(k, v)| {
            let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
            (k.as_str().to_string(), v)
        })
        .collect()
}

/// True if a comma-separated header value lists `token` (case-insensitive).
pub fn header_lists(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// `path` with `pairs` appended as a form-encoded query (`>` becomes `%3E`).
pub fn with_query(path: &str, pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return path.to_string();
    }
    let query = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish();
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}{query}")
}

/// `/events?subject=a&subject=b`, each subject form-encoded.
pub fn events_path(subjects: &[&str]) -> String {
    let pairs: Vec<(&str, &str)> = subjects.iter().map(|s| ("subject", *s)).collect();
    with_query("/events", &pairs)
}

/// One request with `Connection: close`; connection and protocol errors,
/// and no complete response within `limit`, come back as `Err` (for
/// polling a process that may not listen yet).
pub async fn try_request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    limit: Duration,
) -> Result<Response, String> {
    // A client per request: each test runs its own runtime, and a pooled
    // connection must not outlive the runtime that drives it.
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Full<Bytes>>();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("Connection", "close");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = Full::new(Bytes::copy_from_slice(body.unwrap_or_default()));
    let req = req.body(body).map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let (head, body) = resp.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>(Response {
            status: head.status.as_u16(),
            headers: header_pairs(&head.headers),
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    match tokio::time::timeout(limit, exchange).await {
        Ok(r) => r.map_err(|e| format!("{method} http://{addr}{path}: {e}")),
        Err(_) => Err(format!(
            "{method} http://{addr}{path}: no complete response within {limit:?}"
        )),
    }
}

/// Like [`try_request`] bounded by [`HTTP_TIMEOUT`], panicking on failure.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    try_request(addr, method, path, headers, body, HTTP_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

pub async fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    request(addr, "GET", path, headers, None).await
}

/// Asserts an error response: exact status, `Content-Type: application/json`
/// and a JSON body with string fields `error` and `message`.
pub fn assert_json_error(resp: &Response, status: u16, what: &str) {
    assert_eq!(
        resp.status, status,
        "{what}: expected status {status}, got {} (headers {:?}, body {:?})",
        resp.status, resp.headers, resp.body
    );
    let ct = resp.header("content-type").unwrap_or_default();
    assert!(
        ct.to_ascii_lowercase().starts_with("application/json"),
        "{what}: expected Content-Type application/json, got {ct:?}"
    );
    assert_eq!(
        resp.header("x-content-type-options"),
        Some("nosniff"),
        "{what}: every answer carries X-Content-Type-Options: nosniff"
    );
    let v: Value = serde_json::from_str(&resp.body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e}): {:?}", resp.body));
    for field in ["error", "message"] {
        assert!(
            v.get(field)
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty()),
            "{what}: JSON body lacks a string `{field}`: {v}"
        );
    }
}

/// Asserts a 401 with a JSON error body and a `WWW-Authenticate: Bearer ...`.
pub fn assert_401(resp: &Response, what: &str) {
    assert_json_error(resp, 401, what);
    let wa = resp.header("www-authenticate").unwrap_or_else(|| {
        panic!(
            "{what}: 401 without WWW-Authenticate (headers {:?})",
            resp.headers
        )
    });
    assert!(
        wa.starts_with("Bearer"),
        "{what}: WWW-Authenticate should start with `Bearer`, got {wa:?}"
    );
}
