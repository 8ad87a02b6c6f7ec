//! The bodies of the idempotency layer: the request body as the handler
//! gets it (read for the fingerprint, or streamed), and the response body
//! (recorded on its way to the client, replayed, or a rejection).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::BoxError;

pin_project! {
    /// The request body a service behind an
    /// [`IdempotencyLayer`](super::IdempotencyLayer) gets: the body read
    /// whole for the fingerprint, or the client's body streamed as it came
    /// (with [`Fingerprint::without_body`](super::Fingerprint::without_body)).
    ///
    /// ```
    /// use http_body::Body;
    /// use tower_dsync::idempotency::RequestBody;
    ///
    /// let body: RequestBody<http_body_util::Empty<bytes::Bytes>> = RequestBody::full("{}".into());
    /// assert_eq!(body.size_hint().exact(), Some(2));
    /// ```
    pub struct RequestBody<B> {
        #[pin]
        kind: RequestKind<B>,
    }
}

pin_project! {
    #[project = RequestKindProj]
    enum RequestKind<B> {
        Full { data: Option<Bytes> },
        Streaming { #[pin] body: B },
    }
}

impl<B> RequestBody<B> {
    /// A body of `data`, read already.
    pub fn full(data: Bytes) -> Self {
        RequestBody {
            kind: RequestKind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }

    /// The client's body, streamed.
    pub(crate) fn streaming(body: B) -> Self {
        RequestBody {
            kind: RequestKind::Streaming { body },
        }
    }
}

impl<B> fmt::Debug for RequestBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestBody").finish_non_exhaustive()
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            RequestKindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestKindProj::Streaming { body } => {
                Poll::Ready(ready!(body.poll_frame(cx)).map(as_bytes))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            RequestKind::Full { data } => data.is_none(),
            RequestKind::Streaming { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            RequestKind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestKind::Streaming { body } => body.size_hint(),
        }
    }
}

/// A frame of another body, with its data as `Bytes` and its error boxed.
fn as_bytes<D: Buf, E: Into<BoxError>>(
    frame: Result<Frame<D>, E>,
) -> Result<Frame<Bytes>, BoxError> {
    frame
        .map(|frame| frame.map_data(|mut data| data.copy_to_bytes(data.remaining())))
        .map_err(Into::into)
}

/// Why a request body could not be read for the fingerprint.
pub(crate) enum ReadError {
    /// It is longer than the limit.
    TooLarge,
    /// The client's body failed (the connection broke, say).
    Failed(BoxError),
}

/// Reads `body` whole, up to `limit` bytes.
pub(crate) async fn read_whole<B>(body: B, limit: usize) -> Result<Bytes, ReadError>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > limit as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut read = BytesMut::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| ReadError::Failed(e.into()))?;
        if let Ok(mut data) = frame.into_data() {
            if read.len() + data.remaining() > limit {
                return Err(ReadError::TooLarge);
            }
            while data.has_remaining() {
                let chunk = data.chunk();
                read.extend_from_slice(chunk);
                let n = chunk.len();
                data.advance(n);
            }
        }
    }
    Ok(read.freeze())
}

/// A whole response body as recorded: its bytes (`None` when it went over
/// the limit) and its trailers; `None` for a body that did not end (it
/// failed, or outlasted [`DRAIN_LIMIT`]).
pub(crate) type Recorded = Option<(Option<Bytes>, Option<HeaderMap>)>;

/// Work in the background.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What happens at the end of a recorded body: the record is written from
/// what the future gives, by a task of its own, and the lock's release
/// waits for it.
pub(crate) type Finish = Box<dyn FnOnce(BoxFuture<Recorded>) + Send>;

/// How long the rest of a body dropped before its end (its client gone)
/// is read for its record, at most.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Reads the rest of a body dropped before its end, for its record.
type Drain<B> = fn(Pin<Box<B>>, Option<BytesMut>, usize, Option<HeaderMap>) -> BoxFuture<Recorded>;

pin_project! {
    /// The response body of a service behind an
    /// [`IdempotencyLayer`](super::IdempotencyLayer): the handler's body,
    /// recorded as it streams to the client, or a replayed or rejected
    /// response's.
    ///
    /// A recorded body is passed on frame by frame, as it comes. At its
    /// end the record is written in the background, and the lock's release
    /// waits for it. A body dropped before its end (its client gone, or a
    /// server that stops at the length it announced) is read to its end in
    /// the background for its record.
    ///
    /// ```
    /// use http_body::Body;
    /// use tower_dsync::idempotency::IdempotentBody;
    ///
    /// let body: IdempotentBody<http_body_util::Empty<bytes::Bytes>> = IdempotentBody::full("ok".into());
    /// assert_eq!(body.size_hint().exact(), Some(2));
    /// ```
    pub struct IdempotentBody<B> {
        #[pin]
        kind: ResponseKind<B>,
    }

    impl<B> PinnedDrop for IdempotentBody<B> {
        // The handler returned: its whole response is its outcome, even
        // when its client went away before the end.
        fn drop(this: Pin<&mut Self>) {
            if let ResponseKindProj::Recording {
                body,
                recorded,
                limit,
                trailers,
                finish,
                drain,
                polling,
            } = this.project().kind.project()
                && !*polling
                && let (Some(body), Some(finish)) = (body.take(), finish.take())
            {
                finish(drain(body, recorded.take(), *limit, trailers.take()));
            }
        }
    }
}

