//! The `client-worker` process: many light SSE connections on one
//! current-thread runtime. Each connection is a raw socket (bound to a
//! loopback source address) sending an HTTP/1.0 request, so the relay's
//! body is close-delimited; reads go through one shared buffer and an
//! incremental parser that only looks at `id:` and the `"t":` timestamp in
//! `data:`. Commands come on stdin, results leave as JSON lines on stdout.

use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use crate::report::{Arrival, Hist, PerSecond, measured};
use crate::sse_parse::{ConnState, Event};

/// Parameters, from `LOAD_*` environment variables set by the parent.
pub(crate) struct Params {
    pub(crate) port: u16,
    pub(crate) first: usize,
    pub(crate) conns: usize,
    /// `single`: everyone on events.bench.0; `each`: client i on events.bench.<i>.
    pub(crate) subject_each: bool,
    pub(crate) token: String,
    pub(crate) last_id: Option<u64>,
    pub(crate) stride: u64,
    pub(crate) expect: u64,
    pub(crate) retry: bool,
    pub(crate) concurrency: usize,
    pub(crate) per_addr: usize,
    /// Every how many clients (by global index) one records when each
    /// measured event arrived (0: none), for `report::added_latency`.
    pub(crate) sample_every: usize,
}

fn env<T: std::str::FromStr>(k: &str, default: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl Params {
    pub(crate) fn from_env() -> Params {
        Params {
            port: env("LOAD_PORT", 0),
            first: env("LOAD_FIRST", 0),
            conns: env("LOAD_CONNS", 0),
            subject_each: env("LOAD_SUBJECT", String::new()) == "each",
            token: env("LOAD_TOKEN", String::new()),
            last_id: std::env::var("LOAD_LAST_ID")
                .ok()
                .and_then(|v| v.parse().ok()),
            stride: env("LOAD_STRIDE", 1),
            expect: env("LOAD_EXPECT", 0),
            retry: env("LOAD_RETRY", 0u8) == 1,
            concurrency: env("LOAD_CONCURRENCY", 0),
            per_addr: env("LOAD_PER_ADDR", 25_000),
            sample_every: env("LOAD_SAMPLE_EVERY", 0),
        }
    }
}

#[derive(Default, Clone, Copy)]
struct ClientStat {
    last: u64,
    count: u64,
    gaps: u64,
}

struct Ctx {
    p: Params,
    clients: RefCell<Vec<ClientStat>>,
    hist_total: RefCell<Hist>,
    hist_step: RefCell<Hist>,
    /// Latency by second of receipt since `epoch` (unix ns, from the parent).
    per_second: RefCell<PerSecond>,
    /// The sampled clients' arrivals (`Params::sample_every`).
    arrivals: RefCell<Vec<Arrival>>,
    epoch: Cell<Option<u64>>,
    received: Cell<u64>,
    ok: Cell<usize>,
    failed: Cell<usize>,
    closed: Cell<u64>,
    reconnects: Cell<u64>,
    /// When each reconnect was made (ms since the Unix epoch).
    reconnect_ms: RefCell<Vec<u64>>,
    control: Cell<u64>,
    done: Cell<usize>,
    errors: RefCell<Vec<String>>,
    sem: Option<Arc<Semaphore>>,
}

thread_local! {
    static BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn emit(v: Value) {
    println!("{v}");
}

/// Entry point of `client-worker`.
pub(crate) fn worker_main() -> std::process::ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, worker());
    std::process::ExitCode::SUCCESS
}

async fn worker() {
    let p = Params::from_env();
    let sem = (p.concurrency > 0).then(|| Arc::new(Semaphore::new(p.concurrency)));
    let ctx = Rc::new(Ctx {
        clients: RefCell::new(vec![ClientStat::default(); p.conns]),
        hist_total: RefCell::default(),
        hist_step: RefCell::default(),
        per_second: RefCell::default(),
        arrivals: RefCell::default(),
        epoch: Cell::new(None),
        received: Cell::new(0),
        ok: Cell::new(0),
        failed: Cell::new(0),
        closed: Cell::new(0),
        reconnects: Cell::new(0),
        reconnect_ms: RefCell::default(),
        control: Cell::new(0),
        done: Cell::new(0),
        errors: RefCell::default(),
        sem,
        p,
    });
    emit(json!({"type": "ready"}));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("go") => {
                for i in 0..ctx.p.conns {
                    tokio::task::spawn_local(connection(ctx.clone(), i));
                }
            }
            Some("epoch") => ctx.epoch.set(words.next().and_then(|w| w.parse().ok())),
            Some("stats") => {
                let step = std::mem::take(&mut *ctx.hist_step.borrow_mut());
                emit(json!({"type": "stats", "received": ctx.received.get(),
                    "closed": ctx.closed.get(), "hist": step.to_json()}));
            }
            Some("final") => {
                let expect: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                emit(final_report(&ctx, expect));
                break;
            }
            _ => {}
        }
    }
    // stdin closed (the parent is gone) or final sent: stop everything.
    std::process::exit(0);
}

