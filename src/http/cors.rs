//! CORS: every response to an allowed origin carries the headers, refusals
//! included, because a browser closes a cross-origin EventSource for good
//! when they are missing.

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use crate::client::SseBody;
use crate::config::Cors;

/// Adds the CORS headers for `origin` (if it is allowed) to a response.
pub(crate) fn apply(cors: &Cors, origin: Option<&HeaderValue>, h: &mut HeaderMap) {
    let Some(origin) = origin else { return };
    match cors {
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

/// Answer to a CORS preflight (fetch-based clients; EventSource never sends one).
pub(crate) fn preflight() -> Response<SseBody> {
    let mut res = Response::new(SseBody::empty());
    *res.status_mut() = StatusCode::NO_CONTENT;
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "authorization, last-event-id, cache-control, content-type, sse-event, idempotency-key",
        ),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    res
}
