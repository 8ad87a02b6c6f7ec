//! What a request gets when the layer does not let it through: the
//! rejection of each cause (a busy key, a backend down, a bad or missing
//! key, a lost lock, a misconfiguration), and how it becomes an HTTP or a
//! gRPC response.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};

use super::extract::KeyError;
use crate::error::Error;

/// Why a request was rejected.
///
/// | kind | HTTP | gRPC status |
/// |---|---|---|
/// | `Busy`: the key stayed held beyond the wait budget | 409, `Retry-After` | `ABORTED` |
/// | `Unavailable`: backend down, no quorum, timeout | 503, `Retry-After` | `UNAVAILABLE` |
/// | `InvalidKey`: empty, too long, control characters, not text | 400 | `INVALID_ARGUMENT` |
/// | `MissingKey`: no key, when configured to reject | 400 | `INVALID_ARGUMENT` |
/// | `Lost`: the lock was lost and the handler aborted | 503 | `UNAVAILABLE` |
/// | `Misconfigured`: a key extractor set up wrong ([`KeyError::Misconfigured`](super::KeyError::Misconfigured)), or a mutex the backend refused to make | 500 | `INTERNAL` |
/// | `Mismatch`: an idempotency key reused with another request | 422 | `INVALID_ARGUMENT` |
/// | `TooLarge`: a request body over the idempotency layer's limit | 413 | `RESOURCE_EXHAUSTED` |
/// | `NotReplayable`: the key's first request completed, but its response was too large to keep | 409, no `Retry-After` | `ALREADY_EXISTS` |
/// | `DeadlineExceeded`: the key stayed held up to shortly before the request's [`Deadline`](super::Deadline) | 503, `Retry-After` | `DEADLINE_EXCEEDED` |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RejectionKind {
    /// Another request held the key for longer than the wait budget.
    Busy,
    /// The lock backend could not be reached or could not form a quorum.
    Unavailable,
    /// The request's key is malformed.
    InvalidKey,
    /// The request has no key and the layer rejects such requests.
    MissingKey,
    /// An extension failed while the handler ran, and the layer was set to
    /// abort the handler.
    Lost,
    /// The layer's key extractor cannot work where it is, or the backend
    /// refused to make the request's mutex (its value generator failed).
    Misconfigured,
    /// An [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) key
    /// came again with a request whose fingerprint differs from the
    /// first's.
    Mismatch,
    /// The request body is longer than an
    /// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer) reads
    /// for its fingerprint.
    TooLarge,
    /// The first request with this idempotency key completed, but its
    /// response was over the size limit and was not kept: it cannot be
    /// replayed, and is not run again.
    NotReplayable,
    /// The key stayed held until shortly before the request's
    /// [`Deadline`](super::Deadline) (a gRPC call's `grpc-timeout`): its
    /// caller would not wait longer.
    DeadlineExceeded,
}

/// A rejected request: its kind, a short message, and whether it was a gRPC
/// call. [`into_response`](Self::into_response) gives the default response;
/// [`DistLockLayerBuilder::rejection_response`](super::DistLockLayerBuilder::rejection_response)
/// replaces it.
///
/// ```
/// use tower_dsync::layer::{Rejection, RejectionKind};
///
/// let busy = Rejection::new(RejectionKind::Busy, "the key is busy", false)
///     .with_retry_after(std::time::Duration::from_millis(1200));
/// let response = busy.into_response();
/// assert_eq!(response.status(), 409);
/// assert_eq!(response.headers()["retry-after"], "2");
/// ```
#[derive(Debug, Clone)]
pub struct Rejection {
    kind: RejectionKind,
    message: String,
    grpc: bool,
    retry_after: Option<Duration>,
}

/// A replacement for the default rejection responses.
pub(crate) type RejectionMapper = Arc<dyn Fn(Rejection) -> Response<Bytes> + Send + Sync>;

