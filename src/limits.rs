//! Abuse limits, shared by every shard of the process: open connections,
//! streams and new streams per second per client IP, streams per token.
//!
//! Counting happens where connections and streams begin and end (a permit
//! whose drop gives the slot back), never per event.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hyper::header::HeaderMap;

use crate::config::LimitsConfig;

/// Rate-limiter checks between two sweeps of idle IPs out of its map.
const RATE_SWEEP_EVERY: usize = 4096;

/// Which limit refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    StreamsPerIp,
    RatePerIp,
    StreamsPerToken,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::StreamsPerIp => "too many streams from this address",
            Refused::RatePerIp => "too many new streams from this address",
            Refused::StreamsPerToken => "too many streams for this token",
        }
    }
}

pub struct Limits {
    cfg: LimitsConfig,
    connections: AtomicUsize,
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    by_token: Mutex<HashMap<u64, usize>>,
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    rate_checks: AtomicUsize,
    /// Hashes tokens to counting keys with a per-process random key.
    token_keys: RandomState,
}

/// One open connection; over capacity when the process already had
/// `max_connections` (it is answered, with a refusal, then closed).
pub(crate) struct ConnectionPermit {
    limits: Arc<Limits>,
    pub(crate) over_capacity: bool,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limits.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One admitted stream's share of the per-IP and per-token counts.
pub(crate) struct StreamPermit {
    limits: Arc<Limits>,
    ip: Option<IpAddr>,
    token: Option<u64>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            release(&self.limits.by_ip, &ip);
        }
        if let Some(t) = self.token {
            release(&self.limits.by_token, &t);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Takes one slot of `key` if fewer than `max` are taken.
fn acquire<K: std::hash::Hash + Eq + Copy>(
    map: &Mutex<HashMap<K, usize>>,
    key: K,
    max: usize,
) -> bool {
    let mut m = lock(map);
    let n = m.entry(key).or_insert(0);
    if *n >= max {
        if *n == 0 {
            m.remove(&key);
        }
        return false;
    }
    *n += 1;
    true
}

fn release<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, usize>>, key: &K) {
    let mut m = lock(map);
    if let Some(n) = m.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            m.remove(key);
        }
    }
}

impl Limits {
    pub fn new(cfg: LimitsConfig) -> Self {
        Limits {
            rate: cfg
                .rate_per_ip
                .map(|r| RateLimiter::keyed(Quota::per_second(r))),
            cfg,
            connections: AtomicUsize::new(0),
            by_ip: Mutex::default(),
            by_token: Mutex::default(),
            rate_checks: AtomicUsize::new(0),
            token_keys: RandomState::new(),
        }
    }

    /// Counts a new connection.
    pub(crate) fn connection(self: &Arc<Self>) -> ConnectionPermit {
        let before = self.connections.fetch_add(1, Ordering::AcqRel);
        ConnectionPermit {
            limits: self.clone(),
            over_capacity: before >= self.cfg.max_connections,
        }
    }

