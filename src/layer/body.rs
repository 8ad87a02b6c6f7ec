//! The response body: the inner body, carrying the lock's release guard to
//! its end, or a rejection's short body.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::release::ReleaseGuard;
use crate::error::BoxError;

pin_project! {
    /// The body of a response that went through
    /// [`DistLock`](super::DistLock).
    ///
    /// By default it carries the lock until the inner body has sent its last
    /// frame, fails, or is dropped. Inner errors are boxed.
    ///
    /// ```
    /// use http_body::Body;
    /// use tower_dsync::layer::LockBody;
    ///
    /// let body: LockBody<http_body_util::Empty<bytes::Bytes>> = LockBody::full("busy\n".into());
    /// assert_eq!(body.size_hint().exact(), Some(5));
    /// ```
    pub struct LockBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            guard: ReleaseGuard,
            // A gRPC response ends with `UNAVAILABLE` trailers on abort.
            grpc: bool,
            // Set once the body was cut short: nothing follows.
            aborted: bool,
        },
        Full {
            data: Option<Bytes>,
        },
    }
}

impl<B> LockBody<B> {
    /// A body of the inner service, holding `guard` until it ends.
    pub(crate) fn inner(body: B, guard: ReleaseGuard, grpc: bool) -> Self {
        LockBody {
            kind: Kind::Inner {
                body,
                guard,
                grpc,
                aborted: false,
            },
        }
    }

    /// A complete body of `data` (a rejection's text; empty for gRPC).
    pub fn full(data: Bytes) -> Self {
        LockBody {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> fmt::Debug for LockBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Inner { guard, .. } => f
                .debug_struct("LockBody")
                .field("holds_lock", &guard.is_held())
                .finish_non_exhaustive(),
            Kind::Full { data } => f.debug_struct("LockBody").field("data", data).finish(),
        }
    }
}

/// The trailers that end a gRPC response whose lock was lost mid-stream.
fn unavailable_trailers() -> HeaderMap {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("14"));
    trailers.insert(
        "grpc-message",
        HeaderValue::from_static("the lock was lost while the response was streaming"),
    );
    trailers
}

/// The error that ends a streaming body when the lock was lost and the
/// layer was set to abort.
#[derive(Debug)]
pub struct LockLost;

impl fmt::Display for LockLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dsync: the lock was lost while the response was streaming")
    }
}

impl std::error::Error for LockLost {}

impl<B> Body for LockBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            KindProj::Inner {
                body,
                guard,
                grpc,
                aborted,
            } => {
                if *aborted {
                    return Poll::Ready(None);
                }
                if guard.poll_abort(cx).is_ready() {
                    guard.release();
                    *aborted = true;
                    if *grpc {
                        return Poll::Ready(Some(Ok(Frame::trailers(unavailable_trailers()))));
                    }
                    return Poll::Ready(Some(Err(LockLost.into())));
                }
                let frame = std::task::ready!(body.poll_frame(cx));
                match frame {
                    Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
                    Some(Err(error)) => {
                        guard.release();
                        Poll::Ready(Some(Err(error.into())))
                    }
                    None => {
                        // The last frame is out: release now, not when the
                        // connection gets around to dropping the body.
                        guard.release();
                        Poll::Ready(None)
                    }
                }
            }
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, aborted, .. } => *aborted || body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
