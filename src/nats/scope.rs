//! The stream a relay serves: its [`Scope`] (what clients may ask for, where
//! live copies of events are republished), read or created at start-up.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use crate::subject;

/// The stream a relay serves and how its events reach the live path.
#[derive(Debug, Clone)]
pub struct Scope {
    pub stream: String,
    /// The stream's subjects: clients may only ask for patterns inside these.
    pub subjects: Vec<String>,
    /// RePublish source and destination (`events.>` -> `relay.events.>`).
    pub src: String,
    pub dest: String,
}

/// Why a stream cannot be served; the message tells the operator the fix.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(
        "stream {0} does not exist: create it with `nats stream add --config nats/stream.json` or start the relay with --create-stream"
    )]
    Missing(String),
    #[error(
        "stream {0} has no republish: the relay needs live copies of events, e.g. `\"republish\": {{\"src\": \"events.>\", \"dest\": \"relay.events.>\"}}` (see nats/stream.json)"
    )]
    NoRepublish(String),
    #[error(
        "stream {0} republishes headers only; the relay needs payloads (set headers_only to false)"
    )]
    HeadersOnly(String),
    #[error(
        "stream {stream}: republish {src} -> {dest} must map a fixed prefix with the same wildcard tail, e.g. events.> -> relay.events.>"
    )]
    BadRepublish {
        stream: String,
        src: String,
        dest: String,
    },
    #[error("NATS request failed: {0}")]
    Nats(String),
}

impl StreamError {
    /// Errors worth retrying (NATS away, JetStream electing a leader).
    pub fn is_transient(&self) -> bool {
        matches!(self, StreamError::Nats(_))
    }
}

impl Scope {
    pub(crate) fn from_config(cfg: &stream::Config) -> Result<Scope, StreamError> {
        let Some(rp) = &cfg.republish else {
            return Err(StreamError::NoRepublish(cfg.name.clone()));
        };
        if rp.headers_only {
            return Err(StreamError::HeadersOnly(cfg.name.clone()));
        }
        let bad = || StreamError::BadRepublish {
            stream: cfg.name.clone(),
            src: rp.source.clone(),
            dest: rp.destination.clone(),
        };
        if subject::map_prefix(&rp.source, &rp.source, &rp.destination).is_none() {
            return Err(bad());
        }
        Ok(Scope {
            stream: cfg.name.clone(),
            subjects: cfg.subjects.clone(),
            src: rp.source.clone(),
            dest: rp.destination.clone(),
        })
    }

    /// Is `pattern` something this stream stores and republishes?
    pub fn covers(&self, pattern: &str) -> bool {
        self.subjects.iter().any(|s| subject::contains(s, pattern))
            && subject::contains(&self.src, pattern)
    }

    /// Does `pattern` take every event the stream stores (and republishes)?
    pub fn is_dense(&self, pattern: &str) -> bool {
        !self.subjects.is_empty()
            && self
                .subjects
                .iter()
                .all(|s| subject::contains(pattern, s) && subject::contains(&self.src, s))
    }

    /// The subject the relay subscribes to for live events of `pattern`.
    pub fn live_subject(&self, pattern: &str) -> Option<String> {
        subject::map_prefix(pattern, &self.src, &self.dest)
    }
}

/// The default stream `--create-stream` makes.
pub fn default_stream_config(name: &str) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects: vec!["events.>".into()],
        max_age: Duration::from_secs(24 * 3600),
        allow_direct: true,
        republish: Some(stream::Republish {
            source: "events.>".into(),
            destination: "relay.events.>".into(),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Reads (or creates) the stream and returns its [`Scope`].
pub(crate) async fn load_scope(
    js: &jetstream::Context,
    name: &str,
    create: bool,
) -> Result<Scope, StreamError> {
    let cfg = match js.get_stream(name).await {
        Ok(mut s) => s
            .info()
            .await
            .map_err(|e| StreamError::Nats(e.to_string()))?
            .config
            .clone(),
        Err(e) => {
            let missing = matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            );
            if !missing {
                return Err(StreamError::Nats(e.to_string()));
            }
            if !create {
                return Err(StreamError::Missing(name.to_string()));
            }
            tracing::info!(stream = name, "creating stream");
            js.create_stream(default_stream_config(name))
                .await
                .map_err(|e| StreamError::Nats(e.to_string()))?
                .cached_info()
                .config
                .clone()
        }
    };
    Scope::from_config(&cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_maps_patterns_to_the_republish_destination() {
        let scope = Scope::from_config(&default_stream_config("EVENTS")).unwrap();
        assert!(scope.covers("events.orders.*"));
        assert!(!scope.covers("other.x"));
        assert!(!scope.covers(">"));
        assert!(scope.is_dense("events.>"));
        assert!(!scope.is_dense("events.orders.>"));
        assert_eq!(
            scope.live_subject("events.orders.*").as_deref(),
            Some("relay.events.orders.*")
        );
    }

    #[test]
    fn scope_requires_a_payload_republish() {
        let mut cfg = default_stream_config("EVENTS");
        cfg.republish = None;
        assert!(matches!(
            Scope::from_config(&cfg),
            Err(StreamError::NoRepublish(_))
        ));
        let mut cfg = default_stream_config("EVENTS");
        cfg.republish.as_mut().unwrap().headers_only = true;
        assert!(matches!(
            Scope::from_config(&cfg),
            Err(StreamError::HeadersOnly(_))
        ));
    }
}
