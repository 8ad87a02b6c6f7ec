-- Take a process out of a name's wait queue on this node: see `LEAVE` in
-- scripts.rs for KEYS, ARGV and the reply.
-- include: wait_queue.lua
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
