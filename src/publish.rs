//! `POST /publish/<subject>`: HTTP publish for backends that cannot hold a
//! NATS connection (serverless functions). The token's `publish` claim
//! (patterns, the same containment rule as `subjects`) must grant the
//! subject; the body is the payload; `Sse-Event` passes through as the NATS
//! header; `Idempotency-Key` becomes `Nats-Msg-Id`, so a retried POST is
//! stored once (within the stream's duplicate window). The answer comes
//! only after JetStream acknowledged the message: `{"id": <sequence>}`.

use bytes::Bytes;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use crate::app::App;
use crate::auth::AuthError;
use crate::client::SseBody;
use crate::error::ApiError;
use crate::subject;

/// The path prefix; the rest of the path is the subject.
pub(crate) const PREFIX: &str = "/publish/";

/// Largest body a publish accepts (413 beyond).
pub(crate) const MAX_PUBLISH_BYTES: usize = 1024 * 1024;

/// Publishes `body` on the subject in `path` for the token in `headers`.
pub(crate) async fn publish(
    app: &App,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response<SseBody>, ApiError> {
    let raw = path.strip_prefix(PREFIX).unwrap_or_default();
    let subject = percent_decoded(raw)?;
    let token = crate::session::header_token(headers).ok_or(ApiError::Auth(AuthError::Missing))?;
    let claims = app.verifier.verify(token).map_err(ApiError::Auth)?;
    subject::validate_subject(&subject).map_err(ApiError::BadSubject)?;
    let live = app.live()?;
    if !live.scope.covers(&subject) {
        return Err(ApiError::OutsideStream(subject));
    }
    if !claims
        .publish
        .iter()
        .any(|g| subject::contains(g, &subject))
    {
        return Err(ApiError::Forbidden(subject));
    }
    let mut nats_headers = async_nats::HeaderMap::new();
    if let Some(ev) = text_header(headers, crate::nats::EVENT_HEADER)? {
        nats_headers.insert(crate::nats::EVENT_HEADER, ev);
    }
    if let Some(key) = text_header(headers, "idempotency-key")? {
        nats_headers.insert("Nats-Msg-Id", key);
    }
    let js = async_nats::jetstream::new(live.nats.clone());
    let ack = async {
        js.publish_with_headers(subject.clone(), nats_headers, body)
            .await?
            .await
    }
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, subject = ?subject, "publish not acknowledged");
        ApiError::Unavailable("JetStream did not acknowledge the publish")
    })?;
    tracing::debug!(subject = ?subject, seq = ack.sequence, duplicate = ack.duplicate, "published");
    let out = serde_json::json!({"id": ack.sequence, "duplicate": ack.duplicate});
    let mut res = Response::new(SseBody::full(out.to_string()));
    *res.status_mut() = StatusCode::OK;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}

/// The subject from the path: percent-decoded, valid UTF-8.
fn percent_decoded(raw: &str) -> Result<String, ApiError> {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::BadSubject(subject::SubjectError::NotText(raw.to_string())))
}

/// A request header that must be text if present.
fn text_header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()).filter(|s| !s.is_empty()))
            .map_err(|_| ApiError::BadQuery(format!("the {name} header is not text"))),
    }
}
