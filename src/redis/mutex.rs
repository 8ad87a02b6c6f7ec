//! `RedisMutex`: the Redlock algorithm over the nodes of a `RedisSync`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::join_all;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::keys::Keys;
use super::local_waiters::LocalWaiters;
use super::node::{AcquireArgs, Claim, Lineup, Node, ReleaseArgs, Undoes};
use super::quorum::Round;
use super::state::RedisState;
use super::waiters::{Waiter, leave_nodes, leave_queues};
use crate::error::{Error, NodeError, Recovering, Result};
use crate::options::DistMutexOptions;
use crate::queue::Turn;
use crate::sync::DistMutex;

/// A mutex of [`RedisSync`](crate::RedisSync).
///
/// `lock` sends `SET key value NX PX expiry` (as a script that also reads
/// the holder's remaining time) to every node at once, each bounded by the
/// per-node timeout `expiry * timeout_factor`, and succeeds when
/// `n / 2 + 1` nodes agreed and validity remains:
/// `expiry - elapsed - drift > 0` with `drift = expiry * drift_factor + 2 ms`.
/// Then `until = start + expiry - elapsed - drift`. A failed attempt, or a
/// `lock()` future dropped mid-attempt, releases what it got in the
/// background. Each attempt uses a fresh value, so such a release can never
/// remove a later attempt's key; with a preset value, the next attempt
/// waits for it instead.
///
/// Callers of `lock` with more than one try line up per name within their
/// `RedisSync`, first come first served, and only the first of them talks
/// to the nodes; a caller waits in line at most as long as its own tries
/// could take ([`DistMutexOptions::longest_wait`]), and then makes its
/// tries once its turn has come, or gives up with `Held` if it has not.
/// Across processes, waiters are served in the order they started, through
/// a wait queue on each node, and woken by the release (see
/// [`RedisSync`](crate::RedisSync#waiting-is-fair)).
///
/// # Fencing tokens
///
/// Each acquisition gets a token greater than every token of an earlier
/// acquisition of the name: the highest counter of the nodes that granted
/// it, written back to a quorum of them when fewer had it. Why:
///
/// - **Counters only grow while a node keeps its state**: an acquisition
///   increments its node's counter, and `FENCE` only raises it.
/// - **A restarted node's counter starts above them**: a node that lost
///   its counter starts it at its clock in microseconds at its next
///   increment, which with Redlock comes one expiry after it came back (it
///   takes no lock before; `FENCE` leaves a missing counter alone).
///   Counters advance by one per acquisition, far slower than a
///   microsecond clock, so every token issued before the restart is below
///   the clocks at that time; as long as the nodes' clocks differ by less
///   than an expiry, and a clock does not go back across a restart, the
///   new counter starts above all of them. (One node has one clock; a
///   cluster's replica is promoted seconds after its master failed.)
/// - **The quorums overlap on a node that saw the earlier token.** Let A
///   get token `t` from a quorum `Q` of granting nodes that vouch for it.
///   On each node `N` of `Q`, the counter reached `t` while A's key was
///   there: after the name's previous key left `N` (A's `SET NX`
///   succeeded), and before A's key left it, since A holds it until
///   `lock()` returns (a `lock()` that fails or is dropped releases it but
///   issues no token), and `lock()` checks the validity after the `FENCE`
///   round, so an acknowledged `FENCE` ran before A's key expired on `N`
///   (within the drift allowance). A later holder B of the name sets its
///   key on `N` only after A's key left it: B's increment there runs after
///   the counter reached `t`, or after `N` lost its state (and started
///   over above `t`), and returns more than `t`. B's granting nodes form a
///   quorum, which shares a node with `Q`, and B's token is the highest
///   they returned: greater than `t`.
/// - **Why a refusing node cannot vouch.** It refused because a key was
///   there, another acquisition's, whose increment on it may have run
///   before A's `FENCE`, and that acquisition may complete its quorum
///   later on nodes A has released. With nodes X, Y, Z: B's attempt takes
///   Y (its counter gives `y`) while its command to X is delayed; A is
///   refused by Y, takes X (`x`) and Z, whose counter is far ahead (`z`),
///   and gets `z`; its `FENCE z` is lost on X and acknowledged by Y and Z;
///   A releases; B's command reaches X (`x + 1`), and B would hold the name
///   with a token below A's. Counted by granting nodes only, A has Z
///   alone, and its `lock()` fails instead. A node that granted the
///   acquisition after the quorum was reached is not counted either (its
///   answer is not known yet), which only makes the rule stricter.
///
/// This holds through any sequence of empty restarts.
/// On a Redis Cluster the counter is the slot's, on one master: it holds
/// through the master restarting empty, and through a failover to a
/// replica that acknowledged the acquisitions
/// ([`wait_replicas`](crate::RedisSyncBuilder::wait_replicas)); a replica
/// that lagged behind has an older counter, which can give a token again. Tokens are
/// large numbers (microseconds since the Unix epoch, plus one per
/// acquisition): compare them, do not count on their size.
///
/// An `extend` that re-creates a lost key keeps the acquisition's token;
/// if another owner took the name meanwhile, that owner's token is higher,
/// and the resource rejects the older one, which is the safe outcome.
///
/// ```no_run
/// use tower_dsync::{DistMutex, DistMutexOptions, DistSync, RedisSync};
///
/// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
/// let sync = RedisSync::new(["redis://127.0.0.1:6379"])?;
/// let mut mutex = sync.new_mutex("reports:daily", DistMutexOptions::default())?;
/// mutex.lock().await?;
/// mutex.unlock().await?;
/// # Ok(()) }
/// ```
pub struct RedisMutex {
    shared: Arc<RedisState>,
    name: String,
    keys: Arc<Keys>,
    options: DistMutexOptions,
    /// Empty until acquired, unless preset.
    value: Arc<str>,
    until: Option<Instant>,
    token: Option<u64>,
    /// Set by a successful `unlock`, cleared by the next `lock`: a released
    /// mutex refuses `extend`, which could otherwise re-create the key
    /// (`set_nx_on_extend`) past the wait queue, with the released
    /// acquisition's token.
    released: bool,
    /// The release of a failed or abandoned attempt, with its value, while
    /// it may still run.
    cleanup: Option<Cleanup>,
    /// The nodes where the last acquisition or extension had not answered
    /// when it was decided: it may still run there (behind another lock's
    /// `WAIT`, say), so the release goes after it, on its connection.
    unanswered: Vec<usize>,
}

