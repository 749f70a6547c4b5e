//! End-to-end load harness: nats-server, real `sse-relay` processes and
//! many light SSE clients in separate processes.
//!
//! `cargo bench --bench load -- <scenario> [options]`; with no scenario (a
//! plain `cargo bench`) it prints the usage and exits 0. See [`USAGE`].

mod client;
mod compare;
mod drain;
mod fleet;
mod peers;
mod probe;
mod procs;
mod publish;
mod report;
mod scenarios;
mod setup;
mod sse_parse;
mod storm;
mod svg;

use std::process::ExitCode;
use std::time::Duration;

use peers::Peer;

const USAGE: &str = "\
sse-relay load harness

usage: cargo bench --bench load -- <scenario> [options]
  (build the relay first: cargo build --release)

scenarios:
  idle           hold --clients connections for --duration; RSS per connection
  fanout         all clients on events.bench.0, --rate msg/s
  saturate       fanout with the rate x1.5 every 3 s until deliveries fall behind
  many-subjects  client i on events.bench.<i>, each subject gets --rate msg/s
  storm          --clients resume at once with Last-Event-ID = last-<back>
  cold-start     100 events stored, relay spawned, a client resumes last-50
  drain          2 relays share the port, clients on events.bench.0 reconnect
                 by Last-Event-ID; one relay gets SIGTERM: reconnects per
                 100 ms, the largest share of any second (pass: <= 40%), loss

options:
  --clients N               connections (default 1000; storm 500; cold-start 1)
  --rate R                  msg/s per subject (fanout and many-subjects 10,
                            saturate start: 20000/clients)
  --duration S              measured seconds (default 10; saturate 60)
  --warmup S                fanout, many-subjects: publish for S seconds before
                            the measured ones (default 0). Latency (clients,
                            probe, each second) counts only events published
                            after the warm-up; loss, deliveries and CPU count
                            every event. A new connection's first 16 segments
                            are ACKed at once by the receiver (quick-ACK), and
                            on loopback that work lands on the sender's core:
                            at 10 msg/s it is the first 1.6 s
  --relays K                relay processes sharing one port (SO_REUSEPORT)
  --workers W               relay --workers: shards per relay process (default 1)
  --pin                     relays on CPU 0, nats-server, clients and publisher on CPU 1
  --acked                   publish through JetStream and count acks
  --client-queue Q          relay --client-queue (default 1024)
  --back B                  storm: events each client missed (default 100)
  --per-worker P            connections per client process (default 10000, max 14000)
  --connect-concurrency C   connects in flight per client process (default 256;
                            storm: unlimited unless given)
  --peers LIST              fanout, many-subjects: the servers to run, one after
                            the other with the same clients, rate, duration and
                            publisher (default relay); LIST of relay, axum,
                            axum-republished, epoll:
                              axum   the obvious axum relay: one plain NATS
                                     subscription per request, axum's Sse
                              axum-republished  the same on the stream's
                                     republished copies (what the relay reads)
                              epoll  one thread, mio (epoll), hand-parsed NATS,
                                     one SUB per subject, one write per delivery
                            The other peers read the plain subjects, send the
                            payload's per-subject count \"n\" as the SSE id and
                            run pinned like the relay. One row per server:
                            deliveries/s, latency, a NATS-path probe's p50/p99
                            (a subscriber in the harness on what the server
                            reads: relay.events.bench.<k> for the relay and
                            axum-republished, events.bench.<k> for the others, a sample of ~1000
                            msg/s), added p50/p99 (per message: a timed
                            client's receipt minus the probe's receipt of the
                            same message; ~1000 timed msg/s; the old
                            end-to-end p99 minus the probe's p99 is in the
                            JSON as p99_minus_probe_p99_ms),
                            server user/sys CPU per delivery, harness CPU, loss
  --svg PATH                fanout, many-subjects: write an SVG chart of the p99
                            of each second (by receive time), one line per server

Environment: LOAD_RELAY_BIN runs another relay binary (default
target/release/sse-relay); LOAD_RELAY_LOG sets the relays' RUST_LOG; LOAD_KEEP_LOGS=<dir>
(drain) copies the relays' logs there.

Prints a table and one JSON line (fanout, many-subjects: also one row and
one object per server under \"peers\", and the p99 of each second in
p99_per_s_ms, the probe's in probe_p99_per_s_ms, the added latency's in
added_p99_per_s_ms); exits 1 when events were lost (not in saturate), 2 on a
set-up error, 3 when the watchdog (duration + 120 s, per server) fires.
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scenario {
    Idle,
    Fanout,
    Saturate,
    ManySubjects,
    Storm,
    ColdStart,
    Drain,
}

