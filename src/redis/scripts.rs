//! The Lua scripts of the Redis backend. Each runs atomically on one node;
//! `redis::Script` sends it by SHA (`EVALSHA`) and loads it on `NOSCRIPT`.

use std::sync::LazyLock;

use redis::Script;

/// Acquire: `SET key value NX PX expiry`; when set, the next fencing token
/// of the name (`INCR` of its counter); when taken, the holder's remaining
/// time.
///
/// `KEYS[1]` lock key, `KEYS[2]` fencing counter key; `ARGV[1]` value,
/// `ARGV[2]` expiry in ms, `ARGV[3]` `1` when this is a resend after a
/// dropped connection: then a key that already holds our value is ours (the
/// first copy was applied); the counter is increased all the same, since
/// the key may be an earlier acquisition's with the same preset value.
/// Returns `{1, token}` when acquired, else `{0, PTTL}` (`-1`: no expiry).
pub(crate) static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return {1, redis.call('INCR', KEYS[2])}
end
if ARGV[3] == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, redis.call('INCR', KEYS[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
",
    )
});

/// Raise a fencing counter to at least a token (never lower it).
///
/// `KEYS[1]` counter key, `ARGV[1]` token. Returns 1.
pub(crate) static FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if tonumber(redis.call('GET', KEYS[1]) or '0') < tonumber(ARGV[1]) then
    redis.call('SET', KEYS[1], ARGV[1])
end
return 1
",
    )
});

/// Release: delete the key only if it still holds our value, and tell the
/// name's waiters. The message is a nonce chosen per release, the same on
/// every node, so that waiters count one release once, however many nodes
/// announce it.
///
/// `KEYS[1]` key; `ARGV[1]` value, `ARGV[2]` the name's release channel
/// (empty: nobody to tell), `ARGV[3]` the nonce. Returns 1 if deleted,
/// else 0.
pub(crate) static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    if ARGV[2] ~= '' then
        redis.call('PUBLISH', ARGV[2], ARGV[3])
    end
    return 1
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
