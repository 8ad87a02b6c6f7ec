//! The services of the idempotency layer: [`Idempotent`] in front (key,
//! fingerprint, a replay without the lock when the record is there), a
//! [`DistLock`] on the request's name, then the recorder behind it (the
//! record read again under the lock, else the handler run and its response
//! recorded).

use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Body;
use tokio::sync::watch;
use tower_layer::Layer;
use tower_service::Service;

use super::body::{Finish, IdempotentBody, ReadError, RequestBody, read_whole};
use super::claim::{CarriedKey, Claim};
use super::layer::{IdempotencyLayer, Settings};
use super::record::{Kept, Outcome, Record};
use crate::error::BoxError;
use crate::layer::extract::KeyError;
use crate::layer::name::Namer;
use crate::layer::{
    DistLock, HeldLock, KeyExtractor, LockBody, MissingKey, Rejection, RejectionKind,
};
use crate::records::Writer;
use crate::sync::DistSync;

/// The response future of [`Idempotent`].
pub type IdempotentFuture<ResB, E> =
    Pin<Box<dyn Future<Output = Result<Response<LockBody<IdempotentBody<ResB>>>, E>> + Send>>;

/// Answers a request with a key whose first response is kept, and locks
/// the key around the handler otherwise, recording its response. Made by
/// [`IdempotencyLayer`]; cheap to clone.
pub struct Idempotent<S, D: DistSync, K> {
    lock: DistLock<Recorder<S>, D, CarriedKey>,
    settings: Arc<Settings>,
    extractor: K,
}

impl<S: Clone, D: DistSync, K: Clone> Clone for Idempotent<S, D, K> {
    fn clone(&self) -> Self {
        Idempotent {
            lock: self.lock.clone(),
            settings: self.settings.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<S, D: DistSync, K> fmt::Debug for Idempotent<S, D, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idempotent")
            .field("lock", &self.lock)
            .finish_non_exhaustive()
    }
}

impl<S, D: DistSync, K: Clone> Layer<S> for IdempotencyLayer<D, K> {
    type Service = Idempotent<S, D, K>;

    fn layer(&self, inner: S) -> Self::Service {
        let recorder = Recorder {
            inner,
            settings: self.settings.clone(),
        };
        Idempotent {
            lock: DistLock::new(recorder, self.lock.clone()),
            settings: self.settings.clone(),
            extractor: self.extractor.clone(),
        }
    }
}

impl<S, D, K, ReqB, ResB> Service<Request<ReqB>> for Idempotent<S, D, K>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    D: DistSync,
    K: KeyExtractor<ReqB>,
    ReqB: Body + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<LockBody<IdempotentBody<ResB>>>;
    type Error = S::Error;
    type Future = IdempotentFuture<ResB, S::Error>;

    /// Always ready, as [`DistLock`] is: the handler's readiness is driven
    /// once the lock is held.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let grpc = crate::layer::is_grpc(&request);
        let settings = self.settings.clone();
        let mut lock = self.lock.clone();
        let rejecting = settings.clone();
        let reject = move |rejection: Rejection| -> Self::Future {
            Box::pin(std::future::ready(Ok(rejecting.reject(rejection))))
        };
        let key = match self.extractor.extract(&request) {
            Ok(Some(key)) => key.into_owned(),
            Ok(None) if settings.missing == MissingKey::Reject => {
                return reject(Rejection::new(
                    RejectionKind::MissingKey,
                    "the request has no idempotency key",
                    grpc,
                ));
            }
            Ok(None) => {
                // Through, unlocked and unrecorded: no key, no claim.
                let request = request.map(RequestBody::streaming);
                return Box::pin(lock.call(request));
            }
            Err(error) => return reject(Rejection::for_key_error(&error, grpc)),
        };
        let (parts, body) = request.into_parts();
        let name = match settings.name_of(&parts, &key, grpc) {
            Ok(name) => name,
            Err(rejection) => return reject(rejection),
        };
        Box::pin(async move {
            let (body, read) = if settings.fingerprint.reads_body() {
                match read_whole(body, settings.max_request_body).await {
                    Ok(read) => (RequestBody::full(read.clone()), read),
                    Err(ReadError::TooLarge) => {
                        return Ok(settings.reject(Rejection::new(
                            RejectionKind::TooLarge,
                            format!(
                                "the request body is longer than {} bytes",
                                settings.max_request_body
                            ),
                            grpc,
                        )));
                    }
                    Err(ReadError::Failed(error)) => {
                        tracing::debug!(%error, "the request body failed while it was read");
                        return Ok(settings.reject(Rejection::new(
                            RejectionKind::InvalidKey,
                            "the request body could not be read",
                            grpc,
                        )));
                    }
                }
            } else {
                (RequestBody::streaming(body), Bytes::new())
            };
            let fingerprint = settings.fingerprint.of(&parts, &read);
            drop(read);
            // A retry of a completed request is answered without the lock.
            match settings.lookup(&name, fingerprint, grpc).await {
                Lookup::Answer(response) => {
                    return Ok(
                        (*response).map(|body| LockBody::inner(body, Default::default(), grpc))
                    );
                }
                Lookup::Rejected(rejection) => return Ok(settings.reject(rejection)),
                Lookup::Absent => {}
            }
            let mut request = Request::from_parts(parts, body);
            request.extensions_mut().insert(Claim {
                name,
                fingerprint,
                grpc,
            });
            lock.call(request).await
        })
    }
}

