-- Extend a lock on this node, or put back a key the node lost: see
-- `EXTEND` in scripts.rs for KEYS, ARGV and the replies.
local NO_REPAIR = '-'
local COUNTS = '0'          -- `born` of a node that counts
local RECREATED = 2         -- put back on a node that kept its state
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if current or ARGV[3] == NO_REPAIR then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local born = redis.call('HGET', KEYS[2], 'born')
if born == COUNTS then
    return RECREATED
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not born then
    redis.call('HSET', KEYS[2], 'born', now)
    return 1
end
if now < tonumber(born) + tonumber(ARGV[3]) then
    return 1
end
return RECREATED
