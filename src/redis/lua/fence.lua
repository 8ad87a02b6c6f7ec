-- Raise this node's fencing counter to at least a token: see `FENCE` in
-- scripts.rs.
local fence = redis.call('HGET', KEYS[1], 'fence')
if fence and tonumber(fence) < tonumber(ARGV[1]) then
    redis.call('HSET', KEYS[1], 'fence', ARGV[1])
end
return 1
