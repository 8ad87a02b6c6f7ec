//! [`IdempotencyLayer`], its builder, and what it keeps.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use http::header::HeaderName;
use http::request::Parts;

use super::claim::CarriedKey;
use super::fingerprint::Fingerprint;
use crate::error::Error;
use crate::layer::meters::Meters;
use crate::layer::name::Namer;
use crate::layer::{DistLockLayer, DistLockLayerBuilder, MissingKey, OnLost, ReleaseOn};
use crate::options::DistMutexOptions;
use crate::records::Records;
use crate::sync::{DistSync, FastPath};

/// How long a first response is kept by default: 24 hours, as Stripe keeps
/// its keys at least.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The longest response body kept by default: 1 MiB.
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// The longest request body read for the fingerprint by default: 1 MiB.
pub const DEFAULT_MAX_REQUEST_BODY: usize = 1 << 20;

/// The longest TTL accepted.
const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 60 * 60);

/// The largest body limit accepted: a record is one Redis value (at most
/// 512 MB), with room for its head.
const MAX_BODY_LIMIT: usize = 256 << 20;

/// The header that marks a replayed response by default.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// A request's scope: read from its head, `None` when it has none.
pub(crate) type ScopeFn = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// Which first responses are kept, by status. A response that is not kept
/// lets a retry run the handler again.
///
/// The default keeps HTTP 2xx and 4xx (a retry gets the same success or
/// the same client error), but not the 4xx that tell the client to come
/// back later (408 Request Timeout, 409 Conflict, 425 Too Early, 429 Too
/// Many Requests: a timeout or a rate limiter inside the layer), and not
/// 5xx; for gRPC, `OK` and the codes of a
/// request's own fault (`INVALID_ARGUMENT`, `NOT_FOUND`, `ALREADY_EXISTS`,
/// `PERMISSION_DENIED`, `FAILED_PRECONDITION`, `OUT_OF_RANGE`,
/// `UNAUTHENTICATED`), not those of a passing failure (`UNAVAILABLE`,
/// `INTERNAL`, `DEADLINE_EXCEEDED`, `ABORTED`, ...). A panicking or
/// handler dropped before it returned, a failed body and a lost lock never
/// keep anything.
///
/// ```
/// use http::StatusCode;
/// use tower_dsync::idempotency::StorePolicy;
///
/// let policy = StorePolicy::default();
/// assert!(policy.keeps_http(StatusCode::CREATED));
/// assert!(policy.keeps_http(StatusCode::UNPROCESSABLE_ENTITY));
/// assert!(!policy.keeps_http(StatusCode::TOO_MANY_REQUESTS));
/// assert!(!policy.keeps_http(StatusCode::BAD_GATEWAY));
/// assert!(policy.keeps_grpc(0) && !policy.keeps_grpc(14));
///
/// // Successes only.
/// let strict = StorePolicy::default().http(|status| status.is_success()).grpc(|code| code == 0);
/// assert!(!strict.keeps_http(StatusCode::NOT_FOUND));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct StorePolicy {
    pub(crate) http: fn(StatusCode) -> bool,
    pub(crate) grpc: fn(u16) -> bool,
}

impl Default for StorePolicy {
    fn default() -> Self {
        StorePolicy {
            http: |status| {
                status.is_success()
                    || (status.is_client_error()
                        && !matches!(status.as_u16(), 408 | 409 | 425 | 429))
            },
            grpc: |code| matches!(code, 0 | 3 | 5 | 6 | 7 | 9 | 11 | 16),
        }
    }
}

impl StorePolicy {
    /// Which HTTP statuses are kept.
    pub fn http(mut self, keep: fn(StatusCode) -> bool) -> Self {
        self.http = keep;
        self
    }

    /// Which gRPC status codes are kept.
    pub fn grpc(mut self, keep: fn(u16) -> bool) -> Self {
        self.grpc = keep;
        self
    }

    /// Whether a response with this HTTP status is kept.
    pub fn keeps_http(&self, status: StatusCode) -> bool {
        (self.http)(status)
    }

    /// Whether a gRPC response with this status code is kept.
    pub fn keeps_grpc(&self, code: u16) -> bool {
        (self.grpc)(code)
    }
}

