-- Release a lock on this node and wake the process first in line: see
-- `RELEASE` in scripts.rs for KEYS, ARGV and the reply. The common case
-- (our key, nobody waiting) runs first; the wait-queue helpers follow.
local requeue = ARGV[4] and ARGV[4] ~= ''
local mine = redis.call('GET', KEYS[1]) == ARGV[1]
if mine then
    redis.call('DEL', KEYS[1])
end
if not requeue and (not mine or ARGV[2] == '' or redis.call('EXISTS', KEYS[2]) == 0) then
    return mine and 1 or 0
end
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function first_waiter(queue, leases, now)
    while true do
        local head = redis.call('ZRANGE', queue, 0, 0)[1]
        if not head then
            return false
        end
        if tonumber(redis.call('HGET', leases, head) or '0') >= now then
            return head
        end
        redis.call('ZREM', queue, head)
        redis.call('HDEL', leases, head)
    end
end
local function keep(key, ms)
    if redis.call('PTTL', key) < tonumber(ms) then
        redis.call('PEXPIRE', key, ms)
    end
end
local function line_up(queue, leases, who, since, lease, now)
    redis.call('ZADD', queue, since, who)
    redis.call('HSET', leases, who, now + tonumber(lease))
    keep(queue, lease)
    keep(leases, lease)
end
local function leave(queue, leases, who)
    redis.call('ZREM', queue, who)
    redis.call('HDEL', leases, who)
end
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
local who = false
if requeue then
    local since, lease
    who, since, lease = string.match(ARGV[4], '^(%S+) (%d+) (%d+)$')
    line_up(KEYS[2], KEYS[3], who, since, lease, now_ms())
end
if mine and ARGV[2] ~= '' then
    local first = first_waiter(KEYS[2], KEYS[3], now_ms())
    if first and first ~= who then
        announce(ARGV[2], first, ARGV[3] .. ' ' .. KEYS[1])
    end
end
return mine and 1 or 0
