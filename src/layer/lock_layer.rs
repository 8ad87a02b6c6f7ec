//! [`DistLockLayer`] and its builder: the configuration, checked once when the layer is
//! built, so that a server with an invalid one fails at start-up instead of
//! answering every request with an error.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::alarm::AlarmClock;
use super::meters::Meters;
use super::name::Namer;
use super::rejection::{Rejection, RejectionMapper};
use super::settings::{MIN_EXTEND_EVERY, MissingKey, OnLost, ReleaseOn};
use super::state::LayerState;
use super::stats::LockStats;
use crate::error::Error;
use crate::options::DistMutexOptions;
use crate::sync::{DistSync, FastPath, MAX_NAME_LEN, validate_name};

/// The default wait budget: how long a request may wait for a busy key.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

/// A [`Layer`](tower_layer::Layer) that holds a distributed lock per request key, for the life
/// of the request. See the [module documentation](crate::layer) for the request
/// lifecycle.
///
/// Made by [`builder`](Self::builder), whose `build` refuses a
/// configuration that cannot work, so a layer always can. Works with any
/// [`DistSync`] backend (generic, or [`AnySync`](crate::AnySync) chosen at
/// run time). Cheap to clone; every service made by one layer (and its
/// clones) shares one in-process line per key, and the counters that
/// [`stats`](Self::stats) reads. Over a backend that keeps a line of its
/// own, as [`RedisSync`](crate::RedisSync) does, the layer waits in that
/// one: a request waits in one line, together with the backend's other
/// callers of the same name.
///
/// ```
/// use std::time::Duration;
/// use tower_dsync::layer::{DistLockLayer, PathSegment};
/// use tower_dsync::MemorySync;
///
/// let layer = DistLockLayer::builder(MemorySync::new(), PathSegment::new(1))
///     .namespace("jobs")
///     .wait(Duration::from_secs(2))
///     .build()?;
/// assert_eq!(layer.stats().local_keys(), 0);
/// # Ok::<(), tower_dsync::Error>(())
/// ```
pub struct DistLockLayer<D: DistSync, K> {
    pub(crate) shared: Arc<LayerState<D>>,
    pub(crate) extractor: K,
}

impl<D: DistSync, K: Clone> Clone for DistLockLayer<D, K> {
    fn clone(&self) -> Self {
        DistLockLayer {
            shared: self.shared.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<D: DistSync, K> fmt::Debug for DistLockLayer<D, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistLockLayer")
            .field("sync", &self.shared.sync)
            .field("options", &self.shared.options)
            .field("wait", &self.shared.wait)
            .field("extend_every", &self.shared.extend_every)
            .field("max_hold", &self.shared.max_hold)
            .finish_non_exhaustive()
    }
}

impl<D: DistSync, K> DistLockLayer<D, K> {
    /// Starts the configuration of a layer that locks each request's key,
    /// read by `extractor`, on `sync`; see [`DistLockLayerBuilder`] for the
    /// settings and their defaults.
    ///
    /// There is no shortcut that skips [`build`](DistLockLayerBuilder::build):
    /// even the defaults fail on a backend whose separator cannot keep
    /// namespaces apart, and that is refused at start-up.
    pub fn builder(sync: D, extractor: K) -> DistLockLayerBuilder<D, K> {
        DistLockLayerBuilder::new(sync, extractor)
    }

    /// The counters of this layer's requests (keys in flight, locks held),
    /// over every service it made; see [`LockStats`].
    pub fn stats(&self) -> LockStats {
        self.shared.stats()
    }
}

/// Builds a [`DistLockLayer`]: made by [`DistLockLayer::builder`], each
/// setter changes one setting, and [`build`](Self::build) checks them all
/// and gives the layer, or the reason it cannot work.
///
/// Defaults: namespace `lock`, the default mutex options (8 s expiry), a
/// wait budget of [`DEFAULT_WAIT`], requests without a key pass through,
/// release at the end of the body, a lost lock is reported to the handler,
/// extensions every `expiry / 3`, no limit on how long a request holds its
/// lock, the default rejection responses.
///
/// ```
/// use std::time::Duration;
/// use tower_dsync::layer::{DistLockLayer, MissingKey, OnLost, PathSegment, ReleaseOn};
/// use tower_dsync::{DistMutexOptions, MemorySync};
///
/// let layer = DistLockLayer::builder(MemorySync::new(), PathSegment::new(1))
///     .namespace("jobs")
///     .mutex_options(DistMutexOptions::default().with_expiry(Duration::from_secs(30)))
///     .wait(Duration::from_secs(2))
///     .on_missing_key(MissingKey::Reject)
///     .release_on(ReleaseOn::Head)
///     .on_lost(OnLost::Abort)
///     .extend_every(Duration::from_secs(5))
///     .build()?;
/// # Ok::<(), tower_dsync::Error>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct DistLockLayerBuilder<D: DistSync, K> {
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
    keys_are_names: bool,
}

