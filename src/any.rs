//! A dynamic handle over any backend, chosen at run time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::time::Instant;

use crate::error::Result;
use crate::options::DistMutexOptions;
use crate::records::Records;
use crate::sync::{DistMutex, DistSync, FastPath, LocalLine};

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A cheaply cloneable handle to any [`DistSync`] backend.
///
/// [`DistSync`] and [`DistMutex`] use `impl Future` in their methods, so
/// they cannot be trait objects. `AnySync` and [`AnyMutex`] erase the
/// backend behind an `Arc` and boxed futures, and implement the same
/// traits, so code written against `S: DistSync` accepts them too.
///
/// ```
/// use tower_dsync::{AnySync, DistMutex, DistMutexOptions, DistSync, MemorySync};
///
/// fn from_config(backend: &str) -> AnySync {
///     match backend {
///         // "redis" => AnySync::new(RedisSync::...),
///         _ => AnySync::new(MemorySync::new()),
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
/// let sync = from_config("memory");
/// let mut mutex = sync.new_mutex("report", DistMutexOptions::default())?;
/// mutex.lock().await?;
/// mutex.unlock().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct AnySync(Arc<dyn ErasedSync>);

impl AnySync {
    /// Wraps a backend. Wrapping an `AnySync` again does not nest.
    ///
    /// ```
    /// use tower_dsync::{AnySync, DistSync, MemorySync};
    /// let sync = AnySync::new(MemorySync::new().with_separator("/"));
    /// assert_eq!(sync.separator(), "/");
    /// ```
    pub fn new<S: DistSync>(sync: S) -> Self {
        let any: &dyn std::any::Any = &sync;
        if let Some(already) = any.downcast_ref::<AnySync>() {
            return already.clone();
        }
        AnySync(Arc::new(sync))
    }
}

impl fmt::Debug for AnySync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnySync")
            .field("separator", &self.0.separator())
            .finish_non_exhaustive()
    }
}

impl DistSync for AnySync {
    type Mutex = AnyMutex;

    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> Result<AnyMutex> {
        self.0.new_any_mutex(name, options)
    }

    fn new_mutex_named(
        &self,
        name: &Arc<str>,
        options: DistMutexOptions,
        fast_path: FastPath,
    ) -> Result<AnyMutex> {
        self.0.new_any_mutex_named(name, options, fast_path)
    }

    fn local_line(&self, fast_path: FastPath) -> Option<LocalLine<AnyMutex>> {
        self.0.local_line(fast_path)
    }

    fn records(&self, fast_path: FastPath) -> Option<Records> {
        self.0.records(fast_path)
    }

    fn separator(&self) -> &str {
        self.0.separator()
    }
}

/// A mutex made by an [`AnySync`]; it forwards to the backend's mutex.
///
/// ```
/// use tower_dsync::{AnyMutex, AnySync, DistMutex, DistMutexOptions, DistSync, MemorySync};
///
/// let mutex: AnyMutex = AnySync::new(MemorySync::new())
///     .new_mutex("n", DistMutexOptions::default())
///     .unwrap();
/// assert_eq!(mutex.name(), "n");
/// ```
pub struct AnyMutex(Box<dyn ErasedMutex>);

impl fmt::Debug for AnyMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnyMutex")
            .field("name", &self.0.name())
            .field("until", &self.0.until())
            .finish_non_exhaustive()
    }
}

impl DistMutex for AnyMutex {
    fn name(&self) -> &str {
        self.0.name()
    }

    fn value(&self) -> &str {
        self.0.value()
    }

    fn until(&self) -> Option<Instant> {
        self.0.until()
    }

    fn fencing_token(&self) -> Option<u64> {
        self.0.fencing_token()
    }

    fn lock(&mut self) -> impl Future<Output = Result<()>> + Send {
        self.0.lock_boxed()
    }

    fn unlock(&mut self) -> impl Future<Output = Result<()>> + Send {
        self.0.unlock_boxed()
    }

    fn extend(&mut self) -> impl Future<Output = Result<()>> + Send {
        self.0.extend_boxed()
    }

    fn valid(&self) -> impl Future<Output = Result<bool>> + Send {
        self.0.valid_boxed()
    }

