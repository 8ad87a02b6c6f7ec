//! A one-shot Tokio timer that wakes a given waker at a deadline, from the
//! runtime's time driver, unless it is cancelled first: what starts a held
//! lock's extend loop when the first extension falls due.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Waker};

use tokio::time::{Instant, Sleep, sleep_until};

/// A one-shot timer, armed at most once.
pub(crate) struct Alarm {
    /// Boxed: the timer stays in place while the alarm moves.
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Alarm {
    pub(crate) fn new() -> Self {
        Alarm { sleep: None }
    }

    /// Wakes `waker` at `deadline`, from the runtime's time driver. True if
    /// the deadline has passed already: then nothing is armed, and the
    /// caller acts at once. Call it within a Tokio runtime with timers.
    pub(crate) fn arm(&mut self, deadline: Instant, waker: &Waker) -> bool {
        let sleep = self.sleep.insert(Box::pin(sleep_until(deadline)));
        // Unconstrained: with the task's budget spent, the poll would wake
        // the waker at once instead of registering the timer.
        let mut first = tokio::task::unconstrained(sleep.as_mut());
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
        self.sleep = None;
    }
}
