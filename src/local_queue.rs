//! The in-process line: one FIFO queue per lock name, where the callers in
//! one process that want the same name wait their turn, so that only the
//! first of them talks to the backend. A name's queue lives exactly as long
//! as some caller uses it. Used by the Tower layer (per request key) and by
//! the Redis backend (per `lock()` call).

use std::collections::hash_map::Entry as MapEntry;
use std::fmt;
use std::future::poll_fn;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use crate::hashed::{HashedMap, HashedName, Hashing};

/// The registry of queues, one per name in use; `T` is what the users of a
/// name share besides the queue itself.
pub(crate) struct LocalQueues<T = ()> {
    /// The queues of the names in use.
    map: Mutex<HashedMap<InUse<T>>>,
    hashing: Hashing,
}

/// A name's queue and how many callers use it.
struct InUse<T> {
    queue: Arc<Queue<T>>,
    users: usize,
}

/// One name's queue: its line, and what the name's users share, in one
/// allocation.
struct Queue<T> {
    line: Mutex<Line>,
    shared: T,
}

/// Whether a name's turn is taken, and whose it is next. Places hold
/// tickets in the order they joined, and the turn goes in ticket order (not
/// the order of the first wait), skipping the places that left: a place
/// costs the line nothing until it waits or leaves out of order.
#[derive(Default)]
struct Line {
    taken: bool,
    /// The ticket of the next place to join.
    next: u64,
    /// The first ticket neither served nor gone: the turn's next taker.
    head: u64,
    /// Tickets after `head` whose places left before their turn.
    gone: Vec<u64>,
    /// The waker of each place that waits, by ticket.
    wakers: Vec<(u64, Waker)>,
}

impl Line {
    /// A ticket for a place that joins.
    fn join(&mut self) -> u64 {
        let ticket = self.next;
        self.next += 1;
        ticket
    }

    /// Whether `ticket` may take the turn now: it is free and `ticket` is
    /// first in line.
    fn is_next(&self, ticket: u64) -> bool {
        !self.taken && self.head == ticket
    }

    /// Takes the turn for `ticket`, first in line.
    fn take(&mut self, ticket: u64) {
        self.taken = true;
        self.forget_waker(ticket);
        self.pass(ticket);
    }

    /// Keeps `waker`, to wake when `ticket` is first in line and the turn
    /// is free. Nothing for a place that has left or been served.
    fn set_waker(&mut self, ticket: u64, waker: &Waker) {
        if ticket < self.head || self.gone.contains(&ticket) {
            return;
        }
        match self.wakers.iter_mut().find(|(t, _)| *t == ticket) {
            Some((_, known)) => known.clone_from(waker),
            None => self.wakers.push((ticket, waker.clone())),
        }
    }

    /// Takes `ticket` out of the line; when that makes another place first
    /// while the turn is free, wakes it.
    fn leave(&mut self, ticket: u64) {
        self.forget_waker(ticket);
        if ticket == self.head {
            self.pass(ticket);
            self.wake_first();
        } else if ticket > self.head && !self.gone.contains(&ticket) {
            self.gone.push(ticket);
        }
    }

    /// Moves the head past `ticket`, and past the places gone after it.
    fn pass(&mut self, ticket: u64) {
        self.head = ticket + 1;
        while let Some(at) = self.gone.iter().position(|t| *t == self.head) {
            self.gone.swap_remove(at);
            self.head += 1;
        }
    }

    fn forget_waker(&mut self, ticket: u64) {
        if let Some(at) = self.wakers.iter().position(|(t, _)| *t == ticket) {
            self.wakers.swap_remove(at);
        }
    }

    /// Wakes the first in line if the turn is free and it waits.
    fn wake_first(&self) {
        if !self.taken
            && let Some((_, waker)) = self.wakers.iter().find(|(t, _)| *t == self.head)
        {
            waker.wake_by_ref();
        }
    }
}

impl<T: Default> Queue<T> {
    fn new() -> Self {
        Queue {
            line: Mutex::default(),
            shared: T::default(),
        }
    }
}

