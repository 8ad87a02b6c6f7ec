//! The in-process line: one FIFO queue per lock name, where the callers in
//! one process that want the same name wait their turn, so that only the
//! first of them talks to the backend. A name's queue lives exactly as long
//! as some caller uses it. The Tower layer waits in it per request key;
//! the Redis backend per `lock()` call, and it lends its line to a layer
//! over it, so that a request waits in one line.

use std::fmt;
use std::future::poll_fn;
use std::ops::Deref;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};

use crate::by_name::ByName;
use crate::hashed::HashedName;
use crate::holder_hints::HolderHints;

/// The registry of queues, one per name in use.
#[derive(Default)]
pub(crate) struct LocalQueues {
    queues: ByName<Queue>,
}

/// One name's queue: its line, and what its callers know about the holder
/// of its turn, in one allocation.
#[derive(Default)]
struct Queue {
    line: Mutex<Line>,
    hints: HolderHints,
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

impl Queue {
    fn line(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl fmt::Debug for LocalQueues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalQueues")
            .field("names", &self.len())
            .finish()
    }
}

impl LocalQueues {
    /// The number of names in use.
    pub(crate) fn len(&self) -> usize {
        self.queues.len()
    }

    /// Joins the queue of `name`; the returned place then waits for its
    /// turn.
    pub(crate) fn join(self: &Arc<Self>, name: Arc<str>) -> Place {
        let (name, queue) = self.queues.join(name);
        let ticket = queue.line().join();
        Place {
            queues: self.clone(),
            name,
            queue,
            ticket,
        }
    }
}

/// A caller's place in a queue, taken when it joined: places get their
/// turn in the order they joined. A place takes one turn; dropping it
/// leaves the queue.
pub(crate) struct Place {
    queues: Arc<LocalQueues>,
    name: HashedName,
    queue: Arc<Queue>,
    ticket: u64,
}

impl fmt::Debug for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Place")
            .field("name", self.name.name())
            .finish()
    }
}

impl Place {
    /// Waits for this caller's turn (FIFO in the order of `join`); the
    /// turn lasts as long as the returned guard. Cancel-safe: a dropped
    /// wait takes no turn, and leaves the line, so that the turn passes on.
    pub(crate) async fn wait(&self) -> Turn {
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
    pub(crate) fn try_turn(&self) -> Option<Turn> {
        let mut line = self.queue.line();
        line.is_next(self.ticket).then(|| self.take(&mut line))
    }

    /// Takes the turn, first in line: a new holder, not releasing.
    fn take(&self, line: &mut Line) -> Turn {
        line.take(self.ticket);
        self.queue.hints.turn_started();
        Turn {
            queue: self.queue.clone(),
        }
    }

    /// The name of this queue.
    pub(crate) fn name(&self) -> &Arc<str> {
        self.name.name()
    }

    /// This caller's turn without waiting for a holder that is still
    /// busy with its lock: `None` if one is. A holder that is releasing is
    /// waited for, but only for that release: if the turn then goes to a
    /// caller before this one, `None` at once.
    pub(crate) async fn turn_unless_busy(&self) -> Option<Turn> {
        if let Some(turn) = self.try_turn() {
            return Some(turn);
        }
        // Registered before the check, so that a turn starting between the
        // two is not missed.
        let mut started = pin!(self.hints().turn_starts());
        started.as_mut().enable();
        if !self.hints().is_releasing() {
            return None;
        }
        tokio::select! {
            biased;
            turn = self.wait() => Some(turn),
            () = started => None,
        }
    }

    /// What the callers of this name know about the holder of its turn.
    pub(crate) fn hints(&self) -> &HolderHints {
        &self.queue.hints
    }

    /// The holder hints of this name, to keep beyond this place.
    pub(crate) fn share_hints(&self) -> HintsRef {
        HintsRef(self.queue.clone())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.queue.line().leave(self.ticket);
        self.queues.queues.leave(&self.name);
    }
}

/// Takes a place out of its line when its wait is dropped before its turn.
struct LeaveUnlessServed<'p> {
    place: &'p Place,
    served: bool,
}

impl Drop for LeaveUnlessServed<'_> {
    fn drop(&mut self) {
        if !self.served {
            self.place.queue.line().leave(self.place.ticket);
        }
    }
}

/// A caller's turn: the next caller in the queue goes when it is dropped.
pub(crate) struct Turn {
    queue: Arc<Queue>,
}

impl fmt::Debug for Turn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Turn").finish_non_exhaustive()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut line = self.queue.line();
        line.taken = false;
        line.wake_first();
    }
}

/// A name's holder hints, kept beyond a place (see [`Place::share_hints`]).
pub(crate) struct HintsRef(Arc<Queue>);

impl Deref for HintsRef {
    type Target = HolderHints;

    fn deref(&self) -> &HolderHints {
        &self.0.hints
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
