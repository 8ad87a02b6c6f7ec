//! `DistLockLayer`: a Tower middleware that holds a distributed lock per
//! request key for as long as the request is being served.
//!
//! The life of a request:
//!
//! 1. **Key.** A [`KeyExtractor`] reads the key from the request head:
//!    [`HeaderKey`] (such as `Idempotency-Key`), [`PathSegment`],
//!    [`GrpcMetadataKey`], [`MethodPath`], or any closure. No key: the
//!    request passes through unlocked (or is rejected, with
//!    [`MissingKey::Reject`]). A bad key is rejected with 400.
//! 2. **Name.** `namespace + separator + key`, with `%` and the separator's
//!    characters percent-encoded in the key, so a key can never reach
//!    another namespace's lock: the escaped key holds no character of the
//!    separator, so the name's last separator ends the namespace. That
//!    needs a separator without `%` and hex digits, the characters of the
//!    escapes; [`DistLockLayer::validate`] refuses the others. Names longer
//!    than [`MAX_NAME_LEN`] are refused.
//! 3. **Local queue.** Requests for the same name in one process wait first
//!    come, first served; only the first talks to the backend.
//! 4. **Acquire**, within the wait budget ([`DistLockLayer::wait`]); past it,
//!    409 with `Retry-After` (the holder's remaining time, in whole seconds
//!    rounded up). A zero budget fails fast. Waiting holds none of the
//!    inner service's capacity: the layer's `poll_ready` is always ready,
//!    and each request's future drives its own clone of the inner service
//!    ready only once the lock is held (so a `ConcurrencyLimit` or `Buffer`
//!    inside the layer serves requests for free keys while others wait).
//! 5. **Serve.** The inner service finds a [`HeldLock`] in the request
//!    extensions.
//! 6. **Keep.** A background task extends the lock every `expiry / 3` while
//!    the request is in flight, each extension started early enough to be
//!    done before the validity it extends ends (it may take as long as the
//!    slowest one so far, and at least a node timeout). An extension that
//!    fails with validity left (a timeout, a backend unavailable) is
//!    retried, every quarter interval. The task starts, from the runtime's
//!    timer, when the first extension falls due, whether or not anything
//!    polls the request meanwhile; a shorter request starts no task and
//!    causes no extension.
//! 7. **Release** when the response body has been sent to its end or is
//!    dropped (or, with [`ReleaseOn::Head`], when the response head is
//!    ready); also when the request is dropped (client gone, timeout) or
//!    its handler panics. The release never waits on the response path: it
//!    is done at once when the backend can answer at once (the in-process
//!    one, see [`DistMutex::try_unlock_now`](crate::DistMutex::try_unlock_now)),
//!    else in the background.
//! 8. **Lost lock.** When the validity ends without a successful
//!    extension, or the backend refuses one ([`Error::NotAcquired`]: a
//!    quorum says the key is no longer ours), or `max_hold` passes,
//!    [`HeldLock`] reports it, and the keeper releases what may remain of
//!    the lock and frees the key for this process's next request at once,
//!    without waiting for the response to end or be polled. With
//!    [`OnLost::Abort`], the next poll of the response future drops the
//!    handler and answers 503 (the next poll of the body ends it with an
//!    error); a future or body nobody polls any more holds nothing.
//!
//! Rejections follow HTTP conventions, and gRPC's for gRPC calls
//! (trailers-only responses with `ABORTED`, `UNAVAILABLE` or
//! `INVALID_ARGUMENT`); see [`Rejection`].
//!
//! ```
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_dsync::MemorySync;
//! use tower_dsync::layer::{DistLockLayer, HeaderKey, HeldLock};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let service = ServiceBuilder::new()
//!     .layer(
//!         DistLockLayer::new(MemorySync::new(), HeaderKey::new("idempotency-key"))
//!             .namespace("payments")
//!             .wait(Duration::ZERO),
//!     )
//!     .service_fn(|request: Request<String>| async move {
//!         let lock = request.extensions().get::<HeldLock>().unwrap();
//!         Ok::<_, Infallible>(Response::new(format!("holding {}", lock.name())))
//!     });
//!
//! let request = Request::builder().header("idempotency-key", "pay-7").body(String::new()).unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! # }
//! ```

mod acquire;
mod alarm;
mod body;
mod extend_loop;
pub(crate) mod extract;
mod future;
mod held;
mod lease;
mod local_queue;
mod name;
mod rejection;
mod release;
mod service;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tower_layer::Layer;

pub use body::{LockBody, LockLost};
pub use extract::{
    GrpcMetadataKey, HeaderKey, KeyError, KeyExtractor, MethodPath, PathSegment, TryKeyFn,
    try_key_fn,
};
pub use future::ResponseFuture;
pub use held::HeldLock;
pub use rejection::{Rejection, RejectionKind};
pub use service::DistLock;