impl<T> Queue<T> {
    fn line(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T> Default for LocalQueues<T> {
    fn default() -> Self {
        LocalQueues {
            map: Mutex::default(),
            hashing: Hashing::default(),
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
        self.names().len()
    }

    /// What the users of `name` share, while anyone uses it.
    pub(crate) fn get(&self, name: &str) -> Option<PerName<T>> {
        let name = self.hashing.name(Arc::from(name));
        let names = self.names();
        names.get(&name).map(|entry| PerName(entry.queue.clone()))
    }

    fn names(&self) -> MutexGuard<'_, HashedMap<InUse<T>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn leave(&self, name: &HashedName) {
        let mut names = self.names();
        if let MapEntry::Occupied(mut entry) = names.entry(name.clone()) {
            entry.get_mut().users -= 1;
            if entry.get().users == 0 {
                entry.remove();
                // A burst of names must not keep its peak capacity for good:
                // shrink once the map is a quarter full, to twice what is in
                // use, so the rehash is paid for by the removals before it.
                let (len, capacity) = (names.len(), names.capacity());
                if capacity > 64 && len * 4 < capacity {
                    names.shrink_to(len * 2);
                }
            }
        }
    }
}

impl<T: Default> LocalQueues<T> {
    /// Joins the queue of `name`; the returned place then waits for its
    /// turn.
    pub(crate) fn join(self: &Arc<Self>, name: Arc<str>) -> Place<T> {
        let name = self.hashing.name(name);
        let mut names = self.names();
        let entry = names.entry(name.clone()).or_insert_with(|| InUse {
            queue: Arc::new(Queue::new()),
            users: 0,
        });
        entry.users += 1;
        let ticket = entry.queue.line().join();
        Place {
            queues: self.clone(),
            name,
            queue: entry.queue.clone(),
            ticket,
        }
    }
}

/// A caller's place in a queue, taken when it joined: places get their
/// turn in the order they joined. A place takes one turn; dropping it
/// leaves the queue.
pub(crate) struct Place<T> {
    queues: Arc<LocalQueues<T>>,
    name: HashedName,
    queue: Arc<Queue<T>>,
    ticket: u64,
}

impl<T> fmt::Debug for Place<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Place")
            .field("name", self.name.name())
            .finish()
    }
}

impl<T> Place<T> {
    /// Waits for this caller's turn (FIFO in the order of `join`); the
    /// turn lasts as long as the returned guard. Cancel-safe: a dropped
    /// wait takes no turn, and leaves the line, so that the turn passes on.
    pub(crate) async fn wait(&self) -> Turn<T> {
        let mut leave = LeaveUnlessServed {
            place: self,
            served: false,
        };
        let turn = poll_fn(|cx| {
            let mut line = self.queue.line();
            if line.is_next(self.ticket) {
                return Poll::Ready(self.take(&mut line));
            }
            line.set_waker(self.ticket, cx.waker());
            Poll::Pending
        })
        .await;
        leave.served = true;
        turn
    }

    /// This caller's turn, if nobody holds it and nobody who joined before
    /// waits for it.
    pub(crate) fn try_turn(&self) -> Option<Turn<T>> {
        let mut line = self.queue.line();
        line.is_next(self.ticket).then(|| self.take(&mut line))
    }

    /// Takes the turn, first in line.
    fn take(&self, line: &mut Line) -> Turn<T> {
        line.take(self.ticket);
        Turn {
            queue: self.queue.clone(),
        }
    }

    /// The name of this queue.
    pub(crate) fn name(&self) -> &Arc<str> {
        self.name.name()
    }

    /// What the users of this name share.
    pub(crate) fn shared(&self) -> &T {
        &self.queue.shared
    }

    /// What the users of this name share, to keep beyond this place.
    pub(crate) fn share(&self) -> PerName<T> {
        PerName(self.queue.clone())
    }
}

impl<T> Drop for Place<T> {
    fn drop(&mut self) {
        self.queue.line().leave(self.ticket);
        self.queues.leave(&self.name);
    }
}

/// Takes a place out of its line when its wait is dropped before its turn.
struct LeaveUnlessServed<'p, T> {
    place: &'p Place<T>,
    served: bool,
}

impl<T> Drop for LeaveUnlessServed<'_, T> {
    fn drop(&mut self) {
        if !self.served {
            self.place.queue.line().leave(self.place.ticket);
        }
    }
}

/// A caller's turn: the next caller in the queue goes when it is dropped.
pub(crate) struct Turn<T> {
    queue: Arc<Queue<T>>,
}

impl<T> fmt::Debug for Turn<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Turn").finish_non_exhaustive()
    }
}

impl<T> Drop for Turn<T> {
    fn drop(&mut self) {
        let mut line = self.queue.line();
        line.taken = false;
        line.wake_first();
    }
}

