//! Reading history from JetStream: a client's resume after Last-Event-ID, and
//! the hub's catch-up after NATS comes back.
//!
//! Reads go through an ephemeral ordered pull consumer with the client's
//! patterns as filter subjects: flow-controlled batches, so a huge backlog is
//! never loaded at once, and no durable state per client on the server.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};

use crate::metrics::{Metrics, Source};
use crate::sse::{self, ClientQueue, EndReason};

/// Longest wait for the next replayed message before the read is abandoned.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What a replay needs to reach the stream.
#[derive(Clone)]
pub struct Replayer {
    pub js: jetstream::Context,
    pub stream: String,
    pub limit: u64,
    pub retry_ms: u64,
    pub metrics: Arc<Metrics>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("JetStream: {0}")]
    Nats(String),
    #[error("no replayed message within {0:?}")]
    Stalled(Duration),
}

fn nats_err(e: impl std::fmt::Display) -> ReplayError {
    ReplayError::Nats(e.to_string())
}

/// The stream's first and last sequence.
pub async fn bounds(
    js: &jetstream::Context,
    stream: &str,
    metrics: &Metrics,
) -> Result<(u64, u64), ReplayError> {
    metrics.jetstream_requests.inc();
    let s = js.get_stream(stream).await.map_err(nats_err)?;
    let st = &s.cached_info().state;
    Ok((st.first_sequence, st.last_sequence))
}

/// Encodes a stored message as the live path would have.
fn frame(seq: u64, msg: &async_nats::Message) -> Bytes {
    let event = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("Sse-Event"))
        .map(|v| v.as_str())
        .filter(|s| !s.is_empty());
    sse::encode_event(seq, event, &msg.payload)
}

/// Stored events matching some patterns with sequence in `start..=end`, in
/// order, read through an ephemeral ordered consumer.
pub struct RangeReader {
    messages: Option<consumer::pull::Ordered>,
    end: u64,
    done: bool,
}

