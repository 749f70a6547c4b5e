//! `peer-epoll`: about the least a server can do for the same clients. One
//! thread, one mio `Poll` (epoll), a plain NATS connection parsed by hand
//! (one `SUB` per subject, however many clients read it) and, per delivery,
//! one write(2) of `id: <n>\ndata: <payload>\n\n` to the client's socket.
//! No per-client buffer: a write that would block or comes up short ends
//! that client (the relay's rule for a slow client), which the harness
//! counts as lost events.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::PeerArgs;
use super::nats_proto::{self, Op};

const LISTENER: Token = Token(usize::MAX - 1);
const NATS: Token = Token(usize::MAX - 2);
/// Reads or accepts per readiness event before other sockets get a turn;
/// a source cut short is picked up again on the next turn (poll timeout 0).
const BURST: usize = 256;
/// A request head longer than this is refused.
const MAX_REQUEST: usize = 4096;
const HEADER: &[u8] =
    b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n";

struct Client {
    stream: TcpStream,
    /// The request head while it is incomplete.
    head: Vec<u8>,
    /// The subscription (sid) once streaming.
    sid: Option<u64>,
}

struct Sub {
    subject: String,
    clients: Vec<usize>,
}

struct Peer {
    poll: Poll,
    listener: TcpListener,
    nats: TcpStream,
    nats_in: Vec<u8>,
    nats_out: Vec<u8>,
    nats_wants_write: bool,
    chunk: Vec<u8>,
    clients: Slab<Client>,
    /// By sid. Sids are never reused: a message still in flight for an
    /// unsubscribed sid must not reach the clients of a newer subject.
    subs: HashMap<u64, Sub>,
    by_subject: HashMap<String, u64>,
    next_sid: u64,
    frame: Vec<u8>,
    nats_more: bool,
    accept_more: bool,
}

/// Entry point of `peer-epoll`.
pub(crate) fn main(args: &PeerArgs) -> Result<(), String> {
    let (nats, leftover) = nats_proto::connect(&args.nats_url, "peer-epoll")?;
    let poll = Poll::new().map_err(|e| format!("epoll: {e}"))?;
    let mut listener = TcpListener::bind(args.listen).map_err(|e| format!("bind: {e}"))?;
    let mut nats = TcpStream::from_std(nats);
    let reg = poll.registry();
    reg.register(&mut listener, LISTENER, Interest::READABLE)
        .and_then(|_| reg.register(&mut nats, NATS, Interest::READABLE))
        .map_err(|e| format!("register: {e}"))?;
    let mut peer = Peer {
        poll,
        listener,
        nats,
        nats_in: leftover,
        nats_out: Vec::new(),
        nats_wants_write: false,
        chunk: vec![0; 64 * 1024],
        clients: Slab::new(),
        subs: HashMap::new(),
        by_subject: HashMap::new(),
        next_sid: 1,
        frame: Vec::with_capacity(512),
        nats_more: false,
        accept_more: false,
    };
    peer.process_nats()?;
    let deadline = Instant::now() + args.lifetime;
    let mut next_beat = Instant::now() + args.heartbeat;
    let mut events = Events::with_capacity(1024);
    while Instant::now() < deadline {
        let timeout = if peer.nats_more || peer.accept_more {
            Duration::ZERO
        } else {
            next_beat
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(1))
        };
        match peer.poll.poll(&mut events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("epoll_wait: {e}")),
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => peer.accept(),
                NATS => {
                    if ev.is_writable() {
                        peer.flush_nats()?;
                    }
                    if ev.is_readable() {
                        peer.read_nats()?;
                    }
                }
                Token(k) => peer.client_readable(k),
            }
        }
        if peer.accept_more {
            peer.accept();
        }
        if peer.nats_more {
            peer.read_nats()?;
        }
        if Instant::now() >= next_beat {
            peer.heartbeat();
            next_beat += args.heartbeat;
        }
    }
    Ok(())
}

