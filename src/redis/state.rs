//! What every mutex of a `RedisSync` shares: the nodes, the wake-ups, this
//! process's line and waiters, and the settings.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use super::keys::{Keys, SharedKeys};
use super::local_waiters::WaiterLists;
use super::node::Node;
use super::wakeups::Wakeups;
use crate::local_queue::LocalQueues;

/// This process's waiters of each lock key.
pub(crate) type Waiters = Arc<WaiterLists>;

/// The state of one `RedisSync`, shared by its clones and its mutexes.
pub(crate) struct RedisState {
    pub(crate) nodes: Vec<Node>,
    pub(crate) wakeups: Wakeups,
    /// The in-process line per name: callers of `lock()` that may wait,
    /// and the requests of a layer over this backend, wait their turn in
    /// it.
    pub(crate) line: Arc<LocalQueues>,
    /// This process's waiters of each lock key, which wake-ups reach.
    pub(crate) waiters: Waiters,
    /// This process's id in the nodes' wait queues (random per `RedisSync`).
    pub(crate) client_id: Arc<str>,
    /// The start (ms since the epoch) of this process's latest waiter.
    pub(crate) last_start: AtomicU64,
    pub(crate) quorum: usize,
    pub(crate) key_prefix: String,
    /// The keys every name shares on independent nodes.
    pub(crate) shared_keys: SharedKeys,
    pub(crate) separator: String,
    pub(crate) set_nx_on_extend: bool,
    pub(crate) fail_fast: bool,
    /// How long a node that lost its state refuses new locks, at least.
    pub(crate) restart_delay: Duration,
}

impl RedisState {
    /// How long a node that lost its state refuses new locks of a mutex
    /// with `expiry`; `None` on one node or a Redis Cluster, where no other
    /// node could still hold a lock it forgot.
    pub(crate) fn recovery(&self, expiry: Duration) -> Option<Duration> {
        (self.nodes.len() > 1 && !self.wakeups.on_cluster()).then(|| expiry.max(self.restart_delay))
    }

    /// The lock key of `name` and the node's bookkeeping hash, without the
    /// name's other keys (on independent nodes, without building them).
    pub(crate) fn lock_and_node(&self, name: &str) -> (String, Arc<str>) {
        if self.wakeups.on_cluster() {
            let keys = Keys::tagged(&self.key_prefix, name);
            (keys.lock.to_string(), keys.node)
        } else {
            self.shared_keys.lock_and_node(&self.key_prefix, name)
        }
    }

    /// The keys of the lock `name`.
    pub(crate) fn keys(&self, name: &str) -> Keys {
        if self.wakeups.on_cluster() {
            Keys::tagged(&self.key_prefix, name)
        } else {
            Keys::plain_sharing(&self.key_prefix, name, &self.shared_keys)
        }
    }
}
