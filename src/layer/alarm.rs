//! The timers that start held locks' extend loops when their first
//! extension falls due, from the runtime's time driver, unless cancelled
//! first.
//!
//! One layer's locks share one timer per runtime (an [`AlarmClock`]): its
//! deadlines sit in an ordered map, and one Tokio timer is set for the
//! earliest. A request arms an alarm for a deadline later than the
//! earliest (the usual case: every request's is `extend_every` after its
//! acquisition) with one map insertion, and cancels it with one removal:
//! no allocation and no work in the runtime's timer wheel per request.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, TryLockError};
use std::task::{Context, Wake, Waker};

use tokio::runtime::{Handle, Id};
use tokio::time::{Instant, Sleep, sleep_until};

/// The alarms of one layer: a shared timer on the runtime the layer first
/// held a lock on; a lock held on another runtime gets a timer of its own.
#[derive(Default)]
pub(crate) struct AlarmClock {
    clock: OnceLock<Arc<Clock>>,
}

/// One runtime's alarms: what falls due when, and the timer set for the
/// earliest.
struct Clock {
    runtime: Id,
    /// Where the timer is set again after it went off (see `fire`).
    handle: Handle,
    schedule: Mutex<Schedule>,
    /// The timer went off and the alarms due are not woken yet.
    pending: AtomicBool,
}

struct Schedule {
    /// The alarms' wakers by deadline (and a sequence number, since
    /// deadlines may tie).
    due: BTreeMap<(Instant, u64), Waker>,
    next: u64,
    /// The deadline the timer is set for, if it is set: the earliest in
    /// `due` when the timer was last set, or earlier (an alarm cancelled
    /// since).
    armed: Option<Instant>,
    /// A task that sets the timer again is on its way.
    resetting: bool,
    /// The timer, set again for each next deadline; it wakes the clock.
    sleep: Pin<Box<Sleep>>,
}

/// An armed alarm; cancelled with [`Alarm::cancel`] or when dropped.
#[derive(Default)]
pub(crate) struct Alarm(Armed);

#[derive(Default)]
enum Armed {
    /// Not armed, gone off, or cancelled.
    #[default]
    Off,
    /// An entry in the shared clock of its runtime.
    Shared {
        clock: Arc<Clock>,
        key: (Instant, u64),
    },
    /// A timer of its own, on a runtime other than the shared clock's:
    /// dropping it cancels it.
    Own { _timer: Pin<Box<Sleep>> },
}

impl AlarmClock {
    /// Wakes `waker` at `deadline`, from the runtime's time driver, unless
    /// the alarm is cancelled first. `None` if the deadline has passed
    /// already: then nothing is armed, and the caller acts at once. Call it
    /// within `runtime`, with timers.
    pub(crate) fn arm(&self, deadline: Instant, waker: &Waker, runtime: &Handle) -> Option<Alarm> {
        if deadline <= Instant::now() {
            return None;
        }
        let clock = self
            .clock
            .get_or_init(|| Clock::new(runtime.clone(), deadline));
        let runtime = runtime.id();
        if clock.runtime != runtime {
            return own_timer(deadline, waker);
        }
        Some(clock.arm(deadline, waker))
    }
}

impl Alarm {
    /// Disarms the alarm: its waker is not woken (unless it is being woken
    /// right now) and is dropped.
    pub(crate) fn cancel(&mut self) {
        if let Armed::Shared { clock, key } = std::mem::take(&mut self.0) {
            clock.cancel(&key);
        }
    }
}

impl Drop for Alarm {
    /// An alarm nobody holds is cancelled: its waker (a lease) does not
    /// stay in the clock until the deadline.
    fn drop(&mut self) {
        self.cancel();
    }
}

/// A timer of its own for `waker` at `deadline`; `None` if it has passed.
fn own_timer(deadline: Instant, waker: &Waker) -> Option<Alarm> {
    let mut sleep = Box::pin(sleep_until(deadline));
    (!poll_once(&mut sleep, waker)).then_some(Alarm(Armed::Own { _timer: sleep }))
}

