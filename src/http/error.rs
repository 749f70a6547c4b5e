//! The ONE place where errors become statuses: [`ApiError`] names every
//! refusal, with its status, a stable code and a sentence for humans,
//! rendered as JSON `{"error", "message"}` with the right headers.

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::auth::AuthError;
use crate::client::SseBody;
use crate::limits::Refused;
use crate::metrics::{Metrics, Reason};
use crate::sse;
use crate::subject::SubjectError;

/// A refusal: status, stable code, and a sentence for humans.
#[derive(Debug)]
pub enum ApiError {
    Auth(AuthError),
    Forbidden(String),
    BadSubject(SubjectError),
    OutsideStream(String),
    BadQuery(String),
    /// A request body that is not what the endpoint takes.
    BadBody(String),
    BadLastEventId(String),
    NotFound,
    MethodNotAllowed(&'static str),
    /// NATS away, starting up, or draining: come back soon.
    Unavailable(&'static str),
    /// The process holds `--max-connections`: try another machine.
    AtCapacity,
    /// A per-client limit (429): come back later.
    Limited(Refused),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadSubject(_)
            | ApiError::OutsideStream(_)
            | ApiError::BadQuery(_)
            | ApiError::BadBody(_)
            | ApiError::BadLastEventId(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) | ApiError::AtCapacity => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::Auth(_) => "invalid_token",
            ApiError::Forbidden(_) => "forbidden_subject",
            ApiError::BadSubject(_) => "invalid_subject",
            ApiError::OutsideStream(_) => "subject_outside_stream",
            ApiError::BadQuery(_) => "invalid_query",
            ApiError::BadBody(_) => "invalid_body",
            ApiError::BadLastEventId(_) => "invalid_last_event_id",
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::AtCapacity => "at_capacity",
            ApiError::Limited(_) => "rate_limited",
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
            ApiError::BadQuery(m) | ApiError::BadBody(m) | ApiError::BadLastEventId(m) => m.clone(),
            ApiError::NotFound => "no such endpoint".into(),
            ApiError::MethodNotAllowed(allow) => format!("method not allowed; use {allow}"),
            ApiError::Unavailable(why) => format!("{why}; retry shortly"),
            ApiError::AtCapacity => "the relay is at its connection limit; retry shortly".into(),
            ApiError::Limited(r) => format!("{}; retry later", r.as_str()),
        }
    }

    /// The response, counted in `metrics`. `wants_stream`: the client is an
    /// EventSource, which a non-200 would stop for good.
    pub(crate) fn into_response(
        self,
        metrics: &Metrics,
        retry_ms: u64,
        wants_stream: bool,
    ) -> Response<SseBody> {
        metrics
            .refusals
            .get_or_create(&Reason {
                reason: self.code(),
            })
            .inc();
        if self.is_transient() {
            let why = self.message();
            tracing::info!(reason = self.code(), "transient refusal");
            if wants_stream {
                // EventSource gives up for good on any non-200; a 200 that
                // ends at once with a retry hint makes it come back instead,
                // after a jittered delay so refused browsers do not return
                // in step.
                let retry = jittered(retry_ms);
                return stream_response(SseBody::full(sse::encode_refusal(&why, retry)));
            }
        } else {
            // Every client-supplied string in a message is already
            // Debug-escaped ({:?}), so control characters cannot reach the
            // log raw; no message ever holds a token.
            tracing::info!(
                status = self.status().as_u16(),
                error = self.code(),
                message = %self.message(),
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
            ApiError::Unavailable(_) | ApiError::AtCapacity | ApiError::Limited(_) => {
                let secs = retry_ms.div_ceil(1000).max(1);
                h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            _ => {}
        }
        res
    }
}

impl ApiError {
    /// Refusals a client should retry (not its fault, or only for now).
    fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Unavailable(_) | ApiError::AtCapacity | ApiError::Limited(_)
        )
    }
}

/// `ms` plus up to half again, at random.
fn jittered(ms: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(std::time::SystemTime::now());
    ms + r % (ms / 2 + 1)
}

pub(crate) fn stream_response(body: SseBody) -> Response<SseBody> {
    let mut res = Response::new(body);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    // Streams carry private data: no intermediary may keep a copy.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// A plain-text response.
pub(crate) fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<SseBody> {
    let mut res = Response::new(SseBody::full(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}
