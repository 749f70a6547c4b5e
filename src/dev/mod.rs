//! `sse-relay dev`: a first run in one command. Starts a child `nats-server
//! -js` on a free port with a temporary store (unless NATS_URL is given),
//! creates the stream, and installs [`DevRoutes`]: the demo page at `/`,
//! the web client it uses at `/client/relay.js` (clients/web) and
//! `POST /dev/publish`. `serve` never has these routes.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};

use crate::app::{App, Extension};
use crate::client::SseBody;
use crate::error::ApiError;
use crate::http::text;

mod nats_server;

pub use nats_server::{NatsServer, NatsServerOptions};

const DEMO_HTML: &str = include_str!("demo.html");
/// The web client, served as it is published: no build step.
const CLIENT_JS: &str = include_str!("../../clients/web/relay.js");
const CLIENT_PATH: &str = "/client/relay.js";
pub const DEMO_SUBJECT: &str = "events.demo";

/// The dev routes, with a token filled into the demo page.
pub struct DevRoutes {
    page: String,
}

impl DevRoutes {
    pub fn new(token: &str) -> DevRoutes {
        DevRoutes {
            page: DEMO_HTML
                .replace("__TOKEN__", token)
                .replace("__SUBJECT__", DEMO_SUBJECT),
        }
    }
}

impl Extension for DevRoutes {
    fn allows(&self, path: &str) -> Option<&'static str> {
        match path {
            "/" | CLIENT_PATH => Some("GET"),
            "/dev/publish" => Some("POST"),
            _ => None,
        }
    }

    fn call(
        &self,
        app: Arc<App>,
        method: Method,
        path: String,
        body: Bytes,
    ) -> BoxFuture<'static, Result<Response<SseBody>, ApiError>> {
        if method == Method::GET {
            let (body, content_type) = match path.as_str() {
                CLIENT_PATH => (CLIENT_JS.to_string(), "text/javascript; charset=utf-8"),
                _ => (self.page.clone(), "text/html; charset=utf-8"),
            };
            let mut res = text(StatusCode::OK, body);
            res.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            return Box::pin(std::future::ready(Ok(res)));
        }
        Box::pin(async move { publish(&app, body).await })
    }
}

#[derive(serde::Deserialize)]
struct PublishBody {
    subject: String,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    data: String,
}

/// Publishes one event through JetStream and answers with its sequence.
async fn publish(app: &App, body: Bytes) -> Result<Response<SseBody>, ApiError> {
    let body: PublishBody = serde_json::from_slice(&body).map_err(|_| {
        ApiError::BadBody("expected JSON {\"subject\", \"event\", \"data\"}".into())
    })?;
    crate::subject::validate_subject(&body.subject).map_err(ApiError::BadSubject)?;
    let live = app.live()?;
    if !live.scope.covers(&body.subject) {
        return Err(ApiError::OutsideStream(body.subject));
    }
    let mut headers = async_nats::HeaderMap::new();
    if let Some(ev) = body.event.filter(|e| !e.is_empty()) {
        headers.insert(crate::nats::EVENT_HEADER, ev.as_str());
    }
    let js = async_nats::jetstream::new(live.nats.clone());
    let ack = async {
        js.publish_with_headers(body.subject, headers, body.data.into())
            .await?
            .await
    }
    .await
    .map_err(|_| ApiError::Unavailable("JetStream did not acknowledge the publish"))?;
    let out = serde_json::json!({"stream": ack.stream, "seq": ack.sequence});
    let mut res = Response::new(SseBody::full(out.to_string()));
    *res.status_mut() = StatusCode::CREATED;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(res)
}
