//! The Redis keys of one lock name.

use std::sync::Arc;

/// Every key a lock name uses on a node. All but the lock key end in a
/// control character and a suffix; names cannot hold control characters,
/// so no lock key ends this way.
#[derive(Debug)]
pub(crate) struct Keys {
    /// The key prefix followed by the name; holds the owner's value.
    pub(crate) lock: Arc<str>,
    /// The name's fencing counter, kept forever.
    pub(crate) counter: Arc<str>,
    /// The wait queue: one entry per waiting process, by start of wait.
    pub(crate) queue: Arc<str>,
    /// The leases of the wait queue's entries.
    pub(crate) leases: Arc<str>,
}

impl Keys {
    /// The keys of the lock stored at `lock`.
    pub(crate) fn new(lock: String) -> Self {
        Keys {
            counter: format!("{lock}\u{1f}fence").into(),
            queue: format!("{lock}\u{1f}queue").into(),
            leases: format!("{lock}\u{1f}leases").into(),
            lock: lock.into(),
        }
    }
}
