//! Names hashed once: map keys that carry their hash, so that a name looked
//! up several times (locked, then released) is hashed once.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher, RandomState};
use std::sync::Arc;

/// A name and its hash under one map's [`Hashing`].
#[derive(Clone, Debug)]
pub(crate) struct HashedName {
    hash: u64,
    name: Arc<str>,
}

impl HashedName {
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }
}

impl Hash for HashedName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

impl PartialEq for HashedName {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.name == other.name
    }
}

impl Eq for HashedName {}

/// The keyed hash (SipHash with a random key, as `HashMap` uses by
/// default, so that names from untrusted input cannot flood a bucket) of
/// one map's names.
#[derive(Debug, Default)]
pub(crate) struct Hashing(RandomState);

impl Hashing {
    pub(crate) fn name(&self, name: Arc<str>) -> HashedName {
        HashedName {
            hash: self.0.hash_one(&*name),
            name,
        }
    }
}

/// A map of hashed names; it uses the hash they carry.
pub(crate) type HashedMap<V> = HashMap<HashedName, V, BuildHasherDefault<CarriedHash>>;

/// Passes on the hash that a [`HashedName`] carries.
#[derive(Default)]
pub(crate) struct CarriedHash(u64);

impl Hasher for CarriedHash {
    fn write(&mut self, bytes: &[u8]) {
        // Only `HashedName` is hashed here, with `write_u64`; fold anything
        // else all the same.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_by_name_and_hash() {
        let hashing = Hashing::default();
        let mut map = HashedMap::default();
        map.insert(hashing.name("a".into()), 1);
        map.insert(hashing.name("b".into()), 2);
        assert_eq!(map.get(&hashing.name("a".into())), Some(&1));
        assert_eq!(map.get(&hashing.name("b".into())), Some(&2));
        assert_eq!(map.get(&hashing.name("c".into())), None);
        // Another map's hashing: same name, another hash.
        let other = Hashing::default();
        assert_ne!(hashing.name("a".into()).hash, other.name("a".into()).hash);
    }
}
