//! Shutdown without a reconnect storm: the streams of a draining shard close
//! a slice at a time over `--drain-seconds`, each with a jittered `retry:`,
//! so their clients come back gradually (to other machines, or shards still
//! running) and resume by Last-Event-ID. Streams not yet closed keep
//! receiving events meanwhile.

use std::time::Duration;

use tokio::time::Instant;

use super::Upstream;
use super::dispatcher::{Dispatcher, jittered_retry};
use crate::client::{ClientId, EndReason};

/// How often a drain closes its next slice of streams.
pub(super) const DRAIN_TICK: Duration = Duration::from_millis(50);

pub(super) struct Drain {
    /// The clients at the start of the drain, in the order they close.
    order: Vec<ClientId>,
    closed: usize,
    started: Instant,
}

impl<U: Upstream> Dispatcher<U> {
    /// Starts spreading the end of every stream over the drain period;
    /// true when there is nothing to spread (no period, or no client) and
    /// the loop can stop at once.
    pub(super) fn start_drain(&mut self) -> bool {
        let order = self.clients.ids();
        tracing::info!(
            clients = order.len(),
            seconds = self.cfg.drain.as_secs_f64(),
            "draining: closing streams gradually"
        );
        if self.cfg.drain.is_zero() || order.is_empty() {
            return true;
        }
        self.drain = Some(Drain {
            order,
            closed: 0,
            started: Instant::now(),
        });
        false
    }

    /// Closes the streams due by now (an even share of the period each
    /// tick); true once every stream is closed.
    pub(super) fn drain_step(&mut self) -> bool {
        let Some(d) = &mut self.drain else {
            return true;
        };
        let total = d.order.len();
        let elapsed = d.started.elapsed().as_secs_f64();
        let share = (elapsed / self.cfg.drain.as_secs_f64()).min(1.0);
        let due = ((total as f64 * share).ceil() as usize).min(total);
        let mut n = 0;
        for id in &d.order[d.closed..due] {
            if let Some(c) = self.clients.get(*id)
                && c.queue.close(
                    EndReason::Shutdown,
                    Some(jittered_retry(self.cfg.retry_ms, &mut self.rng)),
                )
            {
                n += 1;
            }
        }
        d.closed = due;
        let finished = due == total;
        self.count_ends(EndReason::Shutdown, n);
        // Joins that raced the start of the drain end with the last slice
        // (after the loop).
        finished
    }
}