fn final_report(ctx: &Ctx, expect: u64) -> Value {
    let clients = ctx.clients.borrow();
    let (mut lost, mut excess, mut gaps) = (0u64, 0u64, 0u64);
    let (mut min_last, mut max_last) = (u64::MAX, 0u64);
    for c in clients.iter() {
        lost += expect.saturating_sub(c.count);
        excess += c.count.saturating_sub(expect);
        gaps += c.gaps;
        min_last = min_last.min(c.last);
        max_last = max_last.max(c.last);
    }
    json!({"type": "final", "received": ctx.received.get(), "lost": lost,
        "excess": excess, "gaps": gaps, "closed": ctx.closed.get(),
        "reconnects": ctx.reconnects.get(),
        "reconnect_ms": *ctx.reconnect_ms.borrow(),
        "control": ctx.control.get(), "ok": ctx.ok.get(), "failed": ctx.failed.get(),
        "min_last_id": if clients.is_empty() { 0 } else { min_last },
        "short": clients.iter().enumerate().filter(|(_, c)| c.count < expect).take(5)
            .map(|(i, c)| json!([ctx.p.first + i, c.last, c.count])).collect::<Vec<_>>(),
        "max_last_id": max_last, "hist": ctx.hist_total.borrow().to_json(),
        "per_second": ctx.per_second.borrow().to_json(),
        "arrivals": *ctx.arrivals.borrow(),
        "errors": *ctx.errors.borrow()})
}

fn note_error(ctx: &Ctx, e: String) {
    let mut errs = ctx.errors.borrow_mut();
    if errs.len() < 5 {
        errs.push(e);
    }
}

/// Marks the end of one connection attempt's setup (200 or failure).
fn settled(ctx: &Ctx, ok: bool) {
    if ok {
        ctx.ok.set(ctx.ok.get() + 1);
    } else {
        ctx.failed.set(ctx.failed.get() + 1);
    }
    if ctx.ok.get() + ctx.failed.get() == ctx.p.conns {
        emit(
            json!({"type": "connected", "ok": ctx.ok.get(), "failed": ctx.failed.get(),
            "errors": *ctx.errors.borrow(), "at_ns": now_ns()}),
        );
    }
}

async fn connection(ctx: Rc<Ctx>, i: usize) {
    let mut first = true;
    // Like EventSource: reconnect after the relay's `retry:` hint (a few ms
    // until one was seen, e.g. while the relay's port is still closed).
    let mut retry_ms = None;
    for attempt in 0u64.. {
        if attempt > 0 {
            ctx.reconnects.set(ctx.reconnects.get() + 1);
            ctx.reconnect_ms.borrow_mut().push(now_ns() / 1_000_000);
        }
        let resume = match ctx.clients.borrow()[i] {
            c if c.count > 0 => Some(c.last),
            _ => ctx.p.last_id,
        };
        let r = session(&ctx, i, resume, first, attempt == 0, &mut retry_ms).await;
        let reached = ctx.p.expect > 0 && ctx.clients.borrow()[i].count >= ctx.p.expect;
        match r {
            Ok(()) if !ctx.p.retry || reached => {
                ctx.closed.set(ctx.closed.get() + 1);
                return;
            }
            Err((e, was_first)) if !ctx.p.retry => {
                note_error(&ctx, e);
                if was_first {
                    settled(&ctx, false);
                } else {
                    ctx.closed.set(ctx.closed.get() + 1);
                }
                return;
            }
            Ok(()) => first = false,
            Err((_, was_first)) => first = was_first,
        }
        tokio::time::sleep(Duration::from_millis(retry_ms.unwrap_or(2))).await;
    }
}

