-- Acquire a lock on this node: see `ACQUIRE` in scripts.rs for KEYS,
-- ARGV and the replies. The common case (a free lock that nobody waits
-- for, on a node that counts) runs first; the wait-queue helpers are
-- defined after it, so that it does not pay for them.
local NONE = 45             -- '-', a word of ARGV[3] that says "none"
local COUNTS = '0'          -- `born` of a node that counts
local FREE_BUT_WAITED_FOR = -3
local RECOVERING = -4
local function next_token(node)
    local token = redis.call('HINCRBY', node, 'fence', 1)
    if token == 1 then
        local t = redis.call('TIME')
        token = tonumber(t[1]) * 1000000 + tonumber(t[2])
        redis.call('HSET', node, 'fence', token)
    end
    return token
end
-- One node, or a Redis Cluster: nothing to recover from, and the node's
-- state is neither read nor written.
if string.byte(ARGV[3], -1) ~= NONE then
    local born = redis.call('HGET', KEYS[2], 'born')
    if born ~= COUNTS then
        local recovery = string.match(ARGV[3], '(%d+)$')
        local t = redis.call('TIME')
        local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
        if not born then
            born = now
            redis.call('HSET', KEYS[2], 'born', born)
        end
        local left = tonumber(born) + tonumber(recovery) - now
        if left > 0 then
            return {0, RECOVERING, tonumber(born), left}
        end
    end
end
local set = redis.call('EXISTS', KEYS[3]) == 0
    and redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if set and string.byte(ARGV[3], 1) == NONE then
    return {1, next_token(KEYS[2])}
end
-- include: wait_queue.lua
local queue, deadlines = KEYS[3], KEYS[4]
local next_start, resent, who, start, ttl =
    string.match(ARGV[3], '^(%S+) ([01]) (%S+) (%d+) (%d+) %S+$')
if who == '-' then
    who = ''
end
local function acquired()
    if who ~= '' then
        if next_start ~= '-' then
            line_up(queue, deadlines, who, next_start, ttl, now_ms())
        else
            leave(queue, deadlines, who)
        end
    end
    return {1, next_token(KEYS[2])}
end
local function refused(pttl)
    if who ~= '' then
        line_up(queue, deadlines, who, start, ttl, now_ms())
    end
    return {0, pttl}
end
if set then
    return acquired()
end
if resent == '1' and redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return acquired()
end
if redis.call('EXISTS', queue) == 1 then
    local first = first_waiter(queue, deadlines, now_ms())
    -- A waiter not in line yet that started before the process first in
    -- line would be first once in line: a free lock is its own, even when
    -- a release woke that process (its try is then refused, and it waits
    -- for the next release). Refused, it would be first in line with
    -- nobody to wake it.
    if first and first ~= who and redis.call('EXISTS', KEYS[1]) == 0
        and (who == '' or tonumber(start) >= tonumber(redis.call('ZSCORE', queue, first)))
    then
        return refused(FREE_BUT_WAITED_FOR)
    end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return acquired()
end
return refused(redis.call('PTTL', KEYS[1]))