/// What every service of one [`IdempotencyLayer`] shares.
pub(crate) struct Settings {
    pub(crate) records: Records,
    /// A key's lock (and record) name: `namespace + separator + key`.
    pub(crate) namer: Namer,
    pub(crate) separator: String,
    pub(crate) scope: Option<Arc<ScopeFn>>,
    pub(crate) fingerprint: Fingerprint,
    pub(crate) policy: StorePolicy,
    pub(crate) ttl: Duration,
    pub(crate) max_body: usize,
    pub(crate) max_request_body: usize,
    pub(crate) missing: MissingKey,
    /// How long a node of the backend is waited for.
    pub(crate) timeout: Duration,
    /// How long a node is waited for to write a record.
    pub(crate) write_timeout: Duration,
    pub(crate) replay_header: HeaderName,
    /// The lock layer's meters: rejections of this layer count there too.
    pub(crate) meters: Meters,
}

/// A Tower layer that makes a keyed request run once: the first request
/// with an idempotency key runs under the key's lock and its response is
/// kept; a retry with the same key and the same request gets that response
/// back, byte for byte, without running the handler, on any replica that
/// shares the backend. See [the module docs](super) for the rules and the
/// status codes.
///
/// ```
/// use std::convert::Infallible;
/// use http::{Request, Response};
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_dsync::MemorySync;
/// use tower_dsync::idempotency::{IdempotencyLayer, RequestBody};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
/// let layer = IdempotencyLayer::builder(MemorySync::new()).namespace("charges").build()?;
/// let charges = ServiceBuilder::new().layer(layer).service_fn(
///     |_: Request<RequestBody<String>>| async { Ok::<_, Infallible>(Response::new("charged".to_owned())) },
/// );
/// let request = || Request::post("/charges").header("idempotency-key", "k1").body(String::new()).unwrap();
/// let first = charges.clone().oneshot(request()).await.unwrap();
/// assert_eq!(first.status(), 200);
/// # let _ = http_body_util::BodyExt::collect(first.into_body()).await;
/// let retry = charges.oneshot(request()).await.unwrap();
/// assert_eq!(retry.headers()["idempotent-replayed"], "true");
/// # Ok(()) }
/// ```
pub struct IdempotencyLayer<D: DistSync, K> {
    pub(crate) lock: DistLockLayer<D, CarriedKey>,
    pub(crate) settings: Arc<Settings>,
    pub(crate) extractor: K,
}

