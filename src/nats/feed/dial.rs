//! Reaching a server for the live feed: the seeds and the servers they
//! announce, in turn; TCP, TLS when the URL or the server asks for it,
//! `INFO`, `CONNECT` with the same credentials file as the request
//! connection, and the first `PONG`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_nats::ServerAddr;
use async_nats::rustls::{ClientConfig, RootCertStore, pki_types::ServerName};
use base64::Engine;
use bytes::{Buf, BytesMut};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::NatsUrlAuth;
use crate::nats::wire::{self, ServerOp};

/// The socket, plain or TLS.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the server says of itself in `INFO` (the fields the feed uses).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Info {
    server_name: String,
    host: String,
    port: u16,
    tls_required: bool,
    max_payload: u64,
    nonce: String,
    pub(super) connect_urls: Vec<String>,
}

impl Info {
    pub(super) fn parse(json: &[u8]) -> Result<Info, String> {
        serde_json::from_slice(json).map_err(|e| format!("unreadable INFO: {e}"))
    }

    /// The largest message the feed accepts: the server's `max_payload`,
    /// plus room for the headers RePublish adds to a message that was
    /// already that large.
    fn message_limit(&self) -> usize {
        const DEFAULT: u64 = 64 << 20;
        let limit = if self.max_payload == 0 {
            DEFAULT
        } else {
            self.max_payload.min(DEFAULT)
        };
        limit as usize + wire::MAX_CONTROL_LINE
    }
}

/// A connection ready for `SUB`s.
pub(super) struct Conn {
    pub(super) io: Box<dyn Io>,
    /// `name (host:port)`, for logs.
    pub(super) server: String,
    pub(super) message_limit: usize,
    /// What the server sent after the handshake's `PONG`, if anything.
    pub(super) read: BytesMut,
}

/// The user JWT and the key that signs the server's nonce.
struct Creds {
    jwt: String,
    key: nkeys::KeyPair,
}

pub(super) struct Dialer {
    servers: Vec<ServerAddr>,
    next: usize,
    creds: Option<Creds>,
    url_auth: Option<NatsUrlAuth>,
    name: String,
    tls: Option<Arc<ClientConfig>>,
}

impl Dialer {
    pub(super) fn new(
        urls: &[String],
        creds: Option<&Path>,
        url_auth: Option<NatsUrlAuth>,
        name: String,
    ) -> Result<Dialer, String> {
        let servers = urls
            .iter()
            .map(|u| {
                u.parse()
                    .map_err(|e| format!("--nats-url {u:?} is not a NATS URL: {e}"))
            })
            .collect::<Result<Vec<ServerAddr>, _>>()?;
        if servers.is_empty() {
            return Err("no NATS URL".into());
        }
        let creds = creds.map(read_creds).transpose()?;
        Ok(Dialer {
            servers,
            next: 0,
            creds,
            url_auth,
            name,
            tls: None,
        })
    }

    /// Adds the servers an `INFO` announces (a cluster's other members).
    pub(super) fn learn(&mut self, info: &Info) {
        for url in &info.connect_urls {
            if let Ok(addr) = url.parse::<ServerAddr>() {
                if !self.servers.contains(&addr) {
                    self.servers.push(addr);
                }
            }
        }
    }

    /// Connects to the next server in turn, within `limit`; after a
    /// success the next turn starts again from the first.
    pub(super) async fn dial(&mut self, limit: Duration) -> Result<Conn, String> {
        let addr = self.servers[self.next % self.servers.len()].clone();
        let at = format!("{}:{}", addr.host(), addr.port());
        let attempt = tokio::time::timeout(limit, self.dial_to(&addr)).await;
        match attempt.unwrap_or_else(|_| Err(format!("no answer within {limit:?}"))) {
            Ok(conn) => {
                self.next = 0;
                Ok(conn)
            }
            Err(e) => {
                self.next = (self.next + 1) % self.servers.len();
                Err(format!("{at}: {e}"))
            }
        }
    }

