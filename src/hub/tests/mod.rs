//! The hub's invariants, one test each, driven by a fake upstream
//! ([`fake`]) under paused tokio time: timers fire when a test advances the
//! clock, never on their own.

mod fake;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;

use super::{Backfill, Heartbeat, HubConfig};
use crate::client::Departure;
use crate::nats::LinkEvent;
use fake::{
    Received, config, drain, in_an_hour, receive_ids, received, settle, start, until, watch,
};

#[tokio::test(start_paused = true)]
async fn one_subscription_per_pattern_dropped_with_its_last_client() {
    let s = start(config());
    let a = s.join(&["events.a.*"], None).await;
    let b = s.join(&["events.a.*"], None).await;
    let c = s.join(&["events.b"], None).await;
    assert_eq!(s.fake.subscriptions("events.a.*"), 1);
    assert_eq!(s.fake.subscriptions("events.b"), 1);
    s.hub.depart(a.id);
    until("a leaves", || s.metrics.connections.get() == 2).await;
    assert_eq!(s.fake.subscriptions("events.a.*"), 1, "b still reads it");
    s.hub.depart(b.id);
    until("the last client's subscription is dropped", || {
        s.fake.subscriptions("events.a.*") == 0
    })
    .await;
    assert_eq!(s.fake.subscriptions("events.b"), 1);
    s.hub.depart(c.id);
    until("events.b dropped", || s.fake.subscriptions("events.b") == 0).await;
    // A new client subscribes afresh.
    let _d = s.join(&["events.a.*"], None).await;
    assert_eq!(s.fake.subscriptions("events.a.*"), 1);
}

/// A client joining two patterns waits for the one not yet subscribed.
/// Meanwhile the other pattern's last client may leave: its subscription
/// must stay for the joining client, or that client would get one
/// pattern's events and silently never the other's.
#[tokio::test(start_paused = true)]
async fn a_pending_join_keeps_its_active_topics() {
    let s = start(config());
    let other = s.join(&["events.c.>"], None).await;
    let gate = Arc::new(Semaphore::new(0));
    *s.fake.subscribe_gate.lock().unwrap() = Some(gate.clone());
    let joining = s.spawn_join(&["events.c.b.>", "events.c.>"], None);
    until("the new pattern is subscribing", || {
        s.fake.lock().gated_subscribes == 1
    })
    .await;
    s.hub.depart(other.id);
    settle().await;
    assert_eq!(
        s.fake.subscriptions("events.c.>"),
        1,
        "kept for the client still joining"
    );
    gate.add_permits(1);
    let j = joining.await.unwrap();
    s.fake.publish("events.c.a.1");
    s.fake.publish("events.c.b.1");
    let mut got = Received::default();
    receive_ids(&j.queue, &mut got, 2).await;
    assert_eq!(got.ids, [1, 2]);
}

/// The same when the topic becomes active while the client still waits
/// for its other one: the first topic's other client leaving then must not
/// drop it either.
#[tokio::test(start_paused = true)]
async fn a_topic_that_becomes_active_during_a_join_stays_for_it() {
    let s = start(config());
    let gate = Arc::new(Semaphore::new(0));
    *s.fake.subscribe_gate.lock().unwrap() = Some(gate.clone());
    let first = s.spawn_join(&["events.a"], None);
    until("events.a subscribing", || {
        s.fake.lock().gated_subscribes == 1
    })
    .await;
    let both = s.spawn_join(&["events.a", "events.b"], None);
    until("events.b subscribing", || {
        s.fake.lock().gated_subscribes == 2
    })
    .await;
    // events.a becomes active: the first client joins; the other still
    // waits for events.b.
    gate.add_permits(1);
    let first = first.await.unwrap();
    s.hub.depart(first.id);
    settle().await;
    assert_eq!(
        s.fake.subscriptions("events.a"),
        1,
        "kept for the client still joining"
    );
    gate.add_permits(1);
    let j = both.await.unwrap();
    s.fake.publish("events.a");
    s.fake.publish("events.b");
    let mut got = Received::default();
    receive_ids(&j.queue, &mut got, 2).await;
    assert_eq!(got.ids, [1, 2]);
}

/// A subscription that ends before its joins were answered (the NATS
/// client closed) answers them with an error instead of leaving them
/// waiting forever.
#[tokio::test(start_paused = true)]
async fn a_subscription_that_ends_at_once_fails_its_joins() {
    let s = start(config());
    s.fake.lock().end_subscriptions = true;
    let join = s.hub.join(
        vec!["events.a".into()],
        in_an_hour(),
        None,
        Heartbeat::Comment,
    );
    let answer = tokio::time::timeout(Duration::from_secs(60), join).await;
    assert!(
        matches!(answer, Ok(Err(_))),
        "answered with an error, not left waiting"
    );
}

/// A resume parked behind a window fill when the stream is recreated gets
/// its answer: its stream ends with the reset like every other.
#[tokio::test(start_paused = true)]
async fn a_resume_waiting_for_a_fill_is_answered_when_the_stream_resets() {
    let s = start(config());
    for _ in 0..10 {
        s.fake.store("events.a");
    }
    // The window starts at 10: a resume from 5 needs a fill.
    let _live = s.join(&["events.a"], None).await;
    let gate = Arc::new(Semaphore::new(0));
    *s.fake.read_gate.lock().unwrap() = Some(gate.clone());
    let resume = s.spawn_join(&["events.a"], Some(5));
    settle().await;
    s.fake.recreate();
    s.link.send(LinkEvent::StreamCreated).unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), resume)
        .await
        .expect("the parked resume is answered")
        .unwrap();
    let mut got = received(&answer.queue);
    until("its stream ends with relay.reset", || {
        drain(&answer.queue, &mut got);
        got.ended
    })
    .await;
    assert!(got.controls.iter().any(|c| c == "relay.reset"));
    gate.add_permits(1);
}

