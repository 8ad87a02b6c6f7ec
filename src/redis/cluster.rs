//! Redis Cluster mode: one connection that routes each command to the
//! master of its keys' slot, and wake-ups over sharded pub/sub.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use super::keys::{Keys, slot};
use super::local_waiters::{WaiterLists, deliver};

/// The connections to a cluster, made lazily: one for the locks'
/// commands, one for the wake-up subscriptions, whose push messages
/// (confirmations and wake-ups) go to the returned receiver.
///
/// Two, because a server drops the shard channels of a slot that moves
/// away with an unsolicited `sunsubscribe` push, and redis-rs (1.8) takes
/// such a push on a RESP3 connection for the reply to the request it is
/// waiting on: every later reply on that connection would go to the wrong
/// request, a lock command's among them. The commands' connection speaks
/// RESP2, where the server pushes nothing; only the subscriptions' can be
/// confused, which at worst costs wake-ups (waiters fall back to their
/// retry delay).
pub(crate) struct Connections {
    pub(crate) commands: ClusterConnection,
    /// With `wait_replicas`: the acquisitions' and extensions' own
    /// connection (Redis holds a connection's commands back while it
    /// `WAIT`s).
    pub(crate) durable: Option<ClusterConnection>,
    pub(crate) subscriptions: ClusterConnection,
    pub(crate) pushes: mpsc::UnboundedReceiver<PushInfo>,
}

pub(crate) fn connect(
    seeds: &[String],
    connect_timeout: Duration,
    durable: bool,
) -> redis::RedisResult<Connections> {
    let builder = || {
        ClusterClientBuilder::new(seeds.to_vec())
            .connection_timeout(connect_timeout)
            // `TRYAGAIN` (a slot migrating) and `CLUSTERDOWN` (a failover)
            // are retried after 5 to 100 ms, not redis-rs's default of
            // seconds: a command is bounded by the per-node timeout (a
            // fraction of the expiry), and should get its chances within
            // it. A retry after the caller gave up is never sent.
            .min_retry_wait(5)
            .max_retry_wait(100)
            .retry_wait_formula(5, 2)
    };
    let (push_sender, pushes) = mpsc::unbounded_channel();
    let config = || redis::cluster::ClusterConfig::new().set_connection_timeout(connect_timeout);
    let commands = builder().build()?;
    let subscriptions = builder()
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(push_sender)
        .build()?;
    Ok(Connections {
        durable: durable.then(|| commands.get_pending_async_connection_with_config(config())),
        commands: commands.get_pending_async_connection_with_config(config()),
        subscriptions: subscriptions.get_pending_async_connection_with_config(config()),
        pushes,
    })
}

/// The wake-up subscriptions of one process on a cluster: one channel per
/// slot it has waited in.
///
/// Every key of a name shares the name's hash tag (see `Keys::tagged`), so
/// each script runs on the one master that owns the name. A release is
/// announced with `SPUBLISH` on the channel of the waiting process for the
/// name's slot, which hashes to that slot too; the process subscribes
/// (`SSUBSCRIBE`) to its channel of a slot the first time one of its
/// waiters waits for a name there, and stays subscribed. redis-rs moves the
/// subscriptions when slots move and renews them after a reconnection. A
/// server without sharded pub/sub (before Redis 7) gets `PUBLISH` and
/// `SUBSCRIBE` instead: the scripts fall back when `SPUBLISH` is refused,
/// and so does the subscriber.
pub(crate) struct SlotWakeups {
    client_id: Arc<str>,
    state: Arc<State>,
}

struct State {
    conn: ClusterConnection,
    /// The slots whose channel's subscription the cluster confirmed.
    subscribed: Mutex<Channels>,
    /// Set once a server refused `SSUBSCRIBE`: subscribe with `SUBSCRIBE`.
    unsharded: AtomicBool,
}

