//! `RedisSync`: locks on one Redis node, Redlock over several independent
//! masters, or a Redis Cluster. The public types and their documentation
//! are here; each part of the algorithm has a file of its own.

mod cleanup;
#[cfg(feature = "cluster")]
mod cluster;
mod conn;
mod connect;
mod fencing;
mod keys;
mod local_waiters;
mod lock_call;
mod mutex;
mod node;
mod quorum;
mod records;
mod scripts;
mod state;
mod wait_queue;
mod wakeups;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use connect::{Setup, invalid};
pub use mutex::RedisMutex;
use node::Node;
use state::RedisState;

use crate::error::Result;
use crate::options::DistMutexOptions;
use crate::records::Records;
use crate::sync::{DistSync, FastPath, LocalLine, validate_name};

/// The Redis backend: [`DistSync`] over one or more independent masters.
///
/// Each node gets one multiplexed connection that reconnects on its own
/// (redis-rs `ConnectionManager`), shared by every mutex, and, once a lock
/// has had to wait, one subscriber connection on this `RedisSync`'s own
/// wake-up channel; none is opened per lock. Connections are made lazily,
/// so a node that is down at start-up is not an error: it is used once it
/// comes back, and locks succeed meanwhile as long as a quorum of the
/// others answers.
///
/// # How many nodes
///
/// - **One node** is simplest and fastest. The lock is as available as that
///   node; if it restarts without persistence, or fails over to a replica
///   that had not yet received the key, a held lock is forgotten.
/// - **Three independent masters** (not replicas of each other) survive one
///   node being down or slow: a lock needs 2 of 3.
/// - **Five** survive two. Redlock needs `n / 2 + 1` nodes for every
///   operation, so more nodes add latency (the slowest node of the quorum)
///   and do not add throughput.
/// - **A Redis Cluster** (feature `cluster`) spreads names over its
///   masters: more throughput, one master per lock. See
///   [Cluster mode](RedisSync#cluster-mode) for what a failover can lose.
///
/// # Safety caveats
///
/// Redlock's guarantee rests on timing assumptions, stated plainly:
///
/// - **Process pauses.** A holder paused longer than the lock's validity (a
///   long GC or a stop-the-world pause, a swapped-out process, a `SIGSTOP`)
///   wakes up believing it still holds a lock that another owner has since
///   taken. Nothing in a lock library can prevent this; check
///   [`valid`](crate::DistMutex::valid) or [`until`](crate::DistMutex::until) before acting, and keep
///   the critical section well inside the validity.
/// - **Clock jumps.** Keys expire by each node's clock. A node whose clock
///   jumps forward (an operator, a bad NTP step) expires keys early and may
///   hand a lock to a second owner. The drift allowance
///   (`expiry * drift_factor + 2 ms`) covers rate differences, not jumps.
/// - **Restarts without persistence.** With Redlock (two or more
///   nodes), a node that restarts empty takes no new lock for an expiry
///   while the holders' extensions put their keys back on it, so nodes may
///   restart empty, at once or one after the other, without a second
///   owner, and holders that extend keep their locks (see
///   [Restarts](RedisSync#restarts)); run the nodes with no persistence
///   or with `appendfsync always`, not from older snapshots. One node, and
///   a Redis Cluster's master, forget their locks when they restart empty
///   (there is no other node to recover from).
/// - **Clocks** also bound fencing tokens through restarts: a node that
///   lost its fencing counter starts it again at its clock (in
///   microseconds) at its next acquisition, one expiry after it came back
///   with Redlock, which is above every token issued before as long as the
///   nodes' clocks differ by less than that, and a node's clock does not
///   go back across its restart.
/// - **For correctness-critical writes, use fencing tokens**: the protected
///   resource rejects a write whose token is not greater than the last one it
///   accepted, so a holder that lost its lock cannot do damage.
///   [`fencing_token`](crate::DistMutex::fencing_token) gives one per
///   acquisition: the node's counter (one per node, or per hash slot on a
///   cluster, not per name), incremented inside the acquire script, and
///   across a Redlock quorum the highest token of the nodes that granted
///   the acquisition, written back to a quorum of those nodes when fewer
///   of them had it (a node that refused the acquisition never counts: its
///   counter is not ordered after the name's previous holder there). The
///   tokens of a name strictly grow through any sequence of empty
///   restarts, under the clock condition above; the argument is on
///   [`RedisMutex`](RedisMutex#fencing-tokens).
///
/// # What the nodes keep
///
/// Per name, only while it is in use: the lock key (it expires), and while
/// processes wait for it, the wait queue and its entries' deadlines (they
/// expire with the last entry, at most 10 s after its last renewal). Per node, one small hash
/// (`<prefix>\x1fnode`: the fencing counter and the restart marker); on a
/// Redis Cluster one per hash slot used (at most 16,384). Nothing else
/// grows with the number of names ever locked: after a million distinct
/// names, each node holds the one key it held after the first.
///
/// # Waiting is fair
///
/// Waiters are served in the order they started waiting, within a process
/// and across processes:
///
/// - Waiters of one `RedisSync` line up per name, first come first served;
///   only the first of them talks to the nodes. A
///   [`DistLockLayer`](crate::DistLockLayer) over it waits in the same
///   line: its requests and the direct callers of `lock` for a name line
///   up together, each request once. A request keeps its turn until its
///   release; a caller that waits behind it keeps its process in the
///   nodes' queues meanwhile, so that the release wakes this process
///   before other processes' later waiters.
/// - Each node keeps a wait queue per name, with one entry per waiting
///   `RedisSync`, ordered by when its first waiter started (a timestamp the
///   process chooses, the same on every node, so that all nodes order
///   waiters alike; processes whose clocks disagree by `d` are ordered as if
///   the later clock's waiters had started `d` later). The acquire script
///   lets nobody else take a free lock while a process waits ahead, and a
///   try that does not wait (one try) does not jump the line.
/// - A release publishes on the wake-up channel of the process first in
///   line, which wakes its first waiter. A waiter also retries after its
///   retry delay or the holder's remaining time, whichever comes first, so
///   a lost message only costs that wait.
/// - An entry is kept for one expiry (the waiter's, at most 10 s) without
///   renewal; every attempt renews it. A process that dies while first in
///   line holds the others up for at most that long, as a holder that dies
///   does. A waiter that gives up or is dropped takes its process out of
///   the line.
/// - When a process acquires the lock while more of its waiters wait, its
///   entry stays in line with the next waiter's start, and that waiter
///   waits for its wake-up before its first attempt: a steady stream of
///   waiters costs one acquire and one release per acquisition on each
///   node.
///
/// The entries and their deadlines are two small keys per name in use
/// (`<key>\x1fqueue`, `<key>\x1fleases`) that vanish when the line empties.
/// The scripts read the node's clock (`TIME`), so Redis 5 or later is
/// needed.
///
/// # Restarts
///
/// Redlock over independent masters keeps its guarantees while nodes are
/// paused, killed, or restarted empty (without persistence), at once or one
/// after the other, any number of times, with locks held and extended for
/// many expiries:
///
/// - **A node that lost its state takes no new lock for an expiry.** Each
///   node keeps a marker (in `<prefix>\x1fnode`); a node without it has
///   restarted empty (or was flushed), and may have forgotten locks that
///   the other nodes still hold. It refuses new locks (an
///   [`Error::Unavailable`](crate::Error::Unavailable) cause, [`Recovering`](crate::Recovering), with
///   the time left) until the longest of the lock's expiry and
///   [`restart_delay`](RedisSyncBuilder::restart_delay) has passed since
///   it was first seen so: the Redlock paper's delayed restart, done by the
///   nodes instead of the operator. A lock that was not extended
///   meanwhile has expired everywhere by then.
/// - **Holders put their keys back.** An extension re-creates the key on a
///   node that lost it ([`set_nx_on_extend`](RedisSyncBuilder::set_nx_on_extend),
///   on by default), as long as the holder's validity is ahead; on a node
///   that is recovering the re-created key counts toward the quorum, so a
///   held lock is back on every node within one extension interval of a
///   restart and its holder keeps it, however many nodes restarted. (On a
///   node that kept its state, a missing key counts only if the holder has
///   a quorum elsewhere: it was released or expired there.) A failed
///   extension is retried within the validity (the layer's extend loop does
///   it).
/// - **Why no second owner.** Let a holder's last acquisition or extension
///   leave its key on a quorum `Q` with validity until `u` (at most one
///   expiry after it started). Another process needs a quorum of nodes that
///   count and have no key for the name; it shares a node `N` with `Q`. If
///   `N` kept its state, the holder's key is there until `u`. If `N` lost
///   its state after the holder's operation, `N` refuses new locks for an
///   expiry from then, which lasts past `u`. Either way, `N` refuses. This
///   needs no bound on how many nodes restart: a node whose locks are gone
///   has lost its marker with them.
/// - **A new deployment** starts with no marker on any node, and cannot be
///   told from nodes that all restarted while locks were held: its first
///   locks wait one expiry. Nodes known to hold no lock (just provisioned,
///   or in a test) can be marked as counting at once: `HSET
///   '<prefix>\x1fnode' born 0` on each (with `redis-cli`:
///   `redis-cli HSET "$(printf 'dsync:\037node')" born 0`).
/// - **What it costs.** A restarted node counts again one expiry after it
///   came back; meanwhile the others must make the quorum, so restarts
///   faster than one per expiry and node use up the tolerance for down
///   nodes, and locks are refused (never granted twice). Processes that
///   lock the same names with different expiries should set
///   [`restart_delay`](RedisSyncBuilder::restart_delay) to the longest. A
///   holder that cannot extend within its validity (a majority
///   unreachable that long, or its own process stalled) loses its lock.
/// - **Persistence: none, or every write; no eviction.** The argument
///   needs a node that lost locks to have lost its marker too: run the
///   nodes without persistence (`save ""`, `appendonly no`) or with
///   `appendfsync always`, and with `maxmemory-policy noeviction`. A node
///   that reloads an older snapshot (`save` points, or `appendfsync
///   everysec` losing its last second), or evicts lock keys under memory
///   pressure, keeps its marker but not those locks, and counts at once.
///
/// One node, and a Redis Cluster (one node to the lock algorithm), have no
/// other node to recover from: a restart without persistence forgets their
/// locks, and they take new ones at once.
///
/// # Cluster mode
///
/// With the `cluster` feature, [`RedisSync::cluster`] (or
/// [`RedisSyncBuilder::cluster`]) puts the locks on a Redis Cluster, found
/// from any of its nodes:
///
/// - **Where a lock lives.** Each name's lock lives on the one master that
///   owns its hash slot: the lock key is `{<prefix><name>}`, a hash tag, the
///   wait queue and its deadlines append a suffix after the tag, and the fencing
///   counter is the slot's own (one bookkeeping key per slot, whose hash
///   tag is a short number that hashes to the slot), so all of them share
///   the slot and each script runs on one master.
///   Names spread over the masters as their slots do. Commands follow
///   `MOVED` and `ASK` redirections, so a lock survives its slot moving to
///   another master (the keys move with their expiry). While the slot is
///   migrating, Redis answers `TRYAGAIN` to a script some of whose keys the
///   source lacks, and a name's wait queue usually does not exist: so
///   acquisitions and releases of the slot's names are retried (every 5 to
///   100 ms, within the per-node timeout) until the migration ends, and
///   fail as unavailable if it outlasts that timeout (a release that fails
///   so leaves the lock to expire). Extensions touch one key and go on.
///   Never a second owner.
/// - **Wake-ups** use sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`), on one
///   channel per process and slot that hashes to the slot, so a release's
///   message stays on its shard. A server without it (before Redis 7) gets
///   plain `PUBLISH` and `SUBSCRIBE` instead, automatically (the whole
///   cluster: not a cluster whose masters run both Redis 6 and 7, where
///   some wake-ups would be lost, and waiters fall back to their retry
///   delay).
/// - **The guarantee.** To the lock algorithm the cluster is one node (a
///   quorum of 1): exclusion holds as long as the master of a name's slot
///   keeps its keys. Replication is asynchronous, so if a master fails and
///   a replica that had not yet received an acquisition is promoted, that
///   lock is forgotten and a second owner can take it; a master restarted
///   empty (no persistence) forgets its locks the same way.
///   [`RedisSyncBuilder::wait_replicas`] narrows this: each acquisition and
///   extension waits until that many replicas acknowledged it, and fails
///   (releasing what it took) when they do not, so a failover to one of
///   them keeps the lock. `WAIT` does not make Redis strongly consistent
///   (a replica that acknowledged may still lose the failover election to
///   one that did not, in rare orders of failure), so for the strongest
///   guarantee use Redlock over independent masters, and fencing tokens
///   either way.
/// - **Connections:** one cluster connection for the locks' commands
///   (RESP2), and one for the wake-up subscriptions (RESP3, whose push
///   messages carry them), each with one multiplexed connection per node.
/// - **Requirements:** Redis 6 or later (for RESP3), a key prefix that is
///   not empty and holds no brace.
///
/// Must be built inside a Tokio runtime.
///
/// ```no_run
/// use tower_dsync::{DistMutex, DistMutexOptions, DistSync, RedisSync};
///
/// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
/// // One node:
/// let single = RedisSync::new(["redis://127.0.0.1:6379"])?;
/// // Redlock over three independent masters, with a custom key prefix:
/// let redlock = RedisSync::builder()
///     .urls(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379", "redis://10.0.0.3:6379"])
///     .key_prefix("myapp:locks:")
///     .build()?;
/// assert_eq!(redlock.quorum(), 2);
///
/// let mut mutex = single.new_mutex("orders:17", DistMutexOptions::default())?;
/// mutex.lock().await?;
/// mutex.unlock().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisSync {
    shared: Arc<RedisState>,
}