    /// The client's address: the peer's, or the one a trusted proxy put in
    /// `--client-ip-header` (its last value, the one the proxy appended).
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let Some(name) = &self.cfg.client_ip_header else {
            return peer;
        };
        headers
            .get_all(name)
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(peer)
    }

    /// Counts a new stream attempt from `ip` against the rate limit.
    pub(crate) fn check_rate(&self, ip: IpAddr) -> Result<(), Refused> {
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        if self.rate_checks.fetch_add(1, Ordering::Relaxed) % RATE_SWEEP_EVERY == 0 {
            rate.retain_recent();
        }
        rate.check_key(&ip).map_err(|_| Refused::RatePerIp)
    }

    /// Admits a stream from `ip` holding `token` (`sub`, or the token
    /// itself): None when no per-stream limit is on.
    pub(crate) fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        token: &str,
    ) -> Result<Option<Box<StreamPermit>>, Refused> {
        if self.cfg.per_ip.is_none() && self.cfg.per_token.is_none() {
            return Ok(None);
        }
        let mut permit = StreamPermit {
            limits: self.clone(),
            ip: None,
            token: None,
        };
        if let Some(max) = self.cfg.per_ip {
            if !acquire(&self.by_ip, ip, max) {
                return Err(Refused::StreamsPerIp);
            }
            permit.ip = Some(ip);
        }
        if let Some(max) = self.cfg.per_token {
            let key = self.token_keys.hash_one(token);
            // Dropping the permit gives back the IP slot taken above.
            if !acquire(&self.by_token, key, max) {
                return Err(Refused::StreamsPerToken);
            }
            permit.token = Some(key);
        }
        Ok(Some(Box::new(permit)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn limits(per_ip: Option<usize>, per_token: Option<usize>, max: usize) -> Arc<Limits> {
        Arc::new(Limits::new(LimitsConfig {
            max_connections: max,
            per_ip,
            rate_per_ip: None,
            client_ip_header: None,
            per_token,
        }))
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn connections_over_the_maximum_are_marked_and_given_back() {
        let l = limits(None, None, 2);
        let a = l.connection();
        let b = l.connection();
        let c = l.connection();
        assert!(!a.over_capacity && !b.over_capacity && c.over_capacity);
        drop((a, c));
        assert!(!l.connection().over_capacity);
    }

    #[test]
    fn streams_per_ip_and_per_token_are_counted_and_released() {
        let l = limits(Some(2), Some(3), 100);
        let p1 = l.admit(ip(1), "alice").unwrap();
        let p2 = l.admit(ip(1), "alice").unwrap();
        assert_eq!(l.admit(ip(1), "bob").err(), Some(Refused::StreamsPerIp));
        let p3 = l.admit(ip(2), "alice").unwrap();
        assert_eq!(
            l.admit(ip(3), "alice").err(),
            Some(Refused::StreamsPerToken)
        );
        // The refused attempt above gave its IP slot back.
        assert!(l.admit(ip(3), "carol").is_ok());
        drop(p1);
        assert!(l.admit(ip(1), "dave").is_ok());
        drop((p2, p3));
        assert!(lock(&l.by_ip).len() <= 2, "released entries are removed");
    }

    #[test]
    fn no_limits_no_permit() {
        assert!(limits(None, None, 10).admit(ip(1), "t").unwrap().is_none());
    }

    #[test]
    fn rate_per_ip_allows_a_burst_then_refuses() {
        let l = Limits::new(LimitsConfig {
            max_connections: 10,
            per_ip: None,
            rate_per_ip: NonZeroU32::new(3),
            client_ip_header: None,
            per_token: None,
        });
        for _ in 0..3 {
            assert!(l.check_rate(ip(1)).is_ok());
        }
        assert_eq!(l.check_rate(ip(1)), Err(Refused::RatePerIp));
        assert!(l.check_rate(ip(2)).is_ok(), "per address");
    }

    #[test]
    fn client_ip_comes_from_the_trusted_header_only_when_configured() {
        let mut h = HeaderMap::new();
        h.insert("fly-client-ip", "203.0.113.7".parse().unwrap());
        let plain = limits(None, None, 1);
        assert_eq!(plain.client_ip(ip(9), &h), ip(9));
        let proxied = Limits::new(LimitsConfig {
            max_connections: 1,
            per_ip: None,
            rate_per_ip: None,
            client_ip_header: Some("fly-client-ip".parse().unwrap()),
            per_token: None,
        });
        assert_eq!(proxied.client_ip(ip(9), &h), IpAddr::from([203, 0, 113, 7]));
        h.insert("fly-client-ip", "not an ip".parse().unwrap());
        assert_eq!(
            proxied.client_ip(ip(9), &h),
            ip(9),
            "garbage falls back to the peer"
        );
    }
}
