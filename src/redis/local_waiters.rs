//! This process's waiters for one lock key: the order they came in, the start
//! the process's entry in the nodes' wait queues carries, and the wake-up a
//! release sends them.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::Notify;

use crate::by_name::ByName;

/// This process's waiters of each lock key.
pub(crate) type WaiterLists = ByName<LocalWaiters>;

/// What the waiters of one process share for one lock key.
#[derive(Default)]
pub(crate) struct LocalWaiters {
    /// Woken by a release message addressed to this process for this name.
    wake: Notify,
    list: Mutex<WaitList>,
}

#[derive(Default)]
struct WaitList {
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

impl WaitList {
    /// The earliest of `start` and the starts of the listed waiters: what
    /// the process's entry in the nodes' queues carries.
    fn earliest(&self, start: u64) -> u64 {
        self.waiting.iter().map(|(_, s)| *s).fold(start, u64::min)
    }
}

impl LocalWaiters {
    fn list(&self) -> MutexGuard<'_, WaitList> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether no waiter of this process waits for the name.
    pub(crate) fn is_idle(&self) -> bool {
        self.list().waiting.is_empty()
    }

    /// A release (or a departure from the queue) with `nonce` was announced
    /// to this process: wake the first waiter, once per nonce.
    pub(crate) fn announced(&self, nonce: u64) {
        let mut list = self.list();
        if list.last_release != Some(nonce) || list.tried {
            list.last_release = Some(nonce);
            list.tried = false;
            self.wake.notify_one();
        }
    }

    /// A waiter that started at `start` comes last: its ticket.
    pub(crate) fn enter(&self, start: u64) -> u64 {
        let mut list = self.list();
        let ticket = list.next_ticket;
        list.next_ticket += 1;
        list.waiting.push_back((ticket, start));
        ticket
    }

    /// Whether an acquisition of this process put the start of waiter
    /// `ticket` in the nodes' queues: it then waits for its wake-up first.
    pub(crate) fn take_reservation(&self, ticket: u64) -> bool {
        let mut list = self.list();
        if list.reserved_for == Some(ticket) {
            list.reserved_for = None;
            true
        } else {
            false
        }
    }

    /// Waiter `ticket`, which started at `start`, is about to try: from
    /// now on the process may be queued. Returns the start its entry in
    /// the nodes' queues carries, and the start of the next waiter, if
    /// any.
    ///
    /// The entry carries the earliest start of the process's waiters, not
    /// the trying waiter's: the one that tries is the first in the
    /// process's line, but not always the first to have started (a layer's
    /// request lists itself when it tries, after the waiters that lined up
    /// behind it), and a later start would move the process back behind
    /// other processes' waiters that started in between.
    pub(crate) fn advertise(&self, ticket: u64, start: u64) -> (u64, Option<u64>) {
        let mut list = self.list();
        let earliest = list.earliest(start);
        list.advertised = Some(earliest);
        list.tried = true;
        let next = list
            .waiting
            .iter()
            .find(|(t, _)| *t != ticket)
            .map(|(_, start)| *start);
        (earliest, next)
    }

    /// Waiter `ticket`, which started at `start`, puts the process in the
    /// nodes' queues without trying (it waits behind a holder of this
    /// process): the start the entry carries, the earliest of the
    /// process's waiters.
    pub(crate) fn line_up(&self, start: u64) -> u64 {
        let mut list = self.list();
        let earliest = list.earliest(start);
        list.advertised = Some(earliest);
        earliest
    }

    /// An attempt of waiter `ticket` acquired the lock, and left the
    /// process in the nodes' queues with `next`, the next waiter's start.
    pub(crate) fn acquired(&self, ticket: u64, next: Option<u64>) {
        let mut list = self.list();
        list.advertised = next;
        list.reserved_for = next.and_then(|next| {
            list.waiting
                .iter()
                .find(|(t, start)| *t != ticket && *start == next)
                .map(|(t, _)| *t)
        });
        // A wake that arrived for this waiter is used up.
        let _ = self.wake.notified().now_or_never();
    }

    /// Waits for a wake-up of this process for the name, at most
    /// `timeout`; whether one came.
    pub(crate) async fn wait(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.wake.notified())
            .await
            .is_ok()
    }

    /// Waiter `ticket` leaves; a wake it had not used yet (`woken`) passes
    /// to the next one. When it was the last waiter, returns the start the
    /// process's entry in the nodes' queues may carry: the process leaves
    /// them.
    pub(crate) fn leave(&self, ticket: u64, woken: bool) -> Option<u64> {
        let leave = {
            let mut list = self.list();
            list.waiting.retain(|(t, _)| *t != ticket);
            if list.reserved_for == Some(ticket) {
                list.reserved_for = None;
            }
            if list.waiting.is_empty() {
                list.advertised.take()
            } else {
                None
            }
        };
        if woken {
            self.wake.notify_one();
        }
        leave
    }
}

/// Wakes the waiter of this process for the lock key named in a release
/// message (`nonce key`).
pub(crate) fn deliver(waiters: &WaiterLists, payload: &str) {
    if let Some((nonce, key)) = payload.split_once(' ')
        && let Ok(nonce) = nonce.parse::<u64>()
        && let Some(waiters) = waiters.get(key)
    {
        waiters.announced(nonce);
    }
}