impl fmt::Debug for RedisSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSync")
            .field(
                "nodes",
                &self
                    .shared
                    .nodes
                    .iter()
                    .map(Node::label)
                    .collect::<Vec<_>>(),
            )
            .field("cluster", &self.is_cluster())
            .field("quorum", &self.shared.quorum)
            .field("key_prefix", &self.shared.key_prefix)
            .field("separator", &self.shared.separator)
            .field("set_nx_on_extend", &self.shared.set_nx_on_extend)
            .field("fail_fast", &self.shared.fail_fast)
            .field("restart_delay", &self.shared.restart_delay)
            .finish()
    }
}

impl RedisSync {
    /// A backend over the nodes at `urls` with default settings
    /// (`redis://[user:password@]host:port[/db]`).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
    /// let sync = tower_dsync::RedisSync::new(["redis://127.0.0.1:6379/0"])?;
    /// # Ok(()) }
    /// ```
    pub fn new<I>(urls: I) -> Result<Self>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Self::builder().urls(urls).build()
    }

    /// A backend on a Redis Cluster, found from its seed nodes' URLs (any
    /// of its nodes; the others are discovered), with default settings.
    /// See [Cluster mode](RedisSync#cluster-mode).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
    /// let sync = tower_dsync::RedisSync::cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])?;
    /// assert!(sync.is_cluster());
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub fn cluster<I>(seeds: I) -> Result<Self>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        Self::builder().cluster(seeds).build()
    }

    /// A builder, for key prefix, separator and the Redlock options.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
    /// let client = redis::Client::open("redis://127.0.0.1:6379").expect("a valid URL");
    /// let sync = tower_dsync::RedisSync::builder().client(client).fail_fast(true).build()?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> RedisSyncBuilder {
        RedisSyncBuilder::default()
    }

    /// The number of nodes (1 for a Redis Cluster: it is one node to the
    /// lock algorithm).
    pub fn nodes(&self) -> usize {
        self.shared.nodes.len()
    }

    /// Whether this backend is on a Redis Cluster.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
    /// assert!(!tower_dsync::RedisSync::new(["redis://127.0.0.1:6379"])?.is_cluster());
    /// # Ok(()) }
    /// ```
    pub fn is_cluster(&self) -> bool {
        self.shared.wakeups.on_cluster()
    }

    /// How many nodes must agree: `n / 2 + 1`.
    pub fn quorum(&self) -> usize {
        self.shared.quorum
    }

    /// The prefix of every key, `dsync:` by default.
    pub fn key_prefix(&self) -> &str {
        &self.shared.key_prefix
    }
}

