//! `HeldLock`, what the inner service sees of the lock its request holds,
//! and [`LockView`], the part of a lease it reads.

use std::fmt;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tokio::sync::Notify;
use tokio::time::Instant;

/// The lock a request holds, found in the request's extensions by the inner
/// service.
///
/// Cheap to clone. [`lost`](Self::lost) lets a handler stop its work when
/// the lock can no longer be trusted; [`fencing_token`](Self::fencing_token)
/// lets the resource refuse writes from a holder whose lock has expired.
///
/// ```
/// use tower_dsync::layer::HeldLock;
///
/// async fn handler(request: http::Request<String>) -> http::Response<String> {
///     let Some(lock) = request.extensions().get::<HeldLock>().cloned() else {
///         return http::Response::new("no key, not locked".into());
///     };
///     tokio::select! {
///         done = do_the_work(lock.name()) => http::Response::new(done),
///         () = lock.lost() => http::Response::new("stopped: the lock was lost".into()),
///     }
/// }
/// # async fn do_the_work(_: &str) -> String { String::new() }
/// ```
#[derive(Clone)]
pub struct HeldLock {
    lease: Arc<dyn ViewSource>,
}

/// What shows a [`LockView`]: the state of a held lock (its lease),
/// whatever the backend.
pub(crate) trait ViewSource: Send + Sync + 'static {
    /// The part the handler sees.
    fn view(&self) -> &LockView;
}

/// What can be seen of a held lock: fixed facts, and a status that the
/// extend loop and the release change.
pub(crate) struct LockView {
    name: Arc<str>,
    value: Arc<str>,
    token: Option<u64>,
    status: Mutex<Status>,
    /// Told of every change of `lost` or `released`.
    changed: Notify,
    /// Set once work was registered for the release to wait for (see
    /// [`LockView::release_after`]): a release without any reads no lock.
    has_after: AtomicBool,
}

/// What changes while the lock is held.
#[derive(Debug)]
struct Status {
    until: Option<Instant>,
    lost: bool,
    released: bool,
    /// Set once [`HeldLock::lost`] waits: changes are then announced.
    watched: bool,
    /// With the abort option: the response future or body to wake when the
    /// lock is lost.
    on_lost: Option<Waker>,
    /// What the release waits for, if anything (see
    /// [`LockView::release_after`]).
    release_after: Option<After>,
}

/// Work that a lock's release waits for, in [`Status`].
struct After(AfterFuture);

impl fmt::Debug for After {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("After")
    }
}

/// Work that a lock's release waits for.
pub(crate) type AfterFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

impl LockView {
    pub(crate) fn new(
        name: Arc<str>,
        value: Arc<str>,
        token: Option<u64>,
        until: Option<Instant>,
    ) -> Self {
        LockView {
            name,
            value,
            token,
            status: Mutex::new(Status {
                until,
                lost: false,
                released: false,
                watched: false,
                on_lost: None,
                release_after: None,
            }),
            changed: Notify::new(),
            has_after: AtomicBool::new(false),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    fn status(&self) -> MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a successful extension.
    pub(crate) fn set_until(&self, until: Option<Instant>) {
        self.status().until = until;
    }

    /// Records that the lock can no longer be trusted, and tells whoever
    /// waits for that.
    pub(crate) fn set_lost(&self) {
        let (waker, watched) = {
            let mut status = self.status();
            status.lost = true;
            (status.on_lost.take(), status.watched)
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        if watched {
            self.changed.notify_waiters();
        }
    }

    /// Records that the request no longer holds the lock.
    pub(crate) fn set_released(&self) {
        let watched = {
            let mut status = self.status();
            status.released = true;
            status.watched
        };
        if watched {
            self.changed.notify_waiters();
        }
    }

    /// Makes the release of the lock wait until `work` is done: an
    /// idempotency record written under the lock, which must not be
    /// released before it, whether or not the response is still polled.
    pub(crate) fn release_after(&self, work: AfterFuture) {
        self.status().release_after = Some(After(work));
        self.has_after.store(true, Ordering::Release);
    }

    /// What the release must wait for, taken.
    pub(crate) fn take_release_after(&self) -> Option<AfterFuture> {
        if !self.has_after.load(Ordering::Acquire) {
            return None;
        }
        self.status().release_after.take().map(|after| after.0)
    }

    /// Ready once the lock is lost; until then, `cx` is woken when it is.
    /// One listener at a time (the response future, then its body).
    pub(crate) fn poll_lost(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut status = self.status();
        if status.lost {
            return Poll::Ready(());
        }
        match &mut status.on_lost {
            Some(waker) => waker.clone_from(cx.waker()),
            slot @ None => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let view = self.lease.view();
        let status = view.status();
        f.debug_struct("HeldLock")
            .field("name", &view.name)
            .field("fencing_token", &view.token)
            .field("until", &status.until)
            .field("lost", &status.lost)
            .field("released", &status.released)
            .finish_non_exhaustive()
    }
}

impl HeldLock {
    /// The view of `lease`.
    pub(crate) fn new(lease: Arc<dyn ViewSource>) -> Self {
        HeldLock { lease }
    }

    fn view(&self) -> &LockView {
        self.lease.view()
    }

    /// The lock's full name: `namespace + separator + key`.
    pub fn name(&self) -> &str {
        &self.view().name
    }

    /// See [`LockView::release_after`].
    pub(crate) fn release_after(&self, work: AfterFuture) {
        self.view().release_after(work);
    }

    /// The random value that owns the lock.
    pub fn value(&self) -> &str {
        &self.view().value
    }

    /// The fencing token of this acquisition, when the backend gives one.
    pub fn fencing_token(&self) -> Option<u64> {
        self.view().token
    }

    /// The end of the lock's validity; moves forward with every extension.
    pub fn until(&self) -> Option<Instant> {
        self.view().status().until
    }

    /// True once the lock is lost: its validity ended without a successful
    /// extension, the backend refused an extension, or `max_hold` passed.
    /// The lock may have expired or been taken over, and the protected
    /// work should stop.
    pub fn is_lost(&self) -> bool {
        self.view().status().lost
    }

    /// True once the lock is no longer held by this request: lost, or
    /// released after the response.
    pub fn is_released(&self) -> bool {
        let status = self.view().status();
        status.lost || status.released
    }

    /// Resolves as soon as the lock is no longer held by this request: it
    /// was lost ([`is_lost`](Self::is_lost)), or the request ended
    /// and the lock was released.
    pub async fn lost(&self) {
        let view = self.view();
        loop {
            // Registered before the check, so that no change slips between.
            let mut changed = pin!(view.changed.notified());
            changed.as_mut().enable();
            {
                let mut status = view.status();
                if status.lost || status.released {
                    return;
                }
                // Under the same lock as the change: either the change is
                // seen above, or it is announced to `changed`.
                status.watched = true;
            }
            changed.await;
        }
    }
}
