//! The service that [`DistLockLayer`] wraps around an inner service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::CONTENT_TYPE;
use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::acquire::{Start, acquire, start};
use super::body::LockBody;
use super::deadline;
use super::extract::KeyExtractor;
use super::future::ResponseFuture;
use super::lock_layer::{DistLockLayer, DistLockLayerBuilder};
use super::rejection::Rejection;
use super::settings::{MissingKey, OnLost};
use super::state::LayerState;
use super::stats::LockStats;
use crate::sync::DistSync;

/// Holds a distributed lock per request key around an inner service. Made
/// by [`DistLockLayer`] (as a [`Layer`](tower_layer::Layer)) or by
/// [`DistLock::new`]; cheap to clone.
pub struct DistLock<S, D: DistSync, K> {
    inner: S,
    shared: Arc<LayerState<D>>,
    extractor: K,
}

impl<S: Clone, D: DistSync, K: Clone> Clone for DistLock<S, D, K> {
    fn clone(&self) -> Self {
        DistLock {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<S, D: DistSync, K> fmt::Debug for DistLock<S, D, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DistLock")
            .field("sync", &self.shared.sync)
            .finish_non_exhaustive()
    }
}

impl<S, D: DistSync, K> DistLock<S, D, K> {
    /// Wraps `inner` with `layer`'s locking: what
    /// [`Layer::layer`](tower_layer::Layer::layer) does. Services made from
    /// one layer (or its clones) share its in-process line and its counters.
    ///
    /// ```
    /// use std::convert::Infallible;
    /// use tower::service_fn;
    /// use tower_dsync::MemorySync;
    /// use tower_dsync::layer::{DistLock, DistLockLayer, HeaderKey};
    ///
    /// let layer = DistLockLayer::builder(MemorySync::new(), HeaderKey::new("x-id")).build()?;
    /// let handler = service_fn(|_: http::Request<()>| async {
    ///     Ok::<_, Infallible>(http::Response::new(String::new()))
    /// });
    /// let service = DistLock::new(handler, layer);
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn new(inner: S, layer: DistLockLayer<D, K>) -> Self {
        DistLock {
            inner,
            shared: layer.shared,
            extractor: layer.extractor,
        }
    }