impl RejectionKind {
    /// The kind as a metric label: `busy`, `unavailable`, `invalid_key`,
    /// `missing_key`, `lost`, `misconfigured`, `mismatch`, `too_large`,
    /// `not_replayable`, `deadline_exceeded`.
    ///
    /// ```
    /// use tower_dsync::layer::RejectionKind;
    /// assert_eq!(RejectionKind::DeadlineExceeded.label(), "deadline_exceeded");
    /// ```
    pub fn label(&self) -> &'static str {
        match self {
            RejectionKind::Busy => "busy",
            RejectionKind::Unavailable => "unavailable",
            RejectionKind::InvalidKey => "invalid_key",
            RejectionKind::MissingKey => "missing_key",
            RejectionKind::Lost => "lost",
            RejectionKind::Misconfigured => "misconfigured",
            RejectionKind::Mismatch => "mismatch",
            RejectionKind::TooLarge => "too_large",
            RejectionKind::NotReplayable => "not_replayable",
            RejectionKind::DeadlineExceeded => "deadline_exceeded",
        }
    }
}

impl Rejection {
    /// A rejection of `kind`; `grpc` tells whether the request was a gRPC
    /// call (`content-type: application/grpc...`).
    pub fn new(kind: RejectionKind, message: impl Into<String>, grpc: bool) -> Self {
        Rejection {
            kind,
            message: message.into(),
            grpc,
            retry_after: None,
        }
    }

    /// The key stayed held by another request beyond the wait budget; a
    /// retry makes sense after `retry_after` (the holder's remaining time).
    pub(crate) fn busy(retry_after: Duration, grpc: bool) -> Self {
        Rejection::new(
            RejectionKind::Busy,
            "the key is locked by another request",
            grpc,
        )
        .with_retry_after(retry_after)
    }

    /// The lock backend could not answer, or not with a quorum.
    /// The key stayed held until shortly before the request's deadline;
    /// `retry_after`: the holder's remaining time.
    pub(crate) fn deadline(retry_after: Duration, grpc: bool) -> Self {
        Rejection::new(
            RejectionKind::DeadlineExceeded,
            "the key stayed locked until the request's deadline",
            grpc,
        )
        .with_retry_after(retry_after)
    }

    pub(crate) fn unavailable(grpc: bool) -> Self {
        Rejection::new(
            RejectionKind::Unavailable,
            "the lock service is unavailable",
            grpc,
        )
    }

    /// The request's key is malformed: `reason` says how.
    pub(crate) fn invalid_key(reason: String, grpc: bool) -> Self {
        Rejection::new(RejectionKind::InvalidKey, reason, grpc)
    }

    /// The request has no key, and the layer rejects such requests.
    pub(crate) fn missing_key(grpc: bool) -> Self {
        Rejection::new(
            RejectionKind::MissingKey,
            "the request has no lock key",
            grpc,
        )
    }

    /// The lock was lost while the request was served, and the layer was
    /// set to abort it.
    pub(crate) fn lost(grpc: bool) -> Self {
        Rejection::new(
            RejectionKind::Lost,
            "the lock was lost while the request was served",
            grpc,
        )
    }

    /// The server is set up wrong: `reason` says how.
    pub(crate) fn misconfigured(reason: String, grpc: bool) -> Self {
        Rejection::new(RejectionKind::Misconfigured, reason, grpc)
    }

    /// The rejection of a request whose key could not be read. A
    /// misconfigured extractor is logged at `ERROR`: no request can fix it.
    pub(crate) fn for_key_error(error: &KeyError, grpc: bool) -> Self {
        if let KeyError::Misconfigured(reason) = error {
            tracing::error!(reason = reason.as_str(), "lock key extractor misconfigured");
            return Rejection::misconfigured(error.to_string(), grpc);
        }
        Rejection::invalid_key(error.to_string(), grpc)
    }

    /// The rejection of a request whose lock on `name` failed with `error`;
    /// a busy key without a known remaining time is retried after
    /// `expiry`, the longest it can stay held without an extension.
    pub(crate) fn for_lock_error(name: &str, error: Error, grpc: bool, expiry: Duration) -> Self {
        match error {
            Error::Held { remaining } => {
                tracing::debug!(name, "lock busy");
                Rejection::busy(remaining.unwrap_or(expiry), grpc)
            }
            Error::InvalidName { reason } => {
                Rejection::invalid_key(format!("invalid lock key: {reason}"), grpc)
            }
            Error::InvalidOptions { .. } | Error::GenValue(_) | Error::InvalidConfig { .. } => {
                tracing::error!(name, %error, "lock layer misconfigured");
                Rejection::misconfigured(error.to_string(), grpc)
            }
            error => {
                tracing::warn!(name, %error, "lock backend unavailable");
                Rejection::unavailable(grpc)
            }
        }
    }

