//! The Redis keys of one lock name, and the wake-up channel its releases
//! are announced on.

use std::sync::{Arc, OnceLock};

/// Every key a lock name uses on a node. All but the lock key end in a
/// control character and a suffix; names cannot hold control characters,
/// so no lock key ends this way.
///
/// On a Redis Cluster the lock key is a hash tag, `{<prefix><name>}`, so
/// every key of the name (and the channel its releases are announced on)
/// lives in the name's slot, on one master, as a script needs.
#[derive(Debug)]
pub(crate) struct Keys {
    /// The key prefix followed by the name; holds the owner's value.
    pub(crate) lock: Arc<str>,
    /// The node's bookkeeping hash, shared by every name on the node (on a
    /// Redis Cluster, by every name of the slot): the fencing counter
    /// (`fence`) and when the node lost its state (`born`). Its size is
    /// bounded by the deployment, not by the names ever locked.
    pub(crate) node: Arc<str>,
    /// The wait queue: one entry per waiting process, by start of wait.
    pub(crate) queue: Arc<str>,
    /// The deadline of each wait-queue entry: the node time until which it
    /// is kept without a renewal (its TTL from the last renewal).
    pub(crate) deadlines: Arc<str>,
    /// How releases of this name are announced: a mode byte (`P`: `PUBLISH`,
    /// `S`: `SPUBLISH` where the server has it, else `PUBLISH`) and the
    /// wake-up channel's prefix; a process's id completes the channel.
    pub(crate) wake: Arc<str>,
    /// On a Redis Cluster, the hash slot of every key of the name.
    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    pub(crate) slot: Option<u16>,
}

/// The keys that every name on independent nodes shares, the node's
/// bookkeeping hash and the wake-up channel's prefix: made once per
/// `RedisSync`, not once per mutex.
#[derive(Clone, Debug)]
pub(crate) struct SharedKeys {
    node: Arc<str>,
    wake: Arc<str>,
}

impl SharedKeys {
    /// The shared keys under `prefix`, on independent nodes.
    pub(crate) fn plain(prefix: &str) -> Self {
        SharedKeys {
            node: [prefix, "\u{1f}node"].concat().into(),
            wake: ["P", prefix, "\u{1f}wake\u{1f}"].concat().into(),
        }
    }
}

impl SharedKeys {
    /// The lock key of `name` under `prefix` on independent nodes, and the
    /// node's bookkeeping hash: all a record needs, without the name's
    /// other keys.
    pub(crate) fn lock_and_node(&self, prefix: &str, name: &str) -> (String, Arc<str>) {
        ([prefix, name].concat(), self.node.clone())
    }
}

impl Keys {
    /// The keys of `name` on independent nodes: the lock at
    /// `<prefix><name>`, announced with `PUBLISH` on one channel per
    /// process.
    pub(crate) fn plain(prefix: &str, name: &str) -> Self {
        Self::plain_sharing(prefix, name, &SharedKeys::plain(prefix))
    }

    /// [`plain`](Self::plain), with the keys every name shares made
    /// already.
    pub(crate) fn plain_sharing(prefix: &str, name: &str, shared: &SharedKeys) -> Self {
        let (lock, node) = shared.lock_and_node(prefix, name);
        Self::with(lock, node, shared.wake.clone())
    }

    /// The keys of `name` on a Redis Cluster: the lock at
    /// `{<prefix><name>}`, announced with `SPUBLISH` on the process's
    /// channel for the slot (a short tag of the slot's own makes the
    /// channel hash there). `prefix` is not empty and holds no brace, so
    /// the hash tag is never empty and all keys share it.
    pub(crate) fn tagged(prefix: &str, name: &str) -> Self {
        let lock = format!("{{{prefix}{name}}}");
        let at = slot(lock.as_bytes());
        let tag = slot_tag(at);
        let node = format!("{{{tag}}}{prefix}\u{1f}node");
        let wake = format!("S{{{tag}}}{prefix}\u{1f}wake\u{1f}");
        Keys {
            slot: Some(at),
            ..Self::with(lock, node.into(), wake.into())
        }
    }