/// One HTTP exchange: Ok(()) when the stream ended cleanly after a 200,
/// Err((why, still_first)) otherwise.
async fn session(
    ctx: &Rc<Ctx>,
    i: usize,
    resume: Option<u64>,
    first: bool,
    explicit_port: bool,
    retry_ms: &mut Option<u64>,
) -> Result<(), (String, bool)> {
    let permit = match &ctx.sem {
        Some(s) => Some(s.clone().acquire_owned().await.expect("semaphore")),
        None => None,
    };
    let global = ctx.p.first + i;
    let mut stream = open(global, &ctx.p, explicit_port)
        .await
        .map_err(|e| (format!("connect: {e}"), first))?;
    let subject = if ctx.p.subject_each { global } else { 0 };
    let mut req = format!(
        "GET /events?subject=events.bench.{subject}&token={} HTTP/1.0\r\nHost: 127.0.0.1\r\n",
        ctx.p.token
    );
    if let Some(id) = resume {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| (format!("write: {e}"), first))?;
    drop(req);
    let mut st = ConnState::default();
    let mut permit = permit;
    let mut first = first;
    loop {
        if stream.readable().await.is_err() {
            return Err(("readable failed".into(), first && !st.header_done));
        }
        let r = BUF.with(|b| {
            let mut b = b.borrow_mut();
            match stream.try_read(&mut b[..]) {
                Ok(0) => Ok(true),
                Ok(n) => {
                    let now = now_ns();
                    st.feed(&b[..n], &mut |ev| on_event(ctx, i, ev, now))
                        .map(|_| false)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
                Err(e) => Err(format!("read: {e}")),
            }
        });
        if st.retry_ms.is_some() {
            *retry_ms = st.retry_ms;
        }
        // The connect permit bounds connects in flight, not open streams:
        // given back once the head is read, on reconnects too.
        if st.header_done {
            permit.take();
        }
        if st.header_done && first {
            first = false;
            settled(ctx, true);
        }
        match r {
            Ok(false) => {}
            Ok(true) if st.header_done => return Ok(()),
            Ok(true) => return Err(("closed before the response header".into(), first)),
            Err(e) => return Err((e, first)),
        }
    }
}

async fn open(global: usize, p: &Params, explicit_port: bool) -> std::io::Result<TcpStream> {
    let per_addr = p.per_addr.clamp(1, 25_000);
    let src = Ipv4Addr::new(127, 0, 0, 2 + (global / per_addr) as u8);
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    // Lets a port whose previous owner is in TIME_WAIT (runs back to back)
    // be bound again.
    s.set_reuse_address(true)?;
    // An explicit source port: bind() with port 0 searches the bind table
    // linearly, which made 14,000 connects take 30 s of kernel time. Fall
    // back to the kernel's choice if the port is taken.
    let port = (FIRST_SOURCE_PORT + global % per_addr) as u16;
    // (Reconnects take the kernel's choice: the first 4-tuple may still be
    // in TIME_WAIT.)
    if !explicit_port
        || s.bind(&SocketAddr::V4(SocketAddrV4::new(src, port)).into())
            .is_err()
    {
        s.bind(&SocketAddr::V4(SocketAddrV4::new(src, 0)).into())?;
    }
    let sock = TcpSocket::from_std_stream(s.into());
    sock.connect(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::LOCALHOST,
        p.port,
    )))
    .await
}

/// Source ports are FIRST_SOURCE_PORT + (client index mod 25,000), below
/// the usual ephemeral range (32768+).
const FIRST_SOURCE_PORT: usize = 7_000;

/// Counts one complete event of client `i` (see `sse_parse::Event`).
fn on_event(ctx: &Ctx, i: usize, ev: Event, now: u64) {
    // The bench publishes unnamed events: a named one is a relay.*
    // control (relay.live on a fresh stream carries an id too).
    if ev.named {
        ctx.control.set(ctx.control.get() + 1);
        return;
    }
    let Some(id) = ev.id else {
        return;
    };
    let count = {
        let mut clients = ctx.clients.borrow_mut();
        let c = &mut clients[i];
        if c.count > 0 && id != c.last + ctx.p.stride {
            c.gaps += 1;
        }
        c.last = id;
        c.count += 1;
        c.count
    };
    ctx.received.set(ctx.received.get() + 1);
    if let Some(t) = ev.t.filter(|&t| measured(t, ctx.epoch.get())) {
        let us = now.saturating_sub(t) / 1000;
        ctx.hist_total.borrow_mut().record(us);
        ctx.hist_step.borrow_mut().record(us);
        if let Some(epoch) = ctx.epoch.get().filter(|e| now >= *e) {
            let sec = ((now - epoch) / 1_000_000_000) as usize;
            ctx.per_second.borrow_mut().record(sec, us);
        }
        let global = ctx.p.first + i;
        if ctx.p.sample_every > 0 && global % ctx.p.sample_every == 0 {
            let k = if ctx.p.subject_each { global } else { 0 };
            ctx.arrivals.borrow_mut().push([k as u64, t, now]);
        }
    }
    if ctx.p.expect > 0 && count == ctx.p.expect {
        ctx.done.set(ctx.done.get() + 1);
        if ctx.done.get() == ctx.p.conns {
            emit(json!({"type": "done", "at_ns": now_ns()}));
        }
    }
}
