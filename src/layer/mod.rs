//! `DistLockLayer`: a Tower middleware that holds a distributed lock per
//! request key for as long as the request is being served.
//!
//! [`DistLockLayer::builder`] takes the settings; its `build` refuses those
//! that cannot work, at start-up. The life of a request:
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
//!    escapes; [`DistLockLayerBuilder::build`] refuses the others. Names
//!    longer than [`MAX_NAME_LEN`](crate::MAX_NAME_LEN) are refused.
//! 3. **Local queue.** Requests for the same name in one process wait first
//!    come, first served; only the first talks to the backend.
//! 4. **Acquire**, within the wait budget ([`DistLockLayerBuilder::wait`]);
//!    past it, 409 with `Retry-After` (the holder's remaining time, in whole
//!    seconds rounded up). A zero budget fails fast. A request with a
//!    deadline (a gRPC call's `grpc-timeout`, or a [`Deadline`] in its
//!    extensions) waits no longer than shortly before it, then gets 503 with
//!    `Retry-After` (`DEADLINE_EXCEEDED`). Waiting holds none of the
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
//!    one), else in the background.
//! 8. **Lost lock.** When the validity ends without a successful
//!    extension, or the backend refuses one
//!    ([`Error::NotAcquired`](crate::Error::NotAcquired): a quorum says the
//!    key is no longer ours), or `max_hold` passes, [`HeldLock`] reports
//!    it, and the extend loop releases what may remain of the lock and frees the
//!    key for this process's next request at once, without waiting for the
//!    response to end or be polled. With
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
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
//! // Refused here, at start-up, if the settings cannot work.
//! let layer = DistLockLayer::builder(MemorySync::new(), HeaderKey::new("idempotency-key"))
//!     .namespace("payments")
//!     .wait(Duration::ZERO)
//!     .build()?;
//! let service = ServiceBuilder::new()
//!     .layer(layer)
//!     .service_fn(|request: Request<String>| async move {
//!         let lock = request.extensions().get::<HeldLock>().unwrap();
//!         Ok::<_, Infallible>(Response::new(format!("holding {}", lock.name())))
//!     });
//!
//! let request = Request::builder().header("idempotency-key", "pay-7").body(String::new()).unwrap();
//! let response = service.oneshot(request).await.unwrap();
//! assert_eq!(response.status(), 200);
//! # Ok(()) }
//! ```

mod acquire;
mod alarm;
mod body;
mod deadline;
mod extend_loop;
pub(crate) mod extract;
mod future;
mod held;
mod lease;
mod lock_layer;
pub mod meters;
pub(crate) mod name;
mod rejection;
mod release;
mod service;
mod settings;
mod state;
mod stats;

pub use body::{LockBody, LockLost};
pub use deadline::Deadline;
pub use extract::{
    GrpcMetadataKey, HeaderKey, KeyError, KeyExtractor, MethodPath, PathSegment, TryKeyFn,
    try_key_fn,
};
pub use future::ResponseFuture;
pub use held::HeldLock;
pub use lock_layer::{DEFAULT_WAIT, DistLockLayer, DistLockLayerBuilder};
pub use rejection::{Rejection, RejectionKind};
pub use service::DistLock;
pub(crate) use service::is_grpc;
pub use settings::{MissingKey, OnLost, ReleaseOn};
pub use stats::LockStats;
