-- Moves due jobs from the scheduled set to the pending list, atomically, so
-- any number of daemons can run it. Due = score <= Redis TIME (ms): one
-- clock for the whole fleet, whatever the hosts' clocks say.
--
-- KEYS[1]  ZSET  scheduled (score = due time, Unix ms)
-- KEYS[2]  LIST  pending
-- ARGV[1]  most jobs moved in one call
--
-- Returns the number of jobs moved.
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
for _, entry in ipairs(due) do
  redis.call('ZREM', KEYS[1], entry)
  redis.call('LPUSH', KEYS[2], entry)
end
return #due
