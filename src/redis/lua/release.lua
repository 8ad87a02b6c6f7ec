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
-- include: wait_queue.lua
local who = false
if requeue then
    local since, ttl
    who, since, ttl = string.match(ARGV[4], '^(%S+) (%d+) (%d+)$')
    line_up(KEYS[2], KEYS[3], who, since, ttl, now_ms())
end
if mine and ARGV[2] ~= '' then
    local first = first_waiter(KEYS[2], KEYS[3], now_ms())
    if first and first ~= who then
        announce(ARGV[2], first, ARGV[3] .. ' ' .. KEYS[1])
    end
end
return mine and 1 or 0
