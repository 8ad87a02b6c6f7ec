//! `MemorySync`: the conformance suite on tokio's paused clock, plus what is
//! particular to the in-process backend.

mod conformance;

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use conformance::{Suite, poll_once, unique};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower_dsync::{AnySync, DistMutex, DistMutexOptions, DistSync, Error, MemorySync};

fn suite() -> Suite<MemorySync> {
    let sync = MemorySync::new();
    Suite {
        other: sync.clone(),
        sync,
        base: DistMutexOptions::default().with_expiry(Duration::from_secs(1)),
        guard: Box::new(()),
    }
}

conformance_tests!(
    #[tokio::test(start_paused = true)]
    suite()
);

mod dynamic {
    //! The same suite through the run-time handle.
    use super::*;

    fn suite() -> Suite<AnySync> {
        let sync = AnySync::new(MemorySync::new());
        Suite {
            other: sync.clone(),
            sync,
            base: DistMutexOptions::default().with_expiry(Duration::from_secs(1)),
            guard: Box::new(()),
        }
    }

    conformance_tests!(
        #[tokio::test(start_paused = true)]
        suite()
    );
}

/// A waiter wakes when the name is released, not after its retry delay.
#[tokio::test(start_paused = true)]
async fn waiter_wakes_on_release() {
    let sync = MemorySync::new();
    let hour = Duration::from_secs(3600);
    let options = DistMutexOptions::default()
        .with_expiry(hour * 10)
        .with_retry_delay(hour);
    let mut a = sync
        .new_mutex("wake", options.clone().with_tries(1))
        .unwrap();
    let mut b = sync.new_mutex("wake", options).unwrap();
    a.lock().await.unwrap();
    let start = Instant::now();
    let mut waiting = pin!(b.lock());
    assert!(poll_once(waiting.as_mut()).await.is_none());
    a.unlock().await.unwrap();
    waiting.await.unwrap();
    // On the paused clock only sleeping moves time: b slept not at all.
    assert_eq!(Instant::now(), start);
}

/// A waiter whose holder expires takes over at the moment of expiry, even
/// when its retry delay is much longer.
#[tokio::test(start_paused = true)]
async fn waiter_takes_over_at_expiry() {
    let sync = MemorySync::new();
    let expiry = Duration::from_secs(2);
    let options = DistMutexOptions::default()
        .with_expiry(expiry)
        .with_retry_delay(Duration::from_secs(3600));
    let mut a = sync.new_mutex("expire", options.clone()).unwrap();
    let mut b = sync.new_mutex("expire", options).unwrap();
    let start = Instant::now();
    a.lock().await.unwrap();
    b.lock().await.unwrap();
    assert_eq!(Instant::now() - start, expiry);
}

/// Waiters on one name are served in the order they arrived, woken only
/// by hand-offs (their retries are an hour apart).
#[tokio::test(start_paused = true)]
async fn waiters_are_served_fifo_by_hand_off() {
    let sync = MemorySync::new();
    let options = DistMutexOptions::default()
        .with_tries(u32::MAX)
        .with_retry_delay(Duration::from_secs(3600));
    let mut holder = sync.new_mutex("fifo", options.clone()).unwrap();
    holder.lock().await.unwrap();
    let (order_tx, mut order_rx) = mpsc::unbounded_channel();
    let (queued_tx, mut queued_rx) = mpsc::unbounded_channel();
    for i in 0..10 {
        let mut m = sync.new_mutex("fifo", options.clone()).unwrap();
        let (order_tx, queued_tx) = (order_tx.clone(), queued_tx.clone());
        tokio::spawn(async move {
            {
                let mut fut = pin!(m.lock());
                assert!(poll_once(fut.as_mut()).await.is_none());
                queued_tx.send(()).unwrap();
                fut.await.unwrap();
            }
            order_tx.send(i).unwrap();
            m.unlock().await.unwrap();
        });
        queued_rx.recv().await.unwrap();
    }
    drop(order_tx);
    let start = Instant::now();
    holder.unlock().await.unwrap();
    let mut order = Vec::new();
    while let Some(i) = order_rx.recv().await {
        order.push(i);
    }
    assert_eq!(order, (0..10).collect::<Vec<_>>());
    assert_eq!(
        Instant::now(),
        start,
        "no waiter waited for its retry delay"
    );
}

/// A newcomer does not overtake a queued waiter when a lock expires.
#[tokio::test(start_paused = true)]
async fn newcomer_does_not_barge_after_expiry() {
    let sync = MemorySync::new();
    let options = DistMutexOptions::default().with_expiry(Duration::from_secs(1));
    let mut a = sync
        .new_mutex("barge", options.clone().with_tries(1))
        .unwrap();
    let mut b = sync
        .new_mutex("barge", options.clone().with_tries(u32::MAX))
        .unwrap();
    let mut c = sync.new_mutex("barge", options.with_tries(1)).unwrap();
    a.lock().await.unwrap();
    {
        let mut waiting = pin!(b.lock());
        assert!(poll_once(waiting.as_mut()).await.is_none());
        tokio::time::sleep(Duration::from_secs(2)).await;
        // a has expired; b is first in line, so c is refused.
        assert!(matches!(c.lock().await, Err(Error::Held { .. })));
        waiting.await.unwrap();
    }
    assert!(b.valid().await.unwrap());
}