impl<D: DistSync, K: Clone> Clone for DistLockLayerBuilder<D, K> {
    fn clone(&self) -> Self {
        DistLockLayerBuilder {
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
            keys_are_names: self.keys_are_names,
        }
    }
}

impl<D: DistSync, K> fmt::Debug for DistLockLayerBuilder<D, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistLockLayerBuilder")
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

impl<D: DistSync, K> DistLockLayerBuilder<D, K> {
    pub(super) fn new(sync: D, extractor: K) -> Self {
        DistLockLayerBuilder {
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
            keys_are_names: false,
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
    /// let layer = DistLockLayer::builder(MemorySync::new(), HeaderKey::new("x-id"))
    ///     .max_hold(Duration::from_secs(300))
    ///     .build()?;
    /// # Ok::<(), tower_dsync::Error>(())
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
    /// let layer = DistLockLayer::builder(MemorySync::new(), HeaderKey::new("x-id"))
    ///     .rejection_response(|rejection| {
    ///         let mut response = rejection.clone().into_response();
    ///         if rejection.kind() == RejectionKind::Busy && !rejection.is_grpc() {
    ///             *response.body_mut() = r#"{"error":"busy"}"#.into();
    ///             response.headers_mut().insert("content-type", "application/json".parse().unwrap());
    ///         }
    ///         response
    ///     })
    ///     .build()?;
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn rejection_response(
        mut self,
        map: impl Fn(Rejection) -> http::Response<Bytes> + Send + Sync + 'static,
    ) -> Self {
        self.mapper = Some(Arc::new(map));
        self
    }

    /// Checks the settings and gives the layer. Call it at start-up: a
    /// layer exists only with a configuration that can lock every valid
    /// key, so no request is ever answered with a configuration error.
    ///
    /// # Errors
    ///
    /// - [`Error::InvalidOptions`]: mutex options that
    ///   [`DistMutexOptions::validate`] refuses, or a validity
    ///   (`expiry - drift`) under 2 ms, too short to extend in time;
    /// - [`Error::InvalidName`]: an empty namespace, or one with a control
    ///   character;
    /// - [`Error::InvalidConfig`]: a backend with an empty separator, or one
    ///   that holds `%` or an ASCII hex digit (the characters of a key's
    ///   escapes), either of which could let two namespaces share a lock;
    ///   a namespace and separator that leave no room for a key.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_dsync::{DistMutexOptions, Error, MemorySync};
    /// use tower_dsync::layer::{DistLockLayer, MethodPath};
    ///
    /// let refused = DistLockLayer::builder(MemorySync::new(), MethodPath)
    ///     .mutex_options(DistMutexOptions::default().with_expiry(Duration::ZERO))
    ///     .build();
    /// assert!(matches!(refused, Err(Error::InvalidOptions { .. })));
    /// ```
    pub fn build(self) -> crate::Result<DistLockLayer<D, K>> {
        self.check()?;
        let validity = self.options.validity();
        let extend_every = self
            .extend_every
            .unwrap_or(self.options.expiry() / 3)
            .min(validity / 2)
            .max(MIN_EXTEND_EVERY);
        let line = self.sync.local_line(FastPath::new());
        let shared = LayerState {
            queues: line
                .as_ref()
                .map(|line| line.queues.clone())
                .unwrap_or_default(),
            line,
            namer: Namer::new(&self.namespace, self.sync.separator()),
            sync: self.sync,
            options: self.options,
            wait: self.wait,
            missing: self.missing,
            release: self.release,
            lost: self.lost,
            extend_every,
            validity,
            max_hold: self.max_hold,
            mapper: self.mapper,
            keys_are_names: self.keys_are_names,
            held_count: Arc::default(),
            alarms: AlarmClock::default(),
            meters: Meters::new(&self.namespace),
        };
        Ok(DistLockLayer {
            shared: Arc::new(shared),
            extractor: self.extractor,
        })
    }

    /// Takes each key as the whole lock name, for a layer in front that
    /// builds names itself (the idempotency layer, whose scoped names have
    /// a level more than a key can give).
    pub(crate) fn keys_are_names(mut self) -> Self {
        self.keys_are_names = true;
        self
    }

    /// Why this configuration cannot work, if it cannot.
    fn check(&self) -> crate::Result<()> {
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
}
