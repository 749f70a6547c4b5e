//! The servers the relay is measured against (`--peers`), each a
//! subcommand of this binary run as a child process like the relay:
//! `peer-axum` (the obvious axum relay) and `peer-epoll` (a bare epoll
//! loop). Both read the plain subjects `events.bench.<i>`, not the
//! JetStream republish, and send as SSE id the publisher's per-subject
//! count `"n"` from the payload, so the clients' loss and order checks
//! hold for them as for the relay (with an id stride of 1).

mod axum;
mod epoll;
pub(crate) mod nats_proto;

use std::net::{SocketAddr, TcpStream};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::procs::{Proc, command};

/// A server under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    Relay,
    Axum,
    /// The axum relay on the stream's republished copies (the relay's
    /// NATS path, five headers per message) instead of the plain subjects.
    AxumRepublished,
    Epoll,
}

impl Peer {
    /// `relay,axum,epoll` (any order, no repeats).
    pub(crate) fn parse_list(s: &str) -> Result<Vec<Peer>, String> {
        let mut out = Vec::new();
        for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let p = match name {
                "relay" => Peer::Relay,
                "axum" => Peer::Axum,
                "axum-republished" => Peer::AxumRepublished,
                "epoll" => Peer::Epoll,
                other => return Err(format!("--peers: unknown peer {other:?}")),
            };
            if out.contains(&p) {
                return Err(format!("--peers: {name} given twice"));
            }
            out.push(p);
        }
        if out.is_empty() {
            return Err("--peers needs at least one of relay,axum,axum-republished,epoll".into());
        }
        Ok(out)
    }

    /// What the server puts before a client's subject to subscribe: the
    /// stream's republish prefix for the servers that read the stream's
    /// copies.
    pub(crate) fn subject_prefix(self) -> String {
        match self {
            Peer::Relay | Peer::AxumRepublished => crate::probe::republish_prefix(),
            Peer::Axum | Peer::Epoll => String::new(),
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Peer::Relay => "relay",
            Peer::Axum => "peer-axum",
            Peer::AxumRepublished => "peer-axum-republished",
            Peer::Epoll => "peer-epoll",
        }
    }
}

/// What a peer process is told, as `LOAD_*` environment variables.
pub(crate) struct PeerArgs {
    pub(crate) listen: SocketAddr,
    pub(crate) nats_url: String,
    pub(crate) heartbeat: Duration,
    /// The process exits by itself after this long.
    pub(crate) lifetime: Duration,
    /// Put before the subject a client asks for (`relay.` for the
    /// republished copies).
    pub(crate) subject_prefix: String,
}

/// Entry point of the `peer-axum` and `peer-epoll` subcommands.
pub(crate) fn peer_main(which: &str) -> ExitCode {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let secs = |k: &str| Duration::from_secs(var(k).parse().unwrap_or(60).max(1));
    let Ok(listen) = var("LOAD_LISTEN").parse() else {
        eprintln!("{which}: LOAD_LISTEN is not an address");
        return ExitCode::from(2);
    };
    let args = PeerArgs {
        listen,
        nats_url: var("LOAD_NATS_URL"),
        heartbeat: secs("LOAD_HEARTBEAT_S"),
        lifetime: secs("LOAD_LIFETIME_S"),
        subject_prefix: var("LOAD_SUBJECT_PREFIX"),
    };
    let r = match which {
        "peer-axum" | "peer-axum-republished" => axum::main(&args),
        _ => epoll::main(&args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{which}: {e}");
            ExitCode::from(1)
        }
    }
}

/// Starts `peer` on 127.0.0.1:`port` (pinned to `cpu` when asked) and
/// waits until it accepts connections (it listens once NATS answered).
pub(crate) fn spawn(
    peer: Peer,
    port: u16,
    nats_url: &str,
    heartbeat_s: u64,
    lifetime: Duration,
    cpu: Option<usize>,
) -> Result<Proc, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = command(&exe, cpu);
    cmd.arg(peer.name())
        .env("LOAD_LISTEN", format!("127.0.0.1:{port}"))
        .env("LOAD_NATS_URL", nats_url)
        .env("LOAD_HEARTBEAT_S", heartbeat_s.to_string())
        .env("LOAD_LIFETIME_S", lifetime.as_secs().max(1).to_string())
        .env("LOAD_SUBJECT_PREFIX", peer.subject_prefix())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let mut proc = Proc::spawn(cmd, peer.name())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(proc);
        }
        if let Some(st) = proc.exited() {
            return Err(format!("{} exited ({st})", peer.name()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(format!("{} not listening after 10 s", peer.name()))
}
