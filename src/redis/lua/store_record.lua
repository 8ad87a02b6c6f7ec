-- Keep a record under a lock name: see `STORE_RECORD` in scripts.rs for
-- KEYS, ARGV and the reply.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return 0
end
local kept = redis.call('GET', KEYS[2])
if kept then
    -- Only a record (the token, a space, then its magic) keeps a later
    -- writer out; anything else is no record, and is overwritten.
    local token, magic = string.match(kept, '^(%d+) (....)')
    if magic == ARGV[5] and tonumber(token) > tonumber(ARGV[2]) then
        return 0
    end
end
redis.call('SET', KEYS[2], ARGV[2] .. ' ' .. ARGV[4], 'PX', ARGV[3])
return 1
