//! A one-shot Tokio timer kept in place inside a lease, so that arming it
//! costs no allocation of its own: it wakes a given waker at a deadline,
//! unless it is cancelled first.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Waker};

use tokio::time::{Instant, Sleep, sleep_until};

/// A one-shot timer, armed at most once.
///
/// The [`Sleep`] inside is never moved once armed: it is only ever dropped
/// in place (by [`cancel`](Self::cancel) or with the alarm). Nothing here
/// takes it out of its slot.
pub(crate) struct Alarm {
    sleep: Option<Sleep>,
}

impl Alarm {
    pub(crate) fn new() -> Self {
        Alarm { sleep: None }
    }

    /// Wakes `waker` at `deadline`, from the runtime's time driver. True if
    /// the deadline has passed already: then nothing is armed, and the
    /// caller acts at once. Call it within a Tokio runtime with timers.
    ///
    /// # Safety
    ///
    /// The alarm must stay where it is until it is dropped: it lives in the
    /// heap allocation of an `Arc` that is never unwrapped, in a field that
    /// is never moved out.
    pub(crate) unsafe fn arm(&mut self, deadline: Instant, waker: &Waker) -> bool {
        let sleep = self.sleep.insert(sleep_until(deadline));
        // SAFETY: the caller keeps the alarm in place, and the `Sleep` is
        // never moved out of its slot (see the type's documentation), so it
        // stays at this address until it is dropped.
        let sleep = unsafe { Pin::new_unchecked(sleep) };
        // Unconstrained: with the task's budget spent, the poll would wake
        // the waker at once instead of registering the timer.
        let mut first = tokio::task::unconstrained(sleep);
        let elapsed = Pin::new(&mut first)
            .poll(&mut Context::from_waker(waker))
            .is_ready();
        if elapsed {
            self.sleep = None;
        }
        elapsed
    }

    /// Disarms the alarm: its waker is not woken (unless it is being woken
    /// right now) and is dropped.
    pub(crate) fn cancel(&mut self) {
        // Dropped in place.
        self.sleep = None;
    }
}
