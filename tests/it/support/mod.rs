//! What the integration tests share: real `nats-server` and `sse-relay`
//! child processes, the relay in this process, an HTTP and an SSE client,
//! token signing, `/metrics` reading, and the bounded waits every test is
//! built from.
//!
//! - `nats`: one nats-server (the library's `dev::NatsServer` with its
//!   monitoring port), the `EVENTS` stream, JetStream publishing.
//! - `cluster`: a JetStream cluster of nats-server processes on loopback.
//! - `regions`: a hub and a regional leaf node with a mirror, from `nats/`.
//! - `relay`: the relay binary as a child process, and the requests tests
//!   make to any relay.
//! - `in_process`: the relay as one shard on a thread of the test process.
//! - `http`: one-shot requests (hyper's client) and error-body assertions.
//! - `sse`: the `text/event-stream` parser and a streaming client.
//! - `reader`: the one client that resumes by `Last-Event-ID` until it has
//!   everything, and the comparison of what it got with what was stored.
//! - `tokens`: JWT signing, and hand-built malformed tokens.
//! - `metrics`: samples out of `/metrics`.
//!
//! Every wait is bounded: it polls a condition every [`POLL`] up to a
//! deadline and then panics naming what it waited for. Nothing here sleeps
//! for synchronisation.

mod cluster;
mod http;
mod in_process;
mod metrics;
mod nats;
mod reader;
mod regions;
mod relay;
mod sse;
mod tokens;

pub use cluster::*;
pub use http::*;
pub use in_process::*;
pub use metrics::*;
pub use nats::*;
pub use reader::*;
pub use regions::*;
pub use relay::*;
pub use sse::*;
pub use tokens::*;

use std::collections::HashSet;
use std::future::Future;
use std::net::TcpListener as StdTcpListener;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Interval of every bounded polling loop.
pub const POLL: Duration = Duration::from_millis(20);
/// Upper bound for one whole test.
pub const TEST_LIMIT: Duration = Duration::from_secs(30);
/// Default bound for one HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs `fut` with an upper bound; panics naming `what` when it is exceeded.
/// Resources owned by the future (servers, relays) are dropped, and so
/// killed, on timeout.
pub async fn within<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("test `{what}` did not finish within {limit:?}"),
    }
}

/// Polls `probe` every [`POLL`] until it yields `Some`, at most `limit`.
/// A probe that hangs is cut off by the same deadline.
pub async fn poll_until<T, F, Fut>(limit: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, probe()).await {
            Ok(Some(v)) => return v,
            Ok(None) => {}
            Err(_) => panic!("timed out after {limit:?} waiting for: {what}"),
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {limit:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls the boolean condition `cond` every [`POLL`] until true, at most `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(limit, what, || {
        let f = cond();
        async move { if f.await { Some(()) } else { None } }
    })
    .await
}

/// Awaits a spawned task; a panic inside it is re-raised with its own
/// message.
pub async fn join_task<T>(what: &str, h: tokio::task::JoinHandle<T>) -> T {
    match h.await {
        Ok(v) => v,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("{what}: task failed: {e}"),
    }
}

/// Tests that load both cores for seconds and assert on counts or timing
/// under that load (storms, floods, cluster failover) hold a guard of their
/// module's load group: tests of one group run beside each other, but never
/// beside another group's, whose load their bounds were not set for. Take
/// it before [`within`], so that waiting for another group does not count
/// against the test's own limit.
pub async fn load_group(group: &'static str) -> LoadGroupGuard {
    let wait = async {
        loop {
            let released = LOAD_GROUP_RELEASED.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between is seen.
            released.as_mut().enable();
            if join_load_group(group) {
                return LoadGroupGuard;
            }
            released.await;
        }
    };
    let limit = Duration::from_secs(300);
    match tokio::time::timeout(limit, wait).await {
        Ok(guard) => guard,
        Err(_) => panic!("load group {group}: another group held the machine for {limit:?}"),
    }
}

/// Joins `group` if it is the one running, or if none is.
fn join_load_group(group: &'static str) -> bool {
    let mut held = LOAD_GROUP.lock().unwrap_or_else(|e| e.into_inner());
    match *held {
        None => {
            *held = Some((group, 1));
            true
        }
        Some((g, ref mut n)) if g == group => {
            *n += 1;
            true
        }
        Some(_) => false,
    }
}

/// The load group running now and how many of its tests hold a guard.
static LOAD_GROUP: Mutex<Option<(&str, usize)>> = Mutex::new(None);
static LOAD_GROUP_RELEASED: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Membership of a load group; see [`load_group`].
pub struct LoadGroupGuard;

impl Drop for LoadGroupGuard {
    fn drop(&mut self) {
        let mut held = LOAD_GROUP.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, n)) = held.as_mut() {
            *n -= 1;
            if *n == 0 {
                *held = None;
                LOAD_GROUP_RELEASED.notify_waiters();
            }
        }
    }
}

/// A free TCP port on 127.0.0.1, never the same one twice in this process.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    for _ in 0..200 {
        let listener = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out.lock().unwrap().insert(port) {
            return port;
        }
    }
    panic!("could not find a fresh free port");
}

/// Seconds since the Unix epoch, fractional (token `exp` arithmetic).
pub fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock before 1970")
        .as_secs_f64()
}

/// Whole seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    now_secs_f64() as i64
}

/// The last `max` bytes of `s` (on a char boundary), for failure messages.
pub fn tail(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut i = s.len() - max;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}
