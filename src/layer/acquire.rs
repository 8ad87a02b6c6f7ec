//! How a request gets its lock: its turn in the in-process line, then the
//! backend, both within the wait budget; then a lease holds the lock. An
//! uncontended request on a backend that answers at once gets it without
//! waiting, straight from `call` ([`start`]); the others wait in the
//! response future ([`acquire`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use super::deadline::Deadline;
use super::extend_loop::ExtendLoop;
use super::held::{HeldLock, LockView};
use super::lease::Lease;
use super::rejection::Rejection;
use super::release::{HeldMutex, Live, ReleaseGuard};
use super::state::LayerState;
use crate::error::Error;
use crate::local_queue::{Place, Turn};
use crate::sync::{DistMutex, DistSync, FastPath};

/// What a request that got its lock carries.
pub(crate) struct Holding {
    pub(crate) guard: ReleaseGuard,
    pub(crate) held: HeldLock,
}

/// How far a request got without waiting (see [`start`]).
pub(crate) enum Start<D: DistSync> {
    /// It holds its lock.
    Held(Holding),
    /// The backend said no: the error, to make a
    /// [`Rejection::for_lock_error`] of.
    Failed(Arc<str>, Error),
    /// It has to wait: [`acquire`] goes on from here.
    Wait(Waiting<D>),
}

/// A request that has to wait, and where.
pub(crate) struct Waiting<D: DistSync> {
    place: Place,
    /// Its turn in the in-process line, once it has it.
    turn: Option<Turn>,
    first: First<D::Mutex>,
}

/// The first try at the backend.
enum First<M> {
    /// Not made yet (the request waits for its turn first).
    NotYet,
    /// Made with `lock`: the backend cannot answer at once.
    Lock(M),
    /// The key is held.
    Held(crate::Error),
}

/// The acquisition of the lock on `name`, as far as it goes without
/// waiting: the turn in the in-process line if it is free, then one try at the
/// backend if it answers at once ([`DistMutex::try_lock_now`]). An
/// uncontended request on the in-process backend is served from here,
/// without the machinery of a future.
pub(crate) fn start<D: DistSync>(shared: &LayerState<D>, name: Arc<str>) -> Start<D> {
    let place = shared.queues.join(name);
    let Some(turn) = place.try_turn() else {
        return Start::Wait(Waiting {
            place,
            turn: None,
            first: First::NotYet,
        });
    };
    let mut mutex = match new_mutex(shared, place.name(), 1, None) {
        Ok(mutex) => mutex,
        Err(error) => return Start::Failed(place.name().clone(), error),
    };
    let first = match mutex.try_lock_now(FastPath::new()) {
        Some(Ok(())) => {
            tracing::debug!(
                name = &**place.name(),
                waited_ms = 0,
                attempts = 1,
                "lock acquired"
            );
            return Start::Held(hold(shared, place, turn, mutex, Duration::ZERO));
        }
        None => First::Lock(mutex),
        Some(Err(error @ Error::Held { .. })) if !shared.wait.is_zero() => First::Held(error),
        Some(Err(error)) => return Start::Failed(place.name().clone(), error),
    };
    Start::Wait(Waiting {
        place,
        turn: Some(turn),
        first,
    })
}

/// Waits for the lock where [`start`] left off, at most the wait budget.
///
/// A request with a [`Deadline`] stops waiting shortly before it, if that
/// comes first, and is then rejected as past its deadline.
pub(crate) async fn acquire<D: DistSync>(
    shared: Arc<LayerState<D>>,
    waiting: Waiting<D>,
    grpc: bool,
    deadline: Option<Deadline>,
) -> Result<Holding, Rejection> {
    let meters = shared.meters.clone();
    acquire_within(shared, waiting, grpc, deadline)
        .await
        .inspect_err(|rejection| meters.rejected(rejection.kind()))
}

async fn acquire_within<D: DistSync>(
    shared: Arc<LayerState<D>>,
    waiting: Waiting<D>,
    grpc: bool,
    deadline: Option<Deadline>,
) -> Result<Holding, Rejection> {
    let Waiting { place, turn, first } = waiting;
    let name = &**place.name();
    let fail_fast = shared.wait.is_zero();
    let mut budget = Budget::new(shared.wait, deadline.map(Deadline::stop_waiting));
    let turn = match turn {
        Some(turn) => Some(turn),
        None => wait_turn(&place, budget.deadline(), fail_fast).await,
    };
    let Some(turn) = turn else {
        tracing::debug!(name, "lock busy in this process");
        let retry_after = place.hints().remaining().unwrap_or(shared.options.expiry());
        if budget.cut_short() {
            return Err(Rejection::deadline(retry_after, grpc));
        }
        return Err(Rejection::busy(retry_after, grpc));
    };

    // One try first: a free key is taken at once, and a backend that is
    // down answers 503 at once instead of after the whole budget.
    let first = match first {
        First::NotYet => lock_once(&shared, place.name()).await,
        First::Lock(mut mutex) => mutex.lock().await.map(|()| mutex),
        First::Held(error) => Err(error),
    };
    // Counts retries for the `acquired` event, when anyone listens.
    let retries = tracing::enabled!(tracing::Level::DEBUG).then(Arc::default);
    let waited = matches!(first, Err(Error::Held { .. })) && !fail_fast;
    let locked = match first {
        Err(Error::Held { .. }) if !fail_fast => {
            lock_until(&shared, place.name(), budget.deadline(), retries.as_ref()).await
        }
        first => first,
    };
    let expiry = shared.options.expiry();
    let mutex = locked.map_err(|error| match error {
        Error::Held { remaining } if budget.cut_short() => {
            Rejection::deadline(remaining.unwrap_or(expiry), grpc)
        }
        error => Rejection::for_lock_error(name, error, grpc, expiry),
    })?;
    tracing::debug!(
        name,
        waited_ms = budget.waited().as_millis() as u64,
        attempts = 1 + u32::from(waited) * retries.map_or(1, |r| r.load(Ordering::Relaxed) + 1),
        "lock acquired"
    );
    Ok(hold(&shared, place, turn, mutex, budget.waited()))
}