use local_queue::LocalQueues;
use name::Namer;
use rejection::RejectionMapper;

use crate::error::Error;
use crate::options::DistMutexOptions;
use crate::sync::{DistSync, MAX_NAME_LEN, validate_name};

/// What a request without a key gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// It passes through to the inner service, unlocked (the default).
    #[default]
    PassThrough,
    /// It is rejected with 400 (or `INVALID_ARGUMENT`).
    Reject,
}

/// When the lock is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReleaseOn {
    /// When the response body has been sent to its end, or dropped (the
    /// default): a streaming response holds the lock until its last chunk.
    #[default]
    BodyEnd,
    /// As soon as the response head is ready.
    Head,
}

/// What happens when the lock is lost while the request is served: its
/// validity ended without a successful extension, the backend refused an
/// extension, or `max_hold` passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLost {
    /// The handler is told through [`HeldLock`] and keeps running (the
    /// default).
    #[default]
    Notify,
    /// The handler is dropped; the client gets 503 (or `UNAVAILABLE`) if the
    /// response head was not sent yet, else the body ends with an error.
    Abort,
}

/// The default wait budget: how long a request may wait for a busy key.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// The shortest interval between two extensions of a held lock (tokio's
/// timers tick in milliseconds).
const MIN_EXTEND_EVERY: Duration = Duration::from_millis(1);

/// A [`Layer`] that holds a distributed lock per request key, for the life
/// of the request. See the [module documentation](self) for the request
/// lifecycle.
///
/// Works with any [`DistSync`] backend (generic, or [`AnySync`](crate::AnySync)
/// chosen at run time). Cheap to clone; every service made by one layer (and
/// its clones) shares one local queue per key.
///
/// ```
/// use std::time::Duration;
/// use tower_dsync::layer::{DistLockLayer, MissingKey, OnLost, PathSegment, ReleaseOn};
/// use tower_dsync::{DistMutexOptions, MemorySync};
///
/// let layer = DistLockLayer::new(MemorySync::new(), PathSegment::new(1))
///     .namespace("jobs")
///     .mutex_options(DistMutexOptions::default().with_expiry(Duration::from_secs(30)))
///     .wait(Duration::from_secs(2))
///     .on_missing_key(MissingKey::Reject)
///     .release_on(ReleaseOn::Head)
///     .on_lost(OnLost::Abort)
///     .extend_every(Duration::from_secs(5));
/// assert_eq!(layer.local_keys(), 0);
/// ```
pub struct DistLockLayer<D: DistSync, K> {
    sync: D,
    extractor: K,
    namespace: String,
    options: DistMutexOptions,
    wait: Duration,
    missing: MissingKey,
    release: ReleaseOn,
    lost: OnLost,
    extend_every: Option<Duration>,
    max_hold: Option<Duration>,
    mapper: Option<RejectionMapper>,
    queues: Arc<LocalQueues>,
    keepers: Arc<AtomicUsize>,
}

impl<D: DistSync, K: Clone> Clone for DistLockLayer<D, K> {
    fn clone(&self) -> Self {
        DistLockLayer {
            sync: self.sync.clone(),
            extractor: self.extractor.clone(),
            namespace: self.namespace.clone(),
            options: self.options.clone(),
            wait: self.wait,
            missing: self.missing,
            release: self.release,
            lost: self.lost,
            extend_every: self.extend_every,
            max_hold: self.max_hold,
            mapper: self.mapper.clone(),
            queues: self.queues.clone(),
            keepers: self.keepers.clone(),
        }
    }
}

impl<D: DistSync, K> fmt::Debug for DistLockLayer<D, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistLockLayer")
            .field("sync", &self.sync)
            .field("namespace", &self.namespace)
            .field("options", &self.options)
            .field("wait", &self.wait)
            .field("missing", &self.missing)
            .field("release", &self.release)
            .field("lost", &self.lost)
            .field("extend_every", &self.extend_every)
            .field("max_hold", &self.max_hold)
            .finish_non_exhaustive()
    }
}

impl<D: DistSync, K> DistLockLayer<D, K> {
    /// A layer that locks each request's key, read by `extractor`, on
    /// `sync`. Defaults: namespace `lock`, the default mutex options (8 s
    /// expiry), a wait budget of [`DEFAULT_WAIT`], requests without a key
    /// pass through, release at the end of the body, a lost lock is reported
    /// to the handler.
    pub fn new(sync: D, extractor: K) -> Self {
        DistLockLayer {
            sync,
            extractor,
            namespace: "lock".to_owned(),
            options: DistMutexOptions::default(),
            wait: DEFAULT_WAIT,
            missing: MissingKey::default(),
            release: ReleaseOn::default(),
            lost: OnLost::default(),
            extend_every: None,
            max_hold: None,
            mapper: None,
            queues: Arc::default(),
            keepers: Arc::default(),
        }
    }