impl<D: DistSync, K: Clone> Clone for IdempotencyLayer<D, K> {
    fn clone(&self) -> Self {
        IdempotencyLayer {
            lock: self.lock.clone(),
            settings: self.settings.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<D: DistSync, K> fmt::Debug for IdempotencyLayer<D, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("lock", &self.lock)
            .field("ttl", &self.settings.ttl)
            .field("max_body", &self.settings.max_body)
            .finish_non_exhaustive()
    }
}

impl<D: DistSync> IdempotencyLayer<D, crate::layer::HeaderKey> {
    /// Starts the configuration of a layer keyed by the `Idempotency-Key`
    /// header, on `sync`; see [`IdempotencyLayerBuilder`] for the settings.
    ///
    /// ```
    /// let layer = tower_dsync::idempotency::IdempotencyLayer::builder(tower_dsync::MemorySync::new()).build()?;
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn builder(sync: D) -> IdempotencyLayerBuilder<D, crate::layer::HeaderKey> {
        Self::builder_with_key(sync, crate::layer::HeaderKey::new("idempotency-key"))
    }
}

impl<D: DistSync, K> IdempotencyLayer<D, K> {
    /// Starts the configuration of a layer keyed by `extractor` (any
    /// [`KeyExtractor`](crate::layer::KeyExtractor): a gRPC metadata entry,
    /// a path segment, a closure).
    ///
    /// ```
    /// use tower_dsync::idempotency::IdempotencyLayer;
    /// use tower_dsync::layer::GrpcMetadataKey;
    ///
    /// let layer = IdempotencyLayer::builder_with_key(
    ///     tower_dsync::MemorySync::new(),
    ///     GrpcMetadataKey::new("idempotency-key"),
    /// ).build()?;
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn builder_with_key(sync: D, extractor: K) -> IdempotencyLayerBuilder<D, K> {
        IdempotencyLayerBuilder {
            lock: DistLockLayer::builder(sync.clone(), CarriedKey).namespace("idempotency"),
            sync,
            namespace: "idempotency".to_owned(),
            options: DistMutexOptions::default(),
            extractor,
            scope: None,
            fingerprint: Fingerprint::default(),
            policy: StorePolicy::default(),
            ttl: DEFAULT_TTL,
            max_body: DEFAULT_MAX_BODY,
            max_request_body: DEFAULT_MAX_REQUEST_BODY,
            missing: MissingKey::Reject,
            replay_header: HeaderName::from_static(REPLAYED_HEADER),
        }
    }
}

/// Builds an [`IdempotencyLayer`]; [`build`](Self::build) refuses settings
/// that cannot work.
///
/// | setting | default |
/// |---|---|
/// | key | the `Idempotency-Key` header |
/// | [`namespace`](Self::namespace) | `idempotency` |
/// | [`scope`](Self::scope) | none: keys are global to the namespace |
/// | [`fingerprint`](Self::fingerprint) | method, path and query, body |
/// | [`ttl`](Self::ttl) | 24 hours ([`DEFAULT_TTL`]) |
/// | [`max_body`](Self::max_body) | 1 MiB ([`DEFAULT_MAX_BODY`]) |
/// | [`max_request_body`](Self::max_request_body) | 1 MiB |
/// | [`store_policy`](Self::store_policy) | 2xx and 4xx; gRPC `OK` and client errors |
/// | [`on_missing_key`](Self::on_missing_key) | reject (400) |
/// | [`wait`](Self::wait) | 5 s ([`DEFAULT_WAIT`](crate::layer::DEFAULT_WAIT)) |
///
/// ```
/// use std::time::Duration;
/// use tower_dsync::MemorySync;
/// use tower_dsync::idempotency::{Fingerprint, IdempotencyLayer};
///
/// let layer = IdempotencyLayer::builder(MemorySync::new())
///     .namespace("payments")
///     .scope_header("x-account")
///     .ttl(Duration::from_secs(48 * 3600))
///     .max_body(64 * 1024)
///     .fingerprint(Fingerprint::without_body())
///     .wait(Duration::from_secs(10))
///     .build()?;
/// # Ok::<(), tower_dsync::Error>(())
/// ```
#[must_use = "a builder does nothing until `build` is called"]
pub struct IdempotencyLayerBuilder<D: DistSync, K> {
    lock: DistLockLayerBuilder<D, CarriedKey>,
    sync: D,
    namespace: String,
    options: DistMutexOptions,
    extractor: K,
    scope: Option<Arc<ScopeFn>>,
    fingerprint: Fingerprint,
    policy: StorePolicy,
    ttl: Duration,
    max_body: usize,
    max_request_body: usize,
    missing: MissingKey,
    replay_header: HeaderName,
}

impl<D: DistSync, K> fmt::Debug for IdempotencyLayerBuilder<D, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("lock", &self.lock)
            .field("namespace", &self.namespace)
            .field("fingerprint", &self.fingerprint)
            .field("ttl", &self.ttl)
            .field("max_body", &self.max_body)
            .field("max_request_body", &self.max_request_body)
            .finish_non_exhaustive()
    }
}