impl DistSync for RedisSync {
    type Mutex = RedisMutex;

    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> Result<RedisMutex> {
        checked_mutex(&self.shared, name.into(), options, false)
    }

    fn new_mutex_named(
        &self,
        name: &Arc<str>,
        options: DistMutexOptions,
        _: FastPath,
    ) -> Result<RedisMutex> {
        checked_mutex(&self.shared, name.clone(), options, false)
    }

    fn local_line(&self, _: FastPath) -> Option<LocalLine<RedisMutex>> {
        let shared = self.shared.clone();
        Some(LocalLine::new(
            self.shared.line.clone(),
            move |name: &Arc<str>, options: DistMutexOptions| {
                checked_mutex(&shared, name.clone(), options, true)
            },
        ))
    }

    fn separator(&self) -> &str {
        &self.shared.separator
    }

    fn records(&self, _: FastPath) -> Option<Records> {
        Some(Records::new(records::RedisRecords(self.shared.clone())))
    }
}

/// A mutex on `name` once the name and the options pass their checks;
/// `in_turn`: its caller holds the name's turn in the process's line.
fn checked_mutex(
    shared: &Arc<RedisState>,
    name: Arc<str>,
    options: DistMutexOptions,
    in_turn: bool,
) -> Result<RedisMutex> {
    validate_name(&name)?;
    options.validate()?;
    Ok(RedisMutex::new(shared.clone(), name, options, in_turn))
}

