//! The conformance suite: written once against the `DistSync` / `DistMutex`
//! traits, run on every backend.
//!
//! A backend's test file builds a [`Suite`] and expands
//! [`conformance_tests!`] with it. Time-dependent checks poll for the
//! expected state with a generous upper bound; on `MemorySync` they run on
//! tokio's paused clock, so the bound costs no real time.

#![allow(dead_code)]

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Error};

/// What the suite needs from a backend.
pub struct Suite<S: DistSync> {
    /// The backend under test.
    pub sync: S,
    /// A second, independent handle on the same backend (another replica).
    pub other: S,
    /// Options with an expiry short enough to wait out (a few hundred ms on
    /// a real clock) and a short retry delay.
    pub base: DistMutexOptions,
    /// Whatever must live as long as the suite (spawned servers).
    pub guard: Box<dyn std::any::Any + Send>,
}

/// Options for a backend on a real clock: short expiries (real time
/// passes), a generous per-node timeout, a short retry delay.
pub fn real_time_options() -> DistMutexOptions {
    DistMutexOptions::default()
        .with_expiry(Duration::from_millis(500))
        .with_timeout_factor(0.5)
        .with_retry_delay(Duration::from_millis(5))
}

/// Options for waiters that only a release's wake-up can serve: an
/// hour-long retry delay, a minute-long expiry, and `tries`.
pub fn wake_only(tries: u32) -> DistMutexOptions {
    DistMutexOptions::default()
        .with_expiry(Duration::from_secs(60))
        .with_retry_delay(Duration::from_secs(3600))
        .with_tries(tries)
}

/// Waits until the wall clock has moved to the next millisecond, so that
/// the next waiter starts strictly later (wait queues order processes by
/// their waiters' starts, in ms).
pub fn next_millisecond() {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    };
    let start = now();
    while now() == start {
        std::hint::spin_loop();
    }
}

/// Waiters of two processes are served in the order they started waiting:
/// while `holder` holds `name`, 8 waiters (made with `options`, served
/// only by wake-ups) alternate between the processes, 0 in the second, 1 in
/// the first, and so on, each a millisecond after the previous one. The
/// holder lets go once `in_line` says both processes have their place in
/// the wait queue everywhere: one poll may not have sent a process's first
/// attempt (its connection is made on first use), so the waiters keep going
/// meanwhile.
pub async fn served_in_start_order<S: DistSync>(
    processes: &[S; 2],
    name: &str,
    mut holder: S::Mutex,
    options: &DistMutexOptions,
    in_line: impl AsyncFnMut() -> bool,
) {
    let order = std::sync::Mutex::new(Vec::new());
    let mut waiters = Vec::new();
    for id in 0..8usize {
        let mut mutex = processes[(id + 1) % 2]
            .new_mutex(name, options.clone())
            .unwrap();
        let order = &order;
        waiters.push(Box::pin(async move {
            mutex.lock().await.unwrap();
            order.lock().unwrap().push(id);
            mutex.unlock().await.unwrap();
        }));
    }
    for waiter in &mut waiters {
        next_millisecond();
        assert!(poll_once(waiter.as_mut()).await.is_none(), "must wait");
    }
    let mut all = pin!(futures_util::future::join_all(waiters));
    tokio::select! {
        _ = all.as_mut() => panic!("a waiter was served while the holder held the name"),
        () = eventually(
            Duration::from_secs(10),
            "both processes in line everywhere",
            in_line,
        ) => {}
    }
    holder.unlock().await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("every waiter woken by a release");
    assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
}

