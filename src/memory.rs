//! `MemorySync`: the in-process backend, the embedded default, and its
//! lock table.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::acquisition::{Acquisition, LockRecord};
use crate::error::{Error, Result};
use crate::hashed::{HashedMap, HashedName, Hashing};
use crate::options::DistMutexOptions;
use crate::records::{self, BoxFuture, RecordBackend, RecordTable, Records, Writer};
use crate::sync::{DistMutex, DistSync, FastPath, validate_name};

/// The in-process backend.
///
/// It keeps the observable semantics of the Redis backend (exclusive names,
/// expiry, compare-by-value unlock and extend, ownership transfer through a
/// preset value, fencing tokens) without any setup, so code tested
/// in-process behaves the same in production. Nothing survives the
/// process.
///
/// Waiters on one name form a FIFO queue. A release hands the lock straight
/// to the first waiter and wakes it; a holder that expires is taken over by
/// the first waiter at the moment of expiry. A name that is neither locked
/// nor waited on holds no memory: released names are removed at once, and
/// expired ones (kept in expiry order) by the next call on the backend,
/// whatever its name.
///
/// Clones share the same set of locks; separate `MemorySync::new()` values
/// are independent.
///
/// ```
/// use tower_dsync::{DistMutex, DistMutexOptions, DistSync, MemorySync};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
/// let sync = MemorySync::new();
/// let mut mutex = sync.new_mutex("invoice:9", DistMutexOptions::default())?;
/// mutex.lock().await?;
/// assert_eq!(sync.names_in_use(), 1);
/// mutex.unlock().await?;
/// assert_eq!(sync.names_in_use(), 0);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct MemorySync {
    shared: Arc<MemoryState>,
    separator: Arc<str>,
}

impl Default for MemorySync {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemorySync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySync")
            .field("separator", &self.separator)
            .field("names_in_use", &self.shared.names().map.len())
            .finish()
    }
}

impl MemorySync {
    /// An empty set of locks with the separator `:`.
    ///
    /// ```
    /// use tower_dsync::{DistSync, MemorySync};
    /// let sync = MemorySync::new();
    /// assert_eq!(sync.separator(), ":");
    /// assert_eq!(sync.names_in_use(), 0);
    /// ```
    pub fn new() -> Self {
        MemorySync {
            shared: Arc::new(MemoryState {
                names: Mutex::new(LockTable::new()),
                records: Mutex::new(RecordTable::default()),
                next_waiter: AtomicU64::new(0),
                hashing: Hashing::default(),
            }),
            separator: Arc::from(":"),
        }
    }

    /// Uses another separator for hierarchical names.
    ///
    /// ```
    /// use tower_dsync::{DistSync, MemorySync};
    /// assert_eq!(MemorySync::new().with_separator("/").separator(), "/");
    /// ```
    pub fn with_separator(mut self, separator: impl Into<Arc<str>>) -> Self {
        self.separator = separator.into();
        self
    }

    /// The number of names that hold memory: those locked now, with their
    /// waiters. Expired locks are reclaimed before counting.
    ///
    /// ```
    /// use tower_dsync::{DistMutex, DistMutexOptions, DistSync, MemorySync};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
    /// let sync = MemorySync::new();
    /// let mut m = sync.new_mutex("a", DistMutexOptions::default())?;
    /// m.lock().await?;
    /// assert_eq!(sync.names_in_use(), 1);
    /// # Ok(()) }
    /// ```
    pub fn names_in_use(&self) -> usize {
        let mut names = self.shared.names();
        names.reap(Instant::now());
        names.map.len()
    }

    /// The number of records kept (by an
    /// [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer)): each
    /// is removed once its TTL has passed.
    ///
    /// ```
    /// assert_eq!(tower_dsync::MemorySync::new().records_kept(), 0);
    /// ```
    pub fn records_kept(&self) -> usize {
        records::locked(&self.shared.records).len()
    }
}

impl DistSync for MemorySync {
    type Mutex = MemoryMutex;

    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> Result<MemoryMutex> {
        validate_name(name)?;
        self.mutex_named(Arc::from(name), options)
    }

    fn new_mutex_named(
        &self,
        name: &Arc<str>,
        options: DistMutexOptions,
        _: FastPath,
    ) -> Result<MemoryMutex> {
        validate_name(name)?;
        self.mutex_named(name.clone(), options)
    }

