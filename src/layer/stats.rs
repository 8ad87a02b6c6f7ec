//! The counters of a layer's requests in this process, for tests, metrics
//! and health checks.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::local_queue::LocalQueues;

/// A handle on the counters of one [`DistLockLayer`](super::DistLockLayer)
/// and of every service it made: reading them takes no lock and costs no
/// allocation. Cheap to clone; every clone reads the same counters, so a
/// metrics task can keep one after the layer has moved into the app.
///
/// Both counters are zero when the layer is idle.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
/// use std::convert::Infallible;
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_dsync::MemorySync;
/// use tower_dsync::layer::{DistLockLayer, HeaderKey};
///
/// let layer = DistLockLayer::builder(MemorySync::new(), HeaderKey::new("x-id")).build()?;
/// let stats = layer.stats();
/// let service = ServiceBuilder::new().layer(layer).service_fn(|_| async {
///     Ok::<_, Infallible>(http::Response::new(String::new()))
/// });
/// let request = http::Request::builder().header("x-id", "7").body(()).unwrap();
/// let response = service.oneshot(request).await.unwrap();
/// assert_eq!(stats.local_keys(), 1);
/// assert_eq!(stats.held_locks(), 1, "held until the body is done");
/// drop(response);
/// while stats.held_locks() > 0 || stats.local_keys() > 0 {
///     tokio::task::yield_now().await; // the release runs in the background
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockStats {
    queues: Arc<LocalQueues>,
    held_count: Arc<AtomicUsize>,
}

impl LockStats {
    pub(super) fn new(queues: Arc<LocalQueues>, held_count: Arc<AtomicUsize>) -> Self {
        LockStats { queues, held_count }
    }

    /// The number of keys with requests in flight in this process, waiting
    /// or holding. A key's entry goes away with its last request. Over a
    /// backend whose in-process line the layer shares (`RedisSync`), it
    /// counts the names in that line: also those of the backend's other
    /// callers that wait for a name or hold its turn now (another layer,
    /// a direct `lock` call).
    pub fn local_keys(&self) -> usize {
        self.queues.len()
    }

    /// The number of locks held now: one per held lock's background task,
    /// which extends the lock and releases it. The task ends once its
    /// release is done (or has failed or timed out), so a lock counts here
    /// until the backend has let it go.
    pub fn held_locks(&self) -> usize {
        self.held_count.load(Ordering::Acquire)
    }
}

impl fmt::Debug for LockStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockStats")
            .field("local_keys", &self.local_keys())
            .field("held_locks", &self.held_locks())
            .finish()
    }
}
