//! HTTP routes, and the ONE place where errors become statuses.
//!
//! `GET /events` (the stream), `/healthz`, `/readyz`, `/metrics`, and in dev
//! mode the demo page and `POST /dev/publish`. Every response to an allowed
//! origin carries CORS headers, refusals included: a browser closes a
//! cross-origin EventSource for good when they are missing.

use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};

use crate::auth::{AuthError, Verifier};
use crate::config::{Config, Cors};
use crate::hub::{Hub, JoinError};
use crate::metrics::{Metrics, Reason, Source};
use crate::nats::{Link, Scope};
use crate::replay::Replayer;
use crate::sse::SseBody;
use crate::subject::{self, SubjectError};

/// Most subjects one stream may ask for; each costs a topic lookup.
const MAX_SUBJECTS: usize = 64;

/// Everything the routes need; shared by every connection.
pub struct App {
    pub cfg: Arc<Config>,
    pub verifier: Verifier,
    pub metrics: Arc<Metrics>,
    /// Set once NATS answered and the stream's scope is known.
    pub live: OnceLock<Live>,
    pub link: OnceLock<Arc<Link>>,
    pub draining: AtomicBool,
    /// Dev mode only: the demo page with its token filled in.
    pub demo_page: Option<String>,
}

/// The NATS-backed half of the app, available once the stream is loaded.
pub struct Live {
    pub hub: Arc<Hub>,
    pub scope: Arc<Scope>,
    pub nats: async_nats::Client,
    pub replayer: Replayer,
}

