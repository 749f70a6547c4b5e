//! The integration tests, one binary: each module tests one area of the
//! relay against real `nats-server` processes and the relay, run in-process
//! (one shard on its own thread, as in production) where no process
//! boundary matters, else as an `sse-relay` child process (signals, exit
//! codes, kills, logs, environment, several shards). `support` holds what
//! they share.

// A test binary exports nothing: `pub` in `support` means "for the test
// modules", which is all this lint would have to say.
#![allow(unreachable_pub)]

mod support;

mod chaos;
mod cors;
mod deploy;
mod drain;
mod errors;
mod failover;
mod h2c;
mod harness;
mod keys;
mod lifecycle;
mod limits;
mod load_harness;
mod nats_auth;
mod observe;
mod publish;
mod recreate;
mod regions;
mod replicas;
mod resume;
mod security;
mod shards;
mod stream;