impl fmt::Debug for RedisMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisMutex")
            .field("name", &self.name)
            .field("key", &self.keys.lock)
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

impl RedisMutex {
    pub(super) fn new(shared: Arc<RedisState>, name: &str, options: DistMutexOptions) -> Self {
        let keys = Arc::new(shared.keys(name));
        RedisMutex {
            shared,
            name: name.to_owned(),
            keys,
            value: options.value().unwrap_or_default().into(),
            options,
            until: None,
            token: None,
            released: false,
            cleanup: None,
            unanswered: Vec::new(),
        }
    }

    /// The Redis key of this lock: the key prefix followed by the name; on
    /// a Redis Cluster, in braces (`{dsync:a}`), a hash tag.
    ///
    /// ```no_run
    /// # use tower_dsync::{DistMutexOptions, DistSync, RedisSync};
    /// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
    /// let sync = RedisSync::new(["redis://127.0.0.1:6379"])?;
    /// let mutex = sync.new_mutex("a", DistMutexOptions::default())?;
    /// assert_eq!(mutex.key(), "dsync:a");
    /// # Ok(()) }
    /// ```
    pub fn key(&self) -> &str {
        &self.keys.lock
    }
}

impl DistMutex for RedisMutex {
    fn name(&self) -> &str {
        &self.name
    }

    fn value(&self) -> &str {
        &self.value
    }

    fn until(&self) -> Option<Instant> {
        self.until
    }

    fn fencing_token(&self) -> Option<u64> {
        self.token
    }

    async fn lock(&mut self) -> Result<()> {
        let call = LockCall::start(&self.shared, &self.keys, &self.options, &mut self.cleanup);
        let Some(call) = call.await else {
            return Err(Error::Held { remaining: None });
        };
        let acquired = call.run().await?;
        self.unanswered = acquired.unanswered;
        self.value = acquired.value;
        self.until = Some(acquired.until);
        self.token = Some(acquired.token);
        self.released = false;
        Ok(())
    }