impl RangeReader {
    pub async fn open(
        js: &jetstream::Context,
        stream: &str,
        patterns: &[String],
        start: u64,
        end: u64,
        metrics: &Metrics,
    ) -> Result<RangeReader, ReplayError> {
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
        let stream = js.get_stream_no_info(stream).await.map_err(nats_err)?;
        metrics.jetstream_requests.inc();
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
    pub async fn next(&mut self) -> Result<Option<(u64, Bytes)>, ReplayError> {
        if self.done {
            return Ok(None);
        }
        let Some(messages) = &mut self.messages else {
            return Ok(None);
        };
        let msg = match tokio::time::timeout(READ_TIMEOUT, messages.next()).await {
            Err(_) => return Err(ReplayError::Stalled(READ_TIMEOUT)),
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
        Ok(Some((seq, frame(seq, &msg))))
    }
}

impl Replayer {
    /// Replays events after `after` into a held queue, then releases the
    /// live frames held meanwhile. Runs on its own task for the duration of
    /// the replay only. On failure the client's stream ends with a retry
    /// hint: it resumes again from what it received.
    pub async fn resume(self, patterns: Vec<String>, after: u64, queue: Arc<ClientQueue>) {
        match self.replay_into(&patterns, after, &queue).await {
            Ok(n) => {
                self.metrics
                    .replayed
                    .get_or_create(&Source {
                        source: "jetstream",
                    })
                    .inc_by(n);
                queue.release();
            }
            Err(e) => {
                tracing::warn!(error = %e, after, "replay failed; client will resume again");
                queue.close(EndReason::Resync, Some(sse::encode_retry(self.retry_ms)));
            }
        }
    }

    async fn replay_into(
        &self,
        patterns: &[String],
        after: u64,
        queue: &Arc<ClientQueue>,
    ) -> Result<u64, ReplayError> {
        // Read after the client's subscriptions are active: anything stored
        // later reaches the hold, anything up to `last` comes from here.
        let (first, last) = bounds(&self.js, &self.stream, &self.metrics).await?;
        if last <= after {
            return Ok(0);
        }
        // History may be partly gone (stream limits) or longer than one
        // resume may replay: say so once, then replay what is left.
        let mut start = (after + 1).max(first.max(1));
        if self.limit > 0 && last - start + 1 > self.limit {
            start = last - self.limit + 1;
        }
        if start > after + 1 {
            gap(queue, after, start, &self.metrics);
        }
        let mut n = 0u64;
        let mut reader =
            RangeReader::open(&self.js, &self.stream, patterns, start, last, &self.metrics).await?;
        while let Some((seq, frame)) = reader.next().await? {
            // Flow control: wait for the client to take what is queued.
            std::future::poll_fn(|cx| queue.poll_space(cx)).await;
            if !queue.replay(seq, &frame) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }
}

/// Tells the client that events after `after` up to `first_available` are
/// not replayed (removed by stream limits, or beyond the replay limit).
fn gap(queue: &ClientQueue, after: u64, first_available: u64, metrics: &Metrics) {
    metrics.gaps.inc();
    let data = serde_json::json!({"last_event_id": after, "first_available": first_available});
    queue.offer_unsequenced(&sse::encode_control("relay.gap", &data.to_string()));
}

/// One shared subscription to catch up: events of `pattern` after `after`.
#[derive(Debug, Clone)]
pub struct CatchUpTopic {
    pub topic: usize,
    pub uid: u64,
    pub pattern: String,
    pub after: u64,
}

/// First retry delay of a catch-up; doubles up to `CATCH_UP_MAX_DELAY`.
const CATCH_UP_FIRST_DELAY: Duration = Duration::from_millis(100);
const CATCH_UP_MAX_DELAY: Duration = Duration::from_secs(2);
/// Subscriptions a catch-up reads at the same time.
const CATCH_UP_PARALLEL: usize = 16;

impl Replayer {
    /// Every event of `pattern` in `(after, to]`, in order (a window fill).
    pub async fn read(
        &self,
        pattern: &str,
        after: u64,
        to: u64,
    ) -> Result<Vec<(u64, Bytes)>, ReplayError> {
        // Only a whole range may fill a window: if stream limits removed
        // part of it, the resumes must go the way that reports the gap.
        let (first, _) = bounds(&self.js, &self.stream, &self.metrics).await?;
        if first > after + 1 {
            return Err(ReplayError::Nats(format!(
                "history before {first} is gone; cannot fill from {after}"
            )));
        }
        let patterns = [pattern.to_string()];
        let mut reader = RangeReader::open(
            &self.js,
            &self.stream,
            &patterns,
            after + 1,
            to,
            &self.metrics,
        )
        .await?;
        let mut frames = Vec::new();
        while let Some(f) = reader.next().await? {
            frames.push(f);
        }
        Ok(frames)
    }

    /// The stream's last sequence (one JetStream request).
    pub async fn last_sequence(&self) -> Result<u64, ReplayError> {
        bounds(&self.js, &self.stream, &self.metrics)
            .await
            .map(|(_, last)| last)
    }

    /// Reads, for every topic, the events after its last delivered sequence
    /// up to the stream's current end. Retries with backoff until it
    /// succeeds: during a leader election JetStream answers nothing for
    /// seconds, and giving up would lose events. Topics whose backlog
    /// exceeds the replay limit are returned as truncated instead.
    pub async fn catch_up(
        &self,
        nats: &async_nats::Client,
        topics: &[CatchUpTopic],
    ) -> (Vec<(u64, usize, Bytes)>, Vec<usize>) {
        let mut delay = CATCH_UP_FIRST_DELAY;
        loop {
            match self.catch_up_once(nats, topics).await {
                Ok(out) => return out,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "catch-up failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(CATCH_UP_MAX_DELAY);
                }
            }
        }
    }

    async fn catch_up_once(
        &self,
        nats: &async_nats::Client,
        topics: &[CatchUpTopic],
    ) -> Result<(Vec<(u64, usize, Bytes)>, Vec<usize>), ReplayError> {
        // After a reconnect the client re-sends every SUB first; once the
        // flush returns the server has them, so the stream's last sequence
        // read next bounds what live delivery may have missed.
        nats.flush().await.map_err(nats_err)?;
        let (_, last) = bounds(&self.js, &self.stream, &self.metrics).await?;
        let mut truncated = Vec::new();
        let mut todo = Vec::new();
        for t in topics {
            if t.after >= last {
                continue;
            }
            if self.limit > 0 && last - t.after > self.limit {
                truncated.push(t.topic);
            } else {
                todo.push(t.clone());
            }
        }
        // Several subscriptions are read at once: a node with thousands of
        // them would otherwise hold live delivery for thousands of round
        // trips. The caller sorts the result by sequence.
        let per_topic: Vec<Vec<(u64, usize, Bytes)>> = futures_util::stream::iter(todo)
            .map(|t: CatchUpTopic| {
                // Owned, so the futures are 'static (the task is spawned).
                let replayer = self.clone();
                async move { replayer.read_topic(&t, last).await }
            })
            .buffer_unordered(CATCH_UP_PARALLEL)
            .try_collect()
            .await?;
        Ok((per_topic.into_iter().flatten().collect(), truncated))
    }

    async fn read_topic(
        &self,
        t: &CatchUpTopic,
        last: u64,
    ) -> Result<Vec<(u64, usize, Bytes)>, ReplayError> {
        let mut reader = RangeReader::open(
            &self.js,
            &self.stream,
            std::slice::from_ref(&t.pattern),
            t.after + 1,
            last,
            &self.metrics,
        )
        .await?;
        let mut frames = Vec::new();
        while let Some((seq, frame)) = reader.next().await? {
            frames.push((seq, t.topic, frame));
        }
        Ok(frames)
    }
}