impl<D: DistSync, K> IdempotencyLayerBuilder<D, K> {
    /// The first part of every lock and record name.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self.lock = self.lock.namespace(self.namespace.clone());
        self
    }

    /// Scopes keys by a part of the request head (the authenticated
    /// principal, from a header or an extension), so that two clients'
    /// keys never meet. A request without a scope is refused with 400.
    ///
    /// ```
    /// # struct Principal(String);
    /// let layer = tower_dsync::idempotency::IdempotencyLayer::builder(tower_dsync::MemorySync::new())
    ///     .scope(|head| head.extensions.get::<Principal>().map(|p| p.0.clone()))
    ///     .build()?;
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn scope(
        mut self,
        scope: impl Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.scope = Some(Arc::new(scope));
        self
    }

    /// Scopes keys by the value of a request header (see
    /// [`scope`](Self::scope)); a header that is not visible ASCII counts as
    /// missing.
    pub fn scope_header(self, name: &'static str) -> Self {
        let name = HeaderName::from_static(name);
        self.scope(move |head| {
            let value = head.headers.get(&name)?.to_str().ok()?;
            Some(value.to_owned())
        })
    }

    /// How a request's fingerprint is made.
    pub fn fingerprint(mut self, fingerprint: Fingerprint) -> Self {
        self.fingerprint = fingerprint;
        self
    }

    /// Which first responses are kept.
    pub fn store_policy(mut self, policy: StorePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// How long a first response is kept; a retry after it runs the
    /// handler again.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The longest response body kept. A longer response streams to its
    /// client whole, and a retry gets 409 (`ALREADY_EXISTS` for gRPC),
    /// [`RejectionKind::NotReplayable`](crate::layer::RejectionKind::NotReplayable):
    /// the request completed and is not run again.
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = bytes;
        self
    }

    /// The longest request body read for the fingerprint; a longer one is
    /// refused with 413 (`RESOURCE_EXHAUSTED`).
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// What a request without a key gets: [`MissingKey::Reject`] (400, the
    /// default), or [`MissingKey::PassThrough`] (served unlocked, nothing kept).
    pub fn on_missing_key(mut self, missing: MissingKey) -> Self {
        self.missing = missing;
        self
    }

    /// The header that marks a replayed response (`idempotent-replayed:
    /// true` by default).
    pub fn replay_header(mut self, name: HeaderName) -> Self {
        self.replay_header = name;
        self
    }

    /// How long a duplicate waits for the first request with its key to
    /// finish, to get its response; past it, 409 with `Retry-After`
    /// (`ABORTED`). See [`DistLockLayerBuilder::wait`].
    pub fn wait(mut self, budget: Duration) -> Self {
        self.lock = self.lock.wait(budget);
        self
    }

    /// The options of each key's lock (expiry, tries, node timeout); see
    /// [`DistLockLayerBuilder::mutex_options`].
    pub fn mutex_options(mut self, options: DistMutexOptions) -> Self {
        self.options = options.clone();
        self.lock = self.lock.mutex_options(options);
        self
    }

    /// What the handler's lock loss does; see
    /// [`DistLockLayerBuilder::on_lost`]. Whatever it is, a response whose
    /// lock was lost is not kept.
    pub fn on_lost(mut self, lost: OnLost) -> Self {
        self.lock = self.lock.on_lost(lost);
        self
    }

    /// How often a held lock is extended; see
    /// [`DistLockLayerBuilder::extend_every`].
    pub fn extend_every(mut self, interval: Duration) -> Self {
        self.lock = self.lock.extend_every(interval);
        self
    }

    /// The longest a request holds its lock; see
    /// [`DistLockLayerBuilder::max_hold`].
    pub fn max_hold(mut self, limit: Duration) -> Self {
        self.lock = self.lock.max_hold(limit);
        self
    }

    /// Checks the settings and makes the layer. Refused: a backend that
    /// keeps no records, a TTL under 1 ms or over 366 days, a body limit of
    /// zero or over 256 MiB, and whatever
    /// [`DistLockLayerBuilder::build`] refuses.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_dsync::{Error, MemorySync};
    /// use tower_dsync::idempotency::IdempotencyLayer;
    ///
    /// let refused = IdempotencyLayer::builder(MemorySync::new()).ttl(Duration::ZERO).build();
    /// assert!(matches!(refused, Err(Error::InvalidConfig { .. })));
    /// ```
    pub fn build(self) -> crate::Result<IdempotencyLayer<D, K>> {
        let invalid = |reason: &str| Error::InvalidConfig {
            reason: reason.to_owned(),
            source: None,
        };
        if self.ttl < Duration::from_millis(1) || self.ttl > MAX_TTL {
            return Err(invalid("the idempotency TTL must be from 1 ms to 366 days"));
        }
        if !(1..=MAX_BODY_LIMIT).contains(&self.max_body)
            || !(1..=MAX_BODY_LIMIT).contains(&self.max_request_body)
        {
            return Err(invalid(
                "the idempotency body limits must be from 1 byte to 256 MiB (a record is one Redis value)",
            ));
        }
        let records = self.sync.records(FastPath::new()).ok_or_else(|| {
            invalid("this backend keeps no records: it cannot back an IdempotencyLayer")
        })?;
        let lock = self
            .lock
            .release_on(ReleaseOn::BodyEnd)
            .on_missing_key(MissingKey::PassThrough)
            .keys_are_names()
            .build()?;
        let separator = self.sync.separator().to_owned();
        let settings = Settings {
            records,
            namer: Namer::new(&self.namespace, &separator),
            separator,
            scope: self.scope,
            fingerprint: self.fingerprint,
            policy: self.policy,
            ttl: self.ttl,
            max_body: self.max_body,
            max_request_body: self.max_request_body,
            missing: self.missing,
            timeout: self.options.node_timeout(),
            // A record can be large: its write gets at least a second.
            write_timeout: self.options.node_timeout().max(Duration::from_secs(1)),
            replay_header: self.replay_header,
            meters: lock.shared.meters.clone(),
        };
        Ok(IdempotencyLayer {
            lock,
            settings: Arc::new(settings),
            extractor: self.extractor,
        })
    }
}