    async fn unlock(&mut self) -> Result<()> {
        if self.value.is_empty() {
            return Err(Error::NotAcquired);
        }
        wait_for_cleanup(&mut self.cleanup, &self.value).await;
        // Cleared before the releases go out: whether they are applied or
        // not, this mutex stops counting on the lock (a failed unlock may
        // leave it in place until it expires), so no validity is reported.
        self.until = None;
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        let release = ReleaseArgs {
            keys: self.keys.clone(),
            value: self.value.clone(),
            announce: (self.keys.wake.clone(), rand::random::<u64>()),
            requeue: None,
            timeout,
        };
        let round = Round::start(self.shared.nodes.iter().enumerate().map(|(i, node)| {
            let undoes = if self.unanswered.contains(&i) {
                Undoes::Unanswered
            } else {
                Undoes::Answered
            };
            node.release(&release, undoes)
        }));
        let (deleted, stragglers) = round
            .decide(quorum, self.shared.fail_fast, timeout, |deleted| {
                *deleted == 1
            })
            .await;
        self.cleanup = Cleanup::of(stragglers, &self.value);
        if !deleted? {
            return Err(Error::NotAcquired);
        }
        self.released = true;
        Ok(())
    }

    async fn extend(&mut self) -> Result<()> {
        if self.value.is_empty() || self.released {
            return Err(Error::NotAcquired);
        }
        wait_for_cleanup(&mut self.cleanup, &self.value).await;
        let expiry = self.options.expiry();
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        let start = Instant::now();
        // Only a holder whose validity is still ahead puts its key back on
        // a node that lost it: its quorum still holds the name, and a node
        // that lost its state takes no new lock meanwhile. Past the
        // validity, another owner may hold the name on a quorum.
        let repair = self
            .shared
            .recovery(expiry)
            .filter(|_| self.shared.set_nx_on_extend)
            .filter(|_| self.until.is_some_and(|until| start < until));
        // Until a node answers, the extension may still run there (behind
        // another lock's `WAIT`, say): a release after a dropped `extend()`
        // goes after it.
        self.unanswered = (0..self.shared.nodes.len()).collect();
        let mut round = Round::start(self.shared.nodes.iter().map(|node| {
            node.extend(
                self.keys.clone(),
                self.value.clone(),
                expiry,
                repair,
                timeout,
            )
        }));
        round
            .settle(quorum, self.shared.fail_fast, |extended| *extended == 1)
            .await;
        // An extension answered on a node has run there, after everything
        // sent before it on its connection.
        self.unanswered = round.unanswered_nodes();
        let extended = round.verdict(quorum, timeout);
        let stragglers = match extended {
            // The quorum says the lock is not ours (another holder of the
            // value released it, say): keys re-created where the name was
            // free go again. After a failure with time left they stay: the
            // lock may well be ours, and the next try counts them.
            Ok(false) if repair.is_some() => {
                undo_repairs(round, &self.shared, &self.keys, &self.value, timeout)
            }
            _ => round.finish_in_background(),
        };
        self.cleanup = Cleanup::of(stragglers, &self.value);
        if !extended? {
            return Err(Error::NotAcquired);
        }
        let until = validity_end(&self.options, start).ok_or_else(|| Error::Timeout {
            after: start.elapsed(),
            nodes: Vec::new(),
        })?;
        self.until = Some(until);
        Ok(())
    }

    async fn valid(&self) -> Result<bool> {
        if self.value.is_empty() {
            return Ok(false);
        }
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        let round = Round::start(
            self.shared
                .nodes
                .iter()
                .map(|node| node.get(self.keys.lock.clone(), timeout)),
        );
        let value = &*self.value;
        round
            .decide(quorum, self.shared.fail_fast, timeout, |current| {
                current.as_deref() == Some(value)
            })
            .await
            .0
    }
}

/// One call of [`RedisMutex::lock`]: its place in the process's line, and
/// what its attempts have learned so far.
///
/// Callers that may wait (more than one try) line up per name in this
/// process, first come first served: only the first talks to the nodes,
/// and the process takes its place in the nodes' wait queues. A queued
/// caller waits at most as long as its own tries could take.
struct LockCall<'m> {
    shared: &'m Arc<RedisState>,
    keys: &'m Arc<Keys>,
    options: &'m DistMutexOptions,
    /// The mutex's background release, waited for before each attempt
    /// and replaced by the attempt's own.
    cleanup: &'m mut Option<Cleanup>,
    /// This call's turn in the process's line, held until the call ends
    /// (dropped before the waiter, which then leaves the line).
    _turn: Option<Turn<LocalWaiters>>,
    /// The call's place in the process's line, when it may wait.
    waiter: Option<Waiter>,
    /// The per-node timeout.
    timeout: Duration,
    /// How long the nodes keep this process's entry in their wait queues
    /// without a renewal.
    lease: Duration,
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