    fn separator(&self) -> &str {
        &self.separator
    }

    fn records(&self, _: FastPath) -> Option<Records> {
        Some(Records::new(MemoryRecords(self.shared.clone())))
    }
}

/// The records of a [`MemorySync`]: kept in its own table, written only
/// while the writer holds the name in the lock table.
struct MemoryRecords(Arc<MemoryState>);

impl RecordBackend for MemoryRecords {
    fn load(&self, name: Arc<str>, _: Duration, _: Duration) -> BoxFuture<Result<Option<Bytes>>> {
        let record = records::locked(&self.0.records).load(&name);
        Box::pin(std::future::ready(Ok(record)))
    }

    fn store(
        &self,
        name: Arc<str>,
        writer: Writer,
        record: Bytes,
        ttl: Duration,
        _: Duration,
    ) -> BoxFuture<Result<bool>> {
        let hashed = self.0.hashing.name(name.clone());
        // The lock table's lock is held while the record is written, so
        // that the lock cannot change hands in between.
        let mut names = self.0.names();
        let stored = names.is_held_by(&hashed, &writer.value)
            && records::locked(&self.0.records).store(name, writer.token, record, ttl);
        drop(names);
        Box::pin(std::future::ready(Ok(stored)))
    }
}

impl MemorySync {
    /// A mutex on `name`, checked already.
    fn mutex_named(&self, name: Arc<str>, options: DistMutexOptions) -> Result<MemoryMutex> {
        let drift = options.validated_drift()?;
        Ok(MemoryMutex {
            shared: self.shared.clone(),
            name: self.shared.hashing.name(name),
            record: LockRecord::new(&options),
            drift,
            options,
        })
    }
}

/// A mutex of [`MemorySync`].
///
/// ```
/// use tower_dsync::{DistMutex, DistMutexOptions, DistSync, MemorySync};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> tower_dsync::Result<()> {
/// let mut m = MemorySync::new().new_mutex("a", DistMutexOptions::default())?;
/// assert_eq!(m.value(), "");
/// m.lock().await?;
/// assert_eq!(m.value().len(), 32);
/// assert!(m.fencing_token().is_some());
/// # Ok(()) }
/// ```
pub struct MemoryMutex {
    shared: Arc<MemoryState>,
    name: HashedName,
    options: DistMutexOptions,
    /// `options.drift()`, computed once.
    drift: Duration,
    record: LockRecord,
}

impl fmt::Debug for MemoryMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryMutex")
            .field("name", self.name.name())
            .field("until", &self.record.until())
            .field("fencing_token", &self.record.token())
            .finish_non_exhaustive()
    }
}

impl MemoryMutex {
    /// One try of [`lock`](DistMutex::lock), which never waits.
    fn lock_now(&mut self) -> Result<()> {
        let value = self.options.gen_shared_value()?;
        let mut place = QueuePlace {
            shared: &self.shared,
            name: &self.name,
            id: self.shared.next_waiter.fetch_add(1, Ordering::Relaxed),
            queued: false,
        };
        let attempt =
            self.shared
                .names()
                .try_acquire(&self.name, &value, self.options.expiry(), place.id);
        match attempt {
            Ok(grant) => {
                drop(place);
                self.acquired(value, grant);
                Ok(())
            }
            Err((remaining, _)) => {
                // Out of the queue that the try joined.
                place.queued = true;
                Err(Error::Held {
                    remaining: Some(remaining),
                })
            }
        }
    }

    fn unlock_now(&mut self) -> Result<()> {
        self.record.unlocking();
        let mut names = self.shared.names();
        if names.release(&self.name, self.record.value()) {
            self.record.unlocked();
            Ok(())
        } else {
            Err(Error::NotAcquired)
        }
    }

    fn acquired(&mut self, value: Arc<str>, grant: Grant) {
        let until = self.validity_end(grant.expires_at);
        let acquisition = Acquisition {
            value,
            token: grant.token,
        };
        self.record.acquired(acquisition, until);
    }