/// What the records say of a request.
pub(crate) enum Lookup<B> {
    /// Nothing kept: run the handler.
    Absent,
    /// The kept response, or the answer for a request that completed
    /// without one to replay.
    Answer(Box<Response<IdempotentBody<B>>>),
    Rejected(Rejection),
}

impl Settings {
    /// The response of `rejection`, counted in the layer's meters.
    fn reject<B>(&self, rejection: Rejection) -> Response<LockBody<B>> {
        self.meters.rejected(rejection.kind());
        rejection.into_response().map(LockBody::full)
    }

    /// The lock's (and the record's) name of `key`: the namespace, then,
    /// with a scope, the scope, then the key, joined by the separator, each
    /// part escaped (`%` and the separator's characters). An escaped part
    /// holds no separator, so a scoped name has one more separator than any
    /// name of an unscoped layer in the same namespace: no two (scope, key)
    /// pairs, and no scoped and unscoped key, share one.
    fn name_of(
        &self,
        parts: &http::request::Parts,
        key: &str,
        grpc: bool,
    ) -> Result<Arc<str>, Rejection> {
        let invalid = |error: KeyError| Rejection::for_key_error(&error, grpc);
        let Some(scope) = &self.scope else {
            return self.namer.name(key).map_err(invalid);
        };
        let Some(scope) = scope(parts) else {
            return Err(Rejection::new(
                RejectionKind::MissingKey,
                "the request has no idempotency scope",
                grpc,
            ));
        };
        let scoped = self.namer.name(&scope).map_err(invalid)?;
        Namer::new(&scoped, &self.separator)
            .name(key)
            .map_err(invalid)
    }

    /// The record of `name`, and what it means for a request with
    /// `fingerprint`.
    pub(crate) async fn lookup<B>(
        &self,
        name: &Arc<str>,
        fingerprint: u128,
        grpc: bool,
    ) -> Lookup<B> {
        let kept = match self
            .records
            .load(name.clone(), self.ttl, self.timeout)
            .await
        {
            Ok(kept) => kept,
            Err(error) => {
                tracing::warn!(%error, name = %name, "idempotency records unavailable");
                return Lookup::Rejected(Rejection::new(
                    RejectionKind::Unavailable,
                    "the idempotency store is unavailable",
                    grpc,
                ));
            }
        };
        let Some(bytes) = kept else {
            return Lookup::Absent;
        };
        let Some(record) = Record::decode(&bytes) else {
            tracing::error!(name = %name, len = bytes.len(), "a malformed idempotency record: treated as absent");
            return Lookup::Absent;
        };
        if record.fingerprint != fingerprint {
            return Lookup::Rejected(Rejection::new(
                RejectionKind::Mismatch,
                "the idempotency key was used with another request",
                grpc,
            ));
        }
        match record.outcome {
            Outcome::Kept(kept) => Lookup::Answer(Box::new(self.replay(*kept))),
            Outcome::TooLarge(status) => Lookup::Rejected(Rejection::new(
                RejectionKind::NotReplayable,
                format!(
                    "the first request with this idempotency key completed ({}), but its \
                     response was too large to keep",
                    status.as_u16()
                ),
                grpc,
            )),
        }
    }

    /// The kept response, marked as a replay.
    fn replay<B>(&self, kept: Kept) -> Response<IdempotentBody<B>> {
        let mut response = Response::new(IdempotentBody::replayed(kept.body, kept.trailers));
        *response.status_mut() = kept.status;
        *response.headers_mut() = kept.headers;
        response
            .headers_mut()
            .insert(self.replay_header.clone(), HeaderValue::from_static("true"));
        response
    }
}

/// Behind the lock: reads the record again (the request it waited for may
/// have left one), else runs the handler and records its response.
pub(crate) struct Recorder<S> {
    inner: S,
    settings: Arc<Settings>,
}