/// What a successful [`LockCall`] hands its mutex.
struct Acquired {
    value: Arc<str>,
    until: Instant,
    token: u64,
    /// The nodes that had not answered when the acquisition was decided.
    unanswered: Vec<usize>,
}

impl<'m> LockCall<'m> {
    /// Takes this call's turn in the process's line when it may wait;
    /// `None` when the turn did not come within its own tries' time.
    async fn start(
        shared: &'m Arc<RedisState>,
        keys: &'m Arc<Keys>,
        options: &'m DistMutexOptions,
        cleanup: &'m mut Option<Cleanup>,
    ) -> Option<LockCall<'m>> {
        let timeout = options.node_timeout();
        let waiter = (options.tries() > 1).then(|| Waiter::join(shared, keys, timeout));
        let turn = match &waiter {
            None => None,
            Some(waiter) => Some(waiter.turn(options).await?),
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
            // An entry in the wait queues is kept for one expiry (at most
            // MAX_LEASE) without a renewal; a waiter renews it at least
            // twice as often.
            lease: options.expiry().min(MAX_LEASE),
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
    async fn run(mut self) -> Result<Acquired> {
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
            .min(self.lease / 2);
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
            lineup: self.waiter.as_ref().map(|waiter| waiter.lineup(self.lease)),
            recovery: self.recovery,
            timeout: self.timeout,
        };
        let start = Instant::now();
        let (round, fenced) = self.acquire_on_nodes(&args).await;
        if let Some(waiter) = &mut self.waiter {
            waiter.settled();
        }
        let error = match (fenced, validity_end(self.options, start)) {
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
        if let (Some(waiter), Some(lineup)) = (&mut self.waiter, &args.lineup) {
            waiter.acquired(lineup);
        }
        let unanswered = round.unanswered_nodes();
        let stragglers = settle_acquired(round, self.shared, &args.keys, args.lineup, self.timeout);
        *self.cleanup = Cleanup::of(stragglers, &args.value);
        Acquired {
            value: args.value,
            until,
            token,
            unanswered,
        }
    }

    /// Releases what a failed attempt got, and subscribes to wake-ups when
    /// a waiter was refused without them (then the next attempt goes at
    /// once).
    /// `subscribed`: whether a release announced during the attempt
    /// reached this process.
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
        let requeue = args.lineup.as_ref().filter(|_| tries_left);
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
const MAX_LEASE: Duration = Duration::from_secs(10);

/// `start + expiry - elapsed - drift`, if that is still ahead.
fn validity_end(options: &DistMutexOptions, start: Instant) -> Option<Instant> {
    let elapsed = start.elapsed();
    let validity = options.expiry().checked_sub(elapsed + options.drift())?;
    (!validity.is_zero()).then(|| start + validity)
}

/// The fencing token of an acquisition that reached a quorum: the highest
/// token the nodes that granted it returned, made durable on a quorum of
/// those nodes. See [`Fencing`] for why tokens only grow.
async fn fence(
    shared: &RedisState,
    counter: &Arc<str>,
    fencing: &Fencing,
    timeout: Duration,
) -> Result<Option<u64>> {
    let token = fencing.token;
    let Some(needed) = shared
        .quorum
        .checked_sub(fencing.at_token)
        .filter(|n| *n > 0)
    else {
        return Ok(Some(token));
    };
    // Every node gets the FENCE (it raises a refusing or restarted node's
    // counter too), but only the acknowledgements of nodes that granted
    // the acquisition count.
    let round = Round::start(shared.nodes.iter().enumerate().map(|(node, command)| {
        let counts = fencing.counts(node);
        command
            .fence(counter.clone(), token, timeout)
            .map(move |reply| reply.map(|done| done == 1 && counts))
    }));
    // A late FENCE only raises a counter further: nothing to wait for.
    match round
        .decide(needed, true, timeout, |counts| *counts)
        .await
        .0
    {
        Ok(true) => Ok(Some(token)),
        Ok(false) => Err(Error::Unavailable {
            quorum: shared.quorum,
            failures: Vec::new(),
        }),
        Err(Error::Unavailable { failures, .. }) => Err(Error::Unavailable {
            quorum: shared.quorum,
            failures,
        }),
        Err(error) => Err(error),
    }
}

/// Which nodes vouch for an acquisition's fencing token.
///
/// Each node has one fencing counter (per hash slot on a Redis Cluster),
/// shared by every name. The acquire script increments it when it sets the
/// lock key; a counter that is missing (its node lost its state) starts at
/// the node's clock in microseconds. The token is the highest value that
/// the nodes which granted the acquisition (their `SET NX` succeeded)
/// returned. It counts as issued once a quorum of those granting nodes hold
/// a counter of at least the token: the nodes that returned it, and the
/// others once they acknowledged `FENCE token` (which raises a counter,
/// never lowers it, and leaves a missing one to start at the clock). A node
/// that refused the acquisition never counts, whatever it acknowledges.
/// The argument for why tokens grow is on
/// [`RedisMutex`](RedisMutex#fencing-tokens).
#[derive(Debug, PartialEq, Eq)]
struct Fencing {
    /// The highest token the granting nodes returned.
    token: u64,
    /// How many granting nodes returned it: their counters are at it.
    at_token: usize,
    /// The granting nodes whose counter was below it: each vouches once it
    /// acknowledged `FENCE token`.
    behind: Vec<usize>,
}

impl Fencing {
    /// The fencing of the acquisition whose nodes gave `replies`.
    fn of(replies: &[(usize, Claim)]) -> Fencing {
        let granted = || {
            replies.iter().filter_map(|(node, claim)| match claim {
                Claim::Acquired { token } => Some((*node, *token)),
                Claim::Held { .. } | Claim::Recovering { .. } => None,
            })
        };
        let token = granted().map(|(_, t)| t).max().unwrap_or(0);
        Fencing {
            token,
            at_token: granted().filter(|(_, t)| *t == token).count(),
            behind: granted()
                .filter(|(_, t)| *t < token)
                .map(|(node, _)| node)
                .collect(),
        }
    }

    /// Whether `node`'s acknowledgement of `FENCE token` vouches for the
    /// token: only a granting node below it.
    fn counts(&self, node: usize) -> bool {
        self.behind.contains(&node)
    }

    /// How many nodes vouch for the token once the nodes `acknowledged`
    /// have acknowledged `FENCE token`.
    #[cfg(test)]
    fn vouching(&self, acknowledged: &[usize]) -> usize {
        self.at_token
            + self
                .behind
                .iter()
                .filter(|n| acknowledged.contains(n))
                .count()
    }
}

/// Lets an acquisition's remaining commands finish in the background. A
/// node that refused it (it was late, or another owner's key was still
/// there) queued this process with the waiter's start; with no next waiter
/// to keep it for, that entry must go, or it would hold the line up on
/// that node until its lease ran out. It goes whatever waiters of the
/// process are in line by then (the acquiring one may still be among
/// them): a later waiter's entry carries its own, later start, which the
/// departure leaves alone (see [`LEAVE`](super::scripts::LEAVE)).
fn settle_acquired(
    round: Round<Claim>,
    shared: &Arc<RedisState>,
    keys: &Arc<Keys>,
    lineup: Option<Lineup>,
    timeout: Duration,
) -> Option<JoinHandle<()>> {
    let refused = |claim: &Claim| matches!(claim, Claim::Held { .. });
    let Some(lineup) = lineup.filter(|l| l.next.is_none()) else {
        return round.finish_in_background();
    };
    if round.unanswered() == 0
        && round.failures.is_empty()
        && !round.replies.iter().any(|(_, c)| refused(c))
    {
        return None;
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (shared, keys) = (shared.clone(), keys.clone());
    Some(runtime.spawn(async move {
        let mut queued = Vec::new();
        round
            .drain(|node, answer| {
                // Refused, or no answer (a command that timed out may
                // still have been applied): the entry may be there.
                if answer.is_none_or(refused) {
                    queued.push(node);
                }
            })
            .await;
        if !queued.is_empty() {
            leave_nodes(&shared, &keys, lineup.start, timeout, queued).await;
        }
    }))
}

/// Lets a failed extension's commands finish in the background, and
/// releases the keys it re-created on nodes that kept their state (the
/// name was free there, and the mutex no longer holds it).
fn undo_repairs(
    round: Round<i64>,
    shared: &Arc<RedisState>,
    keys: &Arc<Keys>,
    value: &Arc<str>,
    timeout: Duration,
) -> Option<JoinHandle<()>> {
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let (shared, keys, value) = (shared.clone(), keys.clone(), value.clone());
    Some(runtime.spawn(async move {
        let mut recreated = Vec::new();
        round
            .drain(|node, answer| {
                if answer == Some(&2) {
                    recreated.push(node);
                }
            })
            .await;
        let release = ReleaseArgs {
            announce: (keys.wake.clone(), rand::random::<u64>()),
            keys,
            value,
            requeue: None,
            timeout,
        };
        join_all(
            recreated
                .into_iter()
                .map(|i| shared.nodes[i].release(&release, Undoes::Answered)),
        )
        .await;
    }))
}

/// Commands sent with `value` that finish in the background: a failed or
/// abandoned attempt's release, or the stragglers of an operation that
/// returned once a quorum said yes. The next command with the same value
/// waits for them, so that it reaches each node after them.
struct Cleanup {
    value: Arc<str>,
    /// Resolves once the nodes that had said yes when the attempt ended
    /// have been released (each within the node timeout).
    prompt: Option<oneshot::Receiver<()>>,
    task: JoinHandle<()>,
}

impl Cleanup {
    fn of(task: Option<JoinHandle<()>>, value: &Arc<str>) -> Option<Cleanup> {
        task.map(|task| Cleanup {
            value: value.clone(),
            prompt: None,
            task,
        })
    }
}

/// Waits until a background release has released the nodes that had said
/// yes, so that the next command does not find this mutex's own leftover
/// keys in its way; and, when it could remove keys set with `value` (the
/// same value is about to be used again: a preset value, or a generator that
/// repeats), for the whole release. Then forgets the release unless it must
/// still be waited for. Cancel-safe: the release stays recorded until it
/// has done what is waited for.
async fn wait_for_cleanup(cleanup: &mut Option<Cleanup>, value: &Arc<str>) {
    if let Some(pending) = cleanup {
        if let Some(prompt) = &mut pending.prompt {
            let _ = prompt.await;
            pending.prompt = None;
        }
        if pending.value == *value {
            let _ = (&mut pending.task).await;
        }
        *cleanup = None;
    }
}

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

/// Releases, in the background, the keys a failed or abandoned attempt may
/// have set: on nodes that said yes, on nodes that have not answered yet,
/// and (with a generated value) on nodes that failed, since a command that
/// timed out may still have been applied. Each release runs on its node
/// after the acquisition it undoes: on a node that did not answer, it goes
/// on the acquisition's own connection (see [`Undoes`]). A preset value is
/// not released on failed nodes: the key there may be its rightful owner's.
/// When the attempt queued this process (`lineup`) and its waiter is done
/// (no `requeue`: it gave up or was dropped), or no waiter of the process
/// is left, the process leaves the queues once the attempt's commands are
/// done: the waiter's own departure may have reached a node before the
/// attempt did. (A waiter still in line then is a later one, whose own
/// start the departure leaves alone.)
/// When the waiter tries again (`requeue`), each release puts the process
/// back in line with the waiter's start, since the acquisition took it out
/// on the nodes that said yes (see [`RELEASE`](super::scripts::RELEASE)).
///
/// The nodes that had said yes when the attempt ended are released at
/// once, not after the slowest node has answered: with a node down or
/// paused, that takes the node timeout, and the next attempt (which waits
/// for this prompt part, see [`wait_for_cleanup`]) would find the keys of
/// this one in its way on those nodes, get another minority, and leave
/// that in the way of the one after: a livelock while the node stays down.
fn release_leftovers(
    round: Round<Claim>,
    shared: &Arc<RedisState>,
    args: &AcquireArgs,
    requeue: Option<&Lineup>,
) -> Option<Cleanup> {
    let unsure = !args.preset && !round.failures.is_empty();
    if round.yes == 0 && round.unanswered() == 0 && !unsure {
        return None;
    }
    let runtime = tokio::runtime::Handle::try_current().ok()?;
    let shared = shared.clone();
    let (preset, keys) = (args.preset, args.keys.clone());
    let queued = args.lineup.as_ref().map(|lineup| lineup.start);
    let said_yes: Vec<usize> = round
        .replies
        .iter()
        .filter(|(_, claim)| matches!(claim, Claim::Acquired { .. }))
        .map(|(node, _)| *node)
        .collect();
    // Announced: contenders refused because of these keys may retry.
    // One nonce for both parts: they are one release.
    let release = ReleaseArgs {
        keys: args.keys.clone(),
        value: args.value.clone(),
        announce: (args.keys.wake.clone(), rand::random::<u64>()),
        requeue: requeue.cloned(),
        timeout: args.timeout,
    };
    let (prompt_done, prompt) = oneshot::channel();
    let task = runtime.spawn(async move {
        let release_on = |nodes: Vec<(usize, Undoes)>| {
            join_all(
                nodes
                    .into_iter()
                    .map(|(i, undoes)| shared.nodes[i].release(&release, undoes)),
            )
        };
        let prompt_part = async {
            let answered = said_yes.iter().map(|&i| (i, Undoes::Answered)).collect();
            release_on(answered).await;
            let _ = prompt_done.send(());
        };
        let late_part = async {
            let mut suspects = Vec::new();
            round
                .drain(|node, answer| match answer {
                    Some(Claim::Acquired { .. }) if !said_yes.contains(&node) => {
                        suspects.push((node, Undoes::Answered));
                    }
                    Some(_) => {}
                    // It timed out or failed on the way: it may still run,
                    // so the release goes after it, on its connection.
                    None if !preset => suspects.push((node, Undoes::Unanswered)),
                    None => {}
                })
                .await;
            release_on(suspects).await;
        };
        futures_util::future::join(prompt_part, late_part).await;
        let waiter_done = release.requeue.is_none();
        if let Some(start) = queued
            && (waiter_done || shared.queues.get(&keys.lock).is_none_or(|s| s.is_idle()))
        {
            leave_queues(&shared, &keys, start, release.timeout);
        }
    });
    Some(Cleanup {
        value: args.value.clone(),
        prompt: Some(prompt),
        task,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nodes_that_granted_the_acquisition_vouch_for_its_token() {
        // X granted with 1, Y refused (another acquisition's key was
        // there), Z granted with 11.
        let (x, y, z) = (0, 1, 2);
        let replies = [
            (x, Claim::Acquired { token: 1 }),
            (y, Claim::Held { pttl: 5000 }),
            (z, Claim::Acquired { token: 11 }),
        ];
        let fencing = Fencing::of(&replies);
        assert_eq!(fencing.token, 11);
        assert_eq!(fencing.at_token, 1, "Z is at the token already");
        assert!(fencing.counts(x), "X granted it, below the token");
        assert!(!fencing.counts(y), "Y refused: its FENCE is not ordered");
        assert!(!fencing.counts(z), "Z is counted once, at the token");
        assert!(!fencing.counts(3), "a node that did not answer");
        // The write-back to X is lost; Y and Z acknowledge it: one node
        // vouches, short of a quorum of two.
        assert_eq!(fencing.vouching(&[y, z]), 1);
        assert_eq!(fencing.vouching(&[x]), 2);
    }

    #[test]
    fn a_quorum_at_the_highest_token_needs_no_write_back() {
        let replies = [
            (0, Claim::Acquired { token: 7 }),
            (2, Claim::Acquired { token: 7 }),
            (1, Claim::Held { pttl: -3 }),
        ];
        let fencing = Fencing::of(&replies);
        assert_eq!(
            fencing,
            Fencing {
                token: 7,
                at_token: 2,
                behind: Vec::new(),
            }
        );
        // Counters that disagree: the lower ones must acknowledge.
        let fencing = Fencing::of(&[
            (0, Claim::Acquired { token: 3 }),
            (1, Claim::Acquired { token: 9 }),
            (2, Claim::Acquired { token: 5 }),
        ]);
        assert_eq!((fencing.token, fencing.at_token), (9, 1));
        assert_eq!(fencing.behind, vec![0, 2]);
    }
}