    /// Sets when a retry makes sense.
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// The kind.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// The message, for the response body or `grpc-message`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the request was a gRPC call.
    pub fn is_grpc(&self) -> bool {
        self.grpc
    }

    /// When a retry makes sense, if known.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The HTTP status of this rejection.
    ///
    /// ```
    /// use tower_dsync::layer::{Rejection, RejectionKind};
    /// let r = Rejection::new(RejectionKind::InvalidKey, "bad", false);
    /// assert_eq!(r.http_status(), http::StatusCode::BAD_REQUEST);
    /// ```
    pub fn http_status(&self) -> StatusCode {
        match self.kind {
            RejectionKind::Busy => StatusCode::CONFLICT,
            RejectionKind::Unavailable | RejectionKind::Lost | RejectionKind::DeadlineExceeded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            RejectionKind::InvalidKey | RejectionKind::MissingKey => StatusCode::BAD_REQUEST,
            RejectionKind::Misconfigured => StatusCode::INTERNAL_SERVER_ERROR,
            RejectionKind::Mismatch => StatusCode::UNPROCESSABLE_ENTITY,
            RejectionKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RejectionKind::NotReplayable => StatusCode::CONFLICT,
        }
    }

    /// The gRPC status code of this rejection (`ABORTED` is 10,
    /// `UNAVAILABLE` 14, `INVALID_ARGUMENT` 3, `INTERNAL` 13,
    /// `RESOURCE_EXHAUSTED` 8, `ALREADY_EXISTS` 6, `DEADLINE_EXCEEDED` 4).
    ///
    /// ```
    /// use tower_dsync::layer::{Rejection, RejectionKind};
    /// assert_eq!(Rejection::new(RejectionKind::Busy, "busy", true).grpc_code(), 10);
    /// ```
    pub fn grpc_code(&self) -> u16 {
        match self.kind {
            RejectionKind::Busy => 10,
            RejectionKind::Unavailable | RejectionKind::Lost => 14,
            RejectionKind::InvalidKey | RejectionKind::MissingKey => 3,
            RejectionKind::Misconfigured => 13,
            RejectionKind::Mismatch => 3,
            RejectionKind::TooLarge => 8,
            RejectionKind::NotReplayable => 6,
            RejectionKind::DeadlineExceeded => 4,
        }
    }

    /// The default response: for HTTP, the status with a short plain-text
    /// body and, for `Busy` and `Unavailable`, `Retry-After` in whole
    /// seconds rounded up; for gRPC, a trailers-only response (HTTP 200,
    /// `grpc-status`, percent-encoded `grpc-message`, empty body).
    ///
    /// ```
    /// use tower_dsync::layer::{Rejection, RejectionKind};
    ///
    /// let r = Rejection::new(RejectionKind::Unavailable, "backend down", true).into_response();
    /// assert_eq!(r.status(), 200);
    /// assert_eq!(r.headers()["grpc-status"], "14");
    /// assert_eq!(r.headers()["grpc-message"], "backend down");
    /// ```
    pub fn into_response(self) -> Response<Bytes> {
        if self.grpc {
            let mut response = Response::new(Bytes::new());
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(self.grpc_code()));
            if let Ok(message) = HeaderValue::from_str(&grpc_percent_encode(&self.message)) {
                headers.insert("grpc-message", message);
            }
            return response;
        }
        let status = self.http_status();
        let retry_after = match self.kind {
            RejectionKind::Busy | RejectionKind::Unavailable | RejectionKind::DeadlineExceeded => {
                Some(self.retry_after.unwrap_or(Duration::from_secs(1)))
            }
            _ => None,
        };
        let mut response = Response::new(Bytes::from(format!("{}\n", self.message)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(after) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(whole_seconds(after)));
        }
        response
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Seconds, rounded up, at least 1.
fn whole_seconds(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// gRPC's encoding of `grpc-message`: bytes outside printable ASCII, and
/// `%`, as `%XX`.
fn grpc_percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_secs(2)), 2);
        assert_eq!(whole_seconds(Duration::from_millis(2001)), 3);
        assert_eq!(whole_seconds(Duration::ZERO), 1);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_percent_encode("a b%c"), "a b%25c");
        assert_eq!(grpc_percent_encode("é\n"), "%C3%A9%0A");
    }
}
