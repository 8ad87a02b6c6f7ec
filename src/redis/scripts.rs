//! The Lua scripts of the Redis backend. Each runs atomically on one node;
//! `redis::Script` sends it by SHA (`EVALSHA`) and loads it on `NOSCRIPT`.

use std::sync::LazyLock;

use redis::Script;

/// Acquire: `SET key value NX PX expiry`, and if the key is taken, the
/// holder's remaining time.
///
/// `KEYS[1]` key, `ARGV[1]` value, `ARGV[2]` expiry in ms, `ARGV[3]` `1`
/// when this is a resend after a dropped connection: then a key that
/// already holds our value is ours (the first copy was applied).
/// Returns `-3` when acquired, else the key's `PTTL` (`-1`: no expiry).
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return -3
end
if ARGV[3] == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return -3
end
return redis.call('PTTL', KEYS[1])
",
    )
});

/// The reply of [`ACQUIRE`] that means the key was set.
pub(crate) const ACQUIRED: i64 = -3;

/// Release: delete the key only if it still holds our value.
///
/// `KEYS[1]` key, `ARGV[1]` value. Returns 1 if deleted, else 0.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
",
    )
});

/// Extend: reset the expiry only if the key still holds our value; with
/// `ARGV[3] == '1'` (`set_nx_on_extend`), re-create a key that is gone.
///
/// `KEYS[1]` key, `ARGV[1]` value, `ARGV[2]` expiry in ms, `ARGV[3]` flag.
/// Returns 1 if the key now holds our value with the new expiry, else 0.
pub(crate) static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if current == false and ARGV[3] == '1' then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
",
    )
});
