//! What the callers waiting in a name's in-process line know about the
//! caller whose turn it is: how long its lock is valid, and whether it is
//! letting the lock go.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

/// What the callers of one name know about the holder of its turn. Kept by
/// the name's queue, beside its line.
#[derive(Debug, Default)]
pub(crate) struct HolderHints {
    /// The validity of the holder's lock, for the `Retry-After` of callers
    /// that give up waiting.
    until: Mutex<Option<Instant>>,
    /// Set when the holder is done with the lock and its release is under
    /// way.
    releasing: AtomicBool,
    /// Told when a turn starts after a release.
    started: Notify,
}

impl HolderHints {
    /// Tells waiting callers that the holder is done with its lock and
    /// releasing it.
    pub(crate) fn releasing(&self) {
        self.releasing.store(true, Ordering::Release);
    }

    /// Whether the holder is releasing its lock.
    pub(crate) fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::Acquire)
    }

    /// A new turn starts: its holder is not releasing. Callers that wait
    /// only for the previous holder's release give up.
    pub(crate) fn turn_started(&self) {
        if self.releasing.swap(false, Ordering::AcqRel) {
            self.started.notify_waiters();
        }
    }

    /// Completes when the next turn starts after a release.
    pub(crate) fn turn_starts(&self) -> Notified<'_> {
        self.started.notified()
    }

    /// Records the validity of the lock held in this turn (`None` once
    /// released).
    pub(crate) fn set_until(&self, until: Option<Instant>) {
        *self.until.lock().unwrap_or_else(PoisonError::into_inner) = until;
    }

    /// How long the holder's lock is still valid, if known.
    pub(crate) fn remaining(&self) -> Option<Duration> {
        let until = *self.until.lock().unwrap_or_else(PoisonError::into_inner);
        until.map(|until| until.saturating_duration_since(Instant::now()))
    }
}