/// Builds a [`RedisSync`].
///
/// ```no_run
/// use std::time::Duration;
///
/// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
/// let sync = tower_dsync::RedisSync::builder()
///     .url("redis://:secret@127.0.0.1:6379/2")
///     .key_prefix("billing:")
///     .separator("/")
///     .set_nx_on_extend(true)
///     .connect_timeout(Duration::from_millis(500))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Default)]
pub struct RedisSyncBuilder {
    /// Each node's client, or why its URL was refused.
    nodes: Vec<Result<redis::Client>>,
    /// A Redis Cluster's seed URLs, in cluster mode.
    #[cfg(feature = "cluster")]
    seeds: Option<Vec<String>>,
    wait_replicas: Option<(usize, Duration)>,
    key_prefix: Option<String>,
    separator: Option<String>,
    set_nx_on_extend: Option<bool>,
    fail_fast: bool,
    connect_timeout: Option<Duration>,
    restart_delay: Duration,
}

impl fmt::Debug for RedisSyncBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSyncBuilder")
            .field("nodes", &self.nodes.len())
            .field("key_prefix", &self.key_prefix)
            .field("separator", &self.separator)
            .finish_non_exhaustive()
    }
}

impl RedisSyncBuilder {
    /// Adds a node by URL: `redis://[user:password@]host:port[/db]`, or
    /// `rediss://` with the `tls` feature.
    pub fn url(mut self, url: impl AsRef<str>) -> Self {
        let number = self.nodes.len() + 1;
        self.nodes
            .push(redis::Client::open(url.as_ref()).map_err(|e| {
                invalid(
                    format!("node #{number} has an invalid URL"),
                    Some(Box::new(e)),
                )
            }));
        self
    }

