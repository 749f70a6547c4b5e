//! [`ApiError`] names every refusal the relay answers with: its status, a
//! stable code and a sentence for humans. `http` renders it; this module is
//! apart so that everything that refuses (sessions, extension routes) does
//! not depend on the HTTP layer.

use hyper::StatusCode;

use crate::auth::AuthError;
use crate::limits::Refused;
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
    /// A body over the endpoint's limit (bytes).
    PayloadTooLarge(usize),
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
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::Auth(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::BadSubject(_)
            | ApiError::OutsideStream(_)
            | ApiError::BadQuery(_)
            | ApiError::BadBody(_)
            | ApiError::BadLastEventId(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unavailable(_) | ApiError::AtCapacity => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub(crate) fn code(&self) -> &'static str {
        match self {
            ApiError::Auth(_) => "invalid_token",
            ApiError::Forbidden(_) => "forbidden_subject",
            ApiError::BadSubject(_) => "invalid_subject",
            ApiError::OutsideStream(_) => "subject_outside_stream",
            ApiError::BadQuery(_) => "invalid_query",
            ApiError::BadBody(_) => "invalid_body",
            ApiError::BadLastEventId(_) => "invalid_last_event_id",
            ApiError::NotFound => "not_found",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::AtCapacity => "at_capacity",
            ApiError::Limited(_) => "rate_limited",
        }
    }

    pub(crate) fn message(&self) -> String {
        match self {
            ApiError::Auth(e) => e.to_string(),
            ApiError::Forbidden(p) => format!("the token does not grant subject {p:?}"),
            ApiError::BadSubject(e) => e.to_string(),
            ApiError::OutsideStream(p) => {
                format!("subject {p:?} is not stored by this relay's stream")
            }
            ApiError::BadQuery(m) | ApiError::BadBody(m) | ApiError::BadLastEventId(m) => m.clone(),
            ApiError::NotFound => "no such endpoint".into(),
            ApiError::PayloadTooLarge(n) => format!("the body is over {n} bytes"),
            ApiError::MethodNotAllowed(allow) => format!("method not allowed; use {allow}"),
            ApiError::Unavailable(why) => format!("{why}; retry shortly"),
            ApiError::AtCapacity => "the relay is at its connection limit; retry shortly".into(),
            ApiError::Limited(r) => format!("{}; retry later", r.as_str()),
        }
    }

    /// Refusals a client should retry (not its fault, or only for now).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(
            self,
            ApiError::Unavailable(_) | ApiError::AtCapacity | ApiError::Limited(_)
        )
    }
}
