//! Local FIFO queues, one per lock name: callers in one process that want the
//! same name line up here, first come first served, so that only the first
//! of them talks to the backend. An entry lives exactly as long as some
//! caller uses it. Used by the Tower layer (per request key) and by the
//! Redis backend (per `lock()` call).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::OwnedMutexGuard;

/// The registry of queues, one per name in use; `T` is what the users of a
/// name share besides the queue itself.
pub(crate) struct LocalQueues<T = ()> {
    map: Mutex<HashMap<Arc<str>, Entry<T>>>,
}

/// A name's gate and how many callers use it.
struct Entry<T> {
    gate: Gate<T>,
    users: usize,
}

/// One name's queue: a FIFO async mutex whose guard is the turn.
struct Gate<T> {
    turn: Arc<tokio::sync::Mutex<()>>,
    shared: Arc<T>,
}

impl<T> Clone for Gate<T> {
    fn clone(&self) -> Self {
        Gate {
            turn: self.turn.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<T> Default for LocalQueues<T> {
    fn default() -> Self {
        LocalQueues {
            map: Mutex::default(),
        }
    }
}

impl<T> fmt::Debug for LocalQueues<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalQueues")
            .field("names", &self.len())
            .finish()
    }
}

impl<T> LocalQueues<T> {
    /// The number of names in use.
    pub(crate) fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// What the users of `name` share, while anyone uses it.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<T>> {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(name).map(|entry| entry.gate.shared.clone())
    }

    fn leave(&self, name: &str) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(name) {
            entry.users -= 1;
            if entry.users == 0 {
                map.remove(name);
            }
        }
    }
}

impl<T: Default> LocalQueues<T> {
    /// Joins the queue of `name`; the returned place then waits for its
    /// turn.
    pub(crate) fn join(self: &Arc<Self>, name: Arc<str>) -> Place<T> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(name.clone()).or_insert_with(|| Entry {
            gate: Gate {
                turn: Arc::default(),
                shared: Arc::default(),
            },
            users: 0,
        });
        entry.users += 1;
        Place {
            queues: self.clone(),
            name,
            gate: entry.gate.clone(),
        }
    }
}

/// A caller's place in a queue. Dropping it leaves the queue.
pub(crate) struct Place<T> {
    queues: Arc<LocalQueues<T>>,
    name: Arc<str>,
    gate: Gate<T>,
}

impl<T> fmt::Debug for Place<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Place").field("name", &self.name).finish()
    }
}

impl<T> Place<T> {
    /// Waits for this caller's turn (FIFO); the turn lasts as long as the
    /// returned guard.
    pub(crate) async fn wait(&self) -> OwnedMutexGuard<()> {
        self.gate.turn.clone().lock_owned().await
    }

    /// This caller's turn, if nobody holds it now.
    pub(crate) fn try_turn(&self) -> Option<OwnedMutexGuard<()>> {
        self.gate.turn.clone().try_lock_owned().ok()
    }

    /// What the users of this name share.
    pub(crate) fn shared(&self) -> &Arc<T> {
        &self.gate.shared
    }
}

impl<T> Drop for Place<T> {
    fn drop(&mut self) {
        self.queues.leave(&self.name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_live_while_used() {
        let queues: Arc<LocalQueues> = Arc::default();
        let a = queues.join("k".into());
        let b = queues.join("k".into());
        assert_eq!(queues.len(), 1);
        let turn = a.wait().await;
        drop(a);
        assert_eq!(queues.len(), 1, "b still waits");
        assert!(b.try_turn().is_none());
        drop(turn);
        let _turn = b.wait().await;
        drop(b);
        assert_eq!(queues.len(), 0);
    }
}