impl Peer {
    fn accept(&mut self) {
        self.accept_more = false;
        for _ in 0..BURST {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = self.clients.vacant_entry();
                    let reg = self.poll.registry();
                    if reg
                        .register(&mut stream, Token(entry.key()), Interest::READABLE)
                        .is_ok()
                    {
                        entry.insert(Client {
                            stream,
                            head: Vec::new(),
                            sid: None,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("peer-epoll: accept: {e}");
                    return;
                }
            }
        }
        self.accept_more = true;
    }

    /// A client socket is readable: its request (or more of it), a hang-up,
    /// or bytes a streaming client should not send (read and ignored).
    fn client_readable(&mut self, k: usize) {
        let mut buf = [0u8; 1024];
        for _ in 0..16 {
            let Some(c) = self.clients.get_mut(k) else {
                return;
            };
            match c.stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) if c.sid.is_none() => {
                    c.head.extend_from_slice(&buf[..n]);
                    if c.head.windows(4).any(|w| w == b"\r\n\r\n") {
                        let head = std::mem::take(&mut c.head);
                        if let Err(status) = self.start_stream(k, &head) {
                            self.refuse(k, status);
                        }
                        return;
                    }
                    if c.head.len() > MAX_REQUEST {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.close(k);
    }

    /// Subscribes (once per subject) and writes the response head.
    fn start_stream(&mut self, k: usize, head: &[u8]) -> Result<(), &'static str> {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let line = std::str::from_utf8(line).map_err(|_| "400 Bad Request")?;
        let target = match line.split(' ').collect::<Vec<_>>()[..] {
            ["GET", target, _version] => target,
            _ => return Err("400 Bad Request"),
        };
        let query = target.strip_prefix("/events?").ok_or("404 Not Found")?;
        let subject = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "subject")
            .map(|(_, v)| v.into_owned())
            .filter(|s| !s.is_empty() && !s.contains(|c: char| c.is_whitespace()))
            .ok_or("400 Bad Request")?;
        let sid = match self.by_subject.get(&subject) {
            Some(sid) => *sid,
            None => {
                let sid = self.next_sid;
                self.next_sid += 1;
                self.send_nats(format!("SUB {subject} {sid}\r\n").as_bytes())
                    .map_err(|_| "502 Bad Gateway")?;
                self.by_subject.insert(subject.clone(), sid);
                self.subs.insert(
                    sid,
                    Sub {
                        subject,
                        clients: Vec::new(),
                    },
                );
                sid
            }
        };
        let c = &mut self.clients[k];
        c.sid = Some(sid);
        if let Some(sub) = self.subs.get_mut(&sid) {
            sub.clients.push(k);
        }
        if !matches!(c.stream.write(HEADER), Ok(n) if n == HEADER.len()) {
            self.close(k);
        }
        Ok(())
    }

    fn refuse(&mut self, k: usize, status: &str) {
        if let Some(c) = self.clients.get_mut(k) {
            let _ = c
                .stream
                .write(format!("HTTP/1.0 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
        }
        self.close(k);
    }

    /// Drops client `k`; the last client of a subject unsubscribes it.
    fn close(&mut self, k: usize) {
        let Some(mut c) = self.clients.try_remove(k) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut c.stream);
        let Some(sid) = c.sid else {
            return;
        };
        let Some(sub) = self.subs.get_mut(&sid) else {
            return;
        };
        sub.clients.retain(|&x| x != k);
        if sub.clients.is_empty() {
            let subject = std::mem::take(&mut sub.subject);
            self.subs.remove(&sid);
            self.by_subject.remove(&subject);
            let _ = self.send_nats(format!("UNSUB {sid}\r\n").as_bytes());
        }
    }

    fn read_nats(&mut self) -> Result<(), String> {
        self.nats_more = false;
        for _ in 0..BURST {
            match self.nats.read(&mut self.chunk) {
                Ok(0) => return Err("NATS closed the connection".into()),
                Ok(n) => {
                    self.nats_in.extend_from_slice(&self.chunk[..n]);
                    self.process_nats()?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("NATS read: {e}")),
            }
        }
        self.nats_more = true;
        Ok(())
    }

    /// Handles every complete operation in `nats_in`; keeps the rest.
    fn process_nats(&mut self) -> Result<(), String> {
        let buf = std::mem::take(&mut self.nats_in);
        let mut used = 0;
        let result = loop {
            match nats_proto::next_op(&buf[used..]) {
                Ok(None) => break Ok(()),
                Ok(Some((op, n))) => {
                    used += n;
                    match op {
                        Op::Msg { sid, payload } => self.deliver(sid, payload),
                        Op::Ping => self.send_nats(b"PONG\r\n")?,
                        Op::Pong | Op::Other => {}
                        Op::Err(text) => {
                            break Err(format!("NATS -ERR {}", String::from_utf8_lossy(text)));
                        }
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let mut buf = buf;
        buf.drain(..used);
        self.nats_in = buf;
        result
    }

    /// One write per client of the subscription; a short or refused write
    /// ends that client.
    fn deliver(&mut self, sid: u64, payload: &[u8]) {
        let Some(sub) = self.subs.get(&sid) else {
            return;
        };
        let frame = &mut self.frame;
        frame.clear();
        frame.extend_from_slice(b"id: ");
        let mut n = itoa::Buffer::new();
        frame.extend_from_slice(
            n.format(nats_proto::payload_n(payload).unwrap_or(0))
                .as_bytes(),
        );
        frame.extend_from_slice(b"\ndata: ");
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\n\n");
        let mut dead = Vec::new();
        for &k in &sub.clients {
            let stream = &mut self.clients[k].stream;
            if !matches!(stream.write(frame), Ok(n) if n == frame.len()) {
                dead.push(k);
            }
        }
        for k in dead {
            self.close(k);
        }
    }

    fn heartbeat(&mut self) {
        let mut dead = Vec::new();
        for (k, c) in self.clients.iter_mut() {
            if c.sid.is_some() && !matches!(c.stream.write(b":\n\n"), Ok(3)) {
                dead.push(k);
            }
        }
        for k in dead {
            self.close(k);
        }
    }

    fn send_nats(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.nats_out.extend_from_slice(bytes);
        self.flush_nats()
    }

    /// Writes what is queued for NATS; waits for writability when the
    /// socket is full.
    fn flush_nats(&mut self) -> Result<(), String> {
        while !self.nats_out.is_empty() {
            match self.nats.write(&self.nats_out) {
                Ok(0) => return Err("NATS write returned 0".into()),
                Ok(n) => {
                    self.nats_out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("NATS write: {e}")),
            }
        }
        let want = !self.nats_out.is_empty();
        if want != self.nats_wants_write {
            let interest = if want {
                Interest::READABLE | Interest::WRITABLE
            } else {
                Interest::READABLE
            };
            self.poll
                .registry()
                .reregister(&mut self.nats, NATS, interest)
                .map_err(|e| format!("reregister: {e}"))?;
            self.nats_wants_write = want;
        }
        Ok(())
    }
}