#[tokio::test(start_paused = true)]
async fn global_order_across_subscriptions() {
    let s = start(config());
    let j = s
        .join(&["events.a.*", "events.b.*", "events.c"], None)
        .await;
    let subjects = ["events.a.1", "events.b.7", "events.c", "events.a.2"];
    // Published back to back: the dispatcher sees large batches spread over
    // three channels, the case a per-channel reader would get wrong.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut want = Vec::new();
    for _ in 0..600 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        want.push(s.fake.publish(subjects[(x % 4) as usize]));
    }
    let mut got = Received::default();
    until("every event delivered", || {
        drain(&j.queue, &mut got);
        got.ids.len() == want.len()
    })
    .await;
    assert_eq!(got.ids, want, "every event once, in stream order");
}

#[tokio::test(start_paused = true)]
async fn once_per_client_on_overlapping_patterns() {
    let s = start(config());
    let j = s.join(&["events.a.*", "events.>"], None).await;
    let want: Vec<u64> = ["events.a.1", "events.b", "events.a.2", "events.a.3"]
        .iter()
        .map(|subj| s.fake.publish(subj))
        .collect();
    let mut got = Received::default();
    receive_ids(&j.queue, &mut got, 4).await;
    assert_eq!(got.ids, want);
}

#[tokio::test(start_paused = true)]
async fn splice_from_memory_has_no_gap_and_no_duplicate() {
    let s = start(config());
    let first = s.join(&["events.a"], None).await;
    for _ in 0..20 {
        s.fake.publish("events.a");
    }
    until("the window holds 20", || s.hub.max_seen() == 20).await;
    let resumed = s.join(&["events.a"], Some(12)).await;
    assert_eq!(resumed.backfill, Backfill::Done, "served from the window");
    for _ in 0..5 {
        s.fake.publish("events.a");
    }
    let mut got = Received::default();
    receive_ids(&resumed.queue, &mut got, 13).await;
    assert_eq!(got.ids, (13..=25).collect::<Vec<_>>());
    assert_eq!(s.fake.lock().reads, 0, "no JetStream read");
    drop(first);
}

#[tokio::test(start_paused = true)]
async fn splice_from_the_stream_releases_held_live_frames_after_the_replay() {
    // No window: every resume is read from the stream by the session.
    let s = start(HubConfig {
        replay_cache_bytes: 0,
        ..config()
    });
    for _ in 0..10 {
        s.fake.store("events.a");
    }
    let j = s.join(&["events.a"], Some(4)).await;
    let Backfill::FromStream { after } = j.backfill else {
        panic!("expected a stream backfill, got {:?}", j.backfill)
    };
    assert_eq!(after, 4);
    // Live events arrive while the session reads history: they are held.
    for _ in 0..3 {
        s.fake.publish("events.a");
    }
    until("the live events reached the hub", || s.hub.max_seen() == 13).await;
    assert!(received(&j.queue).ids.is_empty(), "live frames are held");
    // The session's replay reads up to the stream's end, overlapping the
    // held frames (12, 13 were stored before it read).
    for (seq, frame) in s.fake.stored_after("events.a", after, 13) {
        assert!(j.queue.replay(seq, &frame));
    }
    j.queue.release();
    assert_eq!(received(&j.queue).ids, (5..=13).collect::<Vec<_>>());
    s.fake.publish("events.a");
    let mut got = Received::default();
    until("live after the seam", || {
        drain(&j.queue, &mut got);
        !got.ids.is_empty()
    })
    .await;
    assert_eq!(got.ids, [14]);
}

