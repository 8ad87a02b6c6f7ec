//! Turning a request into the key of the resource it works on.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::header::HeaderName;
use http::{HeaderMap, Request};

/// Finds the key of a request: `Ok(Some(key))` to lock it, `Ok(None)` when
/// the request has no key (passed through unlocked, or rejected, as the layer
/// is configured), `Err` when the key is malformed (rejected with 400 or
/// `INVALID_ARGUMENT`) or cannot be read because of how the extractor is set
/// up ([`KeyError::Misconfigured`]: 500 or `INTERNAL`).
///
/// Extraction is synchronous and sees only the request head, like
/// tower_governor's key extractors. Any closure
/// `Fn(&http::Request<B>) -> Option<String>` is an extractor.
///
/// ```
/// use tower_dsync::layer::{HeaderKey, KeyExtractor};
///
/// let by_tenant = |req: &http::Request<()>| {
///     req.headers().get("x-tenant").and_then(|v| v.to_str().ok()).map(str::to_owned)
/// };
/// let req = http::Request::builder().header("x-tenant", "acme").body(()).unwrap();
/// assert_eq!(by_tenant.extract(&req).unwrap().as_deref(), Some("acme"));
///
/// let by_header = HeaderKey::new("idempotency-key");
/// assert_eq!(by_header.extract(&req).unwrap(), None);
/// ```
pub trait KeyExtractor<B>: Clone + Send + Sync + 'static {
    /// The key of `request`, if it has one: borrowed from the request
    /// where it can be (a header, the path), so that reading it allocates
    /// nothing.
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError>;
}

impl<B, F> KeyExtractor<B> for F
where
    F: Fn(&Request<B>) -> Option<String> + Clone + Send + Sync + 'static,
{
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        Ok(self(request).map(Cow::Owned))
    }
}

/// Why a key was refused. Every variant but [`Misconfigured`](Self::Misconfigured)
/// is the request's fault and becomes a 400 (or `INVALID_ARGUMENT`)
/// rejection; `Misconfigured` is the server's, becomes a 500 (or
/// `INTERNAL`) and is logged as an error. No lock is taken.
///
/// ```
/// use tower_dsync::layer::KeyError;
/// assert_eq!(KeyError::Empty.to_string(), "the lock key is empty");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// The key is empty.
    Empty,
    /// The key is longer than the layer accepts.
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The most the layer accepts.
        max: usize,
    },
    /// The key contains a control character.
    ControlCharacter,
    /// The key's source is not valid UTF-8 (or visible ASCII, for headers).
    NotText {
        /// Where the key came from, e.g. `header idempotency-key`.
        source: String,
    },
    /// A custom extractor's own reason.
    Invalid(String),
    /// The extractor cannot find a key in any request, whatever the client
    /// sends: it is set up wrong for the service it is in front of (say, a
    /// path parameter that the matched route does not have).
    Misconfigured(String),
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Empty => f.write_str("the lock key is empty"),
            KeyError::TooLong { len, max } => {
                write!(f, "the lock key is {len} bytes long, more than {max}")
            }
            KeyError::ControlCharacter => f.write_str("the lock key contains a control character"),
            KeyError::NotText { source } => write!(f, "the lock key in {source} is not valid text"),
            KeyError::Invalid(reason) => write!(f, "invalid lock key: {reason}"),
            KeyError::Misconfigured(reason) => {
                write!(f, "the lock key extractor is misconfigured: {reason}")
            }
        }
    }
}

impl std::error::Error for KeyError {}

/// The value of a request header, such as `Idempotency-Key`.
///
/// A missing header is no key; a header that is not visible ASCII is a bad
/// key. When the header repeats, the first value is the key.
///
/// ```
/// use tower_dsync::layer::{HeaderKey, KeyExtractor};
///
/// let key = HeaderKey::new("idempotency-key");
/// let req = http::Request::builder().header("Idempotency-Key", "pay-42").body(()).unwrap();
/// assert_eq!(key.extract(&req).unwrap().as_deref(), Some("pay-42"));
/// ```
#[derive(Clone, Debug)]
pub struct HeaderKey {
    name: HeaderName,
}

