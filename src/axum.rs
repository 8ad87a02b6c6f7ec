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
//! let app: Router = Router::new()
//!     .route("/jobs/{id}/start", post(start_job))
//!     // `route_layer`: the route is matched before the layer runs.
//!     .route_layer(DistLockLayer::new(MemorySync::new(), PathParam::new("id")).wait(Duration::ZERO));
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
//! let app: Router = Router::new().route("/charges", post(charge)).route_layer(
//!     DistLockLayer::new(MemorySync::new(), HeaderKey::new("idempotency-key"))
//!         .namespace("charges")
//!         .on_missing_key(MissingKey::Reject)
//!         .wait(Duration::ZERO),
//! );
//! ```

use std::convert::Infallible;

use ::axum::extract::{FromRequestParts, MatchedPath, OptionalFromRequestParts, OriginalUri};
use ::axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::layer::extract::percent_decode;
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
/// `/jobs/{id}/start` (or a wildcard `{*path}`), percent-decoded as axum's
/// `Path` decodes it, so every spelling of one resource takes one lock.
///
/// It reads axum's [`MatchedPath`], which the router sets when a route
/// matches. Add the layer with `Router::route_layer` (or
/// `MethodRouter::layer`): it runs only for matched routes. With
/// `Router::layer`, or around the whole router, the layer also sees
/// requests that match no route and have no parameter; those are rejected
/// with a 400 that says to use `route_layer`, where a 404 was due.
///
/// ```
/// use tower_dsync::axum::PathParam;
/// use tower_dsync::layer::KeyExtractor;
///
/// // Outside a router there is no matched route:
/// let request = http::Request::builder().uri("/jobs/7").body(()).unwrap();
/// assert!(PathParam::new("id").extract(&request).is_err());
/// ```
#[derive(Debug, Clone, Copy)]
pub struct PathParam {
    name: &'static str,
}

impl PathParam {
    /// Reads the parameter `name` (without braces).
    pub fn new(name: &'static str) -> Self {
        PathParam { name }
    }
}

impl<B> KeyExtractor<B> for PathParam {
    fn extract(&self, request: &http::Request<B>) -> Result<Option<String>, KeyError> {
        let Some(matched) = request.extensions().get::<MatchedPath>() else {
            return Err(KeyError::Invalid(
                "no matched route: add DistLockLayer with Router::route_layer to key on a path parameter"
                    .into(),
            ));
        };
        // Inside a nested router the URI is stripped of the prefix; the
        // matched path is not, and neither is the original URI.
        let path = request
            .extensions()
            .get::<OriginalUri>()
            .map_or(request.uri().path(), |uri| uri.0.path());
        param(matched.as_str(), path, self.name)
            .map(|raw| percent_decode(&raw, "the path parameter"))
            .transpose()
    }
}

/// The segment of `path` where `template` has `{name}`, or the rest of the
/// path where it has `{*name}`.
fn param(template: &str, path: &str, name: &str) -> Option<String> {
    let mut segments = path.split('/');
    for part in template.split('/') {
        let segment = segments.next()?;
        if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if inner == name {
                return Some(segment.to_owned());
            }
            if inner.strip_prefix('*') == Some(name) {
                let rest: Vec<&str> = std::iter::once(segment).chain(segments).collect();
                return Some(rest.join("/"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::param;

    #[test]
    fn params_are_found_in_the_path() {
        assert_eq!(
            param("/jobs/{id}/start", "/jobs/7/start", "id").as_deref(),
            Some("7")
        );
        assert_eq!(param("/a/{x}/{y}", "/a/1/2", "y").as_deref(), Some("2"));
        assert_eq!(
            param("/files/{*path}", "/files/a/b/c", "path").as_deref(),
            Some("a/b/c")
        );
        assert_eq!(param("/jobs/{id}", "/jobs/7", "other"), None);
    }
}
