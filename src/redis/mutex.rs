//! `RedisMutex`: the Redlock algorithm over the nodes of a `RedisSync`.

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;

use super::cleanup::{Cleanup, undo_repairs, wait_for_cleanup};
use super::keys::Keys;
use super::lock_call::{LockCall, MutexParts};
use super::node::{ReleaseArgs, Undoes};
use super::quorum::Round;
use super::state::RedisState;
use crate::acquisition::{LockRecord, validity_end};
use crate::error::{Error, Result};
use crate::options::DistMutexOptions;
use crate::sync::DistMutex;
use crate::sync::FastPath;

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
    name: Arc<str>,
    keys: Arc<Keys>,
    /// Its caller holds the name's turn in the process's line (see
    /// the line it lends a layer, `DistSync::local_line`).
    in_turn: bool,
    options: DistMutexOptions,
    record: LockRecord,
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
            .field("until", &self.record.until())
            .finish_non_exhaustive()
    }
}

impl RedisMutex {
    pub(super) fn new(
        shared: Arc<RedisState>,
        name: Arc<str>,
        options: DistMutexOptions,
        in_turn: bool,
    ) -> Self {
        let keys = Arc::new(shared.keys(&name));
        RedisMutex {
            shared,
            name,
            keys,
            in_turn,
            record: LockRecord::new(&options),
            options,
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
        self.record.value()
    }

    fn shared_value(&self, _: FastPath) -> Option<Arc<str>> {
        self.record.shared_value().cloned()
    }

    fn until(&self) -> Option<Instant> {
        self.record.until()
    }

    fn fencing_token(&self) -> Option<u64> {
        self.record.token()
    }

    async fn lock(&mut self) -> Result<()> {
        let mutex = MutexParts {
            shared: &self.shared,
            name: &self.name,
            keys: &self.keys,
            options: &self.options,
            in_turn: self.in_turn,
        };
        let call = LockCall::start(mutex, &mut self.cleanup);
        let Some(call) = call.await else {
            return Err(Error::Held { remaining: None });
        };
        let acquired = call.run().await?;
        self.unanswered = acquired.unanswered;
        self.record.acquired(acquired.acquisition, acquired.until);
        Ok(())
    }

    async fn unlock(&mut self) -> Result<()> {
        let Some(value) = self.record.shared_value().cloned() else {
            return Err(Error::NotAcquired);
        };
        wait_for_cleanup(&mut self.cleanup, &value).await;
        self.record.unlocking();
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        let release = ReleaseArgs {
            keys: self.keys.clone(),
            value: value.clone(),
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
        self.cleanup = Cleanup::of(stragglers, &value);
        if !deleted? {
            return Err(Error::NotAcquired);
        }
        self.record.unlocked();
        Ok(())
    }

    async fn extend(&mut self) -> Result<()> {
        let value = match self.record.shared_value() {
            Some(value) if !self.record.is_released() => value.clone(),
            _ => return Err(Error::NotAcquired),
        };
        wait_for_cleanup(&mut self.cleanup, &value).await;
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
            .filter(|_| self.record.until().is_some_and(|until| start < until));
        // Until a node answers, the extension may still run there (behind
        // another lock's `WAIT`, say): a release after a dropped `extend()`
        // goes after it.
        self.unanswered = (0..self.shared.nodes.len()).collect();
        let mut round =
            Round::start(self.shared.nodes.iter().map(|node| {
                node.extend(self.keys.clone(), value.clone(), expiry, repair, timeout)
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
                undo_repairs(round, &self.shared, &self.keys, &value, timeout)
            }
            _ => round.finish_in_background(),
        };
        self.cleanup = Cleanup::of(stragglers, &value);
        if !extended? {
            return Err(Error::NotAcquired);
        }
        let until =
            validity_end(start, self.options.validity(), start.elapsed()).ok_or_else(|| {
                Error::Timeout {
                    after: start.elapsed(),
                    nodes: Vec::new(),
                }
            })?;
        self.record.extended(until);
        Ok(())
    }

    async fn valid(&self) -> Result<bool> {
        let Some(value) = self.record.shared_value() else {
            return Ok(false);
        };
        let timeout = self.options.node_timeout();
        let quorum = self.shared.quorum;
        let round = Round::start(
            self.shared
                .nodes
                .iter()
                .map(|node| node.get::<String>(self.keys.lock.clone(), timeout)),
        );
        let value = &**value;
        round
            .decide(quorum, self.shared.fail_fast, timeout, |current| {
                current.as_deref() == Some(value)
            })
            .await
            .0
    }
}

#[cfg(test)]
mod tests {
    use crate::sync::FastPath;
    use crate::{DistMutex, DistMutexOptions, DistSync, RedisSync};

    /// The Redis backend never answers at once: callers take the path of
    /// `lock` and `unlock`.
    #[tokio::test]
    async fn a_redis_mutex_never_answers_at_once() {
        // No connection is made before the first command.
        let sync = RedisSync::new(["redis://127.0.0.1:1"]).unwrap();
        let options = DistMutexOptions::default().with_tries(1);
        let mut a = sync.new_mutex("at-once", options.clone()).unwrap();
        let mut b = sync.new_mutex("at-once", options).unwrap();
        assert!(a.try_lock_now(FastPath::new()).is_none());
        assert!(b.try_lock_now(FastPath::new()).is_none());
        assert!(a.try_unlock_now(FastPath::new()).is_none());
    }
}
