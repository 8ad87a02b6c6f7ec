//! How the releases addressed to this process reach it: one subscriber per
//! independent node, or the cluster's slot channels.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::keys::Keys;
use super::local_waiters::{WaiterLists, deliver};

/// How long connecting, or subscribing, may take before the node's
/// subscriber starts over.
const SUBSCRIBER_TIMEOUT: Duration = Duration::from_secs(2);

/// How the releases addressed to one process reach it.
///
/// Each process (`RedisSync`) has its own wake-up channel, and a release
/// publishes on the channel of the process first in the name's wait queue,
/// naming the lock key; that process wakes its first waiter for the name.
/// Correctness never depends on a message: a lost one only costs the
/// waiter's fallback wait.
pub(crate) enum Wakeups {
    /// Independent nodes: one subscriber per node, on one channel.
    Nodes(NodeWakeups),
    /// A Redis Cluster: one channel per slot, over the cluster connection.
    #[cfg(feature = "cluster")]
    Cluster(super::cluster::SlotWakeups),
}

impl Wakeups {
    /// Whether these are a Redis Cluster's (its keys carry their name as a
    /// hash tag).
    pub(crate) fn on_cluster(&self) -> bool {
        match self {
            Wakeups::Nodes(_) => false,
            #[cfg(feature = "cluster")]
            Wakeups::Cluster(_) => true,
        }
    }

    /// Whether a release of the name of `keys` announced from now on
    /// reaches this process.
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    pub(crate) fn subscribed(&self, keys: &Keys) -> bool {
        match self {
            Wakeups::Nodes(nodes) => nodes.subscribed(),
            #[cfg(feature = "cluster")]
            Wakeups::Cluster(slots) => slots.subscribed(keys),
        }
    }

    /// Subscribes where needed for the name of `keys`, and returns once the
    /// subscriptions are confirmed, or failed, or `timeout` passed.
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    pub(crate) async fn subscribe(&self, keys: &Keys, timeout: Duration) {
        match self {
            Wakeups::Nodes(nodes) => nodes.subscribe(timeout).await,
            #[cfg(feature = "cluster")]
            Wakeups::Cluster(slots) => slots.subscribe(keys, timeout).await,
        }
    }
}

/// The subscribers of one process, one per node: each a background task
/// that connects the first time a waiter needs it, then stays subscribed,
/// and reconnects and subscribes again after a connection loss.
pub(crate) struct NodeWakeups {
    nodes: Vec<Subscriber>,
}

struct Subscriber {
    /// Asks the task to subscribe, and to say when it is (or could not).
    requests: mpsc::UnboundedSender<oneshot::Sender<()>>,
    /// Whether the subscription is in place now.
    subscribed: Arc<AtomicBool>,
}

impl NodeWakeups {
    /// Starts one subscriber task per node, for `channel`; each connects on
    /// first use. Messages wake the waiters found in `waiters`.
    pub(crate) fn start(
        clients: &[redis::Client],
        channel: Arc<str>,
        waiters: Weak<WaiterLists>,
    ) -> Self {
        let nodes = clients
            .iter()
            .map(|client| {
                let (requests, rx) = mpsc::unbounded_channel();
                let subscribed = Arc::new(AtomicBool::new(false));
                tokio::spawn(subscriber(
                    client.clone(),
                    channel.clone(),
                    waiters.clone(),
                    subscribed.clone(),
                    rx,
                ));
                Subscriber {
                    requests,
                    subscribed,
                }
            })
            .collect();
        NodeWakeups { nodes }
    }

    /// Whether every node's subscription is in place now: a release
    /// announced from now on reaches this process.
    pub(crate) fn subscribed(&self) -> bool {
        self.nodes
            .iter()
            .all(|node| node.subscribed.load(Ordering::Acquire))
    }

    /// Subscribes on every node where the subscription is not in place, and
    /// returns once each confirmed, or failed to, or `timeout` passed.
    pub(crate) async fn subscribe(&self, timeout: Duration) {
        let confirmations: Vec<_> = self
            .nodes
            .iter()
            .filter(|node| !node.subscribed.load(Ordering::Acquire))
            .map(|node| {
                let (tx, rx) = oneshot::channel();
                let _ = node.requests.send(tx);
                rx
            })
            .collect();
        let _ = tokio::time::timeout(timeout, join_all(confirmations)).await;
    }
}

/// One node's subscriber: connects when first asked, then stays subscribed
/// to the process's channel, and wakes waiters. It ends when its
/// `RedisSync` is dropped.
async fn subscriber(
    client: redis::Client,
    channel: Arc<str>,
    waiters: Weak<WaiterLists>,
    subscribed: Arc<AtomicBool>,
    mut requests: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
) {
    // Nothing to do until a waiter needs wake-ups.
    let Some(first) = requests.recv().await else {
        return;
    };
    let mut waiting = vec![first];
    let mut backoff = Duration::from_millis(50);
    loop {
        let pubsub = tokio::time::timeout(SUBSCRIBER_TIMEOUT, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&*channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let Ok(Ok(pubsub)) = pubsub else {
            // Answer at once: a waiter must not wait for a node that is down.
            for confirm in waiting.drain(..) {
                let _ = confirm.send(());
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                request = requests.recv() => match request {
                    None => return,
                    Some(confirm) => waiting.push(confirm),
                },
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
            continue;
        };
        backoff = Duration::from_millis(50);
        subscribed.store(true, Ordering::Release);
        for confirm in waiting.drain(..) {
            let _ = confirm.send(());
        }
        let (_sink, mut stream) = pubsub.split();
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    None => return,
                    Some(confirm) => { let _ = confirm.send(()); }
                },
                message = stream.next() => {
                    let Some(message) = message else { break };
                    let Some(waiters) = waiters.upgrade() else { return };
                    let payload: String = message.get_payload().unwrap_or_default();
                    deliver(&waiters, &payload);
                }
            }
        }
        subscribed.store(false, Ordering::Release);
    }
}
