//! What a layer tells the `metrics` facade (feature `metrics`): its
//! acquisitions, waits, holds, rejections by kind, lost locks, failed
//! extensions, and the locks it holds now, each labelled with the layer's
//! namespace (never the key). Without the feature, every call here is
//! nothing.
//!
//! The handles are registered when the layer is built, with the recorder
//! installed then: install it first.

use std::time::Duration;

use super::rejection::RejectionKind;

/// Acquisitions (counter).
pub const ACQUISITIONS: &str = "dsync_lock_acquisitions_total";
/// How long each acquisition waited, in seconds (histogram).
pub const WAIT_SECONDS: &str = "dsync_lock_wait_seconds";
/// How long each lock was held, in seconds (histogram).
pub const HOLD_SECONDS: &str = "dsync_lock_hold_seconds";
/// Locks held now (gauge).
pub const HELD: &str = "dsync_locks_held";
/// Rejected requests, by `kind` (counter).
pub const REJECTIONS: &str = "dsync_lock_rejections_total";
/// Locks lost while their request was served (counter).
pub const LOST: &str = "dsync_locks_lost_total";
/// Extensions that failed, retried or not (counter).
pub const EXTENSION_FAILURES: &str = "dsync_lock_extension_failures_total";

/// Every rejection kind, in the order of [`index`].
#[cfg(feature = "metrics")]
const KINDS: [RejectionKind; 10] = [
    RejectionKind::Busy,
    RejectionKind::Unavailable,
    RejectionKind::InvalidKey,
    RejectionKind::MissingKey,
    RejectionKind::Lost,
    RejectionKind::Misconfigured,
    RejectionKind::Mismatch,
    RejectionKind::TooLarge,
    RejectionKind::NotReplayable,
    RejectionKind::DeadlineExceeded,
];

/// The place of `kind` in [`KINDS`].
#[cfg(feature = "metrics")]
fn index(kind: RejectionKind) -> usize {
    KINDS.iter().position(|k| *k == kind).unwrap_or(0)
}

/// A layer's meters: cheap to clone.
#[derive(Clone, Debug, Default)]
pub(crate) struct Meters {
    #[cfg(feature = "metrics")]
    handles: Option<std::sync::Arc<Handles>>,
}

#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Handles {
    acquisitions: metrics::Counter,
    wait: metrics::Histogram,
    hold: metrics::Histogram,
    held: metrics::Gauge,
    lost: metrics::Counter,
    extension_failures: metrics::Counter,
    rejections: [metrics::Counter; 10],
}

impl Meters {
    /// The meters of a layer in `namespace`, from the recorder installed
    /// now.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn new(namespace: &str) -> Self {
        #[cfg(feature = "metrics")]
        {
            let ns = namespace.to_owned();
            let rejections = KINDS.map(|kind| {
                metrics::counter!(REJECTIONS, "namespace" => ns.clone(), "kind" => kind.label())
            });
            Meters {
                handles: Some(std::sync::Arc::new(Handles {
                    acquisitions: metrics::counter!(ACQUISITIONS, "namespace" => ns.clone()),
                    wait: metrics::histogram!(WAIT_SECONDS, "namespace" => ns.clone()),
                    hold: metrics::histogram!(HOLD_SECONDS, "namespace" => ns.clone()),
                    held: metrics::gauge!(HELD, "namespace" => ns.clone()),
                    lost: metrics::counter!(LOST, "namespace" => ns.clone()),
                    extension_failures: metrics::counter!(EXTENSION_FAILURES, "namespace" => ns),
                    rejections,
                })),
            }
        }
        #[cfg(not(feature = "metrics"))]
        Meters {}
    }

    /// Whether anything is recorded: with the feature, and a recorder's
    /// handles.
    pub(crate) fn is_on(&self) -> bool {
        #[cfg(feature = "metrics")]
        return self.handles.is_some();
        #[cfg(not(feature = "metrics"))]
        false
    }

    /// A lock was acquired after waiting `waited`; it is held now.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn acquired(&self, waited: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles {
            h.acquisitions.increment(1);
            h.wait.record(waited.as_secs_f64());
            h.held.increment(1.0);
        }
    }

    /// A lock held for `held_for` was let go.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn released(&self, held_for: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles {
            h.hold.record(held_for.as_secs_f64());
            h.held.decrement(1.0);
        }
    }

    /// A request was rejected.
    #[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
    pub(crate) fn rejected(&self, kind: RejectionKind) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles {
            h.rejections[index(kind)].increment(1);
        }
    }

    /// A held lock was lost.
    pub(crate) fn lost(&self) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles {
            h.lost.increment(1);
        }
    }

    /// An extension failed.
    pub(crate) fn extension_failed(&self) {
        #[cfg(feature = "metrics")]
        if let Some(h) = &self.handles {
            h.extension_failures.increment(1);
        }
    }
}