    /// Adds a node per URL.
    pub fn urls<I>(mut self, urls: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        for url in urls {
            self = self.url(url);
        }
        self
    }

    /// Adds a node from an existing redis-rs client.
    pub fn client(mut self, client: redis::Client) -> Self {
        self.nodes.push(Ok(client));
        self
    }

    /// Cluster mode: the locks live on the Redis Cluster these seed nodes
    /// belong to (`redis://` or `rediss://` URLs of any of its nodes).
    /// Cannot be combined with [`url`](Self::url) or
    /// [`client`](Self::client). See [Cluster mode](RedisSync#cluster-mode).
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
    /// let sync = tower_dsync::RedisSync::builder()
    ///     .cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"])
    ///     .wait_replicas(1, std::time::Duration::from_millis(50))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "cluster")]
    #[cfg_attr(docsrs, doc(cfg(feature = "cluster")))]
    pub fn cluster<I>(mut self, seeds: I) -> Self
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        self.seeds
            .get_or_insert_with(Vec::new)
            .extend(seeds.into_iter().map(|seed| seed.as_ref().to_owned()));
        self
    }

    /// After each acquisition and extension, wait until `replicas` replicas
    /// of the master (of each master, with Redlock) acknowledged it
    /// (`WAIT replicas timeout`), so that a failover to one of them does
    /// not lose the lock. A node whose replicas fall short counts as
    /// failed: an acquisition releases the key there and fails without a
    /// quorum of other nodes (on one node or a cluster, with
    /// [`Error::Unavailable`](crate::Error::Unavailable), whose
    /// [`not_replicated`](crate::Error::not_replicated) tells how many
    /// acknowledged; with Redlock, the other nodes' answers may make it
    /// [`Error::Held`](crate::Error::Held)); an extension fails the same way (the lock may
    /// still be held, but not as durably as asked). Off by default; `0`
    /// turns it off.
    ///
    /// The `WAIT` goes in one pipeline with the command, on the same
    /// connection (no extra round trip), and is resent with it if the
    /// connection drops, so it never vouches for a connection that wrote
    /// nothing. Redis holds back a connection's other commands while it
    /// waits, so acquisitions and extensions get a connection of their own
    /// per node (one more per node): releases never queue behind a wait,
    /// while concurrent acquisitions of one process do, one wait after the
    /// other. The wait adds to each acquisition's and extension's time
    /// (refused attempts too), so it comes off the lock's validity, and the
    /// per-node timeout of those commands grows by `timeout`.
    pub fn wait_replicas(mut self, replicas: usize, timeout: Duration) -> Self {
        self.wait_replicas = (replicas > 0).then_some((replicas, timeout));
        self
    }

    /// The prefix of every key (default `dsync:`).
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = Some(prefix.into());
        self
    }

    /// The separator of hierarchical names (default `:`).
    pub fn separator(mut self, separator: impl Into<String>) -> Self {
        self.separator = Some(separator.into());
        self
    }

    /// With Redlock, `extend` re-creates the key on a node that lost it
    /// (restarted empty, say) if the name is free there, instead of only
    /// resetting the expiry where the key still holds our value. On by
    /// default (go-redsync has it off): it is how a held lock survives its
    /// nodes restarting empty (see [Restarts](RedisSync#restarts)). Only a
    /// mutex whose validity ([`until`](crate::DistMutex::until)) is still
    /// ahead re-creates a key; a mutex that released its lock re-creates
    /// nothing, and its `extend` fails with [`Error::NotAcquired`](crate::Error::NotAcquired) until
    /// its next `lock`. Off, a held lock loses a node at each empty
    /// restart of one that had it, and is lost once a quorum has. On one
    /// node or a Redis Cluster it does nothing: a missing key there means
    /// the lock is gone. With a value shared between mutexes
    /// ([`with_value`](crate::DistMutexOptions::with_value)), the others
    /// must stop extending once one of them unlocks: a node that restarted
    /// empty since cannot tell the key was released, and takes it back.
    pub fn set_nx_on_extend(mut self, on: bool) -> Self {
        self.set_nx_on_extend = Some(on);
        self
    }

    /// How long, at least, a node that lost its state (restarted empty, or
    /// flushed) refuses new locks: the longest of this and the lock's
    /// expiry (default zero: the expiry). It may have forgotten locks
    /// still held on the other nodes; meanwhile their holders put them
    /// back with their extensions, and a lock that is not extended
    /// expires. Processes that lock the same names with different expiries
    /// should all set this to the longest of them. See
    /// [Restarts](RedisSync#restarts). Has no effect on one node or a
    /// Redis Cluster, which have no other node to recover from.
    ///
    /// ```no_run
    /// # #[tokio::main] async fn main() -> tower_dsync::Result<()> {
    /// let sync = tower_dsync::RedisSync::builder()
    ///     .urls(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379", "redis://10.0.0.3:6379"])
    ///     .restart_delay(std::time::Duration::from_secs(30))
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn restart_delay(mut self, delay: Duration) -> Self {
        self.restart_delay = delay;
        self
    }

    /// Every operation returns as soon as its quorum outcome is decided
    /// either way, and the commands to the remaining nodes finish in the
    /// background. By default a success already returns as soon as a
    /// quorum said yes; a failure waits for every node (or its timeout), so
    /// that the error tells a busy lock from unavailable nodes. With this
    /// on, a failure returns as soon as a quorum is out of reach.
    pub fn fail_fast(mut self, on: bool) -> Self {
        self.fail_fast = on;
        self
    }

    /// How long one attempt to (re)connect to a node may take (default 1 s;
    /// zero is refused by [`build`](Self::build)). Commands are bounded
    /// separately, by `expiry * timeout_factor`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Sets up a connection per node, without waiting for any to connect.
    ///
    /// Fails with [`Error::InvalidConfig`](crate::Error::InvalidConfig) when there is no node, a URL does
    /// not parse, a `rediss://` URL is used without the `tls` feature, the
    /// connect timeout is zero, or no Tokio runtime is running.
    pub fn build(self) -> Result<RedisSync> {
        #[cfg(feature = "cluster")]
        let cluster = self.seeds.is_some();
        #[cfg(not(feature = "cluster"))]
        let cluster = false;
        if self.nodes.is_empty() && !cluster {
            return Err(invalid("no Redis node was given", None));
        }
        if !self.nodes.is_empty() && cluster {
            return Err(invalid(
                "give either independent nodes (url, client) or a cluster's seeds, not both",
                None,
            ));
        }
        if self.connect_timeout == Some(Duration::ZERO) {
            return Err(invalid(
                "connect_timeout must be greater than zero: no connection could be made",
                None,
            ));
        }
        if self.wait_replicas.is_some_and(|(_, wait)| wait.is_zero()) {
            return Err(invalid(
                "the wait_replicas timeout must be greater than zero (WAIT 0 waits forever)",
                None,
            ));
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(invalid(
                "RedisSync must be built inside a Tokio runtime",
                None,
            ));
        }
        let connect_timeout = self.connect_timeout.unwrap_or(Duration::from_secs(1));
        let key_prefix = self.key_prefix.unwrap_or_else(|| "dsync:".to_owned());
        let client_id: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        let waiters = Arc::default();
        let setup = Setup {
            key_prefix: &key_prefix,
            connect_timeout,
            replicas: self.wait_replicas,
            client_id: &client_id,
            waiters: &waiters,
        };
        #[cfg(feature = "cluster")]
        let connected = match self.seeds {
            Some(seeds) => setup.cluster_node(seeds),
            None => setup.independent_nodes(self.nodes),
        };
        #[cfg(not(feature = "cluster"))]
        let connected = setup.independent_nodes(self.nodes);
        let (nodes, wakeups) = connected?;
        Ok(RedisSync {
            shared: Arc::new(RedisState {
                quorum: quorum::quorum(nodes.len()),
                nodes,
                wakeups,
                line: Arc::default(),
                waiters,
                client_id,
                last_start: Default::default(),
                shared_keys: keys::SharedKeys::plain(&key_prefix),
                key_prefix,
                separator: self.separator.unwrap_or_else(|| ":".to_owned()),
                set_nx_on_extend: self.set_nx_on_extend.unwrap_or(true),
                fail_fast: self.fail_fast,
                restart_delay: self.restart_delay,
            }),
        })
    }
}