    /// The end of validity of a lock the table set to expire at
    /// `expires_at`: it set it at once, one expiry before, so no time
    /// elapsed counts against it; only the drift allowance does.
    fn validity_end(&self, expires_at: Instant) -> Instant {
        // Checked: an instant need not go that far back on every platform.
        expires_at.checked_sub(self.drift).unwrap_or(expires_at)
    }
}

impl DistMutex for MemoryMutex {
    fn name(&self) -> &str {
        self.name.name()
    }

    fn value(&self) -> &str {
        self.record.value()
    }

    fn until(&self) -> Option<Instant> {
        self.record.until()
    }

    fn fencing_token(&self) -> Option<u64> {
        self.record.token()
    }

    async fn lock(&mut self) -> Result<()> {
        let value = self.options.gen_shared_value()?;
        let expiry = self.options.expiry();
        // Takes us out of the name's queue if this future is dropped or
        // gives up, and passes the lock on if a release had handed it to us.
        let mut place = QueuePlace {
            shared: &self.shared,
            name: &self.name,
            id: self.shared.next_waiter.fetch_add(1, Ordering::Relaxed),
            queued: false,
        };
        let mut retry = 0;
        loop {
            let attempt = self
                .shared
                .names()
                .try_acquire(&self.name, &value, expiry, place.id);
            let (remaining, wake) = match attempt {
                Ok(grant) => {
                    place.queued = false;
                    drop(place);
                    self.acquired(value, grant);
                    return Ok(());
                }
                Err(busy) => busy,
            };
            place.queued = true;
            retry += 1;
            if retry >= self.options.tries() {
                return Err(Error::Held {
                    remaining: Some(remaining),
                });
            }
            let wait = self.options.delay(retry).min(remaining);
            let _ = tokio::time::timeout(wait, wake.notified()).await;
        }
    }

    async fn unlock(&mut self) -> Result<()> {
        self.unlock_now()
    }

    async fn extend(&mut self) -> Result<()> {
        if self.record.is_released() {
            return Err(Error::NotAcquired);
        }
        let mut names = self.shared.names();
        let expires_at = names
            .extend(&self.name, self.record.value(), self.options.expiry())
            .ok_or(Error::NotAcquired)?;
        drop(names);
        let until = self.validity_end(expires_at);
        self.record.extended(until);
        Ok(())
    }

    async fn valid(&self) -> Result<bool> {
        Ok(self
            .shared
            .names()
            .is_held_by(&self.name, self.record.value()))
    }

    fn try_lock_now(&mut self, _: FastPath) -> Option<Result<()>> {
        Some(self.lock_now())
    }

    fn try_unlock_now(&mut self, _: FastPath) -> Option<Result<()>> {
        Some(self.unlock_now())
    }

    fn shared_value(&self, _: FastPath) -> Option<Arc<str>> {
        self.record.shared_value().cloned()
    }
}

struct MemoryState {
    names: Mutex<LockTable>,
    /// The records kept beside the locks (see [`DistSync::records`]).
    records: Mutex<RecordTable>,
    next_waiter: AtomicU64,
    /// How names are hashed in `names`: once per mutex.
    hashing: Hashing,
}

impl MemoryState {
    /// Nothing panics while the lock is held, but a poisoned lock must not
    /// take every later call down with it.
    fn names(&self) -> MutexGuard<'_, LockTable> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The lock table.
///
/// Invariants, true whenever the mutex is released: a name is in `map` only
/// while it has a holder (its queue may be non-empty) and every holder has
/// exactly one entry in `expiries`, keyed by its expiry and token.
struct LockTable {
    map: HashedMap<TableEntry>,
    expiries: BTreeMap<(Instant, u64), HashedName>,
    next_token: u64,
}

#[derive(Default)]
struct TableEntry {
    holder: Option<Owner>,
    queue: VecDeque<Queued>,
}

struct Owner {
    value: Arc<str>,
    expires_at: Instant,
    token: u64,
    /// Set when a release handed the lock to a queued waiter that has not
    /// seen it yet.
    handed_to: Option<u64>,
}

struct Queued {
    id: u64,
    value: Arc<str>,
    expiry: Duration,
    wake: Arc<Notify>,
}

/// What a successful acquisition gets.
struct Grant {
    expires_at: Instant,
    token: u64,
}

impl LockTable {
    fn new() -> Self {
        LockTable {
            map: HashedMap::default(),
            expiries: BTreeMap::new(),
            next_token: 1,
        }
    }

