//! The response future of [`DistLock`](super::DistLock): acquire (unless
//! the lock was had at once, in `call`), then serve, then hand the release
//! guard to the body.

use std::fmt;
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::acquire::Holding;
use super::body::LockBody;
use super::rejection::{Rejection, RejectionMapper};
use super::release::ReleaseGuard;
use super::settings::ReleaseOn;

type AcquireFuture = Pin<Box<dyn Future<Output = Result<Holding, Rejection>> + Send>>;

pin_project! {
    /// The response future of [`DistLock`](super::DistLock).
    pub struct ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<S, ReqB>,
        mapper: Option<RejectionMapper>,
        // A gRPC call: cut short, it gets a gRPC status.
        grpc: bool,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        Acquiring {
            acquire: AcquireFuture,
            inner: Option<S>,
            request: Option<Request<ReqB>>,
        },
        // Waits for the inner service's readiness, once the lock is held
        // (or without a lock, for a request without a key): a request
        // waiting for its lock holds none of the inner service's capacity.
        Calling {
            inner: S,
            request: Option<Request<ReqB>>,
            guard: ReleaseGuard,
        },
        Serving {
            #[pin]
            future: S::Future,
            guard: ReleaseGuard,
        },
        Rejected {
            rejection: Option<Rejection>,
        },
    }
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    /// A request that waits for its lock (`acquire`), then is served once
    /// the inner service is ready.
    pub(crate) fn acquiring(
        acquire: AcquireFuture,
        inner: S,
        request: Request<ReqB>,
        mapper: Option<RejectionMapper>,
        grpc: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Acquiring {
                acquire,
                inner: Some(inner),
                request: Some(request),
            },
            mapper,
            grpc,
        }
    }

    /// A request that got its lock at once: it is served once the inner
    /// service is ready.
    pub(crate) fn serving(
        inner: S,
        request: Request<ReqB>,
        guard: ReleaseGuard,
        mapper: Option<RejectionMapper>,
        grpc: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Calling {
                inner,
                request: Some(request),
                guard,
            },
            mapper,
            grpc,
        }
    }

    /// A request that goes through unlocked, once the inner service is
    /// ready.
    pub(crate) fn unlocked(inner: S, request: Request<ReqB>) -> Self {
        ResponseFuture::serving(inner, request, ReleaseGuard::default(), None, false)
    }

    /// A request answered with `rejection` (mapped by `mapper`, if any).
    pub(crate) fn rejected(rejection: Rejection, mapper: Option<RejectionMapper>) -> Self {
        ResponseFuture {
            grpc: rejection.is_grpc(),
            state: State::Rejected {
                rejection: Some(rejection),
            },
            mapper,
        }
    }
}

impl<S, ReqB> fmt::Debug for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
{
    type Output = Result<Response<LockBody<ResB>>, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let this = self.as_mut().project();
            let next = match this.state.project() {
                StateProj::Acquiring {
                    acquire,
                    inner,
                    request,
                } => match ready!(acquire.as_mut().poll(cx)) {
                    Ok(holding) => {
                        let (Some(inner), Some(mut request)) = (inner.take(), request.take())
                        else {
                            unreachable!("the request is taken once");
                        };
                        request.extensions_mut().insert(holding.held);
                        State::Calling {
                            inner,
                            request: Some(request),
                            guard: holding.guard,
                        }
                    }
                    Err(rejection) => return Poll::Ready(Ok(respond(this.mapper, rejection))),
                },
                StateProj::Calling {
                    inner,
                    request,
                    guard,
                } => {
                    if guard.poll_abort(cx).is_ready() {
                        return Poll::Ready(Ok(self.abort()));
                    }
                    if let Err(error) = ready!(inner.poll_ready(cx)) {
                        // The lock goes with the state.
                        self.as_mut()
                            .project()
                            .state
                            .set(State::Rejected { rejection: None });
                        return Poll::Ready(Err(error));
                    }
                    let request = request.take().expect("the request is taken once");
                    State::Serving {
                        future: inner.call(request),
                        guard: mem::take(guard),
                    }
                }
                StateProj::Serving { future, guard } => {
                    if guard.poll_abort(cx).is_ready() {
                        return Poll::Ready(Ok(self.abort()));
                    }
                    let response = ready!(future.poll(cx))?;
                    let mut guard = mem::take(guard);
                    if guard.release_on() == ReleaseOn::Head {
                        // Released now that the head is ready.
                        guard.release();
                    }
                    let grpc = *this.grpc;
                    return Poll::Ready(
                        Ok(response.map(|body| LockBody::inner(body, guard, grpc))),
                    );
                }
                StateProj::Rejected { rejection } => {
                    let rejection = rejection.take().expect("polled after completion");
                    return Poll::Ready(Ok(respond(this.mapper, rejection)));
                }
            };
            self.as_mut().project().state.set(next);
        }
    }
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    /// Ends a request whose lock was lost (the abort option): dropping the
    /// state drops the handler (or the request not yet handed to it), then
    /// lets go of the lock.
    fn abort<B>(mut self: Pin<&mut Self>) -> Response<LockBody<B>> {
        let rejection = Rejection::lost(self.grpc);
        let mapper = self.mapper.clone();
        self.as_mut()
            .project()
            .state
            .set(State::Rejected { rejection: None });
        respond(&mapper, rejection)
    }
}

fn respond<B>(mapper: &Option<RejectionMapper>, rejection: Rejection) -> Response<LockBody<B>> {
    let response = match mapper {
        Some(map) => map(rejection),
        None => rejection.into_response(),
    };
    response.map(LockBody::full)
}
