//! The layer's public choices ([`MissingKey`], [`ReleaseOn`], [`OnLost`])
//! and its timing bounds.

use std::time::Duration;

#[cfg(doc)]
use super::held::HeldLock;

/// What a request without a key gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// It passes through to the inner service, unlocked (the default).
    #[default]
    PassThrough,
    /// It is rejected with 400 (or `INVALID_ARGUMENT`).
    Reject,
}

/// When the lock is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReleaseOn {
    /// When the response body has been sent to its end, or dropped (the
    /// default): a streaming response holds the lock until its last chunk.
    #[default]
    BodyEnd,
    /// As soon as the response head is ready.
    Head,
}

/// What happens when the lock is lost while the request is served: its
/// validity ended without a successful extension, the backend refused an
/// extension, or `max_hold` passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnLost {
    /// The handler is told through [`HeldLock`] and keeps running (the
    /// default).
    #[default]
    Notify,
    /// The handler is dropped; the client gets 503 (or `UNAVAILABLE`) if the
    /// response head was not sent yet, else the body ends with an error.
    Abort,
}

/// The shortest interval between two extensions of a held lock (tokio's
/// timers tick in milliseconds).
pub(crate) const MIN_EXTEND_EVERY: Duration = Duration::from_millis(1);
