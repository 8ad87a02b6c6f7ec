//! The state of one held lock, its lease: what the handler sees of it, the
//! extend loop until its task starts, and what the response's guard lets
//! go of.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Wake, Waker};

use tokio::runtime::Handle;
use tokio::sync::Notify;

use super::alarm::{Alarm, AlarmClock};
use super::extend_loop::{Ended, ExtendLoop};
use super::held::{LockView, ViewSource};
use super::release::LetGo;
use crate::local_queue::HintsRef;
use crate::sync::DistMutex;

/// The lease of one held lock, shared by the handler's
/// [`HeldLock`](super::HeldLock), the response's
/// [`ReleaseGuard`](super::release::ReleaseGuard), the armed timer and the
/// extend loop's task.
pub(crate) struct Lease<M> {
    view: LockView,
    state: Mutex<State<M>>,
    /// Tells a running extend loop that the request has let go.
    let_go: Notify,
    /// Where the extend loop and a deferred release run.
    runtime: Handle,
}

/// What changes, under one lock.
struct State<M> {
    stage: Stage<M>,
    /// Starts the extend loop when the first extension falls due.
    alarm: Alarm,
}

/// Who has the held lock.
enum Stage<M> {
    /// The lease: no task yet, and the alarm starts the extend loop when
    /// the first extension falls due.
    Armed(ExtendLoop<M>),
    /// The extend loop's task; the lease keeps what the key's in-process line
    /// shares, to tell waiting requests at once that the release is under
    /// way.
    Extending(HintsRef),
    /// Nobody: the request let go, or the extend loop gave the lock up as
    /// lost.
    Done,
}

impl<M: DistMutex> Lease<M> {
    /// Starts holding the lock of `extend_loop`: arms the timer that starts
    /// the extend loop when the first extension falls due. Call it within
    /// the Tokio runtime that should keep the lock.
    ///
    /// # Why the first extension is never late
    ///
    /// The timer is set to the instant the first extension falls due
    /// (acquisition + `extend_every`, or the end of `max_hold` if sooner),
    /// and its waker is the lease: the runtime's time driver, not a poll of
    /// the response future or body, starts the extend loop. A handler that
    /// waits for minutes, or a body whose next chunk comes much later, is
    /// kept all the same; so is a handler that blocks its thread on a
    /// multi-threaded runtime, where another worker drives the timer. The
    /// extend loop's first deadline is that same instant, computed here,
    /// so its task extends at once when it starts, then every interval.
    ///
    /// A wake-up before the deadline (the timer is polled unconstrained by
    /// the task budget, so none is expected) only starts the extend loop
    /// early: it still extends at the deadline, never before. Acquisition
    /// is read from the lock's `until` (see `acquire::hold`), which can only
    /// put it earlier: extensions come sooner, never later.
    pub(crate) fn hold(
        view: LockView,
        extend_loop: ExtendLoop<M>,
        clock: &AlarmClock,
    ) -> Arc<Self> {
        let deadline = extend_loop.first_deadline();
        let lease = Self::new(view, extend_loop);
        let waker = Waker::from(lease.clone());
        // Armed with the state free: an alarm that goes off at once starts
        // the extend loop, which takes the state.
        let Some(alarm) = clock.arm(deadline, &waker, &lease.runtime) else {
            lease.start_extend_loop();
            return lease;
        };
        let mut state = lease.state();
        if let Stage::Armed(_) = state.stage {
            state.alarm = alarm;
            drop(state);
        } else {
            // It went off already and started the extend loop.
            drop(state);
            drop(alarm);
        }
        lease
    }

    /// A lease of `extend_loop`'s lock, not armed yet.
    fn new(view: LockView, extend_loop: ExtendLoop<M>) -> Arc<Self> {
        Arc::new(Lease {
            view,
            state: Mutex::new(State {
                stage: Stage::Armed(extend_loop),
                alarm: Alarm::default(),
            }),
            let_go: Notify::new(),
            runtime: Handle::current(),
        })
    }

    /// The extend loop's task: extends the lock until the request lets go
    /// or the lock is lost, then releases it.
    async fn extend_then_release(self: Arc<Self>, mut extend_loop: ExtendLoop<M>) {
        let ended = extend_loop.run(&self.view, &self.let_go).await;
        let lost = ended == Ended::Lost;
        if lost {
            // What remains of the lock is released here: the request's
            // letting go later has nothing left to do.
            {
                let mut state = self.state();
                if let Stage::Extending(_) = state.stage {
                    state.stage = Stage::Done;
                }
            }
            // The key is freed for this process's next request now, not
            // when this one lets go.
            extend_loop.held.place.hints().releasing();
        }
        extend_loop.held.release(&self.view, lost).await;
    }

    fn state(&self) -> MutexGuard<'_, State<M>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Spawns the extend loop's task, unless it runs already or the request has
    /// let go.
    fn start_extend_loop(self: &Arc<Self>) {
        let (extend_loop, alarm) = {
            let mut state = self.state();
            let extend_loop = match std::mem::replace(&mut state.stage, Stage::Done) {
                Stage::Armed(extend_loop) => extend_loop,
                other => {
                    state.stage = other;
                    return;
                }
            };
            state.stage = Stage::Extending(extend_loop.held.place.share_hints());
            // Gone off already, unless the wake-up came early; cancelled
            // (dropped) once the state is free.
            (extend_loop, std::mem::take(&mut state.alarm))
        };
        drop(alarm);
        self.runtime
            .spawn(self.clone().extend_then_release(extend_loop));
    }
}

/// The armed timer wakes the lease: the first extension is due.
impl<M: DistMutex> Wake for Lease<M> {
    fn wake(self: Arc<Self>) {
        self.start_extend_loop();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.start_extend_loop();
    }
}

