//! This process's side of the nodes' wait queue (`lua/wait_queue.lua`):
//! a lock call's place in the process's line for a name and in the
//! process's list of waiters for its key, the entry its attempts put in
//! the nodes' queues, and the process leaving them. How
//! the queue makes waiting fair is on
//! [`RedisSync`](crate::RedisSync#waiting-is-fair).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;

use super::keys::Keys;
use super::local_waiters::LocalWaiters;
use super::node::{QueueEntry, millis};
use super::state::RedisState;
use crate::hashed::HashedName;
use crate::local_queue::{Place, Turn};
use crate::options::DistMutexOptions;

/// One `lock()` call that may wait: its place in the process's line for
/// the name, and in the process's list of waiters for the key. Dropped, it
/// leaves both, and takes the process out of the nodes' queues if it was
/// the last waiter and the process may be queued.
pub(crate) struct Waiter {
    /// Its place in the line; `None` when its caller holds the name's turn
    /// already (a request of a layer over this backend, which waited its
    /// turn in the same line).
    place: Option<Place>,
    /// The process's waiters for the key, and the key as listed.
    list: Arc<LocalWaiters>,
    listed_as: HashedName,
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
    /// Joins the process's line for `name`, unless the caller holds its
    /// turn already (`in_turn`), and the waiters of its key at `keys`;
    /// `timeout` bounds each node's command when it leaves the queues.
    pub(crate) fn join(
        shared: &Arc<RedisState>,
        name: &Arc<str>,
        keys: &Arc<Keys>,
        in_turn: bool,
        timeout: Duration,
    ) -> Self {
        let place = (!in_turn).then(|| shared.line.join(name.clone()));
        let (listed_as, list) = shared.waiters.join(keys.lock.clone());
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
        let ticket = list.enter(start);
        Waiter {
            place,
            list,
            listed_as,
            shared: shared.clone(),
            keys: keys.clone(),
            ticket,
            start,
            timeout,
            woken: false,
        }
    }

    /// Its place in the process's line, unless its caller holds the
    /// name's turn already.
    pub(crate) fn place(&self) -> Option<&Place> {
        self.place.as_ref()
    }

    /// Whether an acquisition of this process put this waiter's start in
    /// the nodes' queues: it then waits for its wake-up first.
    pub(crate) fn take_reservation(&self) -> bool {
        self.list.take_reservation(self.ticket)
    }

    /// What the next attempt tells the nodes' queues. From now on the
    /// process may be queued with this waiter's start.
    pub(crate) fn queue_entry(&self, entry_ttl: Duration) -> QueueEntry {
        let (start, next) = self.list.advertise(self.ticket, self.start);
        QueueEntry {
            client: self.shared.client_id.clone(),
            start,
            ttl: millis(entry_ttl),
            next,
        }
    }

    /// An attempt told with `entry` acquired the lock.
    pub(crate) fn acquired(&mut self, entry: &QueueEntry) {
        self.list.acquired(self.ticket, entry.next);
        self.woken = false;
    }

    /// Waits for a wake-up of this process for the name, at most `timeout`.
    pub(crate) async fn wait(&mut self, timeout: Duration) {
        self.woken = self.list.wait(timeout).await;
    }

    /// The attempt after a wake is over: the wake was used.
    pub(crate) fn settled(&mut self) {
        self.woken = false;
    }

    /// Waits for this waiter's turn in the process's line (FIFO), at most
    /// as long as its own tries could take
    /// ([`DistMutexOptions::longest_wait`]), summed try by try while it
    /// waits, so that a turn that comes early never pays for the sum of
    /// many tries. `None` for a waiter whose caller holds its turn already,
    /// or when the turn did not come in time.
    ///
    /// While a caller of this process holds the lock and keeps the turn (a
    /// layer's request does, until its release), the waiter keeps its
    /// process in the nodes' queues, renewed every half `entry_ttl`: the
    /// release then wakes this process, ahead of other processes' waiters
    /// that started later.
    pub(crate) async fn turn(
        &self,
        options: &DistMutexOptions,
        entry_ttl: Duration,
    ) -> Option<Turn> {
        let place = self.place.as_ref()?;
        if let Some(turn) = place.try_turn() {
            return Some(turn);
        }
        let mut wait = std::pin::pin!(place.wait());
        let now = tokio::time::Instant::now();
        let (mut deadline, mut renew) = (now, now);
        for try_number in 1..=options.tries() {
            // A slot beyond the clock's range (a retry delay of
            // `Duration::MAX`) is bounded by the turn itself, which comes
            // when the caller ahead ends its own tries.
            deadline = deadline
                .checked_add(options.try_slot(try_number))
                .unwrap_or_else(far_future);
            loop {
                let now = tokio::time::Instant::now();
                if now >= renew {
                    if place.hints().remaining().is_some() {
                        self.line_up(entry_ttl);
                    }
                    renew = now + entry_ttl / 2;
                }
                let until = deadline.min(renew);
                if let Ok(turn) = tokio::time::timeout_at(until, wait.as_mut()).await {
                    return Some(turn);
                }
                if until == deadline {
                    break;
                }
            }
        }
        None
    }

    /// Puts the process in the nodes' queues with its earliest waiter's
    /// start, or renews its entry, in the background.
    fn line_up(&self, entry_ttl: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let entry = QueueEntry {
            client: self.shared.client_id.clone(),
            start: self.list.line_up(self.start),
            ttl: millis(entry_ttl),
            next: None,
        };
        let (shared, keys, timeout) = (self.shared.clone(), self.keys.clone(), self.timeout);
        runtime.spawn(async move {
            join_all(
                shared
                    .nodes
                    .iter()
                    .map(|node| node.line_up(keys.clone(), entry.clone(), timeout)),
            )
            .await;
        });
    }
}

/// About 30 years from now, as tokio does for "never".
fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86400 * 365 * 30)
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let leave = self.list.leave(self.ticket, self.woken);
        self.shared.waiters.leave(&self.listed_as);
        if let Some(start) = leave {
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
