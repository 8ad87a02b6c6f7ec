//! The Lua scripts of the Redis backend. Each runs atomically on one node,
//! sent by SHA (`EVALSHA`); a node that does not have it yet (`NOSCRIPT`)
//! gets it whole (`EVAL`, which also caches it there), on the same
//! connection: on a cluster, on the master of the keys' slot alone.
//!
//! Each script is one file under `lua/`, whole, but for the wait-queue
//! helpers (`lua/wait_queue.lua`), which a script that reads the queue
//! splices in at a line of its own, past its fast path.

use std::sync::LazyLock;

use redis::{Arg, Cmd, ToRedisArgs};

/// A Lua script: its source and its SHA1.
pub(crate) struct Lua {
    code: String,
    hash: String,
}

/// The line of a script where the wait-queue helpers (`lua/wait_queue.lua`)
/// are spliced in: one source for them, and each script still defines
/// them only past its fast path.
const INCLUDE_WAIT_QUEUE: &str = "-- include: wait_queue.lua";

impl Lua {
    /// A script from its source, with the wait-queue helpers spliced in at
    /// its [`INCLUDE_WAIT_QUEUE`] line, if it has one.
    fn new(source: &str) -> Self {
        let code = source
            .lines()
            .map(|line| {
                if line == INCLUDE_WAIT_QUEUE {
                    include_str!("lua/wait_queue.lua")
                } else {
                    line
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let hash = redis::Script::new(&code).get_hash().to_owned();
        Lua { code, hash }
    }

    /// A call of this script with `keys`; [`Call::arg`] adds its `ARGV`.
    /// The command is sized for the keys and `args` more arguments of up
    /// to [`ARG_ROOM`] bytes each, so that writing them does not grow it
    /// again and again.
    pub(crate) fn call(&'static self, keys: &[&str], args: usize) -> Call {
        let data = "EVALSHA".len()
            + self.hash.len()
            + 2
            + keys.iter().map(|key| key.len()).sum::<usize>()
            + args * ARG_ROOM;
        let mut evalsha = Cmd::with_capacity(3 + keys.len() + args, data);
        evalsha
            .arg("EVALSHA")
            .arg(&self.hash)
            .arg(keys.len())
            .arg(keys);
        Call { lua: self, evalsha }
    }
}

/// The room a script call sets aside per argument: a value (32 hex
/// digits) or a packed argument fits.
const ARG_ROOM: usize = 64;

/// A call of a script: its `EVALSHA`, and, built only for a node that does
/// not have the script yet, the same call with the source (`EVAL`).
pub(crate) struct Call {
    lua: &'static Lua,
    evalsha: Cmd,
}

impl Call {
    /// Appends an argument (`ARGV`), written straight into the command.
    pub(crate) fn arg(mut self, arg: impl ToRedisArgs) -> Self {
        self.evalsha.arg(arg);
        self
    }

    /// `EVALSHA sha numkeys keys... args...`.
    pub(crate) fn evalsha(&self) -> &Cmd {
        &self.evalsha
    }

    /// `EVAL source numkeys keys... args...`.
    pub(crate) fn eval(&self) -> Cmd {
        let mut eval = redis::cmd("EVAL");
        eval.arg(&self.lua.code);
        for arg in self.evalsha.args_iter().skip(2) {
            if let Arg::Simple(bytes) = arg {
                eval.arg(bytes);
            }
        }
        eval
    }
}

/// Acquire: `SET key value NX PX expiry`, unless the node is recovering
/// from a restart or another process waits in the name's queue ahead of
/// this one; when set, the next fencing token of the node; when refused,
/// the holder's remaining time, and this process's entry in the queue
/// (when it waits).
///
/// A node that lost its state (restarted empty, flushed) also lost the
/// locks it held, which the other nodes may still hold: it refuses new
/// locks until the longest expiry in use has passed since, so that every
/// lock it forgot has either expired or been put back by its holder's
/// extension (see [`EXTEND`]). The node's bookkeeping hash tells: its
/// `born` field is `0` for a node that counts, missing for a node that
/// lost its state (the script then sets it to the node's time), or the
/// time (ms) the node was first seen without its state.
///
/// `KEYS`: 1 lock, 2 the node's bookkeeping hash, 3 wait queue, 4 its
/// entries' deadlines.
/// `ARGV`: 1 the value, 2 the expiry in ms, 3 six words, packed into one
/// argument because Redis reads at most ten arguments of a command from a
/// client that has not authenticated, and answers more with a protocol
/// error that hides the missing password (`EVALSHA sha numkeys`, four keys
/// and three arguments make ten):
/// - when acquired, the start of the process's next waiter, or `-` (none:
///   leave the queue);
/// - `1` when this is a resend after a dropped connection of an attempt
///   with a generated value (then a key that already holds our value is
///   ours: the first copy was applied), else `0` (a preset value may be
///   another owner's, so a resend with one is an ordinary attempt);
/// - the waiting process's id, or `-` for a try that does not wait (it
///   takes a free lock only when nobody waits);
/// - when its waiter started waiting (ms);
/// - its entry's TTL (ms);
/// - how long (ms) a node that lost its state refuses new locks, or `-`
///   for none (one node, or a Redis Cluster: nothing to recover from; the
///   marker is then neither read nor written, so that such a backend
///   never marks a node that Redlock uses).
///
/// The common case, a free lock that nobody waits for on a node that
/// counts, runs first and touches nothing else: `HGET` of the node's
/// state (with Redlock only), `EXISTS` on the queue, `SET`, `HINCRBY`.
///
/// Returns `{1, token}` when acquired, else `{0, PTTL}` (`-1`: no expiry,
/// `-2`: gone meanwhile), `{0, -3}` when the lock is free but another
/// process waits first (a waiter not in line yet whose start is earlier
/// than that process's takes the lock: it would be first once in line), or `{0, -4, born, left}` when the node is
/// recovering: first seen without its state at `born` (its time, ms), it
/// takes new locks in `left` ms.
pub(crate) static ACQUIRE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(include_str!("lua/acquire.lua")));

/// Leave a name's wait queue: remove this process's entry unless a later
/// waiter of it renewed the entry, and, if the lock is free, tell the
/// process now first in line.
///
/// `KEYS`: 1 wait queue, 2 its entries' deadlines, 3 lock. `ARGV`: 1 the process's id,
/// 2 the start of the waiter that leaves (ms), 3 the wake-up channel
/// prefix, 4 a nonce. Returns 1 if the entry was removed.
pub(crate) static LEAVE: LazyLock<Lua> = LazyLock::new(|| Lua::new(include_str!("lua/leave.lua")));

/// Line up: put a waiting process in a name's wait queue, or renew its
/// entry, without trying the lock. A waiter sends it while it waits in
/// its process's line behind a request of the same process that holds the
/// lock (a layer's request keeps its turn in the line while it holds), so
/// that its process keeps its place among the other processes' waiters.
///
/// `KEYS`: 1 wait queue, 2 its entries' deadlines. `ARGV`: 1 the
/// process's id, 2 the start of its earliest waiter (ms), 3 the entry's
/// TTL (ms). Returns 1.
pub(crate) static LINE_UP: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(include_str!("lua/line_up.lua")));

/// Raise the node's fencing counter to at least a token (never lower it).
/// A node whose counter is missing lost its state since it granted the
/// acquisition: it is left alone (its counter starts at its clock at its
/// next increment, after it recovers, above the token), and the
/// acknowledgement stands.
///
/// `KEYS[1]` the node's bookkeeping hash, `ARGV[1]` the token. Returns 1.
pub(crate) static FENCE: LazyLock<Lua> = LazyLock::new(|| Lua::new(include_str!("lua/fence.lua")));

/// Release: delete the key only if it still holds our value, and wake the
/// process first in the name's wait queue, if any: a message on that
/// process's wake-up channel naming the lock key. The message carries a
/// nonce chosen per release, the same on every node, so that the process
/// counts one release once, however many nodes announce it.
///
/// The release of a failed attempt by a process that keeps waiting also
/// puts that process back in line with its waiter's start (`ARGV[4]`):
/// the attempt's acquisition on this node took it out of the queue (or
/// moved it back to its next waiter's start), and the queues of the nodes
/// must agree on who is first, or two processes, each first on some of the
/// nodes, keep splitting them between them and neither gets a quorum.
///
/// `KEYS`: 1 lock, 2 wait queue, 3 its entries' deadlines. `ARGV`: 1 value, 2 the wake-up
/// channel prefix (the process id completes it; empty: tell nobody), 3 the
/// nonce, 4 (optional) `who since ttl`: the waiting process's id, its
/// waiter's start and its entry's TTL (ms), for the release of a failed
/// attempt whose waiter tries again; that process is not woken (its waiter
/// was just refused, and wakes on its own terms). Returns 1 if deleted,
/// else 0.
pub(crate) static RELEASE: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(include_str!("lua/release.lua")));

