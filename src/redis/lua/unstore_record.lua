-- Take back a record whose write did not reach a quorum: see
-- `UNSTORE_RECORD` in scripts.rs for KEYS, ARGV and the reply.
local kept = redis.call('GET', KEYS[1])
if kept and string.sub(kept, 1, #ARGV[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
end
return 0
