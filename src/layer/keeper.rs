//! The background task that keeps a request's lock: it extends the lock
//! every interval while the request is in flight, reports a failed extension,
//! and releases the lock when the request lets go of its guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedMutexGuard, oneshot, watch};
use tokio::time::{Instant, sleep_until};

use super::held::State;
use super::queue::{Holder, Place};
use crate::error::Error;
use crate::sync::DistMutex;

/// Dropping the guard releases the lock (in the keeper task, never on the
/// response path).
#[derive(Debug)]
pub(crate) struct ReleaseGuard {
    _release: oneshot::Sender<()>,
    /// Tells this name's local queue, at once, that the release is under
    /// way (before the keeper task even runs).
    holder: Arc<Holder>,
}

impl Drop for ReleaseGuard {
    fn drop(&mut self) {
        self.holder.releasing();
    }
}

/// Everything the keeper owns while the lock is held.
pub(crate) struct Keeper<M> {
    pub(crate) mutex: M,
    /// This request's turn in the local queue, passed on after release.
    pub(crate) turn: OwnedMutexGuard<()>,
    pub(crate) place: Place,
    pub(crate) state: watch::Sender<State>,
    pub(crate) interval: Duration,
    /// The longest a release may take: past the expiry it is moot.
    pub(crate) release_timeout: Duration,
    /// Told when an extension fails (the abort option listens).
    pub(crate) on_lost: Option<oneshot::Sender<()>>,
    /// No extension past this instant: the lock is then given up as lost.
    pub(crate) hold_until: Option<Instant>,
    /// The layer's count of live keepers, this one included once spawned.
    pub(crate) live: Arc<AtomicUsize>,
}

/// Counts a keeper task as live until the task ends (also when the runtime
/// drops it unfinished).
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Live(count)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<M: DistMutex> Keeper<M> {
    /// Starts the keeper; the lock lives until the guard is dropped.
    pub(crate) fn spawn(self) -> ReleaseGuard {
        let (release_tx, release_rx) = oneshot::channel();
        let holder = self.place.shared().clone();
        let live = Live::new(self.live.clone());
        tokio::spawn(async move {
            let _live = live;
            self.run(release_rx).await;
        });
        ReleaseGuard {
            _release: release_tx,
            holder,
        }
    }

    async fn run(mut self, mut release: oneshot::Receiver<()>) {
        let mut next = Instant::now() + self.interval;
        let mut lost = false;
        loop {
            tokio::select! {
                biased;
                _ = &mut release => break,
                () = sleep_until(self.hold_until.map_or(next, |end| next.min(end))), if !lost => {
                    let extended = if self.hold_until.is_some_and(|end| Instant::now() >= end) {
                        Err("held longer than max_hold".to_owned())
                    } else {
                        self.mutex.extend().await.map_err(|e| e.to_string())
                    };
                    match extended {
                        Ok(()) => {
                            let until = self.mutex.until();
                            self.place.set_holder_until(until);
                            self.state.send_modify(|s| s.until = until);
                            tracing::trace!(name = self.mutex.name(), "lock extended");
                            next = Instant::now() + self.interval;
                        }
                        Err(error) => {
                            tracing::warn!(name = self.mutex.name(), %error, "lock lost: not extended");
                            lost = true;
                            self.state.send_modify(|s| s.lost = true);
                            if let Some(tell) = self.on_lost.take() {
                                let _ = tell.send(());
                            }
                        }
                    }
                }
            }
        }
        match tokio::time::timeout(self.release_timeout, self.mutex.unlock()).await {
            Ok(Ok(())) => tracing::debug!(name = self.mutex.name(), "lock released"),
            Ok(Err(Error::NotAcquired)) if lost => {}
            Ok(Err(error)) => {
                tracing::warn!(name = self.mutex.name(), %error, "lock release failed; it expires on its own")
            }
            Err(_) => {
                tracing::warn!(
                    name = self.mutex.name(),
                    "lock release timed out; it expires on its own"
                )
            }
        }
        self.state.send_modify(|s| s.released = true);
        self.place.set_holder_until(None);
        // The next local request for this name may go now.
        drop(self.turn);
    }
}
