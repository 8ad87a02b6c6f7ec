//! What a mutex knows of its own lock, the same for every backend: the
//! acquisition it holds or held, the validity it counts on, and how that
//! validity is computed.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::options::DistMutexOptions;

/// One acquisition of a lock: the value it was taken with and its fencing
/// token.
#[derive(Debug)]
pub(crate) struct Acquisition {
    pub(crate) value: Arc<str>,
    pub(crate) token: u64,
}

/// A mutex's record of its lock, kept by the backend's mutex type.
#[derive(Debug)]
pub(crate) struct LockRecord {
    /// The `value` option: the value the mutex acts with before its first
    /// acquisition (ownership transfer).
    preset: Option<Arc<str>>,
    /// The current or last acquisition.
    last: Option<Acquisition>,
    /// The end of the validity the mutex counts on: set by `lock` and
    /// `extend`, cleared as `unlock` sends its releases, whether or not
    /// they succeed.
    until: Option<Instant>,
    /// Set by a successful `unlock`, cleared by the next `lock`: a released
    /// mutex refuses `extend`, which could otherwise take the lock back
    /// while another mutex holds the name with the same (preset) value, or
    /// re-create a key the release removed (Redis's `set_nx_on_extend`),
    /// past the wait queue and with the released acquisition's token.
    released: bool,
}

impl LockRecord {
    /// The record of a new mutex with `options`: no acquisition yet.
    pub(crate) fn new(options: &DistMutexOptions) -> Self {
        LockRecord {
            preset: options.value().map(Arc::from),
            last: None,
            until: None,
            released: false,
        }
    }

    /// The value the mutex acts with: the current or last acquisition's,
    /// else the preset one; `None` when there is neither.
    pub(crate) fn shared_value(&self) -> Option<&Arc<str>> {
        match &self.last {
            Some(acquisition) => Some(&acquisition.value),
            None => self.preset.as_ref(),
        }
    }

    /// [`shared_value`](Self::shared_value), or empty: what
    /// [`DistMutex::value`](crate::DistMutex::value) shows.
    pub(crate) fn value(&self) -> &str {
        self.shared_value().map_or("", |value| value)
    }

    /// The end of the validity the mutex counts on.
    pub(crate) fn until(&self) -> Option<Instant> {
        self.until
    }

    /// The fencing token of the current or last acquisition.
    pub(crate) fn token(&self) -> Option<u64> {
        self.last.as_ref().map(|acquisition| acquisition.token)
    }

    /// Whether a successful `unlock` released the lock since the last
    /// `lock`.
    pub(crate) fn is_released(&self) -> bool {
        self.released
    }

    /// `lock` acquired the lock, valid until `until`.
    pub(crate) fn acquired(&mut self, acquisition: Acquisition, until: Instant) {
        self.last = Some(acquisition);
        self.until = Some(until);
        self.released = false;
    }

    /// `extend` moved the validity to `until`.
    pub(crate) fn extended(&mut self, until: Instant) {
        self.until = Some(until);
    }

    /// `unlock` is sending its releases: whatever they do, the mutex no
    /// longer counts on the lock (a failed release may leave it in place
    /// until it expires).
    pub(crate) fn unlocking(&mut self) {
        self.until = None;
    }

    /// `unlock` released the lock.
    pub(crate) fn unlocked(&mut self) {
        self.released = true;
    }
}

/// The end of a lock's validity: what is left of it once the operation
/// that set the lock's expiry took `elapsed` (zero for a backend that sets
/// it at once), counted from the operation's `start`. `validity` is the
/// expiry less the clock drift allowance
/// ([`DistMutexOptions::validity`]), so this is Redlock's
/// `start + expiry - elapsed - drift`; `None` when nothing is left.
pub(crate) fn validity_end(
    start: Instant,
    validity: Duration,
    elapsed: Duration,
) -> Option<Instant> {
    let left = validity.checked_sub(elapsed)?;
    (!left.is_zero()).then(|| start + left)
}
