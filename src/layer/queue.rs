//! The per-key local queue: requests for the same lock name in one process
//! wait here, first come first served, so only one of them at a time talks to
//! the backend. An entry lives exactly as long as some request uses it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

/// One name's queue: a FIFO async mutex whose guard is the turn, and the
/// validity of the current holder's lock, for the `Retry-After` of requests
/// that give up waiting.
#[derive(Clone, Debug, Default)]
struct Gate {
    turn: Arc<tokio::sync::Mutex<()>>,
    holder_until: Arc<Mutex<Option<Instant>>>,
    /// Set when the current holder's request has ended and its lock is
    /// being released.
    releasing: Arc<AtomicBool>,
}

/// The registry of queues, one per name with requests in flight.
#[derive(Default, Debug)]
pub(crate) struct LocalQueues {
    /// Each name's gate (a FIFO async mutex) and how many requests use it.
    map: Mutex<HashMap<Arc<str>, (Gate, usize)>>,
}

impl LocalQueues {
    /// Joins the queue of `name`; the returned place must then
    /// [`wait`](Place::wait) for its turn.
    pub(crate) fn join(self: &Arc<Self>, name: Arc<str>) -> Place {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let (gate, users) = map
            .entry(name.clone())
            .or_insert_with(|| (Gate::default(), 0));
        *users += 1;
        Place {
            queues: self.clone(),
            name,
            gate: gate.clone(),
        }
    }

    /// The number of names with requests in flight.
    pub(crate) fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn leave(&self, name: &str) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, users)) = map.get_mut(name) {
            *users -= 1;
            if *users == 0 {
                map.remove(name);
            }
        }
    }
}

/// A request's place in a queue. Dropping it leaves the queue.
#[derive(Debug)]
pub(crate) struct Place {
    queues: Arc<LocalQueues>,
    name: Arc<str>,
    gate: Gate,
}

impl Place {
    /// Waits for this request's turn (FIFO); the turn lasts as long as the
    /// returned guard.
    pub(crate) async fn wait(&self) -> OwnedMutexGuard<()> {
        self.gate.turn.clone().lock_owned().await
    }

    /// This request's turn without waiting for a holder that is still
    /// serving: `None` if one is. A holder whose request has ended is
    /// waited for, at most `bound`, since its release is under way.
    pub(crate) async fn turn_unless_busy(&self, bound: Duration) -> Option<OwnedMutexGuard<()>> {
        if let Ok(turn) = self.gate.turn.clone().try_lock_owned() {
            return Some(turn);
        }
        if self.gate.releasing.load(Ordering::Acquire) {
            return tokio::time::timeout(bound, self.wait()).await.ok();
        }
        None
    }

    /// Marks the start of a new turn: its holder is not releasing.
    pub(crate) fn start_turn(&self) {
        self.gate.releasing.store(false, Ordering::Release);
    }

    /// The flag that tells waiters this turn's request has ended.
    pub(crate) fn releasing_flag(&self) -> Arc<AtomicBool> {
        self.gate.releasing.clone()
    }

    /// Records the validity of the lock held in this turn (`None` once
    /// released).
    pub(crate) fn set_holder_until(&self, until: Option<Instant>) {
        *self
            .gate
            .holder_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
    }

    /// How long the current local holder's lock is still valid, if known.
    pub(crate) fn holder_remaining(&self) -> Option<Duration> {
        let until = *self
            .gate
            .holder_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        until.map(|until| until.saturating_duration_since(Instant::now()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.queues.leave(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_live_while_used() {
        let queues = Arc::new(LocalQueues::default());
        let a = queues.join("k".into());
        let b = queues.join("k".into());
        assert_eq!(queues.len(), 1);
        let turn = a.wait().await;
        drop(a);
        assert_eq!(queues.len(), 1, "b still waits");
        let mut waiting = Box::pin(b.wait());
        assert!(futures_poll_once(waiting.as_mut()).await.is_none());
        drop(turn);
        let _turn = waiting.await;
        drop(b);
        assert_eq!(queues.len(), 0);
    }

    async fn futures_poll_once<F: std::future::Future + Unpin>(fut: F) -> Option<F::Output> {
        let mut fut = fut;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut fut).poll(cx) {
            std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
            std::task::Poll::Pending => std::task::Poll::Ready(None),
        })
        .await
    }
}
