//! Reading stored events from JetStream. Every read returns frames (encoded
//! as the live path would have) and never touches a client's queue: the
//! session and the hub decide where frames go.
//!
//! Reads go through an ephemeral ordered pull consumer with the patterns as
//! filter subjects: flow-controlled batches, so a huge backlog is never
//! loaded at once, and no durable state per client on the server.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

use crate::metrics::Metrics;

/// Longest wait for the next stored message before the read is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// First retry delay of a catch-up; doubles up to `CATCH_UP_MAX_DELAY`.
const CATCH_UP_FIRST_DELAY: Duration = Duration::from_millis(100);
const CATCH_UP_MAX_DELAY: Duration = Duration::from_secs(2);
/// Subscriptions a catch-up reads at the same time.
const CATCH_UP_PARALLEL: usize = 16;

/// A stored event: its stream sequence and its SSE frame.
pub(crate) type Stored = (u64, Bytes);

/// The stream's first and last sequence at the time of asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub first: u64,
    pub last: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum HistoryError {
    #[error("JetStream: {0}")]
    Nats(String),
    #[error("no stored message within {0:?}")]
    Stalled(Duration),
    #[error("events after {after} are gone from the stream (it starts at {first})")]
    Gone { after: u64, first: u64 },
}

fn nats_err(e: impl std::fmt::Display) -> HistoryError {
    HistoryError::Nats(e.to_string())
}

/// What reads need to reach the stream. The one owner of stream-info
/// requests (`bounds`), so each is counted once.
#[derive(Clone)]
pub(crate) struct History {
    js: jetstream::Context,
    stream: String,
    metrics: Arc<Metrics>,
}

/// Where a resume's replay starts, and the gap it must report first (events
/// removed by stream limits, or beyond the replay limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResumePlan {
    /// First sequence to replay; nothing to replay when above `last`.
    pub start: u64,
    pub last: u64,
    /// `Some(first_available)` when events after the client's id are skipped.
    pub gap: Option<u64>,
}

impl ResumePlan {
    /// Plans a replay of events after `after` within `bounds`, at most
    /// `limit` events (0: no limit).
    pub(crate) fn new(after: u64, bounds: Bounds, limit: u64) -> ResumePlan {
        let mut start = (after + 1).max(bounds.first.max(1));
        if limit > 0 && bounds.last >= start && bounds.last - start + 1 > limit {
            start = bounds.last - limit + 1;
        }
        let gap = (start > after + 1 && bounds.last > after).then_some(start);
        ResumePlan {
            start,
            last: bounds.last,
            gap,
        }
    }
}

impl History {
    pub(crate) fn new(js: jetstream::Context, stream: String, metrics: Arc<Metrics>) -> History {
        History {
            js,
            stream,
            metrics,
        }
    }

    /// The stream's first and last sequence (one JetStream request).
    pub(crate) async fn bounds(&self) -> Result<Bounds, HistoryError> {
        self.metrics.jetstream_requests.inc();
        let s = self.js.get_stream(&self.stream).await.map_err(nats_err)?;
        let st = &s.cached_info().state;
        Ok(Bounds {
            first: st.first_sequence,
            last: st.last_sequence,
        })
    }

    /// Opens a read of the stored events matching `patterns` with sequence
    /// in `start..=end`, in order.
    pub(crate) async fn range(
        &self,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<RangeReader, HistoryError> {
        RangeReader::open(self, patterns, start, end).await
    }

    /// Every event of `pattern` in `(after, to]`, in order, or `Gone` when
    /// stream limits removed part of it (a window fill must be whole).
    pub(crate) async fn read(
        &self,
        pattern: &str,
        after: u64,
        to: u64,
    ) -> Result<Vec<Stored>, HistoryError> {
        let first = self.bounds().await?.first;
        if first > after + 1 {
            return Err(HistoryError::Gone { after, first });
        }
        let patterns = [pattern.to_string()];
        self.range(&patterns, after + 1, to).await?.collect().await
    }

    /// Reads, for every topic, the events after its last delivered sequence
    /// up to the stream's current end. Retries with backoff until it
    /// succeeds: during a leader election JetStream answers nothing for
    /// seconds, and giving up would lose events. Topics whose backlog
    /// exceeds `limit` are returned as truncated instead.
    pub(crate) async fn catch_up<K: Copy + Send + 'static>(
        &self,
        nats: &async_nats::Client,
        topics: &[CatchUpTopic<K>],
        limit: u64,
    ) -> CaughtUp<K> {
        let mut delay = CATCH_UP_FIRST_DELAY;
        loop {
            match self.catch_up_once(nats, topics, limit).await {
                Ok(out) => return out,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "catch-up failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(CATCH_UP_MAX_DELAY);
                }
            }
        }
    }

    async fn catch_up_once<K: Copy + Send + 'static>(
        &self,
        nats: &async_nats::Client,
        topics: &[CatchUpTopic<K>],
        limit: u64,
    ) -> Result<CaughtUp<K>, HistoryError> {
        // After a reconnect the client re-sends every SUB first; once the
        // flush returns the server has them, so the stream's last sequence
        // read next bounds what live delivery may have missed.
        nats.flush().await.map_err(nats_err)?;
        let last = self.bounds().await?.last;
        let mut out = CaughtUp {
            frames: Vec::new(),
            truncated: Vec::new(),
        };
        let mut todo = Vec::new();
        for t in topics {
            if t.after >= last {
                continue;
            }
            if limit > 0 && last - t.after > limit {
                out.truncated.push(t.key);
            } else {
                todo.push(t.clone());
            }
        }
        // Several subscriptions are read at once: a node with thousands of
        // them would otherwise hold live delivery for thousands of round
        // trips. The caller sorts the result by sequence.
        let per_topic: Vec<Vec<(u64, K, Bytes)>> = futures_util::stream::iter(todo)
            .map(|t: CatchUpTopic<K>| {
                // Owned, so the futures are 'static (the task is spawned).
                let history = self.clone();
                async move {
                    let patterns = [t.pattern];
                    let frames = history.range(&patterns, t.after + 1, last).await?;
                    let frames = frames.collect().await?;
                    Ok::<_, HistoryError>(frames.into_iter().map(|(s, f)| (s, t.key, f)).collect())
                }
            })
            .buffer_unordered(CATCH_UP_PARALLEL)
            .try_collect()
            .await?;
        out.frames = per_topic.into_iter().flatten().collect();
        Ok(out)
    }
}