/// What the users of a name share (see [`Place::share`]).
pub(crate) struct PerName<T>(Arc<Queue<T>>);

impl<T> Deref for PerName<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0.shared
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

    #[tokio::test]
    async fn turns_are_first_come_first_served_and_a_dropped_wait_takes_none() {
        use std::future::Future;
        use std::task::{Context, Waker};

        let mut cx = Context::from_waker(Waker::noop());
        let queues: Arc<LocalQueues> = Arc::default();
        let [a, b, c, d] = ["k"; 4].map(|name| queues.join(name.into()));
        let turn = a.try_turn().expect("free");
        let mut b_waits = Box::pin(b.wait());
        let mut c_waits = Box::pin(c.wait());
        let mut d_waits = Box::pin(d.wait());
        for waits in [&mut b_waits, &mut c_waits, &mut d_waits] {
            assert!(waits.as_mut().poll(&mut cx).is_pending());
        }
        drop(turn);
        assert!(c_waits.as_mut().poll(&mut cx).is_pending(), "b came first");
        let turn = match b_waits.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(turn) => turn,
            std::task::Poll::Pending => panic!("b's turn"),
        };
        // b's turn ends and passes to c, which gives up before it sees it:
        // the turn passes on to d.
        drop(turn);
        drop(c_waits);
        assert!(d_waits.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn turns_go_in_the_order_of_join_not_of_the_first_wait() {
        use std::future::Future;
        use std::task::{Context, Waker};

        let mut cx = Context::from_waker(Waker::noop());
        let queues: Arc<LocalQueues> = Arc::default();
        let holder = queues.join("k".into());
        let turn = holder.try_turn().expect("free");
        let [a, b] = ["k"; 2].map(|name| queues.join(name.into()));
        // b waits first, a has joined first.
        let mut b_waits = Box::pin(b.wait());
        assert!(b_waits.as_mut().poll(&mut cx).is_pending());
        drop(turn);
        assert!(
            b_waits.as_mut().poll(&mut cx).is_pending(),
            "a joined first"
        );
        let late = queues.join("k".into());
        assert!(late.try_turn().is_none(), "a and b joined first");
        let a_turn = match Box::pin(a.wait()).as_mut().poll(&mut cx) {
            std::task::Poll::Ready(turn) => turn,
            std::task::Poll::Pending => panic!("a's turn"),
        };
        drop(a_turn);
        assert!(b_waits.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn places_that_leave_out_of_order_are_skipped() {
        use std::future::Future;
        use std::task::{Context, Waker};

        let mut cx = Context::from_waker(Waker::noop());
        let queues: Arc<LocalQueues> = Arc::default();
        let [holder, a, b, c] = ["k"; 4].map(|name| queues.join(name.into()));
        let turn = holder.try_turn().expect("free");
        let mut c_waits = Box::pin(c.wait());
        assert!(c_waits.as_mut().poll(&mut cx).is_pending());
        // b leaves while a, before it, still waits.
        drop(b);
        drop(turn);
        assert!(c_waits.as_mut().poll(&mut cx).is_pending(), "a is first");
        let a_turn = a.try_turn().expect("a's turn");
        drop(a);
        drop(a_turn);
        assert!(c_waits.as_mut().poll(&mut cx).is_ready(), "b is skipped");
    }

    #[test]
    fn the_map_gives_memory_back_after_a_burst() {
        let queues: Arc<LocalQueues> = Arc::default();
        let burst: Vec<_> = (0..20_000)
            .map(|i| queues.join(i.to_string().into()))
            .collect();
        let peak = queues.names().capacity();
        assert!(peak >= 20_000);
        drop(burst);
        assert_eq!(queues.len(), 0);
        let left = queues.names().capacity();
        assert!(
            left <= 128,
            "capacity {left} of {peak} kept with no name in use"
        );
    }

    #[test]
    fn a_turn_that_outlives_its_place_keeps_its_queue() {
        let queues: Arc<LocalQueues> = Arc::default();
        let c = queues.join("c".into());
        let c_turn = c.try_turn().unwrap();
        drop(c);
        assert_eq!(queues.len(), 0);
        let d = queues.join("d".into());
        assert!(d.try_turn().is_some(), "d has a queue of its own");
        drop(c_turn);
        assert_eq!(queues.len(), 1);
    }
}
