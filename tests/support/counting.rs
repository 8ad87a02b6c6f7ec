//! A `DistSync` wrapper that counts the calls the layer makes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::time::Instant;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Result};

/// Call counters, shared by every mutex of a [`Counting`] backend.
#[derive(Debug, Default)]
pub struct Counts {
    pub locks: AtomicUsize,
    /// `lock()` calls in flight now, and the most at once.
    pub locking: AtomicUsize,
    pub max_locking: AtomicUsize,
    pub extends: AtomicUsize,
    pub unlocks: AtomicUsize,
}

impl Counts {
    pub fn locks(&self) -> usize {
        self.locks.load(Ordering::SeqCst)
    }
    pub fn max_locking(&self) -> usize {
        self.max_locking.load(Ordering::SeqCst)
    }
    pub fn extends(&self) -> usize {
        self.extends.load(Ordering::SeqCst)
    }
    pub fn unlocks(&self) -> usize {
        self.unlocks.load(Ordering::SeqCst)
    }
}

/// Wraps a backend and counts `lock`, `extend` and `unlock` calls.
#[derive(Debug, Clone)]
pub struct Counting<S> {
    pub inner: S,
    pub counts: Arc<Counts>,
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Self {
        Counting {
            inner,
            counts: Arc::default(),
        }
    }
}

impl<S: DistSync> DistSync for Counting<S> {
    type Mutex = CountingMutex<S::Mutex>;

    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> Result<Self::Mutex> {
        Ok(CountingMutex {
            inner: self.inner.new_mutex(name, options)?,
            counts: self.counts.clone(),
        })
    }

    fn separator(&self) -> &str {
        self.inner.separator()
    }

    fn local_line(
        &self,
        fast_path: tower_dsync::FastPath,
    ) -> Option<tower_dsync::LocalLine<Self::Mutex>> {
        let counts = self.counts.clone();
        self.inner.local_line(fast_path).map(|line| {
            line.map(move |inner| CountingMutex {
                inner,
                counts: counts.clone(),
            })
        })
    }
}

#[derive(Debug)]
pub struct CountingMutex<M> {
    inner: M,
    counts: Arc<Counts>,
}

impl<M: DistMutex> DistMutex for CountingMutex<M> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn value(&self) -> &str {
        self.inner.value()
    }
    fn until(&self) -> Option<Instant> {
        self.inner.until()
    }
    fn fencing_token(&self) -> Option<u64> {
        self.inner.fencing_token()
    }
    async fn lock(&mut self) -> Result<()> {
        self.counts.locks.fetch_add(1, Ordering::SeqCst);
        let now = self.counts.locking.fetch_add(1, Ordering::SeqCst) + 1;
        self.counts.max_locking.fetch_max(now, Ordering::SeqCst);
        let result = self.inner.lock().await;
        self.counts.locking.fetch_sub(1, Ordering::SeqCst);
        result
    }
    async fn unlock(&mut self) -> Result<()> {
        self.counts.unlocks.fetch_add(1, Ordering::SeqCst);
        self.inner.unlock().await
    }
    async fn extend(&mut self) -> Result<()> {
        self.counts.extends.fetch_add(1, Ordering::SeqCst);
        self.inner.extend().await
    }
    async fn valid(&self) -> Result<bool> {
        self.inner.valid().await
    }
    /// Counted as a `lock` call when the backend answers.
    fn try_lock_now(&mut self, fast_path: tower_dsync::FastPath) -> Option<Result<()>> {
        let now = self.counts.locking.fetch_add(1, Ordering::SeqCst) + 1;
        self.counts.max_locking.fetch_max(now, Ordering::SeqCst);
        let result = self.inner.try_lock_now(fast_path);
        self.counts.locking.fetch_sub(1, Ordering::SeqCst);
        if result.is_some() {
            self.counts.locks.fetch_add(1, Ordering::SeqCst);
        }
        result
    }
    fn try_unlock_now(&mut self, fast_path: tower_dsync::FastPath) -> Option<Result<()>> {
        let result = self.inner.try_unlock_now(fast_path)?;
        self.counts.unlocks.fetch_add(1, Ordering::SeqCst);
        Some(result)
    }
}