/// Polls `sleep` once with `waker`: true if it has elapsed, else the
/// runtime's timer wakes `waker` when it does.
fn poll_once(sleep: &mut Pin<Box<Sleep>>, waker: &Waker) -> bool {
    // Unconstrained: with the task's budget spent, the poll would wake the
    // waker at once instead of setting the timer.
    let mut first = tokio::task::unconstrained(sleep.as_mut());
    Pin::new(&mut first)
        .poll(&mut Context::from_waker(waker))
        .is_ready()
}

impl Clock {
    fn new(handle: Handle, deadline: Instant) -> Arc<Self> {
        Arc::new(Clock {
            runtime: handle.id(),
            handle,
            schedule: Mutex::new(Schedule {
                due: BTreeMap::new(),
                next: 0,
                armed: None,
                resetting: false,
                sleep: Box::pin(sleep_until(deadline)),
            }),
            pending: AtomicBool::new(false),
        })
    }

    /// Runs `f` on the schedule, then hands on the timer's wake-up if it
    /// came meanwhile (see [`fire`](Self::fire)).
    fn with_schedule<R>(self: &Arc<Self>, f: impl FnOnce(&Arc<Self>, &mut Schedule) -> R) -> R {
        let result = f(
            self,
            &mut self.schedule.lock().unwrap_or_else(PoisonError::into_inner),
        );
        // Pairs with the fence in `fire`: either it finds the schedule free,
        // or this sees its wake-up.
        fence(Ordering::SeqCst);
        if self.pending.load(Ordering::SeqCst) {
            // Not run here: this is a request's thread, whose handler may
            // block it next, and the tasks `fire` spawns (extend loops, the
            // timer's reset) would wait in this worker's own slot until it
            // is free. From a blocking thread, any worker takes them. At
            // shutdown nothing runs, and `pending` stays for the next.
            let clock = self.clone();
            drop(self.handle.spawn_blocking(move || clock.fire()));
        }
        result
    }

    fn arm(self: &Arc<Self>, deadline: Instant, waker: &Waker) -> Alarm {
        let key = self.with_schedule(|clock, schedule| {
            let key = (deadline, schedule.next);
            schedule.next += 1;
            schedule.due.insert(key, waker.clone());
            if schedule.armed.is_none_or(|armed| deadline < armed) {
                clock.set_timer(schedule, deadline);
            }
            key
        });
        Alarm(Armed::Shared {
            clock: self.clone(),
            key,
        })
    }

    fn cancel(self: &Arc<Self>, key: &(Instant, u64)) {
        self.with_schedule(|_, schedule| schedule.due.remove(key));
    }

    /// Sets the timer for `deadline`. If that has passed, or the runtime's
    /// timer wakes the clock while it is being set (it may, on this very
    /// thread), the wake-up is pending: it runs once the schedule is free.
    fn set_timer(self: &Arc<Self>, schedule: &mut Schedule, deadline: Instant) {
        schedule.armed = Some(deadline);
        schedule.sleep.as_mut().reset(deadline);
        let waker = Waker::from(self.clone());
        if poll_once(&mut schedule.sleep, &waker) {
            schedule.armed = None;
            self.pending.store(true, Ordering::SeqCst);
        }
    }

    /// Sets the timer for the earliest alarm, after it went off.
    fn reset(self: &Arc<Self>) {
        self.with_schedule(|clock, schedule| {
            schedule.resetting = false;
            let next = schedule.due.first_key_value().map(|(key, _)| key.0);
            if let Some(next) = next
                && schedule.armed.is_none_or(|armed| next < armed)
            {
                clock.set_timer(schedule, next);
            }
        });
    }

    /// The timer went off: wakes every alarm that is due, and has the timer
    /// set for the next. If the schedule is in use (by another thread, or
    /// up this thread's stack while the timer is being set), its user does
    /// this when it is done.
    fn fire(self: &Arc<Self>) {
        self.pending.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        loop {
            let mut schedule = match self.schedule.try_lock() {
                Ok(schedule) => schedule,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => return,
            };
            if !self.pending.swap(false, Ordering::SeqCst) {
                return;
            }
            schedule.armed = None;
            let now = Instant::now();
            let mut woken = Vec::new();
            while let Some(first) = schedule.due.first_entry() {
                if first.key().0 > now {
                    break;
                }
                woken.push(first.remove());
            }
            // Set again from a task, not from here: this may run in the
            // runtime's shutdown, where polling a timer panics (and a task
            // is not spawned).
            if !schedule.due.is_empty() && !schedule.resetting {
                schedule.resetting = true;
                let clock = self.clone();
                drop(self.handle.spawn(async move { clock.reset() }));
            }
            drop(schedule);
            for waker in woken {
                waker.wake();
            }
            fence(Ordering::SeqCst);
            if !self.pending.load(Ordering::SeqCst) {
                return;
            }
        }
    }
}

