//! Latency histogram (log-linear, mergeable across processes), the same by
//! second of a run, the latency a server adds to each message, and the
//! final report: a human-readable table and one JSON line. Only serde_json
//! besides std: the integration tests include this file as it is
//! (tests/it/load_harness.rs).

use std::collections::HashMap;

use serde_json::{Map, Value, json};

/// Log-linear histogram of microseconds: exact below 16, then 16 buckets
/// per power of two (about 6 % resolution). Cheap to record and to merge.
#[derive(Clone)]
pub(crate) struct Hist {
    buckets: Vec<u64>,
    pub(crate) count: u64,
    pub(crate) max: u64,
}

const BUCKETS: usize = 16 + 60 * 16;

impl Default for Hist {
    fn default() -> Self {
        Hist {
            buckets: vec![0; BUCKETS],
            count: 0,
            max: 0,
        }
    }
}

fn index(v: u64) -> usize {
    if v < 16 {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros() as usize;
    let mantissa = ((v >> (msb - 4)) & 0xF) as usize;
    (16 + (msb - 4) * 16 + mantissa).min(BUCKETS - 1)
}

/// The middle of bucket `i`.
fn value(i: usize) -> u64 {
    if i < 16 {
        return i as u64;
    }
    let shift = (i - 16) / 16;
    let mantissa = ((i - 16) % 16) as u64;
    let low = (16 + mantissa) << shift;
    low + ((1u64 << shift) >> 1)
}

impl Hist {
    pub(crate) fn record(&mut self, v: u64) {
        self.buckets[index(v)] += 1;
        self.count += 1;
        self.max = self.max.max(v);
    }

    pub(crate) fn merge(&mut self, other: &Hist) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1); 0 when empty.
    pub(crate) fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i).min(self.max);
            }
        }
        self.max
    }

    /// Sparse JSON form: `{"n": count, "max": max, "b": [[index, count], ...]}`.
    pub(crate) fn to_json(&self) -> Value {
        let b: Vec<Value> = self
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| json!([i, c]))
            .collect();
        json!({"n": self.count, "max": self.max, "b": b})
    }

    pub(crate) fn from_json(v: &Value) -> Hist {
        let mut h = Hist {
            count: v["n"].as_u64().unwrap_or(0),
            max: v["max"].as_u64().unwrap_or(0),
            ..Hist::default()
        };
        for pair in v["b"].as_array().into_iter().flatten() {
            let i = pair[0].as_u64().unwrap_or(0) as usize;
            if i < BUCKETS {
                h.buckets[i] += pair[1].as_u64().unwrap_or(0);
            }
        }
        h
    }

    /// p50/p99/p99.9/max in milliseconds, for the report.
    pub(crate) fn summary_ms(&self) -> Value {
        let ms = |us: u64| (us as f64 / 1000.0 * 1000.0).round() / 1000.0;
        json!({
            "samples": self.count,
            "p50_ms": ms(self.quantile(0.50)),
            "p99_ms": ms(self.quantile(0.99)),
            "p999_ms": ms(self.quantile(0.999)),
            "max_ms": ms(self.max),
        })
    }
}

/// Seconds a [`PerSecond`] keeps; later samples are not recorded.
pub(crate) const MAX_SECONDS: usize = 3600;

/// Whether an event published at `published_ns` counts in the latency
/// figures: with a measured window starting at `start_ns` (after
/// `--warmup`), only what was published from then on; without one, all.
pub(crate) fn measured(published_ns: u64, start_ns: Option<u64>) -> bool {
    start_ns.is_none_or(|s| published_ns >= s)
}

/// When one message reached one receiver: the subject's index `k` (of
/// `events.bench.<k>`), the message's publish time `"t"` (unix ns, unique
/// per subject) and the time of receipt (unix ns).
pub(crate) type Arrival = [u64; 3];

/// The latency a server adds to each message: for every client's arrival
/// (a sample of the clients, [`Arrival`]), its receipt minus the NATS-path
/// probe's receipt of the same message (subject, `"t"`), in microseconds,
/// 0 when the client was first. Both are timed on one clock, so nothing of
/// the NATS path (a nats-server pause, a burst) is left in it, and its p99
/// is the p99 of what the server adds, not a difference of two p99s of
/// different messages.
#[derive(Default)]
pub(crate) struct Added {
    pub(crate) hist: Hist,
    /// By second of the client's receipt since `epoch`.
    pub(crate) per_second: PerSecond,
    /// Client arrivals whose message the probe did not see.
    pub(crate) unpaired: u64,
}

