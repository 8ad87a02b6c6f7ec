//! One call of `RedisMutex::lock`: its turn in this process's line, its
//! attempts on the nodes, and why they failed.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::cleanup::{Cleanup, release_leftovers, settle_acquired, wait_for_cleanup};
use super::fencing::{Fencing, fence};
use super::keys::Keys;
use super::node::{AcquireArgs, Claim, Node};
use super::quorum::Round;
use super::state::RedisState;
use super::wait_queue::Waiter;
use crate::acquisition::{Acquisition, validity_end};
use crate::error::{Error, NodeError, Recovering, Result};
use crate::local_queue::Turn;
use crate::options::DistMutexOptions;

/// One call of [`RedisMutex::lock`](crate::DistMutex::lock): its place in
/// the process's line, and what its attempts have learned so far.
///
/// Callers that may wait (more than one try) line up per name in this
/// process, first come first served: only the first talks to the nodes,
/// and the process takes its place in the nodes' wait queues. A queued
/// caller waits at most as long as its own tries could take. A caller
/// that holds the name's turn already (a layer's request, which waited in
/// the same line) does not line up again.
pub(crate) struct LockCall<'m> {
    shared: &'m Arc<RedisState>,
    keys: &'m Arc<Keys>,
    options: &'m DistMutexOptions,
    /// The mutex's background release, waited for before each attempt
    /// and replaced by the attempt's own.
    cleanup: &'m mut Option<Cleanup>,
    /// This call's turn in the process's line, held until the call ends
    /// (dropped before the waiter, which then leaves the line).
    _turn: Option<Turn>,
    /// The call's place in the process's line, when it may wait.
    waiter: Option<Waiter>,
    /// The per-node timeout.
    timeout: Duration,
    /// How long the nodes keep this process's entry in their wait queues
    /// without a renewal.
    entry_ttl: Duration,
    /// How long a node that lost its state refuses new locks.
    recovery: Option<Duration>,
    /// Attempts made: counted against `tries`.
    made: u32,
    /// The next attempt goes at once and is not counted: a release while
    /// the subscription was being set up is not missed. That happens once
    /// per call (see `subscribe_tried`).
    retry_now: bool,
    /// An earlier acquisition of this process queued this waiter's place:
    /// it waits for its wake-up before its first attempt.
    wait_first: bool,
    /// Whether this call has subscribed to wake-ups once already: with a
    /// node down, the subscriptions are never all in place, and an
    /// uncounted retry after every attempt would poll the nodes without
    /// waiting and without end.
    subscribe_tried: bool,
    /// How long the holder keeps the name, as its nodes told us.
    holder_left: Duration,
    /// Why the last attempt failed.
    last_error: Option<Error>,
}

/// What a [`LockCall`] needs of its mutex.
pub(crate) struct MutexParts<'m> {
    pub(crate) shared: &'m Arc<RedisState>,
    pub(crate) name: &'m Arc<str>,
    pub(crate) keys: &'m Arc<Keys>,
    pub(crate) options: &'m DistMutexOptions,
    /// Its caller holds the name's turn in the process's line.
    pub(crate) in_turn: bool,
}

/// What a successful [`LockCall`] hands its mutex.
pub(crate) struct Acquired {
    pub(crate) acquisition: Acquisition,
    pub(crate) until: Instant,
    /// The nodes that had not answered when the acquisition was decided.
    pub(crate) unanswered: Vec<usize>,
}