#[tokio::test(start_paused = true)]
async fn window_eviction_sends_old_resumes_to_the_stream() {
    // Room for about ten small frames.
    let s = start(HubConfig {
        replay_cache_bytes: 10 * 80,
        ..config()
    });
    let _keep = s.join(&["events.a"], None).await;
    for _ in 0..40 {
        s.fake.publish("events.a");
    }
    until("40 delivered", || s.hub.max_seen() == 40).await;
    let recent = s.join(&["events.a"], Some(38)).await;
    assert_eq!(recent.backfill, Backfill::Done);
    assert_eq!(received(&recent.queue).ids, [39, 40]);
    let old = s.join(&["events.a"], Some(2)).await;
    assert_eq!(
        old.backfill,
        Backfill::FromStream { after: 2 },
        "evicted frames are not served from memory"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cold_window_is_filled_once_for_concurrent_resumes() {
    let s = start(config());
    for _ in 0..50 {
        s.fake.store("events.a");
    }
    // The first client subscribes: the window is whole from 50 on only.
    let _keep = s.join(&["events.a"], None).await;
    let joins: Vec<_> = (0..20)
        .map(|_| s.spawn_join(&["events.a"], Some(40)))
        .collect();
    for j in joins {
        let j = j.await.unwrap();
        assert_eq!(j.backfill, Backfill::Done);
        assert_eq!(received(&j.queue).ids, (41..=50).collect::<Vec<_>>());
    }
    assert_eq!(s.fake.lock().reads, 1, "one read for twenty resumes");
}

#[tokio::test(start_paused = true)]
async fn catch_up_merges_held_and_caught_up_frames() {
    let s = start(config());
    let j = s.join(&["events.a", "events.b"], None).await;
    s.fake.publish("events.a"); // 1
    let mut got = Received::default();
    until("first event", || {
        drain(&j.queue, &mut got);
        got.ids == [1]
    })
    .await;
    let gate = Arc::new(Semaphore::new(0));
    *s.fake.catch_up_gate.lock().unwrap() = Some(gate.clone());
    s.link.send(LinkEvent::Disconnected).unwrap();
    // Stored while the relay was away: live never sees these.
    s.fake.store("events.b"); // 2
    s.fake.store("events.a"); // 3
    s.link.send(LinkEvent::Connected).unwrap();
    until("catch-up started", || s.metrics.catchups.get() == 1).await;
    // Live resumes during the catch-up: held until it lands.
    s.fake.publish("events.a"); // 4
    s.fake.publish("events.b"); // 5
    until("live reached the hub", || s.hub.max_seen() == 5).await;
    drain(&j.queue, &mut got);
    assert_eq!(got.ids, [1], "live frames wait for the catch-up");
    gate.add_permits(1);
    until("caught up", || {
        drain(&j.queue, &mut got);
        got.ids.len() == 5
    })
    .await;
    assert_eq!(got.ids, [1, 2, 3, 4, 5], "no loss, no duplicate, in order");
    s.fake.publish("events.b");
    until("live again", || {
        drain(&j.queue, &mut got);
        got.ids.len() == 6
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_catch_up_over_the_limit_ends_its_streams() {
    let s = start(HubConfig {
        replay_limit: 3,
        ..config()
    });
    let j = s.join(&["events.a"], None).await;
    s.link.send(LinkEvent::Disconnected).unwrap();
    for _ in 0..5 {
        s.fake.store("events.a");
    }
    s.link.send(LinkEvent::Connected).unwrap();
    let mut got = Received::default();
    until("the stream ends to resume on its own", || {
        drain(&j.queue, &mut got);
        got.ended
    })
    .await;
    assert!(got.ids.is_empty());
    assert_eq!(got.retries, 2, "opening retry and the closing one");
}

/// A catch-up told a stale end of the stream (a node that has just come
/// back answers for a moment with what it had) reads again until it
/// reaches the live frames it holds: the events stored between are not
/// skipped, even when no later event points at them.
#[tokio::test(start_paused = true)]
async fn a_catch_up_told_a_stale_end_reads_up_to_what_it_holds() {
    let s = start(config());
    let j = s.join(&["events.w.*"], None).await;
    for _ in 0..3 {
        s.fake.publish("events.w.a"); // 1, 2, 3
    }
    let mut got = Received::default();
    until("three events", || {
        drain(&j.queue, &mut got);
        got.ids.len() == 3
    })
    .await;
    s.link.send(LinkEvent::Disconnected).unwrap();
    until("disconnect seen", || true).await;
    s.fake.store("events.w.a"); // 4: missed
    s.fake.store("events.w.a"); // 5: missed
    let gate = Arc::new(Semaphore::new(0));
    *s.fake.catch_up_gate.lock().unwrap() = Some(gate.clone());
    s.fake.lock().stale_last = Some((3, 1));
    s.link.send(LinkEvent::Connected).unwrap();
    settle().await;
    // Live while the catch-up reads; nothing of events.w.b came before.
    s.fake.publish("events.w.b"); // 6
    gate.add_permits(10);
    receive_ids(&j.queue, &mut got, 6).await;
    assert_eq!(got.ids, [1, 2, 3, 4, 5, 6]);
}

/// The same from an empty stream: a catch-up told the stream ends at 0
/// (nothing read) while it holds a live frame reads again too; a read of
/// nothing is not a catch-up that gave up.
#[tokio::test(start_paused = true)]
async fn a_catch_up_of_an_empty_stream_told_a_stale_end_reads_again() {
    let s = start(config());
    let j = s.join(&["events.w.*"], None).await;
    s.link.send(LinkEvent::Disconnected).unwrap();
    until("disconnect seen", || true).await;
    s.fake.store("events.w.a"); // 1: missed
    s.fake.store("events.w.a"); // 2: missed
    let gate = Arc::new(Semaphore::new(0));
    *s.fake.catch_up_gate.lock().unwrap() = Some(gate.clone());
    s.fake.lock().stale_last = Some((0, 1));
    s.link.send(LinkEvent::Connected).unwrap();
    settle().await;
    s.fake.publish("events.w.b"); // 3, held
    gate.add_permits(10);
    let mut got = Received::default();
    receive_ids(&j.queue, &mut got, 3).await;
    assert_eq!(got.ids, [1, 2, 3]);
}

/// A stream end that stays stale does not hold live delivery for ever:
/// after a few reads the catch-up delivers what it has.
#[tokio::test(start_paused = true)]
async fn a_catch_up_told_a_stale_end_for_ever_gives_up_after_a_few_reads() {
    let s = start(config());
    let j = s.join(&["events.w.*"], None).await;
    s.fake.publish("events.w.a"); // 1
    let mut got = Received::default();
    until("one event", || {
        drain(&j.queue, &mut got);
        got.ids.len() == 1
    })
    .await;
    s.link.send(LinkEvent::Disconnected).unwrap();
    settle().await;
    let gate = Arc::new(Semaphore::new(0));
    *s.fake.catch_up_gate.lock().unwrap() = Some(gate.clone());
    s.fake.lock().stale_last = Some((1, usize::MAX));
    s.link.send(LinkEvent::Connected).unwrap();
    settle().await;
    s.fake.store("events.w.a"); // 2: missed, and never found
    s.fake.publish("events.w.b"); // 3
    gate.add_permits(100);
    receive_ids(&j.queue, &mut got, 2).await;
    assert_eq!(got.ids, [1, 3]);
    assert_eq!(s.fake.lock().catch_ups, 4, "four reads, then delivery");
}

/// A stream leader that dies between storing an event and republishing it
/// leaves a hole in the live feed. The next event on the same subject says
/// (`Nats-Last-Sequence`) which event came before it: the hub fills the
/// hole from the stream before delivering past it.
#[tokio::test(start_paused = true)]
async fn a_hole_on_a_subject_is_filled_before_delivering_past_it() {
    let s = start(config());
    let a = s.join(&["events.a"], None).await;
    let b = s.join(&["events.b.*"], None).await;
    s.fake.publish("events.a"); // 1
    s.fake.publish("events.b.1"); // 2
    s.fake.store("events.a"); // 3: stored, never republished
    s.fake.publish("events.b.2"); // 4: nothing tells of 3 yet
    s.fake.publish("events.a"); // 5: Nats-Last-Sequence 3
    s.fake.publish("events.b.1"); // 6
    let (mut got_a, mut got_b) = (Received::default(), Received::default());
    until("every event", || {
        drain(&a.queue, &mut got_a);
        drain(&b.queue, &mut got_b);
        got_a.ids.len() >= 3 && got_b.ids.len() >= 3
    })
    .await;
    assert_eq!(got_a.ids, [1, 3, 5], "the hole filled, in order");
    assert_eq!(got_b.ids, [2, 4, 6]);
    assert_eq!(s.metrics.catchups.get(), 1);
}

/// Events after a hole in the same batch wait for its catch-up. A client
/// on two subjects would otherwise take a later event of the other subject
/// live, then refuse the filled event and the one that revealed the hole
/// as below its last id.
#[tokio::test(start_paused = true)]
async fn events_after_a_hole_in_the_same_batch_wait_for_its_catch_up() {
    let s = start(config());
    let both = s.join(&["events.a", "events.b.*"], None).await;
    s.fake.publish("events.a"); // 1
    s.fake.publish("events.b.1"); // 2
    s.fake.store("events.a"); // 3: stored, never republished
    s.fake.publish("events.a"); // 4: Nats-Last-Sequence 3
    s.fake.publish("events.b.1"); // 5: after the hole, in the same batch
    let mut got = Received::default();
    receive_ids(&both.queue, &mut got, 5).await;
    assert_eq!(got.ids, [1, 2, 3, 4, 5], "in order, none refused");
    assert_eq!(s.metrics.catchups.get(), 1);
}

/// A subscription made while JetStream could not say where the stream
/// was still finds holes, from its first live event on.
#[tokio::test(start_paused = true)]
async fn holes_are_found_when_the_stream_position_was_unknown() {
    let s = start(config());
    s.fake.lock().unknown_position = true;
    let j = s.join(&["events.w.*"], None).await;
    s.fake.publish("events.w.a"); // 1
    s.fake.store("events.w.a"); // 2: never republished
    s.fake.publish("events.w.a"); // 3: Nats-Last-Sequence 2
    s.fake.publish("events.w.b"); // 4
    let mut got = Received::default();
    receive_ids(&j.queue, &mut got, 4).await;
    assert_eq!(got.ids, [1, 2, 3, 4]);
    assert_eq!(s.metrics.catchups.get(), 1);
}

/// On a pattern that takes the whole stream every sequence arrives, so a
/// jump is a hole even when no later event shares the missed one's subject.
#[tokio::test(start_paused = true)]
async fn a_sequence_jump_on_a_whole_stream_subscription_is_filled() {
    let s = start(config());
    let j = s.join(&["events.>"], None).await;
    s.fake.publish("events.a"); // 1
    s.fake.store("events.b"); // 2: never republished
    s.fake.publish("events.c"); // 3
    let mut got = Received::default();
    receive_ids(&j.queue, &mut got, 3).await;
    assert_eq!(got.ids, [1, 2, 3]);
    assert_eq!(s.metrics.catchups.get(), 1);
}

/// Gaps between the sequences a narrower pattern receives are other
/// subjects' events, and a duplicate republish is not a hole: no catch-up.
#[tokio::test(start_paused = true)]
async fn ordinary_gaps_and_repeats_are_not_holes() {
    let s = start(config());
    // Stored before anyone subscribed: not this subscription's business.
    s.fake.store("events.a.1");
    let j = s.join(&["events.a.*"], None).await;
    let mut want = Vec::new();
    for subject in [
        "events.b",
        "events.a.1",
        "events.c",
        "events.a.2",
        "events.a.1",
    ] {
        let seq = s.fake.publish(subject);
        if subject.starts_with("events.a.") {
            want.push(seq);
        }
    }
    s.fake.republish(want[1]);
    s.fake.publish("events.a.2");
    want.push(s.fake.last());
    let mut got = Received::default();
    until("every event", || {
        drain(&j.queue, &mut got);
        got.ids.len() >= want.len()
    })
    .await;
    assert_eq!(got.ids, want);
    assert_eq!(s.metrics.catchups.get(), 0, "no hole, no catch-up");
}

/// Moves the paused clock in steps of one sweep tick, letting the
/// dispatcher run after each (bounded).
async fn advance(by: Duration) {
    let tick = super::dispatcher::sweep_tick(config().heartbeat);
    let mut left = by;
    while !left.is_zero() {
        let step = tick.min(left);
        tokio::time::advance(step).await;
        settle().await;
        left -= step;
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_go_only_to_streams_silent_for_an_interval() {
    let s = start(config());
    let idle = s.join(&["events.idle"], None).await;
    let busy = s.join(&["events.busy"], None).await;
    let (mut idle_got, mut busy_got) = (received(&idle.queue), received(&busy.queue));
    // Busy writes every 5 s; idle writes nothing after it opened.
    for _ in 0..12 {
        s.fake.publish("events.busy");
        advance(Duration::from_secs(5)).await;
        drain(&idle.queue, &mut idle_got);
        drain(&busy.queue, &mut busy_got);
    }
    assert_eq!(busy_got.ids.len(), 12);
    assert_eq!(
        busy_got.comments, 0,
        "a stream that writes needs no heartbeat"
    );
    // 60 s: the first look after opening sees the opening frames, then one
    // heartbeat per 15 s interval: 2 to 4 depending on where in the cycle
    // the stream sits.
    assert!(
        (2..=4).contains(&idle_got.comments),
        "one heartbeat per silent interval: {}",
        idle_got.comments
    );
}

/// A stream that opens in the middle of a sweep cycle is looked at within
/// the interval like the others: its first heartbeat comes at most two
/// intervals after it last wrote, whenever it joined.
#[tokio::test(start_paused = true)]
async fn a_new_stream_hears_within_two_intervals() {
    let s = start(config());
    let interval = config().heartbeat;
    let tick = super::dispatcher::sweep_tick(interval);
    let _early = s.join(&["events.early"], None).await;
    for offset in 0..16u32 {
        // Joins at every point of a cycle.
        advance(tick).await;
        let j = s.join(&["events.late"], None).await;
        let mut got = received(&j.queue);
        let mut waited = Duration::ZERO;
        while got.comments == 0 {
            assert!(
                waited <= 2 * interval,
                "joined at tick {offset}: no heartbeat after {waited:?}"
            );
            advance(tick).await;
            waited += tick;
            drain(&j.queue, &mut got);
        }
        s.hub.depart(j.id);
    }
}

#[tokio::test(start_paused = true)]
async fn heartbeats_are_spread_over_the_interval() {
    let s = start(config());
    let mut clients = Vec::new();
    for i in 0..160 {
        let j = s.join(&[&format!("events.q.{i}")], None).await;
        let got = received(&j.queue);
        clients.push((j, got));
    }
    // Two intervals: every stream has been silent for one by then.
    advance(Duration::from_secs(30)).await;
    for (j, got) in &mut clients {
        drain(&j.queue, got);
    }
    let mut per_tick = Vec::new();
    for _ in 0..16 {
        let before: usize = clients.iter().map(|(_, g)| g.comments).sum();
        advance(super::dispatcher::sweep_tick(config().heartbeat)).await;
        for (j, got) in &mut clients {
            drain(&j.queue, got);
        }
        let after: usize = clients.iter().map(|(_, g)| g.comments).sum();
        per_tick.push(after - before);
    }
    assert_eq!(
        per_tick.iter().sum::<usize>(),
        160,
        "each stream once per interval: {per_tick:?}"
    );
    assert!(
        per_tick.iter().all(|n| *n <= 10),
        "no tick writes more than 1/16 of the streams: {per_tick:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn expiry_ends_the_stream_at_its_deadline() {
    let s = start(config());
    let deadline = SystemTime::now() + Duration::from_secs(30);
    let j = s
        .hub
        .join(vec!["events.a".into()], deadline, None, Heartbeat::Comment)
        .await
        .unwrap();
    let other = s.join(&["events.a"], None).await;
    let mut got = received(&j.queue);
    tokio::time::advance(Duration::from_secs(29)).await;
    drain(&j.queue, &mut got);
    assert!(!got.ended, "still open a second before");
    tokio::time::advance(Duration::from_secs(2)).await;
    until("expired", || {
        drain(&j.queue, &mut got);
        got.ended
    })
    .await;
    assert_eq!(got.controls, ["relay.live", "relay.expired"]);
    assert!(
        !received(&other.queue).ended,
        "only the expired client ends"
    );
}

/// Tokens issued together expire together: their streams end a chunk at
/// a time, the dispatcher yielding in between (so connections write and
/// deliveries go on), never all in one turn. (How many chunks run before
/// another task gets its turn is the scheduler's business.)
#[tokio::test(start_paused = true)]
async fn an_expiry_storm_ends_streams_a_chunk_at_a_time() {
    let s = start(config());
    let deadline = SystemTime::now() + Duration::from_secs(30);
    let n = 5 * super::dispatcher::EXPIRY_CHUNK;
    let mut queues = Vec::with_capacity(n);
    for _ in 0..n {
        let j = s
            .hub
            .join(vec!["events.a".into()], deadline, None, Heartbeat::Comment)
            .await
            .unwrap();
        queues.push(j.queue);
    }
    let ended = |qs: &[Arc<crate::client::ClientQueue>]| {
        qs.iter().filter(|q| q.summary().1.is_some()).count()
    };
    // How far the storm got, whenever other tasks get a turn.
    let observer = {
        let queues = queues.clone();
        watch(move || ended(&queues), move |&k| k == n)
    };
    tokio::time::advance(Duration::from_secs(31)).await;
    let steps = observer.await.unwrap();
    assert_eq!(ended(&queues), n, "every stream ended: {steps:?}");
    assert!(
        steps.iter().any(|&k| k > 0 && k < n),
        "other tasks ran while the storm was under way: {steps:?}"
    );
    assert!(
        steps[0] <= super::dispatcher::EXPIRY_CHUNK,
        "the first turn ends one chunk: {steps:?}"
    );
}

/// One event for many clients of one topic is offered a chunk of clients
/// at a time, the dispatcher yielding in between so the connections it
/// woke write (while still in cache) before it wakes more; every client
/// gets the event once.
#[tokio::test(start_paused = true)]
async fn one_event_for_many_clients_is_offered_a_chunk_at_a_time() {
    let s = start(config());
    let n = 5 * super::fanout::OFFER_CHUNK;
    let (queues, before) = s.join_many("events.a", n).await;
    let offered = |qs: &[Arc<crate::client::ClientQueue>], before: &[u64]| {
        qs.iter()
            .zip(before)
            .filter(|(q, b)| q.summary().0 > **b)
            .count()
    };
    let observer = {
        let (queues, before) = (queues.clone(), before.clone());
        watch(move || offered(&queues, &before), move |&k| k == n)
    };
    s.fake.publish("events.a");
    // (Before the event arrived, none had it.)
    let steps: Vec<usize> = observer
        .await
        .unwrap()
        .into_iter()
        .filter(|&k| k > 0)
        .collect();
    assert_eq!(
        offered(&queues, &before),
        n,
        "every client got it: {steps:?}"
    );
    assert!(
        steps.iter().any(|&k| k < n),
        "other tasks ran while the fan-out was under way: {steps:?}"
    );
    // (How many chunks run before another task gets its turn is the
    // scheduler's business.)
    assert!(
        steps.iter().all(|k| k % super::fanout::OFFER_CHUNK == 0),
        "whole chunks at a time: {steps:?}"
    );
    for q in &queues {
        assert_eq!(received(q).ids, [1], "once, in order");
    }
}

/// Events that queued up reach each client all at once: no connection
/// ever runs holding part of a batch, so one behind by several writes
/// them together. (Offered event by event, a chunk of clients at a time,
/// each event would be a write of its own.) The clients still get them a
/// chunk at a time.
#[tokio::test(start_paused = true)]
async fn a_batch_of_events_reaches_each_client_at_once() {
    let s = start(config());
    let n = 3 * super::fanout::OFFER_CHUNK;
    let (queues, before) = s.join_many("events.a", n).await;
    // How many queues hold 0, 1, ... 5 of the batch.
    let spread = |qs: &[Arc<crate::client::ClientQueue>], before: &[u64]| {
        let mut by = [0usize; 6];
        for (q, b) in qs.iter().zip(before) {
            by[(q.summary().0 - b).min(5) as usize] += 1;
        }
        by
    };
    let observer = {
        let (queues, before) = (queues.clone(), before.clone());
        watch(move || spread(&queues, &before), move |by| by[5] == n)
    };
    for _ in 0..5 {
        s.fake.publish("events.a");
    }
    let seen = observer.await.unwrap();
    assert_eq!(
        seen.last().map(|by| by[5]),
        Some(n),
        "all got all: {seen:?}"
    );
    assert!(
        seen.iter().all(|by| by[1..5].iter().all(|&k| k == 0)),
        "no queue ever held part of the batch: {seen:?}"
    );
    assert!(
        seen.iter().any(|by| by[0] > 0 && by[5] > 0),
        "a chunk of clients at a time: {seen:?}"
    );
    for q in &queues {
        assert_eq!(received(q).ids, [1, 2, 3, 4, 5], "in order");
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_client_is_dropped_without_slowing_others() {
    let s = start(HubConfig {
        client_queue: 8,
        ..config()
    });
    let slow = s.join(&["events.a"], None).await;
    let fast = s.join(&["events.a"], None).await;
    let mut fast_got = Received::default();
    for round in 0..10 {
        for _ in 0..5 {
            s.fake.publish("events.a");
        }
        until("the round reaches the fast client", || {
            drain(&fast.queue, &mut fast_got);
            fast_got.ids.len() == 5 * (round + 1)
        })
        .await;
    }
    assert_eq!(fast_got.ids, (1..=50).collect::<Vec<_>>());
    let slow_got = received(&slow.queue);
    assert!(slow_got.ended, "the slow client's stream ended");
    assert!(slow_got.ids.is_empty(), "its backlog was dropped, not sent");
    let text = s.metrics.render(&crate::metrics::Scrape::default());
    assert!(
        text.contains(r#"sse_relay_disconnects_total{reason="evicted_slow"} 1"#),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_subscription_fails_its_joins_and_the_next_join_retries() {
    let s = start(config());
    s.fake.lock().fail_subscribe = true;
    let failed = s
        .hub
        .join(
            vec!["events.a".into()],
            in_an_hour(),
            None,
            Heartbeat::Comment,
        )
        .await;
    assert!(failed.is_err());
    s.fake.lock().fail_subscribe = false;
    let j = s.join(&["events.a"], None).await;
    s.fake.publish("events.a");
    let mut got = Received::default();
    until("delivered", || {
        drain(&j.queue, &mut got);
        got.ids == [1]
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_every_stream_with_a_retry_hint() {
    let s = start(config());
    let a = s.join(&["events.a"], None).await;
    let b = s.join(&["events.b"], None).await;
    s.shutdown.cancel();
    for q in [&a.queue, &b.queue] {
        let mut got = Received::default();
        until("ended", || {
            drain(q, &mut got);
            got.ended
        })
        .await;
        assert_eq!(got.retries, 2, "the opening retry and the closing one");
    }
    let ids: BTreeSet<_> = [a.id, b.id].into_iter().collect();
    assert_eq!(ids.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn unknown_resume_ids_cost_one_stream_request_per_interval() {
    let s = start(config());
    for _ in 0..10 {
        s.fake.store("events.a");
    }
    let asks = || s.fake.lock().last_sequence_asks;
    let check_all = |ids: Vec<u64>| {
        let checks: Vec<_> = ids
            .into_iter()
            .map(|id| {
                let hub = s.hub.clone();
                tokio::spawn(async move { hub.last_sequence_reaching(id).await.unwrap() })
            })
            .collect();
        async move {
            let mut out = Vec::new();
            for c in checks {
                out.push(c.await.unwrap());
            }
            out
        }
    };
    // Concurrent callers share one request.
    assert!(
        check_all((0..50).map(|i| 5 + i % 3).collect())
            .await
            .iter()
            .all(|l| *l == 10)
    );
    assert_eq!(asks(), 1);
    // Known ids ask nothing.
    assert_eq!(s.hub.last_sequence_reaching(10).await.unwrap(), 10);
    assert_eq!(asks(), 1);
    // A flood of ids above the end, right after an ask: they wait for the
    // next interval and share one ask, which also finds an event stored
    // meanwhile (an id a client may have got from another shard).
    s.fake.store("events.a");
    let start = tokio::time::Instant::now();
    let got = check_all((0..200).map(|i| 11 + i % 2).collect()).await;
    assert!(got.iter().all(|l| *l == 11), "{got:?}");
    assert_eq!(asks(), 2);
    assert!(
        start.elapsed() <= Duration::from_secs(1),
        "waited at most one interval"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fresh_stream_is_marked_live_before_any_event() {
    let s = start(config());
    s.fake.store("events.a"); // before the client: not for it
    let j = s.join(&["events.a"], None).await;
    s.fake.publish("events.a");
    let mut got = Received::default();
    until("the event", || {
        drain(&j.queue, &mut got);
        !got.ids.is_empty()
    })
    .await;
    // relay.live carries where the stream starts, as its id too.
    assert_eq!(
        got.order,
        ["retry", r#"relay.live id 1 {"last_event_id":1}"#, "id 2"]
    );
}

/// A fresh stream that drops before its first event comes back with the
/// id `relay.live` gave it (a browser's Last-Event-ID) and gets what was
/// published meanwhile; on several patterns it starts after the lowest of
/// their positions, so no pattern's events are skipped.
#[tokio::test(start_paused = true)]
async fn a_fresh_stream_that_drops_before_its_first_event_loses_nothing() {
    let s = start(config());
    let _other = s.join(&["events.b"], None).await;
    s.fake.publish("events.a"); // 1: nobody on events.a yet
    s.fake.publish("events.b"); // 2
    until("seen", || s.hub.max_seen() == 2).await;
    let j = s.join(&["events.a", "events.b"], None).await;
    let got = received(&j.queue);
    let live = got
        .order
        .iter()
        .find(|o| o.starts_with("relay.live"))
        .unwrap();
    assert_eq!(live, r#"relay.live id 2 {"last_event_id":2}"#);
    s.hub.depart(j.id);
    let missed = [s.fake.publish("events.a"), s.fake.publish("events.b")];
    until("seen", || s.hub.max_seen() == 4).await;
    let back = s.join(&["events.a", "events.b"], Some(2)).await;
    // The window of events.a went with its last client: the session reads
    // the stream, as it would.
    let Backfill::FromStream { after } = back.backfill else {
        panic!("expected a stream backfill, got {:?}", back.backfill)
    };
    let mut replay = s.fake.stored_after("events.a", after, 4);
    replay.extend(s.fake.stored_after("events.b", after, 4));
    replay.sort_by_key(|(seq, _)| *seq);
    for (seq, frame) in replay {
        assert!(back.queue.replay(seq, &frame));
    }
    back.queue.release();
    assert_eq!(received(&back.queue).ids, missed);
}

#[tokio::test(start_paused = true)]
async fn relay_live_marks_the_seam_of_a_resume() {
    // From memory: replayed events, the marker, then live ones.
    let s = start(config());
    let _keep = s.join(&["events.a"], None).await;
    for _ in 0..5 {
        s.fake.publish("events.a");
    }
    until("5 delivered", || s.hub.max_seen() == 5).await;
    let j = s.join(&["events.a"], Some(3)).await;
    s.fake.publish("events.a");
    let mut got = Received::default();
    until("6", || {
        drain(&j.queue, &mut got);
        got.ids.last() == Some(&6)
    })
    .await;
    assert_eq!(
        got.order,
        [
            "retry",
            "id 4",
            "id 5",
            r#"relay.live {"last_event_id":5}"#,
            "id 6"
        ]
    );

    // From the stream: the marker sits between the replay and the live
    // frames held meanwhile.
    let s = start(HubConfig {
        replay_cache_bytes: 0,
        ..config()
    });
    for _ in 0..4 {
        s.fake.store("events.b");
    }
    let j = s.join(&["events.b"], Some(2)).await;
    s.fake.publish("events.b"); // 5, held
    until("held", || s.hub.max_seen() == 5).await;
    for (seq, frame) in s.fake.stored_after("events.b", 2, 4) {
        assert!(j.queue.replay(seq, &frame));
    }
    j.queue.release();
    assert_eq!(
        received(&j.queue).order,
        [
            "retry",
            "id 3",
            "id 4",
            r#"relay.live {"last_event_id":4}"#,
            "id 5"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeat_event_goes_to_the_clients_that_ask_for_it() {
    let s = start(config());
    let plain = s.join(&["events.a"], None).await;
    let visible = s
        .hub
        .join(
            vec!["events.a".into()],
            in_an_hour(),
            None,
            Heartbeat::Event,
        )
        .await
        .unwrap();
    let (mut p, mut v) = (received(&plain.queue), received(&visible.queue));
    advance(Duration::from_secs(30)).await;
    drain(&plain.queue, &mut p);
    drain(&visible.queue, &mut v);
    assert_eq!(
        p.comments, 1,
        "one silent interval after the opening frames"
    );
    assert_eq!(v.controls, ["relay.live", "relay.heartbeat"]);
    assert_eq!(v.comments, 0);
    assert!(v.ids.is_empty(), "a heartbeat never moves the id");
}

/// Deleted and created again, the stream numbers its events from 1: the
/// creation advisory makes the shard forget the old sequences, and every
/// stream ends with `relay.reset` (`id: 0`) so its client replays the new
/// stream from the beginning. Fresh clients get the new stream's events.
#[tokio::test(start_paused = true)]
async fn a_recreated_stream_restarts_every_stream_from_its_beginning() {
    let s = start(config());
    let old = s.join(&["events.a"], None).await;
    for _ in 0..3 {
        s.fake.publish("events.a");
    }
    let mut got = Received::default();
    until("three events", || {
        drain(&old.queue, &mut got);
        got.ids.len() == 3
    })
    .await;
    s.fake.recreate();
    s.link.send(LinkEvent::StreamCreated).unwrap();
    until("the stream ends with relay.reset", || {
        drain(&old.queue, &mut got);
        got.ended
    })
    .await;
    assert_eq!(
        got.order[got.order.len() - 2..],
        [
            r#"relay.reset id 0 {"reason":"stream_recreated","last_event_id":0}"#.to_string(),
            "retry".into()
        ]
    );
    assert_eq!(s.metrics.stream_resets.get(), 1);
    assert_eq!(s.hub.max_seen(), 0, "the old sequences are forgotten");
    let fresh = s.join(&["events.a"], None).await;
    s.fake.publish("events.a");
    let mut fresh_got = Received::default();
    until("the new stream's first event", || {
        drain(&fresh.queue, &mut fresh_got);
        !fresh_got.ids.is_empty()
    })
    .await;
    assert_eq!(fresh_got.ids, [1]);
    // The old client comes back with Last-Event-ID 0: everything the new
    // stream holds, from the memory window.
    let back = s.join(&["events.a"], Some(0)).await;
    assert_eq!(received(&back.queue).ids, [1]);
}

/// Without an advisory (the relay was away when it came), a live sequence
/// below what its subscription delivered makes the shard check the stream.
#[tokio::test(start_paused = true)]
async fn a_sequence_going_back_reveals_a_recreated_stream() {
    let s = start(config());
    let old = s.join(&["events.a"], None).await;
    for _ in 0..3 {
        s.fake.publish("events.a");
    }
    until("seen", || s.hub.max_seen() == 3).await;
    s.fake.recreate();
    // Checks on such hints are at most one a second.
    tokio::time::advance(Duration::from_secs(2)).await;
    s.fake.publish("events.a"); // 1 of the new stream
    let mut got = Received::default();
    until("the stream ends with relay.reset", || {
        drain(&old.queue, &mut got);
        got.ended
    })
    .await;
    assert_eq!(got.ids, [1, 2, 3]);
    assert!(got.controls.contains(&"relay.reset".to_string()));
    let fresh = s.join(&["events.a"], None).await;
    s.fake.publish("events.a"); // 2
    let mut fresh_got = Received::default();
    until("a fresh client gets the new stream's events", || {
        drain(&fresh.queue, &mut fresh_got);
        !fresh_got.ids.is_empty()
    })
    .await;
    assert_eq!(fresh_got.ids, [2]);
}

/// SIGTERM spreads the end of the shard's streams over the drain period,
/// each with a jittered `retry:`; streams not yet closed keep receiving
/// events, and no second of the period closes more than its share.
#[tokio::test(start_paused = true)]
async fn a_drain_spreads_the_end_of_streams_over_its_period() {
    let s = start(HubConfig {
        drain: Duration::from_secs(4),
        ..config()
    });
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push((s.join(&["events.a"], None).await, Received::default()));
    }
    s.shutdown.cancel();
    let mut ended_at = Vec::new();
    let start = tokio::time::Instant::now();
    let mut published = Vec::new();
    for step in 0..100u32 {
        if step % 10 == 0 {
            published.push(s.fake.publish("events.a"));
        }
        tokio::time::advance(Duration::from_millis(50)).await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        for (j, got) in &mut clients {
            let was = got.ended;
            drain(&j.queue, got);
            if got.ended && !was {
                ended_at.push(start.elapsed());
                // Every event published before its end, in order.
                let due = published.iter().filter(|&&seq| seq <= s.hub.max_seen());
                assert_eq!(got.ids, due.copied().collect::<Vec<_>>());
            }
        }
        if ended_at.len() == clients.len() {
            break;
        }
    }
    assert_eq!(ended_at.len(), 100, "every stream ended");
    assert!(
        *ended_at.last().unwrap() <= Duration::from_millis(4_100),
        "all within the period: {:?}",
        ended_at.last()
    );
    for second in 0..4 {
        let from = Duration::from_secs(second);
        let n = ended_at
            .iter()
            .filter(|t| **t > from && **t <= from + Duration::from_secs(1))
            .count();
        assert!((20..=30).contains(&n), "second {second}: {n} of 100 closed");
    }
    let retries: BTreeSet<u64> = clients
        .iter()
        .map(|(_, got)| *got.retry_ms.last().unwrap())
        .collect();
    let retry = config().retry_ms;
    assert!(
        retries
            .iter()
            .all(|ms| (retry..=retry * 3 / 2).contains(ms)),
        "closing retries within [retry, 1.5 retry]: {retries:?}"
    );
    assert!(
        retries.len() > 10,
        "jittered: {} distinct values",
        retries.len()
    );
}

/// `--max-stream-age`: a stream ends with a `retry:` (no `relay.expired`)
/// between the age and a tenth more, and resumes elsewhere by its id; a
/// token that expires first still ends with `relay.expired`.
#[tokio::test(start_paused = true)]
async fn max_stream_age_ends_streams_with_a_retry() {
    let s = start(HubConfig {
        max_stream_age: Some(Duration::from_secs(600)),
        ..config()
    });
    let aging = s.join(&["events.a"], None).await;
    let short = s
        .hub
        .join(
            vec!["events.a".into()],
            SystemTime::now() + Duration::from_secs(300),
            None,
            Heartbeat::Comment,
        )
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(301)).await;
    let mut got = Received::default();
    until("the short token expires", || {
        drain(&short.queue, &mut got);
        got.ended
    })
    .await;
    assert!(got.controls.contains(&"relay.expired".to_string()));
    tokio::time::advance(Duration::from_secs(298)).await;
    let mut got = Received::default();
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    drain(&aging.queue, &mut got);
    assert!(!got.ended, "still open before its age");
    tokio::time::advance(Duration::from_secs(61)).await;
    until("the age limit ends it", || {
        drain(&aging.queue, &mut got);
        got.ended
    })
    .await;
    assert_eq!(got.controls, ["relay.live"], "no relay.expired");
    assert_eq!(got.retries, 2, "the opening retry and the closing one");
    assert_eq!(
        s.metrics
            .disconnects
            .get_or_create(&crate::metrics::Reason {
                reason: "max_stream_age"
            })
            .get(),
        1
    );
}