/// 100,000 names locked and released, or left to expire, use no memory.
#[tokio::test(start_paused = true)]
async fn idle_names_hold_no_memory() {
    let sync = MemorySync::new();
    let options = DistMutexOptions::default()
        .with_expiry(Duration::from_secs(1))
        .with_tries(1);
    for i in 0..100_000 {
        let mut m = sync.new_mutex(&format!("n:{i}"), options.clone()).unwrap();
        m.lock().await.unwrap();
        m.unlock().await.unwrap();
    }
    assert_eq!(sync.names_in_use(), 0);

    let mut held = Vec::new();
    for i in 0..100_000 {
        let mut m = sync.new_mutex(&format!("e:{i}"), options.clone()).unwrap();
        m.lock().await.unwrap();
        held.push(m);
    }
    assert_eq!(sync.names_in_use(), 100_000);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sync.names_in_use(), 0, "expired names are reclaimed");

    // Waiters that give up or are dropped leave nothing either.
    let mut a = sync.new_mutex("w", options.clone()).unwrap();
    a.lock().await.unwrap();
    let mut quitter = sync.new_mutex("w", options.clone()).unwrap();
    assert!(quitter.lock().await.is_err());
    {
        let mut dropped = sync.new_mutex("w", options.clone().with_tries(9)).unwrap();
        let mut fut = pin!(dropped.lock());
        assert!(poll_once(fut.as_mut()).await.is_none());
    }
    a.unlock().await.unwrap();
    assert_eq!(sync.names_in_use(), 0, "nobody is left waiting on w");
    a.lock().await.unwrap();
    let patient = options
        .clone()
        .with_tries(2)
        .with_retry_delay(Duration::from_secs(3600));
    let mut b = sync.new_mutex("w", patient).unwrap();
    assert!(b.lock().await.is_ok(), "b waits out a's expiry");
    b.unlock().await.unwrap();
    assert_eq!(sync.names_in_use(), 0);
}

/// Tokens grow with every acquisition of a name, hand-offs included.
#[tokio::test(start_paused = true)]
async fn fencing_tokens_increase() {
    let sync = MemorySync::new();
    let options = DistMutexOptions::default().with_tries(u32::MAX);
    let mut last = 0;
    let mut a = sync.new_mutex("fence", options.clone()).unwrap();
    let mut b = sync.new_mutex("fence", options).unwrap();
    for _ in 0..100 {
        a.lock().await.unwrap();
        let ta = a.fencing_token().unwrap();
        {
            let mut waiting = pin!(b.lock());
            assert!(poll_once(waiting.as_mut()).await.is_none());
            a.unlock().await.unwrap();
            waiting.await.unwrap();
        }
        let tb = b.fencing_token().unwrap();
        assert!(last < ta && ta < tb);
        last = tb;
        b.unlock().await.unwrap();
    }
}

/// Separate `MemorySync` values are separate lock spaces; clones share one.
#[tokio::test(start_paused = true)]
async fn instances_and_clones() {
    let one = MemorySync::new().with_separator("/");
    assert_eq!(one.separator(), "/");
    let two = MemorySync::new();
    let options = DistMutexOptions::default().with_tries(1);
    let name = unique("space");
    let mut a = one.new_mutex(&name, options.clone()).unwrap();
    let mut b = two.new_mutex(&name, options.clone()).unwrap();
    let mut c = one.clone().new_mutex(&name, options).unwrap();
    a.lock().await.unwrap();
    b.lock().await.unwrap();
    assert!(matches!(c.lock().await, Err(Error::Held { .. })));
}

/// A lock handed to a waiter expires like any other.
#[tokio::test(start_paused = true)]
async fn handed_off_lock_expires() {
    let sync = MemorySync::new();
    let expiry = Duration::from_secs(5);
    let options = DistMutexOptions::default().with_expiry(expiry);
    let mut a = sync.new_mutex("handed", options.clone()).unwrap();
    let mut b = sync.new_mutex("handed", options.clone()).unwrap();
    let mut c = sync.new_mutex("handed", options.with_tries(1)).unwrap();
    a.lock().await.unwrap();
    {
        let mut waiting = pin!(b.lock());
        assert!(poll_once(waiting.as_mut()).await.is_none());
        a.unlock().await.unwrap();
        waiting.await.unwrap();
    }
    let handed_at = Instant::now();
    assert!(b.until().unwrap() <= handed_at + expiry);
    tokio::time::sleep(expiry).await;
    assert!(!b.valid().await.unwrap());
    c.lock().await.unwrap();
}

/// `AnySync` forwards to the wrapped backend, also when wrapped twice.
#[tokio::test]
async fn any_sync_wraps_a_backend() {
    let memory = MemorySync::new();
    let any = AnySync::new(memory.clone());
    let again = AnySync::new(any.clone());
    let mut m = again.new_mutex("x", DistMutexOptions::default()).unwrap();
    m.lock().await.unwrap();
    assert_eq!(
        memory.names_in_use(),
        1,
        "the wrapped backend holds the lock"
    );
    m.unlock().await.unwrap();
    let shared: Arc<dyn Fn() -> AnySync> = Arc::new(move || any.clone());
    assert_eq!(shared().separator(), ":");
}