impl<'m> LockCall<'m> {
    /// Takes this call's turn in the process's line when it may wait and
    /// its caller does not hold the turn already; `None` when the turn did
    /// not come within its own tries' time.
    pub(crate) async fn start(
        mutex: MutexParts<'m>,
        cleanup: &'m mut Option<Cleanup>,
    ) -> Option<LockCall<'m>> {
        let MutexParts {
            shared,
            name,
            keys,
            options,
            in_turn,
        } = mutex;
        let timeout = options.node_timeout();
        let waiter =
            (options.tries() > 1).then(|| Waiter::join(shared, name, keys, in_turn, timeout));
        // An entry in the wait queues is kept for one expiry (at most
        // MAX_ENTRY_TTL) without a renewal; a waiter renews it at least
        // twice as often.
        let entry_ttl = options.expiry().min(MAX_ENTRY_TTL);
        let turn = match &waiter {
            Some(waiter) if waiter.place().is_some() => {
                Some(waiter.turn(options, entry_ttl).await?)
            }
            _ => None,
        };
        let mut wait_first = waiter.as_ref().is_some_and(Waiter::take_reservation);
        let mut subscribe_tried = false;
        if wait_first && !shared.wakeups.subscribed(keys) {
            // No wake-up could reach this waiter: subscribe, then try at
            // once instead.
            subscribe_tried = true;
            shared.wakeups.subscribe(keys, timeout).await;
            wait_first = false;
        }
        Some(LockCall {
            shared,
            keys,
            options,
            cleanup,
            _turn: turn,
            waiter,
            timeout,
            entry_ttl,
            recovery: shared.recovery(options.expiry()),
            made: 0,
            retry_now: false,
            wait_first,
            subscribe_tried,
            holder_left: Duration::MAX,
            last_error: None,
        })
    }

    /// Makes the call's attempts until one acquires the lock or the tries
    /// are used up.
    pub(crate) async fn run(mut self) -> Result<Acquired> {
        while self.made < self.options.tries() || self.retry_now {
            self.wait_before_attempt().await;
            if let Some(acquired) = self.attempt().await? {
                return Ok(acquired);
            }
        }
        Err(self.last_error.take().expect("tries is at least 1"))
    }

    /// Waits for the retry delay (or a wake-up, or the holder's remaining
    /// time) before every counted attempt but the first, and before the
    /// first when this waiter waits for its wake-up first.
    async fn wait_before_attempt(&mut self) {
        if (self.made == 0 || self.retry_now) && !self.wait_first {
            return;
        }
        let wait = self
            .options
            .delay(self.made.max(1))
            .min(self.holder_left)
            .min(self.entry_ttl / 2);
        match &mut self.waiter {
            Some(waiter) => waiter.wait(wait).await,
            None => tokio::time::sleep(wait).await,
        }
        self.wait_first = false;
    }

    /// One attempt with a fresh value (or the preset one): what it
    /// acquired, or `None` once what it got is released.
    async fn attempt(&mut self) -> Result<Option<Acquired>> {
        self.made += u32::from(!self.retry_now);
        self.retry_now = false;
        let value = self.options.gen_shared_value()?;
        wait_for_cleanup(self.cleanup, &value).await;
        let subscribed = self.shared.wakeups.subscribed(self.keys);
        let args = AcquireArgs {
            keys: self.keys.clone(),
            value,
            preset: self.options.value().is_some(),
            expiry: self.options.expiry(),
            entry: self
                .waiter
                .as_ref()
                .map(|waiter| waiter.queue_entry(self.entry_ttl)),
            recovery: self.recovery,
            timeout: self.timeout,
        };
        let start = Instant::now();
        let (round, fenced) = self.acquire_on_nodes(&args).await;
        if let Some(waiter) = &mut self.waiter {
            waiter.settled();
        }
        let validity = validity_end(start, self.options.validity(), start.elapsed());
        let error = match (fenced, validity) {
            (Ok(Some(token)), Some(until)) => {
                return Ok(Some(self.acquired(round, args, until, token)));
            }
            (Err(error), _) => error,
            _ => acquire_error(
                &round,
                &self.shared.nodes,
                self.shared.quorum,
                self.timeout,
                start.elapsed(),
            ),
        };
        self.after_failure(error, round, &args, subscribed).await;
        Ok(None)
    }

    /// Sends the acquisition to every node and, once a quorum granted it,
    /// fences its token. Dropped meanwhile, it releases what it got.
    async fn acquire_on_nodes(
        &mut self,
        args: &AcquireArgs,
    ) -> (Round<Claim>, Result<Option<u64>>) {
        let quorum = self.shared.quorum;
        let mut attempt = Attempt {
            round: Some(Round::start(
                self.shared.nodes.iter().map(|node| node.acquire(args)),
            )),
            shared: self.shared,
            args,
            cleanup: self.cleanup,
        };
        let claims = attempt.round.as_mut().expect("armed");
        claims
            .settle(quorum, self.shared.fail_fast, |claim| {
                matches!(claim, Claim::Acquired { .. })
            })
            .await;
        // Still armed: dropped during the fencing round, the attempt
        // releases what it got.
        let fencing = (claims.yes >= quorum).then(|| Fencing::of(&claims.replies));
        let fenced = match fencing {
            Some(fencing) => fence(self.shared, &self.keys.node, &fencing, self.timeout).await,
            None => Ok(None),
        };
        (attempt.round.take().expect("armed"), fenced)
    }

    /// The attempt acquired the lock: the process's place in the queues is
    /// settled, and the nodes still to answer finish in the background.
    fn acquired(
        &mut self,
        round: Round<Claim>,
        args: AcquireArgs,
        until: Instant,
        token: u64,
    ) -> Acquired {
        if let (Some(waiter), Some(entry)) = (&mut self.waiter, &args.entry) {
            waiter.acquired(entry);
        }
        let unanswered = round.unanswered_nodes();
        let stragglers = settle_acquired(round, self.shared, &args.keys, args.entry, self.timeout);
        *self.cleanup = Cleanup::of(stragglers, &args.value);
        Acquired {
            acquisition: Acquisition {
                value: args.value,
                token,
            },
            until,
            unanswered,
        }
    }

    /// Releases what a failed attempt got, and subscribes to wake-ups when
    /// a waiter was refused while they could not reach it (`subscribed`
    /// false when the attempt began): then the next attempt goes at once,
    /// so that a release during the subscription is not missed.
    async fn after_failure(
        &mut self,
        error: Error,
        round: Round<Claim>,
        args: &AcquireArgs,
        subscribed: bool,
    ) {
        let tries_left = self.made < self.options.tries();
        self.holder_left = error.retry_after().unwrap_or(Duration::MAX);
        // A waiter that tries again is put back in line where this
        // attempt took it out.
        let requeue = args.entry.as_ref().filter(|_| tries_left);
        *self.cleanup = release_leftovers(round, self.shared, args, requeue);
        let subscribe = self.waiter.is_some()
            && matches!(error, Error::Held { .. })
            && !subscribed
            && !self.subscribe_tried
            && tries_left;
        self.last_error = Some(error);
        if subscribe {
            self.subscribe_tried = true;
            self.shared.wakeups.subscribe(self.keys, self.timeout).await;
            self.retry_now = true;
        }
    }
}