impl Wake for Clock {
    fn wake(self: Arc<Self>) {
        self.fire();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fire();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count::default());
        let waker = Waker::from(count.clone());
        (count, waker)
    }

    /// Whether `clock`'s schedule is empty.
    fn nothing_due(clock: &AlarmClock) -> bool {
        let clock = clock.clock.get().expect("the clock was used");
        clock.schedule.lock().unwrap().due.is_empty()
    }

    /// Arms `waker` at `deadline` on `clock`, in the current runtime.
    fn arm(clock: &AlarmClock, deadline: Instant, waker: &Waker) -> Option<Alarm> {
        clock.arm(deadline, waker, &Handle::current())
    }

    fn woken(count: &Count) -> usize {
        count.0.load(Ordering::SeqCst)
    }

    /// Alarms go off at their deadlines, in order, however they were
    /// armed; a cancelled one never does; the schedule is empty after.
    #[tokio::test(start_paused = true)]
    async fn alarms_go_off_at_their_deadlines_unless_cancelled() {
        let clock = AlarmClock::default();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let (late, late_waker) = counter();
        let (early, early_waker) = counter();
        let (cancelled, cancelled_waker) = counter();
        let _late = arm(&clock, at(300), &late_waker).unwrap();
        // Earlier than the one the timer is set for: the timer moves.
        let _early = arm(&clock, at(100), &early_waker).unwrap();
        let mut gone = arm(&clock, at(200), &cancelled_waker).unwrap();
        gone.cancel();
        tokio::time::sleep_until(at(150)).await;
        assert_eq!((woken(&early), woken(&late)), (1, 0));
        tokio::time::sleep_until(at(350)).await;
        assert_eq!((woken(&early), woken(&late), woken(&cancelled)), (1, 1, 0));
        assert!(nothing_due(&clock));
    }

    /// A deadline that has passed arms nothing.
    #[tokio::test(start_paused = true)]
    async fn a_past_deadline_arms_nothing() {
        let clock = AlarmClock::default();
        let (count, waker) = counter();
        assert!(arm(&clock, Instant::now(), &waker).is_none());
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(woken(&count), 0);
    }

    /// A lock held on another runtime than the clock's gets a timer of its
    /// own, which goes off on that runtime.
    #[test]
    fn another_runtime_gets_its_own_timer() {
        let clock = AlarmClock::default();
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap()
        };
        for _ in 0..2 {
            let (count, waker) = counter();
            runtime().block_on(async {
                let alarm = arm(&clock, Instant::now() + Duration::from_millis(10), &waker);
                tokio::time::sleep(Duration::from_millis(20)).await;
                drop(alarm);
            });
            assert_eq!(woken(&count), 1);
        }
        assert!(nothing_due(&clock));
    }

    /// A runtime dropped with alarms armed on its clock (the first one
    /// woken, the other not due) shuts down without a panic: the clock is
    /// not set again there.
    #[test]
    fn a_runtime_shut_down_with_alarms_armed_does_not_panic() {
        let clock = AlarmClock::default();
        let (count, waker) = counter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let alarms = runtime.block_on(async {
            let start = Instant::now();
            let first = arm(&clock, start + Duration::from_millis(10), &waker);
            let later = arm(&clock, start + Duration::from_secs(60), &waker);
            tokio::time::sleep(Duration::from_millis(20)).await;
            (first, later)
        });
        assert_eq!(woken(&count), 1);
        drop(runtime);
        drop(alarms);
        assert_eq!(woken(&count), 1, "the later alarm never went off");
    }

    /// Alarms armed and cancelled from many tasks at once on a
    /// multi-threaded runtime, while the timer goes off: each alarm left
    /// armed goes off exactly once, no cancelled one does, and nothing is
    /// left in the schedule.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn alarms_from_many_threads_go_off_once_unless_cancelled() {
        let clock = Arc::new(AlarmClock::default());
        let mut tasks = Vec::new();
        for task in 0..8u64 {
            let clock = clock.clone();
            tasks.push(tokio::spawn(async move {
                let mut kept = Vec::new();
                for i in 0..200u64 {
                    let (count, waker) = counter();
                    let deadline = Instant::now() + Duration::from_millis(1 + (i * 7 + task) % 20);
                    let Some(mut alarm) = arm(&clock, deadline, &waker) else {
                        continue;
                    };
                    if i % 2 == 0 {
                        alarm.cancel();
                        kept.push((count, false, alarm));
                    } else {
                        kept.push((count, true, alarm));
                    }
                    if i % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                kept
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        // Every alarm left armed goes off (within a generous bound), and the
        // last deadline passes.
        let last = Instant::now() + Duration::from_millis(21);
        let bound = Instant::now() + Duration::from_secs(10);
        while Instant::now() < last
            || all
                .iter()
                .any(|(count, armed, _)| *armed && woken(count) == 0)
        {
            assert!(Instant::now() < bound, "armed alarms did not go off");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for (count, armed, _) in &all {
            assert_eq!(woken(count), usize::from(*armed));
        }
        assert!(nothing_due(&clock));
    }

    /// A multi-threaded runtime whose timer goes off while a request's
    /// thread has the schedule (arming or cancelling), after which that
    /// request's handler blocks its thread until `until` holds (or 10 s
    /// pass): `wakers` armed 10 ms apart from now.
    fn block_after_a_deferred_wake_up(
        wakers: Vec<Waker>,
        until: impl Fn() -> bool + Clone + Send + 'static,
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let alarms = Arc::new(AlarmClock::default());
        let task_until = until.clone();
        runtime.spawn(async move {
            let now = Instant::now();
            let armed: Vec<_> = (1u64..)
                .zip(&wakers)
                .map(|(i, waker)| arm(&alarms, now + Duration::from_millis(10 * i), waker))
                .collect();
            let clock = alarms.clock.get().unwrap().clone();
            clock.with_schedule(|clock, _| {
                while !clock.pending.load(Ordering::SeqCst) {
                    std::thread::yield_now();
                }
            });
            let bound = std::time::Instant::now() + Duration::from_secs(10);
            while !task_until() && std::time::Instant::now() < bound {
                std::thread::yield_now();
            }
            drop(armed);
        });
        let bound = std::time::Instant::now() + Duration::from_secs(10);
        while !until() && std::time::Instant::now() < bound {
            std::thread::yield_now();
        }
        runtime.shutdown_background();
    }

    /// The timer is set again for the next alarm on another worker.
    #[test]
    fn a_later_alarm_goes_off_while_the_thread_that_had_the_schedule_blocks() {
        let (first, first_waker) = counter();
        let (later, later_waker) = counter();
        let seen = later.clone();
        block_after_a_deferred_wake_up(vec![first_waker, later_waker], move || woken(&seen) > 0);
        assert_eq!((woken(&first), woken(&later)), (1, 1));
    }

    /// A task the alarm's waker spawns (as a lease spawns its extend loop)
    /// runs on another worker.
    #[test]
    fn a_task_an_alarm_spawns_runs_while_the_thread_that_had_the_schedule_blocks() {
        /// Spawns a task that counts.
        struct Spawner(Arc<Count>);
        impl Wake for Spawner {
            fn wake(self: Arc<Self>) {
                let ran = self.0.clone();
                drop(tokio::spawn(async move {
                    ran.0.fetch_add(1, Ordering::SeqCst);
                }));
            }
        }
        let ran = Arc::new(Count::default());
        let waker = Waker::from(Arc::new(Spawner(ran.clone())));
        let seen = ran.clone();
        block_after_a_deferred_wake_up(vec![waker], move || woken(&seen) > 0);
        assert_eq!(woken(&ran), 1, "the spawned task ran");
    }
}
