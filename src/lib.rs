//! sse-relay: Server-Sent Events for browsers, events stored in NATS JetStream.
//!
//! # Layout
//!
//! - [`config`]  one typed `Config` from flags/env, validated before binding
//! - [`shards`]  `--workers`: one single-threaded shard per core on a shared port
//! - [`server`]  one shard: accept loop, NATS start-up, graceful drain: [`run`]
//! - [`http1`]   lean HTTP/1.1 connection loop (hyper for requests with a body)
//! - [`routes`]  `/events`, `/healthz`, `/readyz`, `/metrics`; errors -> statuses
//! - [`auth`]    JWT verification -> `Claims`
//! - [`subject`] NATS subject patterns: validation, matching, containment
//! - [`nats`]    the NATS connection and the stream's `Scope`
//! - [`hub`]     shared subscriptions, frame-once fan-out, heartbeats, expiry
//! - [`merge`]   ordered merge of many subscriptions by stream sequence
//! - [`window`]  recent frames per subscription, LRU by bytes: resumes from memory
//! - [`replay`]  JetStream reads: resume after Last-Event-ID, catch-up
//! - [`sse`]     SSE wire format, bounded client queue, the response body
//! - [`metrics`] Prometheus names
//! - [`dev`]     `sse-relay dev`: child nats-server, demo page
//!
//! # Data flow
//!
//! ```text
//! publisher --nats pub events.x--> stream EVENTS (events.>) stores seq N
//!     --RePublish (Nats-Sequence: N)--> relay.events.x
//!     --> one core subscription per distinct pattern per node (hub)
//!     --> MergeSet: batches in seq order --> encode the SSE frame once
//!     --> Bytes clone into each client's bounded ClientQueue (full => evict)
//!     --> SseBody coalesces queued frames --> hyper --> browser
//! ```

pub mod auth;
pub mod config;
pub mod dev;
pub mod http1;
pub mod hub;
pub mod merge;
pub mod metrics;
pub mod nats;
pub mod replay;
pub mod routes;
pub mod server;
pub mod shards;
pub mod sse;
pub mod subject;
pub mod window;

pub use server::{RunError, bind, run};
