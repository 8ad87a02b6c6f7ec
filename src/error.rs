//! The error type shared by every backend.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

/// A boxed error from a lower layer (a Redis client, a value generator).
///
/// ```
/// let e: tower_dsync::BoxError = "entropy ran out".into();
/// assert_eq!(e.to_string(), "entropy ran out");
/// ```
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Result type of this crate.
///
/// ```
/// fn check(r: tower_dsync::Result<()>) -> bool {
///     r.is_ok()
/// }
/// assert!(check(Ok(())));
/// ```
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with a distributed mutex.
///
/// Go's `dsync` has a base error `ErrDsync` ("dsync") that every other
/// error wraps, and `ErrNotAcquired` ("dsync: lock is not acquired"). Here
/// the base error is this type itself: every variant's `Display` starts
/// with `dsync: `, and callers tell failures apart by matching on variants,
/// never on strings.
///
/// ```
/// use tower_dsync::Error;
///
/// assert_eq!(Error::NotAcquired.to_string(), "dsync: lock is not acquired");
/// let busy = Error::Held { remaining: Some(std::time::Duration::from_millis(1500)) };
/// assert!(busy.to_string().starts_with("dsync: "));
/// assert_eq!(busy.retry_after(), Some(std::time::Duration::from_millis(1500)));
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The mutex does not own the lock: it was never acquired, it expired, or
    /// another owner holds it now. Returned by `unlock` and `extend`
    /// (Go: `ErrNotAcquired`).
    NotAcquired,
    /// `lock` used up its tries while another owner held the name.
    Held {
        /// Time until the current holder's lock expires, when the backend
        /// could tell.
        remaining: Option<Duration>,
    },
    /// Too few backend nodes answered to decide: a single node is down, or a
    /// Redlock quorum could not be formed because nodes failed.
    Unavailable {
        /// Nodes that had to agree (`n / 2 + 1`).
        quorum: usize,
        /// The cause, node by node, for every node that failed.
        failures: Vec<NodeError>,
    },
    /// Too few nodes answered in time: every node that failed did so by
    /// exceeding the per-node timeout (`expiry * timeout_factor`). Also
    /// returned, with no nodes, when a quorum was reached but so late that
    /// no validity was left.
    Timeout {
        /// How long the call waited before giving up: for nodes that did
        /// not answer, the longest time from sending the command to a node
        /// to giving up on it (the per-node timeout, plus the `WAIT` when
        /// the Redis backend's `wait_replicas` is set); with no nodes, the
        /// time the acquisition took.
        after: Duration,
        /// Nodes that did not answer in time.
        nodes: Vec<String>,
    },
    /// The lock name is not acceptable (see [`validate_name`](crate::validate_name)).
    InvalidName {
        /// Why the name was refused.
        reason: &'static str,
    },
    /// An option is out of range (see [`DistMutexOptions`](crate::DistMutexOptions)).
    InvalidOptions {
        /// Which option, and what it must be.
        reason: String,
    },
    /// The value generator failed or produced an empty value.
    GenValue(BoxError),
    /// A backend could not be set up: a malformed URL, a TLS URL without
    /// the `tls` feature, no nodes, no async runtime.
    InvalidConfig {
        /// What is wrong.
        reason: String,
        /// The underlying error, if any.
        source: Option<BoxError>,
    },
}

impl Error {
    /// True when the failure comes from the backend being unreachable or too
    /// slow (`Unavailable` or `Timeout`): a caller may retry later.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_dsync::Error;
    ///
    /// let e = Error::Timeout { after: Duration::from_millis(400), nodes: vec!["a".into()] };
    /// assert!(e.is_unavailable());
    /// assert!(!Error::NotAcquired.is_unavailable());
    /// ```
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }

    /// The replication shortfall behind an [`Error::Unavailable`], when a
    /// node failed because its replicas did not acknowledge the write in
    /// time (see [`NotReplicated`]).
    ///
    /// ```
    /// assert!(tower_dsync::Error::NotAcquired.not_replicated().is_none());
    /// ```
    pub fn not_replicated(&self) -> Option<&NotReplicated> {
        match self {
            Error::Unavailable { failures, .. } => failures
                .iter()
                .find_map(|failure| failure.source.downcast_ref::<NotReplicated>()),
            _ => None,
        }
    }

    /// The time after which trying again makes sense, when known: the
    /// holder's remaining time for [`Error::Held`]; for an
    /// [`Error::Unavailable`] because nodes that restarted empty take no
    /// new lock yet (see [`Recovering`]), the time until the first of them
    /// does.
    ///
    /// ```
    /// assert_eq!(tower_dsync::Error::NotAcquired.retry_after(), None);
    /// ```
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Held { remaining } => *remaining,
            Error::Unavailable { failures, .. } => failures
                .iter()
                .filter_map(|failure| failure.source.downcast_ref::<Recovering>())
                .map(|recovering| recovering.left)
                .min(),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotAcquired => f.write_str("dsync: lock is not acquired"),
            Error::Held { remaining: Some(r) } => write!(
                f,
                "dsync: lock is held by another owner (expires in {} ms)",
                r.as_millis()
            ),
            Error::Held { remaining: None } => f.write_str("dsync: lock is held by another owner"),
            Error::Unavailable { quorum, failures } => {
                write!(
                    f,
                    "dsync: backend unavailable: quorum of {quorum} not reached"
                )?;
                for failure in failures {
                    write!(f, "; {failure}")?;
                }
                Ok(())
            }
            Error::Timeout { after, nodes } if nodes.is_empty() => write!(
                f,
                "dsync: timed out: acquiring took longer than the validity ({} ms)",
                after.as_millis()
            ),
            Error::Timeout { after, nodes } => write!(
                f,
                "dsync: timed out after {} ms waiting for {}",
                after.as_millis(),
                nodes.join(", ")
            ),
            Error::InvalidName { reason } => write!(f, "dsync: invalid lock name: {reason}"),
            Error::InvalidOptions { reason } => write!(f, "dsync: invalid options: {reason}"),
            Error::GenValue(e) => write!(f, "dsync: cannot generate a lock value: {e}"),
            Error::InvalidConfig {
                reason,
                source: Some(source),
            } => write!(f, "dsync: invalid configuration: {reason}: {source}"),
            Error::InvalidConfig { reason, .. } => {
                write!(f, "dsync: invalid configuration: {reason}")
            }
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            Error::Unavailable { failures, .. } => failures
                .first()
                .map(|failure| failure as &(dyn StdError + 'static)),
            Error::GenValue(e) => Some(e.as_ref()),
            Error::InvalidConfig {
                source: Some(source),
                ..
            } => Some(source.as_ref()),
            _ => None,
        }
    }
}

