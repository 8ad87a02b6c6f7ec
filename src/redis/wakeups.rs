//! Push wake-ups: `unlock` publishes on the name's channel, and waiters
//! sleep until a release message, the holder's remaining time or their retry
//! delay, whichever comes first.
//!
//! Each node has one subscriber connection, shared by every waiter of a
//! `RedisSync`, owned by a background task that reconnects and subscribes
//! again to every watched channel after a connection loss. Correctness never
//! depends on a message: a lost one only costs the fallback wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};

/// Channels watched by waiters, and a subscriber task per node.
pub(crate) struct Wakeups {
    channels: Arc<Mutex<HashMap<Arc<str>, Channel>>>,
    nodes: Vec<mpsc::UnboundedSender<Command>>,
}

struct Channel {
    signal: Arc<Signal>,
    watchers: usize,
    /// The value of the last release signalled: every node announces the
    /// same release, and it must wake one waiter, not one per node.
    last_release: Option<String>,
}

/// Wakes one waiter per release, first come first served (a release
/// while nobody waits is kept for the next one). Waking every waiter would
/// make them all retry at once and, over several nodes, split the votes so
/// that none of them wins.
#[derive(Default)]
pub(crate) struct Signal {
    notify: Notify,
}

enum Command {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
}

impl Wakeups {
    /// Starts one subscriber task per node.
    pub(crate) fn start(clients: &[redis::Client]) -> Self {
        let channels: Arc<Mutex<HashMap<Arc<str>, Channel>>> = Arc::default();
        let nodes = clients
            .iter()
            .map(|client| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(subscriber(client.clone(), Arc::downgrade(&channels), rx));
                tx
            })
            .collect();
        Wakeups { channels, nodes }
    }

    /// Watches `channel` until the returned guard is dropped.
    pub(crate) fn watch(self: &Arc<Self>, channel: &Arc<str>) -> Watch {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = channels.entry(channel.clone()).or_insert_with(|| Channel {
            signal: Arc::default(),
            watchers: 0,
            last_release: None,
        });
        entry.watchers += 1;
        if entry.watchers == 1 {
            for node in &self.nodes {
                let _ = node.send(Command::Subscribe(channel.clone()));
            }
        }
        Watch {
            wakeups: self.clone(),
            channel: channel.clone(),
            signal: entry.signal.clone(),
        }
    }

    fn unwatch(&self, channel: &Arc<str>) {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = channels.get_mut(channel) {
            entry.watchers -= 1;
            if entry.watchers == 0 {
                channels.remove(channel);
                for node in &self.nodes {
                    let _ = node.send(Command::Unsubscribe(channel.clone()));
                }
            }
        }
    }
}

/// A waiter's subscription to one name's releases.
pub(crate) struct Watch {
    wakeups: Arc<Wakeups>,
    channel: Arc<str>,
    signal: Arc<Signal>,
}

impl Watch {
    /// Waits for a release of the name (this waiter's turn to retry), at
    /// most `timeout`.
    pub(crate) async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.signal.notify.notified()).await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.wakeups.unwatch(&self.channel);
    }
}

/// One node's subscriber: (re)connects, keeps the subscriptions in line
/// with the watched channels, and signals releases.
async fn subscriber(
    client: redis::Client,
    channels: Weak<Mutex<HashMap<Arc<str>, Channel>>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(watched) = channels.upgrade() else {
            return;
        };
        let pubsub = match client.get_async_pubsub().await {
            Ok(pubsub) => pubsub,
            Err(_) => {
                drop(watched);
                // Commands that arrive meanwhile are covered by the
                // resubscription after the reconnect.
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    command = commands.recv() => if command.is_none() { return },
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let (mut sink, mut stream) = pubsub.split();
        let current: Vec<Arc<str>> = watched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        drop(watched);
        let mut healthy = true;
        for channel in current {
            healthy &= sink.subscribe(&*channel).await.is_ok();
        }
        while healthy {
            tokio::select! {
                command = commands.recv() => {
                    healthy = match command {
                        None => return,
                        Some(Command::Subscribe(channel)) => sink.subscribe(&*channel).await.is_ok(),
                        Some(Command::Unsubscribe(channel)) => sink.unsubscribe(&*channel).await.is_ok(),
                    };
                }
                message = stream.next() => {
                    let Some(message) = message else { break };
                    let Some(watched) = channels.upgrade() else { return };
                    let released: String = message.get_payload().unwrap_or_default();
                    let mut watched = watched.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(entry) = watched.get_mut(message.get_channel_name())
                        && entry.last_release.as_deref() != Some(released.as_str())
                    {
                        entry.last_release = Some(released);
                        entry.signal.notify.notify_one();
                    }
                }
            }
        }
    }
}