    /// One try by waiter `id`. `Ok` with the grant, or `Err` with the
    /// holder's remaining time and the waiter's wake-up, after making sure
    /// the waiter has a place in the queue.
    fn try_acquire(
        &mut self,
        name: &HashedName,
        value: &Arc<str>,
        expiry: Duration,
        id: u64,
    ) -> std::result::Result<Grant, (Duration, Arc<Notify>)> {
        let now = Instant::now();
        self.reap(now);
        let LockTable {
            map,
            expiries,
            next_token,
        } = self;
        let entry = map.entry(name.clone()).or_default();
        if let Some(holder) = &mut entry.holder
            && holder.handed_to == Some(id)
        {
            holder.handed_to = None;
            return Ok(Grant {
                expires_at: holder.expires_at,
                token: holder.token,
            });
        }
        if entry.holder.is_none() {
            // Nobody waits on a free name (a release hands it on at once),
            // so the name is ours; leave the queue if we were in it.
            entry.queue.retain(|w| w.id != id);
            let expires_at = now + expiry;
            return Ok(grant(
                expiries, next_token, entry, name, value, expires_at, None,
            ));
        }
        let wake = match entry.queue.iter().find(|w| w.id == id) {
            Some(waiter) => waiter.wake.clone(),
            None => {
                let wake = Arc::new(Notify::new());
                entry.queue.push_back(Queued {
                    id,
                    value: value.clone(),
                    expiry,
                    wake: wake.clone(),
                });
                wake
            }
        };
        let holder = entry.holder.as_ref().expect("checked above");
        Err((holder.expires_at - now, wake))
    }

    /// Releases the lock held with `value`; false if `value` does not hold
    /// an unexpired lock on `name`.
    fn release(&mut self, name: &HashedName, value: &str) -> bool {
        self.reap(Instant::now());
        match self.map.entry(name.clone()) {
            MapEntry::Occupied(entry)
                if entry
                    .get()
                    .holder
                    .as_ref()
                    .is_some_and(|h| *h.value == *value) =>
            {
                let (name, entry) = entry.remove_entry();
                self.settle(name, entry);
                true
            }
            _ => false,
        }
    }

    /// Moves the expiry of the lock held with `value` to `now + expiry`.
    fn extend(&mut self, name: &HashedName, value: &str, expiry: Duration) -> Option<Instant> {
        let now = Instant::now();
        self.reap(now);
        let holder = self.map.get_mut(name)?.holder.as_mut()?;
        if *holder.value != *value {
            return None;
        }
        let name = self.expiries.remove(&(holder.expires_at, holder.token))?;
        holder.expires_at = now + expiry;
        self.expiries
            .insert((holder.expires_at, holder.token), name);
        Some(holder.expires_at)
    }

    /// Whether `value` holds an unexpired lock on `name`.
    fn is_held_by(&mut self, name: &HashedName, value: &str) -> bool {
        self.reap(Instant::now());
        self.holder(name).is_some_and(|h| *h.value == *value)
    }

    /// Leaves a waiter's place: out of the queue, and if a release had
    /// already handed it the lock, passes the lock on.
    fn leave(&mut self, name: &HashedName, id: u64) {
        self.reap(Instant::now());
        let Some(entry) = self.map.get_mut(name) else {
            return;
        };
        entry.queue.retain(|w| w.id != id);
        if entry
            .holder
            .as_ref()
            .is_some_and(|h| h.handed_to == Some(id))
        {
            self.clear(name);
        }
    }

    fn holder(&self, name: &HashedName) -> Option<&Owner> {
        self.map.get(name)?.holder.as_ref()
    }

    /// Removes the holder of `name`, then hands the name to its first
    /// waiter, or forgets the name if nobody waits.
    fn clear(&mut self, name: &HashedName) {
        if let Some((name, entry)) = self.map.remove_entry(name) {
            self.settle(name, entry);
        }
    }

