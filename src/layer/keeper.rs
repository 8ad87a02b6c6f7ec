//! The keeper of a request's lock: once started (see [`lease`](super::lease)),
//! it extends the lock every interval while the request is in flight and
//! reports a failed extension; when the request lets go it releases the
//! lock, inline if the backend answers at once, else in a task.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout};

use super::held::LockView;
use super::lease::Lease;
use super::queue::{Place, Turn};
use crate::error::Error;
use crate::sync::DistMutex;

/// Everything the keeper owns while the lock is held.
pub(crate) struct Keeper<M> {
    pub(crate) mutex: M,
    /// This request's turn in the local queue, passed on after release.
    pub(crate) turn: Turn,
    pub(crate) place: Place,
    pub(crate) interval: Duration,
    /// The longest a release may take: past the expiry it is moot.
    pub(crate) release_timeout: Duration,
    /// When the first extension falls due: acquisition + interval.
    pub(crate) first_extend: Instant,
    /// No extension past this instant: the lock is then given up as lost.
    pub(crate) hold_until: Option<Instant>,
    /// Counts this lock in the layer's held locks until the keeper is
    /// dropped: once the release is done (inline, or at the end of the
    /// keeper task, also when the runtime drops the task unfinished).
    pub(crate) live: Live,
}

/// Counts a held lock as live until dropped.
pub(crate) struct Live(Arc<AtomicUsize>);

impl Live {
    /// Counts one more held lock in `count`.
    pub(crate) fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Live(count)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How an unlock ended.
enum Unlocked {
    Done(crate::Result<()>),
    TimedOut,
    Panicked,
}

impl<M: DistMutex> Keeper<M> {
    /// When the keeper must first act: the first extension, or the end of
    /// `max_hold` if that comes sooner.
    pub(crate) fn first_deadline(&self) -> Instant {
        self.hold_until
            .map_or(self.first_extend, |end| self.first_extend.min(end))
    }

    /// Extends the lock until the request lets go of `lease`, then releases
    /// it. Runs in a task of its own.
    pub(crate) async fn keep(mut self, lease: Arc<Lease<M>>) {
        let view = lease.view();
        let mut next = self.first_extend;
        let mut lost = false;
        loop {
            tokio::select! {
                biased;
                () = lease.let_go_signal() => break,
                () = sleep_until(self.hold_until.map_or(next, |end| next.min(end))), if !lost => {
                    let extended = if self.hold_until.is_some_and(|end| Instant::now() >= end) {
                        Err("held longer than max_hold".to_owned())
                    } else {
                        self.mutex.extend().await.map_err(|e| e.to_string())
                    };
                    match extended {
                        Ok(()) => {
                            let until = self.mutex.until();
                            self.place.set_holder_until(until);
                            view.set_until(until);
                            tracing::trace!(name = view.name(), "lock extended");
                            next = Instant::now() + self.interval;
                        }
                        Err(error) => {
                            tracing::warn!(name = view.name(), %error, "lock lost: not extended");
                            lost = true;
                            view.set_lost();
                        }
                    }
                }
            }
        }
        let unlocked = match timeout(self.release_timeout, self.mutex.unlock()).await {
            Ok(result) => Unlocked::Done(result),
            Err(_) => Unlocked::TimedOut,
        };
        finish(view, unlocked, lost, self.turn, self.place);
    }

    /// Releases the lock of a request that let go before its keeper
    /// started, right here, if the backend answers at once
    /// ([`DistMutex::try_unlock_now`]); the caller then drops the keeper,
    /// which passes the turn on. False if it cannot: the thread unwinds (a
    /// panicking backend would abort the process), or the backend's answer
    /// has to wait; then [`release_later`](Self::release_later).
    pub(crate) fn release_now(&mut self, view: &LockView) -> bool {
        if std::thread::panicking() {
            return false;
        }
        // A backend that panics here must not take the response down with
        // it: the release has failed, and the lock expires on its own.
        let unlocked = match catch_unwind(AssertUnwindSafe(|| self.mutex.try_unlock_now())) {
            Ok(None) => return false,
            Ok(Some(result)) => Unlocked::Done(result),
            Err(_) => Unlocked::Panicked,
        };
        report(view, unlocked, false, &self.place);
        true
    }

    /// Releases the lock in a task, so that the response path never waits
    /// for the backend.
    pub(crate) fn release_later(self, lease: &Arc<Lease<M>>) {
        let Keeper {
            mut mutex,
            turn,
            place,
            release_timeout,
            live,
            ..
        } = self;
        let lease = lease.clone();
        lease.runtime().clone().spawn(async move {
            let unlocked = match timeout(release_timeout, mutex.unlock()).await {
                Ok(result) => Unlocked::Done(result),
                Err(_) => Unlocked::TimedOut,
            };
            finish(lease.view(), unlocked, false, turn, place);
            drop(live);
        });
    }
}

/// The lock is released (or given up): logs how, tells the handler, and
/// passes this request's turn on to the next local request for the name.
fn finish(view: &LockView, unlocked: Unlocked, lost: bool, turn: Turn, place: Place) {
    report(view, unlocked, lost, &place);
    // The next local request for this name may go now.
    drop(turn);
    drop(place);
}

/// The lock is released (or given up): logs how and tells the handler.
fn report(view: &LockView, unlocked: Unlocked, lost: bool, place: &Place) {
    let name = view.name();
    match unlocked {
        Unlocked::Done(Ok(())) => tracing::debug!(name, "lock released"),
        Unlocked::Done(Err(Error::NotAcquired)) if lost => {}
        Unlocked::Done(Err(error)) => {
            tracing::warn!(name, %error, "lock release failed; it expires on its own")
        }
        Unlocked::TimedOut => {
            tracing::warn!(name, "lock release timed out; it expires on its own")
        }
        Unlocked::Panicked => {
            tracing::error!(name, "lock release panicked; it expires on its own")
        }
    }
    view.set_released();
    place.set_holder_until(None);
}