/// Why one backend node failed an operation.
///
/// ```
/// use tower_dsync::NodeError;
///
/// let e = NodeError::new("127.0.0.1:7001", std::io::Error::other("connection refused"));
/// assert_eq!(e.to_string(), "node 127.0.0.1:7001: connection refused");
/// ```
#[derive(Debug)]
pub struct NodeError {
    node: String,
    source: BoxError,
}

impl NodeError {
    /// A failure of `node` (an address or URL without credentials).
    pub fn new(node: impl Into<String>, source: impl Into<BoxError>) -> Self {
        NodeError {
            node: node.into(),
            source: source.into(),
        }
    }

    /// The node that failed.
    ///
    /// ```
    /// let e = tower_dsync::NodeError::new("a:1", "down");
    /// assert_eq!(e.node(), "a:1");
    /// ```
    pub fn node(&self) -> &str {
        &self.node
    }
}

impl fmt::Display for NodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {}: {}", self.node, self.source)
    }
}

impl StdError for NodeError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        Some(self.source.as_ref())
    }
}

/// A node applied an acquisition or an extension, but fewer of its
/// replicas than asked for acknowledged it in time (the `WAIT` after the
/// command; see `RedisSyncBuilder::wait_replicas`). The failed node's
/// [`NodeError`] carries it: an acquisition releases the key on that node,
/// and counts the node as failed.
///
/// ```
/// use std::error::Error as _;
/// use std::time::Duration;
/// use tower_dsync::{Error, NodeError, NotReplicated};
///
/// let shortfall = NotReplicated { wanted: 1, acknowledged: 0, timeout: Duration::from_millis(100) };
/// let e = Error::Unavailable { quorum: 1, failures: vec![NodeError::new("a:1", shortfall)] };
/// let cause = e.source().and_then(|node| node.source()).and_then(|c| c.downcast_ref::<NotReplicated>());
/// assert_eq!(cause.map(|c| c.acknowledged), Some(0));
/// assert_eq!(e.not_replicated().map(|c| c.wanted), Some(1));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NotReplicated {
    /// Replicas asked for.
    pub wanted: usize,
    /// Replicas that acknowledged within the timeout.
    pub acknowledged: usize,
    /// How long the node waited for them.
    pub timeout: Duration,
}

impl fmt::Display for NotReplicated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "only {} of {} replicas acknowledged the write within {} ms",
            self.acknowledged,
            self.wanted,
            self.timeout.as_millis()
        )
    }
}

impl StdError for NotReplicated {}

/// A Redlock node lost its state (it restarted empty, or was flushed) and
/// takes no new lock yet: it may have forgotten locks that are still held
/// on the other nodes, so it refuses new ones until the longest expiry in
/// use has passed (see `RedisSyncBuilder::restart_delay`), while holders
/// put their keys back on it with their extensions. The refusing node's
/// [`NodeError`] carries it in an [`Error::Unavailable`].
///
/// ```
/// use std::time::Duration;
/// use tower_dsync::{Error, NodeError, Recovering};
///
/// let cause = Recovering { left: Duration::from_millis(1500) };
/// let e = Error::Unavailable { quorum: 2, failures: vec![NodeError::new("a:1", cause)] };
/// assert_eq!(e.retry_after(), Some(Duration::from_millis(1500)));
/// assert!(e.to_string().contains("restarted empty"));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovering {
    /// How long until the node takes new locks again.
    pub left: Duration,
}

impl fmt::Display for Recovering {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "restarted empty: takes no new lock for another {} ms",
            self.left.as_millis()
        )
    }
}

impl StdError for Recovering {}
