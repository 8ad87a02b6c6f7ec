//! Push wake-ups: every release publishes on the name's channel, and
//! waiters sleep until a release message, the holder's remaining time or
//! their retry delay, whichever comes first.
//!
//! Each node has one subscriber connection, shared by every waiter of a
//! `RedisSync`, owned by a background task that connects on first use, and
//! reconnects and subscribes again to every watched channel after a
//! connection loss. Correctness never depends on a message: a lost one only
//! costs the fallback wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use tokio::sync::{Notify, mpsc, oneshot};

type Registry = Arc<Mutex<HashMap<Arc<str>, Channel>>>;

/// How long connecting, or one subscription, may take before the node's
/// subscriber starts over.
const SUBSCRIBER_TIMEOUT: Duration = Duration::from_secs(2);

/// Channels watched by waiters, and a subscriber task per node.
pub(crate) struct Wakeups {
    channels: Registry,
    nodes: Vec<mpsc::UnboundedSender<Command>>,
}

struct Channel {
    signal: Arc<Notify>,
    watchers: usize,
    /// The last release signalled. Every node announces a release with the
    /// same nonce, and it must wake one waiter, not one per node.
    last_release: Option<String>,
}

enum Command {
    /// Subscribe, and say when the node confirmed (or could not).
    Subscribe(Arc<str>, oneshot::Sender<()>),
    Unsubscribe(Arc<str>),
}

impl Wakeups {
    /// Starts one subscriber task per node; each connects on first use.
    pub(crate) fn start(clients: &[redis::Client]) -> Self {
        let channels: Registry = Arc::default();
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

    /// Watches `channel` until the returned guard is dropped. Returns once
    /// every node confirmed the subscription, or failed to, or `timeout`
    /// passed: a release after that is not missed.
    pub(crate) async fn watch(self: &Arc<Self>, channel: &Arc<str>, timeout: Duration) -> Watch {
        let (watch, confirmations) = {
            let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = channels.entry(channel.clone()).or_insert_with(|| Channel {
                signal: Arc::default(),
                watchers: 0,
                last_release: None,
            });
            entry.watchers += 1;
            let mut confirmations = Vec::new();
            for node in &self.nodes {
                let (tx, rx) = oneshot::channel();
                let _ = node.send(Command::Subscribe(channel.clone(), tx));
                confirmations.push(rx);
            }
            let watch = Watch {
                wakeups: self.clone(),
                channel: channel.clone(),
                signal: entry.signal.clone(),
                woken: false,
            };
            (watch, confirmations)
        };
        let _ = tokio::time::timeout(timeout, join_all(confirmations)).await;
        watch
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
    signal: Arc<Notify>,
    /// Woken by a release and not yet done with it: if the waiter goes away
    /// now, the wake passes to the next waiter.
    woken: bool,
}

impl Watch {
    /// Waits for a release of the name (this waiter's turn to retry), at
    /// most `timeout`. Each release wakes one waiter of the process, first
    /// come first served; a release while nobody waits is kept for the next.
    pub(crate) async fn wait(&mut self, timeout: Duration) {
        self.woken = tokio::time::timeout(timeout, self.signal.notified())
            .await
            .is_ok();
    }

    /// The retry after a wake is over (acquired or refused): the wake was
    /// used.
    pub(crate) fn settled(&mut self) {
        self.woken = false;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.woken {
            self.signal.notify_one();
        }
        self.wakeups.unwatch(&self.channel);
    }
}

/// One node's subscriber: connects when a channel is first watched, keeps
/// the subscriptions in line with the watched channels, and wakes waiters.
/// It ends when its `RedisSync` is dropped.
async fn subscriber(
    client: redis::Client,
    channels: Weak<Mutex<HashMap<Arc<str>, Channel>>>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut backoff = Duration::from_millis(50);
    // A command that arrived while disconnected.
    let mut pending: Option<Command> = None;
    loop {
        if pending.is_none() && watched(&channels).is_none_or(|c| c.is_empty()) {
            // Nothing to watch: connect on the next command only.
            match commands.recv().await {
                Some(command) => pending = Some(command),
                None => return,
            }
        }
        let connected = tokio::time::timeout(SUBSCRIBER_TIMEOUT, client.get_async_pubsub()).await;
        let Ok(Ok(pubsub)) = connected else {
            // Confirm at once: a waiter must not wait for a node that is down.
            if let Some(Command::Subscribe(_, confirm)) = pending.take() {
                let _ = confirm.send(());
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                command = commands.recv() => match command {
                    None => return,
                    Some(command) => pending = Some(command),
                },
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
            continue;
        };
        backoff = Duration::from_millis(50);
        let (mut sink, mut stream) = pubsub.split();
        let mut healthy = true;
        for channel in watched(&channels).unwrap_or_default() {
            healthy &= subscribe(&mut sink, &channel).await;
        }
        if let Some(command) = pending.take() {
            healthy &= apply(&mut sink, command).await;
        }
        while healthy {
            tokio::select! {
                command = commands.recv() => match command {
                    None => return,
                    Some(command) => healthy = apply(&mut sink, command).await,
                },
                message = stream.next() => {
                    let Some(message) = message else { break };
                    let Some(registry) = channels.upgrade() else { return };
                    let nonce: String = message.get_payload().unwrap_or_default();
                    let mut registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Some(entry) = registry.get_mut(message.get_channel_name())
                        && entry.last_release.as_deref() != Some(nonce.as_str())
                    {
                        entry.last_release = Some(nonce);
                        entry.signal.notify_one();
                    }
                }
            }
        }
    }
}

/// The channels watched now, if the registry still exists.
fn watched(channels: &Weak<Mutex<HashMap<Arc<str>, Channel>>>) -> Option<Vec<Arc<str>>> {
    let registry = channels.upgrade()?;
    let registry = registry.lock().unwrap_or_else(PoisonError::into_inner);
    Some(registry.keys().cloned().collect())
}

async fn subscribe(sink: &mut redis::aio::PubSubSink, channel: &str) -> bool {
    matches!(
        tokio::time::timeout(SUBSCRIBER_TIMEOUT, sink.subscribe(channel)).await,
        Ok(Ok(()))
    )
}

/// Applies a command; false if the connection failed.
async fn apply(sink: &mut redis::aio::PubSubSink, command: Command) -> bool {
    match command {
        Command::Subscribe(channel, confirm) => {
            let ok = subscribe(sink, &channel).await;
            let _ = confirm.send(());
            ok
        }
        Command::Unsubscribe(channel) => matches!(
            tokio::time::timeout(SUBSCRIBER_TIMEOUT, sink.unsubscribe(&*channel)).await,
            Ok(Ok(()))
        ),
    }
}
