//! `peer-axum`: the relay an engineer would write in an afternoon. One
//! plain NATS subscription per request on the subject asked for, each
//! message an SSE event whose id is the publisher's count on the subject,
//! through axum's `Sse` with keep-alive comments. No tuning. As
//! `peer-axum-republished` it subscribes to the stream's republished copy
//! of that subject (the relay's NATS path, five headers per message).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::serve::ListenerExt;
use axum::{Router, routing::get};
use futures_util::{Stream, StreamExt};
use serde::Deserialize;

use super::PeerArgs;
use super::nats_proto::payload_n;

#[derive(Clone)]
struct AppState {
    nats: async_nats::Client,
    heartbeat: Duration,
    prefix: String,
}

#[derive(Deserialize)]
struct Params {
    subject: String,
}

/// Entry point of `peer-axum`.
pub(crate) fn main(args: &PeerArgs) -> Result<(), String> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let nats = async_nats::connect(&args.nats_url)
            .await
            .map_err(|e| format!("connect to NATS: {e}"))?;
        let state = AppState {
            nats,
            heartbeat: args.heartbeat,
            prefix: args.subject_prefix.clone(),
        };
        let app = Router::new()
            .route("/events", get(events))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| format!("bind: {e}"))?
            .tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
        let serve = axum::serve(listener, app).into_future();
        match tokio::time::timeout(args.lifetime, serve).await {
            Ok(r) => r.map_err(|e| format!("serve: {e}")),
            Err(_) => Ok(()),
        }
    })
}

async fn events(
    State(state): State<AppState>,
    Query(params): Query<Params>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, StatusCode> {
    let messages = state
        .nats
        .subscribe(format!("{}{}", state.prefix, params.subject))
        .await
        .map_err(|_| StatusCode::BAD_GATEWAY)?;
    let events = messages.map(|m| {
        let data = String::from_utf8_lossy(&m.payload);
        let id = payload_n(&m.payload).unwrap_or(0);
        Ok(Event::default().id(id.to_string()).data(data))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(state.heartbeat)))
}