/// A refusal: status, stable code, and a sentence for humans.
#[derive(Debug)]
pub enum ApiError {
    Auth(AuthError),
    Forbidden(String),
    BadSubject(SubjectError),
    OutsideStream(String),
    BadQuery(String),
    BadLastEventId(String),
    NotFound,
    MethodNotAllowed(&'static str),
    /// NATS away, starting up, or draining: come back soon.
    Unavailable(&'static str),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadSubject(_)
            | ApiError::OutsideStream(_)
            | ApiError::BadQuery(_)
            | ApiError::BadLastEventId(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Auth(_) => "invalid_token",
            ApiError::Forbidden(_) => "forbidden_subject",
            ApiError::BadSubject(_) => "invalid_subject",
            ApiError::OutsideStream(_) => "subject_outside_stream",
            ApiError::BadQuery(_) => "invalid_query",
            ApiError::BadLastEventId(_) => "invalid_last_event_id",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    fn message(&self) -> String {
        match self {
            ApiError::Auth(e) => e.to_string(),
            ApiError::Forbidden(p) => format!("the token does not grant subject {p:?}"),
            ApiError::BadSubject(e) => e.to_string(),
            ApiError::OutsideStream(p) => {
                format!("subject {p:?} is not stored by this relay's stream")
            }
            ApiError::BadQuery(m) | ApiError::BadLastEventId(m) => m.clone(),
            ApiError::NotFound => "no such endpoint".into(),
            ApiError::MethodNotAllowed(allow) => format!("method not allowed; use {allow}"),
            ApiError::Unavailable(why) => format!("{why}; retry shortly"),
        }
    }

    fn into_response(self, app: &App, wants_stream: bool) -> Response<SseBody> {
        app.metrics
            .refusals
            .get_or_create(&Reason {
                reason: self.code(),
            })
            .inc();
        if let ApiError::Unavailable(why) = &self {
            tracing::info!(reason = why, "transient refusal");
            if wants_stream {
                // EventSource gives up for good on any non-200; a 200 that
                // ends at once with a retry hint makes it come back instead.
                let body = format!(": {why}\nretry: {}\n\n", app.cfg.retry_ms);
                return stream_response(SseBody::full(body));
            }
        } else {
            tracing::info!(
                status = self.status().as_u16(),
                error = self.code(),
                "refused"
            );
        }
        let body = serde_json::json!({"error": self.code(), "message": self.message()});
        let mut res = Response::new(SseBody::full(body.to_string()));
        *res.status_mut() = self.status();
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match &self {
            ApiError::Auth(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            ApiError::MethodNotAllowed(allow) => {
                h.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::Unavailable(_) => {
                let secs = app.cfg.retry_ms.div_ceil(1000).max(1);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        res
    }
}

fn stream_response(body: SseBody) -> Response<SseBody> {
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

impl App {
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire)
            && self.live.get().is_some()
            && self.link.get().is_some_and(|l| l.is_connected())
    }

    pub async fn handle<B>(self: Arc<Self>, req: Request<B>) -> Response<SseBody>
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
            preflight()
        } else {
            match self.route(req).await {
                Ok(res) => res,
                Err(e) => e.into_response(&self, wants_stream),
            }
        };
        self.cors(origin.as_ref(), res.headers_mut());
        res
    }

    async fn route<B>(self: &Arc<Self>, req: Request<B>) -> Result<Response<SseBody>, ApiError>
    where
        B: hyper::body::Body + Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        match req.uri().path() {
            "/events" if get => self.events(req.headers(), req.uri().query()).await,
            "/healthz" if get => Ok(text(StatusCode::OK, "ok\n")),
            "/readyz" if get => Ok(if self.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }),
            "/metrics" if get => {
                let mut res = text(StatusCode::OK, self.metrics.render());
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(res)
            }
            "/" if get && self.demo_page.is_some() => {
                let mut res = text(StatusCode::OK, self.demo_page.clone().unwrap_or_default());
                res.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                Ok(res)
            }
            "/dev/publish" if self.cfg.dev.is_some() && req.method() == Method::POST => {
                crate::dev::publish(self, req).await
            }
            "/events" | "/healthz" | "/readyz" | "/metrics" => {
                Err(ApiError::MethodNotAllowed("GET"))
            }
            "/dev/publish" if self.cfg.dev.is_some() => Err(ApiError::MethodNotAllowed("POST")),
            _ => Err(ApiError::NotFound),
        }
    }

    async fn events(
        self: &Arc<Self>,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Response<SseBody>, ApiError> {
        let q = Query::parse(query.unwrap_or(""));
        let token = bearer(headers)
            .or(q.token.as_deref())
            .or_else(|| cookie(headers, "relay_token"))
            .ok_or(ApiError::Auth(AuthError::Missing))?;
        let claims = self.verifier.verify(token).map_err(ApiError::Auth)?;
        let mut patterns = if q.subjects.is_empty() {
            claims.subjects.clone()
        } else {
            q.subjects
        };
        if patterns.is_empty() {
            return Err(ApiError::BadQuery(
                "no subject requested and the token grants none".into(),
            ));
        }
        if patterns.len() > MAX_SUBJECTS {
            return Err(ApiError::BadQuery(format!(
                "at most {MAX_SUBJECTS} subjects per stream"
            )));
        }
        patterns.sort();
        patterns.dedup();
        for p in &patterns {
            subject::validate_pattern(p).map_err(ApiError::BadSubject)?;
        }
        let live = match (self.live.get(), self.draining.load(Ordering::Acquire)) {
            (_, true) => return Err(ApiError::Unavailable("the relay is shutting down")),
            (None, _) => {
                return Err(ApiError::Unavailable(
                    "the relay is not connected to NATS yet",
                ));
            }
            (Some(live), _) => live,
        };
        if !self.link.get().is_some_and(|l| l.is_connected()) {
            return Err(ApiError::Unavailable("NATS is unreachable"));
        }
        for p in &patterns {
            if !live.scope.covers(p) {
                return Err(ApiError::OutsideStream(p.clone()));
            }
            if !claims.subjects.iter().any(|g| subject::contains(g, p)) {
                return Err(ApiError::Forbidden(p.clone()));
            }
        }
        let resume = self
            .resume_point(headers, q.last_event_id.as_deref(), live)
            .await?;
        let deadline = self.verifier.deadline(claims.exp);
        let joined = live
            .hub
            .join(patterns.clone(), deadline, resume)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "join failed");
                match e {
                    JoinError::ShuttingDown => ApiError::Unavailable("the relay is shutting down"),
                    JoinError::Subscribe(_) => {
                        ApiError::Unavailable("NATS did not accept the subscription")
                    }
                }
            })?;
        tracing::debug!(
            client = joined.id,
            sub = claims.sub.as_deref().unwrap_or("-"),
            "stream opened"
        );
        if let (true, Some(after)) = (joined.needs_replay, resume) {
            self.metrics
                .replay_requests
                .get_or_create(&Source {
                    source: "jetstream",
                })
                .inc();
            // A task for the length of the replay only; the queue holds live
            // frames meanwhile and the body streams what is replayed.
            tokio::spawn(
                live.replayer
                    .clone()
                    .resume(patterns, after, joined.queue.clone()),
            );
        }
        let body = SseBody::stream(joined.queue, joined.id, live.hub.clone());
        Ok(stream_response(body))
    }

