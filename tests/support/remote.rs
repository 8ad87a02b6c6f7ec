//! A `DistSync` wrapper that answers nothing at once, as a network backend
//! does: its mutexes keep the default `try_lock_now` and `try_unlock_now`
//! (`None`), so callers take the path of a future. The test can hold its
//! unlocks back, and learns when each one has finished.

use std::sync::Arc;

use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tower_dsync::{DistMutex, DistMutexOptions, DistSync, Result};

/// Wraps a backend; see the module documentation.
#[derive(Debug, Clone)]
pub struct Remote<S> {
    pub inner: S,
    /// Each unlock takes a permit first: open unless the test closes it.
    pub unlock_gate: Arc<Semaphore>,
    /// Told when an unlock has finished.
    pub unlocked: Arc<Notify>,
}

impl<S> Remote<S> {
    /// Unlocks wait for [`Remote::unlock_gate`] permits, none at first.
    pub fn gated(inner: S) -> Self {
        Remote {
            inner,
            unlock_gate: Arc::new(Semaphore::new(0)),
            unlocked: Arc::default(),
        }
    }
}

impl<S: DistSync> DistSync for Remote<S> {
    type Mutex = RemoteMutex<S::Mutex>;

    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> Result<Self::Mutex> {
        Ok(RemoteMutex {
            inner: self.inner.new_mutex(name, options)?,
            unlock_gate: self.unlock_gate.clone(),
            unlocked: self.unlocked.clone(),
        })
    }

    fn separator(&self) -> &str {
        self.inner.separator()
    }
}

#[derive(Debug)]
pub struct RemoteMutex<M> {
    inner: M,
    unlock_gate: Arc<Semaphore>,
    unlocked: Arc<Notify>,
}

impl<M: DistMutex> DistMutex for RemoteMutex<M> {
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
        tokio::task::yield_now().await;
        self.inner.lock().await
    }
    async fn unlock(&mut self) -> Result<()> {
        let permit = self.unlock_gate.acquire().await.expect("never closed");
        permit.forget();
        let result = self.inner.unlock().await;
        self.unlocked.notify_one();
        result
    }
    async fn extend(&mut self) -> Result<()> {
        self.inner.extend().await
    }
    async fn valid(&self) -> Result<bool> {
        self.inner.valid().await
    }
}

/// A backend that answers at once, except that releasing at once panics:
/// for the layer's guard against a panicking backend.
#[derive(Debug, Clone)]
pub struct PanicOnRelease<S> {
    pub inner: S,
}

impl<S: DistSync> DistSync for PanicOnRelease<S> {
    type Mutex = PanicOnReleaseMutex<S::Mutex>;

    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> Result<Self::Mutex> {
        Ok(PanicOnReleaseMutex(self.inner.new_mutex(name, options)?))
    }

    fn separator(&self) -> &str {
        self.inner.separator()
    }
}

#[derive(Debug)]
pub struct PanicOnReleaseMutex<M>(M);

impl<M: DistMutex> DistMutex for PanicOnReleaseMutex<M> {
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
    async fn lock(&mut self) -> Result<()> {
        self.0.lock().await
    }
    async fn unlock(&mut self) -> Result<()> {
        self.0.unlock().await
    }
    async fn extend(&mut self) -> Result<()> {
        self.0.extend().await
    }
    async fn valid(&self) -> Result<bool> {
        self.0.valid().await
    }
    fn try_lock_now(&mut self, fast_path: tower_dsync::FastPath) -> Option<Result<()>> {
        self.0.try_lock_now(fast_path)
    }
    fn try_unlock_now(&mut self, _: tower_dsync::FastPath) -> Option<Result<()>> {
        panic!("release panics (expected by the test)");
    }
}