    /// The rest of [`clear`](Self::clear), once the entry is out of the map.
    fn settle(&mut self, name: HashedName, mut entry: TableEntry) {
        if let Some(holder) = entry.holder.take() {
            self.expiries.remove(&(holder.expires_at, holder.token));
        }
        if let Some(waiter) = entry.queue.pop_front() {
            grant(
                &mut self.expiries,
                &mut self.next_token,
                &mut entry,
                &name,
                &waiter.value,
                Instant::now() + waiter.expiry,
                Some(waiter.id),
            );
            self.map.insert(name, entry);
            waiter.wake.notify_one();
        } else if self.map.capacity() > 64 && self.map.len() * 4 < self.map.capacity() {
            self.map.shrink_to(self.map.len() * 2);
        }
    }

    /// Clears every holder whose lock has expired by `now`, earliest first.
    fn reap(&mut self, now: Instant) {
        while let Some(first) = self.expiries.first_entry()
            && first.key().0 <= now
        {
            let name = first.get().clone();
            self.clear(&name);
        }
    }
}

/// Makes `value` the holder of `entry`, the entry of `name` (the fields of
/// [`LockTable`] it touches are passed apart, so that `entry` may be borrowed
/// from the map).
fn grant(
    expiries: &mut BTreeMap<(Instant, u64), HashedName>,
    next_token: &mut u64,
    entry: &mut TableEntry,
    name: &HashedName,
    value: &Arc<str>,
    expires_at: Instant,
    handed_to: Option<u64>,
) -> Grant {
    let token = *next_token;
    *next_token += 1;
    expiries.insert((expires_at, token), name.clone());
    entry.holder = Some(Owner {
        value: value.clone(),
        expires_at,
        token,
        handed_to,
    });
    Grant { expires_at, token }
}

/// A waiter's place in a name's queue, owned by the `lock()` future.
struct QueuePlace<'a> {
    shared: &'a MemoryState,
    name: &'a HashedName,
    id: u64,
    /// False until the waiter may be in the queue, and again once it holds
    /// the lock.
    queued: bool,
}

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        if self.queued {
            self.shared.names().leave(self.name, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use crate::sync::FastPath;
    use crate::{AnySync, DistMutex, DistMutexOptions, DistSync, Error, MemorySync};

    /// `try_lock_now` and `try_unlock_now`, where the backend answers at
    /// once, agree with `lock` (one try) and `unlock`; a failed try leaves
    /// no place in the name's queue behind.
    async fn answers_at_once<S: DistSync>(sync: S) {
        let now = FastPath::new;
        let once = DistMutexOptions::default()
            .with_expiry(Duration::from_secs(1))
            .with_tries(1);
        let name = "at-once";
        let mut a = sync.new_mutex(name, once.clone()).unwrap();
        let mut b = sync.new_mutex(name, once.clone()).unwrap();
        let first = a.try_lock_now(now()).expect("the backend answers at once");
        first.expect("a free name is taken");
        assert!(!a.value().is_empty());
        assert!(a.until().expect("until after lock") > Instant::now());
        assert!(matches!(
            b.try_lock_now(now()),
            Some(Err(Error::Held { remaining: Some(_) }))
        ));
        assert!(matches!(
            b.try_unlock_now(now()),
            Some(Err(Error::NotAcquired))
        ));
        assert!(matches!(a.try_unlock_now(now()), Some(Ok(()))));
        assert_eq!(a.until(), None);
        assert!(matches!(
            a.try_unlock_now(now()),
            Some(Err(Error::NotAcquired))
        ));
        // b's failed try did not queue it: the name is free for anyone, at
        // once (a release hands a name to its first waiter).
        let mut c = sync.clone().new_mutex(name, once).unwrap();
        c.lock().await.expect("free at once");
        c.unlock().await.unwrap();
        assert!(matches!(b.try_lock_now(now()), Some(Ok(()))));
        b.unlock().await.unwrap();
        let patient = DistMutexOptions::default()
            .with_expiry(Duration::from_secs(1))
            .with_tries(400)
            .with_retry_delay(Duration::from_millis(5));
        let mut probe = sync.new_mutex(name, patient).unwrap();
        probe.lock().await.expect("the name should be free");
        probe.unlock().await.expect("unlock the probe");
    }

    #[tokio::test(start_paused = true)]
    async fn memory_mutexes_answer_at_once() {
        answers_at_once(MemorySync::new()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn any_mutexes_over_memory_answer_at_once() {
        answers_at_once(AnySync::new(MemorySync::new())).await;
    }
}