    async fn dial_to(&mut self, addr: &ServerAddr) -> Result<Conn, String> {
        let mut tcp = TcpStream::connect((addr.host(), addr.port()))
            .await
            .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        // INFO comes first, in the clear; TLS (if any) starts after it.
        let mut read = BytesMut::with_capacity(4096);
        let info = next_op(&mut tcp, &mut read, |op| match op {
            ServerOp::Info(json) => Some(Info::parse(json)),
            _ => Some(Err("the server did not start with INFO".into())),
        })
        .await??;
        self.learn(&info);
        let mut io: Box<dyn Io> = if addr.tls_required() || info.tls_required {
            if !read.is_empty() {
                return Err("the server sent more than INFO before TLS".into());
            }
            let domain = ServerName::try_from(addr.host().to_owned())
                .map_err(|e| format!("TLS server name: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls_config()?)
                .connect(domain, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        let connect = self.connect_line(&info, addr)?;
        io.write_all(&connect).await.map_err(|e| e.to_string())?;
        io.flush().await.map_err(|e| e.to_string())?;
        // +OK and INFO may come before the PONG; -ERR means refused.
        next_op(&mut io, &mut read, |op| match op {
            ServerOp::Pong => Some(Ok(())),
            ServerOp::Err(text) => Some(Err(String::from_utf8_lossy(text).into_owned())),
            _ => None,
        })
        .await?
        .map_err(|refused| format!("refused: {refused}"))?;
        Ok(Conn {
            io,
            server: format!("{} ({}:{})", info.server_name, info.host, info.port),
            message_limit: info.message_limit(),
            read,
        })
    }

    /// `CONNECT {...}` and the `PING` whose `PONG` says the server took it.
    fn connect_line(&self, info: &Info, addr: &ServerAddr) -> Result<Vec<u8>, String> {
        let mut connect = serde_json::json!({
            "verbose": false,
            "pedantic": false,
            "tls_required": addr.tls_required(),
            "name": self.name,
            "lang": "rust",
            "version": env!("CARGO_PKG_VERSION"),
            "protocol": 1,
            "echo": true,
            "headers": true,
            "no_responders": true,
        });
        match &self.url_auth {
            Some(NatsUrlAuth::UserPassword { user, password }) => {
                connect["user"] = user.clone().into();
                connect["pass"] = password.clone().into();
            }
            Some(NatsUrlAuth::Token(token)) => connect["auth_token"] = token.clone().into(),
            None => {}
        }
        if let Some(c) = &self.creds {
            let sig = c
                .key
                .sign(info.nonce.as_bytes())
                .map_err(|e| format!("cannot sign the server's nonce: {e}"))?;
            connect["jwt"] = c.jwt.clone().into();
            connect["sig"] = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(sig)
                .into();
        }
        let mut line = b"CONNECT ".to_vec();
        line.extend_from_slice(connect.to_string().as_bytes());
        line.extend_from_slice(b"\r\n");
        line.extend_from_slice(wire::PING);
        Ok(line)
    }

    /// The platform's roots, as async-nats trusts them (made once).
    fn tls_config(&mut self) -> Result<Arc<ClientConfig>, String> {
        if let Some(c) = &self.tls {
            return Ok(c.clone());
        }
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(format!(
                "no trusted certificates found: {:?}",
                found.errors.first().map(ToString::to_string)
            ));
        }
        let config = Arc::new(
            ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        self.tls = Some(config.clone());
        Ok(config)
    }
}

/// Reads operations until `wanted` answers for one; the bytes after it stay
/// in `read`.
async fn next_op<T>(
    io: &mut (impl AsyncRead + Unpin + ?Sized),
    read: &mut BytesMut,
    mut wanted: impl FnMut(ServerOp<'_>) -> Option<T>,
) -> Result<T, String> {
    loop {
        while let Some((op, used)) =
            wire::parse(read, wire::MAX_CONTROL_LINE).map_err(|e| e.to_string())?
        {
            let answer = wanted(op);
            read.advance(used);
            if let Some(a) = answer {
                return Ok(a);
            }
        }
        read.reserve(4096);
        if io.read_buf(read).await.map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection".into());
        }
    }
}

fn read_creds(path: &Path) -> Result<Creds, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read NATS credentials {}: {e}", path.display()))?;
    parse_creds(&text).ok_or_else(|| {
        format!(
            "NATS credentials {}: no user JWT and seed in it",
            path.display()
        )
    })
}

/// A `.creds` file: the JWT and the seed, each on the line after its
/// `-----BEGIN ...-----` marker.
fn parse_creds(text: &str) -> Option<Creds> {
    let after = |marker: &str| {
        let mut lines = text.lines().map(str::trim);
        lines.find(|l| l.starts_with("---") && l.contains("BEGIN") && l.contains(marker))?;
        lines.find(|l| !l.is_empty()).map(str::to_owned)
    };
    let jwt = after("JWT")?;
    let seed = after("SEED")?;
    let key = nkeys::KeyPair::from_seed(&seed).ok()?;
    Some(Creds { jwt, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_creds_file_and_signs_with_its_seed() {
        let key = nkeys::KeyPair::new_user();
        let text = format!(
            "-----BEGIN NATS USER JWT-----\neyJhbGciOi.x.y\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            key.seed().unwrap()
        );
        let creds = parse_creds(&text).expect("parsed");
        assert_eq!(creds.jwt, "eyJhbGciOi.x.y");
        let sig = creds.key.sign(b"nonce").unwrap();
        assert!(key.verify(b"nonce", &sig).is_ok());
        assert!(parse_creds("-----BEGIN NATS USER JWT-----\nabc\n").is_none());
        assert!(parse_creds(&text.replace(&key.seed().unwrap(), "SUAXYZ")).is_none());
    }

    #[test]
    fn the_message_limit_leaves_room_for_republish_headers() {
        let info = Info::parse(br#"{"max_payload":1048576,"server_name":"n1"}"#).unwrap();
        assert_eq!(info.message_limit(), (1 << 20) + wire::MAX_CONTROL_LINE);
        assert_eq!(
            Info::default().message_limit(),
            (64 << 20) + wire::MAX_CONTROL_LINE
        );
        assert!(Info::parse(b"{").is_err());
    }
}