    /// The resume point: `Last-Event-ID` (what a reconnecting browser sends)
    /// wins over the `last_event_id` query (what a fresh page carries).
    /// Ids are stream sequences; one beyond the stream's end is refused.
    async fn resume_point(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        live: &Live,
    ) -> Result<Option<u64>, ApiError> {
        let raw = match headers.get("last-event-id") {
            Some(v) => v
                .to_str()
                .map_err(|_| ApiError::BadLastEventId("Last-Event-ID is not text".into()))?,
            None => match query {
                Some(q) => q,
                None => return Ok(None),
            },
        };
        let raw = raw.trim();
        // An empty id is what EventSource sends after an `id:` reset: start
        // from what the stream holds.
        if raw.is_empty() {
            return Ok(Some(0));
        }
        let id: u64 = raw.parse().map_err(|_| {
            ApiError::BadLastEventId(format!(
                "last event id {raw:?} is not an event id (a stream sequence number)"
            ))
        })?;
        if id > live.hub.max_seen() {
            let last = live.hub.learn_last(id, &live.replayer).await.map_err(|e| {
                tracing::warn!(error = %e, "cannot read the stream's last sequence");
                ApiError::Unavailable("JetStream did not answer")
            })?;
            if id > last {
                return Err(ApiError::BadLastEventId(format!(
                    "last event id {id} is beyond the stream's last event ({last})"
                )));
            }
        }
        Ok(Some(id))
    }

    fn cors(&self, origin: Option<&HeaderValue>, h: &mut HeaderMap) {
        let Some(origin) = origin else { return };
        match &self.cfg.cors {
            Cors::Off => return,
            Cors::Any => {
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    HeaderValue::from_static("*"),
                );
            }
            Cors::List(list) => {
                if !list.iter().any(|o| o.as_bytes() == origin.as_bytes()) {
                    return;
                }
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
        }
        h.append(header::VARY, HeaderValue::from_static("Origin"));
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static("retry-after, www-authenticate"),
        );
    }
}

/// Answer to a CORS preflight (fetch-based clients; EventSource never sends one).
fn preflight() -> Response<SseBody> {
    let mut res = Response::new(SseBody::empty());
    *res.status_mut() = StatusCode::NO_CONTENT;
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, last-event-id, cache-control, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    res
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<SseBody> {
    let mut res = Response::new(SseBody::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

/// The `/events` query string.
#[derive(Debug, Default)]
struct Query {
    token: Option<String>,
    subjects: Vec<String>,
    last_event_id: Option<String>,
}

impl Query {
    fn parse(q: &str) -> Query {
        let mut out = Query::default();
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            match &*k {
                "token" => out.token = Some(v.into_owned()),
                "subject" => out.subjects.push(v.into_owned()),
                "last_event_id" => out.last_event_id = Some(v.into_owned()),
                _ => {}
            }
        }
        out
    }
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repeated_subjects_and_decodes() {
        let q = Query::parse("subject=events.a.%3E&subject=events.b.*&token=t%2B1");
        assert_eq!(q.subjects, vec!["events.a.>", "events.b.*"]);
        assert_eq!(q.token.as_deref(), Some("t+1"));
    }

    #[test]
    fn finds_bearer_and_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; relay_token=xyz"),
        );
        assert_eq!(bearer(&h), Some("abc"));
        assert_eq!(cookie(&h, "relay_token"), Some("xyz"));
        assert_eq!(cookie(&h, "missing"), None);
    }
}