pin_project! {
    #[project = ResponseKindProj]
    enum ResponseKind<B> {
        // The handler's body, passed on as it is.
        Passing { #[pin] body: B },
        // The handler's body, recorded on its way.
        Recording {
            // Boxed, so that a drop can hand it to the task that reads its
            // rest; `None` once it ended.
            body: Option<Pin<Box<B>>>,
            recorded: Option<BytesMut>,
            limit: usize,
            trailers: Option<HeaderMap>,
            // `None` once called, or for a body that failed.
            finish: Option<Finish>,
            drain: Drain<B>,
            // Set while the inner body is polled: still set at drop, the
            // poll unwound (a panic), and the body is not a response to keep.
            polling: bool,
        },
        Full { data: Option<Bytes>, trailers: Option<HeaderMap> },
    }
}

impl<B> IdempotentBody<B> {
    /// A complete body of `data`.
    pub fn full(data: Bytes) -> Self {
        Self::replayed(data, None)
    }

    /// A complete body of `data`, then `trailers`.
    pub(crate) fn replayed(data: Bytes, trailers: Option<HeaderMap>) -> Self {
        IdempotentBody {
            kind: ResponseKind::Full {
                data: (!data.is_empty()).then_some(data),
                trailers,
            },
        }
    }

    /// The handler's body, not recorded.
    pub(crate) fn passing(body: B) -> Self {
        IdempotentBody {
            kind: ResponseKind::Passing { body },
        }
    }

    /// The handler's body, recorded up to `limit` bytes; `finish` is
    /// called with the whole of it once it ends.
    pub(crate) fn recording(body: B, limit: usize, finish: Finish) -> Self
    where
        B: Body + Send + 'static,
        B::Error: Into<BoxError>,
    {
        IdempotentBody {
            kind: ResponseKind::Recording {
                body: Some(Box::pin(body)),
                recorded: Some(BytesMut::new()),
                limit,
                trailers: None,
                finish: Some(finish),
                drain: drain::<B>,
                polling: false,
            },
        }
    }
}

impl<B> fmt::Debug for IdempotentBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            ResponseKind::Passing { .. } => "passing",
            ResponseKind::Recording { .. } => "recording",
            ResponseKind::Full { .. } => "full",
        };
        f.debug_struct("IdempotentBody")
            .field("kind", &kind)
            .finish_non_exhaustive()
    }
}

impl<B> Body for IdempotentBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().kind.project() {
            ResponseKindProj::Passing { body } => {
                Poll::Ready(ready!(body.poll_frame(cx)).map(as_bytes))
            }
            ResponseKindProj::Full { data, trailers } => {
                if let Some(data) = data.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))))
            }
            ResponseKindProj::Recording {
                body: inner,
                recorded,
                limit,
                trailers,
                finish,
                polling,
                ..
            } => {
                let Some(body) = inner.as_mut() else {
                    return Poll::Ready(None);
                };
                *polling = true;
                let polled = body.as_mut().poll_frame(cx);
                *polling = false;
                match ready!(polled) {
                    Some(Ok(frame)) => {
                        let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                        if let Some(data) = frame.data_ref() {
                            keep(recorded, *limit, data);
                        } else if let Some(t) = frame.trailers_ref() {
                            *trailers = Some(t.clone());
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    Some(Err(error)) => {
                        // A failed body is not a response to keep.
                        *finish = None;
                        *inner = None;
                        Poll::Ready(Some(Err(error.into())))
                    }
                    None => {
                        *inner = None;
                        if let Some(finish) = finish.take() {
                            let whole =
                                Some((recorded.take().map(BytesMut::freeze), trailers.take()));
                            finish(Box::pin(std::future::ready(whole)));
                        }
                        Poll::Ready(None)
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            ResponseKind::Passing { body } => body.is_end_stream(),
            ResponseKind::Full { data, trailers } => data.is_none() && trailers.is_none(),
            // A body that ends here is recorded when dropped.
            ResponseKind::Recording { body, .. } => body.as_ref().is_none_or(|b| b.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            ResponseKind::Passing { body } => body.size_hint(),
            ResponseKind::Recording { body, .. } => body
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |body| body.size_hint()),
            ResponseKind::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Keeps `data` in `recorded`, unless that goes over `limit`: then nothing
/// more is kept.
fn keep(recorded: &mut Option<BytesMut>, limit: usize, data: &[u8]) {
    if recorded
        .as_ref()
        .is_some_and(|r| r.len() + data.len() > limit)
    {
        *recorded = None;
    }
    if let Some(recorded) = recorded {
        recorded.extend_from_slice(data);
    }
}

/// Reads the rest of `body`, dropped before its end, into what was
/// recorded of it (see [`Drain`]).
fn drain<B>(
    mut body: Pin<Box<B>>,
    mut recorded: Option<BytesMut>,
    limit: usize,
    mut trailers: Option<HeaderMap>,
) -> BoxFuture<Recorded>
where
    B: Body + Send + 'static,
    B::Error: Into<BoxError>,
{
    Box::pin(async move {
        let rest = async {
            loop {
                // A body whose frames are always ready would otherwise never
                // return `Pending`, and the timeout would never fire.
                tokio::task::consume_budget().await;
                let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await
                else {
                    break;
                };
                match frame.ok()?.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        keep(&mut recorded, limit, &data);
                    }
                    Err(frame) => trailers = frame.into_trailers().ok().or(trailers.take()),
                }
            }
            Some(())
        };
        tokio::time::timeout(DRAIN_LIMIT, rest).await.ok()??;
        Some((recorded.map(BytesMut::freeze), trailers))
    })
}
