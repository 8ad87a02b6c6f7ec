//! `IdempotencyLayer`: a retried request gets the first response instead
//! of running twice, on any replica.
//!
//! The layer stands on [`DistLockLayer`](crate::DistLockLayer): the first
//! request with a key runs under the key's lock, and its response is kept
//! beside the lock, in the same backend (in process memory with
//! [`MemorySync`](crate::MemorySync); on the nodes with
//! [`RedisSync`](crate::RedisSync): one node, Redlock, or a Redis Cluster).
//! It is a layer of its own rather than a mode of `DistLockLayer`: its
//! services take a different request body (read for the fingerprint), its
//! responses can be replays, and its settings (TTL, body limit, what is
//! kept) mean nothing to a plain lock.
//!
//! The life of a request:
//!
//! 1. **Key**: the `Idempotency-Key` header by default (any
//!    [`KeyExtractor`](crate::layer::KeyExtractor)), within the layer's
//!    namespace and, optionally, a [scope](IdempotencyLayerBuilder::scope)
//!    such as the authenticated principal. Keys follow the lock layer's
//!    rules (a bad key is a 400).
//! 2. **Fingerprint**: the method, the path and query, and a hash of the
//!    body by default ([`Fingerprint`]); the body is read whole for it, up
//!    to [a limit](IdempotencyLayerBuilder::max_request_body), and handed
//!    to the handler as it was.
//! 3. **Replay**: if the key's first response is kept, a request with the
//!    same fingerprint gets it back, byte for byte (status, headers but
//!    those of the connection's hop, body, trailers), with
//!    `idempotent-replayed: true`, and the handler does not run. This
//!    takes no lock: one read of the backend.
//! 4. **Lock**: otherwise the request takes the key's lock, waiting up to
//!    [the wait budget](IdempotencyLayerBuilder::wait) for a first request
//!    still in flight. Once it holds the lock it reads the record again:
//!    the request it waited for may have left one, which it replays.
//! 5. **Run and keep**: otherwise the handler runs. Its response streams
//!    to the client as it is produced, with nothing added, and is recorded
//!    on the way, up to [a size limit](IdempotencyLayerBuilder::max_body).
//!    When the body ends, or is dropped first (the rest is then read in
//!    the background), the record is written by a task of its own, under
//!    the lock and guarded by its fencing token (a holder that lost the
//!    lock cannot overwrite a later holder's record), and the lock is
//!    released once it is written: a retry that comes meanwhile waits for
//!    the lock (within the wait budget) and finds the record.
//!
//! What is kept is a [`StorePolicy`]: by default 2xx and 4xx (gRPC: `OK`
//! and the client's own errors). A 5xx, a panicking handler, a handler
//! dropped before it returned (its client went away, a timeout), a failed
//! body or a lost lock keep nothing, so a retry runs again. Once the
//! handler returned, its response is its outcome: a client that leaves
//! while the body streams does not stop the record (the rest of the body
//! is read in the background, up to 10 s, and the lock waits for it). With
//! Redlock, "no record" takes a quorum of nodes that kept their state for
//! the records' TTL (see [`RedisSync`](crate::RedisSync)'s restart safety):
//! a read that cannot tell gets 503 rather than running the handler again.
//! A record lives for its [TTL](IdempotencyLayerBuilder::ttl) (24 h
//! by default) and no longer, on every backend.
//!
//! | case | HTTP | gRPC |
//! |---|---|---|
//! | first request, or retry after a response that was not kept | the handler's response | the handler's response |
//! | retry, same fingerprint, response kept | the kept response, `idempotent-replayed: true` | the kept response (trailers included) |
//! | same key, another fingerprint | 422 | `INVALID_ARGUMENT` |
//! | no key (unless [`MissingKey::PassThrough`](crate::layer::MissingKey::PassThrough)) | 400 | `INVALID_ARGUMENT` |
//! | a bad key, or no scope where one is required | 400 | `INVALID_ARGUMENT` |
//! | first request still in flight past the wait budget | 409, `Retry-After` | `ABORTED` |
//! | first request completed, response over the size limit | 409, no `Retry-After` | `ALREADY_EXISTS` |
//! | request body over its limit | 413 | `RESOURCE_EXHAUSTED` |
//! | backend down | 503, `Retry-After` | `UNAVAILABLE` |
//!
//! A record that does not parse (written by something else) is treated as
//! absent and logged; nothing is half-written, since a record is one
//! value written at once.
//!
//! ```
//! use std::convert::Infallible;
//! use http::{Request, Response, StatusCode};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_dsync::MemorySync;
//! use tower_dsync::idempotency::{IdempotencyLayer, RequestBody};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
//! let layer = IdempotencyLayer::builder(MemorySync::new()).namespace("charges").build()?;
//! let charge = ServiceBuilder::new().layer(layer).service_fn(|_: Request<RequestBody<String>>| async {
//!     Ok::<_, Infallible>(Response::builder().status(201).body("ch_1".to_owned()).unwrap())
//! });
//! let post = |body: &str| {
//!     Request::post("/charges").header("idempotency-key", "order-7").body(body.to_owned()).unwrap()
//! };
//!
//! let first = charge.clone().oneshot(post("{\"amount\":10}")).await.unwrap();
//! assert_eq!(first.status(), StatusCode::CREATED);
//! // The record is written when the body ends.
//! http_body_util::BodyExt::collect(first.into_body()).await.unwrap();
//!
//! let retry = charge.clone().oneshot(post("{\"amount\":10}")).await.unwrap();
//! assert_eq!(retry.status(), StatusCode::CREATED);
//! assert_eq!(retry.headers()["idempotent-replayed"], "true");
//!
//! let other = charge.oneshot(post("{\"amount\":99}")).await.unwrap();
//! assert_eq!(other.status(), StatusCode::UNPROCESSABLE_ENTITY);
//! # Ok(()) }
//! ```

mod body;
mod claim;
mod fingerprint;
mod layer;
mod record;
mod service;

pub use body::{IdempotentBody, RequestBody};
pub use fingerprint::Fingerprint;
pub use layer::{
    DEFAULT_MAX_BODY, DEFAULT_MAX_REQUEST_BODY, DEFAULT_TTL, IdempotencyLayer,
    IdempotencyLayerBuilder, REPLAYED_HEADER, StorePolicy,
};
pub use service::{Idempotent, IdempotentFuture};