/// The longest a node keeps a waiting process's place in line without a
/// renewal: how long a process that died while first in line can hold the
/// others up.
const MAX_ENTRY_TTL: Duration = Duration::from_secs(10);

/// An acquisition round in flight. Dropped while armed (the `lock()` future
/// was dropped), it releases whatever the round got, in the background.
struct Attempt<'a> {
    round: Option<Round<Claim>>,
    shared: &'a Arc<RedisState>,
    args: &'a AcquireArgs,
    cleanup: &'a mut Option<Cleanup>,
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if let Some(round) = self.round.take() {
            *self.cleanup = release_leftovers(round, self.shared, self.args, None);
        }
    }
}

/// Why an attempt failed: the failed nodes' error when they alone make a
/// quorum impossible; otherwise `Held`, with the time until enough of the
/// held nodes expire for a quorum to be possible.
fn acquire_error(
    round: &Round<Claim>,
    nodes_of: &[Node],
    quorum: usize,
    timeout: Duration,
    elapsed: Duration,
) -> Error {
    if round.yes >= quorum {
        // A quorum, but too late: no validity left.
        return Error::Timeout {
            after: elapsed,
            nodes: Vec::new(),
        };
    }
    let nodes = round.nodes();
    let failed = round.failures.len();
    let recovering: Vec<(usize, Duration)> = round
        .replies
        .iter()
        .filter_map(|(node, claim)| match *claim {
            Claim::Recovering { left, .. } => Some((*node, left)),
            _ => None,
        })
        .collect();
    let mut held: Vec<Option<Duration>> = round
        .replies
        .iter()
        .filter_map(|(_, claim)| match *claim {
            Claim::Acquired { .. } | Claim::Recovering { .. } => None,
            // -1: the key has no expiry; -3: free, but another process
            // waits first (its release wakes us); -2: it vanished meanwhile.
            Claim::Held { pttl: -1 | -3 } => Some(None),
            Claim::Held { pttl } => Some(Some(Duration::from_millis(pttl.max(0) as u64))),
        })
        .collect();
    let unusable = failed + recovering.len();
    if held.is_empty() || unusable + quorum > nodes {
        if recovering.is_empty() {
            return round.failure_error(quorum, timeout);
        }
        // Nodes that lost their state, and those that failed, rule out a
        // quorum: the backend is unavailable until they recover.
        let mut failures: Vec<(usize, NodeError)> = round
            .failures
            .iter()
            .map(|(i, failure)| (*i, failure.clone().into_node_error()))
            .chain(
                recovering
                    .into_iter()
                    .map(|(i, left)| (i, NodeError::new(nodes_of[i].label(), Recovering { left }))),
            )
            .collect();
        failures.sort_by_key(|(i, _)| *i);
        return Error::Unavailable {
            quorum,
            failures: failures.into_iter().map(|(_, e)| e).collect(),
        };
    }
    // Nodes that said yes or did not answer count as free.
    let free = nodes - held.len() - unusable;
    let need = quorum.saturating_sub(free).max(1);
    held.sort_by_key(|left| left.unwrap_or(Duration::MAX));
    Error::Held {
        remaining: held.get(need - 1).copied().flatten(),
    }
}
