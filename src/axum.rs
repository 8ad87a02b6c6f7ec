//! axum integration (feature `axum`): [`HeldLock`] as an extractor, and a
//! key extractor that reads a route's path parameter.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Router, routing::post};
//! use tower_dsync::{DistLockLayer, MemorySync};
//! use tower_dsync::axum::PathParam;
//! use tower_dsync::layer::HeldLock;
//!
//! async fn start_job(lock: HeldLock) -> String {
//!     format!("job {} runs alone (token {:?})", lock.name(), lock.fencing_token())
//! }
//!
//! let layer = DistLockLayer::builder(MemorySync::new(), PathParam::new("id"))
//!     .wait(Duration::ZERO)
//!     .build()?;
//! let app: Router = Router::new()
//!     .route("/jobs/{id}/start", post(start_job))
//!     // `route_layer`: the route is matched before the layer runs.
//!     .route_layer(layer);
//! # Ok::<(), tower_dsync::Error>(())
//! ```
//!
//! Guarding an idempotent endpoint by its `Idempotency-Key` header: a
//! client that retries while the first attempt still runs gets 409 with
//! `Retry-After` instead of a second charge.
//!
//! ```
//! use std::time::Duration;
//! use axum::{Json, Router, routing::post};
//! use tower_dsync::{DistLockLayer, MemorySync};
//! use tower_dsync::layer::{HeaderKey, HeldLock, MissingKey};
//!
//! async fn charge(lock: HeldLock, Json(amount): Json<u64>) -> String {
//!     format!("charged {amount} once, under {}", lock.name())
//! }
//!
//! let layer = DistLockLayer::builder(MemorySync::new(), HeaderKey::new("idempotency-key"))
//!     .namespace("charges")
//!     .on_missing_key(MissingKey::Reject)
//!     .wait(Duration::ZERO)
//!     .build()?;
//! let app: Router = Router::new().route("/charges", post(charge)).route_layer(layer);
//! # Ok::<(), tower_dsync::Error>(())
//! ```

use std::borrow::Cow;
use std::convert::Infallible;

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use ::axum::extract::rejection::{MissingPathParams, RawPathParamsRejection};
use ::axum::extract::{
    FromRequestParts, MatchedPath, OptionalFromRequestParts, OriginalUri, RawPathParams,
};
use ::axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::layer::{HeldLock, KeyError, KeyExtractor};

/// The route was not behind [`DistLockLayer`](crate::DistLockLayer), or the
/// request had no key: extracting `HeldLock` fails with 500, since this is a
/// mistake in the application, not in the request. Use `Option<HeldLock>`
/// in handlers that also serve requests without a key.
#[derive(Debug, Clone, Copy)]
pub struct MissingHeldLock;

impl IntoResponse for MissingHeldLock {
    fn into_response(self) -> Response {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            "no lock is held for this request: is the route behind DistLockLayer, and does the request have a key?\n",
        )
            .into_response()
    }
}

impl std::fmt::Display for MissingHeldLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("no HeldLock in the request extensions")
    }
}

impl std::error::Error for MissingHeldLock {}

impl<S: Send + Sync> FromRequestParts<S> for HeldLock {
    type Rejection = MissingHeldLock;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<HeldLock>()
            .cloned()
            .ok_or(MissingHeldLock)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for HeldLock {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<HeldLock>().cloned())
    }
}

/// The value of a route's path parameter, such as `id` in
/// `/jobs/{id}/start`, `/jobs/job-{id}` or a wildcard `/files/{*path}`:
/// exactly what axum's router extracted for it (what `Path` and
/// [`RawPathParams`] give, percent-decoded), so every route that axum
/// accepts is keyed, and every spelling of one resource takes one lock.
///
/// Where the layer goes:
///
/// - `Router::route_layer` (or `MethodRouter::layer`): it runs only for
///   matched routes, after the router has extracted their parameters; in a
///   nested router it also sees the parameters of the prefix the router is
///   nested under.
/// - `Router::layer` works the same for matched routes, but also runs for
///   requests that match no route (the fallback), which have no parameter;
///   those get a 400 that says to use `route_layer`, where a 404 was due.
/// - Outside any router (around it with `ServiceBuilder`), no request has
///   parameters: each one gets a 500, and an error is logged.
///
/// A name that the matched route does not have (a typo, or a route added
/// later without it) is the same kind of mistake: a 500 that names the
/// parameter and the route, and an error in the log; the request never
/// reaches the handler unlocked, whatever [`MissingKey`] says.
///
/// [`MissingKey`]: crate::layer::MissingKey
///
/// ```
/// use tower_dsync::axum::PathParam;
/// use tower_dsync::layer::{KeyError, KeyExtractor};
///
/// // Outside a router there is no matched route:
/// let request = http::Request::builder().uri("/jobs/7").body(()).unwrap();
/// let error = PathParam::new("id").extract(&request).unwrap_err();
/// assert!(matches!(error, KeyError::Misconfigured(_)));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PathParam {
    name: &'static str,
}

impl PathParam {
    /// Reads the parameter `name` (without braces, or the `*` of a
    /// wildcard).
    pub fn new(name: &'static str) -> Self {
        PathParam { name }
    }
}

impl<B> KeyExtractor<B> for PathParam {
    fn extract<'r>(&self, request: &'r http::Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        let name = self.name;
        let extensions = request.extensions();
        let Some(matched) = extensions.get::<MatchedPath>() else {
            // Every axum router a request enters sets its original URI.
            if extensions.get::<OriginalUri>().is_none() {
                return Err(KeyError::Misconfigured(format!(
                    "PathParam({name:?}) sees no axum route: add DistLockLayer with Router::route_layer"
                )));
            }
            return Err(KeyError::Invalid(
                "no matched route: add DistLockLayer with Router::route_layer to key on a path parameter"
                    .into(),
            ));
        };
        let params = match raw_path_params(request) {
            Ok(params) => params,
            Err(RawPathParamsRejection::InvalidUtf8InPathParam(_)) => {
                return Err(KeyError::NotText {
                    source: format!("the path parameters of {}", matched.as_str()),
                });
            }
            Err(rejection) => {
                return Err(KeyError::Misconfigured(format!(
                    "the path parameters of the route {} cannot be read: {rejection}",
                    matched.as_str()
                )));
            }
        };
        match params.iter().find(|(param, _)| *param == name) {
            Some((_, value)) => Ok(Some(Cow::Owned(value.to_owned()))),
            None => Err(KeyError::Misconfigured(format!(
                "the route {} has no path parameter {name:?} for PathParam",
                matched.as_str()
            ))),
        }
    }
}

/// The path parameters that axum's router put in `request`'s extensions,
/// read the way axum reads them. Its extractor wants the request head
/// itself, so it gets a head with a copy of the extensions (cheap clones
/// of what the router and the server put there); it completes at once.
fn raw_path_params<B>(request: &http::Request<B>) -> Result<RawPathParams, RawPathParamsRejection> {
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.extensions = request.extensions().clone();
    let mut cx = Context::from_waker(Waker::noop());
    let read = pin!(RawPathParams::from_request_parts(&mut parts, &()));
    match read.poll(&mut cx) {
        Poll::Ready(params) => params,
        // It reads the extensions and never waits; were that to change,
        // the request would see no parameters rather than hang.
        Poll::Pending => Err(MissingPathParams::default().into()),
    }
}
