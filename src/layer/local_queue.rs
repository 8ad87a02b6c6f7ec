//! The layer's use of the local queues: per request key, with what waiting
//! requests need to know about the current holder.

use std::pin::pin;
use std::sync::Mutex;
use std::sync::PoisonError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use tokio::time::Instant;

/// A request's place in its key's queue.
pub(crate) type Place = crate::local_queue::Place<HolderHints>;

/// The registry of the layer's queues.
pub(crate) type LocalQueues = crate::local_queue::LocalQueues<HolderHints>;

/// A request's turn for its key.
pub(crate) type Turn = crate::local_queue::Turn<HolderHints>;

/// The holder hints of a key, kept by a held lock's lease.
pub(crate) type HintsRef = crate::local_queue::PerName<HolderHints>;

/// What the requests of one key know about the request that holds it.
#[derive(Debug, Default)]
pub(crate) struct HolderHints {
    /// The validity of its lock, for the `Retry-After` of requests that give
    /// up waiting.
    until: Mutex<Option<Instant>>,
    /// Set when its request has ended and its lock is being released.
    releasing: AtomicBool,
    /// Told when a turn starts after a release.
    started: Notify,
}

impl HolderHints {
    /// Tells waiting requests that the holder's request has ended.
    pub(crate) fn releasing(&self) {
        self.releasing.store(true, Ordering::Release);
    }
}

impl Place {
    /// This request's turn without waiting for a holder that is still
    /// serving: `None` if one is. A holder whose request has ended is
    /// waited for, since its release is under way, but only for that
    /// release: if the turn then goes to a request before this one, `None`
    /// at once.
    pub(crate) async fn turn_unless_busy(&self) -> Option<Turn> {
        if let Some(turn) = self.try_turn() {
            return Some(turn);
        }
        let holder = self.shared();
        // Registered before the check, so that a turn starting between the
        // two is not missed.
        let mut started = pin!(holder.started.notified());
        started.as_mut().enable();
        if !holder.releasing.load(Ordering::Acquire) {
            return None;
        }
        tokio::select! {
            biased;
            turn = self.wait() => Some(turn),
            () = started => None,
        }
    }

    /// Marks the start of a new turn: its holder is not releasing. Requests
    /// that wait only for the previous holder's release give up.
    pub(crate) fn start_turn(&self) {
        let holder = self.shared();
        if holder.releasing.swap(false, Ordering::AcqRel) {
            holder.started.notify_waiters();
        }
    }

    /// Records the validity of the lock held in this turn (`None` once
    /// released).
    pub(crate) fn set_holder_until(&self, until: Option<Instant>) {
        *self
            .shared()
            .until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
    }

    /// How long the current holder's lock is still valid, if known.
    pub(crate) fn holder_remaining(&self) -> Option<Duration> {
        let until = *self
            .shared()
            .until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        until.map(|until| until.saturating_duration_since(Instant::now()))
    }
}