impl HeaderKey {
    /// Reads the header `name` (case-insensitive).
    ///
    /// # Panics
    ///
    /// If `name` is not a valid header name; use
    /// [`HeaderKey::from_name`] with a checked [`HeaderName`] otherwise.
    pub fn new(name: &'static str) -> Self {
        HeaderKey {
            name: HeaderName::from_static(name),
        }
    }

    /// Reads the header `name`.
    ///
    /// ```
    /// use tower_dsync::layer::HeaderKey;
    /// let name = http::header::HeaderName::from_bytes(b"X-Job-Id").unwrap();
    /// let key = HeaderKey::from_name(name);
    /// ```
    pub fn from_name(name: HeaderName) -> Self {
        HeaderKey { name }
    }
}

impl<B> KeyExtractor<B> for HeaderKey {
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        Ok(header_value(request.headers(), &self.name, "header")?.map(Cow::Borrowed))
    }
}

/// A gRPC metadata entry. gRPC sends ASCII metadata as HTTP/2 headers, so
/// this reads the header of that name; binary entries (`-bin`) are used in
/// their base64 form.
///
/// ```
/// use tower_dsync::layer::{GrpcMetadataKey, KeyExtractor};
///
/// let key = GrpcMetadataKey::new("x-job-id");
/// let req = http::Request::builder().header("x-job-id", "job-7").body(()).unwrap();
/// assert_eq!(key.extract(&req).unwrap().as_deref(), Some("job-7"));
/// ```
#[derive(Clone, Debug)]
pub struct GrpcMetadataKey {
    name: HeaderName,
}

impl GrpcMetadataKey {
    /// Reads the metadata entry `name` (lowercase, as gRPC requires).
    ///
    /// # Panics
    ///
    /// If `name` is not a valid metadata key.
    pub fn new(name: &'static str) -> Self {
        GrpcMetadataKey {
            name: HeaderName::from_static(name),
        }
    }
}

impl<B> KeyExtractor<B> for GrpcMetadataKey {
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        Ok(header_value(request.headers(), &self.name, "metadata")?.map(Cow::Borrowed))
    }
}

/// The value of the header `name`, if present, as text; `what` says in
/// the error where it came from (`header`, `metadata`).
fn header_value<'r>(
    headers: &'r HeaderMap,
    name: &HeaderName,
    what: &str,
) -> Result<Option<&'r str>, KeyError> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    match value.to_str() {
        Ok(text) => Ok(Some(text)),
        Err(_) => Err(KeyError::NotText {
            source: format!("{what} {name}"),
        }),
    }
}

/// A segment of the request path, by index: in `/accounts/17/charges`,
/// segment 0 is `accounts` and segment 1 is `17`. A path with fewer segments
/// has no key. The segment is percent-decoded, as routers decode path
/// parameters, so `/jobs/a` and `/jobs/%61` lock the same job; a segment
/// that does not decode to UTF-8 is a bad key.
///
/// ```
/// use tower_dsync::layer::{KeyExtractor, PathSegment};
///
/// let req = http::Request::builder().uri("/accounts/17/charges").body(()).unwrap();
/// assert_eq!(PathSegment::new(1).extract(&req).unwrap().as_deref(), Some("17"));
/// assert_eq!(PathSegment::new(5).extract(&req).unwrap(), None);
///
/// let encoded = http::Request::builder().uri("/accounts/%31%37").body(()).unwrap();
/// assert_eq!(PathSegment::new(1).extract(&encoded).unwrap().as_deref(), Some("17"));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct PathSegment {
    index: usize,
}

impl PathSegment {
    /// The segment at `index` (0 is the first after the leading `/`).
    pub fn new(index: usize) -> Self {
        PathSegment { index }
    }
}

