//! `MemorySync`: the in-process backend, the embedded default.
//!
//! It keeps the observable semantics of the Redis backend (exclusive names,
//! expiry, compare-by-value unlock and extend, ownership transfer through a
//! preset value) without any setup, so code tested in-process behaves the
//! same in production. Nothing survives the process.
//!
//! Waiters on one name form a FIFO queue. A release hands the lock straight
//! to the first waiter and wakes it; a holder that expires is taken over by
//! the first waiter at the moment of expiry. A name that is neither locked
//! nor waited on holds no memory: released names are removed at once, and
//! expired ones when the name is next touched or by an amortised sweep.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::options::DistMutexOptions;
use crate::sync::{DistMutex, DistSync, validate_name};

/// The in-process backend.
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
    shared: Arc<Shared>,
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
    pub fn new() -> Self {
        MemorySync {
            shared: Arc::new(Shared {
                names: Mutex::new(Names {
                    map: HashMap::new(),
                    next_token: 1,
                    sweep_at: SWEEP_MIN,
                }),
                next_waiter: AtomicU64::new(0),
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

    /// The number of names that are locked or waited on now. Expired locks
    /// that nobody waits on are reclaimed before counting.
    pub fn names_in_use(&self) -> usize {
        let mut names = self.shared.names();
        names.sweep(Instant::now());
        names.map.len()
    }
}

impl DistSync for MemorySync {
    type Mutex = MemoryMutex;

    fn new_mutex(&self, name: &str, options: DistMutexOptions) -> Result<MemoryMutex> {
        validate_name(name)?;
        options.validate()?;
        Ok(MemoryMutex {
            shared: self.shared.clone(),
            name: Arc::from(name),
            value: options.value().unwrap_or_default().to_owned(),
            options,
            until: None,
            token: None,
        })
    }

    fn separator(&self) -> &str {
        &self.separator
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
    shared: Arc<Shared>,
    name: Arc<str>,
    options: DistMutexOptions,
    value: String,
    until: Option<Instant>,
    token: Option<u64>,
}

impl fmt::Debug for MemoryMutex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryMutex")
            .field("name", &self.name)
            .field("until", &self.until)
            .field("fencing_token", &self.token)
            .finish_non_exhaustive()
    }
}

impl MemoryMutex {
    fn acquired(&mut self, value: Arc<str>, grant: Grant) {
        self.value = value.to_string();
        self.until = Some(
            grant
                .expires_at
                .checked_sub(self.options.drift())
                .unwrap_or(grant.expires_at),
        );
        self.token = Some(grant.token);
    }
}

impl DistMutex for MemoryMutex {
    fn name(&self) -> &str {
        &self.name
    }

    fn value(&self) -> &str {
        &self.value
    }

    fn until(&self) -> Option<Instant> {
        self.until
    }

    fn fencing_token(&self) -> Option<u64> {
        self.token
    }

    async fn lock(&mut self) -> Result<()> {
        let value: Arc<str> = self.options.gen_value()?.into();
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
        let mut names = self.shared.names();
        if names.release(&self.name, &self.value) {
            self.until = None;
            Ok(())
        } else {
            Err(Error::NotAcquired)
        }
    }

    async fn extend(&mut self) -> Result<()> {
        let mut names = self.shared.names();
        let expires_at = names
            .extend(&self.name, &self.value, self.options.expiry())
            .ok_or(Error::NotAcquired)?;
        self.until = Some(
            expires_at
                .checked_sub(self.options.drift())
                .unwrap_or(expires_at),
        );
        Ok(())
    }

    async fn valid(&self) -> Result<bool> {
        let names = self.shared.names();
        let now = Instant::now();
        Ok(names.map.get(&*self.name).is_some_and(|entry| {
            entry
                .holder
                .as_ref()
                .is_some_and(|h| *h.value == *self.value && h.expires_at > now)
        }))
    }
}

/// The sweep of expired names runs when the map has grown past twice its
/// size after the last sweep, and never below this size.
const SWEEP_MIN: usize = 1024;

struct Shared {
    names: Mutex<Names>,
    next_waiter: AtomicU64,
}

impl Shared {
    /// Nothing panics while the lock is held, but a poisoned lock must not
    /// take every later call down with it.
    fn names(&self) -> MutexGuard<'_, Names> {
        self.names.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct Names {
    map: HashMap<Arc<str>, Entry>,
    next_token: u64,
    sweep_at: usize,
}

#[derive(Default)]
struct Entry {
    holder: Option<Holder>,
    queue: VecDeque<Waiter>,
}

struct Holder {
    value: Arc<str>,
    expires_at: Instant,
    token: u64,
    /// Set when a release handed the lock to a queued waiter that has not
    /// seen it yet.
    handed_to: Option<u64>,
}

struct Waiter {
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

impl Entry {
    fn is_idle(&self) -> bool {
        self.holder.is_none() && self.queue.is_empty()
    }

    /// Drops an expired holder and, when the name is free, hands it to the
    /// first waiter.
    fn settle(&mut self, now: Instant, next_token: &mut u64) {
        if self.holder.as_ref().is_some_and(|h| h.expires_at <= now) {
            self.holder = None;
        }
        if self.holder.is_none()
            && let Some(waiter) = self.queue.pop_front()
        {
            self.holder = Some(Holder {
                value: waiter.value,
                expires_at: now + waiter.expiry,
                token: take_token(next_token),
                handed_to: Some(waiter.id),
            });
            waiter.wake.notify_one();
        }
    }
}

fn take_token(next_token: &mut u64) -> u64 {
    let token = *next_token;
    *next_token += 1;
    token
}

impl Names {
    /// One try by waiter `id`. `Ok` with the grant, or `Err` with the
    /// holder's remaining time and the waiter's wake-up, after making sure
    /// the waiter has a place in the queue.
    fn try_acquire(
        &mut self,
        name: &Arc<str>,
        value: &Arc<str>,
        expiry: Duration,
        id: u64,
    ) -> std::result::Result<Grant, (Duration, Arc<Notify>)> {
        let now = Instant::now();
        if !self.map.contains_key(name) {
            if self.map.len() >= self.sweep_at {
                self.sweep(now);
            }
            self.map.insert(name.clone(), Entry::default());
        }
        let entry = self.map.get_mut(name).expect("inserted above");
        if entry.holder.as_ref().is_some_and(|h| h.expires_at <= now) {
            entry.holder = None;
        }
        if let Some(holder) = &mut entry.holder
            && holder.handed_to == Some(id)
        {
            holder.handed_to = None;
            return Ok(Grant {
                expires_at: holder.expires_at,
                token: holder.token,
            });
        }
        let first_in_line = entry.queue.front().is_none_or(|w| w.id == id);
        if entry.holder.is_none() && first_in_line {
            entry.queue.pop_front();
            let expires_at = now + expiry;
            let token = take_token(&mut self.next_token);
            entry.holder = Some(Holder {
                value: value.clone(),
                expires_at,
                token,
                handed_to: None,
            });
            return Ok(Grant { expires_at, token });
        }
        // Busy: the name is held, or free but owed to an earlier waiter.
        let wake = match entry.queue.iter().find(|w| w.id == id) {
            Some(waiter) => waiter.wake.clone(),
            None => {
                let wake = Arc::new(Notify::new());
                entry.queue.push_back(Waiter {
                    id,
                    value: value.clone(),
                    expiry,
                    wake: wake.clone(),
                });
                wake
            }
        };
        entry.settle(now, &mut self.next_token);
        let holder = entry.holder.as_ref().expect("settled with a holder");
        Err((holder.expires_at - now, wake))
    }

    /// Releases the lock held with `value`; false if `value` does not hold
    /// an unexpired lock on `name`.
    fn release(&mut self, name: &str, value: &str) -> bool {
        let now = Instant::now();
        let Some(entry) = self.map.get_mut(name) else {
            return false;
        };
        let owned = entry
            .holder
            .as_ref()
            .is_some_and(|h| *h.value == *value && h.expires_at > now);
        if owned {
            entry.holder = None;
        }
        entry.settle(now, &mut self.next_token);
        if entry.is_idle() {
            self.map.remove(name);
        }
        owned
    }

    /// Moves the expiry of the lock held with `value` to `now + expiry`.
    fn extend(&mut self, name: &str, value: &str, expiry: Duration) -> Option<Instant> {
        let now = Instant::now();
        let entry = self.map.get_mut(name)?;
        match &mut entry.holder {
            Some(h) if *h.value == *value && h.expires_at > now => {
                h.expires_at = now + expiry;
                Some(h.expires_at)
            }
            _ => {
                entry.settle(now, &mut self.next_token);
                if entry.is_idle() {
                    self.map.remove(name);
                }
                None
            }
        }
    }

    /// Leaves a waiter's place: out of the queue, and if a release had
    /// already handed it the lock, passes the lock on.
    fn leave(&mut self, name: &str, id: u64) {
        let now = Instant::now();
        let Some(entry) = self.map.get_mut(name) else {
            return;
        };
        entry.queue.retain(|w| w.id != id);
        if entry
            .holder
            .as_ref()
            .is_some_and(|h| h.handed_to == Some(id))
        {
            entry.holder = None;
        }
        entry.settle(now, &mut self.next_token);
        if entry.is_idle() {
            self.map.remove(name);
        }
    }

    /// Reclaims expired names; hands expired names with waiters on.
    fn sweep(&mut self, now: Instant) {
        let next_token = &mut self.next_token;
        self.map.retain(|_, entry| {
            entry.settle(now, next_token);
            !entry.is_idle()
        });
        self.sweep_at = (self.map.len() * 2).max(SWEEP_MIN);
    }
}

/// A waiter's place in a name's queue, owned by the `lock()` future.
struct QueuePlace<'a> {
    shared: &'a Shared,
    name: &'a str,
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