impl Scenario {
    fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "idle" => Scenario::Idle,
            "fanout" => Scenario::Fanout,
            "saturate" => Scenario::Saturate,
            "many-subjects" => Scenario::ManySubjects,
            "storm" => Scenario::Storm,
            "cold-start" => Scenario::ColdStart,
            "drain" => Scenario::Drain,
            _ => return None,
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Fanout => "fanout",
            Scenario::Saturate => "saturate",
            Scenario::ManySubjects => "many-subjects",
            Scenario::Storm => "storm",
            Scenario::ColdStart => "cold-start",
            Scenario::Drain => "drain",
        }
    }
}

/// Parsed command line.
pub(crate) struct Opts {
    pub(crate) scenario: Scenario,
    pub(crate) clients: usize,
    pub(crate) rate: Option<f64>,
    pub(crate) duration: Duration,
    /// fanout, many-subjects: published before the measured `duration`.
    pub(crate) warmup: Duration,
    pub(crate) relays: usize,
    pub(crate) pin: bool,
    pub(crate) acked: bool,
    pub(crate) client_queue: usize,
    pub(crate) workers: usize,
    pub(crate) back: u64,
    pub(crate) per_worker: usize,
    pub(crate) connect_concurrency: usize,
    pub(crate) connect_concurrency_storm: usize,
    /// fanout, many-subjects: the servers under test, in order.
    pub(crate) peers: Vec<Peer>,
    pub(crate) svg: Option<String>,
}

fn parse(args: &[String]) -> Result<Option<Opts>, String> {
    let Some(first) = args.first() else {
        return Ok(None);
    };
    let scenario = Scenario::parse(first).ok_or_else(|| format!("unknown scenario {first:?}"))?;
    let mut o = Opts {
        scenario,
        clients: match scenario {
            Scenario::Storm => 500,
            Scenario::ColdStart => 1,
            _ => 1000,
        },
        rate: None,
        duration: Duration::from_secs(if scenario == Scenario::Saturate {
            60
        } else {
            10
        }),
        warmup: Duration::ZERO,
        relays: 1,
        pin: false,
        acked: false,
        client_queue: 1024,
        workers: 1,
        back: 100,
        per_worker: 10_000,
        connect_concurrency: 256,
        connect_concurrency_storm: 0,
        peers: vec![Peer::Relay],
        svg: None,
    };
    let mut it = args[1..].iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value"))
                .cloned()
        };
        let num = |v: String| -> Result<f64, String> {
            v.parse::<f64>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--clients" => o.clients = num(value()?)? as usize,
            "--rate" => o.rate = Some(num(value()?)?),
            "--duration" => o.duration = Duration::from_secs_f64(num(value()?)?),
            "--warmup" => o.warmup = Duration::from_secs_f64(num(value()?)?),
            "--relays" => o.relays = (num(value()?)? as usize).max(1),
            "--pin" => o.pin = true,
            "--acked" => o.acked = true,
            "--client-queue" => o.client_queue = num(value()?)? as usize,
            "--workers" => o.workers = (num(value()?)? as usize).max(1),
            "--back" => o.back = num(value()?)? as u64,
            "--per-worker" => o.per_worker = (num(value()?)? as usize).clamp(1, 14_000),
            "--connect-concurrency" => {
                o.connect_concurrency = num(value()?)? as usize;
                o.connect_concurrency_storm = o.connect_concurrency;
            }
            "--peers" => o.peers = Peer::parse_list(&value()?)?,
            "--svg" => o.svg = Some(value()?),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let per_server = matches!(scenario, Scenario::Fanout | Scenario::ManySubjects);
    if !per_server && (o.peers != [Peer::Relay] || o.svg.is_some() || !o.warmup.is_zero()) {
        return Err("--peers, --svg and --warmup are for fanout and many-subjects".into());
    }
    if o.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    Ok(Some(o))
}

fn main() -> ExitCode {
    // cargo bench appends `--bench`; it means nothing here.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("client-worker") => return client::worker_main(),
        Some(which @ ("peer-axum" | "peer-axum-republished" | "peer-epoll")) => {
            return peers::peer_main(which);
        }
        _ => {}
    }
    let opts = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if opts.pin
        && let Err(e) = procs::pin_self(1)
    {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let limit = (opts.warmup + opts.duration + Duration::from_secs(120)) * opts.peers.len() as u32;
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("watchdog: {limit:?} passed; killing every child process");
        procs::kill_all();
        std::process::exit(3);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match opts.scenario {
            Scenario::Storm => storm::storm(&opts).await,
            Scenario::ColdStart => storm::cold_start(&opts).await,
            Scenario::Drain => drain::drain(&opts).await,
            Scenario::Fanout | Scenario::ManySubjects => compare::live(&opts).await,
            _ => scenarios::live(&opts).await,
        }
    });
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("FAIL: events were lost, duplicated or out of order, or connections failed");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
