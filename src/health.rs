//! `sse-relay health`: a tiny HTTP/1.1 client for container health checks
//! (the slim image has no curl). One `GET` with `Connection: close`, one
//! answer read, a verdict: 2xx is healthy, anything else is one line that
//! says why.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::DEFAULT_LISTEN;

/// Default bound for the whole check: connect, request, answer.
pub const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 2;

/// Most bytes of an answer read: a health answer is a status line, a few
/// headers and a word.
const MAX_ANSWER: usize = 16 * 1024;

#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// The relay's listen address, as given to `serve`; an unspecified IP
    /// (0.0.0.0, [::]) means this host's loopback.
    #[arg(long, env = "RELAY_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// URL to check instead of /healthz on --listen (http:// only), e.g.
    /// http://127.0.0.1:8080/readyz.
    #[arg(long)]
    pub url: Option<String>,
    /// Seconds the whole check may take.
    #[arg(long, default_value_t = DEFAULT_HEALTH_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

/// What to ask, validated: where to connect and what to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host[:port]` for the Host header and messages.
    pub authority: String,
    /// Path and query.
    pub path: String,
    pub addrs: Vec<SocketAddr>,
}

impl Target {
    /// The target named by the arguments; the error is a sentence.
    pub fn from_args(a: &HealthArgs) -> Result<Target, String> {
        match &a.url {
            Some(url) => Self::from_url(url),
            None => Self::from_listen(&a.listen),
        }
    }

    fn from_listen(listen: &str) -> Result<Target, String> {
        let mut addr: SocketAddr = listen
            .parse()
            .map_err(|_| format!("--listen {listen:?} is not an address like 0.0.0.0:8080"))?;
        addr.set_ip(match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
            IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
            ip => ip,
        });
        Ok(Target {
            authority: addr.to_string(),
            path: "/healthz".into(),
            addrs: vec![addr],
        })
    }

    fn from_url(raw: &str) -> Result<Target, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("--url {raw:?}: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "--url {raw:?}: only http:// is supported (the relay serves plain HTTP)"
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| format!("--url {raw:?} has no host"))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_string(),
        };
        let addrs = url
            .socket_addrs(|| Some(80))
            .map_err(|e| format!("--url {raw:?}: cannot resolve {host}: {e}"))?;
        let path = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        Ok(Target {
            authority,
            path,
            addrs,
        })
    }

    /// `http://authority/path`, for messages.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.authority, self.path)
    }
}

/// Runs the check on a runtime of its own. Ok: the line to print for a
/// healthy answer; Err: the one-line reason it is not healthy.
pub fn check_blocking(target: &Target, timeout: Duration) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    rt.block_on(check(target, timeout))
}

/// GETs the target within `timeout`: Ok for a 2xx answer.
pub async fn check(target: &Target, timeout: Duration) -> Result<String, String> {
    let url = target.url();
    match tokio::time::timeout(timeout, exchange(target)).await {
        Err(_) => Err(format!("{url}: no answer within {timeout:?}")),
        Ok(Err(e)) => Err(format!("{url}: {e}")),
        Ok(Ok((status, reason))) if (200..300).contains(&status) => {
            Ok(format!("{url}: {status} {reason}"))
        }
        Ok(Ok((status, reason))) => Err(format!("{url}: answered {status} {reason}")),
    }
}

/// One request; the status and a short reason (the body's first line,
/// escaped, else the reason phrase).
async fn exchange(target: &Target) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(target.addrs.as_slice())
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.authority))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sse-relay-health\r\nConnection: close\r\n\r\n",
        target.path, target.authority
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("cannot send the request: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut res = httparse::Response::new(&mut headers);
        match res.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = res.code.unwrap_or_default();
                let phrase = res.reason.unwrap_or_default().to_string();
                let body_len = content_length(res.headers);
                // The body's first line says why (`not ready`); read what
                // fits, but the status alone is the verdict.
                let mut body = buf.split_off(len);
                let want = body_len.unwrap_or(MAX_ANSWER).min(MAX_ANSWER);
                while body.len() < want {
                    match stream.read_buf(&mut body).await {
                        Ok(n) if n > 0 => {}
                        _ => break,
                    }
                }
                return Ok((status, reason(&phrase, &body)));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_ANSWER => {}
            Ok(httparse::Status::Partial) => return Err("the answer's head is too long".into()),
            Err(e) => return Err(format!("the answer is not HTTP/1.1: {e}")),
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err("the connection closed before an answer".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("cannot read the answer: {e}")),
        }
    }
}

fn content_length(headers: &[httparse::Header<'_>]) -> Option<usize> {
    let h = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))?;
    std::str::from_utf8(h.value).ok()?.trim().parse().ok()
}

/// The reason phrase, and the body's first line when there is one (escaped:
/// it comes from the network and goes to a log).
fn reason(phrase: &str, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().next().unwrap_or_default().trim();
    let line: String = line.chars().take(200).collect();
    let phrase = phrase.escape_debug();
    if line.is_empty() {
        phrase.to_string()
    } else {
        format!("{phrase}: {}", line.escape_debug())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(listen: &str, url: Option<&str>) -> HealthArgs {
        HealthArgs {
            listen: listen.into(),
            url: url.map(String::from),
            timeout: DEFAULT_HEALTH_TIMEOUT_SECS,
        }
    }

    #[test]
    fn an_unspecified_listen_address_is_checked_on_loopback() {
        let t = Target::from_args(&args("0.0.0.0:8080", None)).unwrap();
        assert_eq!(t.addrs, vec!["127.0.0.1:8080".parse().unwrap()]);
        assert_eq!(t.url(), "http://127.0.0.1:8080/healthz");
        let t = Target::from_args(&args("[::]:9000", None)).unwrap();
        assert_eq!(t.addrs, vec!["[::1]:9000".parse().unwrap()]);
        let t = Target::from_args(&args("10.1.2.3:80", None)).unwrap();
        assert_eq!(t.addrs, vec!["10.1.2.3:80".parse().unwrap()]);
    }

    #[test]
    fn a_url_names_host_port_path_and_query() {
        let t = Target::from_args(&args("x", Some("http://127.0.0.1:9/readyz?a=b"))).unwrap();
        assert_eq!(t.authority, "127.0.0.1:9");
        assert_eq!(t.path, "/readyz?a=b");
        assert_eq!(t.addrs, vec!["127.0.0.1:9".parse().unwrap()]);
        let t = Target::from_args(&args("x", Some("http://[::1]/"))).unwrap();
        assert_eq!(t.addrs, vec!["[::1]:80".parse().unwrap()]);
    }

    #[test]
    fn bad_targets_get_a_sentence() {
        let e = Target::from_args(&args("x", Some("https://127.0.0.1/healthz"))).unwrap_err();
        assert!(e.contains("only http://"), "{e}");
        let e = Target::from_args(&args("localhost", None)).unwrap_err();
        assert!(e.contains("--listen"), "{e}");
    }

    #[test]
    fn the_reason_is_one_escaped_line() {
        assert_eq!(
            reason("Service Unavailable", b"not ready\n"),
            "Service Unavailable: not ready"
        );
        assert_eq!(reason("OK", b""), "OK");
        assert_eq!(reason("X", b"a\x1b[31mb\nsecond"), "X: a\\u{1b}[31mb");
    }
}