impl<M: DistMutex> ViewSource for Lease<M> {
    fn view(&self) -> &LockView {
        &self.view
    }
}

impl<M: DistMutex> LetGo for Lease<M> {
    /// Before the first extension falls due, the timer is cancelled and the
    /// lock goes to [`HeldMutex::let_go`](super::release::HeldMutex::let_go):
    /// no extend loop, no extension. Once the extend loop runs, it is told
    /// (a stored notification, not missed if its task has not run yet) and
    /// releases before anything else. An extend loop that would start after
    /// the request let go does not start.
    fn let_go(self: Arc<Self>) {
        let mut state = self.state();
        let State { stage, alarm } = &mut *state;
        match std::mem::replace(stage, Stage::Done) {
            Stage::Armed(extend_loop) => {
                // No extend loop will start: the release is done here.
                let alarm = std::mem::take(alarm);
                drop(state);
                drop(alarm);
                extend_loop.held.let_go(&self, &self.runtime);
            }
            Stage::Extending(holder) => {
                holder.releasing();
                drop(state);
                self.let_go.notify_one();
            }
            Stage::Done => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::*;
    use crate::layer::held::HeldLock;
    use crate::layer::release::{HeldMutex, Live, ReleaseGuard};
    use crate::layer::{OnLost, ReleaseOn};
    use crate::local_queue::LocalQueues;
    use crate::{DistMutexOptions, DistSync, MemorySync};

    /// A freshly taken lock on `name` (expiry 3 s, extended every 1 s)
    /// and its extend loop, whose first extension falls due at `first_extend`.
    fn taken(
        sync: &MemorySync,
        name: &str,
        first_extend: Instant,
    ) -> (LockView, ExtendLoop<crate::memory::MemoryMutex>) {
        let queues: Arc<LocalQueues> = Arc::default();
        let place = queues.join(name.into());
        let turn = place.try_turn().unwrap();
        let options = DistMutexOptions::default().with_expiry(Duration::from_secs(3));
        let mut mutex = sync.new_mutex(name, options).unwrap();
        assert!(matches!(
            mutex.try_lock_now(crate::FastPath::new()),
            Some(Ok(()))
        ));
        let view = LockView::new(
            place.name().clone(),
            mutex.value().into(),
            None,
            mutex.until(),
        );
        let live = Live::new(
            Arc::default(),
            crate::layer::meters::Meters::default(),
            Duration::ZERO,
        );
        let held = HeldMutex::new(mutex, turn, place, Duration::from_secs(3), live);
        let extend_loop = ExtendLoop::new(
            held,
            Duration::from_secs(1),
            Duration::ZERO,
            first_extend,
            None,
        );
        (view, extend_loop)
    }

    /// The response's guard and the handler's view of `lease`.
    fn handles(lease: &Arc<Lease<crate::memory::MemoryMutex>>) -> (ReleaseGuard, HeldLock) {
        let guard = ReleaseGuard::new(lease.clone(), ReleaseOn::BodyEnd, OnLost::Notify);
        (guard, HeldLock::new(lease.clone()))
    }

    /// A lease of a freshly taken lock on `name`: the first extension is
    /// due 1 s after acquisition. Not armed.
    fn lease(sync: &MemorySync, name: &str) -> Arc<Lease<crate::memory::MemoryMutex>> {
        let (view, extend_loop) = taken(sync, name, Instant::now() + Duration::from_secs(1));
        Lease::new(view, extend_loop)
    }

    /// An extend loop started early (a wake-up before the deadline) extends at
    /// the deadline set at acquisition, not before.
    #[tokio::test(start_paused = true)]
    async fn an_early_start_extends_only_when_due() {
        let sync = MemorySync::new();
        let lease = lease(&sync, "early");
        let (guard, held) = handles(&lease);
        let first = held.until().unwrap();
        lease.start_extend_loop();
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(held.until(), Some(first), "nothing extended before 1 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(held.until().unwrap() > first, "extended at 1 s");
        drop(guard);
        held.lost().await;
        assert!(!held.is_lost());
        assert_eq!(sync.names_in_use(), 0);
    }

    /// A request that lets go while its extend loop is starting is released by
    /// the extend loop, without an extension.
    #[tokio::test(start_paused = true)]
    async fn letting_go_as_the_extend_loop_starts_releases_without_extending() {
        let sync = MemorySync::new();
        let lease = lease(&sync, "race");
        let (guard, held) = handles(&lease);
        let first = held.until();
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Due now: the extend loop starts, and the request lets go before the
        // extend loop task runs.
        lease.start_extend_loop();
        drop(guard);
        assert_eq!(
            sync.names_in_use(),
            1,
            "the extend loop releases, in its task"
        );
        held.lost().await;
        assert!(!held.is_lost());
        assert_eq!(held.until(), first, "no extension");
        assert_eq!(sync.names_in_use(), 0);
    }

    /// An armed lease whose deadline has passed starts its extend loop at once.
    #[tokio::test(start_paused = true)]
    async fn a_deadline_already_passed_starts_the_extend_loop_at_once() {
        let sync = MemorySync::new();
        let (view, extend_loop) = taken(&sync, "late", Instant::now() - Duration::from_millis(1));
        let metrics = Handle::current().metrics();
        assert_eq!(metrics.num_alive_tasks(), 0);
        let (guard, held) = handles(&Lease::hold(view, extend_loop, &AlarmClock::default()));
        assert_eq!(metrics.num_alive_tasks(), 1, "the extend loop started");
        drop(guard);
        held.lost().await;
        assert_eq!(sync.names_in_use(), 0);
    }
}
