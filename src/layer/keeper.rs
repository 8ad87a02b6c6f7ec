//! The keeper of a request's lock: once started (see [`lease`](super::lease)),
//! it extends the lock every interval while the request is in flight and
//! reports a failed extension; when the request lets go it releases the
//! lock, inline if the backend answers at once, else in a task.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::{Instant, sleep_until, timeout, timeout_at};

use super::MIN_EXTEND_EVERY;
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
    /// How long an extension may take, so that it starts early enough to
    /// be done before the validity ends: a node timeout at first, then the
    /// slowest extension seen.
    pub(crate) extend_takes: Duration,
    /// When the last extension started (none yet: `None`).
    pub(crate) last_attempt: Option<Instant>,
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

/// How an extension attempt ended.
enum Extension {
    /// Extended; the attempt started then.
    Done { started: Instant },
    /// Failed with validity left: try again.
    Retry(String),
    /// The lock can no longer be trusted.
    Lost(String),
}

/// How an unlock ended.
enum Unlocked {
    Done(crate::Result<()>),
    TimedOut,
    Panicked,
}

impl<M: DistMutex> Keeper<M> {
    /// When the keeper must first act: the first extension (see
    /// [`due`](Self::due)), or the end of `max_hold` if that comes sooner.
    pub(crate) fn first_deadline(&self) -> Instant {
        self.due(self.first_extend)
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
                () = sleep_until(self.due(next)), if !lost => {
                    match self.extend_once().await {
                        Extension::Done { started } => {
                            let until = self.mutex.until();
                            self.place.set_holder_until(until);
                            view.set_until(until);
                            tracing::trace!(name = view.name(), "lock extended");
                            next = started + self.interval;
                        }
                        Extension::Retry(error) => {
                            tracing::debug!(name = view.name(), %error, "lock not extended; retrying");
                            next = Instant::now() + self.retry_every();
                        }
                        Extension::Lost(error) => {
                            tracing::warn!(name = view.name(), %error, "lock lost: not extended");
                            lost = true;
                            view.set_lost();
                            // The key is freed for this process's next
                            // request now, not when this one lets go.
                            lease.keeper_gone();
                            self.place.shared().releasing();
                            break;
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

    /// When the next extension starts: `next` (an interval after the start
    /// of the last one), but early enough that it can be done before the
    /// validity ends (it may take as long as the slowest so far, and at
    /// least a node timeout), and at the end of `max_hold`; never sooner
    /// than the shortest interval after the last attempt, so that a backend
    /// slower than the validity is not called in a busy loop.
    fn due(&self, next: Instant) -> Instant {
        let mut due = next;
        if let Some(until) = self.mutex.until() {
            due = due.min(until.checked_sub(self.extend_takes).unwrap_or(until));
        }
        if let Some(end) = self.hold_until {
            due = due.min(end);
        }
        match self.last_attempt {
            Some(last) => due.max(last + MIN_EXTEND_EVERY),
            None => due,
        }
    }

    /// How long to wait before retrying an extension that failed with
    /// validity left.
    fn retry_every(&self) -> Duration {
        (self.interval / 4).max(MIN_EXTEND_EVERY)
    }

    /// One extension, bounded by the end of the validity: past `max_hold`,
    /// past the validity, or refused by the backend (a quorum says the key
    /// is no longer ours), the lock is lost; any other failure with time
    /// left is retried.
    async fn extend_once(&mut self) -> Extension {
        let started = Instant::now();
        if self.hold_until.is_some_and(|end| started >= end) {
            return Extension::Lost("held longer than max_hold".to_owned());
        }
        let until = self.mutex.until();
        if until.is_some_and(|until| started >= until) {
            return Extension::Lost("the validity ended before an extension".to_owned());
        }
        self.last_attempt = Some(started);
        let extend = self.mutex.extend();
        let extended = match until {
            Some(until) => timeout_at(until, extend).await,
            None => Ok(extend.await),
        };
        self.extend_takes = self.extend_takes.max(started.elapsed());
        match extended {
            Ok(Ok(())) => Extension::Done { started },
            Ok(Err(error @ Error::NotAcquired)) => Extension::Lost(error.to_string()),
            Ok(Err(error)) if until.is_none_or(|until| Instant::now() < until) => {
                Extension::Retry(error.to_string())
            }
            Ok(Err(error)) => Extension::Lost(format!("{error}, and the validity ended")),
            Err(_) => Extension::Lost("the validity ended during an extension".to_owned()),
        }
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
        let unlocked = match catch_unwind(AssertUnwindSafe(|| {
            self.mutex.try_unlock_now(crate::FastPath::new())
        })) {
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