    /// The first part of every lock name: `namespace + separator + key`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The options of each request's mutex: expiry, drift, timeouts, value
    /// generator, and the retry delay, which spaces the tries of a request
    /// that waits for a busy key.
    ///
    /// `tries` is not used: how long a request waits is the wait budget
    /// alone ([`wait`](Self::wait)), the layer's one knob for it. A request
    /// tries once at once, then, if the key is busy and the budget is not
    /// zero, as often as the retry delay spaces its tries until the budget
    /// is spent, and once more at its end.
    pub fn mutex_options(mut self, options: DistMutexOptions) -> Self {
        self.options = options;
        self
    }

    /// How long a request may wait for a busy key before it is rejected with
    /// 409 (`ABORTED`), whatever the mutex options' `tries`. Zero fails
    /// fast: one try, no waiting.
    pub fn wait(mut self, budget: Duration) -> Self {
        self.wait = budget;
        self
    }

    /// What a request without a key gets.
    pub fn on_missing_key(mut self, missing: MissingKey) -> Self {
        self.missing = missing;
        self
    }

    /// When the lock is released.
    pub fn release_on(mut self, release: ReleaseOn) -> Self {
        self.release = release;
        self
    }

    /// What happens when the lock is lost while the request is served.
    pub fn on_lost(mut self, lost: OnLost) -> Self {
        self.lost = lost;
        self
    }

    /// How often a held lock is extended (default `expiry / 3`). Capped at
    /// half the lock's validity, so that a lock is always extended well
    /// before it expires.
    pub fn extend_every(mut self, interval: Duration) -> Self {
        self.extend_every = Some(interval);
        self
    }

    /// The longest a request may keep its lock (default: as long as it is
    /// in flight). Past it the lock is reported lost (with
    /// [`OnLost::Abort`], the request is cut short) and released, and the
    /// key is free for the next request. This bounds what a client that
    /// never finishes reading a streaming response can hold.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_dsync::{DistLockLayer, MemorySync};
    /// use tower_dsync::layer::HeaderKey;
    ///
    /// let layer = DistLockLayer::new(MemorySync::new(), HeaderKey::new("x-id"))
    ///     .max_hold(Duration::from_secs(300));
    /// ```
    pub fn max_hold(mut self, limit: Duration) -> Self {
        self.max_hold = Some(limit);
        self
    }

    /// Replaces the default rejection responses (see [`Rejection`]).
    ///
    /// ```
    /// use tower_dsync::MemorySync;
    /// use tower_dsync::layer::{DistLockLayer, HeaderKey, RejectionKind};
    ///
    /// let layer = DistLockLayer::new(MemorySync::new(), HeaderKey::new("x-id"))
    ///     .rejection_response(|rejection| {
    ///         let mut response = rejection.clone().into_response();
    ///         if rejection.kind() == RejectionKind::Busy && !rejection.is_grpc() {
    ///             *response.body_mut() = r#"{"error":"busy"}"#.into();
    ///             response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    ///         }
    ///         response
    ///     });
    /// ```
    pub fn rejection_response(
        mut self,
        map: impl Fn(Rejection) -> http::Response<Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.mapper = Some(Arc::new(map));
        self
    }

    /// The number of keys with requests in flight in this process (waiting
    /// or holding), over every service this layer made.
    pub fn local_keys(&self) -> usize {
        self.queues.len()
    }

    /// The number of locks this layer's requests hold now, over every
    /// service it made: one per keeper task, the background task that
    /// extends a held lock and releases it. A keeper ends once its release
    /// is done (or has failed or timed out), so this is zero when idle; a
    /// diagnostic for tests and metrics, like [`local_keys`](Self::local_keys).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::convert::Infallible;
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_dsync::MemorySync;
    /// use tower_dsync::layer::{DistLockLayer, HeaderKey};
    ///
    /// let layer = DistLockLayer::new(MemorySync::new(), HeaderKey::new("x-id"));
    /// let service = ServiceBuilder::new().layer(layer.clone()).service_fn(|_| async {
    ///     Ok::<_, Infallible>(http::Response::new(String::new()))
    /// });
    /// let request = http::Request::builder().header("x-id", "7").body(()).unwrap();
    /// let response = service.oneshot(request).await.unwrap();
    /// assert_eq!(layer.held_locks(), 1, "held until the body is done");
    /// drop(response);
    /// while layer.held_locks() > 0 {
    ///     tokio::task::yield_now().await; // the keeper releases the lock
    /// }
    /// # }
    /// ```
    pub fn held_locks(&self) -> usize {
        self.keepers.load(Ordering::Acquire)
    }