/// Extend: reset the expiry if the key still holds our value; with a
/// repair limit (a holder whose validity is still ahead, with
/// `set_nx_on_extend`), re-create a key that is gone.
///
/// A node that lost its state (restarted empty) lost the key with it, and
/// takes no new lock while it recovers: there the re-created key counts
/// like one that was still ours (`1`), and the holder keeps its quorum
/// through nodes restarting one after the other. On a node that kept its
/// state, a missing key was released or expired: it is re-created (`2`)
/// but counts only if the holder still has a quorum elsewhere (the client
/// releases it when the quorum says the lock is not its own; after a
/// failure it stays, and counts at the next try), which puts back the keys
/// of a node that was unreachable for longer than the expiry.
///
/// `KEYS`: 1 lock, 2 the node's bookkeeping hash. `ARGV`: 1 value, 2 the
/// expiry in ms, 3 how long a node that lost its state recovers (ms), or
/// `-` for no re-creation. Returns 1 if the key holds our
/// value with the new expiry and counts, 2 if it was re-created on a node
/// that kept its state, else 0.
pub(crate) static EXTEND: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(include_str!("lua/extend.lua")));

/// Read a record with Redlock, and whether this node's answer counts: a
/// node that lost its state (see [`ACQUIRE`]: its `born` field is missing,
/// then set to its time, or is the time it was first seen without its
/// state) may have lost records with it, so its "no record" counts only
/// once the records' TTL has passed since; `born` `0` counts at once.
///
/// `KEYS`: 1 record, 2 the node's bookkeeping hash. `ARGV`: 1 the records'
/// TTL (ms). Returns `{record or nil, 1 if the answer counts else 0}`.
pub(crate) static LOAD_RECORD: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(include_str!("lua/load_record.lua")));