impl<B> KeyExtractor<B> for PathSegment {
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        let path = request.uri().path();
        let segment = path
            .strip_prefix('/')
            .unwrap_or(path)
            .split('/')
            .nth(self.index);
        segment
            .map(|s| percent_decode(s, "the request path"))
            .transpose()
    }
}

/// Decodes `%XX` escapes, as routers do for path parameters. An escape that
/// is malformed stays as it is; a result that is not UTF-8 is a bad key.
pub(crate) fn percent_decode<'t>(text: &'t str, source: &str) -> Result<Cow<'t, str>, KeyError> {
    if !text.contains('%') {
        return Ok(Cow::Borrowed(text));
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| KeyError::NotText {
            source: source.to_owned(),
        })
}

/// The whole request path, such as a gRPC method
/// (`/jobs.Jobs/Start`): one lock per endpoint.
///
/// ```
/// use tower_dsync::layer::{KeyExtractor, MethodPath};
///
/// let req = http::Request::builder().uri("/jobs.Jobs/Start").body(()).unwrap();
/// assert_eq!(MethodPath.extract(&req).unwrap().as_deref(), Some("/jobs.Jobs/Start"));
/// ```
#[derive(Clone, Copy, Debug)]
pub struct MethodPath;

impl<B> KeyExtractor<B> for MethodPath {
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        Ok(Some(Cow::Borrowed(request.uri().path())))
    }
}

/// An extractor from a closure that can refuse a key with a reason.
///
/// ```
/// use tower_dsync::layer::{KeyError, KeyExtractor, try_key_fn};
///
/// let numeric = try_key_fn(|req: &http::Request<()>| {
///     let id = req.uri().path().trim_start_matches('/');
///     match id.parse::<u64>() {
///         Ok(_) => Ok(Some(id.to_owned())),
///         Err(_) => Err(KeyError::Invalid(format!("{id:?} is not a number"))),
///     }
/// });
/// let req = http::Request::builder().uri("/abc").body(()).unwrap();
/// assert!(numeric.extract(&req).is_err());
/// ```
pub fn try_key_fn<B, F>(f: F) -> TryKeyFn<F>
where
    F: Fn(&Request<B>) -> Result<Option<String>, KeyError> + Send + Sync + 'static,
{
    TryKeyFn(Arc::new(f))
}

/// See [`try_key_fn`].
pub struct TryKeyFn<F>(Arc<F>);

impl<F> Clone for TryKeyFn<F> {
    fn clone(&self) -> Self {
        TryKeyFn(self.0.clone())
    }
}

impl<F> fmt::Debug for TryKeyFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TryKeyFn")
    }
}

impl<B, F> KeyExtractor<B> for TryKeyFn<F>
where
    F: Fn(&Request<B>) -> Result<Option<String>, KeyError> + Send + Sync + 'static,
{
    fn extract<'r>(&self, request: &'r Request<B>) -> Result<Option<Cow<'r, str>>, KeyError> {
        Ok((self.0)(request)?.map(Cow::Owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_metadata_keys() {
        let request = Request::builder()
            .header("x-id", "a1")
            .header("x-bad", &b"\xff"[..])
            .body(())
            .unwrap();
        let header = HeaderKey::new("x-id").extract(&request).unwrap();
        assert_eq!(header.as_deref(), Some("a1"));
        let metadata = GrpcMetadataKey::new("x-id").extract(&request).unwrap();
        assert_eq!(metadata.as_deref(), Some("a1"));
        assert_eq!(HeaderKey::new("x-none").extract(&request).unwrap(), None);
        assert_eq!(
            HeaderKey::new("x-bad").extract(&request).unwrap_err(),
            KeyError::NotText {
                source: "header x-bad".to_owned()
            }
        );
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%61", "p").unwrap(), "aa");
        assert_eq!(percent_decode("%E2%9C%93", "p").unwrap(), "\u{2713}");
        assert_eq!(percent_decode("100%", "p").unwrap(), "100%");
        assert_eq!(percent_decode("%zz", "p").unwrap(), "%zz");
        assert!(percent_decode("%ff", "p").is_err());
    }
}
