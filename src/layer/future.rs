//! The response future of [`DistLock`](super::DistLock): acquire (unless
//! the lock was had at once, in `call`), then serve, then hand the release
//! guard to the body.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tower_service::Service;

use super::Shared;
use super::acquire::Holding;
use super::body::LockBody;
use super::lease::ReleaseGuard;
use super::rejection::{Rejection, RejectionKind, RejectionMapper};
use crate::sync::DistSync;

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
        release_on_head: bool,
        // With the abort option: a lost lock cuts the response short.
        abort_on_lost: bool,
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
        Serving {
            #[pin]
            future: S::Future,
            guard: Option<ReleaseGuard>,
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
    pub(crate) fn acquiring(
        acquire: AcquireFuture,
        inner: S,
        request: Request<ReqB>,
        mapper: Option<RejectionMapper>,
        release_on_head: bool,
        abort_on_lost: bool,
        grpc: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Acquiring {
                acquire,
                inner: Some(inner),
                request: Some(request),
            },
            mapper,
            release_on_head,
            abort_on_lost,
            grpc,
        }
    }

    /// A request that got its lock at once, and is served.
    pub(crate) fn serving<D: DistSync>(
        future: S::Future,
        guard: ReleaseGuard,
        shared: &Shared<D>,
        grpc: bool,
    ) -> Self {
        ResponseFuture {
            state: State::Serving {
                future,
                guard: Some(guard),
            },
            mapper: shared.mapper.clone(),
            release_on_head: shared.release_on_head,
            abort_on_lost: shared.abort_on_lost,
            grpc,
        }
    }

    /// A request that goes through unlocked.
    pub(crate) fn unlocked(future: S::Future) -> Self {
        ResponseFuture {
            state: State::Serving {
                future,
                guard: None,
            },
            mapper: None,
            release_on_head: true,
            abort_on_lost: false,
            grpc: false,
        }
    }

    pub(crate) fn rejected(rejection: Rejection, mapper: Option<RejectionMapper>) -> Self {
        ResponseFuture {
            grpc: rejection.is_grpc(),
            state: State::Rejected {
                rejection: Some(rejection),
            },
            mapper,
            release_on_head: true,
            abort_on_lost: false,
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
            match this.state.project() {
                StateProj::Acquiring {
                    acquire,
                    inner,
                    request,
                } => {
                    let holding = match ready!(acquire.as_mut().poll(cx)) {
                        Ok(holding) => holding,
                        Err(rejection) => return Poll::Ready(Ok(respond(this.mapper, rejection))),
                    };
                    let (Some(mut inner), Some(mut request)) = (inner.take(), request.take())
                    else {
                        unreachable!("the request is taken once");
                    };
                    request.extensions_mut().insert(holding.held);
                    let future = inner.call(request);
                    self.as_mut().project().state.set(State::Serving {
                        future,
                        guard: Some(holding.guard),
                    });
                }
                StateProj::Serving { future, guard } => {
                    if *this.abort_on_lost
                        && let Some(held) = guard
                        && held.poll_lost(cx).is_ready()
                    {
                        // Abort: dropping the state drops the handler, then
                        // lets go of the lock.
                        let rejection = Rejection::new(
                            RejectionKind::Lost,
                            "the lock was lost while the request was served",
                            *this.grpc,
                        );
                        let mapper = this.mapper.clone();
                        self.as_mut()
                            .project()
                            .state
                            .set(State::Rejected { rejection: None });
                        return Poll::Ready(Ok(respond(&mapper, rejection)));
                    }
                    let response = ready!(future.poll(cx))?;
                    let guard = guard.take();
                    let guard = if *this.release_on_head {
                        // Released now that the head is ready.
                        drop(guard);
                        None
                    } else {
                        guard
                    };
                    let (abort, grpc) = (*this.abort_on_lost, *this.grpc);
                    return Poll::Ready(Ok(
                        response.map(|body| LockBody::inner(body, guard, abort, grpc))
                    ));
                }
                StateProj::Rejected { rejection } => {
                    let rejection = rejection.take().expect("polled after completion");
                    return Poll::Ready(Ok(respond(this.mapper, rejection)));
                }
            }
        }
    }
}

fn respond<B>(mapper: &Option<RejectionMapper>, rejection: Rejection) -> Response<LockBody<B>> {
    let response = match mapper {
        Some(map) => map(rejection),
        None => rejection.into_response(),
    };
    response.map(LockBody::full)
}