    fn with(lock: String, node: Arc<str>, wake: Arc<str>) -> Self {
        Keys {
            node,
            queue: [&*lock, "\u{1f}queue"].concat().into(),
            deadlines: [&*lock, "\u{1f}leases"].concat().into(),
            lock: lock.into(),
            wake,
            slot: None,
        }
    }

    /// The wake-up channel of the process `client` for this name.
    pub(crate) fn channel(&self, client: &str) -> String {
        format!("{}{client}", &self.wake[1..])
    }
}

/// The number of hash slots of a Redis Cluster.
const SLOTS: u16 = 16384;

/// The cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the
/// part between the first `{` and the next `}`, when not empty), or of the
/// whole key, modulo 16384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

/// CRC-16/XMODEM: polynomial 0x1021, initial value 0, no reflection.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A number whose decimal digits hash to `slot`: the smallest one, found
/// once per process for every slot (about 170,000 CRCs of a few bytes, a
/// few milliseconds: [`prepare_slot_tags`] does it when a cluster backend
/// is built, not on a runtime thread's first lock).
fn slot_tag(slot: u16) -> u32 {
    slot_tags()[usize::from(slot)]
}

/// Builds the table of [`slot_tag`] now, if not yet built.
#[cfg(feature = "cluster")]
pub(crate) fn prepare_slot_tags() {
    slot_tags();
}

fn slot_tags() -> &'static [u32] {
    static TAGS: OnceLock<Vec<u32>> = OnceLock::new();
    TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; usize::from(SLOTS)];
        let mut missing = tags.len();
        let mut n = 0u32;
        while missing > 0 {
            let at = usize::from(crc16(n.to_string().as_bytes()) % SLOTS);
            if tags[at] == u32::MAX {
                tags[at] = n;
                missing -= 1;
            }
            n += 1;
        }
        tags
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_cluster_specification() {
        // Examples from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31c3);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"{a}x"), slot(b"a"));
        // An empty tag hashes the whole key.
        assert_eq!(slot(b"{}a"), crc16(b"{}a") % SLOTS);
        assert_eq!(slot(b"a{b"), crc16(b"a{b") % SLOTS);
    }

    #[test]
    fn every_key_and_the_channel_of_a_name_share_its_slot() {
        for name in ["orders:17", "}x", "{", "a}b{c}", "é", "{}"] {
            let keys = Keys::tagged("dsync:", name);
            let at = slot(keys.lock.as_bytes());
            assert_eq!(keys.slot, Some(at));
            for key in [&keys.node, &keys.queue, &keys.deadlines] {
                assert_eq!(slot(key.as_bytes()), at, "{key:?}");
            }
            assert_eq!(slot(keys.channel("c0ffee").as_bytes()), at, "{name:?}");
            assert!(keys.wake.starts_with('S'));
        }
        let plain = Keys::plain("dsync:", "a");
        assert_eq!(&*plain.lock, "dsync:a");
        assert_eq!(&*plain.node, "dsync:\u{1f}node");
        // One bookkeeping key per node, or per slot on a cluster.
        assert_eq!(Keys::plain("dsync:", "b").node, plain.node);
        let (x, y) = (Keys::tagged("dsync:", "x"), Keys::tagged("dsync:", "y"));
        assert_eq!(x.node == y.node, x.slot == y.slot);
        assert_eq!(plain.channel("c"), "dsync:\u{1f}wake\u{1f}c");
    }

    #[test]
    fn every_slot_has_a_tag() {
        for s in [0, 1, 5461, 12182, SLOTS - 1] {
            assert_eq!(crc16(slot_tag(s).to_string().as_bytes()) % SLOTS, s);
        }
    }
}