/// Polls `check` until it yields true; panics after `bound`.
pub async fn eventually(bound: Duration, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Polls `fut` exactly once; `Some` if it completed.
pub async fn poll_once<F: Future>(fut: std::pin::Pin<&mut F>) -> Option<F::Output> {
    let mut fut = fut;
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(Some(out)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}

impl<S: DistSync> Suite<S> {
    fn expiry(&self) -> Duration {
        self.base.expiry()
    }

    /// Options for a caller that may wait: a budget far shorter than a long
    /// expiry, far longer than any release takes.
    fn patient(&self) -> DistMutexOptions {
        self.base
            .clone()
            .with_tries(400)
            .with_retry_delay(Duration::from_millis(5))
    }

    fn once(&self) -> DistMutexOptions {
        self.base.clone().with_tries(1)
    }

    fn mutex(&self, name: &str, options: DistMutexOptions) -> S::Mutex {
        self.sync.new_mutex(name, options).expect("new_mutex")
    }

    /// Asserts that `name` can be taken now by a fresh mutex (within the
    /// patient budget), then releases it.
    async fn assert_free(&self, name: &str) {
        let mut probe = self.other.new_mutex(name, self.patient()).unwrap();
        probe.lock().await.expect("the name should be free");
        probe.unlock().await.expect("unlock the probe");
    }

    pub async fn basics(&self) {
        assert_eq!(self.sync.separator(), ":");
        let name = unique("basics");
        let mut m = self.mutex(&name, self.once());
        assert_eq!(m.name(), name);
        assert_eq!(m.value(), "", "value is empty before the first lock");
        assert_eq!(m.until(), None, "until is None before the first lock");
        m.lock().await.unwrap();
        assert!(!m.value().is_empty());
        let until = m.until().expect("until after lock");
        assert!(until > Instant::now());
        assert!(until <= Instant::now() + self.expiry());
        m.unlock().await.unwrap();
        assert_eq!(m.until(), None, "until is None after unlock");
        assert!(matches!(m.unlock().await, Err(Error::NotAcquired)));
        // A mutex can be locked again after unlock; each lock has a new value.
        let first = m.value().to_owned();
        m.lock().await.unwrap();
        assert_ne!(m.value(), first);
        m.unlock().await.unwrap();
    }

    pub async fn invalid_input(&self) {
        for bad in [
            "",
            "a\u{0}b",
            "line\nbreak",
            &"x".repeat(tower_dsync::MAX_NAME_LEN + 1),
        ] {
            let err = self.sync.new_mutex(bad, self.base.clone()).unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{bad:?}: {err}");
        }
        let options = [
            self.base.clone().with_expiry(Duration::ZERO),
            self.base.clone().with_tries(0),
            self.base.clone().with_drift_factor(1.5),
            self.base.clone().with_drift_factor(f64::NAN),
            self.base
                .clone()
                .with_expiry(tower_dsync::MAX_EXPIRY + Duration::from_secs(1)),
            self.base.clone().with_expiry(Duration::from_millis(1)),
            self.base.clone().with_tries(0),
            self.base.clone().with_drift_factor(1.5),
            self.base.clone().with_drift_factor(-0.1),
            self.base.clone().with_drift_factor(f64::NAN),
            self.base.clone().with_timeout_factor(0.0),
            self.base.clone().with_timeout_factor(1.0),
            self.base.clone().with_timeout_factor(f64::INFINITY),
            self.base.clone().with_value(""),
        ];
        for o in options {
            // The derived durations never panic, whatever the options.
            let _ = (o.drift(), o.validity(), o.node_timeout());
            let err = self.sync.new_mutex("ok", o).unwrap_err();
            assert!(matches!(err, Error::InvalidOptions { .. }), "{err}");
        }
        let failing = self
            .base
            .clone()
            .with_gen_value_fn(|| Err("entropy ran out".into()));
        let mut m = self.mutex(&unique("gen"), failing);
        assert!(matches!(m.lock().await, Err(Error::GenValue(_))));
    }

    /// 32 tasks on one name, at least 2,000 acquisitions: never two holders.
    pub async fn mutual_exclusion(&self) {
        const TASKS: usize = 32;
        const TOTAL: usize = 2_000;
        let name = unique("exclusion");
        let inside = Arc::new(AtomicUsize::new(0));
        let max_inside = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicUsize::new(0));
        let options = self
            .base
            .clone()
            .with_expiry(Duration::from_secs(30))
            .with_tries(u32::MAX);
        let mut tasks = Vec::new();
        for i in 0..TASKS {
            let sync = if i % 2 == 0 {
                self.sync.clone()
            } else {
                self.other.clone()
            };
            let mut m = sync.new_mutex(&name, options.clone()).unwrap();
            let (inside, max_inside, done) = (inside.clone(), max_inside.clone(), done.clone());
            tasks.push(tokio::spawn(async move {
                while done.load(Ordering::SeqCst) < TOTAL {
                    m.lock().await.unwrap();
                    let now_inside = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    max_inside.fetch_max(now_inside, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    m.unlock().await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert!(done.load(Ordering::SeqCst) >= TOTAL);
        assert_eq!(max_inside.load(Ordering::SeqCst), 1, "two holders at once");
        self.assert_free(&name).await;
    }

    /// An expired lock can be taken by another mutex; its old owner can then
    /// neither unlock nor extend it.
    pub async fn expiry_takeover(&self) {
        let name = unique("expiry");
        let mut a = self.mutex(&name, self.once());
        let mut b = self.mutex(&name, self.once());
        a.lock().await.unwrap();
        match b.lock().await {
            Err(Error::Held { remaining }) => {
                if let Some(r) = remaining {
                    assert!(r <= self.expiry(), "remaining {r:?}");
                }
            }
            other => panic!("expected Held, got {other:?}"),
        }
        eventually(self.expiry() * 20, "b takes the expired lock", async || {
            b.lock().await.is_ok()
        })
        .await;
        assert!(matches!(a.unlock().await, Err(Error::NotAcquired)));
        assert!(matches!(a.extend().await, Err(Error::NotAcquired)));
        assert!(!a.valid().await.unwrap());
        assert!(b.valid().await.unwrap());
        b.unlock().await.unwrap();
    }

    /// An unlock that fails still ends the validity this mutex reports: the
    /// lock is not held by it any more (or may not be), so `until()` must
    /// not promise time left.
    pub async fn failed_unlock_clears_until(&self) {
        let name = unique("failed-unlock");
        let mut a = self.mutex(&name, self.once());
        let mut b = self.mutex(&name, self.once());
        a.lock().await.unwrap();
        eventually(self.expiry() * 20, "b takes the expired lock", async || {
            b.lock().await.is_ok()
        })
        .await;
        assert!(matches!(a.unlock().await, Err(Error::NotAcquired)));
        assert_eq!(a.until(), None, "validity after a failed unlock");
        b.unlock().await.unwrap();
    }

    pub async fn non_owner_fails(&self) {
        let name = unique("owner");
        let mut a = self.mutex(&name, self.once());
        let mut never = self.mutex(&name, self.once());
        let mut stranger = self.mutex(&name, self.once().with_value("not-the-owner"));
        a.lock().await.unwrap();
        assert!(matches!(never.unlock().await, Err(Error::NotAcquired)));
        assert!(matches!(never.extend().await, Err(Error::NotAcquired)));
        assert!(matches!(stranger.unlock().await, Err(Error::NotAcquired)));
        assert!(matches!(stranger.extend().await, Err(Error::NotAcquired)));
        assert!(!stranger.valid().await.unwrap());
        assert!(a.valid().await.unwrap(), "the owner keeps the lock");
        a.unlock().await.unwrap();
        // Nothing held: unlock and extend report not acquired.
        assert!(matches!(a.unlock().await, Err(Error::NotAcquired)));
        assert!(matches!(a.extend().await, Err(Error::NotAcquired)));
    }

    /// A released mutex refuses `extend` until its next `lock`, also where
    /// `extend` may re-create a lost key and while the name is free: an
    /// extension must never take a name its mutex let go of. A preset value
    /// changes nothing: the lock another mutex took with it is that
    /// mutex's to extend.
    pub async fn extend_after_unlock_is_refused(&self) {
        let name = unique("extend-released");
        let mut a = self.mutex(&name, self.once());
        a.lock().await.unwrap();
        a.unlock().await.unwrap();
        assert!(matches!(a.extend().await, Err(Error::NotAcquired)));
        assert_eq!(a.until(), None);
        assert!(!a.valid().await.unwrap(), "extend took the name back");
        self.assert_free(&name).await;
        // Locked again, it extends again.
        a.lock().await.unwrap();
        a.extend().await.unwrap();
        a.unlock().await.unwrap();

        let mut b = self.mutex(&name, self.once().with_value("shared-value"));
        b.lock().await.unwrap();
        b.unlock().await.unwrap();
        let mut c = self
            .other
            .new_mutex(&name, self.once().with_value("shared-value"))
            .unwrap();
        c.lock().await.unwrap();
        assert!(matches!(b.extend().await, Err(Error::NotAcquired)));
        c.unlock().await.unwrap();
        assert!(matches!(b.extend().await, Err(Error::NotAcquired)));
        self.assert_free(&name).await;
    }

    /// The `value` option lets another mutex (another process) act on a lock.
    pub async fn ownership_transfer(&self) {
        let name = unique("transfer");
        let mut a = self.mutex(&name, self.once());
        a.lock().await.unwrap();
        let options = self.once().with_value(a.value());
        let mut b = self.other.new_mutex(&name, options).unwrap();
        assert_eq!(b.value(), a.value(), "a preset value shows before lock");
        assert!(b.valid().await.unwrap());
        b.extend().await.unwrap();
        assert!(b.until().is_some());
        b.unlock().await.unwrap();
        assert!(!a.valid().await.unwrap());
        assert!(matches!(a.unlock().await, Err(Error::NotAcquired)));
        // A preset value is also the value `lock` acquires with.
        b.lock().await.unwrap();
        assert_eq!(b.value(), a.value());
        assert!(a.valid().await.unwrap());
        a.unlock().await.unwrap();
    }

    /// Dropping `lock()` while it waits for a held name leaves nothing.
    pub async fn cancel_while_waiting(&self) {
        let name = unique("cancel-wait");
        let long = self.base.clone().with_expiry(Duration::from_secs(60));
        let mut a = self.mutex(&name, long.clone().with_tries(1));
        a.lock().await.unwrap();
        let mut b = self.mutex(&name, long.with_tries(u32::MAX));
        {
            let mut waiting = pin!(b.lock());
            assert!(poll_once(waiting.as_mut()).await.is_none(), "b must wait");
        }
        a.unlock().await.unwrap();
        self.assert_free(&name).await;
    }

    /// Dropping `lock()` after a release handed it the name, before it saw
    /// it, leaves nothing either.
    pub async fn cancel_while_acquiring(&self) {
        let name = unique("cancel-acquire");
        let long = self.base.clone().with_expiry(Duration::from_secs(60));
        let mut a = self.mutex(&name, long.clone().with_tries(1));
        a.lock().await.unwrap();
        let mut b = self.mutex(&name, long.with_tries(u32::MAX));
        {
            let mut waiting = pin!(b.lock());
            assert!(poll_once(waiting.as_mut()).await.is_none(), "b must wait");
            a.unlock().await.unwrap();
            // A release may have handed the lock to b; b never looks.
        }
        self.assert_free(&name).await;

        // And on a free name: the first poll starts the acquisition, which
        // may or may not finish in that poll.
        let name = unique("cancel-start");
        let mut c = self.mutex(
            &name,
            self.base.clone().with_expiry(Duration::from_secs(60)),
        );
        let completed = {
            let mut starting = pin!(c.lock());
            poll_once(starting.as_mut()).await
        };
        if let Some(result) = completed {
            result.unwrap();
            c.unlock().await.unwrap();
        }
        self.assert_free(&name).await;
    }

    pub async fn extend_moves_until(&self) {
        let name = unique("extend");
        let mut m = self.mutex(&name, self.once());
        m.lock().await.unwrap();
        let first = m.until().unwrap();
        // `until` subtracts each operation's own duration, so let more time
        // pass than a slow extend could take over a fast lock.
        let later = Instant::now() + self.expiry() / 10;
        while Instant::now() < later {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        m.extend().await.unwrap();
        let second = m.until().unwrap();
        assert!(second > first, "extend must move until forward");
        assert!(
            second <= Instant::now() + self.expiry(),
            "extend resets the expiry to now + expiry, it does not add to it"
        );
        assert!(m.valid().await.unwrap());
        m.unlock().await.unwrap();
    }

    pub async fn valid_until_expiry(&self) {
        let name = unique("valid");
        let mut m = self.mutex(&name, self.once());
        assert!(!m.valid().await.unwrap(), "not valid before lock");
        m.lock().await.unwrap();
        assert!(m.valid().await.unwrap());
        let until = m.until().unwrap();
        eventually(self.expiry() * 20, "the lock expires", async || {
            !m.valid().await.unwrap()
        })
        .await;
        assert!(Instant::now() >= until, "until is never later than expiry");
        assert!(matches!(m.extend().await, Err(Error::NotAcquired)));
        assert!(matches!(m.unlock().await, Err(Error::NotAcquired)));
    }

    /// Used-up tries report the holder and, when known, its remaining time.
    pub async fn exhausted_tries(&self) {
        let name = unique("tries");
        let long = self.base.clone().with_expiry(Duration::from_secs(60));
        let mut a = self.mutex(&name, long.clone().with_tries(1));
        a.lock().await.unwrap();
        let delays = Arc::new(AtomicUsize::new(0));
        let counted = delays.clone();
        let mut b = self.mutex(
            &name,
            long.with_tries(3).with_delay_fn(move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
                Duration::from_millis(1)
            }),
        );
        match b.lock().await {
            Err(Error::Held { remaining: Some(r) }) => {
                assert!(r > Duration::ZERO && r <= Duration::from_secs(60), "{r:?}");
            }
            other => panic!("expected Held with a remaining time, got {other:?}"),
        }
        assert_eq!(
            delays.load(Ordering::SeqCst),
            2,
            "3 tries: 2 delays between them"
        );
        // Giving up left b in no queue: the name is free once a unlocks.
        a.unlock().await.unwrap();
        self.assert_free(&name).await;
    }
}

impl<S: DistSync> Suite<S> {
    /// Where the backend issues fencing tokens, each acquisition of a name
    /// gets a greater one than every earlier acquisition, on either handle.
    pub async fn fencing_tokens_grow(&self) {
        let name = unique("fence");
        let options = self.patient().with_expiry(Duration::from_secs(30));
        let mut last = None;
        for i in 0..20 {
            let sync = if i % 2 == 0 { &self.sync } else { &self.other };
            let mut m = sync.new_mutex(&name, options.clone()).unwrap();
            assert_eq!(m.fencing_token(), None, "no token before lock");
            m.lock().await.unwrap();
            let Some(token) = m.fencing_token() else {
                return; // this backend issues no tokens
            };
            if let Some(last) = last {
                assert!(token > last, "token {token} after {last}");
            }
            last = Some(token);
            m.unlock().await.unwrap();
        }
    }
}

impl<S: DistSync> Suite<S> {
    /// Waiters on one name in one process are served in the order they
    /// started waiting.
    pub async fn waiters_are_served_fifo(&self) {
        let name = unique("fifo");
        let options = self
            .patient()
            .with_expiry(Duration::from_secs(30))
            .with_tries(u32::MAX);
        let mut holder = self.mutex(&name, options.clone());
        holder.lock().await.unwrap();
        let (order_tx, mut order_rx) = tokio::sync::mpsc::unbounded_channel();
        let (queued_tx, mut queued_rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..8 {
            let mut m = self.mutex(&name, options.clone());
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
            // The next waiter starts only once this one waits.
            queued_rx.recv().await.unwrap();
        }
        drop(order_tx);
        holder.unlock().await.unwrap();
        let mut order = Vec::new();
        while let Some(i) = order_rx.recv().await {
            order.push(i);
        }
        assert_eq!(order, (0..8).collect::<Vec<_>>());
    }
}

impl<S: DistSync> Suite<S> {
    /// A zero first retry delay does not make callers of one process give
    /// up before their turn: three callers wait behind a holder, each with
    /// a first retry delay of zero and later ones that only a release can
    /// cut short, and each gets the name in turn.
    pub async fn zero_first_delay_callers_are_served(&self) {
        let name = unique("zero-delay");
        let long = self.base.clone().with_expiry(Duration::from_secs(60));
        let mut holder = self.other.new_mutex(&name, long.clone()).unwrap();
        holder.lock().await.unwrap();
        let options = long.with_tries(10).with_delay_fn(|retry| {
            if retry == 1 {
                Duration::ZERO
            } else {
                Duration::from_secs(3600)
            }
        });
        let served = AtomicUsize::new(0);
        let mut callers = Vec::new();
        for _ in 0..3 {
            let mut m = self.mutex(&name, options.clone());
            let served = &served;
            callers.push(Box::pin(async move {
                let outcome = m.lock().await;
                if outcome.is_ok() {
                    served.fetch_add(1, Ordering::SeqCst);
                    m.unlock().await.unwrap();
                }
                outcome
            }));
        }
        for caller in &mut callers {
            if let Some(outcome) = poll_once(caller.as_mut()).await {
                panic!("a caller did not wait for the holder: {outcome:?}");
            }
        }
        holder.unlock().await.unwrap();
        let outcomes = tokio::time::timeout(
            Duration::from_secs(60),
            futures_util::future::join_all(callers),
        )
        .await
        .expect("every caller served by a release");
        for outcome in outcomes {
            outcome.expect("each caller gets the name in turn");
        }
        assert_eq!(served.load(Ordering::SeqCst), 3);
        self.assert_free(&name).await;
    }
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!("{prefix}:{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Expands to one `#[tokio::test]` per conformance case. `$suite` is an
/// async expression that builds a [`Suite`]; `$attr` is the test attribute.
#[macro_export]
macro_rules! conformance_tests {
    (#[$attr:meta] $suite:expr) => {
        $crate::conformance_tests!(@cases #[$attr] $suite;
            basics invalid_input mutual_exclusion expiry_takeover non_owner_fails
            failed_unlock_clears_until
            ownership_transfer cancel_while_waiting cancel_while_acquiring
            extend_moves_until valid_until_expiry exhausted_tries fencing_tokens_grow
            waiters_are_served_fifo extend_after_unlock_is_refused
            zero_first_delay_callers_are_served);
    };
    (@cases #[$attr:meta] $suite:expr; $($case:ident)*) => {
        $(
            #[$attr]
            async fn $case() {
                let suite = $suite;
                suite.$case().await;
            }
        )*
    };
}
