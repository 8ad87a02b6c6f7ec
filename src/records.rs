//! Records: bytes kept under a lock name for a while, written only by the
//! name's holder. What [`IdempotencyLayer`](crate::idempotency::IdempotencyLayer)
//! stores its first responses in; each backend keeps them beside its locks.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::error::Result;

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Who writes a record: the holder of the lock of the record's name.
#[derive(Clone, Debug)]
pub(crate) struct Writer {
    /// The value that owns the lock.
    pub(crate) value: Arc<str>,
    /// The acquisition's fencing token, if the backend gives one.
    pub(crate) token: Option<u64>,
}

/// How one backend keeps records.
pub(crate) trait RecordBackend: Send + Sync + 'static {
    /// The record of `name`, if one is kept and has not expired; a node
    /// that does not answer within `timeout` counts as failed. Records
    /// live for `ttl`: a node that lost its state within it may have lost
    /// records with it.
    fn load(
        &self,
        name: Arc<str>,
        ttl: Duration,
        timeout: Duration,
    ) -> BoxFuture<Result<Option<Bytes>>>;

    /// Keeps `record` under `name` for `ttl`, if `writer` still holds the
    /// lock `name` and no record of a later holder (a higher token) is
    /// kept. `Ok(false)`: refused for one of those reasons.
    fn store(
        &self,
        name: Arc<str>,
        writer: Writer,
        record: Bytes,
        ttl: Duration,
        timeout: Duration,
    ) -> BoxFuture<Result<bool>>;
}

/// A backend's records, as [`DistSync::records`](crate::DistSync::records)
/// lends them. Cheap to clone.
#[doc(hidden)]
#[derive(Clone)]
pub struct Records(Arc<dyn RecordBackend>);

impl Records {
    pub(crate) fn new(backend: impl RecordBackend) -> Self {
        Records(Arc::new(backend))
    }

    /// The record of `name`, if one is kept.
    pub(crate) fn load(
        &self,
        name: Arc<str>,
        ttl: Duration,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<Bytes>>> + Send + 'static {
        self.0.load(name, ttl, timeout)
    }

    /// Keeps `record` under `name` for `ttl`, if `writer` still holds the
    /// lock and no later holder's record is kept.
    pub(crate) fn store(
        &self,
        name: Arc<str>,
        writer: Writer,
        record: Bytes,
        ttl: Duration,
        timeout: Duration,
    ) -> impl Future<Output = Result<bool>> + Send + 'static {
        self.0.store(name, writer, record, ttl, timeout)
    }
}

impl fmt::Debug for Records {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Records").finish_non_exhaustive()
    }
}

/// Records kept in process memory, each until its TTL: the in-process
/// backend's. Expired records are removed by the next call, whatever its
/// name, earliest first, so the table holds only live records.
#[derive(Default)]
pub(crate) struct RecordTable {
    map: HashMap<Arc<str>, Kept>,
    /// Every record, by expiry (and a sequence number, for ties).
    expiries: BTreeMap<(Instant, u64), Arc<str>>,
    next: u64,
}

struct Kept {
    record: Bytes,
    token: Option<u64>,
    expires: (Instant, u64),
}

impl RecordTable {
    /// The live record of `name`.
    pub(crate) fn load(&mut self, name: &str) -> Option<Bytes> {
        self.reap(Instant::now());
        self.map.get(name).map(|kept| kept.record.clone())
    }

    /// Keeps `record` unless a record with a higher token is kept; the
    /// caller has checked that the writer holds the lock.
    pub(crate) fn store(
        &mut self,
        name: Arc<str>,
        token: Option<u64>,
        record: Bytes,
        ttl: Duration,
    ) -> bool {
        let now = Instant::now();
        self.reap(now);
        if let Some(kept) = self.map.get(&name)
            && kept.token > token
        {
            return false;
        }
        self.next += 1;
        let expires = (now + ttl, self.next);
        if let Some(old) = self.map.insert(
            name.clone(),
            Kept {
                record,
                token,
                expires,
            },
        ) {
            self.expiries.remove(&old.expires);
        }
        self.expiries.insert(expires, name);
        true
    }

    /// How many records are kept (expired ones removed first).
    pub(crate) fn len(&mut self) -> usize {
        self.reap(Instant::now());
        self.map.len()
    }

    fn reap(&mut self, now: Instant) {
        while let Some(first) = self.expiries.first_entry()
            && first.key().0 <= now
        {
            let name = first.remove();
            self.map.remove(&name);
        }
        if self.map.capacity() > 64 && self.map.len() * 4 < self.map.capacity() {
            self.map.shrink_to(self.map.len() * 2);
        }
    }
}

/// Locks `table`, poisoned or not: nothing panics while it is held.
pub(crate) fn locked(table: &Mutex<RecordTable>) -> std::sync::MutexGuard<'_, RecordTable> {
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn records_expire_and_later_holders_win() {
        let mut table = RecordTable::default();
        let name: Arc<str> = "n".into();
        assert!(table.store(
            name.clone(),
            Some(5),
            "first".into(),
            Duration::from_secs(10)
        ));
        // A writer with an older token cannot overwrite it.
        assert!(!table.store(
            name.clone(),
            Some(4),
            "stale".into(),
            Duration::from_secs(10)
        ));
        assert_eq!(table.load("n").as_deref(), Some(&b"first"[..]));
        assert!(table.store(
            name.clone(),
            Some(6),
            "second".into(),
            Duration::from_secs(1)
        ));
        assert_eq!(table.load("n").as_deref(), Some(&b"second"[..]));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(table.load("n"), None);
        assert_eq!(table.len(), 0);
        assert!(table.expiries.is_empty());
    }
}