/// One shared subscription to catch up: events of `pattern` after `after`.
#[derive(Debug, Clone)]
pub(crate) struct CatchUpTopic<K> {
    pub key: K,
    pub pattern: String,
    pub after: u64,
}

/// What a catch-up read: frames tagged with their topic (unsorted), and the
/// topics whose backlog was over the limit.
#[derive(Debug)]
pub(crate) struct CaughtUp<K> {
    pub frames: Vec<(u64, K, Bytes)>,
    pub truncated: Vec<K>,
}

/// Stored events matching some patterns with sequence in `start..=end`, in
/// order, read through an ephemeral ordered consumer.
pub(crate) struct RangeReader {
    messages: Option<consumer::pull::Ordered>,
    end: u64,
    done: bool,
}

impl RangeReader {
    async fn open(
        history: &History,
        patterns: &[String],
        start: u64,
        end: u64,
    ) -> Result<RangeReader, HistoryError> {
        let mut reader = RangeReader {
            messages: None,
            end,
            done: true,
        };
        if start > end || start == 0 {
            return Ok(reader);
        }
        let (filter_subject, filter_subjects) = match patterns {
            [one] => (one.clone(), Vec::new()),
            many => (String::new(), many.to_vec()),
        };
        // No request: a handle to the stream without fetching its info.
        let stream = history
            .js
            .get_stream_no_info(&history.stream)
            .await
            .map_err(nats_err)?;
        history.metrics.jetstream_requests.inc();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject,
                filter_subjects,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(nats_err)?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(reader);
        }
        reader.messages = Some(consumer.messages().await.map_err(nats_err)?);
        reader.done = false;
        Ok(reader)
    }

    /// The next event, or None when the range is exhausted.
    pub(crate) async fn next(&mut self) -> Result<Option<Stored>, HistoryError> {
        if self.done {
            return Ok(None);
        }
        let Some(messages) = &mut self.messages else {
            return Ok(None);
        };
        let msg = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
            Err(_) => return Err(HistoryError::Stalled(READ_TIMEOUT)),
            Ok(None) => {
                self.done = true;
                return Ok(None);
            }
            Ok(Some(m)) => m.map_err(nats_err)?,
        };
        let (seq, pending) = {
            let info = msg.info().map_err(nats_err)?;
            (info.stream_sequence, info.pending)
        };
        if seq > self.end {
            self.done = true;
            return Ok(None);
        }
        if seq >= self.end || pending == 0 {
            self.done = true;
        }
        Ok(Some((seq, super::event_frame(seq, &msg))))
    }

    /// Every remaining event, in order.
    pub(crate) async fn collect(mut self) -> Result<Vec<Stored>, HistoryError> {
        let mut out = Vec::new();
        while let Some(f) = self.next().await? {
            out.push(f);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(first: u64, last: u64) -> Bounds {
        Bounds { first, last }
    }

    #[test]
    fn plans_a_whole_resume_without_a_gap() {
        let p = ResumePlan::new(10, b(1, 20), 0);
        assert_eq!((p.start, p.last, p.gap), (11, 20, None));
        let p = ResumePlan::new(20, b(1, 20), 0);
        assert!(p.start > p.last, "nothing to replay");
        assert_eq!(p.gap, None);
    }

    #[test]
    fn plans_a_gap_for_removed_history_and_the_limit() {
        let p = ResumePlan::new(3, b(8, 20), 0);
        assert_eq!((p.start, p.gap), (8, Some(8)));
        let p = ResumePlan::new(0, b(1, 100), 10);
        assert_eq!((p.start, p.gap), (91, Some(91)));
        // An empty stream (first = last + 1) has nothing to report.
        let p = ResumePlan::new(5, b(6, 5), 10);
        assert_eq!(p.gap, None);
    }
}
