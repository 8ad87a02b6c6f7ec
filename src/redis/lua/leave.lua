-- Take a process out of a name's wait queue on this node: see `LEAVE` in
-- scripts.rs for KEYS, ARGV and the reply.
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
local since = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not since or tonumber(since) > tonumber(ARGV[2]) then
    return 0
end
leave(KEYS[1], KEYS[2], ARGV[1])
if redis.call('EXISTS', KEYS[3]) == 0 then
    local first = first_waiter(KEYS[1], KEYS[2], now_ms())
    if first then
        announce(ARGV[3], first, ARGV[4] .. ' ' .. KEYS[3])
    end
end
return 1
