-- Put a waiting process in a name's wait queue on this node, or renew its
-- entry, without trying the lock: see `LINE_UP` in scripts.rs for KEYS,
-- ARGV and the reply.
-- include: wait_queue.lua
line_up(KEYS[1], KEYS[2], ARGV[1], ARGV[2], ARGV[3], now_ms())
return 1
