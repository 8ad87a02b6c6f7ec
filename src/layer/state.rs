//! What every service of one layer shares: the settings as built, the
//! in-process line per key and the counters.

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use super::alarm::AlarmClock;
use super::meters::Meters;
use super::name::Namer;
use super::rejection::RejectionMapper;
use super::settings::{MissingKey, OnLost, ReleaseOn};
use super::stats::LockStats;
use crate::local_queue::LocalQueues;
use crate::options::DistMutexOptions;
use crate::sync::{DistSync, LocalLine};

/// What every service of a layer shares.
pub(crate) struct LayerState<D: DistSync> {
    pub(crate) sync: D,
    pub(crate) namer: Namer,
    /// Keys are whole lock names, built by a layer in front (see
    /// `DistLockLayerBuilder::keys_are_names`).
    pub(crate) keys_are_names: bool,
    pub(crate) options: DistMutexOptions,
    pub(crate) wait: Duration,
    pub(crate) missing: MissingKey,
    pub(crate) release: ReleaseOn,
    pub(crate) lost: OnLost,
    pub(crate) extend_every: Duration,
    /// The longest validity of an acquisition: `options.validity()`.
    pub(crate) validity: Duration,
    pub(crate) max_hold: Option<Duration>,
    pub(crate) mapper: Option<RejectionMapper>,
    /// The in-process line per key: the backend's when it lends one
    /// ([`DistSync::local_line`](crate::DistSync)), else the layer's own.
    pub(crate) queues: Arc<LocalQueues>,
    /// The backend's line, when `queues` is it: a request that holds its
    /// turn there makes its mutex with it, so that the backend does not
    /// line it up again.
    pub(crate) line: Option<LocalLine<D::Mutex>>,
    /// Locks held now: one per extend loop task.
    pub(crate) held_count: Arc<AtomicUsize>,
    /// The timers that start the extend loops of this layer's locks.
    pub(crate) alarms: AlarmClock,
    /// What this layer tells the `metrics` facade.
    pub(crate) meters: Meters,
}

impl<D: DistSync> LayerState<D> {
    pub(crate) fn stats(&self) -> LockStats {
        LockStats::new(self.queues.clone(), self.held_count.clone())
    }
}
