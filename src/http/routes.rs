//! Routing: `GET /events` (a [`session`](crate::session)), `/healthz`,
//! `/readyz`, `/metrics`, CORS on every answer, and any routes an
//! [`Extension`](crate::app::Extension) adds.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use super::cors;
use super::error::{respond, stream_response, text};
use crate::app::App;
use crate::client::SseBody;
use crate::error::ApiError;

/// Largest request body an extension route accepts.
pub const MAX_EXTENSION_BODY: usize = 1024 * 1024;

/// Whether a request to `path` may carry a body: only extension routes
/// read one.
pub(crate) fn takes_body(app: &App, path: &str) -> bool {
    path.starts_with(crate::publish::PREFIX)
        || app
            .extension
            .as_ref()
            .is_some_and(|x| x.allows(path).is_some())
}

/// The whole body, at most `limit` bytes (413 beyond, told by
/// Content-Length before reading when it says so).
async fn read_body<B>(headers: &hyper::HeaderMap, body: B, limit: usize) -> Result<Bytes, ApiError>
where
    B: hyper::body::Body + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::PayloadTooLarge(limit));
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(b) => Ok(b.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::PayloadTooLarge(limit))
        }
        Err(_) => Err(ApiError::BadBody("the body could not be read".into())),
    }
}

/// Answers one request. Never fails: every refusal is a response.
pub(crate) async fn handle<B>(app: Arc<App>, req: Request<B>) -> Response<SseBody>
where
    B: hyper::body::Body + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let origin = req.headers().get(header::ORIGIN).cloned();
    let wants_stream = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let mut res = if req.method() == Method::OPTIONS {
        cors::preflight()
    } else {
        match route(&app, req).await {
            Ok(res) => res,
            Err(e) => respond(e, &app.metrics, app.cfg.retry_ms, wants_stream),
        }
    };
    cors::apply(&app.cfg.cors, origin.as_ref(), res.headers_mut());
    res.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    res
}

async fn route<B>(app: &Arc<App>, req: Request<B>) -> Result<Response<SseBody>, ApiError>
where
    B: hyper::body::Body + Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    match req.uri().path() {
        "/events" if get => {
            let conn = req.extensions().get::<super::conn::ConnInfo>().copied();
            if conn.is_some_and(|c| c.over_capacity) {
                return Err(ApiError::AtCapacity);
            }
            let peer = conn.map_or(std::net::Ipv4Addr::LOCALHOST.into(), |c| c.peer);
            let body = crate::session::open(app, req.headers(), req.uri().query(), peer).await?;
            Ok(stream_response(body))
        }
        "/healthz" if get => Ok(text(StatusCode::OK, "ok\n")),
        "/readyz" if get => Ok(if app.is_ready() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }),
        "/metrics" if get => {
            let mut res = text(StatusCode::OK, app.metrics.render(&scrape(app).await));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::Metrics::CONTENT_TYPE),
            );
            Ok(res)
        }
        "/events" | "/healthz" | "/readyz" | "/metrics" => Err(ApiError::MethodNotAllowed("GET")),
        path if path.starts_with(crate::publish::PREFIX) => {
            if req.method() != Method::POST {
                return Err(ApiError::MethodNotAllowed("POST"));
            }
            let (parts, body) = req.into_parts();
            let body = read_body(&parts.headers, body, crate::publish::MAX_PUBLISH_BYTES).await?;
            crate::publish::publish(app, parts.uri.path(), &parts.headers, body).await
        }
        path => match app
            .extension
            .as_ref()
            .and_then(|x| Some((x, x.allows(path)?)))
        {
            Some((ext, allow)) if allow.split(", ").any(|m| m == req.method().as_str()) => {
                let (parts, body) = req.into_parts();
                let body = read_body(&parts.headers, body, MAX_EXTENSION_BODY).await?;
                ext.call(
                    app.clone(),
                    parts.method,
                    parts.uri.path().to_string(),
                    body,
                )
                .await
            }
            Some((_, allow)) => Err(ApiError::MethodNotAllowed(allow)),
            None => Err(ApiError::NotFound),
        },
    }
}

/// What `/metrics` reads at scrape time: the process' memory and
/// descriptors (off the event loop: listing descriptors visits every
/// socket), and the stream's last sequence when NATS answers in time.
async fn scrape(app: &App) -> crate::metrics::Scrape {
    // Single flight, reused for a second: concurrent scrapes wait for one.
    let mut cached = app.metrics.scrape.lock().await;
    if let Some((at, s)) = *cached
        && at.elapsed() < crate::metrics::SCRAPE_REUSE
    {
        return s;
    }
    let s = read_scrape(app).await;
    *cached = Some((std::time::Instant::now(), s));
    s
}

async fn read_scrape(app: &App) -> crate::metrics::Scrape {
    let process = tokio::task::spawn_blocking(crate::metrics::Scrape::process);
    let stream_last = async {
        let live = app.live().ok()?;
        let bounds = live.history.bounds_uncounted();
        tokio::time::timeout(std::time::Duration::from_millis(500), bounds)
            .await
            .ok()?
            .ok()
            .map(|b| b.last)
    };
    let (process, stream_last) = tokio::join!(process, stream_last);
    crate::metrics::Scrape {
        stream_last,
        ..process.unwrap_or_default()
    }
}