impl<S: Clone> Clone for Recorder<S> {
    fn clone(&self) -> Self {
        Recorder {
            inner: self.inner.clone(),
            settings: self.settings.clone(),
        }
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Recorder<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Send + 'static,
    ResB: Body + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<IdempotentBody<ResB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        // The ready service goes with this request; a clone stays.
        let clone = self.inner.clone();
        let mut inner = mem::replace(&mut self.inner, clone);
        let claim = request.extensions_mut().remove::<Claim>();
        let held = request.extensions().get::<HeldLock>().cloned();
        let (Some(claim), Some(held)) = (claim, held) else {
            let future = inner.call(request);
            return Box::pin(async move { Ok(future.await?.map(IdempotentBody::passing)) });
        };
        let settings = self.settings.clone();
        Box::pin(async move {
            match settings
                .lookup(&claim.name, claim.fingerprint, claim.grpc)
                .await
            {
                Lookup::Answer(response) => return Ok(*response),
                Lookup::Rejected(rejection) => {
                    settings.meters.rejected(rejection.kind());
                    return Ok(rejection.into_response().map(IdempotentBody::full));
                }
                Lookup::Absent => {}
            }
            let response = inner.call(request).await?;
            // An HTTP status the policy does not keep is known at once;
            // a gRPC call's status comes with its trailers.
            if !claim.grpc && !(settings.policy.http)(response.status()) {
                return Ok(response.map(IdempotentBody::passing));
            }
            let status = response.status();
            let headers = kept_headers(response.headers());
            let finish = finish(settings.clone(), claim, held, status, headers);
            let limit = settings.max_body;
            Ok(response.map(|body| IdempotentBody::recording(body, limit, finish)))
        })
    }
}

/// What runs when a recorded body ends: the record is written, under the
/// lock, if the policy keeps the response and the lock was never lost. The
/// write runs as a task of its own, and the lock's release waits for it:
/// once the handler's response is complete it is kept, even if its client
/// goes away meanwhile, and no duplicate gets the lock before it is kept.
fn finish(
    settings: Arc<Settings>,
    claim: Claim,
    held: HeldLock,
    status: StatusCode,
    headers: HeaderMap,
) -> Finish {
    Box::new(move |recorded| {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(name = %claim.name, "no runtime to write the record on: the response is not kept");
            return;
        };
        let (written, mut done) = watch::channel(false);
        held.release_after(Box::pin(async move {
            // An error: the writer is gone (the runtime shut down).
            let _ = done.wait_for(|done| *done).await;
        }));
        runtime.spawn(async move {
            // `None`: the body did not end (it failed, or its rest outlasted
            // the drain): nothing is kept.
            if let Some((body, trailers)) = recorded.await {
                write_record(&settings, &claim, &held, status, headers, body, trailers).await;
            }
            let _ = written.send(true);
        });
    })
}

/// Writes the record of a complete response, if it is to be kept.
async fn write_record(
    settings: &Settings,
    claim: &Claim,
    held: &HeldLock,
    status: StatusCode,
    headers: HeaderMap,
    body: Option<Bytes>,
    trailers: Option<HeaderMap>,
) {
    if held.is_lost() {
        tracing::warn!(name = %claim.name, "the lock was lost: the response is not kept");
        return;
    }
    if claim.grpc {
        let code = grpc_status(&headers, trailers.as_ref());
        if !code.is_some_and(settings.policy.grpc) {
            return;
        }
    }
    let outcome = match body {
        Some(body) => Outcome::Kept(Box::new(Kept {
            status,
            headers,
            body,
            trailers,
        })),
        None => Outcome::TooLarge(status),
    };
    let record = Record {
        fingerprint: claim.fingerprint,
        outcome,
    }
    .encode();
    let writer = Writer {
        value: held.value().into(),
        token: held.fencing_token(),
    };
    let stored = settings
        .records
        .store(
            claim.name.clone(),
            writer,
            record,
            settings.ttl,
            settings.write_timeout,
        )
        .await;
    match stored {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(name = %claim.name, "the lock changed hands: the response is not kept");
        }
        Err(error) => {
            tracing::warn!(%error, name = %claim.name, "the response could not be kept");
        }
    }
}

/// A gRPC response's status: from its trailers, or from its headers for a
/// trailers-only response.
fn grpc_status(headers: &HeaderMap, trailers: Option<&HeaderMap>) -> Option<u16> {
    trailers
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

/// The headers a replay repeats: all but those of one connection's hop
/// and the length (the replay's own body sets it).
fn kept_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = headers.clone();
    for name in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
        header::CONTENT_LENGTH,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        kept.remove(name);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_headers_are_not_kept() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        let kept = kept_headers(&headers);
        assert_eq!(kept.len(), 1);
        assert!(kept.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn grpc_status_comes_from_trailers_first() {
        let mut headers = HeaderMap::new();
        let mut trailers = HeaderMap::new();
        assert_eq!(grpc_status(&headers, None), None);
        headers.insert("grpc-status", HeaderValue::from_static("5"));
        assert_eq!(grpc_status(&headers, None), Some(5));
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        assert_eq!(grpc_status(&headers, Some(&trailers)), Some(0));
    }
}
