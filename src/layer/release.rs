//! Letting a held lock go: the guard that the response carries, and the
//! release itself, reported to the handler and to the key's local line.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::{Instant, timeout};

use super::held::{LockView, ViewSource};
use super::meters::Meters;
use super::settings::{OnLost, ReleaseOn};
use crate::error::Error;
use crate::local_queue::{Place, Turn};
use crate::sync::DistMutex;

/// What the guard needs of a held lock's state, whatever the backend.
pub(crate) trait LetGo: ViewSource {
    /// The request no longer needs the lock: release it, at once if nothing
    /// extends it and the backend's unlock is done at once, else in the
    /// background.
    fn let_go(self: Arc<Self>);
}

/// A request's hold on its lock: the response future, then its body,
/// carries it, and dropping it (or [`release`](Self::release)) lets go of
/// the lock (see [`LetGo::let_go`]). It also carries the layer's choices of
/// when to let go and what a lost lock does. The default guard holds
/// nothing (a request without a key, a lock already let go).
#[must_use = "dropping the guard releases the lock"]
#[derive(Default)]
pub(crate) struct ReleaseGuard {
    lease: Option<Arc<dyn LetGo>>,
    release_on: ReleaseOn,
    on_lost: OnLost,
}

impl ReleaseGuard {
    /// The guard of the held lock `lease`.
    pub(crate) fn new(lease: Arc<dyn LetGo>, release_on: ReleaseOn, on_lost: OnLost) -> Self {
        ReleaseGuard {
            lease: Some(lease),
            release_on,
            on_lost,
        }
    }

    /// When the lock is to be let go.
    pub(crate) fn release_on(&self) -> ReleaseOn {
        self.release_on
    }

    /// Whether this guard still holds a lock.
    pub(crate) fn is_held(&self) -> bool {
        self.lease.is_some()
    }

    /// Ready when the request is to be cut short: the layer aborts on a lost
    /// lock ([`OnLost::Abort`]) and this guard's lock is lost. Until then,
    /// `cx` is woken when the lock is lost.
    pub(crate) fn poll_abort(&self, cx: &mut Context<'_>) -> Poll<()> {
        match (&self.lease, self.on_lost) {
            (Some(lease), OnLost::Abort) => lease.view().poll_lost(cx),
            _ => Poll::Pending,
        }
    }

    /// Lets go of the lock now, or, when work was registered to finish
    /// first ([`LockView::release_after`](super::held::LockView::release_after)),
    /// once it is done, in the background.
    pub(crate) fn release(&mut self) {
        let Some(lease) = self.lease.take() else {
            return;
        };
        match (lease.view().take_release_after(), Handle::try_current()) {
            (Some(work), Ok(runtime)) => {
                runtime.spawn(async move {
                    work.await;
                    lease.let_go();
                });
            }
            _ => lease.let_go(),
        }
    }
}

impl fmt::Debug for ReleaseGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseGuard")
            .field("name", &self.lease.as_ref().map(|l| l.view().name()))
            .field("release_on", &self.release_on)
            .field("on_lost", &self.on_lost)
            .finish()
    }
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        self.release();
    }
}

/// The mutex of a held lock, with what the lock keeps from others until it
/// is released: the request's turn in its key's local line, and its count
/// in the layer's held locks.
pub(crate) struct HeldMutex<M> {
    pub(crate) mutex: M,
    /// This request's turn in the local line, passed on after the release.
    turn: Turn,
    pub(crate) place: Place,
    /// The longest a release may take: past the expiry it is moot.
    timeout: Duration,
    /// Counts this lock in the layer's held locks until the release is done
    /// (at once, or at the end of its task, also when the runtime drops the
    /// task unfinished).
    live: Live,
}

impl<M> HeldMutex<M> {
    /// The meters of the layer that holds this lock.
    pub(crate) fn meters(&self) -> &Meters {
        &self.live.meters
    }
}

/// Counts a held lock as live until dropped, in the layer's count and its
/// meters.
pub(crate) struct Live {
    count: Arc<AtomicUsize>,
    pub(crate) meters: Meters,
    /// When the lock was acquired, read only when the meters record it.
    since: Option<Instant>,
}

impl Live {
    /// Counts one more held lock in `count`, acquired after waiting
    /// `waited`.
    pub(crate) fn new(count: Arc<AtomicUsize>, meters: Meters, waited: Duration) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        meters.acquired(waited);
        Live {
            since: meters.is_on().then(Instant::now),
            count,
            meters,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
        if let Some(since) = self.since {
            self.meters.released(since.elapsed());
        }
    }
}

/// How an unlock ended.
enum Unlocked {
    Done(crate::Result<()>),
    TimedOut,
    Panicked,
}

impl<M: DistMutex> HeldMutex<M> {
    /// The lock `mutex` holds, in `turn` of `place`; `timeout` bounds its
    /// release.
    pub(crate) fn new(mutex: M, turn: Turn, place: Place, timeout: Duration, live: Live) -> Self {
        HeldMutex {
            mutex,
            turn,
            place,
            timeout,
            live,
        }
    }

    /// Releases the lock of a request that let go while nothing extends it:
    /// right here if the backend answers at once, else in a task on
    /// `runtime`, so that the response path never waits for the backend.
    pub(crate) fn let_go<L: LetGo>(mut self, lease: &Arc<L>, runtime: &Handle) {
        // Waiting requests learn at once that the release is under way.
        self.place.hints().releasing();
        if self.release_now(lease.view()) {
            // Dropped here: the turn passes on.
            return;
        }
        self.release_later(lease, runtime);
    }

    /// Releases the lock right here, if the backend answers at once
    /// ([`DistMutex::try_unlock_now`]). False if it cannot: the thread
    /// unwinds (a panicking backend would abort the process), or the
    /// backend's answer has to wait.
    fn release_now(&mut self, view: &LockView) -> bool {
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

    /// Releases the lock in a task on `runtime`.
    fn release_later<L: LetGo>(self, lease: &Arc<L>, runtime: &Handle) {
        let lease = lease.clone();
        runtime.spawn(async move { self.release(lease.view(), false).await });
    }

    /// Releases the lock (`lost`: what remains of a lock given up as lost),
    /// reports it, and passes the turn on.
    pub(crate) async fn release(mut self, view: &LockView, lost: bool) {
        let unlocked = match timeout(self.timeout, self.mutex.unlock()).await {
            Ok(result) => Unlocked::Done(result),
            Err(_) => Unlocked::TimedOut,
        };
        let HeldMutex {
            turn, place, live, ..
        } = self;
        report(view, unlocked, lost, &place);
        // The next local request for this name may go now.
        drop(turn);
        drop(place);
        drop(live);
    }
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
    place.hints().set_until(None);
}
