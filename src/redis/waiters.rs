//! The waiters of one process for one name: their order, the process's
//! place in the nodes' wait queue, and their wake-up signal.
//!
//! Waiters of a `RedisSync` line up per name, first come first served, and
//! only the first of them talks to the nodes. Across processes, each node
//! keeps a wait queue per name with one entry per waiting process, ordered
//! by when that process's first waiter started waiting; the acquire script
//! lets nobody else take a free lock while a process waits ahead of them,
//! and a release wakes the process first in line, on its own channel. So
//! waiters are served in the order they started waiting, across processes
//! (by their clocks: processes whose clocks disagree by `d` are ordered as
//! if the later clock's waiters had started `d` later).
//!
//! When a process acquires the lock while more of its waiters wait, the
//! acquisition keeps the process's entry in line with the next waiter's
//! start, and that waiter waits for its wake-up before its first attempt:
//! a steady stream of waiters costs one acquire and one release per
//! acquisition on each node, no more.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use futures_util::future::join_all;
use tokio::sync::Notify;

use super::RedisState;
use super::keys::Keys;
use super::node::Lineup;
use crate::local_queue::{Place, Turn};
use crate::options::DistMutexOptions;

/// What the waiters of one process share for one name.
#[derive(Default)]
pub(crate) struct NameState {
    /// Woken by a release message addressed to this process for this name.
    wake: Notify,
    line: Mutex<Line>,
}

#[derive(Default)]
struct Line {
    /// Waiters in arrival order: ticket and start (ms since the epoch).
    waiting: VecDeque<(u64, u64)>,
    next_ticket: u64,
    /// The start this process's entry in the nodes' wait queues may carry.
    advertised: Option<u64>,
    /// The waiter whose start an acquisition put in the queues: it waits
    /// for its wake-up before its first attempt.
    reserved_for: Option<u64>,
    /// The nonce of the last release signalled: every node announces a
    /// release with the same one, and it must wake one waiter, not one per
    /// node...
    last_release: Option<u64>,
    /// ...unless an attempt started since that wake: it may have reached
    /// some nodes before the release did, and a later node's announcement
    /// of the same release is then news.
    tried: bool,
}

impl NameState {
    fn line(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether no waiter of this process waits for the name.
    pub(crate) fn is_idle(&self) -> bool {
        self.line().waiting.is_empty()
    }

    /// A release (or a departure from the queue) with `nonce` was announced
    /// to this process: wake the first waiter, once per nonce.
    pub(crate) fn announced(&self, nonce: u64) {
        let mut line = self.line();
        if line.last_release != Some(nonce) || line.tried {
            line.last_release = Some(nonce);
            line.tried = false;
            self.wake.notify_one();
        }
    }
}

/// One `lock()` call that may wait: its place in the process's line for
/// the name. Dropped, it leaves the line, and takes the process out of the
/// nodes' queues if it was the last waiter and the process may be queued.
pub(crate) struct Waiter {
    place: Place<NameState>,
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
        let ticket = {
            let mut line = place.shared().line();
            let ticket = line.next_ticket;
            line.next_ticket += 1;
            line.waiting.push_back((ticket, start));
            ticket
        };
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
    pub(crate) async fn turn(&self, options: &DistMutexOptions) -> Option<Turn<NameState>> {
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
        let mut line = self.place.shared().line();
        if line.reserved_for == Some(self.ticket) {
            line.reserved_for = None;
            true
        } else {
            false
        }
    }

    /// What the next attempt tells the nodes' queues. From now on the
    /// process may be queued with this waiter's start.
    pub(crate) fn lineup(&self, lease: Duration) -> Lineup {
        let mut line = self.place.shared().line();
        line.advertised = Some(self.start);
        line.tried = true;
        Lineup {
            client: self.shared.client_id.clone(),
            start: self.start,
            lease: u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1),
            next: line
                .waiting
                .iter()
                .find(|(ticket, _)| *ticket != self.ticket)
                .map(|(_, start)| *start),
        }
    }

    /// An attempt told with `lineup` acquired the lock.
    pub(crate) fn acquired(&mut self, lineup: &Lineup) {
        let state = self.place.shared();
        let mut line = state.line();
        line.advertised = lineup.next;
        line.reserved_for = lineup.next.and_then(|next| {
            line.waiting
                .iter()
                .find(|(ticket, start)| *ticket != self.ticket && *start == next)
                .map(|(ticket, _)| *ticket)
        });
        // A wake that arrived for this waiter is used up.
        let _ = state.wake.notified().now_or_never();
        self.woken = false;
    }

    /// Waits for a wake-up of this process for the name, at most `timeout`.
    pub(crate) async fn wait(&mut self, timeout: Duration) {
        let wake = &self.place.shared().wake;
        self.woken = tokio::time::timeout(timeout, wake.notified()).await.is_ok();
    }

    /// The attempt after a wake is over: the wake was used.
    pub(crate) fn settled(&mut self) {
        self.woken = false;
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let state = self.place.shared();
        let leave = {
            let mut line = state.line();
            line.waiting.retain(|(ticket, _)| *ticket != self.ticket);
            if line.reserved_for == Some(self.ticket) {
                line.reserved_for = None;
            }
            if line.waiting.is_empty() {
                line.advertised.take()
            } else {
                None
            }
        };
        if self.woken {
            state.wake.notify_one();
        }
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
