-- The wait-queue helpers, spliced into each script that reads a name's
-- queue where it says `-- include: wait_queue.lua` (see `Lua::new` in
-- scripts.rs). A script's fast path comes before the line, so that it
-- does not pay for defining them.
--
-- A name's wait queue holds one entry per waiting process: a sorted set
-- of process ids, scored by when the process's first waiter started
-- waiting (a timestamp the process chooses, the same on every node, so
-- that every node orders waiters alike), and a hash of deadlines, the node
-- time until which each entry is kept without a renewal (its entry TTL
-- from its last renewal). A process renews its entry with each attempt;
-- an entry whose deadline passed (its process died or lost the nodes) is
-- dropped by the next script that looks at the queue. Both keys vanish
-- when the queue empties.
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function first_waiter(queue, deadlines, now)
    while true do
        local head = redis.call('ZRANGE', queue, 0, 0)[1]
        if not head then
            return false
        end
        if tonumber(redis.call('HGET', deadlines, head) or '0') >= now then
            return head
        end
        redis.call('ZREM', queue, head)
        redis.call('HDEL', deadlines, head)
    end
end
local function keep(key, ms)
    if redis.call('PTTL', key) < tonumber(ms) then
        redis.call('PEXPIRE', key, ms)
    end
end
local function line_up(queue, deadlines, who, since, ttl, now)
    redis.call('ZADD', queue, since, who)
    redis.call('HSET', deadlines, who, now + tonumber(ttl))
    keep(queue, ttl)
    keep(deadlines, ttl)
end
local function leave(queue, deadlines, who)
    redis.call('ZREM', queue, who)
    redis.call('HDEL', deadlines, who)
end
-- Publishes a wake-up: the channel prefix (after a mode byte) and the
-- process's id make the channel; mode `S` (a Redis Cluster, whose channel
-- hashes to the script's slot) uses sharded pub/sub, or plain `PUBLISH`
-- where the server does not have it.
local function announce(wake, who, message)
    local channel = string.sub(wake, 2) .. who
    if string.sub(wake, 1, 1) == 'S' then
        local sent = redis.pcall('SPUBLISH', channel, message)
        if type(sent) ~= 'table' or not sent.err then
            return
        end
    end
    redis.call('PUBLISH', channel, message)
end
