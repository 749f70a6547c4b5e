//! Renders refusals ([`ApiError`]) as responses: JSON `{"error", "message"}`
//! with the right status and headers, or, for an EventSource and a refusal
//! that is only for now, a 200 stream that ends at once with a `retry:`.

use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use crate::client::SseBody;
use crate::error::ApiError;
use crate::metrics::{Metrics, Reason};
use crate::sse;

/// The response to a refusal, counted in `metrics`. `wants_stream`: the
/// client is an EventSource, which a non-200 would stop for good.
pub(crate) fn respond(
    e: ApiError,
    metrics: &Metrics,
    retry_ms: u64,
    wants_stream: bool,
) -> Response<SseBody> {
    metrics
        .refusals
        .get_or_create(&Reason { reason: e.code() })
        .inc();
    if e.is_transient() {
        let why = e.message();
        tracing::info!(reason = e.code(), "transient refusal");
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
            status = e.status().as_u16(),
            error = e.code(),
            message = %e.message(),
            "refused"
        );
    }
    let body = serde_json::json!({"error": e.code(), "message": e.message()});
    let mut res = Response::new(SseBody::full(body.to_string()));
    *res.status_mut() = e.status();
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match &e {
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
