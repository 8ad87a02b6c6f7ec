//! How a request gets its lock: its turn in the local queue, then the
//! backend, both within the wait budget; then a keeper holds the lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::oneshot;
use tokio::time::{Instant, timeout_at};

use super::Shared;
use super::held::HeldLock;
use super::keeper::{Keeper, ReleaseGuard};
use super::rejection::{Rejection, RejectionKind};
use crate::error::Error;
use crate::sync::{DistMutex, DistSync};

/// What a request that got its lock carries.
pub(crate) struct Holding {
    pub(crate) guard: ReleaseGuard,
    pub(crate) held: HeldLock,
    /// With the abort option: fires when the lock is lost.
    pub(crate) lost: Option<oneshot::Receiver<()>>,
}

/// Waits for the lock on `name`, at most the wait budget.
pub(crate) async fn acquire<D: DistSync>(
    shared: Arc<Shared<D>>,
    name: String,
    grpc: bool,
) -> Result<Holding, Rejection> {
    let start = Instant::now();
    let deadline = start.checked_add(shared.wait).unwrap_or_else(far_future);
    let fail_fast = shared.wait.is_zero();
    let place = shared.queues.join(Arc::from(name.as_str()));

    let turn = if fail_fast {
        // A release takes at most one node timeout.
        place.turn_unless_busy(shared.options.node_timeout()).await
    } else {
        timeout_at(deadline, place.wait()).await.ok()
    };
    let Some(turn) = turn else {
        tracing::debug!(name, "lock busy in this process");
        let retry_after = place.holder_remaining().unwrap_or(shared.options.expiry());
        return Err(Rejection::new(
            RejectionKind::Busy,
            "the key is locked by another request",
            grpc,
        )
        .with_retry_after(retry_after));
    };
    place.start_turn();

    // One try first: a free key is taken at once, and a backend that is
    // down answers 503 at once instead of after the whole budget.
    let first = lock_once(&shared, &name).await;
    // Counts retries for the `acquired` event, when anyone listens.
    let retries = tracing::enabled!(tracing::Level::DEBUG).then(Arc::default);
    let waited = matches!(first, Err(Error::Held { .. })) && !fail_fast;
    let locked = match first {
        Err(Error::Held { .. }) if !fail_fast => {
            match new_mutex(&shared, &name, u32::MAX, retries.as_ref()) {
                Ok(mut mutex) => match timeout_at(deadline, mutex.lock()).await {
                    Ok(Ok(())) => Ok(mutex),
                    Ok(Err(error)) => Err(error),
                    // The budget is spent: one last try, which also learns
                    // how long the holder keeps the key.
                    Err(_) => lock_once(&shared, &name).await,
                },
                Err(error) => Err(error),
            }
        }
        first => first,
    };
    let mutex = locked.map_err(|error| rejection(&name, error, grpc, &shared))?;

    let until = mutex.until();
    place.set_holder_until(until);
    let (held, state) = HeldLock::new(name, mutex.value().to_owned(), mutex.fencing_token(), until);
    let (on_lost, lost) = if shared.abort_on_lost {
        let (tx, rx) = oneshot::channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    tracing::debug!(
        name = held.name(),
        waited_ms = start.elapsed().as_millis() as u64,
        attempts = 1 + u32::from(waited) * retries.map_or(1, |r| r.load(Ordering::Relaxed) + 1),
        "lock acquired"
    );
    let guard = Keeper {
        mutex,
        turn,
        place,
        state,
        interval: shared.extend_every,
        release_timeout: shared.options.expiry(),
        on_lost,
        hold_until: shared
            .max_hold
            .and_then(|limit| Instant::now().checked_add(limit)),
        live: shared.keepers.clone(),
    }
    .spawn();
    Ok(Holding { guard, held, lost })
}

fn new_mutex<D: DistSync>(
    shared: &Shared<D>,
    name: &str,
    tries: u32,
    retries: Option<&Arc<AtomicU32>>,
) -> Result<D::Mutex, Error> {
    let mut options = shared.options.clone().with_tries(tries);
    if let Some(counter) = retries {
        let (base, counter) = (shared.options.clone(), counter.clone());
        options = options.with_delay_fn(move |retry| {
            counter.store(retry, Ordering::Relaxed);
            base.delay(retry)
        });
    }
    shared.sync.new_mutex(name, options)
}

async fn lock_once<D: DistSync>(shared: &Shared<D>, name: &str) -> Result<D::Mutex, Error> {
    let mut mutex = new_mutex(shared, name, 1, None)?;
    mutex.lock().await?;
    Ok(mutex)
}

fn rejection<D: DistSync>(name: &str, error: Error, grpc: bool, shared: &Shared<D>) -> Rejection {
    match error {
        Error::Held { remaining } => {
            tracing::debug!(name, "lock busy");
            Rejection::new(
                RejectionKind::Busy,
                "the key is locked by another request",
                grpc,
            )
            .with_retry_after(remaining.unwrap_or(shared.options.expiry()))
        }
        Error::InvalidName { reason } => Rejection::new(
            RejectionKind::InvalidKey,
            format!("invalid lock key: {reason}"),
            grpc,
        ),
        Error::InvalidOptions { .. } | Error::GenValue(_) | Error::InvalidConfig { .. } => {
            tracing::error!(name, %error, "lock layer misconfigured");
            Rejection::new(RejectionKind::Misconfigured, error.to_string(), grpc)
        }
        error => {
            tracing::warn!(name, %error, "lock backend unavailable");
            Rejection::new(
                RejectionKind::Unavailable,
                "the lock service is unavailable",
                grpc,
            )
        }
    }
}

/// About 30 years from now, as tokio does for "never".
fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86400 * 365 * 30)
}