/// Take back a record whose write did not reach a quorum of nodes (the
/// lock was lost meanwhile, or nodes failed): deleted where it is still
/// the one this writer wrote (its value starts with the writer's token and
/// a space), so that no node keeps a record that does not count.
///
/// `KEYS[1]` the record. `ARGV[1]` the writer's token followed by a space.
/// Returns 1 if deleted, else 0.
pub(crate) static UNSTORE_RECORD: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(include_str!("lua/unstore_record.lua")));

/// Keep a record beside a lock (see [`DistSync::records`](crate::DistSync)):
/// only while the lock holds the writer's value, and not over a record
/// written with a higher fencing token. The record is kept as the token,
/// a space, and its bytes.
///
/// `KEYS`: 1 lock, 2 record. `ARGV`: 1 the writer's value, 2 its fencing
/// token (`0` for none), 3 the TTL (ms), 4 the record, 5 the first four
/// bytes of a record (a kept value that does not start with them after its
/// token is no record, and does not keep a writer out). Returns 1 if kept,
/// else 0.
pub(crate) static STORE_RECORD: LazyLock<Lua> =
    LazyLock::new(|| Lua::new(include_str!("lua/store_record.lua")));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_helpers_are_spliced_in_past_the_fast_path() {
        for (script, fast_path) in [
            (&*ACQUIRE, "local set = redis.call('EXISTS', KEYS[3]) == 0"),
            (
                &*RELEASE,
                "local mine = redis.call('GET', KEYS[1]) == ARGV[1]",
            ),
            (&*LEAVE, ""),
        ] {
            let helpers = script.code.find("local function first_waiter").unwrap();
            assert!(script.code.find(fast_path).unwrap() <= helpers);
            assert_eq!(script.code.matches("local function announce").count(), 1);
            assert!(!script.code.contains(&format!("\n{INCLUDE_WAIT_QUEUE}\n")));
        }
        for script in [&*EXTEND, &*FENCE] {
            assert!(!script.code.contains("first_waiter"));
        }
    }
}
