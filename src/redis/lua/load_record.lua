-- Read a record with Redlock: see `LOAD_RECORD` in scripts.rs for KEYS,
-- ARGV and the reply.
local kept = redis.call('GET', KEYS[1])
local born = redis.call('HGET', KEYS[2], 'born')
if born == '0' then
    return {kept, 1}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not born then
    born = now
    redis.call('HSET', KEYS[2], 'born', born)
end
if now - tonumber(born) >= tonumber(ARGV[1]) then
    return {kept, 1}
end
return {kept, 0}