/// The slots of the confirmed channels (one channel per slot), and how
/// many disconnections cleared them: a subscription confirmed across a
/// disconnection may be gone, and is not recorded.
#[derive(Default)]
struct Channels {
    set: HashSet<u16>,
    cleared: u64,
}

impl State {
    fn channels(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.subscribed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl SlotWakeups {
    /// Starts the task that reads the connection's push messages and wakes
    /// the waiters found in `waiters`.
    pub(crate) fn start(
        conn: ClusterConnection,
        pushes: mpsc::UnboundedReceiver<PushInfo>,
        client_id: Arc<str>,
        waiters: Weak<WaiterLists>,
    ) -> Self {
        let state = Arc::new(State {
            conn,
            subscribed: Mutex::default(),
            unsharded: AtomicBool::new(false),
        });
        tokio::spawn(read_pushes(pushes, Arc::downgrade(&state), waiters));
        SlotWakeups { client_id, state }
    }

    pub(crate) fn subscribed(&self, keys: &Keys) -> bool {
        keys.slot
            .is_some_and(|at| self.state.channels().set.contains(&at))
    }

    /// Subscribes to this process's channel for the slot of `keys`.
    pub(crate) async fn subscribe(&self, keys: &Keys, timeout: Duration) {
        self.state
            .subscribe(keys.channel(&self.client_id), timeout)
            .await;
    }
}

impl State {
    async fn subscribe(&self, channel: String, timeout: Duration) {
        let cleared = self.channels().cleared;
        let mut conn = self.conn.clone();
        let subscribed = tokio::time::timeout(timeout, async {
            if !self.unsharded.load(Ordering::Relaxed) {
                match conn.ssubscribe(&channel).await {
                    Err(e) if refused(&e) => self.unsharded.store(true, Ordering::Relaxed),
                    other => return other,
                }
            }
            conn.subscribe(&channel).await
        })
        .await;
        let mut channels = self.channels();
        if let Ok(Ok(())) = subscribed
            && channels.cleared == cleared
        {
            channels.set.insert(slot(channel.as_bytes()));
        }
    }
}

/// How long a subscription renewed after its slot moved may take.
const RESUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the server does not know the command (sharded pub/sub came with
/// Redis 7), or an ACL forbids it.
fn refused(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("unknown command") || text.contains("noperm")
}

/// Reads the cluster connection's push messages until the connection or
/// its `RedisSync` is gone: wake-ups wake waiters, confirmations and
/// removals of subscriptions keep the subscribed set true.
async fn read_pushes(
    mut pushes: mpsc::UnboundedReceiver<PushInfo>,
    state: Weak<State>,
    waiters: Weak<WaiterLists>,
) {
    while let Some(push) = pushes.recv().await {
        let Some(state) = state.upgrade() else { return };
        let mut data = push.data.into_iter();
        let channel = data.next().and_then(|v| text(&v));
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                let Some(waiters) = waiters.upgrade() else {
                    return;
                };
                if let Some(payload) = data.next().and_then(|v| text(&v)) {
                    deliver(&waiters, &payload);
                }
            }
            PushKind::SSubscribe | PushKind::Subscribe => {
                if let Some(channel) = channel {
                    state.channels().set.insert(slot(channel.as_bytes()));
                }
            }
            PushKind::SUnsubscribe | PushKind::Unsubscribe => {
                // This process never unsubscribes: the server dropped the
                // channel because its slot moved away. Subscribe again,
                // where the slot went (the connection follows `MOVED`).
                if let Some(channel) = channel
                    && state.channels().set.remove(&slot(channel.as_bytes()))
                {
                    tokio::spawn(async move {
                        state.subscribe(channel, RESUBSCRIBE_TIMEOUT).await;
                    });
                }
            }
            PushKind::Disconnection => {
                let mut channels = state.channels();
                channels.set.clear();
                channels.cleared += 1;
            }
            _ => {}
        }
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}
