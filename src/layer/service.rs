//! The service that [`DistLockLayer`](super::DistLockLayer) wraps around
//! an inner service.

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::CONTENT_TYPE;
use http::{Request, Response};
use tower_service::Service;

use super::acquire::{Start, acquire, start};
use super::body::LockBody;
use super::extract::KeyExtractor;
use super::future::ResponseFuture;
use super::rejection::Rejection;
use super::{LayerState, OnLost};
use crate::sync::DistSync;

/// Holds a distributed lock per request key around an inner service. Made
/// by [`DistLockLayer`](super::DistLockLayer); cheap to clone.
pub struct DistLock<S, D: DistSync, K> {
    pub(crate) inner: S,
    pub(crate) shared: Arc<LayerState<D>>,
    pub(crate) extractor: K,
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
    /// The number of keys with requests in flight in this process (waiting
    /// or holding). Zero when idle: the per-key entries go away with their
    /// last request.
    pub fn local_keys(&self) -> usize {
        self.shared.queues.len()
    }

    /// The number of locks held now by the requests of this service's
    /// layer (see [`DistLockLayer::held_locks`](super::DistLockLayer::held_locks)).
    pub fn held_locks(&self) -> usize {
        self.shared
            .keepers
            .load(std::sync::atomic::Ordering::Acquire)
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
        let reject = |rejection| ResponseFuture::rejected(rejection, shared.mapper.clone());
        let key = match self.extractor.extract(&request) {
            Ok(Some(key)) => key,
            Ok(None) if shared.reject_missing => {
                return reject(Rejection::missing_key(is_grpc(&request)));
            }
            Ok(None) => return ResponseFuture::unlocked(inner, request),
            Err(error) => return reject(Rejection::for_key_error(&error, is_grpc(&request))),
        };
        // Before naming: a namespace that leaves no room for a key is the
        // server's fault, not the client's.
        if let Some(reason) = &shared.misconfigured {
            return reject(Rejection::misconfigured(reason.clone(), is_grpc(&request)));
        }
        let name = match shared.namer.name(&key) {
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
                ResponseFuture::acquiring(
                    Box::pin(acquire(shared.clone(), waiting, grpc)),
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
fn is_grpc<B>(request: &Request<B>) -> bool {
    request.headers().get(CONTENT_TYPE).is_some_and(|v| {
        v.as_bytes()
            .strip_prefix(b"application/grpc")
            .is_some_and(|rest| rest.is_empty() || rest[0] == b'+' || rest[0] == b';')
    })
}