    /// Checks the configuration; a layer that fails this check rejects every
    /// keyed request with 500 (`INTERNAL`). Call it at start-up to fail
    /// early.
    ///
    /// Refused: mutex options that [`DistMutexOptions::validate`] refuses,
    /// a validity (`expiry - drift`) under 2 ms, too short to extend in
    /// time ([`Error::InvalidOptions`]); an
    /// invalid namespace ([`Error::InvalidName`]);
    /// a backend with an empty separator, or one that holds `%` or an ASCII
    /// hex digit (the characters of a key's escapes), either of which could
    /// let two namespaces share a lock, and a namespace and separator that
    /// leave no room for a key ([`Error::InvalidConfig`]).
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_dsync::{DistMutexOptions, MemorySync};
    /// use tower_dsync::layer::{DistLockLayer, MethodPath};
    ///
    /// let layer = DistLockLayer::new(MemorySync::new(), MethodPath)
    ///     .mutex_options(DistMutexOptions::default().with_expiry(Duration::ZERO));
    /// assert!(layer.validate().is_err());
    /// ```
    pub fn validate(&self) -> crate::Result<()> {
        self.options.validate()?;
        validate_name(&self.namespace)?;
        let validity = self.options.validity();
        if validity < MIN_EXTEND_EVERY * 2 {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "the lock's validity (expiry - drift = {validity:?}) must be at least {:?}: \
                     the layer extends a lock at half its validity, and at most every {:?}",
                    MIN_EXTEND_EVERY * 2,
                    MIN_EXTEND_EVERY
                ),
            });
        }
        let invalid = |reason: String| {
            Err(Error::InvalidConfig {
                reason,
                source: None,
            })
        };
        let separator = self.sync.separator();
        if separator.is_empty() {
            return invalid(
                "the backend's separator is empty: a key could reach another namespace's lock"
                    .into(),
            );
        }
        // A key's escapes are `%` and hex digits: in a separator, they could
        // make the end of one namespace's key read as another's separator.
        if let Some(c) = separator
            .chars()
            .find(|c| *c == '%' || c.is_ascii_hexdigit())
        {
            return invalid(format!(
                "the backend's separator {separator:?} holds {c:?}: a separator with `%` or a \
                 hex digit, which escaped keys are made of, could let two namespaces share a lock"
            ));
        }
        if validate_name(&format!("{}{separator}k", self.namespace)).is_err() {
            return invalid(format!(
                "the namespace {:?} and the separator {separator:?} leave no room for a key \
                 in a lock name (at most {MAX_NAME_LEN} bytes, no control characters)",
                self.namespace
            ));
        }
        Ok(())
    }

    fn shared(&self) -> LayerState<D> {
        let validity = self.options.validity();
        let extend_every = self
            .extend_every
            .unwrap_or(self.options.expiry() / 3)
            .min(validity / 2)
            .max(MIN_EXTEND_EVERY);
        LayerState {
            sync: self.sync.clone(),
            namer: Namer::new(&self.namespace, self.sync.separator()),
            options: self.options.clone(),
            wait: self.wait,
            reject_missing: self.missing == MissingKey::Reject,
            release: self.release,
            lost: self.lost,
            extend_every,
            validity,
            max_hold: self.max_hold,
            mapper: self.mapper.clone(),
            queues: self.queues.clone(),
            keepers: self.keepers.clone(),
            misconfigured: self.validate().err().map(|e| e.to_string()),
        }
    }
}

impl<S, D: DistSync, K: Clone> Layer<S> for DistLockLayer<D, K> {
    type Service = DistLock<S, D, K>;

    fn layer(&self, inner: S) -> Self::Service {
        DistLock {
            inner,
            shared: Arc::new(self.shared()),
            extractor: self.extractor.clone(),
        }
    }
}

/// What every service of a layer shares.
pub(crate) struct LayerState<D> {
    sync: D,
    namer: Namer,
    options: DistMutexOptions,
    wait: Duration,
    reject_missing: bool,
    release: ReleaseOn,
    lost: OnLost,
    extend_every: Duration,
    /// The longest validity of an acquisition: `options.validity()`.
    validity: Duration,
    max_hold: Option<Duration>,
    mapper: Option<RejectionMapper>,
    queues: Arc<LocalQueues>,
    /// Live keeper tasks (held locks).
    keepers: Arc<AtomicUsize>,
    /// Why the configuration is invalid, if it is.
    misconfigured: Option<String>,
}
