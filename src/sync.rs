//! The two traits every backend implements, ported from Go's `IDistSync`
//! and `IDistMutex`, and the rules for lock names.

use std::fmt;
use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::local_queue::LocalQueues;
use crate::options::DistMutexOptions;
use crate::records::Records;

/// The longest accepted lock name, in bytes.
///
/// ```
/// let longest = "n".repeat(tower_dsync::MAX_NAME_LEN);
/// assert!(tower_dsync::validate_name(&longest).is_ok());
/// ```
pub const MAX_NAME_LEN: usize = 1024;

/// A factory of distributed mutexes (Go: `IDistSync`).
///
/// Implemented by [`MemorySync`](crate::MemorySync) and the Redis backend,
/// and by [`AnySync`](crate::AnySync), the dynamic handle that lets an
/// application pick a backend at run time.
///
/// ```
/// use tower_dsync::{DistMutex, DistMutexOptions, DistSync, MemorySync};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
/// let sync = MemorySync::new();
/// let name = format!("orders{}42", sync.separator());
/// let mut mutex = sync.new_mutex(&name, DistMutexOptions::default())?;
/// mutex.lock().await?;
/// mutex.unlock().await?;
/// # Ok(()) }
/// ```
pub trait DistSync: Clone + fmt::Debug + Send + Sync + 'static {
    /// The mutex type this factory makes.
    type Mutex: DistMutex;

    /// Returns a new distributed mutex with the given name (Go: `NewMutex`).
    ///
    /// Fails with [`Error::InvalidName`] if the name breaks the rules of
    /// [`validate_name`], and with [`Error::InvalidOptions`] if
    /// [`DistMutexOptions::validate`] refuses the options. Nothing is locked
    /// or allocated in the backend until [`DistMutex::lock`].
    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> Result<Self::Mutex>;

    /// The separator between the parts of a hierarchical name
    /// (Go: `GetSeparator`); `:` unless configured otherwise.
    fn separator(&self) -> &str;

    /// [`new_mutex`](Self::new_mutex) for a name the caller already keeps
    /// in an `Arc`, which a backend may share instead of copying: the
    /// layer's fast path, called with a [`FastPath`] as
    /// [`DistMutex::try_lock_now`] is.
    #[doc(hidden)]
    fn new_mutex_named(
        &self,
        name: &Arc<str>,
        options: DistMutexOptions,
        fast_path: FastPath,
    ) -> Result<Self::Mutex> {
        let _ = fast_path;
        self.new_mutex(name, options)
    }

    /// The in-process line this backend keeps per name, if it keeps one
    /// that a layer over it may wait in, with the way to make a mutex for
    /// a caller that holds a name's turn there (its `lock` does not line up
    /// again): then a request waits in one line, not in the layer's and
    /// then in the backend's. Called with a [`FastPath`], by this crate
    /// only. A backend that wraps another passes the line on with
    /// [`LocalLine::map`], which wraps the mutexes it makes, or lends none.
    #[doc(hidden)]
    fn local_line(&self, fast_path: FastPath) -> Option<LocalLine<Self::Mutex>> {
        let _ = fast_path;
        None
    }

    /// Where this backend keeps records beside its locks (bytes under a
    /// lock name, written only by the name's holder, each for its TTL), if
    /// it keeps any: what an
    /// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) stores
    /// first responses in. Its `build` refuses a backend that keeps none.
    /// Called with a [`FastPath`], by this crate only; a backend that wraps
    /// another passes its records on.
    #[doc(hidden)]
    fn records(&self, fast_path: FastPath) -> Option<Records> {
        let _ = fast_path;
        None
    }
}

/// How a mutex is made for a caller that holds its name's turn.
type InTurn<M> = dyn Fn(&Arc<str>, DistMutexOptions) -> Result<M> + Send + Sync;

/// A backend's in-process line (see [`DistSync::local_line`]) and how its
/// mutexes are made for a caller that holds a name's turn in it, in one
/// value, so that a wrapper cannot pass on the one without the other.
#[doc(hidden)]
pub struct LocalLine<M> {
    pub(crate) queues: Arc<LocalQueues>,
    in_turn: Arc<InTurn<M>>,
}