/// Holds the lock just acquired: the handler's view of it, and a lease
/// whose extend loop extends it if the request is still served when the
/// first extension falls due.
fn hold<D: DistSync>(
    shared: &LayerState<D>,
    place: Place,
    turn: Turn,
    mutex: D::Mutex,
    waited: Duration,
) -> Holding {
    let until = mutex.until();
    place.hints().set_until(until);
    // The mutex's own value where it shares it, else a copy.
    let value = mutex
        .shared_value(FastPath::new())
        .unwrap_or_else(|| Arc::from(mutex.value()));
    let view = LockView::new(place.name().clone(), value, mutex.fencing_token(), until);
    // The extend loop's clock starts at acquisition, which `until` tells
    // without a clock read: `until - validity` is the acquisition for the
    // in-process backend, and the start of the attempt (sooner) for Redis,
    // whose validity also subtracts the attempt's duration. Sooner only
    // brings the first extension and the end of `max_hold` forward.
    let now = until
        .and_then(|until| until.checked_sub(shared.validity))
        .unwrap_or_else(Instant::now);
    let live = Live::new(shared.held_count.clone(), shared.meters.clone(), waited);
    let held = HeldMutex::new(mutex, turn, place, shared.options.expiry(), live);
    let extend_loop = ExtendLoop::new(
        held,
        shared.extend_every,
        shared.options.node_timeout(),
        now.checked_add(shared.extend_every)
            .unwrap_or_else(far_future),
        shared.max_hold.and_then(|limit| now.checked_add(limit)),
    );
    let lease = Lease::hold(view, extend_loop, &shared.alarms);
    Holding {
        guard: ReleaseGuard::new(lease.clone(), shared.release, shared.lost),
        held: HeldLock::new(lease),
    }
}

/// The wait budget of a request. It runs from the first moment the request
/// has to wait (for its turn, or for a held key), so that an uncontended
/// request reads no clock for it; a request's own deadline may cut it.
struct Budget {
    wait: Duration,
    since: Option<Instant>,
    /// When the request's deadline stops the wait, if it has one.
    cut: Option<Instant>,
}

impl Budget {
    fn new(wait: Duration, cut: Option<Instant>) -> Self {
        Budget {
            wait,
            since: None,
            cut,
        }
    }

    /// When the budget is spent; starts it if it has not started.
    fn deadline(&mut self) -> Instant {
        let since = *self.since.get_or_insert_with(Instant::now);
        let spent = since.checked_add(self.wait).unwrap_or_else(far_future);
        self.cut.map_or(spent, |cut| cut.min(spent))
    }

    /// Whether the request's deadline, not the layer's budget, ends the
    /// wait.
    fn cut_short(&mut self) -> bool {
        let spent = self.deadline();
        self.cut.is_some_and(|cut| cut <= spent)
    }

    /// How long the request has waited.
    fn waited(&self) -> Duration {
        self.since.map_or(Duration::ZERO, |since| since.elapsed())
    }
}

/// Waits for this request's turn in the in-process line: within the wait
/// budget, or, failing fast, only for the release of a holder whose
/// release is under way.
async fn wait_turn(place: &Place, deadline: Instant, fail_fast: bool) -> Option<Turn> {
    if fail_fast {
        place.turn_unless_busy().await
    } else {
        timeout_at(deadline, place.wait()).await.ok()
    }
}

/// Waits for the lock on a held name until `deadline`.
async fn lock_until<D: DistSync>(
    shared: &LayerState<D>,
    name: &Arc<str>,
    deadline: Instant,
    retries: Option<&Arc<AtomicU32>>,
) -> Result<D::Mutex, Error> {
    // The budget bounds the wait, not the options' tries: they would end it
    // sooner or later than the user asked for with `wait`.
    let mut mutex = new_mutex(shared, name, u32::MAX, retries)?;
    match timeout_at(deadline, mutex.lock()).await {
        Ok(Ok(())) => Ok(mutex),
        Ok(Err(error)) => Err(error),
        // The budget is spent: one last try, which also learns how long
        // the holder keeps the key.
        Err(_) => lock_once(shared, name).await,
    }
}

/// A mutex on `name` that tries `tries` times; `retries`, if given, counts
/// its retries.
fn new_mutex<D: DistSync>(
    shared: &LayerState<D>,
    name: &Arc<str>,
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
    match &shared.line {
        Some(line) => line.new_mutex_in_turn(name, options),
        None => shared.sync.new_mutex_named(name, options, FastPath::new()),
    }
}

/// One try at the lock on `name`.
async fn lock_once<D: DistSync>(
    shared: &LayerState<D>,
    name: &Arc<str>,
) -> Result<D::Mutex, Error> {
    let mut mutex = new_mutex(shared, name, 1, None)?;
    mutex.lock().await?;
    Ok(mutex)
}

/// About 30 years from now, as tokio does for "never".
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365 * 30)
}
