//! Values shared by the users of a name, kept exactly as long as someone
//! uses the name: the registry under the in-process line and under the
//! Redis backend's lists of waiters.

use std::collections::hash_map::Entry as MapEntry;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::hashed::{HashedMap, HashedName, Hashing};

/// One `V` per name in use. A user [`join`](ByName::join)s a name and
/// [`leave`](ByName::leave)s it once; the name's value goes when its last
/// user leaves.
pub(crate) struct ByName<V> {
    map: Mutex<HashedMap<InUse<V>>>,
    hashing: Hashing,
}

/// A name's value and how many users it has.
struct InUse<V> {
    value: Arc<V>,
    users: usize,
}

impl<V> Default for ByName<V> {
    fn default() -> Self {
        ByName {
            map: Mutex::default(),
            hashing: Hashing::default(),
        }
    }
}

impl<V> fmt::Debug for ByName<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByName")
            .field("names", &self.len())
            .finish()
    }
}

impl<V> ByName<V> {
    /// The number of names in use.
    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// The value of `name`, while anyone uses it.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<V>> {
        let name = self.hashing.name(Arc::from(name));
        self.map().get(&name).map(|in_use| in_use.value.clone())
    }

    /// One more user of `name`: the name hashed for [`leave`](Self::leave),
    /// and its value, made now if nobody used it.
    pub(crate) fn join(&self, name: Arc<str>) -> (HashedName, Arc<V>)
    where
        V: Default,
    {
        let name = self.hashing.name(name);
        let mut map = self.map();
        let in_use = map.entry(name.clone()).or_insert_with(|| InUse {
            value: Arc::default(),
            users: 0,
        });
        in_use.users += 1;
        let value = in_use.value.clone();
        (name, value)
    }

    /// One user of `name` leaves (once per `join`); the last one takes the
    /// value away.
    pub(crate) fn leave(&self, name: &HashedName) {
        let mut map = self.map();
        if let MapEntry::Occupied(mut in_use) = map.entry(name.clone()) {
            in_use.get_mut().users -= 1;
            if in_use.get().users == 0 {
                in_use.remove();
                // A burst of names must not keep its peak capacity for good:
                // shrink once the map is a quarter full, to twice what is in
                // use, so the rehash is paid for by the removals before it.
                let (len, capacity) = (map.len(), map.capacity());
                if capacity > 64 && len * 4 < capacity {
                    map.shrink_to(len * 2);
                }
            }
        }
    }

    fn map(&self) -> MutexGuard<'_, HashedMap<InUse<V>>> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.map().capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_lives_while_its_name_is_used() {
        let names: ByName<Mutex<u32>> = ByName::default();
        let (a, value) = names.join("a".into());
        *value.lock().unwrap() = 7;
        let (again, same) = names.join("a".into());
        assert!(Arc::ptr_eq(&value, &same));
        names.leave(&a);
        assert_eq!(names.get("a").map(|v| *v.lock().unwrap()), Some(7));
        names.leave(&again);
        assert!(names.get("a").is_none());
        assert_eq!(names.len(), 0);
    }

    #[test]
    fn the_map_gives_memory_back_after_a_burst() {
        let names: ByName<()> = ByName::default();
        let burst: Vec<_> = (0..20_000)
            .map(|i| names.join(i.to_string().into()).0)
            .collect();
        let peak = names.capacity();
        assert!(peak >= 20_000);
        for name in &burst {
            names.leave(name);
        }
        assert_eq!(names.len(), 0);
        let left = names.capacity();
        assert!(
            left <= 128,
            "capacity {left} of {peak} kept with no name in use"
        );
    }
}
