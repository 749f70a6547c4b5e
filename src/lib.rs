//! sse-relay: Server-Sent Events for browsers, events stored in NATS JetStream.
//!
//! # Layout
//!
//! - [`config`]  one typed `Config` from flags/env, validated before binding
//! - [`shards`]  `--workers`: one single-threaded shard per core on a shared port
//! - `server`    one shard: accept loop, NATS start-up, graceful drain: [`run`]
//! - [`app`]     a shard's shared state; the [`app::Extension`] hook for extra routes
//! - `error`     [`ApiError`]: every refusal, its status, code and sentence
//! - `http`      lean HTTP/1.1 loop, routing, CORS; refusals rendered as responses
//! - `session`   one stream: authorize, resume point, join, backfill, live
//! - `publish`   `POST /publish/<subject>`: HTTP publish, acknowledged by JetStream
//! - [`auth`]    JWT verification -> `Claims`
//! - [`limits`]  abuse limits: connections, streams per IP and per token, rate
//! - [`subject`] NATS subject patterns: validation, matching, containment
//! - `hub`       per-shard shared subscriptions, frame-once fan-out, heartbeats, expiry
//! - `nats`      the NATS connection, the stream's scope, JetStream reads
//! - [`client`]  one client's bounded queue and the response body draining it
//! - [`sse`]     the SSE wire format
//! - [`metrics`] Prometheus names
//! - [`dev`]     `sse-relay dev`: child nats-server, demo page
//! - [`health`]  `sse-relay health`: the HTTP check a container runs
//! - `fuzzing`   entry points of the fuzz targets in `fuzz/` (and their property tests)
//!
//! # Data flow
//!
//! ```text
//! publisher --nats pub events.x--> stream EVENTS (events.>) stores seq N
//!     --RePublish (Nats-Sequence: N)--> relay.events.x
//!     --> one core subscription per distinct pattern per shard (hub)
//!     --> MergeSet: batches in seq order --> encode the SSE frame once
//!     --> Bytes clone into each client's bounded ClientQueue (full => evict)
//!     --> SseBody coalesces queued frames --> socket --> browser
//! ```
//!
//! Dependencies point one way, with no cycle: `shards` -> `server` ->
//! `http` -> `session` -> `hub` -> `nats` -> `sse`; `app` (shared state),
//! `error`, `client`, `limits`, `auth`, `config` sit below them; `dev`
//! plugs in through [`app::Extension`] and nothing but `main` uses it.

pub mod app;
pub mod auth;
pub mod client;
pub mod config;
pub mod dev;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
mod http;
mod hub;
pub mod limits;
pub mod metrics;
mod nats;
mod publish;
mod server;
mod session;
pub mod shards;
pub mod sse;
pub mod subject;

pub use error::ApiError;
pub use http::MAX_EXTENSION_BODY;
/// The hub's live path and fan-out, for `benches/micro.rs`.
#[doc(hidden)]
pub use hub::bench::{FanoutRound, LiveBatch, LiveMessages};
pub use nats::{EVENT_HEADER, Scope, default_stream_config};
pub use server::{RunError, Shard, bind, run};
