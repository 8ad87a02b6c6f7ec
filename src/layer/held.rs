//! `HeldLock`, what the inner service sees of the lock its request holds.

use std::fmt;
use std::sync::Arc;

use tokio::sync::watch;
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
    info: Arc<Info>,
    state: watch::Receiver<State>,
}

struct Info {
    name: String,
    value: String,
    token: Option<u64>,
}

/// What changes while the lock is held.
#[derive(Clone, Copy, Debug)]
pub(crate) struct State {
    pub(crate) until: Option<Instant>,
    pub(crate) lost: bool,
    pub(crate) released: bool,
}

impl fmt::Debug for HeldLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldLock")
            .field("name", &self.info.name)
            .field("fencing_token", &self.info.token)
            .field("state", &*self.state.borrow())
            .finish_non_exhaustive()
    }
}

impl HeldLock {
    /// A new lock view and the sender through which the keeper updates it.
    pub(crate) fn new(
        name: String,
        value: String,
        token: Option<u64>,
        until: Option<Instant>,
    ) -> (HeldLock, watch::Sender<State>) {
        let (tx, rx) = watch::channel(State {
            until,
            lost: false,
            released: false,
        });
        let info = Arc::new(Info { name, value, token });
        (HeldLock { info, state: rx }, tx)
    }

    /// The lock's full name: `namespace + separator + key`.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The random value that owns the lock.
    pub fn value(&self) -> &str {
        &self.info.value
    }

    /// The fencing token of this acquisition, when the backend gives one.
    pub fn fencing_token(&self) -> Option<u64> {
        self.info.token
    }

    /// The end of the lock's validity; moves forward with every extension.
    pub fn until(&self) -> Option<Instant> {
        self.state.borrow().until
    }

    /// True once an extension failed: the lock may have expired or been
    /// taken over, and the protected work should stop.
    pub fn is_lost(&self) -> bool {
        self.state.borrow().lost
    }

    /// True once the lock is no longer held by this request: lost, or
    /// released after the response.
    pub fn is_released(&self) -> bool {
        let state = self.state.borrow();
        state.lost || state.released
    }

    /// Resolves as soon as the lock is no longer held by this request: an
    /// extension failed ([`is_lost`](Self::is_lost)), or the request ended
    /// and the lock was released.
    pub async fn lost(&self) {
        let mut state = self.state.clone();
        let _ = state.wait_for(|s| s.lost || s.released).await;
    }
}