impl<M: 'static> LocalLine<M> {
    /// A line, and how to make a mutex for a caller that holds a turn in
    /// it.
    pub(crate) fn new(
        queues: Arc<LocalQueues>,
        in_turn: impl Fn(&Arc<str>, DistMutexOptions) -> Result<M> + Send + Sync + 'static,
    ) -> Self {
        LocalLine {
            queues,
            in_turn: Arc::new(in_turn),
        }
    }

    /// The same line, for a backend that wraps this one: `wrap` wraps each
    /// mutex made for it.
    pub fn map<N>(self, wrap: impl Fn(M) -> N + Send + Sync + 'static) -> LocalLine<N> {
        let in_turn = self.in_turn;
        LocalLine {
            queues: self.queues,
            in_turn: Arc::new(move |name: &Arc<str>, options| in_turn(name, options).map(&wrap)),
        }
    }

    /// A mutex on `name` for a caller that holds its turn in this line.
    pub(crate) fn new_mutex_in_turn(
        &self,
        name: &Arc<str>,
        options: DistMutexOptions,
    ) -> Result<M> {
        (self.in_turn)(name, options)
    }
}

impl<M> fmt::Debug for LocalLine<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalLine")
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

/// One distributed mutex (Go: `IDistMutex`).
///
/// A mutex is owned by one task: the calls that change its state take
/// `&mut self`. Create one mutex per task, even for the same name; the
/// backend, not the Rust value, is what excludes them.
///
/// Every async method is cancel-safe: dropping the future of
/// [`lock`](Self::lock) at any point never leaves the name locked.
///
/// The methods run on a Tokio runtime with the time driver enabled (as
/// `#[tokio::main]` and `#[tokio::test]` set up): retries and per-node
/// timeouts use `tokio::time`.
///
/// | Go | Rust |
/// |---|---|
/// | `Unlock(ctx) (bool, error)`: `true, nil` | `unlock().await` is `Ok(())` |
/// | `Unlock` / `Extend`: `false, ErrNotAcquired` | `Err(Error::NotAcquired)` |
/// | `Until()` zero value | `until()` is `None` |
///
/// ```
/// use std::time::Duration;
/// use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Error, MemorySync};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
/// let sync = MemorySync::new();
/// let options = DistMutexOptions::default().with_tries(1);
/// let mut a = sync.new_mutex("job:7", options.clone())?;
/// let mut b = sync.new_mutex("job:7", options)?;
///
/// a.lock().await?;
/// assert!(matches!(b.lock().await, Err(Error::Held { .. })));
/// assert!(matches!(b.unlock().await, Err(Error::NotAcquired)));
/// a.extend().await?;
/// assert!(a.valid().await?);
/// a.unlock().await?;
/// b.lock().await?;
/// # Ok(()) }
/// ```
pub trait DistMutex: fmt::Debug + Send + Sync + 'static {
    /// The name of the mutex.
    fn name(&self) -> &str;

    /// The value of the current (or last) acquisition. Empty until a lock is
    /// acquired, unless the `value` option preset it.
    fn value(&self) -> &str;

    /// The end of validity of the acquired lock, as computed by the lock
    /// algorithm (`start + expiry - elapsed - drift`). `None` until a lock
    /// is acquired, and again once [`unlock`](Self::unlock) has sent its
    /// releases, whether or not they succeed: a failed unlock may leave the
    /// lock in place, but this mutex no longer counts on it.
    fn until(&self) -> Option<Instant>;

    /// A fencing token of the current acquisition, when the backend gives
    /// one: strictly greater than the token of every earlier acquisition of
    /// the same name. Pass it to the resource you protect so it can refuse
    /// writes from a holder whose lock has expired.
    fn fencing_token(&self) -> Option<u64> {
        None
    }

    /// Acquires the lock, trying up to `tries` times with the configured
    /// delay in between; a waiter also wakes as soon as the name is released
    /// or the holder's lock expires.
    ///
    /// Fails with [`Error::Held`] when the tries are used up while another
    /// owner holds the name, or with a backend error. On failure you may
    /// call `lock` again to retry.
    fn lock(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Releases the lock. Fails with [`Error::NotAcquired`] if this mutex's
    /// value does not hold it (never acquired, expired, or taken over).
    fn unlock(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Resets the lock's expiry to the full `expiry` from now and moves
    /// [`until`](Self::until) forward. Fails with [`Error::NotAcquired`]
    /// if this mutex's value does not hold the lock, and after a successful
    /// [`unlock`](Self::unlock) until the next [`lock`](Self::lock).
    fn extend(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Asks the backend whether this mutex's value still holds an unexpired
    /// lock. On a multi-node backend it may return `true` erroneously if the
    /// quorum answered during the call and a node then took long enough for
    /// the lock to expire.
    fn valid(&self) -> impl Future<Output = Result<bool>> + Send;

    /// One try to acquire the lock, answered at once by a backend that needs
    /// no I/O for it: `Some` with what [`lock`](Self::lock) with `tries` set
    /// to 1 would give, or `None` (the default) when the answer has to wait.
    ///
    /// The Tower layer's fast path, not API: only this crate can call it,
    /// since only it makes a [`FastPath`]. A backend that answers at once
    /// overrides it; one that wraps another passes the token on.
    #[doc(hidden)]
    fn try_lock_now(&mut self, fast_path: FastPath) -> Option<Result<()>> {
        let _ = fast_path;
        None
    }

    /// [`unlock`](Self::unlock), answered at once by a backend that needs no
    /// I/O for it, or `None` (the default): the layer's fast path, as
    /// [`try_lock_now`](Self::try_lock_now).
    #[doc(hidden)]
    fn try_unlock_now(&mut self, fast_path: FastPath) -> Option<Result<()>> {
        let _ = fast_path;
        None
    }

    /// [`value`](Self::value) as the `Arc` the mutex keeps, for a caller
    /// that keeps it longer than the borrow (the layer's [`HeldLock`]), or
    /// `None` (the default) when the mutex keeps none: the caller copies
    /// it then. Called with a [`FastPath`], as
    /// [`try_lock_now`](Self::try_lock_now) is.
    ///
    /// [`HeldLock`]: crate::layer::HeldLock
    #[doc(hidden)]
    fn shared_value(&self, fast_path: FastPath) -> Option<Arc<str>> {
        let _ = fast_path;
        None
    }
}

/// The token of [`DistMutex::try_lock_now`] and
/// [`DistMutex::try_unlock_now`]: only this crate makes one, so only this
/// crate calls them, while any backend may answer them (a backend that
/// wraps another passes on the token it was given).
#[doc(hidden)]
#[derive(Debug)]
pub struct FastPath(());

impl FastPath {
    /// The token, for this crate's calls.
    pub(crate) fn new() -> Self {
        FastPath(())
    }
}

/// Checks a lock name: it must be non-empty, at most [`MAX_NAME_LEN`] bytes,
/// and free of control characters. Every backend applies these rules in
/// `new_mutex`.
///
/// ```
/// use tower_dsync::{validate_name, Error};
///
/// assert!(validate_name("orders:42").is_ok());
/// assert!(matches!(validate_name(""), Err(Error::InvalidName { .. })));
/// assert!(validate_name("a\nb").is_err());
/// assert!(validate_name(&"x".repeat(2000)).is_err());
/// ```
pub fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "the name is empty"
    } else if name.len() > MAX_NAME_LEN {
        "the name is longer than 1024 bytes"
    } else if has_control_character(name) {
        "the name contains a control character"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName { reason })
}

/// Whether `name` has a control character; an ASCII name is checked byte
/// by byte.
fn has_control_character(name: &str) -> bool {
    if name.is_ascii() {
        name.bytes().any(|b| b.is_ascii_control())
    } else {
        name.chars().any(char::is_control)
    }
}