    /// The inner service.
    ///
    /// ```
    /// use tower_dsync::MemorySync;
    /// use tower_dsync::layer::{DistLock, DistLockLayer, MethodPath};
    ///
    /// let layer = DistLockLayer::builder(MemorySync::new(), MethodPath).build()?;
    /// let service = DistLock::new("inner", layer);
    /// assert_eq!(*service.get_ref(), "inner");
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, to change.
    ///
    /// ```
    /// use tower_dsync::MemorySync;
    /// use tower_dsync::layer::{DistLock, DistLockLayer, MethodPath};
    ///
    /// let layer = DistLockLayer::builder(MemorySync::new(), MethodPath).build()?;
    /// let mut service = DistLock::new(1, layer);
    /// *service.get_mut() += 1;
    /// assert_eq!(*service.get_ref(), 2);
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, without the locking. Requests already started
    /// keep their locks until they end.
    ///
    /// ```
    /// use tower_dsync::MemorySync;
    /// use tower_dsync::layer::{DistLock, DistLockLayer, MethodPath};
    ///
    /// let layer = DistLockLayer::builder(MemorySync::new(), MethodPath).build()?;
    /// let service = DistLock::new("inner", layer);
    /// assert_eq!(service.into_inner(), "inner");
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// The counters of the requests of this service's layer (keys in
    /// flight, locks held), over every service it made; see [`LockStats`].
    ///
    /// ```
    /// use tower_dsync::MemorySync;
    /// use tower_dsync::layer::{DistLock, DistLockLayer, MethodPath};
    ///
    /// let layer = DistLockLayer::builder(MemorySync::new(), MethodPath).build()?;
    /// let service = DistLock::new((), layer);
    /// assert_eq!(service.stats().held_locks(), 0);
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn stats(&self) -> LockStats {
        self.shared.stats()
    }
}

// In its own block, for any service type: `DistLock::layer(..)` then needs
// no annotation for the service the layer will wrap, which it cannot know.
impl<D: DistSync, K> DistLock<(), D, K> {
    /// Starts the configuration of the layer that makes this service:
    /// the same as [`DistLockLayer::builder`]. Its
    /// [`build`](DistLockLayerBuilder::build) checks the settings and gives
    /// the layer.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_dsync::MemorySync;
    /// use tower_dsync::layer::{DistLock, HeaderKey};
    ///
    /// let layer = DistLock::layer(MemorySync::new(), HeaderKey::new("x-id"))
    ///     .wait(Duration::ZERO)
    ///     .build()?;
    /// # Ok::<(), tower_dsync::Error>(())
    /// ```
    pub fn layer(sync: D, extractor: K) -> DistLockLayerBuilder<D, K> {
        DistLockLayer::builder(sync, extractor)
    }
}

impl<S, D, K, ReqB, ResB> Service<Request<ReqB>> for DistLock<S, D, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone,
    D: DistSync,
    K: KeyExtractor<ReqB>,
{
    type Response = Response<LockBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    /// Always ready: the inner service's readiness is driven by each
    /// request's future, once its lock is held, so that a request waiting
    /// for a busy key holds none of the inner service's capacity (as
    /// tower's `Buffer` and `Oneshot` do, with a clone of the service).
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        // This request's own clone, driven ready by its future.
        let inner = self.inner.clone();
        let shared = &self.shared;
        // Read when needed: for a rejection, the abort option or a wait.
        let reject = |rejection: Rejection| {
            shared.meters.rejected(rejection.kind());
            ResponseFuture::rejected(rejection, shared.mapper.clone())
        };
        let key = match self.extractor.extract(&request) {
            Ok(Some(key)) => key,
            Ok(None) if shared.missing == MissingKey::Reject => {
                return reject(Rejection::missing_key(is_grpc(&request)));
            }
            Ok(None) => return ResponseFuture::unlocked(inner, request),
            Err(error) => return reject(Rejection::for_key_error(&error, is_grpc(&request))),
        };
        let named = if shared.keys_are_names {
            Ok(Arc::from(&*key))
        } else {
            shared.namer.name(&key)
        };
        let name = match named {
            Ok(name) => name,
            Err(error) => return reject(Rejection::for_key_error(&error, is_grpc(&request))),
        };
        // A free key on a backend that answers at once is locked here, and
        // the inner service called at once; otherwise the response future
        // waits for the lock.
        match start(shared, name) {
            Start::Held(holding) => {
                let grpc = shared.lost == OnLost::Abort && is_grpc(&request);
                let mut request = request;
                request.extensions_mut().insert(holding.held);
                let mapper = shared.mapper.clone();
                ResponseFuture::serving(inner, request, holding.guard, mapper, grpc)
            }
            Start::Failed(name, error) => {
                let expiry = shared.options.expiry();
                reject(Rejection::for_lock_error(
                    &name,
                    error,
                    is_grpc(&request),
                    expiry,
                ))
            }
            Start::Wait(waiting) => {
                let grpc = is_grpc(&request);
                let deadline = deadline::of(&request, grpc);
                ResponseFuture::acquiring(
                    Box::pin(acquire(shared.clone(), waiting, grpc, deadline)),
                    inner,
                    request,
                    shared.mapper.clone(),
                    grpc,
                )
            }
        }
    }
}

/// gRPC calls carry `content-type: application/grpc`, `application/grpc+proto`
/// and the like (not gRPC-Web, whose responses differ).
pub(crate) fn is_grpc<B>(request: &Request<B>) -> bool {
    request.headers().get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .strip_prefix(b"application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
    })
}

impl<S, D: DistSync, K: Clone> Layer<S> for DistLockLayer<D, K> {
    type Service = DistLock<S, D, K>;

    fn layer(&self, inner: S) -> Self::Service {
        DistLock::new(inner, self.clone())
    }
}
