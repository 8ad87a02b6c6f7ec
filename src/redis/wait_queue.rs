//! This process's side of the nodes' wait queue (`lua/wait_queue.lua`):
//! a lock call's place in the process's line for a name, the entry its
//! attempts put in the nodes' queues, and the process leaving them. How
//! the queue makes waiting fair is on
//! [`RedisSync`](crate::RedisSync#waiting-is-fair).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;

use super::keys::Keys;
use super::local_waiters::LocalWaiters;
use super::node::QueueEntry;
use super::state::RedisState;
use crate::local_queue::{Place, Turn};
use crate::options::DistMutexOptions;

/// One `lock()` call that may wait: its place in the process's line for
/// the name. Dropped, it leaves the line, and takes the process out of the
/// nodes' queues if it was the last waiter and the process may be queued.
pub(crate) struct Waiter {
    place: Place<LocalWaiters>,
    shared: Arc<RedisState>,
    keys: Arc<Keys>,
    ticket: u64,
    start: u64,
    /// The per-node timeout, for leaving the queues.
    timeout: Duration,
    /// Woken and not yet done with it: if the waiter goes away now, the
    /// wake passes to the next one.
    woken: bool,
}

impl Waiter {
    /// Joins the process's line for the name at `keys`; `timeout` bounds
    /// each node's command when it leaves the queues.
    pub(crate) fn join(shared: &Arc<RedisState>, keys: &Arc<Keys>, timeout: Duration) -> Self {
        let place = shared.queues.join(keys.lock.clone());
        let now = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(u64::MAX);
        // Strictly increasing within the process, so that a departure
        // (which removes the entry only up to its own start) never removes
        // the entry of a later waiter.
        let start = shared
            .last_start
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                Some(now.max(last + 1))
            })
            .map_or(now, |last| now.max(last + 1));
        let ticket = place.shared().enter(start);
        Waiter {
            place,
            shared: shared.clone(),
            keys: keys.clone(),
            ticket,
            start,
            timeout,
            woken: false,
        }
    }

    /// Waits for this waiter's turn (FIFO), at most as long as its own
    /// tries could take ([`DistMutexOptions::longest_wait`]), summed try
    /// by try while it waits, so that a turn that comes early never pays
    /// for the sum of many tries.
    pub(crate) async fn turn(&self, options: &DistMutexOptions) -> Option<Turn<LocalWaiters>> {
        if let Some(turn) = self.place.try_turn() {
            return Some(turn);
        }
        let mut wait = std::pin::pin!(self.place.wait());
        let mut deadline = tokio::time::Instant::now();
        for try_number in 1..=options.tries() {
            let Some(next) = deadline.checked_add(options.try_slot(try_number)) else {
                // A slot beyond the clock's range (a retry delay of
                // `Duration::MAX`): no bound but the turn itself, which
                // comes when the caller ahead ends its own tries.
                return Some(wait.as_mut().await);
            };
            deadline = next;
            if let Ok(turn) = tokio::time::timeout_at(deadline, wait.as_mut()).await {
                return Some(turn);
            }
        }
        None
    }

    /// Whether an acquisition of this process put this waiter's start in
    /// the nodes' queues: it then waits for its wake-up first.
    pub(crate) fn take_reservation(&self) -> bool {
        self.place.shared().take_reservation(self.ticket)
    }

    /// What the next attempt tells the nodes' queues. From now on the
    /// process may be queued with this waiter's start.
    pub(crate) fn queue_entry(&self, entry_ttl: Duration) -> QueueEntry {
        let next = self.place.shared().advertise(self.ticket, self.start);
        QueueEntry {
            client: self.shared.client_id.clone(),
            start: self.start,
            ttl: u64::try_from(entry_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            next,
        }
    }

    /// An attempt told with `entry` acquired the lock.
    pub(crate) fn acquired(&mut self, entry: &QueueEntry) {
        self.place.shared().acquired(self.ticket, entry.next);
        self.woken = false;
    }

    /// Waits for a wake-up of this process for the name, at most `timeout`.
    pub(crate) async fn wait(&mut self, timeout: Duration) {
        self.woken = self.place.shared().wait(timeout).await;
    }

    /// The attempt after a wake is over: the wake was used.
    pub(crate) fn settled(&mut self) {
        self.woken = false;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if let Some(start) = self.place.shared().leave(self.ticket, self.woken) {
            leave_queues(&self.shared, &self.keys, start, self.timeout);
        }
    }
}

/// Takes this process out of the name's queue on every node, in the
/// background, unless a later waiter of it renewed the entry.
pub(crate) fn leave_queues(
    shared: &Arc<RedisState>,
    keys: &Arc<Keys>,
    start: u64,
    timeout: Duration,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let (shared, keys) = (shared.clone(), keys.clone());
    runtime.spawn(async move {
        leave_nodes(&shared, &keys, start, timeout, 0..shared.nodes.len()).await;
    });
}

/// Takes this process out of the name's queue on `nodes` (indices), unless
/// a later waiter of it renewed the entry there.
pub(crate) async fn leave_nodes(
    shared: &RedisState,
    keys: &Arc<Keys>,
    start: u64,
    timeout: Duration,
    nodes: impl IntoIterator<Item = usize>,
) {
    let announce = (keys.wake.clone(), rand::random::<u64>());
    join_all(nodes.into_iter().map(|i| {
        shared.nodes[i].leave(
            keys.clone(),
            shared.client_id.clone(),
            start,
            announce.clone(),
            timeout,
        )
    }))
    .await;
}