/// Pairs `clients`' arrivals with the probe's, by (subject index, `"t"`).
pub(crate) fn added_latency(
    clients: &[Arrival],
    probe: &HashMap<(u64, u64), u64>,
    epoch: u64,
) -> Added {
    let mut added = Added::default();
    for &[k, t, at] in clients {
        let Some(&seen) = probe.get(&(k, t)) else {
            added.unpaired += 1;
            continue;
        };
        let us = at.saturating_sub(seen) / 1000;
        added.hist.record(us);
        if at >= epoch {
            let sec = ((at - epoch) / 1_000_000_000) as usize;
            added.per_second.record(sec, us);
        }
    }
    added
}

/// Latency histograms by whole second of receipt since a run's start
/// (index 0 is the first second), mergeable across processes.
#[derive(Clone, Default)]
pub(crate) struct PerSecond {
    secs: Vec<Hist>,
}

impl PerSecond {
    pub(crate) fn record(&mut self, sec: usize, us: u64) {
        if sec >= MAX_SECONDS {
            return;
        }
        if self.secs.len() <= sec {
            self.secs.resize_with(sec + 1, Hist::default);
        }
        self.secs[sec].record(us);
    }

    /// Adds `other` second by second (the result is as long as the longer).
    pub(crate) fn merge(&mut self, other: &PerSecond) {
        if self.secs.len() < other.secs.len() {
            self.secs.resize_with(other.secs.len(), Hist::default);
        }
        for (a, b) in self.secs.iter_mut().zip(&other.secs) {
            a.merge(b);
        }
    }

    /// The p99 of each second in ms; `None` for a second with no sample.
    pub(crate) fn p99_ms(&self) -> Vec<Option<f64>> {
        self.secs
            .iter()
            .map(|h| (h.count > 0).then(|| r3(h.quantile(0.99) as f64 / 1000.0)))
            .collect()
    }

    pub(crate) fn to_json(&self) -> Value {
        Value::Array(self.secs.iter().map(Hist::to_json).collect())
    }

    pub(crate) fn from_json(v: &Value) -> PerSecond {
        let secs = v.as_array().into_iter().flatten();
        PerSecond {
            secs: secs.take(MAX_SECONDS).map(Hist::from_json).collect(),
        }
    }
}

/// An ordered list of named results, printed as a table and as JSON.
#[derive(Default)]
pub(crate) struct Report {
    rows: Vec<(String, Value)>,
}

impl Report {
    pub(crate) fn set(&mut self, key: &str, v: impl Into<Value>) {
        let v = v.into();
        match self.rows.iter_mut().find(|(k, _)| k == key) {
            Some(row) => row.1 = v,
            None => self.rows.push((key.to_string(), v)),
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.rows.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Appends `other`'s rows (replacing rows of the same name).
    pub(crate) fn extend(&mut self, other: &Report) {
        for (k, v) in &other.rows {
            self.set(k, v.clone());
        }
    }

    /// Renames every key that starts with `from` to start with `to`.
    pub(crate) fn rename_prefix(&mut self, from: &str, to: &str) {
        for (k, _) in &mut self.rows {
            if let Some(rest) = k.strip_prefix(from) {
                *k = format!("{to}{rest}");
            }
        }
    }

    pub(crate) fn to_json(&self) -> Value {
        let mut map = Map::new();
        for (k, v) in &self.rows {
            map.insert(k.clone(), v.clone());
        }
        Value::Object(map)
    }

    pub(crate) fn print(&self) {
        self.print_table();
        println!("{}", self.to_json());
    }

    pub(crate) fn print_table(&self) {
        let width = self.rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        println!();
        println!("{:-<1$}", "", width + 40);
        for (k, v) in &self.rows {
            let shown = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => match n.as_f64() {
                    Some(f) if n.is_f64() => format!("{f:.3}"),
                    _ => n.to_string(),
                },
                other => other.to_string(),
            };
            println!("{k:<width$}  {shown}");
        }
        println!("{:-<1$}", "", width + 40);
    }
}

/// Rounds to 3 decimals (keeps the JSON line readable).
pub(crate) fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
