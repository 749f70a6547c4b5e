//! The stream a relay serves: its [`Scope`] (what clients may ask for, where
//! live copies of events are republished), read or created at start-up.
//!
//! A regional read replica is a mirror of the hub's stream: it keeps the
//! origin's sequences (the event ids) but has no `subjects` of its own. Its
//! scope is what it can hold, read from its own config so that a relay
//! starts while the hub is out of reach: the mirror's filter (or its
//! subject transforms' destinations) when it has one, else everything its
//! republish carries. The origin is asked only when a client's id is above
//! everything the mirror holds (`History::last_sequence`).

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
    /// Where a mirror's events come from; None for a stream of its own.
    pub origin: Option<Origin>,
}

/// The stream a mirror copies, and the JetStream API it is reached through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub stream: String,
    /// `$JS.hub.API` for an origin in JetStream domain `hub` (or the
    /// mirror's `external.api`), `$JS.API` for one beside the mirror.
    pub api: String,
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
        let (subjects, origin) = match &cfg.mirror {
            None => (cfg.subjects.clone(), None),
            Some(m) => (mirrored_subjects(m, &rp.source), Some(origin_of(m))),
        };
        Ok(Scope {
            stream: cfg.name.clone(),
            subjects,
            src: rp.source.clone(),
            dest: rp.destination.clone(),
            origin,
        })
    }

    /// Is `pattern` something this stream stores and republishes?
    pub fn covers(&self, pattern: &str) -> bool {
        self.subjects.iter().any(|s| subject::contains(s, pattern))
            && subject::contains(&self.src, pattern)
    }

    /// Does `pattern` take every event the stream stores (and republishes)?
    /// A mirror's subjects are derived, not its own (its origin may store
    /// others, or its filter skip them): never dense.
    pub fn is_dense(&self, pattern: &str) -> bool {
        self.origin.is_none()
            && !self.subjects.is_empty()
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

/// The subjects a mirror can hold: its filter, else the subjects its
/// transforms store under, else anything its republish carries (`src`). A
/// transform whose destination is not a plain pattern (`{{wildcard(1)}}`,
/// `$1`) cannot be checked against, so it widens the scope to `src` too:
/// a pattern there that the origin never stores gets a stream that stays
/// silent, never a refusal of what the mirror does hold.
fn mirrored_subjects(m: &stream::Source, src: &str) -> Vec<String> {
    if let Some(f) = m.filter_subject.as_deref().filter(|f| !f.is_empty()) {
        return vec![f.to_string()];
    }
    let stored: Option<Vec<String>> = m
        .subject_transforms
        .iter()
        .map(|t| {
            let s = if t.destination.is_empty() {
                &t.source
            } else {
                &t.destination
            };
            let plain = subject::validate_pattern(s).is_ok()
                && !s
                    .split('.')
                    .any(|tok| tok.contains("{{") || tok.starts_with('$'));
            plain.then(|| s.clone())
        })
        .collect();
    match stored {
        Some(s) if !s.is_empty() => s,
        _ => vec![src.to_string()],
    }
}

/// Where a mirror's origin answers: its `external.api`, the API of its
/// `domain`, or the JetStream the mirror itself is in.
fn origin_of(m: &stream::Source) -> Origin {
    let api = match (&m.external, m.domain.as_deref().filter(|d| !d.is_empty())) {
        (Some(e), _) if !e.api_prefix.is_empty() => e.api_prefix.clone(),
        (_, Some(domain)) => format!("$JS.{domain}.API"),
        _ => "$JS.API".to_string(),
    };
    Origin {
        stream: m.name.clone(),
        api,
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

    /// `nats/leaf-mirror.json`, the regional replica the README sets up.
    fn leaf_mirror() -> stream::Config {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/nats/leaf-mirror.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn a_mirror_is_scoped_by_its_republish_and_names_its_origin() {
        let cfg = leaf_mirror();
        assert!(cfg.subjects.is_empty(), "a mirror has no subjects");
        let scope = Scope::from_config(&cfg).unwrap();
        assert_eq!(scope.subjects, ["events.>"]);
        assert!(scope.covers("events.orders.*"));
        assert!(!scope.covers("other.x"));
        assert_eq!(
            scope.live_subject("events.orders.42").as_deref(),
            Some("relay.events.orders.42")
        );
        assert_eq!(
            scope.origin,
            Some(Origin {
                stream: "EVENTS".into(),
                api: "$JS.hub.API".into()
            })
        );
        let own = Scope::from_config(&default_stream_config("EVENTS")).unwrap();
        assert_eq!(own.origin, None);
        // Its origin may store other subjects: a jump on events.> is no hole.
        assert!(!scope.is_dense("events.>"));
        assert!(own.is_dense("events.>"));
    }

    #[test]
    fn a_filtered_mirror_is_scoped_by_its_filter() {
        let mut cfg = leaf_mirror();
        let m = cfg.mirror.as_mut().unwrap();
        m.filter_subject = Some("events.orders.>".into());
        m.external = None;
        m.domain = Some("hub".into());
        let scope = Scope::from_config(&cfg).unwrap();
        assert!(scope.covers("events.orders.*"));
        assert!(!scope.covers("events.users.1"));
        assert_eq!(scope.origin.unwrap().api, "$JS.hub.API");

        let mut cfg = leaf_mirror();
        let m = cfg.mirror.as_mut().unwrap();
        m.external = None;
        m.subject_transforms = vec![
            stream::SubjectTransform {
                source: "events.orders.>".into(),
                destination: String::new(),
            },
            stream::SubjectTransform {
                source: "events.users.>".into(),
                destination: "events.people.>".into(),
            },
        ];
        let scope = Scope::from_config(&cfg).unwrap();
        assert_eq!(scope.subjects, ["events.orders.>", "events.people.>"]);
        assert!(scope.covers("events.people.7"));
        assert!(!scope.covers("events.users.7"));
        assert_eq!(scope.origin.unwrap().api, "$JS.API");

        // A destination with a mapping function cannot be checked against:
        // the republish bounds the scope.
        let mut cfg = leaf_mirror();
        cfg.mirror.as_mut().unwrap().subject_transforms = vec![stream::SubjectTransform {
            source: "events.*.*".into(),
            destination: "events.{{wildcard(2)}}.{{wildcard(1)}}".into(),
        }];
        assert_eq!(Scope::from_config(&cfg).unwrap().subjects, ["events.>"]);
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