    fn try_lock_now(&mut self, fast_path: FastPath) -> Option<Result<()>> {
        self.0.try_lock_now(fast_path)
    }

    fn try_unlock_now(&mut self, fast_path: FastPath) -> Option<Result<()>> {
        self.0.try_unlock_now(fast_path)
    }

    fn shared_value(&self, fast_path: FastPath) -> Option<Arc<str>> {
        self.0.shared_value(fast_path)
    }
}

/// Object-safe mirror of [`DistSync`].
trait ErasedSync: Send + Sync + 'static {
    fn new_any_mutex(&self, name: &str, options: DistMutexOptions) -> Result<AnyMutex>;
    fn new_any_mutex_named(
        &self,
        name: &Arc<str>,
        options: DistMutexOptions,
        fast_path: FastPath,
    ) -> Result<AnyMutex>;
    fn local_line(&self, fast_path: FastPath) -> Option<LocalLine<AnyMutex>>;
    fn records(&self, fast_path: FastPath) -> Option<Records>;
    fn separator(&self) -> &str;
}

impl<S: DistSync> ErasedSync for S {
    fn new_any_mutex(&self, name: &str, options: DistMutexOptions) -> Result<AnyMutex> {
        let mutex = DistSync::new_mutex(self, name, options)?;
        Ok(AnyMutex(Box::new(mutex)))
    }

    fn new_any_mutex_named(
        &self,
        name: &Arc<str>,
        options: DistMutexOptions,
        fast_path: FastPath,
    ) -> Result<AnyMutex> {
        let mutex = DistSync::new_mutex_named(self, name, options, fast_path)?;
        Ok(AnyMutex(Box::new(mutex)))
    }

    fn local_line(&self, fast_path: FastPath) -> Option<LocalLine<AnyMutex>> {
        DistSync::local_line(self, fast_path)
            .map(|line| line.map(|mutex| AnyMutex(Box::new(mutex))))
    }

    fn records(&self, fast_path: FastPath) -> Option<Records> {
        DistSync::records(self, fast_path)
    }

    fn separator(&self) -> &str {
        DistSync::separator(self)
    }
}

/// Object-safe mirror of [`DistMutex`].
trait ErasedMutex: Send + Sync + 'static {
    fn name(&self) -> &str;
    fn value(&self) -> &str;
    fn until(&self) -> Option<Instant>;
    fn fencing_token(&self) -> Option<u64>;
    fn lock_boxed(&mut self) -> BoxFuture<'_, Result<()>>;
    fn unlock_boxed(&mut self) -> BoxFuture<'_, Result<()>>;
    fn extend_boxed(&mut self) -> BoxFuture<'_, Result<()>>;
    fn valid_boxed(&self) -> BoxFuture<'_, Result<bool>>;
    fn try_lock_now(&mut self, fast_path: FastPath) -> Option<Result<()>>;
    fn try_unlock_now(&mut self, fast_path: FastPath) -> Option<Result<()>>;
    fn shared_value(&self, fast_path: FastPath) -> Option<Arc<str>>;
}

impl<M: DistMutex> ErasedMutex for M {
    fn name(&self) -> &str {
        DistMutex::name(self)
    }

    fn value(&self) -> &str {
        DistMutex::value(self)
    }

    fn until(&self) -> Option<Instant> {
        DistMutex::until(self)
    }

    fn fencing_token(&self) -> Option<u64> {
        DistMutex::fencing_token(self)
    }

    fn lock_boxed(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(DistMutex::lock(self))
    }

    fn unlock_boxed(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(DistMutex::unlock(self))
    }

    fn extend_boxed(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(DistMutex::extend(self))
    }

    fn valid_boxed(&self) -> BoxFuture<'_, Result<bool>> {
        Box::pin(DistMutex::valid(self))
    }

    fn try_lock_now(&mut self, fast_path: FastPath) -> Option<Result<()>> {
        DistMutex::try_lock_now(self, fast_path)
    }

    fn try_unlock_now(&mut self, fast_path: FastPath) -> Option<Result<()>> {
        DistMutex::try_unlock_now(self, fast_path)
    }

    fn shared_value(&self, fast_path: FastPath) -> Option<Arc<str>> {
        DistMutex::shared_value(self, fast_path)
    }
}
